"""ControlNet units for a group's adapted pass in AUTOMATIC1111, through the sd-webui-controlnet extension.

What the extension already does is reused: its model list (``global_state.cn_models``, exact names), its model
builder (``build_model_by_guess``, fed from the WebUI's safe reader, never the extension's own loader, which unpickles
``.pth`` files unsafely), its preprocessors and its hint resizing (``Script.detectmap_proc``). Its ``UnetHook`` is
not: that hooks ``p.sd_model`` and keeps global state; the residuals reach the adapted rows through our own hooks
(:mod:`.control_rows`). Nothing of the extension's state is written, so the user's own units keep working beside ours.

:func:`plan_units` checks a request before anything loads; :func:`load_units` builds the networks and runs the
preprocessors for the run; :class:`LoadedUnit` gives each forward its hint and scales.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...args import ControlNetUnit, DeltaSettings
from ...errors import DeltaError
from ...fields import group_where, num
from ..common import names as listed
from ..common.control import MAX_PIXELS, MAX_SIDE, control_family, decode_image  # noqa: F401 (this module's API)
from ..common.control import check_family as _check_family

EXTENSION = "sd-webui-controlnet"
# Preprocessors that need no downloaded model and act only on the image (no sampling-time hooks of their own).
SAFE_MODULES = ("none", "canny", "invert", "blur_gaussian", "scribble_xdog", "shuffle", "lineart_standard",
                "threshold", "tile_resample")
SOFT_IN_HIRES = ("canny", "mlsd")  # the extension weakens these in the hires pass (hook.py soft injection)


# --- reaching the extension ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Extension:
    """The extension's modules, as the WebUI loaded them (its folder on ``sys.path``)."""

    global_state: Any
    model_guess: Any
    preprocessor: Any  # the Preprocessor class
    external_code: Any


def extension() -> Extension:
    mods = [sys.modules.get(n) for n in ("scripts.global_state", "scripts.controlnet_model_guess",
                                         "scripts.supported_preprocessor", "internal_controlnet.external_code")]
    if any(m is None for m in mods) or not hasattr(mods[0], "cn_models"):  # another extension's "scripts.*"
        raise DeltaError(f"Delta Sampling ControlNet units need the {EXTENSION} extension, which is not installed "
                         "or not enabled: install it (Extensions tab) and restart, or remove 'controlnets' from the "
                         "request.")
    return Extension(mods[0], mods[1], mods[2].Preprocessor, mods[3])


def cn_script(ext: Extension, p: Any) -> Any:
    script = ext.external_code.find_cn_script(getattr(p, "scripts", None))
    if script is None:
        raise DeltaError(f"Delta Sampling ControlNet units need the {EXTENSION} script, which this generation does "
                         "not run: enable the extension (Extensions tab), or remove 'controlnets'.")
    return script


# --- checking a request ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnitPlan:
    """One unit, checked: its listed model and file, its decoded image, its preprocessor."""

    group: int
    unit: ControlNetUnit
    listed: str  # "name [hash]", as the extension lists it
    path: str
    image: np.ndarray  # HWC uint8 RGB
    preprocessor: Any


def plan_units(settings: DeltaSettings, p: Any, source_family: str | None, source_context: int | None,
               source_label: str) -> tuple[UnitPlan, ...]:
    """Every group's units checked (see the module doc); nothing is loaded. ``()`` when no group has one."""
    if not any(g.controlnets for g in settings.groups):
        return ()
    ext = extension()
    cn_script(ext, p)
    plans = []
    for i, g in enumerate(settings.groups):
        for k, unit in enumerate(g.controlnets, 1):
            where = f" (ControlNet unit {k}{group_where(i + 1, len(settings.groups))})"
            name, path = _resolve(ext, unit.model)
            _check_family(path, name, source_family, source_context, source_label)
            pre = _preprocessor(ext, unit.module, where)
            image = decode_image(unit.image, where) if unit.image else _init_image(p, unit, where)
            plans.append(UnitPlan(i, unit, name, path, image, pre))
    return tuple(plans)


def named_as_listed(settings: DeltaSettings, plans: Iterable[UnitPlan]) -> DeltaSettings:
    """The settings with each unit's model under the name the extension lists (``"name [hash]"``), so that the
    infotext and the log line carry the model's hash whatever name the request used."""
    from dataclasses import replace

    listed: dict[int, list[str]] = {}
    for plan in plans:
        listed.setdefault(plan.group, []).append(plan.listed)
    if not listed:
        return settings
    groups = tuple(replace(g, controlnets=tuple(replace(u, model=name) for u, name in
                                                zip(g.controlnets, listed[i], strict=True)))
                   if i in listed else g for i, g in enumerate(settings.groups))
    return replace(settings, groups=groups)


def _resolve(ext: Extension, name: str) -> tuple[str, str]:
    """The listed key and file of a ControlNet: the exact listed name, or the exact file stem (any case)."""
    return resolve_listed(ext, name, "ControlNet model", lambda key: True,
                          "after adding a file, refresh the ControlNet model list")


def resolve_listed(ext: Extension, name: str, what: str, kind: Callable[[str], bool], after: str) -> tuple[str, str]:
    """A model of the extension's list (ControlNets and IP-Adapters share it) by its exact listed name or file stem
    (any case), the list read again once for a file added since; unknown names get the closest listed of ``kind``."""
    gs = ext.global_state
    for attempt in range(2):
        key = name if gs.cn_models.get(name) else gs.cn_models_names.get(name.strip().lower())
        if key is not None and gs.cn_models.get(key):
            return key, str(gs.cn_models[key])
        if attempt == 0:
            gs.update_cn_models()
    listed_now = [k for k, v in gs.cn_models.items() if v]
    raise listed.unknown(f"Delta Sampling {what}", name, f"{EXTENSION}'s models",
                         [k for k in listed_now if kind(k)] or listed_now,
                         f"Use a name exactly as /controlnet/model_list shows it ({after}).")


def _preprocessor(ext: Extension, module: str, where: str) -> Any:
    pre = ext.preprocessor.get_preprocessor(module)
    if pre is None:
        raise listed.unknown(f"Delta Sampling preprocessor{where}", module, f"{EXTENSION}'s preprocessors",
                             [m for m in SAFE_MODULES if ext.preprocessor.get_preprocessor(m) is not None],
                             "Use 'none' for an image that is already a control map.")
    if pre.name not in SAFE_MODULES or not getattr(pre, "returns_image", True):
        raise DeltaError(f"Delta Sampling preprocessor '{module}'{where} is not supported: only preprocessors that "
                         f"need no downloaded model and act on the image alone are ({', '.join(SAFE_MODULES)}). "
                         "Preprocess the image with the ControlNet tab and send it with module 'none'.")
    return pre


def _init_image(p: Any, unit: ControlNetUnit, where: str) -> np.ndarray:
    images = getattr(p, "init_images", None)
    if images:  # img2img: the init image serves, as in the extension
        return np.ascontiguousarray(np.asarray(images[0].convert("RGB"), dtype=np.uint8))
    if unit.use_init_image:
        raise DeltaError(f"The ControlNet unit{where} asks for the init image, which txt2img has none of: give a "
                         "control image instead (untick 'Use the init image', or send 'image').")
    raise DeltaError(f"No control image was given{where}: send it as base64 PNG/JPEG in 'image' (the image is "
                     "never kept in infotext: after pasting parameters, give it again).")


# --- the loaded units --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LoadedUnit:
    """A unit's network and preprocessed map for one run; hints at each generation size, made on first use."""

    plan: UnitPlan
    net: torch.nn.Module  # the extension's cldm ControlNet
    detected: np.ndarray
    detectmap_proc: Any
    resize_mode: Any
    hints: dict[tuple[int, int, str], torch.Tensor] = field(default_factory=dict)

    def active(self, fraction: float) -> bool:
        """Inside the unit's guidance window, by the extension's rule (step / total steps)."""
        u = self.plan.unit
        return not (fraction < u.guidance_start or fraction > u.guidance_end)

    def hint(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        key = (height, width, str(device))
        if key not in self.hints:
            tensor, _ = self.detectmap_proc(self.detected, self.plan.unit.module, self.resize_mode, height, width)
            self.hints[key] = tensor.to(device)
        return self.hints[key]

    def scales(self, hires: bool) -> list[float]:
        """Balanced mode: every residual × weight; in the hires pass canny/mlsd maps are weakened towards the input
        blocks, as the extension does."""
        w = self.plan.unit.weight
        if hires and any(s in self.plan.unit.module for s in SOFT_IN_HIRES):
            return [w * 0.825 ** float(12 - i) for i in range(13)]
        return [w] * 13

    def shown_hint(self) -> np.ndarray:
        """The map as the ControlNet was given it (at the first generation size it ran at), or the preprocessed
        map when it never ran (a window the steps missed), as ``H×W×3`` uint8 for the preview strip."""
        from ...preview import hint_image

        return hint_image(next(iter(self.hints.values())) if self.hints else self.detected)

    def to(self, device: torch.device) -> None:
        self.net.to(device)

    def release(self) -> None:
        self.hints.clear()
        self.net = None  # type: ignore[assignment]


def load_units(plans: Iterable[UnitPlan], p: Any, unet_of: Any, device: torch.device) -> list[LoadedUnit]:
    """Build each unit's network through the WebUI's safe reader and the extension's builder, and run its
    preprocessor. ``unet_of(group)`` is the UNet the group runs on (read only for "difference" ControlNets)."""
    from modules import sd_models

    ext = extension()
    script = cn_script(ext, p)
    # the script file is loaded outside sys.modules: reach its module through the globals of its own function
    seed = type(script).detectmap_proc.__globals__.get("set_numpy_seed")
    nets: dict[str, torch.nn.Module] = {}
    units: list[LoadedUnit] = []
    try:
        for plan in plans:
            if plan.path not in nets:
                nets[plan.path] = _build(ext, plan, sd_models.read_state_dict(plan.path, map_location="cpu"),
                                         unet_of(plan.group)).to(device)
            if seed is not None:
                seed(p)  # preprocessors that draw random numbers (shuffle) draw them as the extension's units do
            pre = plan.preprocessor
            result = pre.cached_call(plan.image, resolution=pre.slider_resolution.value,
                                     slider_1=pre.slider_1.value, slider_2=pre.slider_2.value, low_vram=False,
                                     model=plan.listed)
            mode = ext.external_code.resize_mode_from_value(plan.unit.resize_mode)
            units.append(LoadedUnit(plan, nets[plan.path], result.value, type(script).detectmap_proc, mode))
    except BaseException:
        nets.clear()  # the traceback keeps this frame: it must not keep the networks
        units.clear()
        raise
    return units


def _build(ext: Extension, plan: UnitPlan, state_dict: Any, unet: Any) -> torch.nn.Module:
    if not isinstance(state_dict, dict) or not state_dict:
        raise DeltaError(f"The ControlNet '{plan.listed}' could not be read: the WebUI's safe loader refused it or it "
                         "is empty. Convert it to .safetensors.")
    try:
        built = ext.model_guess.build_model_by_guess(state_dict, unet, plan.path)
    except Exception as e:
        raise DeltaError(f"{EXTENSION} cannot build the ControlNet '{plan.listed}' ({type(e).__name__}: {e}).") from e
    if getattr(built.type, "name", str(built.type)) != "ControlNet":
        raise DeltaError(f"'{plan.listed}' is a {getattr(built.type, 'name', built.type)}, not a ControlNet: only "
                         "ControlNets (no T2I-Adapter, Control-LoRA, IP-Adapter or union models) run on the source.")
    return built.model.control_model.eval().requires_grad_(False)


def describe(units: Iterable[LoadedUnit]) -> str:
    """For the log line: each unit's model, module, weight and window."""
    return "; ".join(f"{u.plan.listed} ({u.plan.unit.module}, {num(u.plan.unit.weight)}, "
                     f"{num(u.plan.unit.guidance_start)}-{num(u.plan.unit.guidance_end)}"
                     f"{', the init image' if not u.plan.unit.image else ''})" for u in units)


def check_built(plan: UnitPlan, model: Any, label: str) -> None:
    """The family check against the built source (a pickled source has no header to read before)."""
    family = "sdxl" if getattr(model, "is_sdxl", False) else "sd2" if getattr(model, "is_sd2", False) else \
        "sd3" if getattr(model, "is_sd3", False) else "sd1"
    unet = model.model.diffusion_model
    to_k = next((m for n, m in unet.named_modules() if n.endswith("attn2.to_k")), None)
    _check_family(plan.path, plan.listed, family, getattr(to_k, "in_features", None), label)
