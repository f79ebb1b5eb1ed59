"""Build the Delta Sampling panel with the real gradio of a WebUI's environment (3.41 in AUTOMATIC1111, 4.40 in
Forge 2 and Neo), in both tabs, and print what the page's config holds of it as JSON.

Run with a WebUI's python from the repository root: ``<venv>/bin/python tests/e2e/panel_build.py [WEBUI_ROOT]``.
The WebUI's own ``modules`` are replaced by small stand-ins built from that gradio's components (the real ones need a
started WebUI), and the host's lists by two fixed lists; everything else is the panel's code as the WebUI runs it.
With the WebUI's folder, its own ``modules/ui_loadsave.py`` then reads a ui-config.json into the built panel the way
the WebUI does at start-up (after scripts.py has named the script file on each control and on_ui_tabs has run).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import types
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gradio as gr

# The WebUI's switch-in-a-header accordion, reduced to what the panel uses. Gradio 4 writes a .pyi beside the file
# of any component subclass, so the class lives in a throwaway folder.
_INPUT_ACCORDION = """
import gradio as gr


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        super().__init__(value=value, label=kwargs.get("label"), elem_id=kwargs.get("elem_id"))
        self.accordion = gr.Accordion(kwargs.get("label"), open=False, elem_id=f"{kwargs.get('elem_id')}-accordion")

    def extra(self):
        return gr.Column()

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        self.accordion.__exit__(*exc)
"""


def input_accordion(folder: Path) -> type:
    (folder / "panel_stand_ins.py").write_text(_INPUT_ACCORDION)
    sys.path.insert(0, str(folder))
    import panel_stand_ins

    return panel_stand_ins.InputAccordion


def install_stand_ins(folder: Path) -> None:
    modules = types.ModuleType("modules")
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.checkpoint_tiles = lambda: ["sd15.safetensors [cc6cb27103]", "sdxl.safetensors [31e35c80fc]"]
    sd_models.list_models = lambda: None
    shared = types.ModuleType("modules.shared")
    shared.opts = SimpleNamespace()
    ui_common = types.ModuleType("modules.ui_common")

    def create_refresh_button(component, method, args, elem_id):
        button = gr.Button("\U0001f504", elem_id=elem_id)
        button.click(fn=lambda: gr.update(**args()), inputs=[], outputs=[component])
        return button

    ui_common.create_refresh_button = create_refresh_button
    ui_components = types.ModuleType("modules.ui_components")
    ui_components.InputAccordion = ui_components.InputAccordionImpl = input_accordion(folder)  # Neo: ...Impl
    ui_components.FormHTML = gr.HTML
    ui_components.ToolButton = gr.Button
    errors = types.ModuleType("modules.errors")

    def display(e, task, **kwargs):  # the WebUI prints and goes on; here a failed read must fail the check
        raise e

    errors.display = display
    modules.sd_models, modules.shared, modules.errors = sd_models, shared, errors
    for name, module in {"modules": modules, "modules.sd_models": sd_models, "modules.shared": shared,
                         "modules.ui_common": ui_common, "modules.ui_components": ui_components,
                         "modules.errors": errors}.items():
        sys.modules[name] = module

    from lib_delta import hosts

    lists = {"controlnet": ["control_v11p_sd15_canny [d14c016b]", "diffusers_xl_canny_mid [112a778d]"],
             "controlnet_module": ["none", "canny"],
             "ipadapter": ["ip-adapter_sd15 [6a3f6166]", "ip-adapter_xl [b7ef3f1a]"],
             "ipadapter_module": ["ip-adapter_clip_h", "ip-adapter_clip_g"]}
    hosts.catalog = lambda: SimpleNamespace(names=lambda c: list(lists[c]), refresh=lambda c: None,
                                            missing=lambda c: None)


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        install_stand_ins(Path(folder))
        build(Path(sys.argv[1]) if len(sys.argv) > 1 else None, Path(folder))


# Saved defaults read back: λ of the first group, and of the second group (which repeats its label).
SAVED = {"customscript/delta_sampling.py/txt2img/λ (strength)/value": 0.6,
         "customscript/delta_sampling.py/Second adaptation group/txt2img/λ (strength)/value": 1.5}
SAVED_FIELDS = ("strength", "group2_strength", "controlnet1_weight", "controlnet2_weight", "group2_controlnet1_weight")


def build(webui: Path | None, folder: Path) -> None:
    from lib_delta.args import POSITIONAL_FIELDS
    from lib_delta.webui import panel

    out = {"gradio": gr.__version__, "tabs": {}}
    tabs = {}
    with gr.Blocks() as demo:
        for tab in ("txt2img", "img2img"):
            script = SimpleNamespace(elem_id=lambda item, tab=tab: f"script_{tab}_delta_sampling_{item}")
            with gr.Column() as column:
                controls = panel.build(script, is_img2img=tab == "img2img")
            for control in controls:  # scripts.py, once ui() has returned
                control.custom_script_source = "delta_sampling.py"
            tabs[tab] = (column, controls)
            out["tabs"][tab] = {"controls": len(controls), "fields": len(POSITIONAL_FIELDS),
                                "infotext_fields": len(script.infotext_fields)}
        panel.scope_saved_defaults()  # on_ui_tabs
        if webui is not None:
            out["saved_defaults"] = read_saved_defaults(webui, folder, tabs)
    config = demo.get_config_file()
    by_id = {c["props"].get("elem_id"): c for c in config["components"] if c.get("props", {}).get("elem_id")}
    for tab in out["tabs"]:
        prefix = f"script_{tab}_delta_sampling_"
        ours = {k.removeprefix(prefix): c for k, c in by_id.items() if k and k.startswith(prefix)}
        out["tabs"][tab].update(
            missing=[f for f in POSITIONAL_FIELDS[1:] if f not in ours],
            types={f: ours[f]["type"] for f in POSITIONAL_FIELDS[1:] if f in ours},
            hidden=sorted(f for f in POSITIONAL_FIELDS if f in ours and ours[f]["props"].get("visible") is False),
            model_choices=ours["controlnet1_model"]["props"].get("choices"),
            ip_model_choices=ours["group2_ipadapter2_model"]["props"].get("choices"),
            ip_module=[ours["ipadapter1_module"]["props"].get(k) for k in ("value", "choices")],
        )
    out["events"] = len(config["dependencies"])
    print(json.dumps(out, ensure_ascii=False))


def read_saved_defaults(webui: Path, folder: Path, tabs: dict[str, tuple[gr.Column, list]]) -> dict:
    """The WebUI's own UiLoadsave over both tabs with :data:`SAVED` in its ui-config.json: which of our controls it
    tracks under a key of their own, and the values the saved defaults gave them."""
    from lib_delta.args import POSITIONAL_FIELDS

    spec = importlib.util.spec_from_file_location("modules.ui_loadsave", webui / "modules" / "ui_loadsave.py")
    ui_loadsave = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ui_loadsave)
    config = folder / "ui-config.json"
    config.write_text(json.dumps(SAVED, ensure_ascii=False), encoding="utf-8")
    loadsave = ui_loadsave.UiLoadsave(str(config))
    for tab, (column, _) in tabs.items():
        loadsave.add_block(column, tab)
    tracked = {id(c) for c in loadsave.component_mapping.values()}
    kinds = (gr.Slider, gr.Radio, gr.Checkbox, gr.Textbox, gr.Dropdown)  # those ui_loadsave saves
    result = {}
    for tab, (_, controls) in tabs.items():
        by_field = dict(zip(POSITIONAL_FIELDS, controls, strict=True))
        result[tab] = {
            "saveable": sum(type(c) in kinds for c in controls),
            "untracked": [f for f, c in by_field.items() if type(c) in kinds and id(c) not in tracked],
            "values": {f: by_field[f].value for f in SAVED_FIELDS},
            "labels": {f: by_field[f].label for f in SAVED_FIELDS},
        }
    result["keys"] = sorted(k for k in loadsave.component_mapping if k.startswith("customscript/delta_sampling.py"))
    return result


if __name__ == "__main__":
    main()
