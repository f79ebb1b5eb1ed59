"""Each setting is declared once, in lib_delta/args.py: the API, infotext, positional, override, panel and X/Y/Z
tables all come from that declaration, and a setting added to it reaches every one of them."""

from dataclasses import dataclass, replace

import pytest

from lib_delta.args import (
    OVERRIDES,
    POSITIONAL_FIELDS,
    AdaptationGroup,
    ControlNetUnit,
    DeltaSettings,
    IPAdapterUnit,
    LoraRef,
    from_positional,
    overrides_of,
    to_positional,
)
from lib_delta.errors import DeltaError
from lib_delta.fields import (
    XYZ,
    Bool,
    Choice,
    Control,
    Groups,
    Infotext,
    Number,
    Objects,
    Text,
    positional_slots,
    setting,
    settings_of,
)
from lib_delta.webui import interfaces, panel

# The positional order as released: slots are never renumbered, new ones only appended.
RELEASED = (
    "enabled", "source", "loras", "strength", "schedule", "start", "end", "checkpoint", "prompt",
    "mode", "cfg_mode", "trajectory", "preview",
    "group2_enabled", "group2_loras", "group2_strength", "group2_schedule", "group2_start", "group2_end",
    "group2_checkpoint", "group2_prompt",
    "source_cfg", "source_resolution",
    *(f"{group}controlnet{unit}_{name}"
      for name in ("model", "image", "use_init_image", "module", "weight", "guidance_start", "guidance_end",
                   "resize_mode")
      for group in ("", "group2_") for unit in (1, 2)),
    *(f"{group}ipadapter{unit}_{name}"
      for name in ("model", "image", "module", "weight", "guidance_start", "guidance_end")
      for group in ("", "group2_") for unit in (1, 2)),
)

GENERATION = [s for s in settings_of(DeltaSettings) if not isinstance(s.kind, Groups)]
GROUP = list(settings_of(AdaptationGroup))


def test_positional_order_is_append_only():
    assert POSITIONAL_FIELDS[:len(RELEASED)] == RELEASED
    assert [slot.index for slot in positional_slots(DeltaSettings)] == list(range(len(POSITIONAL_FIELDS)))


def test_the_derived_tables_cover_every_slot():
    slots = positional_slots(DeltaSettings)
    assert list(panel.TOOLTIPS) == list(POSITIONAL_FIELDS)
    assert set(panel.INFOTEXT_LABELS) | panel.NOT_IN_INFOTEXT == set(POSITIONAL_FIELDS)
    # a display choice, and images (infotext cannot hold them): not how the image was made, or not what it keeps
    assert panel.NOT_IN_INFOTEXT == {"preview", *(f for f in POSITIONAL_FIELDS if f.endswith(
        ("controlnet1_image", "controlnet2_image", "ipadapter1_image", "ipadapter2_image")))}
    assert {s.name for s in GENERATION + GROUP if s.xyz} <= {slot.setting.name for slot in slots}
    assert [a.label for a in interfaces.AXES] == [
        "[Delta] Lambda", "[Delta] Window start", "[Delta] Window end", "[Delta] Source checkpoint",
        "[Delta] LoRA weight", "[Delta] Schedule", "[Delta] Enabled", "[Delta] Source CFG scale",
        "[Delta] ControlNet weight", "[Delta] ControlNet guidance end", "[Delta] Source resolution",
        "[Delta] IP-Adapter weight"]
    assert {a.key for a in interfaces.AXES} <= set(OVERRIDES)
    # every single-valued setting can be overridden per generation, by its name
    assert {s.name for s in GENERATION + GROUP if not isinstance(s.kind, Objects)} <= set(OVERRIDES)


def _other(s):
    """A valid value of the setting other than its default."""
    kind = s.kind
    if isinstance(kind, Number):
        return kind.hi if s.default != kind.hi else kind.lo
    if isinstance(kind, Choice):
        return next(o for o in kind.options if o != s.default)
    if isinstance(kind, Bool):
        return not s.default
    if isinstance(kind, Objects) and kind.cls is IPAdapterUnit:
        return (IPAdapterUnit("ip [abc]", image="<png>", weight=0.5), IPAdapterUnit("e", guidance_end=0.5))
    if isinstance(kind, Objects) and kind.cls is ControlNetUnit:
        return (ControlNetUnit("cn [abc]", image="<png>", weight=0.5), ControlNetUnit("d", guidance_end=0.5))
    if isinstance(kind, Objects):
        return (LoraRef("a b", 0.5), LoraRef("c", 1.0, unet_weight=0.7, te_weight=0.2))
    assert isinstance(kind, Text)
    return "x, y: z"  # the WebUI's infotext quotes such values


BASE = DeltaSettings(enabled=True, source="sd15", groups=(AdaptationGroup(prompt="p"),))


@pytest.mark.parametrize("s", GENERATION + GROUP, ids=lambda s: s.name)
def test_every_setting_reaches_each_form_it_declares(s):
    value = _other(s)
    if s in GROUP:
        settings = replace(BASE, groups=(replace(BASE.groups[0], **{s.name: value}),))
        slots = [slot for slot in positional_slots(DeltaSettings) if slot.setting is s and slot.group == 0]
        if s.slot is None:  # API and infotext only, or shown unit by unit (test_every_unit_setting_...)
            assert not slots and s.control is None
            recorded = replace(settings.groups[0], **{s.name: s.kind.read(s.kind.text(value), s.api)})
            assert DeltaSettings.from_dict(settings.to_dict()) == settings
            assert DeltaSettings.from_infotext(settings.to_infotext()) == replace(settings, groups=(recorded,))
            return
        [slot] = slots
    else:
        settings = replace(BASE, **{s.name: value})
        [slot] = [slot for slot in positional_slots(DeltaSettings) if slot.setting is s]
    # API
    data = settings.to_dict()
    assert data[s.api] == s.kind.dump(value)
    assert DeltaSettings.from_dict(data) == settings
    # positional
    values = to_positional(settings)
    assert values[slot.index] == s.kind.ui(value) and slot.name == s.name
    assert from_positional(values) == settings
    # infotext
    if s.infotext is not None:
        assert s.infotext.key in settings.to_infotext()
    if settings.enabled:
        assert DeltaSettings.from_infotext(settings.to_infotext()) == replace(settings, preview=False)
    # panel: tooltip, paste key
    assert panel.TOOLTIPS[slot.name] == s.tooltip and len(s.tooltip) > 20
    assert (slot.name in panel.INFOTEXT_LABELS) == s.recorded
    # overrides and X/Y/Z
    if not isinstance(s.kind, Objects):
        assert BASE.with_overrides({s.name: value}) == settings
    if s.xyz is not None:
        axis = next(a for a in interfaces.AXES if a.label == s.xyz.label)
        assert axis.key == (s.xyz.key or s.name)


@pytest.mark.parametrize("s", GROUP, ids=lambda s: s.name)
def test_every_group_setting_reaches_the_second_group(s):
    value = _other(s)
    settings = replace(BASE, groups=(BASE.groups[0], replace(BASE.groups[0], **{s.name: value})))
    if s.slot is None:  # API and infotext only (no panel control)
        assert f'"{s.api}":' in settings.to_infotext()["Delta group 2"]
        assert DeltaSettings.from_dict(settings.to_dict()) == settings
        return
    [slot] = [slot for slot in positional_slots(DeltaSettings) if slot.setting is s and slot.group == 1]
    assert slot.name == f"group2_{s.name}"
    assert to_positional(settings)[slot.index] == s.kind.ui(value)
    assert from_positional(to_positional(settings)) == settings
    assert f'"{s.api}":' in settings.to_infotext()["Delta group 2"]
    assert DeltaSettings.from_infotext(settings.to_infotext()) == settings
    assert DeltaSettings.from_dict(settings.to_dict()) == settings
    assert panel.INFOTEXT_LABELS[slot.name] == f"Delta group 2 {s.name}"


# Each kind of unit the panel shows: its class, its list in the group, its controls' prefix and its name.
KINDS = {"controlnets": (ControlNetUnit, "controlnet", "ControlNet unit"),
         "ipadapters": (IPAdapterUnit, "ipadapter", "IP-Adapter unit")}
UNIT = [(owner, u) for owner, (cls, _, _) in KINDS.items() for u in settings_of(cls) if u.control is not None]


@pytest.mark.parametrize("group", [0, 1])
@pytest.mark.parametrize(("owner", "u"), UNIT, ids=lambda x: x if isinstance(x, str) else x.name)
def test_every_unit_setting_reaches_its_panel_control_in_each_unit(owner, u, group):
    """A unit's setting (ControlNet, IP-Adapter) has one control per panel group and unit: changed in the second
    unit of a group, it comes back from the panel's values, and its paste key and tooltip name the unit."""
    cls, prefix_of_kind, item = KINDS[owner]
    value = {"model": "other [1234abcd]", "image": "iVBORw0KGgo=", "use_init_image": True}.get(u.name) or \
        _other(u)
    first, second = cls("m [abc]"), replace(cls("m2 [def]"), **{u.name: value})
    groups = [replace(BASE.groups[0]), replace(BASE.groups[0], prompt="q")]
    groups[group] = replace(groups[group], **{owner: (first, second)})
    settings = replace(BASE, groups=tuple(groups))
    prefix = "group2_" if group else ""
    [slot] = [slot for slot in positional_slots(DeltaSettings) if slot.setting is u and slot.group == group
              and slot.unit == 1]
    assert slot.name == f"{prefix}{prefix_of_kind}2_{u.name}" and slot.index == u.slot[group * 2 + 1]
    values = to_positional(settings)
    assert values[slot.index] == u.kind.ui(getattr(second, u.name))
    assert from_positional(values) == settings
    if u.recorded:
        assert panel.INFOTEXT_LABELS[slot.name] == f"Delta {'group 2 ' if group else ''}{item} 2 {u.name}"
        assert getattr(DeltaSettings.from_infotext(settings.to_infotext()).groups[group], owner)[1] == second
    else:
        assert slot.name in panel.NOT_IN_INFOTEXT
    assert panel.TOOLTIPS[slot.name].endswith(f"{item} 2: {u.tooltip}")
    assert panel.TOOLTIPS[slot.name].startswith("Second group, ") == bool(group)


@pytest.mark.parametrize("owner", KINDS)
def test_a_unit_the_panel_leaves_at_none_is_no_unit(owner):
    cls, prefix, item = KINDS[owner]
    values = to_positional(replace(BASE, groups=(replace(BASE.groups[0], **{owner: (cls("a"),)}),)))
    assert values[POSITIONAL_FIELDS.index(f"{prefix}2_model")] == "None"
    values[POSITIONAL_FIELDS.index(f"{prefix}2_weight")] = 0.3  # a control of an unchosen unit
    assert getattr(from_positional(values).groups[0], owner) == (cls("a"),)
    values[POSITIONAL_FIELDS.index(f"{prefix}1_model")] = ""
    assert getattr(from_positional(values).groups[0], owner) == ()
    with pytest.raises(DeltaError, match=f"The UI holds 2 {item}s per group; use the API"):
        to_positional(replace(BASE, groups=(replace(BASE.groups[0], **{owner: (cls("a"),) * 3}),)))


def test_ipadapter_units_take_the_slots_after_the_controlnet_units():
    """Appended, so that positional values a panel, an API client or an X/Y/Z grid made before still mean what they
    meant: the first 55 slots are as released, and the IP-Adapter units' controls come after them."""
    ip = [i for i, f in enumerate(POSITIONAL_FIELDS) if "ipadapter" in f]
    assert ip == list(range(55, 79)) and len(POSITIONAL_FIELDS) == 79
    old = to_positional(replace(BASE, groups=(replace(BASE.groups[0], controlnets=(ControlNetUnit("cn [1]"),)),)))
    assert from_positional(old[:55]) == from_positional(old)  # a 55-value form still reads as before


# --- a declaration grown by one setting on each level, and a list of sub-objects (the shape of control units) ------


@dataclass(frozen=True)
class Unit:
    model: str = setting("", Text(), tooltip="the unit's model")
    weight: float = setting(1.0, Number(0.0, 2.0), tooltip="the unit's weight")
    image: str = setting("", Text(), recorded=False, tooltip="the unit's image (never in infotext)")


@dataclass(frozen=True)
class WiderGroup(AdaptationGroup):
    units: tuple[Unit, ...] = setting(
        (), Objects(Unit, "unit", most=3), slot=(80, 81), infotext=Infotext("Delta units"), control=Control("Units"),
        tooltip="Control units the adapted pass is guided by (a stand-in for ControlNet units).")
    boost: float = setting(
        0.0, Number(0.0, 2.0), slot=(82, 83), infotext=Infotext("Delta boost"), control=Control("Boost"),
        xyz=XYZ("[Delta] Boost", at=13), tooltip="A made-up group setting, to prove the derivation.")


_GROUPS = next(s for s in settings_of(DeltaSettings) if s.name == "groups")


@dataclass(frozen=True)
class Wider(DeltaSettings):
    groups: tuple[WiderGroup, ...] = setting(
        (WiderGroup(),), replace(_GROUPS.kind, cls=WiderGroup), slot=_GROUPS.slot, infotext=_GROUPS.infotext,
        control=_GROUPS.control, tooltip=_GROUPS.tooltip)
    eta: float = setting(
        0.0, Number(0.0, 1.0), slot=79, infotext=Infotext("Delta eta"), control=Control("Eta"),
        xyz=XYZ("[Delta] Eta", at=12), tooltip="A made-up generation setting, to prove the derivation.")


WIDE = Wider(enabled=True, source="sd15", eta=0.5, groups=(
    WiderGroup(prompt="p", boost=1.5, units=(Unit("canny", 0.5, image="<png>"),)),
    WiderGroup(prompt="q", units=(Unit("depth"), Unit("pose", 2.0, image="<png>"))),
))


def test_a_new_setting_reaches_the_api():
    assert Wider.from_dict(WIDE.to_dict()) == WIDE
    one = Wider.from_dict({"enabled": True, "source": "s", "eta": 0.25, "boost": 2,
                           "units": [{"model": "canny", "image": "<png>"}]})
    assert one.eta == 0.25 and one.groups[0].boost == 2.0 and one.groups[0].units == (Unit("canny", image="<png>"),)
    with pytest.raises(DeltaError, match=r"allowed keys: .*boost.*eta.*units"):
        Wider.from_dict({"speed": 1})
    with pytest.raises(DeltaError, match=r"'eta' is an integer of about 400 digits; it must be a number between 0"):
        Wider.from_dict({"eta": 10**400})
    with pytest.raises(DeltaError, match=r"'weight' \(units\[0\]\) must be a number"):
        Wider.from_dict({"units": [{"weight": "1"}]})
    with pytest.raises(DeltaError, match=r"Unknown key.*'mask' in unit"):
        Wider.from_dict({"units": [{"mask": 1}]})
    with pytest.raises(DeltaError, match="eta is 2; it must lie between 0 and 1"):
        replace(WIDE, eta=2.0).validated()
    with pytest.raises(DeltaError, match=r"weight \(unit 2\) \(group 2\) is 3"):
        replace(WIDE, groups=(WIDE.groups[0], replace(WIDE.groups[1], units=(Unit(), Unit(weight=3.0))))).validated()


def test_a_new_setting_round_trips_through_infotext_without_what_is_not_recorded():
    info = WIDE.to_infotext()
    assert info["Delta eta"] == "0.5" and info["Delta boost"] == "1.5"
    assert info["Delta units"] == '[{"model":"canny","weight":0.5}]'  # the image is not recorded
    assert '"units":[{"model":"depth","weight":1.0},{"model":"pose","weight":2.0}]' in info["Delta group 2"]
    assert "<png>" not in str(info)
    no_images = tuple(replace(g, units=tuple(replace(u, image="") for u in g.units)) for g in WIDE.groups)
    assert Wider.from_infotext(info) == replace(WIDE, groups=no_images)


def test_a_new_setting_takes_the_next_positional_slots():
    slots = positional_slots(Wider)
    assert tuple(slot.name for slot in slots) == (*RELEASED, "eta", "units", "group2_units", "boost", "group2_boost")
    assert from_positional(to_positional(WIDE), Wider) == WIDE
    assert {slot.name: slot.paste for slot in slots[-5:]} == {
        "eta": "Delta eta", "units": "Delta units", "group2_units": "Delta group 2 units", "boost": "Delta boost",
        "group2_boost": "Delta group 2 boost"}
    assert slots[-1].tooltip == "Second group: A made-up group setting, to prove the derivation."


def test_a_new_setting_gets_its_override_and_axis():
    assert WIDE.with_overrides({"eta": 0.75, "boost": 0.5}) == replace(
        WIDE, eta=0.75, groups=(replace(WIDE.groups[0], boost=0.5), WIDE.groups[1]))
    assert {"eta", "boost"} <= set(overrides_of(Wider))
    axes = interfaces.axes_of(Wider)
    assert [a.label for a in axes][-2:] == ["[Delta] Eta", "[Delta] Boost"]
    eta = axes[-2]
    assert (eta.key, eta.type) == ("eta", float)
    with pytest.raises(DeltaError, match=r"\[Delta\] Eta: 1.5 out of range; values must lie between 0.0 and 1.0"):
        eta.confirm([0.5, 1.5])
