"""The settings of one Delta Sampling generation: the single source of truth for UI, API, infotext and X/Y/Z.

Three outside forms convert to and from :class:`DeltaSettings` losslessly:
- the API dict (``alwayson_scripts: {"Delta Sampling": {"args": [{...}]}}``): :meth:`DeltaSettings.from_dict`;
- the positional values the UI produces, in :data:`POSITIONAL_FIELDS` order (append-only): :func:`from_positional`;
- infotext key/values: :meth:`DeltaSettings.to_infotext` / :meth:`DeltaSettings.from_infotext`.
Every bad value raises a :class:`DeltaError` that names the setting, what was given and what is allowed.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .errors import DeltaError
from .schedule import SCHEDULES

MODES = ("delta", "base-first")
CFG_MODES = ("cfg", "cond")
TRAJECTORIES = ("shared", "separate")
STRENGTH_RANGE = (-5.0, 5.0)
LORA_WEIGHT_RANGE = (-10.0, 10.0)
MAX_GROUPS = 4

_LORA_TAG = re.compile(r"<lora:([^<>]+)>")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA/LyCORIS file by the name the WebUI lists, with its weights (as ``<lora:name:te:unet>``)."""

    name: str
    weight: float = 1.0
    unet_weight: float | None = None
    te_weight: float | None = None

    def __post_init__(self) -> None:
        # One canonical form, so every outside form round-trips: split weights are both explicit, and `weight`
        # then equals the UNet weight.
        if self.unet_weight is not None or self.te_weight is not None:
            unet = self.weight if self.unet_weight is None else self.unet_weight
            te = self.weight if self.te_weight is None else self.te_weight
            object.__setattr__(self, "unet_weight", unet)
            object.__setattr__(self, "te_weight", te)
            object.__setattr__(self, "weight", unet)

    @property
    def unet(self) -> float:
        return self.weight if self.unet_weight is None else self.unet_weight

    @property
    def te(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    def tag(self) -> str:
        if self.unet_weight is None and self.te_weight is None:
            return f"<lora:{self.name}:{_num(self.weight)}>"
        return f"<lora:{self.name}:{_num(self.te)}:{_num(self.unet)}>"


@dataclass(frozen=True)
class AdaptationGroup:
    """One adaptation of the source and how strongly, and when, its delta applies."""

    loras: tuple[LoraRef, ...] = ()
    checkpoint: str = ""
    prompt: str = ""
    strength: float = 1.0
    schedule: str = "constant"
    start: float = 0.0
    end: float = 1.0

    @property
    def has_adaptation(self) -> bool:
        return bool(self.loras or self.checkpoint or self.prompt)


@dataclass(frozen=True)
class DeltaSettings:
    """Everything that decides what Delta Sampling does to one generation."""

    enabled: bool = False
    source: str = ""
    groups: tuple[AdaptationGroup, ...] = (AdaptationGroup(),)
    mode: str = "delta"
    cfg_mode: str = "cfg"
    trajectory: str = "shared"
    preview: bool = False

    # -- validation -------------------------------------------------------------------------------------------

    def validated(self) -> DeltaSettings:
        """Return self if every value is usable, else raise one DeltaError describing the first problem."""
        if not self.enabled:
            return self
        if not self.source.strip():
            raise DeltaError("Delta Sampling is enabled but no source checkpoint is chosen: pick the base model the "
                             "adaptation was made for (e.g. an SD1.5 checkpoint for an SD1.5 LoRA).")
        _choice("mode", self.mode, MODES)
        _choice("cfg_mode", self.cfg_mode, CFG_MODES)
        _choice("trajectory", self.trajectory, TRAJECTORIES)
        if not 1 <= len(self.groups) <= MAX_GROUPS:
            raise DeltaError(f"Delta Sampling takes 1 to {MAX_GROUPS} adaptation groups; {len(self.groups)} given.")
        if self.mode == "base-first" and len(self.groups) > 1:
            raise DeltaError("base-first mode uses one group (its window says which steps the source predicts); "
                             f"{len(self.groups)} given. Remove the extra groups or use mode 'delta'.")
        for i, g in enumerate(self.groups, 1):
            where = "" if len(self.groups) == 1 else f" (group {i})"
            _check_group(g, where)
            if self.mode == "delta" and not g.has_adaptation:
                raise DeltaError(f"Delta Sampling has nothing to transfer{where}: add a LoRA, a fine-tuned "
                                 "checkpoint or an adapted prompt, or switch mode to 'base-first'.")
        return self

    # -- API dict ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The API form; one group is written flat, several under ``groups``."""
        out: dict[str, Any] = {"enabled": self.enabled, "source": self.source}
        if len(self.groups) == 1:
            out.update(_group_to_dict(self.groups[0]))
        else:
            out["groups"] = [_group_to_dict(g) for g in self.groups]
        out.update(mode=self.mode, cfg_mode=self.cfg_mode, trajectory=self.trajectory, preview=self.preview)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeltaSettings:
        """Parse the API form. Unknown keys and wrongly typed values are errors; missing keys take defaults."""
        if not isinstance(data, Mapping):
            raise DeltaError(f"Delta Sampling settings must be a JSON object, not {_typename(data)}.")
        unknown = sorted(set(data) - _TOP_KEYS - _GROUP_KEYS)
        if unknown:
            raise DeltaError(f"Unknown Delta Sampling setting(s) {', '.join(map(repr, unknown))}; allowed keys: "
                             f"{', '.join(sorted(_TOP_KEYS | _GROUP_KEYS))}.")
        if "groups" in data:
            flat = sorted(set(data) & _GROUP_KEYS)
            if flat:
                raise DeltaError(f"Give either 'groups' or the single-group keys ({', '.join(flat)}), not both.")
            raw = data["groups"]
            if not isinstance(raw, list) or not raw:
                raise DeltaError("'groups' must be a non-empty list of objects, each with the keys "
                                 f"{', '.join(sorted(_GROUP_KEYS))}.")
            groups = tuple(_group_from_dict(g, f" (groups[{i}])") for i, g in enumerate(raw))
        else:
            groups = (_group_from_dict({k: v for k, v in data.items() if k in _GROUP_KEYS}, ""),)
        d = cls()
        return cls(
            enabled=_bool(data, "enabled", d.enabled),
            source=_str(data, "source", d.source),
            groups=groups,
            mode=_str(data, "mode", d.mode),
            cfg_mode=_str(data, "cfg_mode", d.cfg_mode),
            trajectory=_str(data, "trajectory", d.trajectory),
            preview=_bool(data, "preview", d.preview),
        )

    # -- infotext ----------------------------------------------------------------------------------------------

    def to_infotext(self) -> dict[str, str]:
        """Key/values for the generation parameters line; empty when disabled. Defaults are left out."""
        if not self.enabled:
            return {}
        out = {"Delta source": self.source}
        out.update(_group_to_infotext(self.groups[0]))
        for i, g in enumerate(self.groups[1:], 2):
            out[f"Delta group {i}"] = json.dumps(_group_to_dict(g), separators=(",", ":"), ensure_ascii=False)
        if self.mode != "delta":
            out["Delta mode"] = self.mode
        if self.cfg_mode != "cfg":
            out["Delta CFG mode"] = self.cfg_mode
        if self.trajectory != "shared":
            out["Delta trajectory"] = self.trajectory
        return out

    @classmethod
    def from_infotext(cls, params: Mapping[str, str]) -> DeltaSettings:
        """Settings from parsed infotext; without a ``Delta source`` key the extension is off."""
        if "Delta source" not in params:
            return cls()
        groups = [_group_from_infotext(params)]
        i = 2
        while f"Delta group {i}" in params:
            key = f"Delta group {i}"
            try:
                raw = json.loads(params[key])
            except (TypeError, ValueError) as e:
                raise DeltaError(f"Infotext field '{key}' is not valid JSON ({e}).") from None
            groups.append(_group_from_dict(raw, f" ({key})"))
            i += 1
        d = cls()
        return cls(
            enabled=True,
            source=str(params["Delta source"]),
            groups=tuple(groups),
            mode=str(params.get("Delta mode", d.mode)),
            cfg_mode=str(params.get("Delta CFG mode", d.cfg_mode)),
            trajectory=str(params.get("Delta trajectory", d.trajectory)),
        )

    # -- X/Y/Z and other per-generation overrides ---------------------------------------------------------------

    def with_overrides(self, overrides: Mapping[str, Any]) -> DeltaSettings:
        """Apply X/Y/Z axis values (keys of :data:`OVERRIDES`) to a copy."""
        s = self
        for key, value in overrides.items():
            if key not in OVERRIDES:
                raise DeltaError(f"Unknown Delta Sampling override {key!r}; known: {', '.join(OVERRIDES)}.")
            s = OVERRIDES[key](s, value)
        return s

    def summary(self) -> str:
        """One concise line for the console log."""
        if not self.enabled:
            return "Delta Sampling: off"
        parts = [f"Delta Sampling: source={self.source}", f"mode={self.mode}"]
        for i, g in enumerate(self.groups, 1):
            what = [r.tag() for r in g.loras]
            if g.checkpoint:
                what.append(f"checkpoint={g.checkpoint}")
            if g.prompt:
                what.append(f"prompt={g.prompt!r}")
            window = f"{_num(g.start)}-{_num(g.end)}"
            label = "" if len(self.groups) == 1 else f"group{i}: "
            parts.append(f"{label}{' '.join(what) or 'base'} λ={_num(g.strength)} {g.schedule} {window}")
        parts.append(f"cfg={self.cfg_mode}")
        if self.trajectory != "shared":
            parts.append(f"trajectory={self.trajectory}")
        return ", ".join(parts)


# --- the positional form the UI produces (append-only: never reorder, only add at the end) ----------------------

POSITIONAL_FIELDS: tuple[str, ...] = (
    "enabled", "source", "loras", "strength", "schedule", "start", "end", "checkpoint", "prompt",
    "mode", "cfg_mode", "trajectory", "preview",
    "group2_enabled", "group2_loras", "group2_strength", "group2_schedule", "group2_start", "group2_end",
    "group2_checkpoint", "group2_prompt",
)


def from_positional(values: Sequence[Any]) -> DeltaSettings:
    """Settings from the script's argument slice: either one API dict, or the UI's positional values."""
    if len(values) >= 1 and isinstance(values[0], Mapping):
        # The WebUI's API fills every slot after the ones a request gives with the UI's defaults (or with values
        # read from the request's infotext), so the slots after a settings object carry nothing the caller said.
        return DeltaSettings.from_dict(values[0])
    if len(values) > len(POSITIONAL_FIELDS):
        raise DeltaError(f"Delta Sampling takes at most {len(POSITIONAL_FIELDS)} positional values "
                         f"({', '.join(POSITIONAL_FIELDS)}); {len(values)} given.")
    d = DeltaSettings()
    raw = dict(zip(POSITIONAL_FIELDS, values, strict=False))
    first = {k: raw[k] for k in ("loras", "strength", "schedule", "start", "end", "checkpoint", "prompt") if k in raw}
    groups = [_group_from_dict(first, "")]
    if _bool(raw, "group2_enabled", False):
        second = {k[len("group2_"):]: v for k, v in raw.items() if k.startswith("group2_") and k != "group2_enabled"}
        groups.append(_group_from_dict(second, " (group 2)"))
    return DeltaSettings(
        enabled=_bool(raw, "enabled", d.enabled),
        source=_str(raw, "source", d.source) or "",
        groups=tuple(groups),
        mode=_str(raw, "mode", d.mode),
        cfg_mode=_str(raw, "cfg_mode", d.cfg_mode),
        trajectory=_str(raw, "trajectory", d.trajectory),
        preview=_bool(raw, "preview", d.preview),
    )


def to_positional(s: DeltaSettings) -> list[Any]:
    """The UI's positional values for settings with at most two groups (the UI shows two)."""
    if len(s.groups) > 2:
        raise DeltaError("The UI holds two adaptation groups; use the API's 'groups' for more.")
    g1 = s.groups[0]
    g2 = s.groups[1] if len(s.groups) > 1 else AdaptationGroup()
    return [
        s.enabled, s.source, format_lora_tags(g1.loras), g1.strength, g1.schedule, g1.start, g1.end,
        g1.checkpoint, g1.prompt, s.mode, s.cfg_mode, s.trajectory, s.preview,
        len(s.groups) > 1, format_lora_tags(g2.loras), g2.strength, g2.schedule, g2.start, g2.end,
        g2.checkpoint, g2.prompt,
    ]


# --- LoRA tags ---------------------------------------------------------------------------------------------------


def parse_lora_tags(text: str) -> tuple[LoraRef, ...]:
    """``<lora:name>``, ``<lora:name:w>`` or ``<lora:name:te:unet>`` tags; anything else in the text is an error."""
    if not isinstance(text, str):
        raise DeltaError(f"LoRAs must be given as '<lora:name:weight>' text, not {_typename(text)}.")
    leftover = _LORA_TAG.sub("", text).strip(" ,\n\t")
    if leftover:
        raise DeltaError(f"Cannot read {leftover!r} in the LoRA field: write each LoRA as <lora:name:weight> "
                         "(or <lora:name:te_weight:unet_weight>).")
    refs = []
    for body in _LORA_TAG.findall(text):
        name, *nums = body.split(":")
        if not name.strip() or len(nums) > 2:
            raise DeltaError(f"Cannot read '<lora:{body}>': write <lora:name:weight> or <lora:name:te:unet>.")
        try:
            ws = [float(n) for n in nums]
        except ValueError:
            raise DeltaError(f"Cannot read the weight in '<lora:{body}>': weights are numbers.") from None
        if len(ws) == 2:
            refs.append(LoraRef(name.strip(), ws[1], unet_weight=ws[1], te_weight=ws[0]))
        else:
            refs.append(LoraRef(name.strip(), ws[0] if ws else 1.0))
    return tuple(refs)


def format_lora_tags(loras: Sequence[LoraRef]) -> str:
    return "".join(r.tag() for r in loras)


# --- helpers -----------------------------------------------------------------------------------------------------

_TOP_KEYS = frozenset({"enabled", "source", "groups", "mode", "cfg_mode", "trajectory", "preview"})
_GROUP_KEYS = frozenset({"loras", "checkpoint", "adapted_prompt", "strength", "schedule", "start", "end"})
_LORA_KEYS = frozenset({"name", "weight", "unet_weight", "te_weight"})


def _group_to_dict(g: AdaptationGroup) -> dict[str, Any]:
    loras = []
    for r in g.loras:
        item: dict[str, Any] = {"name": r.name, "weight": r.weight}
        if r.unet_weight is not None:
            item["unet_weight"] = r.unet_weight
        if r.te_weight is not None:
            item["te_weight"] = r.te_weight
        loras.append(item)
    return {"loras": loras, "checkpoint": g.checkpoint, "adapted_prompt": g.prompt, "strength": g.strength,
            "schedule": g.schedule, "start": g.start, "end": g.end}


def _group_from_dict(data: Any, where: str) -> AdaptationGroup:
    if not isinstance(data, Mapping):
        raise DeltaError(f"Delta Sampling group{where} must be an object, not {_typename(data)}.")
    data = dict(data)
    if "prompt" in data and "adapted_prompt" not in data:  # positional/UI name
        data["adapted_prompt"] = data.pop("prompt")
    unknown = sorted(set(data) - _GROUP_KEYS)
    if unknown:
        raise DeltaError(f"Unknown key(s) {', '.join(map(repr, unknown))} in Delta Sampling group{where}; allowed: "
                         f"{', '.join(sorted(_GROUP_KEYS))}.")
    d = AdaptationGroup()
    return AdaptationGroup(
        loras=_loras(data.get("loras", ()), where),
        checkpoint=_str(data, "checkpoint", d.checkpoint) or "",
        prompt=_str(data, "adapted_prompt", d.prompt) or "",
        strength=_float(data, "strength", d.strength),
        schedule=_str(data, "schedule", d.schedule),
        start=_float(data, "start", d.start),
        end=_float(data, "end", d.end),
    )


def _loras(raw: Any, where: str) -> tuple[LoraRef, ...]:
    if raw is None or raw == "":
        return ()
    if isinstance(raw, str):
        return parse_lora_tags(raw)
    if not isinstance(raw, (list, tuple)):
        raise DeltaError(f"'loras'{where} must be a list of {{\"name\": ..., \"weight\": ...}} objects or "
                         f"'<lora:name:weight>' text, not {_typename(raw)}.")
    refs = []
    for i, item in enumerate(raw):
        if isinstance(item, str):
            refs.append(LoraRef(item))
            continue
        if not isinstance(item, Mapping):
            raise DeltaError(f"'loras[{i}]'{where} must be an object with 'name' and 'weight', not {_typename(item)}.")
        unknown = sorted(set(item) - _LORA_KEYS)
        if unknown:
            raise DeltaError(f"Unknown key(s) {', '.join(map(repr, unknown))} in 'loras[{i}]'{where}; allowed: "
                             f"{', '.join(sorted(_LORA_KEYS))}.")
        if "name" not in item:
            raise DeltaError(f"'loras[{i}]'{where} has no 'name': give the LoRA's name as /sdapi/v1/loras lists it.")
        refs.append(LoraRef(
            name=_str(item, "name", ""),
            weight=_float(item, "weight", 1.0),
            unet_weight=_float(item, "unet_weight", None),
            te_weight=_float(item, "te_weight", None),
        ))
    return tuple(refs)


def _check_group(g: AdaptationGroup, where: str) -> None:
    _choice("schedule", g.schedule, SCHEDULES, where)
    _in_range("strength", g.strength, STRENGTH_RANGE, where)
    _in_range("start", g.start, (0.0, 1.0), where)
    _in_range("end", g.end, (0.0, 1.0), where)
    if g.start > g.end:
        raise DeltaError(f"The window start ({_num(g.start)}) is after its end ({_num(g.end)}){where}: "
                         "start and end are fractions of the sampling progress with start <= end.")
    for r in g.loras:
        if not r.name.strip():
            raise DeltaError(f"A LoRA without a name{where}: give the name as /sdapi/v1/loras lists it.")
        for label, w in (("weight", r.weight), ("unet_weight", r.unet_weight), ("te_weight", r.te_weight)):
            if w is not None:
                _in_range(f"{label} of LoRA '{r.name}'", w, LORA_WEIGHT_RANGE, where)


def _group_to_infotext(g: AdaptationGroup) -> dict[str, str]:
    out: dict[str, str] = {}
    if g.loras:
        out["Delta LoRAs"] = format_lora_tags(g.loras)
    if g.checkpoint:
        out["Delta checkpoint"] = g.checkpoint
    if g.prompt:
        out["Delta prompt"] = g.prompt
    out["Delta lambda"] = _num(g.strength)
    if g.schedule != "constant":
        out["Delta schedule"] = g.schedule
    if (g.start, g.end) != (0.0, 1.0):
        out["Delta window"] = f"{_num(g.start)}-{_num(g.end)}"
    return out


def _group_from_infotext(p: Mapping[str, str]) -> AdaptationGroup:
    d = AdaptationGroup()
    start, end = d.start, d.end
    if "Delta window" in p:
        m = re.fullmatch(r"\s*([0-9.eE+-]+?)\s*-\s*([0-9.eE+]+)\s*", str(p["Delta window"]))
        if not m:
            raise DeltaError(f"Infotext field 'Delta window' should read 'start-end', got {p['Delta window']!r}.")
        start, end = _parse_float("Delta window", m.group(1)), _parse_float("Delta window", m.group(2))
    return AdaptationGroup(
        loras=parse_lora_tags(str(p.get("Delta LoRAs", ""))),
        checkpoint=str(p.get("Delta checkpoint", "")),
        prompt=str(p.get("Delta prompt", "")),
        strength=_parse_float("Delta lambda", p.get("Delta lambda", d.strength)),
        schedule=str(p.get("Delta schedule", d.schedule)),
        start=start,
        end=end,
    )


def _set_group0(s: DeltaSettings, **changes: Any) -> DeltaSettings:
    return replace(s, groups=(replace(s.groups[0], **changes), *s.groups[1:]))


def _override_float(key: str):
    def apply(s: DeltaSettings, v: Any) -> DeltaSettings:
        return _set_group0(s, **{key: _float({key: v}, key, 0.0)})
    return apply


def _override_lora_weight(s: DeltaSettings, v: Any) -> DeltaSettings:
    w = _float({"lora_weight": v}, "lora_weight", 1.0)
    loras = tuple(replace(r, weight=w, unet_weight=None, te_weight=None) for r in s.groups[0].loras)
    return _set_group0(s, loras=loras)


OVERRIDES = {
    "enabled": lambda s, v: replace(s, enabled=_coerce_bool(v, "enabled")),
    "source": lambda s, v: replace(s, source=str(v)),
    "strength": _override_float("strength"),
    "start": _override_float("start"),
    "end": _override_float("end"),
    "schedule": lambda s, v: _set_group0(s, schedule=str(v)),
    "lora_weight": _override_lora_weight,
    "mode": lambda s, v: replace(s, mode=str(v)),
    "cfg_mode": lambda s, v: replace(s, cfg_mode=str(v)),
}


def _choice(name: str, value: str, allowed: Sequence[str], where: str = "") -> None:
    if value not in allowed:
        raise DeltaError(f"Delta Sampling {name}{where} is {value!r}; allowed: {', '.join(allowed)}.")


def _in_range(name: str, value: float, bounds: tuple[float, float], where: str = "") -> None:
    lo, hi = bounds
    if not (math.isfinite(value) and lo <= value <= hi):
        raise DeltaError(f"Delta Sampling {name}{where} is {_num(value)}; it must lie between {_num(lo)} and "
                         f"{_num(hi)}.")


def _typename(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), f"a {type(v).__name__}")


def _bool(data: Mapping[str, Any], key: str, default: bool) -> bool:
    if key not in data or data[key] is None:
        return default
    return _coerce_bool(data[key], key)


def _coerce_bool(v: Any, key: str) -> bool:
    if isinstance(v, bool):
        return v
    raise DeltaError(f"Delta Sampling setting '{key}' must be true or false, not {_typename(v)} ({v!r}).")


def _str(data: Mapping[str, Any], key: str, default: Any) -> Any:
    if key not in data or data[key] is None:
        return default
    v = data[key]
    if not isinstance(v, str):
        raise DeltaError(f"Delta Sampling setting '{key}' must be a string, not {_typename(v)} ({v!r}).")
    return v


def _float(data: Mapping[str, Any], key: str, default: Any) -> Any:
    if key not in data or data[key] is None:
        return default
    v = data[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DeltaError(f"Delta Sampling setting '{key}' must be a number, not {_typename(v)} ({v!r}).")
    return float(v)


def _parse_float(key: str, v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        raise DeltaError(f"Infotext field '{key}' should be a number, got {v!r}.") from None


def _num(v: float) -> str:
    """Shortest exact text of a float (``1.0`` -> ``1``), so infotext stays compact and round-trips."""
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(float(v))


__all__ = [
    "CFG_MODES",
    "MODES",
    "OVERRIDES",
    "POSITIONAL_FIELDS",
    "SCHEDULES",
    "TRAJECTORIES",
    "AdaptationGroup",
    "DeltaSettings",
    "LoraRef",
    "format_lora_tags",
    "from_positional",
    "parse_lora_tags",
    "to_positional",
]
