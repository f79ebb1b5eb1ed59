"""Delta Sampling: the WebUI's entry point. Wiring only; everything else lives in lib_delta."""

from __future__ import annotations

from modules import scripts

from lib_delta import hosts
from lib_delta.args import DeltaSettings, from_positional
from lib_delta.webui import panel as ui

hosts.register()  # per-step callbacks and settings; the WebUI clears callbacks on reload, so this runs on import


class DeltaSamplingScript(scripts.Script):
    sorting_priority = 15

    def title(self) -> str:
        return "Delta Sampling"

    def show(self, is_img2img: bool):
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool):
        return ui.build(self, is_img2img)

    def process(self, p, *args) -> None:
        host = hosts.current()
        host.begin(p)  # the previous generation is closed, even one that died before postprocess
        try:
            settings = from_positional(args).with_overrides(getattr(p, "delta_overrides", {})).validated()
            if settings.enabled:
                host.start(p, settings)
        except Exception as e:  # bad input is a 422, the unforeseen a 500: never a plain image
            host.fail(p, e)

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        hosts.current().before_sampling(p, **kwargs)

    def post_sample(self, p, ps, *args) -> None:
        hosts.current().after_sampling(p)

    def postprocess(self, p, processed, *args) -> None:
        hosts.current().finish(p, processed)


__all__ = ["DeltaSamplingScript", "DeltaSettings"]
