"""The panel built against a stand-in of gradio and the WebUI modules it uses: control order, tooltips, defaults,
the LoRA picker, and the API's two argument forms filled the way the WebUI fills them."""

import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import pytest

from lib_delta.args import POSITIONAL_FIELDS, STRENGTH_RANGE, DeltaSettings, from_positional, to_positional
from lib_delta.webui import panel as ui


class Block:
    """A gradio block or component: keeps its arguments and event handlers."""

    created: ClassVar[list["Block"]] = []

    def __init__(self, *args, **kwargs):
        self.kwargs = kwargs
        self.value = kwargs.get("value", args[0] if args else None)
        self.label = kwargs.get("label")
        self.elem_id = kwargs.get("elem_id")
        self.events: dict[str, dict] = {}
        Block.created.append(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def change(self, fn=None, inputs=None, outputs=None, **kwargs):
        self.events["change"] = dict(fn=fn, inputs=inputs, outputs=outputs, **kwargs)

    click = change


class InputAccordion(Block):
    def __init__(self, value, **kwargs):
        super().__init__(value=value, **kwargs)
        self.accordion = Block(label=kwargs.get("label"), elem_id=kwargs.get("elem_id"))

    def extra(self):
        return Block(elem_id=f"{self.elem_id}-extra")


@pytest.fixture
def webui(monkeypatch):
    """Stand-ins for gradio, modules.* and the Lora extension's `networks`, with two checkpoints and two LoRAs."""
    Block.created = []
    gr = types.ModuleType("gradio")
    for name in ("Row", "Column", "Accordion", "Group", "Dropdown", "Textbox", "Slider", "Checkbox", "Radio",
                 "HTML", "Button"):
        setattr(gr, name, type(name, (Block,), {}))
    gr.update = lambda **kw: {"__type__": "update", **kw}

    refreshes = []
    modules = types.ModuleType("modules")
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.checkpoint_tiles = lambda: ["sd15.safetensors [cc6cb27103]", "sdxl.safetensors [31e35c80fc]"]
    sd_models.list_models = lambda: None
    shared = types.ModuleType("modules.shared")
    shared.opts = SimpleNamespace(delta_sampling_default_strength=0.75, extra_networks_default_multiplier=0.6)
    ui_common = types.ModuleType("modules.ui_common")
    ui_common.create_refresh_button = lambda comp, method, args, elem_id: refreshes.append((comp, method, args))
    ui_components = types.ModuleType("modules.ui_components")
    ui_components.InputAccordion = InputAccordion
    ui_components.FormHTML = type("FormHTML", (Block,), {})
    modules.sd_models, modules.shared = sd_models, shared
    networks = SimpleNamespace(available_networks={"style": 1, "Detail": 2}, list_available_networks=lambda: None)
    for name, module in {"gradio": gr, "modules": modules, "modules.sd_models": sd_models, "modules.shared": shared,
                         "modules.ui_common": ui_common, "modules.ui_components": ui_components,
                         "networks": networks}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return SimpleNamespace(opts=shared.opts, refreshes=refreshes)


def script(tab: str = "txt2img"):
    return SimpleNamespace(elem_id=lambda item: f"script_{tab}_delta_sampling_{item}")


def test_controls_follow_positional_fields(webui):
    s = script()
    controls = ui.build(s, is_img2img=False)
    assert [c.elem_id for c in controls] == [f"script_txt2img_delta_sampling_{f}" for f in POSITIONAL_FIELDS]
    assert isinstance(controls[0], InputAccordion) and controls[0].label == "Delta Sampling"
    assert controls[0].value is False  # closed and off by default


def test_every_control_has_its_tooltip(webui):
    controls = ui.build(script(), is_img2img=False)
    assert [c.webui_tooltip for c in controls[1:]] == [ui.TOOLTIPS[f] for f in POSITIONAL_FIELDS[1:]]
    assert controls[0].accordion.webui_tooltip == ui.TOOLTIPS["enabled"]
    pickers = [b for b in Block.created if (b.elem_id or "").endswith("lora_picker")]
    assert len(pickers) == 2 and all(p.webui_tooltip for p in pickers)


def test_defaults_come_from_settings_and_are_off(webui):
    values = [c.value for c in ui.build(script(), is_img2img=False)]
    expected = to_positional(DeltaSettings())
    expected[POSITIONAL_FIELDS.index("strength")] = expected[POSITIONAL_FIELDS.index("group2_strength")] = 0.75
    assert values == expected
    assert all(type(v) is type(e) for v, e in zip(values, expected, strict=True))  # the API casts to these types
    assert from_positional(values) == DeltaSettings(enabled=False).with_overrides({"strength": 0.75})


def test_missing_settings_fall_back_to_their_defaults(webui):
    webui.opts.__dict__.clear()
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    assert controls["strength"].value == 1.0 and controls["preview"].value is False


def test_dropdowns_list_the_webuis_checkpoints_and_loras(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    assert controls["source"].kwargs["choices"] == ["", *sys.modules["modules.sd_models"].checkpoint_tiles()]
    assert controls["source"].kwargs["allow_custom_value"]  # names from infotext or the API that are not listed
    refreshed = {id(comp) for comp, _, _ in webui.refreshes}
    assert {id(controls[f]) for f in ("source", "checkpoint", "group2_checkpoint")} <= refreshed
    picker = next(b for b in Block.created if b.elem_id == "script_txt2img_delta_sampling_lora_picker")
    assert picker.kwargs["choices"] == ["Detail", "style"]


def test_picking_a_lora_appends_its_tag(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    for prefix in ("", "group2_"):
        picker = next(b for b in Block.created if b.elem_id == f"script_txt2img_delta_sampling_{prefix}lora_picker")
        event = picker.events["change"]
        assert event["inputs"] == [picker, controls[f"{prefix}loras"]]
        assert event["outputs"] == [controls[f"{prefix}loras"], picker]
        text, reset = event["fn"]("style", "<lora:Detail:1>")
        assert text == "<lora:Detail:1> <lora:style:0.6>" and reset == {"__type__": "update", "value": None}
        assert event["fn"](None, "x") == ({"__type__": "update"}, {"__type__": "update"})  # the reset's own change


def test_infotext_fields_are_set_on_the_script(webui):
    s = script("img2img")
    controls = ui.build(s, is_img2img=True)
    assert [c for c, _ in s.infotext_fields] == [c for f, c in zip(POSITIONAL_FIELDS, controls, strict=True)
                                                 if f != "preview"]
    assert s.paste_field_names == [key for _, key in s.infotext_fields]


def test_api_forms_fill_like_the_webui(webui):
    # api.py init_script_args: start from every control's value, then copy the request's args over the first slots.
    defaults = [c.value for c in ui.build(script(), is_img2img=False)]

    def call(args):
        return from_positional([*args, *defaults[len(args):]])

    request = {"enabled": True, "source": "sd15", "loras": [{"name": "style", "weight": 0.8}], "strength": 1.25}
    assert call([request]) == DeltaSettings.from_dict(request)
    assert call([True, "sd15", "<lora:style:0.8>", 1.25]) == DeltaSettings.from_dict(request)


def test_controls_come_from_the_declaration_and_sliders_span_what_the_api_accepts(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    for f in ("strength", "group2_strength"):
        assert (controls[f].kwargs["minimum"], controls[f].kwargs["maximum"]) == STRENGTH_RANGE == (-5.0, 5.0)
    for slot in ui.SLOTS:  # every slider, from its setting's declared range
        if isinstance(controls[slot.name], sys.modules["gradio"].Slider):
            kind = slot.setting.kind
            assert (controls[slot.name].kwargs["minimum"], controls[slot.name].kwargs["maximum"]) == (kind.lo, kind.hi)
    kinds = {f: type(c).__name__ for f, c in controls.items()}
    assert kinds["group2_enabled"] == kinds["preview"] == "Checkbox" and kinds["schedule"] == "Dropdown"
    assert kinds["mode"] == "Radio" and kinds["loras"] == kinds["prompt"] == "Textbox"
    # a pasted λ the API accepts fits the slider
    pasted = ui.read_from_infotext("strength", {"Delta source": "sd15", "Delta lambda": "4"})
    assert pasted == 4.0 and controls["strength"].kwargs["minimum"] <= pasted <= controls["strength"].kwargs["maximum"]


def test_source_cfg_slider_sits_in_advanced(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    cfg = controls["source_cfg"]
    assert type(cfg).__name__ == "Slider" and cfg.label.startswith("Source CFG scale")
    assert (cfg.kwargs["minimum"], cfg.kwargs["maximum"], cfg.value) == (0.0, 30.0, 0.0)
    assert "0 = auto" in cfg.webui_tooltip and "base-first" in cfg.webui_tooltip
    order = [b.elem_id for b in Block.created]
    advanced = order.index("script_txt2img_delta_sampling_advanced")
    assert advanced < order.index(cfg.elem_id) < order.index("script_txt2img_delta_sampling_group2")


def test_every_text_the_panel_shows_is_in_the_localization_template(webui):
    """A text added to the panel without a declaration the template is made from fails here."""
    from lib_delta.webui import strings

    ui.build(script(), is_img2img=False)
    shown = set()
    for b in Block.created:
        texts = [b.label, b.kwargs.get("placeholder"), getattr(b, "webui_tooltip", None)]
        if type(b).__name__ == "Accordion":
            texts.append(b.value)  # its label, given positionally
        if type(b).__name__ in ("Radio", "Dropdown") and not (b.elem_id or "").endswith(("source", "checkpoint",
                                                                                           "lora_picker")):
            texts += b.kwargs.get("choices") or []  # fixed choices; checkpoint and LoRA names are the user's
        shown |= {t for t in texts if isinstance(t, str) and t.strip()}
    template = strings.template()
    assert shown - set(template) == set(), sorted(shown - set(template))
    assert {"Advanced", "Add LoRA", "Second adaptation group", "λ (strength)"} <= shown  # the walk sees them
