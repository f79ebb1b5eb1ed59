"""The panel built against a stand-in of gradio and the WebUI modules it uses: control order, tooltips, defaults,
the LoRA picker, and the API's two argument forms filled the way the WebUI fills them."""

import sys
import types
from types import SimpleNamespace
from typing import ClassVar

import pytest

from lib_delta import hosts
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

    def click(self, fn=None, inputs=None, outputs=None, **kwargs):
        self.events["click"] = dict(fn=fn, inputs=inputs, outputs=outputs, **kwargs)


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
                 "HTML", "Button", "Image"):
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
    ui_components.ToolButton = type("ToolButton", (Block,), {})
    modules.sd_models, modules.shared = sd_models, shared
    networks = SimpleNamespace(available_networks={"style": 1, "Detail": 2}, list_available_networks=lambda: None)
    for name, module in {"gradio": gr, "modules": modules, "modules.sd_models": sd_models, "modules.shared": shared,
                         "modules.ui_common": ui_common, "modules.ui_components": ui_components,
                         "networks": networks}.items():
        monkeypatch.setitem(sys.modules, name, module)
    catalog = Catalog()
    monkeypatch.setattr(hosts, "catalog", lambda: catalog)
    return SimpleNamespace(opts=shared.opts, refreshes=refreshes, catalog=catalog)


class Catalog:
    """The host's lists (``lib_delta.hosts.catalog()``): ControlNet models of three families and preprocessors,
    IP-Adapter models of two and their image encoders."""

    def __init__(self):
        self.lists = {"controlnet": ["control_v11p_sd15_canny [d14c016b]", "diffusers_xl_canny_mid [112a778d]",
                                     "control_sd21_depth [aaaa0000]", "my_own_control [12345678]"],
                      "controlnet_module": ["none", "canny", "invert"],
                      "ipadapter": ["ip-adapter_sd15 [6a3f6166]", "ip-adapter_xl [b7ef3f1a]",
                                    "ip-adapter-plus_sd15 [c817b455]", "my_image_prompt [0badf00d]"],
                      "ipadapter_module": ["ip-adapter_clip_h", "ip-adapter_clip_g", "ip-adapter_face_id"]}
        self.refreshed: list[str] = []
        self.why: str | None = None

    def names(self, catalog):
        return list(self.lists[catalog]) if self.why is None else []

    def refresh(self, catalog):
        self.refreshed.append(catalog)

    def missing(self, catalog):
        return self.why


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
    notes = [b for b in Block.created if (b.elem_id or "").endswith("_note")]
    assert len(notes) == 8  # one per unit: two ControlNet and two IP-Adapter units in each of two groups
    assert [c for c, _ in s.infotext_fields] == [c for f, c in zip(POSITIONAL_FIELDS, controls, strict=True)
                                                 if f not in ui.NOT_IN_INFOTEXT] + notes
    assert s.paste_field_names == [key for c, key in s.infotext_fields if c not in notes]


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


# --- ControlNet units ---------------------------------------------------------------------------------------------


def _by_id(tab: str = "txt2img") -> dict[str, Block]:
    return {b.elem_id.removeprefix(f"script_{tab}_delta_sampling_"): b for b in Block.created if b.elem_id}


def test_each_group_shows_two_controlnet_units_with_every_control(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    blocks = _by_id()
    for prefix in ("", "group2_"):
        assert blocks[f"{prefix}controlnets"].value == "ControlNet units"
        for k in (1, 2):
            unit = {name: controls[f"{prefix}controlnet{k}_{name}"] for name in (
                "model", "image", "use_init_image", "module", "weight", "guidance_start", "guidance_end",
                "resize_mode")}
            assert blocks[f"{prefix}controlnet{k}"].value == f"ControlNet unit {k}"
            assert [type(c).__name__ for c in unit.values()] == [
                "Dropdown", "Image", "Checkbox", "Dropdown", "Slider", "Slider", "Slider", "Radio"]
            assert unit["model"].value == "None" and unit["model"].kwargs["allow_custom_value"]
            assert unit["model"].kwargs["choices"] == ["None", *webui.catalog.lists["controlnet"]]  # no source yet
            assert unit["module"].value == "none" and unit["module"].kwargs["choices"] == ["none", "canny", "invert"]
            assert unit["image"].value is None and unit["image"].kwargs["type"] == "numpy"
            assert unit["use_init_image"].kwargs["visible"] is False  # txt2img has no init image
            assert (unit["weight"].kwargs["minimum"], unit["weight"].kwargs["maximum"]) == (0.0, 2.0)
            assert unit["resize_mode"].kwargs["choices"] == ["Just Resize", "Crop and Resize", "Resize and Fill"]
            assert all(len(c.webui_tooltip) > 20 for c in unit.values())
            assert blocks[f"{prefix}controlnet{k}_model_refresh"].webui_tooltip
    # the first group's units sit in the panel's main part, the second's in its own accordion
    order = [b.elem_id for b in Block.created]
    assert order.index(controls["controlnet1_model"].elem_id) < order.index("script_txt2img_delta_sampling_advanced")
    second = order.index(controls["group2_controlnet1_model"].elem_id)
    assert order.index("script_txt2img_delta_sampling_group2") < second


def test_img2img_offers_the_init_image(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script("img2img"), is_img2img=True), strict=True))
    assert "visible" not in controls["controlnet1_use_init_image"].kwargs
    assert controls["controlnet1_use_init_image"].label == "Use the init image"


def test_the_model_lists_follow_the_sources_family(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    event = controls["source"].events["change"]
    models = [controls[f"{g}controlnet{k}_model"] for g in ("", "group2_") for k in (1, 2)]
    ip_models = [controls[f"{g}ipadapter{k}_model"] for g in ("", "group2_") for k in (1, 2)]
    assert event["inputs"] == [controls["source"]] and sorted(map(id, event["outputs"])) == sorted(
        map(id, models + ip_models))

    def offered(source):
        return {id(c): u["choices"] for c, u in zip(event["outputs"], event["fn"](source), strict=True)}

    # by the names (the stand-in lists no checkpoint files): sd15 → SD1.5 models and those whose name says
    # nothing; an SDXL source → SDXL ones; an unknown family → all
    sd15 = offered("sd15.safetensors [cc6cb27103]")
    assert all(sd15[id(c)] == ["None", "control_v11p_sd15_canny [d14c016b]", "my_own_control [12345678]"]
               for c in models)
    assert all(sd15[id(c)] == ["None", "ip-adapter_sd15 [6a3f6166]", "ip-adapter-plus_sd15 [c817b455]",
                               "my_image_prompt [0badf00d]"] for c in ip_models)
    sdxl = offered("sdxl.safetensors [31e35c80fc]")
    assert sdxl[id(models[0])] == ["None", "diffusers_xl_canny_mid [112a778d]", "my_own_control [12345678]"]
    assert sdxl[id(ip_models[3])] == ["None", "ip-adapter_xl [b7ef3f1a]", "my_image_prompt [0badf00d]"]
    unknown = offered("merged.safetensors")
    assert unknown[id(models[0])] == ["None", *webui.catalog.lists["controlnet"]]
    assert unknown[id(ip_models[0])] == ["None", *webui.catalog.lists["ipadapter"]]


def test_the_refresh_buttons_read_the_hosts_lists_again(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    blocks = _by_id()
    model = blocks["group2_controlnet2_model_refresh"].events["click"]
    assert model["inputs"] == [controls["source"]] and model["outputs"] == [controls["group2_controlnet2_model"]]
    webui.catalog.lists["controlnet"].append("control_new_sd15_depth [0000aaaa]")
    update = model["fn"]("sd15.safetensors [cc6cb27103]")
    assert webui.catalog.refreshed == ["controlnet"] and "control_new_sd15_depth [0000aaaa]" in update["choices"]
    assert "diffusers_xl_canny_mid [112a778d]" not in update["choices"]
    module = blocks["controlnet1_module_refresh"].events["click"]
    assert module["inputs"] == [] and module["fn"]()["choices"] == ["none", "canny", "invert"]


def test_without_the_controlnet_extension_the_units_say_so(webui):
    webui.catalog.why = "ControlNet units need the sd-webui-controlnet extension, which is not installed."
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    blocks = _by_id()
    for prefix in ("", "group2_"):
        assert webui.catalog.why in blocks[f"{prefix}controlnets_missing"].value
    hidden = [b for b in Block.created if type(b).__name__ == "Column" and b.kwargs.get("visible") is False]
    assert len(hidden) == 4  # each group's ControlNet units and IP-Adapter units
    assert controls["controlnet1_model"].kwargs["choices"] == ["None"]
    assert from_positional([c.value for c in controls.values()]).groups[0].controlnets == ()


def test_a_unit_set_in_the_panel_reaches_the_settings_with_its_image(webui):
    import base64
    import io

    import numpy as np
    from PIL import Image

    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script("img2img"), is_img2img=True), strict=True))
    values = {f: c.value for f, c in controls.items()}
    picture = np.random.default_rng(0).integers(0, 255, (48, 40, 3), dtype=np.uint8)
    values.update({"enabled": True, "source": "sd15", "controlnet1_model": "control_v11p_sd15_canny [d14c016b]",
                   "controlnet1_image": picture, "controlnet1_module": "canny", "controlnet1_weight": 0.5,
                   "controlnet1_guidance_end": 0.8, "group2_enabled": True, "group2_prompt": "x",
                   "group2_controlnet2_model": "my_own_control [12345678]", "group2_controlnet2_image": picture,
                   "group2_controlnet2_use_init_image": True})
    s = from_positional([values[f] for f in POSITIONAL_FIELDS]).validated()
    [unit] = s.groups[0].controlnets
    assert (unit.model, unit.module, unit.weight, unit.guidance_end) == ("control_v11p_sd15_canny [d14c016b]",
                                                                         "canny", 0.5, 0.8)
    with Image.open(io.BytesIO(base64.b64decode(unit.image))) as im:
        assert np.array_equal(np.asarray(im), picture)  # lossless
    [second] = s.groups[1].controlnets
    assert second.use_init_image and second.image == ""  # the init image: the upload is not carried
    values["controlnet1_image"] = np.zeros((5000, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"is 8×5000; at most 4096 pixels a side"):
        from_positional([values[f] for f in POSITIONAL_FIELDS])


def test_pasting_a_unit_says_that_its_image_must_be_given_again(webui):
    s = script("img2img")
    ui.build(s, is_img2img=True)
    fields = {key: (c, key) for c, key in s.infotext_fields}
    note = fields["Delta ControlNet unit 1 image note"]
    assert note[0].elem_id == "script_img2img_delta_sampling_controlnet1_note"
    params = {"Delta source": "sd15", "Delta ControlNets": '[{"model":"cn [abc]","weight":0.5},'
                                                           '{"model":"d","use_init_image":true}]'}
    text = note[1](params)
    assert "ControlNet unit 1 was pasted without its image" in text and "Use the init image" in text
    assert fields["Delta ControlNet unit 2 image note"][1](params) == ""  # it uses the init image
    assert fields["Delta group 2 ControlNet unit 1 image note"][1](params) == ""  # no second group
    assert note[1]({"Steps": "20"}) == ""  # a paste without Delta Sampling clears it
    image = _by_id("img2img")["controlnet1_image"]
    clear = image.events["change"]
    assert clear["outputs"] == [note[0]] and clear["fn"](object()) == ""


def test_txt2img_does_not_paste_the_init_image_box_it_hides(webui):
    params = {"Delta source": "sd15", "Delta ControlNets": '[{"model":"d","use_init_image":true}]'}
    fields = {}
    for tab in ("txt2img", "img2img"):
        s = script(tab)
        ui.build(s, is_img2img=tab == "img2img")
        fields[tab] = {key: key for _, key in s.infotext_fields}
    box = "Delta ControlNet unit 1 use_init_image"
    assert fields["img2img"][box](params) is True
    assert fields["txt2img"][box](params) is False  # it could not be unticked there
    assert fields["txt2img"]["Delta ControlNet unit 1 model"](params) == "d"
    assert list(fields["txt2img"]) == list(fields["img2img"])  # "Send to img2img" pairs the tabs' fields by key


# --- IP-Adapter units ---------------------------------------------------------------------------------------------


def test_each_group_shows_two_ipadapter_units_with_every_control(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    blocks = _by_id()
    for prefix in ("", "group2_"):
        assert blocks[f"{prefix}ipadapters"].value == "IP-Adapter units"
        for k in (1, 2):
            unit = {name: controls[f"{prefix}ipadapter{k}_{name}"] for name in (
                "model", "image", "module", "weight", "guidance_start", "guidance_end")}
            assert blocks[f"{prefix}ipadapter{k}"].value == f"IP-Adapter unit {k}"
            assert [type(c).__name__ for c in unit.values()] == [
                "Dropdown", "Image", "Dropdown", "Slider", "Slider", "Slider"]
            assert [c.label for c in unit.values()] == ["IP-Adapter model", "Reference image", "Image encoder",
                                                        "IP-Adapter weight", "Guidance start", "Guidance end"]
            assert unit["model"].value == "None" and unit["model"].kwargs["allow_custom_value"]
            assert unit["model"].kwargs["choices"] == ["None", *webui.catalog.lists["ipadapter"]]  # no source yet
            assert unit["module"].value == "ip-adapter_clip_h"
            assert unit["module"].kwargs["choices"] == webui.catalog.lists["ipadapter_module"]
            assert unit["image"].value is None and unit["image"].kwargs["type"] == "numpy"
            assert (unit["weight"].kwargs["minimum"], unit["weight"].kwargs["maximum"]) == (0.0, 2.0)
            assert (unit["weight"].value, unit["guidance_start"].value, unit["guidance_end"].value) == (1.0, 0.0, 1.0)
            assert all(len(c.webui_tooltip) > 20 and f"IP-Adapter unit {k}: " in c.webui_tooltip
                       for c in unit.values())
            assert blocks[f"{prefix}ipadapter{k}_model_refresh"].webui_tooltip
            assert blocks[f"{prefix}ipadapter{k}_module_refresh"].webui_tooltip
    # after the ControlNet units of the same group: the first group's in the main part, the second's in its accordion
    order = [b.elem_id for b in Block.created]
    assert order.index(controls["controlnet2_resize_mode"].elem_id) < order.index(controls["ipadapter1_model"].elem_id)
    assert order.index(controls["ipadapter2_guidance_end"].elem_id) < order.index(
        "script_txt2img_delta_sampling_advanced") < order.index(controls["group2_ipadapter1_model"].elem_id)


def test_the_ipadapter_refresh_button_reads_the_hosts_list_again(webui):
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    blocks = _by_id()
    model = blocks["ipadapter2_model_refresh"].events["click"]
    assert model["inputs"] == [controls["source"]] and model["outputs"] == [controls["ipadapter2_model"]]
    webui.catalog.lists["ipadapter"].append("ip-adapter_new_sd15 [0000aaaa]")
    update = model["fn"]("sd15.safetensors [cc6cb27103]")
    assert webui.catalog.refreshed == ["ipadapter"] and "ip-adapter_new_sd15 [0000aaaa]" in update["choices"]
    assert "ip-adapter_xl [b7ef3f1a]" not in update["choices"]
    module = blocks["ipadapter1_module_refresh"].events["click"]
    assert module["inputs"] == [] and module["fn"]()["choices"] == webui.catalog.lists["ipadapter_module"]


def test_a_host_without_an_ipadapter_list_offers_empty_dropdowns(webui):
    """A host whose catalog has no IP-Adapter lists (yet) gets the controls with nothing to pick, not an error."""
    del webui.catalog.lists["ipadapter"], webui.catalog.lists["ipadapter_module"]
    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    assert controls["ipadapter1_model"].kwargs["choices"] == ["None"]
    assert controls["ipadapter1_module"].kwargs["choices"] == []
    assert controls["controlnet1_model"].kwargs["choices"][1:] == webui.catalog.lists["controlnet"]
    refreshed = _by_id()["ipadapter1_model_refresh"].events["click"]["fn"]("sd15.safetensors [cc6cb27103]")
    assert refreshed["choices"] == ["None"]
    assert from_positional([c.value for c in controls.values()]).groups[0].ipadapters == ()


def test_an_ipadapter_unit_set_in_the_panel_reaches_the_settings_with_its_image(webui):
    import base64
    import io

    import numpy as np
    from PIL import Image

    controls = dict(zip(POSITIONAL_FIELDS, ui.build(script(), is_img2img=False), strict=True))
    values = {f: c.value for f, c in controls.items()}
    picture = np.random.default_rng(1).integers(0, 255, (40, 56, 3), dtype=np.uint8)
    values.update({"enabled": True, "source": "sd15", "ipadapter2_model": "ip-adapter-plus_sd15 [c817b455]",
                   "ipadapter2_image": picture, "ipadapter2_weight": 0.7, "ipadapter2_guidance_start": 0.2,
                   "group2_enabled": True, "group2_prompt": "x",
                   "group2_ipadapter1_model": "my_image_prompt [0badf00d]",
                   "group2_ipadapter1_image": {"image": picture, "mask": None},
                   "group2_ipadapter1_module": "ip-adapter_clip_g"})
    s = from_positional([values[f] for f in POSITIONAL_FIELDS]).validated()
    [unit] = s.groups[0].ipadapters  # unit 1 left at "None" is no unit
    assert (unit.model, unit.module, unit.weight, unit.guidance_start, unit.guidance_end) == (
        "ip-adapter-plus_sd15 [c817b455]", "ip-adapter_clip_h", 0.7, 0.2, 1.0)
    with Image.open(io.BytesIO(base64.b64decode(unit.image))) as im:
        assert np.array_equal(np.asarray(im), picture)  # lossless
    [second] = s.groups[1].ipadapters
    assert (second.model, second.module) == ("my_image_prompt [0badf00d]", "ip-adapter_clip_g") and second.image
    assert s.groups[0].controlnets == () and s.groups[1].controlnets == ()
    # the settings object's form of the same units: what the API takes
    assert DeltaSettings.from_dict(s.to_dict()) == s


def test_pasting_an_ipadapter_unit_restores_it_and_says_that_its_image_must_be_given_again(webui):
    s = script()
    ui.build(s, is_img2img=False)
    fields = {key: (c, key) for c, key in s.infotext_fields}
    params = {"Delta source": "sd15", "Delta IP Adapters": '[{"model":"ip-adapter_sd15 [6a3f6166]","weight":0.6,'
                                                           '"guidance_start":0.1,"guidance_end":0.9}]',
              "Delta group 2": '{"adapted_prompt":"x","ipadapters":[{"model":"a"},{"model":"b",'
                               '"module":"ip-adapter_clip_g"}]}'}
    assert fields["Delta IP-Adapter unit 1 model"][1](params) == "ip-adapter_sd15 [6a3f6166]"
    assert fields["Delta IP-Adapter unit 1 weight"][1](params) == 0.6
    assert fields["Delta IP-Adapter unit 1 guidance_start"][1](params) == 0.1
    assert fields["Delta IP-Adapter unit 1 guidance_end"][1](params) == 0.9
    assert fields["Delta IP-Adapter unit 1 module"][1](params) == "ip-adapter_clip_h"
    assert fields["Delta IP-Adapter unit 2 model"][1](params) == "None"  # a unit the infotext leaves out is cleared
    assert fields["Delta group 2 IP-Adapter unit 2 module"][1](params) == "ip-adapter_clip_g"
    assert "Delta IP-Adapter unit 1 image" not in fields  # never pasted: infotext holds no image
    note = fields["Delta IP-Adapter unit 1 image note"]
    assert note[0].elem_id == "script_txt2img_delta_sampling_ipadapter1_note"
    assert "IP-Adapter unit 1 was pasted without its image" in note[1](params)
    assert "Use the init image" not in note[1](params)  # no such box for IP-Adapter units
    assert fields["Delta IP-Adapter unit 2 image note"][1](params) == ""  # no second unit in the first group
    assert "IP-Adapter unit 2 was pasted" in fields["Delta group 2 IP-Adapter unit 2 image note"][1](params)
    assert note[1]({"Steps": "20"}) == ""  # a paste without Delta Sampling clears it
    image = _by_id()["ipadapter1_image"]
    clear = image.events["change"]
    assert clear["outputs"] == [note[0]] and clear["fn"](object()) == ""
    assert {"Delta IP-Adapter unit 1 model", "Delta group 2 IP-Adapter unit 2 weight"} <= set(s.paste_field_names)


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
                                                                                           "lora_picker", "_model",
                                                                                           "_module")):
            # fixed choices; checkpoint, LoRA, ControlNet and preprocessor names are the user's or the host's
            texts += b.kwargs.get("choices") or []
        shown |= {t for t in texts if isinstance(t, str) and t.strip()}
    template = strings.template()
    assert shown - set(template) == set(), sorted(shown - set(template))
    assert {"Advanced", "Add LoRA", "Second adaptation group", "λ (strength)"} <= shown  # the walk sees them


# --- saved defaults (ui-config.json) ------------------------------------------------------------------------------

SAVED_TYPES = ("Slider", "Radio", "Checkbox", "Textbox", "Dropdown", "InputAccordion")  # what ui_loadsave keeps


def saved_default_keys(controls: list[Block], tab: str) -> list[str]:
    """Each control's ui-config.json key as the WebUI's ui_loadsave forms it: its path (the tab, then the label)
    behind "customscript/<custom_script_source>", which scripts.py sets to the script's file name."""
    return [f"customscript/{c.custom_script_source}/{tab}/{c.label}/value" for c in controls
            if type(c).__name__ in SAVED_TYPES and not getattr(c, "do_not_save_to_config", False)]


def build_like_the_webui() -> dict[str, list[Block]]:
    """Both tabs built, the script file named on each returned control, then the on_ui_tabs callbacks run: the
    WebUI's order before it reads ui-config.json."""
    built = {}
    for tab in ("txt2img", "img2img"):
        controls = ui.build(script(tab), is_img2img=tab == "img2img")
        for control in controls:
            control.custom_script_source = "delta_sampling.py"
        built[tab] = controls
    ui.scope_saved_defaults()
    return built


def test_each_control_keeps_its_saved_default_under_a_key_of_its_own(webui):
    for tab, controls in build_like_the_webui().items():
        keys = saved_default_keys(controls, tab)
        assert len(keys) > 40 and len(set(keys)) == len(keys), [k for k in keys if keys.count(k) > 1][:6]
        by_field = dict(zip(POSITIONAL_FIELDS, controls, strict=True))
        # the labels stay as they were: the localization and the user read them
        assert by_field["group2_strength"].label == by_field["strength"].label == "λ (strength)"
        assert by_field["group2_controlnet2_weight"].label == by_field["controlnet1_weight"].label
        # the first group's own keys are those saved before (a λ default keeps working), the others are scoped
        assert saved_default_keys([by_field["strength"]], tab) == [
            f"customscript/delta_sampling.py/{tab}/λ (strength)/value"]
        assert saved_default_keys([by_field["group2_strength"]], tab) == [
            f"customscript/delta_sampling.py/Second adaptation group/{tab}/λ (strength)/value"]
        assert saved_default_keys([by_field["group2_controlnet2_weight"]], tab) == [
            f"customscript/delta_sampling.py/Second adaptation group/ControlNet unit 2/{tab}/"
            f"{by_field['controlnet1_weight'].label}/value"]
    ids = [b.elem_id for b in Block.created if b.elem_id and not isinstance(b, InputAccordion)]  # its box: -checkbox
    assert len(set(ids)) == len(ids), [i for i in ids if ids.count(i) > 1][:6]  # what the page and our script find
    ui.scope_saved_defaults()  # a second call (a duplicate callback) changes nothing
    assert by_field["group2_strength"].custom_script_source == "delta_sampling.py/Second adaptation group"


def test_the_lora_picker_keeps_no_default(webui):
    ui.build(script(), is_img2img=False)
    pickers = [b for b in Block.created if (b.elem_id or "").endswith("lora_picker")]
    assert len(pickers) >= 2 and all(p.do_not_save_to_config for p in pickers)
