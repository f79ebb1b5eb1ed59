"""Settings: validation messages, and lossless round trips through the dict, infotext and positional forms."""

from dataclasses import replace

import pytest

from lib_delta.args import (
    POSITIONAL_FIELDS,
    AdaptationGroup,
    DeltaSettings,
    LoraRef,
    from_positional,
    parse_lora_tags,
    to_positional,
)
from lib_delta.errors import DeltaError

RICH = DeltaSettings(
    enabled=True,
    source="sd15 [cc6cb27103]",
    groups=(
        AdaptationGroup(
            loras=(LoraRef("style a", 0.8), LoraRef("b", 1.0, unet_weight=0.7, te_weight=0.25)),
            checkpoint="ft.safetensors",
            prompt="red, shiny: very",
            strength=1.5,
            schedule="cosine",
            start=0.1,
            end=0.6,
        ),
        AdaptationGroup(prompt="watercolor", strength=-0.5, schedule="sigmoid", end=0.3),
    ),
    mode="delta",
    cfg_mode="cond",
    trajectory="separate",
    preview=True,
)


def test_defaults_are_off_and_sensible():
    s = DeltaSettings()
    assert not s.enabled
    g = s.groups[0]
    assert (g.strength, g.schedule, g.start, g.end, s.mode, s.cfg_mode) == (1.0, "constant", 0.0, 1.0, "delta", "cfg")
    assert s.to_infotext() == {}
    assert s.validated() is s  # disabled settings are never rejected


def test_dict_round_trip_is_lossless():
    assert DeltaSettings.from_dict(RICH.to_dict()) == RICH
    one = DeltaSettings(enabled=True, source="x", groups=(AdaptationGroup(loras=(LoraRef("a"),)),))
    assert "groups" not in one.to_dict()
    assert DeltaSettings.from_dict(one.to_dict()) == one


def test_dict_accepts_the_documented_api_form():
    s = DeltaSettings.from_dict({"enabled": True, "source": "base", "loras": [{"name": "L", "weight": 0.5}],
                                 "strength": 1, "schedule": "linear", "start": 0.0, "end": 0.5})
    assert s.groups[0].loras == (LoraRef("L", 0.5),)
    assert s.groups[0].strength == 1.0 and isinstance(s.groups[0].strength, float)
    assert s.validated() is s


def test_infotext_round_trip_is_lossless_except_preview():
    info = RICH.to_infotext()
    assert all(k.startswith("Delta ") for k in info)
    back = DeltaSettings.from_infotext(info)
    assert back == DeltaSettings(**{**RICH.__dict__, "preview": False})


def test_infotext_survives_the_webui_parser_quoting():
    # The WebUI JSON-quotes values with ',' ':' or newlines and unquotes them on paste: keys must be plain words.
    import json
    import re

    re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
    info = RICH.to_infotext()
    def quote(v: str) -> str:
        return json.dumps(v) if any(c in v for c in ",:\n") else v

    line = ", ".join(f"{k}: {quote(v)}" for k, v in info.items())
    parsed = {}
    for k, v in re_param.findall(line):
        parsed[k] = json.loads(v) if v.startswith('"') else v
    assert parsed == info


def test_infotext_without_the_extension_turns_it_off():
    assert DeltaSettings.from_infotext({"Steps": "20", "Sampler": "Euler"}) == DeltaSettings()


def test_positional_round_trip_and_dict_in_first_slot():
    two = DeltaSettings(**{**RICH.__dict__})
    values = to_positional(two)
    assert len(values) == len(POSITIONAL_FIELDS)
    assert from_positional(values) == two
    assert from_positional([RICH.to_dict()]) == RICH
    assert from_positional([]) == DeltaSettings()
    # the UI's trailing defaults may be missing: append-only order
    assert from_positional(values[:3]).source == RICH.source


def test_lora_tags():
    assert parse_lora_tags("<lora:a:0.5> <lora:b c><lora:d:1:0.25>") == (
        LoraRef("a", 0.5), LoraRef("b c"), LoraRef("d", 0.25, unet_weight=0.25, te_weight=1.0))
    assert parse_lora_tags("") == ()


def test_overrides_touch_a_copy():
    s = RICH.with_overrides({"strength": 2, "lora_weight": 0.3, "schedule": "linear", "enabled": False})
    assert s.groups[0].strength == 2.0 and s.groups[0].schedule == "linear" and not s.enabled
    assert all(r.weight == 0.3 and r.unet == 0.3 and r.te == 0.3 for r in s.groups[0].loras)
    assert RICH.groups[0].strength == 1.5


def _enabled(**group) -> DeltaSettings:
    base = {"loras": (LoraRef("a"),)}
    return DeltaSettings(enabled=True, source="src", groups=(AdaptationGroup(**{**base, **group}),))


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (DeltaSettings(enabled=True, groups=(AdaptationGroup(loras=(LoraRef("a"),)),)), "no source checkpoint"),
        (_enabled(strength=9.0), "strength is 9; it must lie between -5 and 5"),
        (_enabled(strength=float("nan")), "strength is nan"),
        (_enabled(schedule="cubic"), "schedule is 'cubic'; allowed: constant, linear, exponential, cosine, sigmoid"),
        (_enabled(start=0.7, end=0.2), "window start (0.7) is after its end (0.2)"),
        (_enabled(end=1.5), "end is 1.5; it must lie between 0 and 1"),
        (_enabled(start=-0.1), "start is -0.1"),
        (_enabled(loras=(LoraRef("a", 20.0),)), "weight of LoRA 'a' is 20"),
        (_enabled(loras=(LoraRef(" "),)), "LoRA without a name"),
        (_enabled(loras=()), "nothing to transfer"),
        (DeltaSettings(enabled=True, source="s", mode="turbo"), "mode is 'turbo'; allowed: delta, base-first"),
        (DeltaSettings(enabled=True, source="s", mode="delta", cfg_mode="x", groups=(AdaptationGroup(prompt="p"),)),
         "cfg_mode is 'x'; allowed: cfg, cond"),
        (DeltaSettings(enabled=True, source="s", trajectory="own", groups=(AdaptationGroup(prompt="p"),)),
         "trajectory is 'own'; allowed: shared, separate"),
        (DeltaSettings(enabled=True, source="s", groups=()), "1 to 4 adaptation groups; 0 given"),
        (DeltaSettings(enabled=True, source="s", mode="base-first", groups=(AdaptationGroup(),) * 2),
         "base-first mode uses one group"),
    ],
)
def test_validation_messages(settings, message):
    with pytest.raises(DeltaError) as e:
        settings.validated()
    assert message in str(e.value)


def test_base_first_needs_no_adaptation():
    s = DeltaSettings(enabled=True, source="s", mode="base-first", groups=(AdaptationGroup(end=0.2),))
    assert s.validated() is s


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([1, 2], "must be a JSON object, not a list"),
        ({"enabled": True, "lambda": 1}, "Unknown Delta Sampling setting(s) 'lambda'"),
        ({"enabled": "yes"}, "'enabled' must be true or false, not a string"),
        ({"strength": "1.0"}, "'strength' must be a number, not a string"),
        ({"strength": True}, "'strength' must be a number, not a boolean"),
        ({"source": 3}, "'source' must be a string, not a int"),
        ({"loras": 5}, "'loras' must be a list"),
        ({"loras": [{"weight": 1}]}, "'loras[0]' has no 'name'"),
        ({"loras": [{"name": "a", "scale": 1}]}, "Unknown key(s) 'scale' in 'loras[0]'"),
        ({"loras": [3]}, "'loras[0]' must be an object"),
        ({"groups": [], "enabled": True}, "'groups' must be a non-empty list"),
        ({"groups": [{"strength": 1}], "strength": 2}, "either 'groups' or the single-group keys (strength)"),
        ({"groups": [{"foo": 1}]}, "Unknown key(s) 'foo' in Delta Sampling group (groups[0])"),
        ({"loras": "<lora:a:x>"}, "Cannot read the weight in '<lora:a:x>'"),
        ({"loras": "a, b"}, "Cannot read 'a, b' in the LoRA field"),
    ],
)
def test_dict_errors(data, message):
    with pytest.raises(DeltaError) as e:
        DeltaSettings.from_dict(data)
    assert message in str(e.value)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"Delta source": "s", "Delta lambda": "strong"}, "'Delta lambda' should be a number"),
        ({"Delta source": "s", "Delta window": "early"}, "'Delta window' should read 'start-end'"),
        ({"Delta source": "s", "Delta group 2": "{oops"}, "'Delta group 2' is not valid JSON"),
    ],
)
def test_infotext_errors(params, message):
    with pytest.raises(DeltaError) as e:
        DeltaSettings.from_infotext(params)
    assert message in str(e.value)


def test_positional_errors():
    with pytest.raises(DeltaError, match=f"at most {len(POSITIONAL_FIELDS)} positional values"):
        from_positional([False] * (len(POSITIONAL_FIELDS) + 1))
    with pytest.raises(DeltaError, match="must be true or false"):
        from_positional([{"enabled": "yes"}])


def test_settings_object_ignores_the_api_filled_slots_after_it():
    # The API puts the UI's defaults into every slot the request leaves out.
    ui_defaults = to_positional(DeltaSettings())[1:]
    assert from_positional([RICH.to_dict(), *ui_defaults]) == RICH


def test_unknown_override():
    with pytest.raises(DeltaError, match="Unknown Delta Sampling override 'speed'"):
        DeltaSettings().with_overrides({"speed": 1})


def test_summary_is_one_line():
    line = RICH.summary()
    assert "\n" not in line and "source=sd15" in line and "λ=1.5 cosine 0.1-0.6" in line


# --- the source's CFG scale ----------------------------------------------------------------------------------------


def test_source_cfg_is_auto_by_default():
    s = _enabled()
    assert s.source_cfg == 0.0
    assert s.source_cfg_for(1.5) == 1.5  # delta: the target's own scale
    # base-first: a distilled target's CFG 1-2 would leave the source's layout steps nearly unguided
    assert replace(s, mode="base-first").source_cfg_for(1.5) == 7.0
    assert "Delta source CFG" not in s.to_infotext() and "source_cfg" not in s.summary()


def test_source_cfg_reaches_every_form():
    s = replace(_enabled(), source_cfg=5.0)
    assert s.source_cfg_for(1.5) == 5.0 and replace(s, mode="base-first").source_cfg_for(1.5) == 5.0
    assert DeltaSettings.from_dict({**_enabled().to_dict(), "source_cfg": 5}) == s
    assert s.to_dict()["source_cfg"] == 5.0
    assert s.to_infotext()["Delta source CFG"] == "5"
    assert DeltaSettings.from_infotext(s.to_infotext()) == s
    slot = POSITIONAL_FIELDS.index("source_cfg")
    assert slot == 21 and to_positional(s)[slot] == 5.0
    assert from_positional(to_positional(s)) == s
    assert _enabled().with_overrides({"source_cfg": 5}) == s
    assert "source_cfg=5" in s.summary()
    assert s.validated() is s
    with pytest.raises(DeltaError, match="source_cfg is 31; it must lie between 0 and 30"):
        replace(s, source_cfg=31.0).validated()
    with pytest.raises(DeltaError, match="'source_cfg' must be a number, not a string"):
        DeltaSettings.from_dict({"source_cfg": "auto"})


# --- values no setting can hold: always a DeltaError naming the setting and what it allows ------------------------

_GROUP2 = [True, "s", "", 1.0, "constant", 0.0, 1.0, "", "p", "delta", "cfg", "shared", False, True, ""]


@pytest.mark.parametrize(("call", "names"), [
    (lambda: DeltaSettings.from_dict({"strength": 10**400}), ("'strength'", "between -5 and 5")),
    (lambda: DeltaSettings.from_dict({"strength": -(10**5000)}), ("'strength'", "about 5000 digits", "-5 and 5")),
    (lambda: DeltaSettings.from_dict({"strength": float("nan")}), ("'strength' is nan", "between -5 and 5")),
    (lambda: DeltaSettings.from_dict({"start": float("inf")}), ("'start' is inf", "between 0 and 1")),
    (lambda: DeltaSettings.from_dict({"source_cfg": 10**400}), ("'source_cfg'", "between 0 and 30")),
    (lambda: DeltaSettings.from_dict({"loras": [{"name": "a", "weight": 10**400}]}),
     ("'weight' (loras[0])", "between -10 and 10")),
    (lambda: DeltaSettings.from_dict({"loras": [{"name": "a", "te_weight": float("-inf")}]}),
     ("'te_weight' (loras[0])", "between -10 and 10")),
    (lambda: DeltaSettings.from_dict({"groups": [{"end": 10**400}]}), ("'end' (groups[0])", "between 0 and 1")),
    (lambda: DeltaSettings.from_dict({"loras": "<lora:a:1e400>"}), ("<lora:a:1e400>", "between -10 and 10")),
    (lambda: from_positional([True, "s", "", 10**400]), ("'strength'", "between -5 and 5")),
    (lambda: from_positional([*_GROUP2, 10**400]), ("'strength' (group 2)", "between -5 and 5")),
    (lambda: DeltaSettings.from_infotext({"Delta source": "s", "Delta lambda": "1e400"}),
     ("'Delta lambda'", "between -5 and 5")),
    (lambda: DeltaSettings.from_infotext({"Delta source": "s", "Delta lambda": "nan"}),
     ("'Delta lambda'", "between -5 and 5")),
    (lambda: DeltaSettings.from_infotext({"Delta source": "s", "Delta window": "0-1e999"}),
     ("'Delta window'", "between 0 and 1")),
    (lambda: DeltaSettings.from_infotext({"Delta source": "s", "Delta group 2": '{"strength": 1' + "0" * 400 + "}"}),
     ("'strength' (Delta group 2)", "between -5 and 5")),
    (lambda: DeltaSettings().with_overrides({"strength": 10**400}), ("'strength'", "between -5 and 5")),
    (lambda: DeltaSettings().with_overrides({"lora_weight": float("nan")}), ("'lora_weight'", "between -10 and 10")),
])
def test_numbers_no_float_holds_are_delta_errors(call, names):
    with pytest.raises(DeltaError) as e:
        call()
    assert all(n in str(e.value) for n in names), str(e.value)


@pytest.mark.parametrize(("call", "message"), [
    (lambda: DeltaSettings.from_dict({1: True, "enabled": True}), "Unknown Delta Sampling setting(s) 1;"),
    (lambda: DeltaSettings.from_dict({"adapted_prompt": "x" * 5000}),
     "'adapted_prompt' is 5000 characters long; at most 4096 are allowed"),
    (lambda: DeltaSettings.from_dict({"loras": "<lora:a:1>" * 500}), "'loras' is 5000 characters long"),
    (lambda: DeltaSettings.from_dict({"loras": [{"name": "a" * 5000}]}), "'name' (loras[0]) is 5000 characters"),
    (lambda: DeltaSettings.from_dict({"loras": [{"name": "a" * 2000}] * 3}), "'loras', written as tags, is 6"),
    (lambda: DeltaSettings.from_dict({"loras": [{"name": "a"}] * 1000}), "'loras' lists 1000 LoRAs; at most 409"),
    (lambda: DeltaSettings.from_dict({"groups": [{"loras": [{"name": {"x": 1}}]}]}),
     "'name' (loras[0]) (groups[0]) must be a string, not an object"),
    (lambda: DeltaSettings.from_dict({"groups": [{"prompt": "p"}]}), "Unknown key(s) 'prompt'"),
    (lambda: DeltaSettings.from_dict({"groups": [{}] * 5}), "'groups' lists 5 Delta Sampling groups; at most 4"),
    (lambda: DeltaSettings.from_dict({"source": ["a" * 10**6]}), "'source' must be a string, not a list"),
    (lambda: DeltaSettings.from_infotext({"Delta source": "s", "Delta group 2": "[" * 100_000}),
     "'Delta group 2' is not valid JSON"),
    (lambda: DeltaSettings.from_infotext({"Delta source": "s", "Delta prompt": "x" * 5000}),
     "'Delta prompt' is 5000 characters long"),
    (lambda: DeltaSettings.from_infotext({"Delta source": "s", "Delta mode": "turbo"}),
     "'Delta mode' is 'turbo'; allowed: delta, base-first"),
    (lambda: from_positional([True, "s", "<lora:a:1>" * 500]), "'loras' is 5000 characters long"),
    (lambda: from_positional([True, ["s"]]), "'source' must be a string, not a list"),
])
def test_malformed_values_are_delta_errors(call, message):
    with pytest.raises(DeltaError) as e:
        call()
    assert message in str(e.value)
    assert len(str(e.value)) < 1000  # never the whole value back


@pytest.mark.parametrize(("key", "value", "item"), [
    ("lora_weight", 0.5, "LoRA"), ("controlnet_weight", 0.5, "ControlNet unit"),
    ("controlnet_guidance_end", 0.5, "ControlNet unit"), ("ipadapter_weight", 0.5, "IP-Adapter unit")])
def test_an_axis_over_every_entry_of_an_empty_list_is_refused_when_on(key, value, item):
    on = DeltaSettings(enabled=True, source="src", groups=(AdaptationGroup(prompt="watercolor"),))
    with pytest.raises(DeltaError, match=rf"X/Y/Z axis '\[Delta\] [^']+' sets every {item} of the first adaptation "
                                         rf"group, which has none: add a {item} to that group, or remove the axis"):
        on.with_overrides({key: value})
    off = replace(on, enabled=False)  # a grid that also switches the extension off: its cells are plain
    assert off.with_overrides({key: value}) == off
    assert on.with_overrides({key: value, "enabled": False}) == off
    with pytest.raises(DeltaError, match="which has none"):
        off.with_overrides({key: value, "enabled": True})
