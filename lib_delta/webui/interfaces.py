"""Where Delta Sampling meets the WebUI outside its own panel: the settings section and the X/Y/Z plot's axes.

AUTOMATIC1111 1.10 and Forge share every API used here (``shared.opts``, ``script_callbacks``, the grid's
``AxisOption``), so either host adapter may call :func:`register_interfaces`. The ``modules`` imports are lazy:
importing this module does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..args import DeltaSettings, entry_axes, from_positional, overrides_of
from ..errors import DeltaError
from ..fields import Bool, Checkpoint, Choice, Kind, Number, Setting, walk
from ..hosts.common.http import as_http_exception
from ..hosts.common.pool import (
    CACHE_POLICIES,
    SETTING_CACHE,
    SETTING_KEPT,
    SETTING_MAX_CHECKPOINTS,
    SETTING_MAX_LORAS,
    Limits,
)
from .panel import (
    PANEL_SETTING_DEFAULTS,
    SETTING_DEFAULT_STRENGTH,
    SETTING_PREVIEW,
    STRENGTH_SLIDER,
    TITLE,
    scope_saved_defaults,
)

SECTION = ("delta_sampling", TITLE)
SETTING_DEVICE = "delta_sampling_device"
SETTING_CUDA_GRAPH = "delta_sampling_cuda_graph"
_LIMITS = Limits()
SETTING_DEFAULTS: dict[str, Any] = {SETTING_CACHE: _LIMITS.cache, SETTING_KEPT: _LIMITS.kept,
                                    SETTING_MAX_CHECKPOINTS: _LIMITS.checkpoints, SETTING_MAX_LORAS: _LIMITS.loras,
                                    SETTING_DEVICE: "same", SETTING_CUDA_GRAPH: True, **PANEL_SETTING_DEFAULTS}

# The settings page's label and explanation of each option (user-visible: the localization template lists them).
SETTING_TEXTS: dict[str, tuple[str, str]] = {
    SETTING_CACHE: ("Source models between generations",
                   "gpu = keep them on the GPU (fastest, uses VRAM); ram = move them to system memory (default); "
                   "free = unload them (least memory, reloads each time)"),
    SETTING_KEPT: ("Source models kept between generations",
                   "besides the active model; each SD1.5 source costs about 2 GB (fp16), SDXL about 5 GB. The source "
                   "is kept first, then fine-tuned checkpoints; a model not used by the last generation is unloaded"),
    SETTING_MAX_CHECKPOINTS: ("Checkpoints per generation",
                   "the most different checkpoints (source and fine-tuned) one generation may load; a request over it "
                   "is refused before anything loads"),
    SETTING_MAX_LORAS: ("LoRAs per generation",
                   "the most LoRA entries one generation may list, all groups together"),
    SETTING_DEVICE: ("Device for the source model",
                   "same = the GPU the WebUI uses; cpu = slow but frees VRAM; cuda:N = a second GPU, run beside the "
                   "active model"),
    SETTING_CUDA_GRAPH: ("Replay the source model as a CUDA graph",
                   "much faster at 512-768 px, where each step waits on kernel launches; records at the start of each "
                   "pass and holds its activations while the generation runs; never under --lowvram/--medvram "
                   "(AUTOMATIC1111 only)"),
    SETTING_DEFAULT_STRENGTH: ("Default λ (strength)",
                   "the λ slider's starting value; applies after the UI is reloaded"),
    SETTING_PREVIEW: ("Preview strip on by default",
                   "show the source base, adapted source and result side by side; applies after the UI is reloaded"),
}

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def register_interfaces() -> None:
    """Settings now, X/Y/Z axes once every script is loaded, the panel's saved-default keys once both tabs are
    built. Safe to call again (UI reload, both tabs)."""
    from modules import script_callbacks

    add_settings()
    script_callbacks.on_before_ui(add_xyz_axes)
    script_callbacks.on_ui_tabs(scope_saved_defaults)


# --- settings --------------------------------------------------------------------------------------------------


def device_choices() -> list[str]:
    import torch

    return ["same", "cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def add_settings() -> None:
    """Register the options directly (not from on_ui_settings): generations and an API-only WebUI read them before,
    or without, the settings page being built."""
    import gradio as gr
    from modules import shared

    controls: dict[str, tuple[Any, ...]] = {
        SETTING_CACHE: (gr.Radio, {"choices": list(CACHE_POLICIES)}),
        SETTING_KEPT: (gr.Slider, {"minimum": 0, "maximum": 4, "step": 1}),
        SETTING_MAX_CHECKPOINTS: (gr.Slider, {"minimum": 1, "maximum": 8, "step": 1}),
        SETTING_MAX_LORAS: (gr.Slider, {"minimum": 1, "maximum": 64, "step": 1}),
        SETTING_DEVICE: (gr.Dropdown, lambda: {"choices": device_choices()}),
        SETTING_CUDA_GRAPH: (),
        SETTING_DEFAULT_STRENGTH: (gr.Slider, dict(zip(("minimum", "maximum", "step"), STRENGTH_SLIDER, strict=True))),
        SETTING_PREVIEW: (),
    }
    options = {key: shared.OptionInfo(SETTING_DEFAULTS[key], label, *controls[key]).info(info)
               for key, (label, info) in SETTING_TEXTS.items()}
    for key, info in shared.options_section(SECTION, options).items():
        shared.opts.add_option(key, info)


# --- X/Y/Z plot --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Axis:
    """One X/Y/Z axis: its label, the OVERRIDES key it sets, and how grid values become and are checked."""

    label: str
    key: str
    type: type
    convert: Callable[[Any], Any] = lambda x: x
    confirm: Callable[[Sequence[Any]], None] | None = None
    choices: Callable[[], list[str]] | None = None
    cost: float = 0.0

    def apply(self, p: Any, x: Any, xs: Any) -> None:
        # Grid cells are shallow copies of one p: give each its own dict, never update a shared one.
        p.delta_overrides = {**getattr(p, "delta_overrides", {}), self.key: self.convert(x)}


def _rejected(message: str) -> BaseException:
    """A grid value error, raised before the grid starts: a 422 with the message in both WebUIs' APIs (Forge's app
    answers only an HTTPException itself; any other exception drops the client's connection)."""
    return as_http_exception(DeltaError(message))


def _confirm_range(label: str, bounds: tuple[float, float]) -> Callable[[Sequence[float]], None]:
    lo, hi = bounds

    def confirm(xs: Sequence[float]) -> None:
        bad = [x for x in xs if not lo <= x <= hi]  # nan and inf too
        if bad:
            raise _rejected(f"{label}: {', '.join(map(str, bad))} out of range; values must lie between {lo} and "
                             f"{hi}.")

    return confirm


def _confirm_checkpoints(label: str) -> Callable[[Sequence[str]], None]:
    def confirm(xs: Sequence[str]) -> None:
        from ..hosts.common import names

        for x in xs:
            try:
                names.checkpoint(str(x), "source checkpoint", "the WebUI's")
            except DeltaError as e:
                raise _rejected(f"{label}: {e} (POST /sdapi/v1/refresh-checkpoints after adding files).") from None

    return confirm


def _confirm_choices(label: str, name: str, options: Sequence[str]) -> Callable[[Sequence[str]], None]:
    def confirm(xs: Sequence[str]) -> None:
        unknown = [x for x in xs if x not in options]
        if unknown:
            raise _rejected(f"{label}: unknown {name}(s) {', '.join(map(repr, unknown))}; allowed: "
                             f"{', '.join(options)}.")

    return confirm


def _to_bool(label: str) -> Callable[[Any], bool]:
    def convert(x: Any) -> bool:
        if isinstance(x, bool):
            return x
        text = str(x).strip().lower()
        if text in _TRUE or text in _FALSE:
            return text in _TRUE
        raise _rejected(f"{label}: {x!r} is not True or False.")

    return convert


def settings_of_grid(p: Any) -> DeltaSettings | None:
    """The settings a grid's request gives this extension before any axis applies, or None where there are none or
    they cannot be read (bad settings are the generation's to report)."""
    runner = getattr(p, "scripts", None)
    ours = next((s for s in getattr(runner, "alwayson_scripts", ()) if s.title() == TITLE), None)
    if ours is None or ours.args_from is None:
        return None
    try:
        return from_positional(p.script_args[ours.args_from:ours.args_to])
    except DeltaError:
        return None


def _confirm_entries(key: str) -> Callable[[Any], None]:
    """Before the grid starts: an axis over every LoRA or unit of the first group needs one there (a cell's error
    would not stop the grid: the WebUIs' X/Y/Z plot leaves the cell empty and goes on)."""

    def confirm(p: Any) -> None:
        settings = settings_of_grid(p)
        missing = settings.missing_entries(key) if settings is not None else None
        if missing is not None:
            raise _rejected(missing)

    return confirm


def _confirm_each(convert: Callable[[Any], Any]) -> Callable[[Sequence[Any]], None]:
    def confirm(xs: Sequence[Any]) -> None:
        for x in xs:
            convert(x)

    return confirm


def _checkpoint_tiles() -> list[str]:
    from modules import sd_models

    return sorted(sd_models.checkpoint_tiles(), key=str.casefold)


def _axis(s: Setting) -> Axis:
    """The grid's axis for a setting's declared one, from the kind of value it takes."""
    assert s.xyz is not None
    label, key = s.xyz.label, s.xyz.key or s.name
    kind: Kind = s.xyz.kind or s.kind
    if isinstance(kind, Number):
        return Axis(label, key, float, confirm=_confirm_range(label, (kind.lo, kind.hi)))
    if isinstance(kind, Bool):
        convert = _to_bool(label)
        return Axis(label, key, str, convert=convert, confirm=_confirm_each(convert), choices=lambda: ["True", "False"])
    if isinstance(kind, Checkpoint):
        # Costly to change (a model load), so the grid puts it in its outer loop.
        return Axis(label, key, str, confirm=_confirm_checkpoints(label), choices=_checkpoint_tiles, cost=0.8)
    if isinstance(kind, Choice):
        options = list(kind.options)
        return Axis(label, key, str, confirm=_confirm_choices(label, s.name, options), choices=lambda: options)
    return Axis(label, key, str)


def axes_of(cls: type = DeltaSettings) -> tuple[Axis, ...]:
    """The X/Y/Z axes the settings declare, in the grid's menu order."""
    declared = sorted((s for s in walk(cls) if s.xyz is not None), key=lambda s: s.xyz.at)  # type: ignore[union-attr]
    axes = tuple(_axis(s) for s in declared)
    assert all(a.key in overrides_of(cls) for a in axes)
    return axes


AXES: tuple[Axis, ...] = axes_of(DeltaSettings)


def find_xyz_module() -> Any | None:
    """The loaded X/Y/Z plot script's module (its scripts load under their file name)."""
    from modules import scripts

    return next((d.module for d in scripts.scripts_data if d.script_class.__module__ == "xyz_grid.py"), None)


def add_xyz_axes() -> None:
    """Append our axes to the grid's list; the grid copies that list when its UI is built, so run before_ui."""
    xyz = find_xyz_module()
    if xyz is None:
        return  # the X/Y/Z plot script is disabled
    present = {opt.label for opt in xyz.axis_options}
    for axis in AXES:
        if axis.label in present:
            continue
        xyz.axis_options.append(xyz.AxisOption(
            axis.label, axis.type, axis.apply, confirm=_grid_confirm(axis), choices=axis.choices, cost=axis.cost,
        ))


def _grid_confirm(axis: Axis) -> Callable[[Any, Sequence[Any]], None]:
    """The grid's ``confirm(p, values)``: the axis's values, then, for an axis over a list's entries, the list."""
    entries = _confirm_entries(axis.key) if axis.key in entry_axes(DeltaSettings) else None

    def confirm(p: Any, xs: Sequence[Any]) -> None:
        if axis.confirm is not None:
            axis.confirm(xs)
        if entries is not None:
            entries(p)

    return confirm


__all__ = [
    "AXES",
    "CACHE_POLICIES",
    "SETTING_CACHE",
    "SETTING_DEFAULTS",
    "SETTING_DEFAULT_STRENGTH",
    "SETTING_DEVICE",
    "SETTING_PREVIEW",
    "add_settings",
    "add_xyz_axes",
    "axes_of",
    "register_interfaces",
]
