"""Delta Sampling: the WebUI's entry point. Wiring only; everything else lives in lib_delta."""

from __future__ import annotations

from modules import scripts

from lib_delta import hosts
from lib_delta.args import DeltaSettings, from_positional
from lib_delta.errors import DeltaError
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
        hosts.current().finish(p)  # a generation that died before postprocess leaves nothing behind
        try:
            settings = from_positional(args).with_overrides(getattr(p, "delta_overrides", {})).validated()
            if settings.enabled:
                hosts.current().start(p, settings)
        except DeltaError as e:
            hosts.current().fail(p, e)

    def process_before_every_sampling(self, p, *args, **kwargs) -> None:
        hosts.current().before_sampling(p, **kwargs)

    def postprocess(self, p, processed, *args) -> None:
        hosts.current().finish(p, processed)


__all__ = ["DeltaSamplingScript", "DeltaSettings"]
