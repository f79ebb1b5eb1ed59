"""Where Delta Sampling meets the WebUI outside its own panel: the settings section and the X/Y/Z plot's axes.

AUTOMATIC1111 1.10 and Forge share every API used here (``shared.opts``, ``script_callbacks``, the grid's
``AxisOption``), so either host adapter may call :func:`register_interfaces`. The ``modules`` imports are lazy:
importing this module does nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..args import LORA_WEIGHT_RANGE, OVERRIDES, SCHEDULES, STRENGTH_RANGE
from ..errors import DeltaError
from ..hosts.common.pool import (
    CACHE_POLICIES,
    SETTING_CACHE,
    SETTING_KEPT,
    SETTING_MAX_CHECKPOINTS,
    SETTING_MAX_LORAS,
    Limits,
)
from .panel import PANEL_SETTING_DEFAULTS, SETTING_DEFAULT_STRENGTH, SETTING_PREVIEW, STRENGTH_SLIDER, TITLE

SECTION = ("delta_sampling", TITLE)
SETTING_DEVICE = "delta_sampling_device"
SETTING_CUDA_GRAPH = "delta_sampling_cuda_graph"
_LIMITS = Limits()
SETTING_DEFAULTS: dict[str, Any] = {SETTING_CACHE: _LIMITS.cache, SETTING_KEPT: _LIMITS.kept,
                                    SETTING_MAX_CHECKPOINTS: _LIMITS.checkpoints, SETTING_MAX_LORAS: _LIMITS.loras,
                                    SETTING_DEVICE: "same", SETTING_CUDA_GRAPH: True, **PANEL_SETTING_DEFAULTS}

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def register_interfaces() -> None:
    """Settings now, X/Y/Z axes once every script is loaded. Safe to call again (UI reload, both tabs)."""
    from modules import script_callbacks

    add_settings()
    script_callbacks.on_before_ui(add_xyz_axes)


# --- settings --------------------------------------------------------------------------------------------------


def device_choices() -> list[str]:
    import torch

    return ["same", "cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


def add_settings() -> None:
    """Register the options directly (not from on_ui_settings): generations and an API-only WebUI read them before,
    or without, the settings page being built."""
    import gradio as gr
    from modules import shared

    options = {
        SETTING_CACHE: shared.OptionInfo(
            SETTING_DEFAULTS[SETTING_CACHE], "Source models between generations", gr.Radio,
            {"choices": list(CACHE_POLICIES)},
        ).info("gpu = keep them on the GPU (fastest, uses VRAM); ram = move them to system memory (default); "
               "free = unload them (least memory, reloads each time)"),
        SETTING_KEPT: shared.OptionInfo(
            SETTING_DEFAULTS[SETTING_KEPT], "Source models kept between generations", gr.Slider,
            {"minimum": 0, "maximum": 4, "step": 1},
        ).info("besides the active model; each SD1.5 source costs about 2 GB (fp16), SDXL about 5 GB. The source "
               "is kept first, then fine-tuned checkpoints; a model not used by the last generation is unloaded"),
        SETTING_MAX_CHECKPOINTS: shared.OptionInfo(
            SETTING_DEFAULTS[SETTING_MAX_CHECKPOINTS], "Checkpoints per generation", gr.Slider,
            {"minimum": 1, "maximum": 8, "step": 1},
        ).info("the most different checkpoints (source and fine-tuned) one generation may load; a request over it "
               "is refused before anything loads"),
        SETTING_MAX_LORAS: shared.OptionInfo(
            SETTING_DEFAULTS[SETTING_MAX_LORAS], "LoRAs per generation", gr.Slider,
            {"minimum": 1, "maximum": 64, "step": 1},
        ).info("the most LoRA entries one generation may list, all groups together"),
        SETTING_DEVICE: shared.OptionInfo(
            SETTING_DEFAULTS[SETTING_DEVICE], "Device for the source model", gr.Dropdown,
            lambda: {"choices": device_choices()},
        ).info("same = the GPU the WebUI uses; cpu = slow but frees VRAM; cuda:N = a second GPU, run beside the "
               "active model"),
        SETTING_CUDA_GRAPH: shared.OptionInfo(
            SETTING_DEFAULTS[SETTING_CUDA_GRAPH], "Replay the source model as a CUDA graph",
        ).info("much faster at 512-768 px, where each step waits on kernel launches; records at the start of each "
               "pass and holds its activations while the generation runs; never under --lowvram/--medvram "
               "(AUTOMATIC1111 only)"),
        SETTING_DEFAULT_STRENGTH: shared.OptionInfo(
            SETTING_DEFAULTS[SETTING_DEFAULT_STRENGTH], "Default λ (strength)", gr.Slider,
            dict(zip(("minimum", "maximum", "step"), STRENGTH_SLIDER, strict=True)),
        ).info("the λ slider's starting value; applies after the UI is reloaded"),
        SETTING_PREVIEW: shared.OptionInfo(
            SETTING_DEFAULTS[SETTING_PREVIEW], "Preview strip on by default",
        ).info("show the source base, adapted source and result side by side; applies after the UI is reloaded"),
    }
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


def _rejected(message: str) -> DeltaError:
    """A grid value error; the WebUI's API handler answers with the status_code and detail it finds on it."""
    error = DeltaError(message)
    error.status_code, error.detail = 422, message  # type: ignore[attr-defined]
    return error


def _confirm_range(label: str, bounds: tuple[float, float]) -> Callable[[Sequence[float]], None]:
    lo, hi = bounds

    def confirm(xs: Sequence[float]) -> None:
        bad = [x for x in xs if not lo <= x <= hi]
        if bad:
            raise _rejected(f"{label}: {', '.join(map(str, bad))} out of range; values must lie between {lo} and "
                             f"{hi}.")

    return confirm


def _confirm_checkpoints(xs: Sequence[str]) -> None:
    from ..hosts.common import names

    for x in xs:
        try:
            names.checkpoint(str(x), "source checkpoint", "the WebUI's")
        except DeltaError as e:
            raise _rejected(f"[Delta] Source checkpoint: {e} (POST /sdapi/v1/refresh-checkpoints after adding "
                             "files).") from None


def _confirm_schedules(xs: Sequence[str]) -> None:
    unknown = [x for x in xs if x not in SCHEDULES]
    if unknown:
        raise _rejected(f"[Delta] Schedule: unknown schedule(s) {', '.join(map(repr, unknown))}; allowed: "
                         f"{', '.join(SCHEDULES)}.")


def _to_bool(x: Any) -> bool:
    if isinstance(x, bool):
        return x
    text = str(x).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise _rejected(f"[Delta] Enabled: {x!r} is not True or False.")


def _confirm_bools(xs: Sequence[Any]) -> None:
    for x in xs:
        _to_bool(x)


def _checkpoint_tiles() -> list[str]:
    from modules import sd_models

    return sorted(sd_models.checkpoint_tiles(), key=str.casefold)


AXES: tuple[Axis, ...] = (
    Axis("[Delta] Lambda", "strength", float, confirm=_confirm_range("[Delta] Lambda", STRENGTH_RANGE)),
    Axis("[Delta] Window start", "start", float, confirm=_confirm_range("[Delta] Window start", (0.0, 1.0))),
    Axis("[Delta] Window end", "end", float, confirm=_confirm_range("[Delta] Window end", (0.0, 1.0))),
    # Costly to change (a source model load), so the grid puts it in its outer loop.
    Axis("[Delta] Source checkpoint", "source", str, confirm=_confirm_checkpoints, choices=_checkpoint_tiles,
         cost=0.8),
    Axis("[Delta] LoRA weight", "lora_weight", float,
         confirm=_confirm_range("[Delta] LoRA weight", LORA_WEIGHT_RANGE)),
    Axis("[Delta] Schedule", "schedule", str, confirm=_confirm_schedules, choices=lambda: list(SCHEDULES)),
    Axis("[Delta] Enabled", "enabled", str, convert=_to_bool, confirm=_confirm_bools,
         choices=lambda: ["True", "False"]),
)
assert all(a.key in OVERRIDES for a in AXES)


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
        confirm = axis.confirm
        xyz.axis_options.append(xyz.AxisOption(
            axis.label, axis.type, axis.apply,
            confirm=None if confirm is None else (lambda p, xs, confirm=confirm: confirm(xs)),
            choices=axis.choices, cost=axis.cost,
        ))


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
    "register_interfaces",
]
