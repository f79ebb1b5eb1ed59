"""The panel's pure parts: tooltips, infotext paste fields (UI paste, API `infotext`, Send to img2img), LoRA tags."""

import json
import re
from dataclasses import replace
from types import SimpleNamespace

import pytest

from lib_delta.args import (
    POSITIONAL_FIELDS,
    AdaptationGroup,
    ControlNetUnit,
    DeltaSettings,
    LoraRef,
    from_positional,
    to_positional,
)
from lib_delta.errors import DeltaError
from lib_delta.webui import panel as ui

ONE = DeltaSettings(enabled=True, source="sd15.safetensors [cc6cb27103]",
                    groups=(AdaptationGroup(loras=(LoraRef("style", 0.8),)),))
TWO = DeltaSettings(
    enabled=True,
    source="base/sd15.ckpt",
    groups=(
        AdaptationGroup(loras=(LoraRef("a b", 0.5), LoraRef("c", 1.0, unet_weight=0.7, te_weight=0.2)),
                        checkpoint="ft [abc]", prompt="red, shiny: very", strength=1.5, schedule="cosine",
                        start=0.1, end=0.6),
        AdaptationGroup(prompt="watercolor", strength=-0.5, schedule="sigmoid", end=0.3),
    ),
    cfg_mode="cond",
    trajectory="separate",
)
UNITS = DeltaSettings(
    enabled=True,
    source="sd15",
    groups=(
        AdaptationGroup(controlnets=(ControlNetUnit("control_v11p_sd15_canny [d14c016b]", module="canny", weight=0.8,
                                                    guidance_start=0.1, guidance_end=0.7, resize_mode="Just Resize"),
                                     ControlNetUnit("control_sd15_depth [0000aaaa]", use_init_image=True))),
        AdaptationGroup(loras=(LoraRef("style", 1.0),), controlnets=(ControlNetUnit("depth, v2: b [1]"),)),
    ),
)
BASE_FIRST = DeltaSettings(enabled=True, source="sd15", mode="base-first",
                           groups=(AdaptationGroup(start=0.0, end=0.25),))

# The WebUI's infotext grammar (modules/infotext_utils.py): values with ',' ':' or newlines are JSON-quoted.
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _infotext_params(extra: dict[str, str]) -> dict[str, str]:
    def quote(v: str) -> str:
        return json.dumps(v, ensure_ascii=False) if any(ch in v for ch in ",:\n") else v

    line = ", ".join(f"{k}: {quote(v)}" for k, v in {"Steps": "4", "Seed": "1", **extra}.items())
    params = {}
    for k, v in _RE_PARAM.findall(line):
        params[k] = json.loads(v) if v.startswith('"') else v
    return params


def _paste(params: dict[str, str]) -> dict[str, object]:
    """What the paste fields of img2img's panel give each control (None = left as it is)."""
    components = {f: SimpleNamespace(name=f) for f in POSITIONAL_FIELDS}
    return {component.name: key(params) for component, key in ui.infotext_fields(components, is_img2img=True)}


def test_every_control_has_a_tooltip_and_every_pasted_one_a_unique_key():
    assert set(ui.TOOLTIPS) == set(POSITIONAL_FIELDS)
    assert all(len(t) > 20 for t in ui.TOOLTIPS.values())
    pasted = [f for f in POSITIONAL_FIELDS if f not in ui.NOT_IN_INFOTEXT]
    assert set(ui.INFOTEXT_LABELS) == set(pasted)
    names = ui.paste_field_names()
    assert len(set(names)) == len(names) == len(pasted)
    # infotext keys must be parseable by the WebUI: no ':' or ','
    assert all(re.fullmatch(r"\w[\w \-/]+", n) for n in names)


@pytest.mark.parametrize("settings", [ONE, TWO, BASE_FIRST, UNITS], ids=["one", "two", "base-first", "units"])
def test_paste_restores_every_control(settings):
    params = _infotext_params(settings.to_infotext())
    pasted = _paste(params)
    assert None not in pasted.values()
    # preview and the units' images are not in infotext: they keep what the panel holds (here: off, no image)
    values = [pasted.get(f, False if f == "preview" else None) for f in POSITIONAL_FIELDS]
    assert from_positional(values) == settings


def test_pasted_units_keep_their_model_name_and_hash_and_lose_only_the_image():
    with_image = replace(UNITS, groups=(replace(UNITS.groups[0], controlnets=(
        replace(UNITS.groups[0].controlnets[0], image="iVBORw0KGgo="), UNITS.groups[0].controlnets[1])),
        UNITS.groups[1]))
    text = with_image.to_infotext()
    assert "iVBORw0KGgo" not in str(text)
    assert json.loads(text["Delta ControlNets"]) == [
        {"model": "control_v11p_sd15_canny [d14c016b]", "use_init_image": False, "module": "canny", "weight": 0.8,
         "guidance_start": 0.1, "guidance_end": 0.7, "resize_mode": "Just Resize"},
        {"model": "control_sd15_depth [0000aaaa]", "use_init_image": True, "module": "none", "weight": 1.0,
         "guidance_start": 0.0, "guidance_end": 1.0, "resize_mode": "Crop and Resize"}]
    pasted = _paste(_infotext_params(text))
    assert pasted["controlnet1_model"] == "control_v11p_sd15_canny [d14c016b]"
    assert (pasted["controlnet1_module"], pasted["controlnet1_weight"], pasted["controlnet1_guidance_start"],
            pasted["controlnet1_guidance_end"]) == ("canny", 0.8, 0.1, 0.7)
    assert pasted["controlnet2_use_init_image"] is True and pasted["group2_controlnet1_model"] == "depth, v2: b [1]"
    assert pasted["group2_controlnet2_model"] == "None"  # a unit slot the infotext leaves empty is cleared
    assert "controlnet1_image" not in pasted


def test_paste_without_delta_keys_only_switches_it_off():
    assert _paste({"Steps": "20", "Sampler": "Euler"}) == {f: (False if f == "enabled" else None)
                                                            for f in POSITIONAL_FIELDS if f not in ui.NOT_IN_INFOTEXT}


def test_bad_delta_infotext_is_reported_once():
    params = {"Delta source": "sd15", "Delta window": "soon"}
    fields = dict((c.name, key) for c, key in ui.infotext_fields({f: SimpleNamespace(name=f)
                                                                    for f in POSITIONAL_FIELDS}))
    with pytest.raises(DeltaError, match="Delta window") as e:
        fields["enabled"](params)
    assert (e.value.status_code, e.value.detail) == (422, str(e.value))  # what the API answers with
    assert all(key(params) is None for name, key in fields.items() if name != "enabled")


def test_pasted_values_keep_the_types_of_the_controls():
    # The API casts each value to type(control.value) (api.py apply_infotext): a float slider must get a float,
    # never an int that the cast would truncate.
    defaults = to_positional(DeltaSettings())
    pasted = _paste(_infotext_params(TWO.to_infotext()))
    for field, default in zip(POSITIONAL_FIELDS, defaults, strict=True):
        if field in pasted:
            assert type(pasted[field]) is type(default), field


def test_infotext_field_is_both_key_and_reader():
    component = SimpleNamespace()
    [(comp, key), *_] = ui.infotext_fields({f: component for f in POSITIONAL_FIELDS})
    assert comp is component
    assert isinstance(key, str) and callable(key)
    assert key == "Delta enabled" and key in ui.paste_field_names()
    assert key({"Delta source": "x"}) is True


@pytest.mark.parametrize(("text", "name", "weight", "expected"), [
    ("", "style", 1.0, "<lora:style:1>"),
    ("<lora:a:0.5>", "b", 0.8, "<lora:a:0.5> <lora:b:0.8>"),
    ("<lora:a:0.5>  ", "a", 1.0, "<lora:a:0.5>  "),  # already there
    ("<lora:a:0.5> <lora:bro", "b", 1.0, "<lora:a:0.5> <lora:bro <lora:b:1>"),  # mid-edit text is kept
    ("<lora:a:1>", None, 1.0, "<lora:a:1>"),
    (None, "a", 1.0, "<lora:a:1>"),
])
def test_append_lora(text, name, weight, expected):
    assert ui.append_lora(text, name, weight) == expected


def test_lora_names_come_from_the_lora_extension(monkeypatch):
    import sys

    monkeypatch.delitem(sys.modules, "networks", raising=False)
    assert ui.lora_names() == []
    refreshed = []
    fake = SimpleNamespace(available_networks={"b": 1, "A": 2, "c": 3},
                           list_available_networks=lambda: refreshed.append(True))
    monkeypatch.setitem(sys.modules, "networks", fake)
    assert ui.lora_names() == ["A", "b", "c"]
    ui.refresh_loras()
    assert refreshed == [True]
