"""How a setting is declared once, and how each outside form is derived from that declaration.

A setting is a field of a frozen dataclass declared with :func:`setting`: its value kind (type, range or choices:
what the API accepts and ``validated()`` checks), API key, positional slot, infotext key, tooltip, panel control
and X/Y/Z axis travel with it in the field's metadata. :mod:`lib_delta.args` holds the declarations; the API dict,
infotext, positional values, overrides, the panel and the X/Y/Z axes read them through :func:`settings_of`,
:func:`positional_slots` and the functions below, so a field added there reaches every form.

The level a setting lives on is the dataclass that declares it: ``DeltaSettings`` (the generation),
``AdaptationGroup`` (one adaptation group, reached through the :class:`Groups` field ``groups``) or an object of a
list-of-objects field (:class:`Objects`), as ``LoraRef`` is in a group's ``loras`` and ``ControlNetUnit`` in its
``controlnets``. An object list's API form is a list of objects and its infotext the JSON of their recorded fields.
Its positional form is either one slot per panel group holding that list, or, when the kind declares ``panel``
units (ControlNet units), one control per setting of each unit the panel shows: the object's settings then declare
their own controls and one slot per panel group and unit, and a unit whose first required setting is left blank
is no unit.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
import reprlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from .errors import DeltaError

MAX_TEXT = 4096  # characters in one text value: far beyond any checkpoint name, prompt or LoRA list
NO_OBJECT = "None"  # the panel's choice for "no unit" in a unit's first required control (a model dropdown)

_KEY = "delta_setting"


# --- the declaration -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Infotext:
    """Where a setting goes in the generation parameters. Settings that share a key (the window's ``start`` and
    ``end``) are written together as ``a-b``, in ``part`` order. A key is left out while its value is the default,
    unless ``always``."""

    key: str
    always: bool = False
    part: int | None = None


@dataclass(frozen=True)
class Control:
    """The setting's control in the panel.

    ``widget`` defaults to the kind's (checkbox, textbox, checkpoint, dropdown, slider, loras, image); ``radio`` is
    the other choice. Consecutive controls with the same ``row`` share a row. Generation settings sit in the panel's
    ``main`` part or in its ``advanced`` accordion; a group's are in that group's block. ``img2img`` shows the
    control in the img2img tab only (its value is positional in both).
    """

    label: str
    widget: str | None = None
    row: str | None = None
    section: str = "main"
    step: float = 0.01
    placeholder: str = ""
    img2img: bool = False


@dataclass(frozen=True)
class XYZ:
    """An X/Y/Z plot axis. ``at`` orders the grid's menu (kept as released; new axes go last). By default the axis
    sets the setting itself; ``key``, ``kind`` and ``apply`` make it set something derived from it instead (the
    weight of every LoRA): ``apply(current value, axis value)`` gives the setting's new value."""

    label: str
    at: int
    key: str | None = None
    kind: Kind | None = None
    apply: Callable[[Any, Any], Any] | None = None


@dataclass(frozen=True)
class Setting:
    """One declared setting, as :func:`settings_of` reads it back (with the field's name and default)."""

    kind: Kind
    name: str = ""
    default: Any = None
    api: str = ""  # the API key; the field name unless declared
    slot: int | tuple[int, ...] | None = None  # generation: one slot; group: one per panel group
    infotext: Infotext | None = None
    recorded: bool = True  # part of how an image was made: infotext and "Send to img2img" carry it
    tooltip: str = ""
    control: Control | None = None
    xyz: XYZ | None = None

    @property
    def required(self) -> bool:
        return self.default is dataclasses.MISSING

    @property
    def blank(self) -> Any:
        """The panel's value for this setting of a unit that is not there."""
        return NO_OBJECT if self.required else self.kind.ui(self.default)


def setting(default: Any, kind: Kind, *, api: str | None = None, slot: int | tuple[int, ...] | None = None,
            infotext: Infotext | None = None, recorded: bool = True, tooltip: str = "",
            control: Control | None = None, xyz: XYZ | None = None) -> Any:
    """Declare a dataclass field as a setting; ``default`` may be ``dataclasses.MISSING`` for a required one."""
    declared = Setting(kind, api=api or "", slot=slot, infotext=infotext, recorded=recorded, tooltip=tooltip,
                       control=control, xyz=xyz)
    return dataclasses.field(default=default, metadata={_KEY: declared})


@functools.cache
def settings_of(cls: type) -> tuple[Setting, ...]:
    """The settings a dataclass declares, in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        declared = f.metadata.get(_KEY)
        if declared is not None:
            out.append(dataclasses.replace(declared, name=f.name, default=f.default, api=declared.api or f.name))
    return tuple(out)


def walk(cls: type) -> list[Setting]:
    """Every setting of ``cls`` and of the objects its list settings hold."""
    out: list[Setting] = []
    for s in settings_of(cls):
        out.append(s)
        if isinstance(s.kind, Objects):
            out.extend(walk(s.kind.cls))
    return out


# --- value kinds ---------------------------------------------------------------------------------------------
#
# ``parse`` reads an API, positional or override value (an API or positional ``None`` means the default and never
# reaches it) and raises on a wrong type or a value no setting could hold; ``check`` is validated()'s range or
# choice test; ``dump``/``ui``/``text`` write the API, panel and infotext forms (``record`` is the API form of what
# infotext carries) and ``read`` parses the infotext one.


class Kind:
    widget: ClassVar[str] = "textbox"

    def parse(self, value: Any, key: str, where: str) -> Any:
        raise NotImplementedError

    def check(self, value: Any, name: str, where: str) -> None:
        pass

    def dump(self, value: Any) -> Any:
        return value

    def record(self, value: Any) -> Any:
        return self.dump(value)

    def ui(self, value: Any) -> Any:
        return self.dump(value)

    def text(self, value: Any) -> str:
        return str(value)

    def read(self, text: str, key: str) -> Any:
        return self.parse(text, key, "")

    def write_infotext(self, value: Any, key: str, out: dict[str, str]) -> None:
        out[key] = self.text(value)

    def read_infotext(self, params: Mapping[str, str], key: str) -> Any:
        """The value from parsed infotext, or ``dataclasses.MISSING`` when it is not there."""
        return self.read(params[key], key) if key in params else dataclasses.MISSING


def api_subject(key: str, where: str) -> str:
    return f"Delta Sampling setting '{key}'{where}"


def infotext_subject(key: str) -> str:
    return f"Infotext field '{key}'"


class Bool(Kind):
    widget = "checkbox"

    def parse(self, value: Any, key: str, where: str) -> bool:
        if isinstance(value, bool):
            return value
        raise DeltaError(f"{api_subject(key, where)} must be true or false, not {typename(value)} ({shown(value)}).")


class Text(Kind):
    most: ClassVar[int] = MAX_TEXT

    def parse(self, value: Any, key: str, where: str) -> str:
        if not isinstance(value, str):
            raise DeltaError(f"{api_subject(key, where)} must be a string, not {typename(value)} ({shown(value)}).")
        return self.fits(value, api_subject(key, where))

    def read(self, text: str, key: str) -> str:
        return self.fits(str(text), infotext_subject(key))

    def check(self, value: Any, name: str, where: str) -> None:
        if not isinstance(value, str):
            raise DeltaError(f"Delta Sampling {name}{where} must be a string, not {typename(value)}.")
        self.fits(value, f"Delta Sampling {name}{where}")

    def fits(self, value: str, subject: str) -> str:
        if len(value) > self.most:
            raise DeltaError(f"{subject} is {len(value)} characters long; at most {self.most} are allowed.")
        return value


class Checkpoint(Text):
    """The name of a checkpoint the WebUI lists: the panel offers them, an X/Y/Z axis confirms them."""

    widget = "checkpoint"


@dataclass(frozen=True)
class Listed(Text):
    """The name of something the host lists, from its list ``catalog`` ("controlnet": its ControlNet models,
    "controlnet_module": its preprocessors): the panel offers that list in a dropdown with a refresh button, the
    host resolves the name. With ``family`` the panel lists only the names made for the source's family."""

    catalog: str = ""
    family: bool = False
    widget = "listed"


@dataclass(frozen=True)
class Choice(Text):
    options: tuple[str, ...] = ()
    widget = "dropdown"

    def check(self, value: Any, name: str, where: str) -> None:
        if value not in self.options:
            raise DeltaError(f"Delta Sampling {name}{where} is {shown(value)}; allowed: {', '.join(self.options)}.")

    def read(self, text: str, key: str) -> str:
        if text not in self.options:  # checked at once, as the pasted value must be one its control offers
            raise DeltaError(f"{infotext_subject(key)} is {shown(text)}; allowed: {', '.join(self.options)}.")
        return text


@dataclass(frozen=True)
class Number(Kind):
    lo: float
    hi: float
    widget = "slider"

    @property
    def bounds(self) -> str:
        return f"between {num(self.lo)} and {num(self.hi)}"

    def parse(self, value: Any, key: str, where: str) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DeltaError(f"{api_subject(key, where)} must be a number, not {typename(value)} ({shown(value)}).")
        return self.finite(value, api_subject(key, where))

    def read(self, text: str, key: str) -> float:
        # Checked against the range at once: the pasted value must fit its slider (infotext is only written for
        # settings that passed validation).
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise DeltaError(f"{infotext_subject(key)} should be a number, got {shown(text)}.") from None
        if not self.lo <= value <= self.hi:  # nan and inf too
            raise DeltaError(f"{infotext_subject(key)} is {shown(text)}; it must be a number {self.bounds}.")
        return value

    def finite(self, value: float, subject: str) -> float:
        """``float(value)``, or an error naming the range for what no float holds (10**400, inf, nan)."""
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise DeltaError(f"{subject} is {shown(value)}; it must be a number {self.bounds}.")
        return number

    def check(self, value: Any, name: str, where: str) -> None:
        if value is None:  # an optional number left unset
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DeltaError(f"Delta Sampling {name}{where} must be a number, not {typename(value)}.")
        if not (math.isfinite(value) and self.lo <= value <= self.hi):
            raise DeltaError(f"Delta Sampling {name}{where} is {num(value)}; it must lie {self.bounds}.")

    def text(self, value: float) -> str:
        return num(value)

    def ui(self, value: float | None) -> float | None:
        return None if value is None else float(value)


@dataclass(frozen=True)
class Objects(Kind):
    """A list of objects of a declared dataclass (``item`` names one in messages). The API holds the objects' API
    form; infotext holds it as compact JSON, without the settings that are not recorded. The panel holds the API
    form in one control, or, with ``panel`` > 0, shows that many units per group, their settings' controls named
    ``{prefix}{k}_{name}`` (``controlnet1_model``)."""

    cls: type
    item: str
    least: int = 0
    most: int = 64
    panel: int = 0
    prefix: str = ""

    def parse(self, value: Any, key: str, where: str) -> tuple[Any, ...]:
        if not isinstance(value, (list, tuple)) or len(value) < self.least:
            keys = ", ".join(sorted(s.api for s in settings_of(self.cls)))
            given = "" if isinstance(value, (list, tuple)) else f", not {typename(value)}"
            raise DeltaError(f"{api_subject(key, where)} must be a {'non-empty ' if self.least else ''}list of "
                             f"objects, each with the keys {keys}{given}.")
        if len(value) > self.most:
            raise DeltaError(f"{api_subject(key, where)} lists {len(value)} {self.item}s; at most {self.most} are "
                             "allowed.")
        return tuple(parse_object(self.cls, v, self.item, f" ({key}[{i}]){where}") for i, v in enumerate(value))

    def check(self, value: Any, name: str, where: str) -> None:
        if not self.least <= len(value) <= self.most:
            raise DeltaError(f"Delta Sampling takes {self.least} to {self.most} {self.item}s{where}; "
                             f"{len(value)} given.")
        for i, obj in enumerate(value, 1):
            check_object(obj, f" ({self.item} {i}){where}" if len(value) > 1 else where)

    def dump(self, value: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [dump_object(v) for v in value]

    def record(self, value: tuple[Any, ...]) -> list[dict[str, Any]]:
        return [dump_object(v, recorded_only=True) for v in value]

    def text(self, value: tuple[Any, ...]) -> str:
        return compact_json(self.record(value))

    def read(self, text: str, key: str) -> tuple[Any, ...]:
        return self.parse(load_json(text, key), key, f" (infotext '{key}')")


@dataclass(frozen=True)
class Groups(Objects):
    """The adaptation groups. The API takes the first group's keys flat as well (see ``DeltaSettings.from_dict``);
    infotext writes the first group's settings under their own keys and each further group as JSON under
    ``key.format(i=2)``, ``...3``; the panel shows ``len(slot) + 1`` groups, each after the first with a switch
    (positional ``group2_enabled``) and its settings' slots named ``group2_<name>``."""

    widget = "checkbox"  # the switch of a further group

    def check(self, value: Any, name: str, where: str) -> None:
        if not self.least <= len(value) <= self.most:
            raise DeltaError(f"Delta Sampling takes {self.least} to {self.most} adaptation groups; {len(value)} given.")
        for i, obj in enumerate(value, 1):
            check_object(obj, group_where(i, len(value)))

    def write_infotext(self, value: tuple[Any, ...], key: str, out: dict[str, str]) -> None:
        if value:
            write_infotext(value[0], out)
        for i, obj in enumerate(value[1:], 2):
            out[key.format(i=i)] = compact_json(dump_object(obj, recorded_only=True))

    def read_infotext(self, params: Mapping[str, str], key: str) -> tuple[Any, ...]:
        groups = [self.cls(**read_infotext(self.cls, params))]
        while (numbered := key.format(i=len(groups) + 1)) in params:
            groups.append(parse_object(self.cls, load_json(params[numbered], numbered), self.item, f" ({numbered})"))
        return tuple(groups)


def group_where(i: int, count: int) -> str:
    """How validation messages name group ``i`` (from 1): not at all while there is one."""
    return "" if count == 1 else f" (group {i})"


# --- objects in the API form ---------------------------------------------------------------------------------


def parse_fields(cls: type, data: Mapping[str, Any], what: str, where: str) -> dict[str, Any]:
    """The values of the settings ``data`` gives, by field name; a missing or null key keeps the default."""
    values = {}
    for s in settings_of(cls):
        if data.get(s.api) is not None:
            values[s.name] = s.kind.parse(data[s.api], s.api, where)
        elif s.required:
            raise DeltaError(f"{what} has no {s.api!r} ({s.tooltip}).")
    return values


def parse_object(cls: type, data: Any, name: str, where: str, inside: str | None = None) -> Any:
    """An object from its API form; ``name`` + ``where`` name it in messages, ``inside`` its settings."""
    if not isinstance(data, Mapping):
        raise DeltaError(f"{name}{where} must be an object, not {typename(data)}.")
    keys = [s.api for s in settings_of(cls)]
    unknown = sorted((k for k in data if k not in keys), key=str)
    if unknown:
        raise DeltaError(f"Unknown key(s) {', '.join(shown(k) for k in unknown)} in {name}{where}; allowed: "
                         f"{', '.join(sorted(keys))}.")
    return cls(**parse_fields(cls, data, f"{name}{where}", where if inside is None else inside))


def dump_object(obj: Any, recorded_only: bool = False) -> dict[str, Any]:
    """The API form, or with ``recorded_only`` what infotext carries of it; unset optional values (None) are left
    out."""
    out = {}
    for s in settings_of(type(obj)):
        value = getattr(obj, s.name)
        if value is not None and (s.recorded or not recorded_only):
            out[s.api] = s.kind.record(value) if recorded_only else s.kind.dump(value)
    return out


def check_object(obj: Any, where: str) -> None:
    for s in settings_of(type(obj)):
        s.kind.check(getattr(obj, s.name), s.name, where)


# --- infotext ------------------------------------------------------------------------------------------------


def write_infotext(obj: Any, out: dict[str, str]) -> None:
    """Add ``obj``'s settings to infotext key/values, in declaration order."""
    settings = settings_of(type(obj))
    for s in settings:
        it = s.infotext
        if it is None or it.part not in (None, 0):
            continue
        parts = _parts(settings, it.key) if it.part == 0 else [s]
        values = [getattr(obj, p.name) for p in parts]
        if not it.always and all(v == p.default for v, p in zip(values, parts, strict=True)):
            continue
        if it.part is None:
            s.kind.write_infotext(values[0], it.key, out)
        else:
            out[it.key] = "-".join(p.kind.text(v) for p, v in zip(parts, values, strict=True))


def read_infotext(cls: type, params: Mapping[str, str]) -> dict[str, Any]:
    """The values of ``cls``'s settings that parsed infotext holds, by field name."""
    settings = settings_of(cls)
    values: dict[str, Any] = {}
    for s in settings:
        it = s.infotext
        if it is None:
            continue
        if it.part is None:
            value = s.kind.read_infotext(params, it.key)
            if value is not dataclasses.MISSING:
                values[s.name] = value
        elif it.key in params:
            parts = _parts(settings, it.key)
            texts = _split(params[it.key], it.key, [p.name for p in parts])
            values[s.name] = s.kind.read(texts[it.part], it.key)
    return values


def _parts(settings: tuple[Setting, ...], key: str) -> list[Setting]:
    return sorted((s for s in settings if s.infotext is not None and s.infotext.key == key),
                  key=lambda s: s.infotext.part)  # type: ignore[union-attr]


def _split(text: str, key: str, names: list[str]) -> list[str]:
    """``"0.1-0.6"`` into its numbers; only the first may carry a minus sign, as the separator is one."""
    pattern = r"\s*" + r"\s*-\s*".join([r"([0-9.eE+-]+?)"] * (len(names) - 1) + [r"([0-9.eE+]+)"]) + r"\s*"
    m = re.fullmatch(pattern, str(text))
    if not m:
        raise DeltaError(f"{infotext_subject(key)} should read {'-'.join(names)!r}, got {shown(text)}.")
    return list(m.groups())


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def load_json(text: Any, key: str) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError, RecursionError) as e:
        raise DeltaError(f"{infotext_subject(key)} is not valid JSON ({str(e)[:200]}).") from None


# --- the positional form and the panel -----------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One positional value: a setting in the generation (``group`` None), a setting of panel group ``group``
    (from 0), the switch of panel group ``group`` (``switch``: the Groups setting itself), or a setting of unit
    ``unit`` (from 0) of the object list ``owner`` in panel group ``group``."""

    index: int
    name: str
    setting: Setting
    group: int | None = None
    switch: bool = False
    paste: str | None = None  # the key "Send to img2img" and paste match; None: infotext does not carry it
    tooltip: str = ""
    owner: Setting | None = None
    unit: int | None = None


ORDINALS = {2: "Second", 3: "Third", 4: "Fourth"}  # how the panel names its groups after the first


@functools.cache
def positional_slots(cls: type) -> tuple[Slot, ...]:
    """The positional values in slot order (append-only: slots are never renumbered)."""
    slots = []
    for s in settings_of(cls):
        if isinstance(s.kind, Groups):
            slots.extend(_group_slots(s))
        elif s.slot is not None:
            assert isinstance(s.slot, int), f"{s.name}: a generation setting takes one slot"
            slots.append(Slot(s.slot, s.name, s, paste=_paste(s), tooltip=s.tooltip))
    slots.sort(key=lambda slot: slot.index)
    assert [slot.index for slot in slots] == list(range(len(slots))), "slots must run from 0 without gaps"
    return tuple(slots)


def _group_slots(groups: Setting) -> list[Slot]:
    """Panel group 0's settings under their own names; each later group's switch and settings as group2_<name>."""
    assert isinstance(groups.kind, Groups) and isinstance(groups.slot, tuple) and groups.infotext is not None
    slots = []
    for g in range(len(groups.slot) + 1):
        label, prefix = groups.infotext.key.format(i=g + 1), f"group{g + 1}_"
        if g > 0:
            slots.append(Slot(groups.slot[g - 1], f"{prefix}enabled", groups, g, switch=True, paste=label,
                              tooltip=groups.tooltip))
        for s in settings_of(groups.kind.cls):
            if isinstance(s.kind, Objects) and s.kind.panel:
                slots.extend(_unit_slots(s, g, len(groups.slot) + 1, prefix if g else "", label if g else "Delta"))
                continue
            if s.slot is None and s.control is None:
                continue  # API and infotext only: no panel control, no positional value
            assert isinstance(s.slot, tuple) and len(s.slot) == len(groups.slot) + 1, \
                f"{s.name}: a group setting takes one slot per panel group"
            if g == 0:
                slots.append(Slot(s.slot[0], s.name, s, 0, paste=_paste(s), tooltip=s.tooltip))
            else:
                slots.append(Slot(s.slot[g], prefix + s.name, s, g, paste=f"{label} {s.name}" if s.recorded else None,
                                  tooltip=f"{ORDINALS[g + 1]} group: {s.tooltip}"))
    return slots


def _unit_slots(owner: Setting, g: int, groups: int, prefix: str, label: str) -> list[Slot]:
    """Panel group ``g``'s units of an object list: unit k's settings as ``{prefix}{kind.prefix}{k}_{name}``, their
    slots ``setting.slot[g * units + k - 1]``."""
    kind = owner.kind
    assert isinstance(kind, Objects) and kind.prefix and kind.panel <= kind.most
    slots = []
    for k in range(kind.panel):
        for s in settings_of(kind.cls):
            if s.control is None:
                continue  # API and infotext only
            assert isinstance(s.slot, tuple) and len(s.slot) == groups * kind.panel, \
                f"{s.name}: a unit setting takes one slot per panel group and unit"
            tooltip = f"{kind.item} {k + 1}: {s.tooltip}"
            slots.append(Slot(s.slot[g * kind.panel + k], f"{prefix}{kind.prefix}{k + 1}_{s.name}", s, g,
                              paste=f"{label} {kind.item} {k + 1} {s.name}" if s.recorded else None,
                              tooltip=f"{ORDINALS[g + 1]} group, {tooltip}" if g else tooltip, owner=owner, unit=k))
    return slots


def _paste(s: Setting) -> str | None:
    if not s.recorded:
        return None
    if s.infotext is None:
        return f"Delta {s.name}"
    return s.infotext.key if s.infotext.part is None else f"{s.infotext.key} {s.name}"


# --- messages ------------------------------------------------------------------------------------------------


def num(v: float) -> str:
    """Shortest exact text of a float (``1.0`` -> ``1``), so infotext stays compact and round-trips."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


def typename(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), f"a {type(v).__name__}")


def shown(v: Any, most: int = 60) -> str:
    """A value for a message: short whatever its size (the repr of a 5000-digit integer raises)."""
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > 64:
        return f"an integer of about {round(v.bit_length() * math.log10(2))} digits"
    try:
        text = _REPR.repr(v)
    except (ValueError, RecursionError):
        text = f"<{typename(v)}>"
    return text if len(text) <= most else f"{text[:most - 1]}…"


_REPR = reprlib.Repr()  # bounded work for a huge list or a deeply nested object
_REPR.maxstring, _REPR.maxother, _REPR.maxlevel = 60, 60, 3
