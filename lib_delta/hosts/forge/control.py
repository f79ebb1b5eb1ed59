"""ControlNet units for a group's adapted pass in Forge 2 and Forge Neo, through Forge's built-in ControlNet.

Forge's own pieces are reused: the model list of its ControlNet extension (``lib_controlnet.global_state``, exact
names), its loader (``modules_forge.shared.try_load_supported_control_model``), its preprocessors and hint fitting
(``crop_and_resize_image``, ``numpy_to_pytorch``), and its ``ControlNet`` object, which windows (by the source's own
sigmas, through ``pre_run``), computes, weights and merges the residuals exactly as for the user's units. Only where
they go differs: the unit's copy rides on every conditioning entry of the source's one batched call (entries batch only
with the same control object), and :func:`adapted_rows`, the call's ``controlnet_model_function_wrapper``, runs each
ControlNet on its group's adapted rows alone and gives every other row an exact zero: base rows get ``h += 0``.

The loaded models are kept in a pool of their own (:data:`POOL`, the engines' limits and cache policy), private to this
extension: Forge 2's user units load through the extension's own cache, and a module Forge Neo caches by path for the
user is taken from that cache (then never freed by us) or kept out of it.

Only safetensors files load: Forge 2 reads any other file with the plain unpickler (its ``safe_load`` finds no
``weights_only`` on its own wrapper of ``torch.load``), and Forge's wrapper of the safetensors reader renames a file it
fails to read to ``.corrupted``, so a damaged file is refused from its header first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...args import ControlNetUnit, DeltaSettings
from ...errors import DeltaError
from ...fields import group_where, num
from .. import is_neo
from ..common import names as listed
from ..common.control import check_family, decode_image
from ..common.files import checkpoint_family, safetensors_damage
from ..common.pool import ModelPool, free_weights
from . import memory
from .ip_rows import rows as variant_rows

# Preprocessors that need no downloaded model and act on the image alone (no hooks of their own at sampling time).
SAFE_MODULES = ("None", "canny", "invert (from white bg & black line)", "blur_gaussian",
                "lineart_standard (from white bg & black line)", "scribble_xdog", "shuffle", "t2ia_color_grid",
                "threshold", "tile_resample")
CONTROLLED_FAMILIES = ("sd1", "sd2", "sdxl")  # Forge's ControlNets are UNet ControlNets
# Forge's "soft" per-layer weights (scripts/controlnet.py:473-486), used for canny-like maps in the hires pass.
_SOFT = [0.09941396206337118, 0.12050177219802567, 0.14606275417942507, 0.17704576264172736, 0.214600924414215,
         0.26012233262329093, 0.3152997971191405, 0.3821815722656249, 0.4632503906249999, 0.561515625,
         0.6806249999999999, 0.825]
EXTENSION = "Forge's built-in ControlNet (sd_forge_controlnet)"
CONTROLNET_HINT = ("Use a name exactly as /controlnet/model_list shows it (after adding a file, refresh the ControlNet "
                   "model list).")


# --- reaching Forge's ControlNet ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Forge:
    global_state: Any  # lib_controlnet.global_state
    utils: Any  # lib_controlnet.utils
    external_code: Any  # lib_controlnet.external_code


def forge() -> Forge:
    names = ("lib_controlnet.global_state", "lib_controlnet.utils", "lib_controlnet.external_code")
    mods = [sys.modules.get(n) for n in names]
    if any(m is None for m in mods) or not hasattr(mods[0], "get_controlnet_filename"):
        raise DeltaError(f"Delta Sampling ControlNet units need {EXTENSION}, which is not enabled: enable it "
                         "(Extensions tab) and restart, or remove 'controlnets' from the request.")
    return Forge(*mods)


# --- checking a request, before anything loads ---------------------------------------------------------------------


@dataclass(frozen=True)
class UnitPlan:
    group: int
    unit: ControlNetUnit
    listed: str  # the name as Forge lists it
    path: str
    key: tuple[str, str]  # the pool key: file and its size/mtime
    image: np.ndarray  # HWC uint8 RGB
    preprocessor: Any
    resize_mode: Any  # Forge's ResizeMode of the image (p.resize_mode for img2img's init image)


def plan_units(settings: DeltaSettings, p: Any, source_info: Any, source_label: str) -> tuple[UnitPlan, ...]:
    """Every group's units checked: listed model, safetensors file of the source's family, supported preprocessor,
    readable image. ``()`` when no group has a unit."""
    if not any(g.controlnets for g in settings.groups):
        return ()
    fg = forge()
    family = checkpoint_family(source_info.filename)
    if family is not None and family not in CONTROLLED_FAMILIES:
        raise _not_controllable(family, source_label)
    plans = []
    for i, g in enumerate(settings.groups):
        for k, unit in enumerate(g.controlnets, 1):
            where = f" (ControlNet unit {k}{group_where(i + 1, len(settings.groups))})"
            name, path = listed_model(fg, unit.model, "ControlNet", CONTROLNET_HINT)
            check_file(path, f"ControlNet '{name}'")
            check_family(path, name, family, None, source_label)
            pre = _preprocessor(fg, unit.module, where)
            if unit.image:
                image, mode = decode_image(unit.image, where), fg.external_code.resize_mode_from_value(unit.resize_mode)
            else:
                image, mode = _init_image(fg, p, where)
            plans.append(UnitPlan(i, unit, name, path, file_key(path), image, pre, mode))
    return tuple(plans)


def _not_controllable(family: str, label: str) -> DeltaError:
    return DeltaError(f"ControlNet units run on SD1.x, SD2.x and SDXL sources; the source '{label}' is "
                      f"{family.upper()}. Use a source of those families, or remove 'controlnets'.")


def listed_model(fg: Forge, name: str, what: str, hint: str,
                 closest: Callable[[str], bool] = lambda _: True) -> tuple[str, str]:
    """The name and file of a model in Forge's ControlNet list (ControlNets and IP-Adapters both): the exact name it
    lists (after one refresh), never a path. An unknown name is refused with the ``closest`` listed names."""
    gs = fg.global_state
    for attempt in range(2):
        models = {k: v for k, v in gs.controlnet_filename_dict.items() if k != "None" and v}
        if name in models:
            return name, str(models[name])
        if attempt == 0:
            gs.update_controlnet_filenames()  # a file added since the list was read
    shown = [k for k in models if closest(k)] or list(models)
    raise listed.unknown(f"Delta Sampling {what} model", name, "Forge's ControlNet models", shown, hint)


def check_file(path: str, what: str) -> None:
    """A file one of Forge's loaders will read: there, safetensors (Forge would unpickle any other), not damaged."""
    if not os.path.isfile(path):
        raise DeltaError(f"The {what} is listed but its file is gone: refresh the ControlNet model list.")
    if os.path.splitext(path)[1].lower() != ".safetensors":
        raise DeltaError(f"The {what} is not a .safetensors file; Forge would unpickle it, which can run code "
                         "hidden in it, so Delta Sampling loads no pickled file: convert it to .safetensors.")
    damage = safetensors_damage(path)
    if damage:
        raise DeltaError(f"The {what} is damaged or truncated ({damage}): download it again.")


def file_key(path: str) -> tuple[str, str]:
    """A pool key that changes when the file is replaced."""
    st = os.stat(path)
    return os.path.abspath(path), f"{st.st_size:x}-{int(st.st_mtime_ns):x}"


def preprocessor_named(fg: Forge, name: str) -> Any:
    """Forge's preprocessor of that name, or None (Neo's ``get_preprocessor`` raises a KeyError for an unknown one)."""
    try:
        return fg.global_state.get_preprocessor(name)
    except KeyError:
        return None


def _preprocessor(fg: Forge, module: str, where: str) -> Any:
    names = {n.casefold(): n for n in SAFE_MODULES}
    pre = preprocessor_named(fg, names.get(module.strip().casefold(), module))
    if pre is None:
        raise listed.unknown(f"Delta Sampling preprocessor{where}", module, "Forge's preprocessors",
                             [m for m in SAFE_MODULES if preprocessor_named(fg, m) is not None],
                             "Use 'none' for an image that is already a control map.")
    from modules_forge.supported_preprocessor import Preprocessor

    hooks = ("process_before_every_sampling", "process_after_running_preprocessors", "process_after_every_sampling")
    if pre.name not in SAFE_MODULES or any(getattr(type(pre), h) is not getattr(Preprocessor, h) for h in hooks):
        raise DeltaError(f"Delta Sampling preprocessor '{module}'{where} is not supported: only preprocessors that "
                         f"need no downloaded model and act on the image alone are ({', '.join(SAFE_MODULES)}). "
                         "Preprocess the image with the ControlNet unit's preview and send it with module 'none'.")
    return pre


def _init_image(fg: Forge, p: Any, where: str) -> tuple[np.ndarray, Any]:
    images = getattr(p, "init_images", None)
    if images:  # img2img: the init image serves, fitted with the img2img resize mode, as Forge's units do
        image = np.ascontiguousarray(np.asarray(images[0].convert("RGB"), dtype=np.uint8))
        return image, fg.external_code.resize_mode_from_value(getattr(p, "resize_mode", 0))
    raise DeltaError(f"No control image was given{where}: send it as base64 PNG/JPEG in 'image' (the image is "
                     "never kept in infotext: after pasting parameters, give it again).")


def check_built(plans: Iterable[UnitPlan], engine_family: str, unet: Any, label: str) -> None:
    """The family check against the built source (a source whose header did not tell)."""
    if engine_family not in CONTROLLED_FAMILIES:
        raise _not_controllable(engine_family, label)
    to_k = next((m for n, m in unet.named_modules() if n.endswith("attn2.to_k")), None)
    for plan in plans:
        check_family(plan.path, plan.listed, engine_family, getattr(to_k, "in_features", None), label)


# --- the pool ---------------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class PooledControl:
    patcher: Any  # Forge's ControlNetPatcher; its .model_patcher is the ControlNet we copy per run
    shared: bool  # Neo: the module is in Neo's own cache, the user's units use it too: never freed by us

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model_patcher.control_model


def _release(entry: PooledControl) -> None:
    """Free a ControlNet now, whatever still refers to it (Forge 2's patcher leaves a ``lora_loader`` cycle on the
    module, as on the engines': see :mod:`.models`); one Neo shares with the user's units is only let go."""
    memory.forget_module(entry.module, move_weights=False)
    if not entry.shared:
        vars(entry.module).pop("lora_loader", None)
        free_weights(entry.module)


def _stash(entry: PooledControl) -> None:
    """Out of the device between generations. Neo's ``cleanup`` drops the network from its list without moving it,
    so it is moved here too."""
    memory.forget_module(entry.module, move_weights=True)
    entry.module.to(entry.patcher.model_patcher.control_model_wrapped.offload_device)



POOL: ModelPool[PooledControl] = ModelPool(release=_release, stash=_stash)


def _load(plan: UnitPlan) -> PooledControl:
    from modules_forge.shared import try_load_supported_control_model

    cache = _neo_cache()
    before = cache is not None and plan.path in cache.cache
    try:
        patcher = try_load_supported_control_model(plan.path)
    except Exception as e:
        raise DeltaError(f"Forge cannot load the ControlNet '{plan.listed}' ({type(e).__name__}: {e}).") from e
    from backend.patcher.controlnet import ControlLora, ControlNet

    net = getattr(patcher, "model_patcher", None)
    if net is None:
        raise DeltaError(f"Forge does not recognise '{plan.listed}' as a control model it can load.")
    if not isinstance(net, ControlNet) or isinstance(net, ControlLora):
        raise DeltaError(f"'{plan.listed}' is not a ControlNet Forge loads as one (a {type(net).__name__}): only "
                         "ControlNets (no T2I-Adapter, Control-LoRA or IP-Adapter) run on the source.")
    if cache is not None and not before:
        cache.cache.pop(plan.path, None)  # ours alone: the pool frees it, Neo's cache must not keep it alive
    net.control_model.eval().requires_grad_(False)
    return PooledControl(patcher, shared=before)


def _neo_cache() -> Any:
    """Neo keeps each ControlNet module in a cache by path, shared with the user's units (None on Forge 2)."""
    if not is_neo():
        return None
    module = sys.modules.get("modules_forge.supported_controlnet")
    return getattr(module, "_CONTROL_MODEL_CACHE", None)


def keys(plans: Iterable[UnitPlan]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(p.key for p in plans))


# --- a run's units ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LoadedUnit:
    """One unit for one run: its own copy of the pooled ControlNet (copies share the weights and keep hint, strength
    and window apart) and its preprocessed map; hints at each pass's size, made on first use."""

    plan: UnitPlan
    cnet: Any  # backend.patcher.controlnet.ControlNet, our copy
    detected: np.ndarray  # the preprocessor's output (HWC uint8)
    soft_in_hires: bool  # the preprocessor asks for soft weights in the hires pass (canny)
    hints: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def hint(self, fg: Forge, height: int, width: int) -> torch.Tensor:
        from modules_forge.utils import numpy_to_pytorch

        if (height, width) not in self.hints:
            fitted = fg.utils.crop_and_resize_image(self.detected, self.plan.resize_mode, height, width)
            self.hints[(height, width)] = numpy_to_pytorch(fitted).movedim(-1, 1)
        return self.hints[(height, width)]

    def shown_hint(self) -> np.ndarray:
        """The map as the ControlNet was given it (at the first pass's size), or the preprocessed map when no pass
        asked for it, as ``H×W×3`` uint8 for the preview strip."""
        from ...preview import hint_image

        return hint_image(next(iter(self.hints.values())) if self.hints else self.detected)

    def release(self) -> None:
        self.hints.clear()
        self.cnet.cleanup()
        self.cnet.previous_controlnet = None
        self.cnet = None


def load_units(plans: Sequence[UnitPlan], p: Any, device: Any) -> list[LoadedUnit]:
    """Each unit's ControlNet from the pool (loaded on first use) as a private copy on the source's device, and
    its image through its preprocessor as Forge's units run it (numpy seed, default resolution and thresholds)."""
    fg = forge()
    units: list[LoadedUnit] = []
    try:
        for plan in plans:
            pooled = POOL.get(plan.key, lambda plan=plan: _load(plan))
            cnet = pooled.patcher.model_patcher.copy()
            # every copy loads through the pooled network's one patcher: Forge's list of loaded models may keep it
            # after the run (Neo reports an entry whose patcher died as a leak)
            cnet.control_model_wrapped = pooled.patcher.model_patcher.control_model_wrapped
            cnet.load_device = cnet.control_model_wrapped.load_device = cnet.device = device
            pre = plan.preprocessor
            fg.utils.set_numpy_seed(p)  # shuffle draws random numbers, as the user's units do
            detected = pre(input_image=plan.image, input_mask=None,
                           resolution=int(pre.slider_resolution.gradio_update_kwargs.get("value", 512)),
                           slider_1=int(pre.slider_1.gradio_update_kwargs.get("value", 1.0)),
                           slider_2=int(pre.slider_2.gradio_update_kwargs.get("value", 1.0)))
            if not fg.utils.judge_image_type(detected):
                raise DeltaError(f"The preprocessor '{pre.name}' did not return an image for '{plan.listed}'.")
            units.append(LoadedUnit(plan, cnet, detected, bool(getattr(pre, "use_soft_projection_in_hr_fix", False))))
    except BaseException:
        units.clear()  # the traceback keeps this frame: it must not keep the copies
        raise
    return units


def chain(units: Sequence[LoadedUnit]) -> Any:
    """The units of one private engine as Forge chains ControlNets (``previous_controlnet``); returns the head."""
    head = None
    for unit in units:
        unit.cnet.set_previous_controlnet(head)
        head = unit.cnet
    return head


def begin_pass(units: Sequence[LoadedUnit], head: Any, predictor_model: Any, p: Any, xl: bool) -> None:
    """Set each unit up for the coming pass: the hint at the pass's size, weight and window, the soft weights Forge
    uses for canny-like maps in the hires pass, and the window in the source's own sigmas (``pre_run``)."""
    fg = forge()
    hr = bool(getattr(p, "is_hr_pass", False))
    height, width = _pass_size(fg, p, hr)
    for unit in units:
        u = unit.plan.unit
        unit.cnet.cleanup()
        unit.cnet.set_cond_hint(unit.hint(fg, height, width), float(u.weight), (float(u.guidance_start),
                                                                                 float(u.guidance_end)))
        soft = {"input": list(_SOFT), "middle": [0.561515625] if xl else [1.0], "output": list(_SOFT)}
        weighting = soft if hr and unit.soft_in_hires else None
        unit.cnet.positive_advanced_weighting = unit.cnet.negative_advanced_weighting = weighting
        unit.cnet.advanced_frame_weighting = unit.cnet.advanced_sigma_weighting = None
        unit.cnet.advanced_mask_weighting = None
    head.pre_run(predictor_model, lambda percent: predictor_model.predictor.percent_to_sigma(percent))


def _pass_size(fg: Forge, p: Any, hr: bool) -> tuple[int, int]:
    """The hint's size: the generation's, aligned to the latent (``get_target_dimensions``)."""
    align = fg.utils.align_dim_latent
    if not hr:
        return align(p.height), align(p.width)
    if getattr(p, "hr_resize_x", 0) == 0 and getattr(p, "hr_resize_y", 0) == 0:
        return align(int(p.height * p.hr_scale)), align(int(p.width * p.hr_scale))
    return align(p.hr_resize_y), align(p.hr_resize_x)


def adapted_rows(owners: dict[int, list[int]], batch: int):
    """A ``controlnet_model_function_wrapper`` for one batched source call: the ControlNet ``model`` runs on the rows
    of the variants at ``owners[id(model)]`` (positions in the call's variant order, ``batch`` rows each, repeated in
    every cond/uncond chunk) and every other row gets exact zeros; None when none of its rows is in the call."""

    def wrapper(*, x, hint, timesteps, context, y, model, inner_model, **kwargs):
        positions = owners.get(id(model))
        if not positions:
            return None
        chunks = len(model.transformer_options["cond_or_uncond"])
        per = x.shape[0] // chunks
        idx = variant_rows(positions, chunks, per, batch, x.device)
        h = hint.to(x.device)
        h = h[idx] if h.shape[0] == x.shape[0] else h.repeat(len(idx), 1, 1, 1)  # one map, as Forge broadcasts it
        outs = inner_model(x=x[idx], hint=h, timesteps=timesteps[idx], context=context[idx],
                           y=None if y is None else y[idx], **kwargs)
        full = []
        for o in outs:
            z = o.new_zeros((x.shape[0], *o.shape[1:]))
            z[idx] = o
            full.append(z)
        return full

    return wrapper


def describe(units: Iterable[LoadedUnit]) -> str:
    """For the log line: each unit's model, module, weight and window."""
    return "; ".join(f"{u.plan.listed} ({u.plan.preprocessor.name}, {num(u.plan.unit.weight)}, "
                     f"{num(u.plan.unit.guidance_start)}-{num(u.plan.unit.guidance_end)})" for u in units)


# --- the pool's life, beside the engines' ------------------------------------------------------------------------


def prepare(wanted: Sequence[tuple[str, str]]) -> None:
    """A generation starts: release every ControlNet it does not name, before anything new loads."""
    _emptying_cache(lambda: POOL.prepare(wanted))


def settle(in_use: Sequence[tuple[str, str]]) -> None:
    """After a generation (or a failed start): keep what the pool's limits allow, as the engines' pool does."""
    from .models import limits

    _emptying_cache(lambda: POOL.settle(in_use, limits()))


def discard_fresh() -> None:
    _emptying_cache(POOL.discard_fresh)


def forget_all() -> None:
    _emptying_cache(POOL.clear)


def _emptying_cache(change: Any) -> None:
    _emptying_cache_of(POOL, change)


def _emptying_cache_of(pool: ModelPool, change: Any) -> None:
    """``change`` the pool, then give the freed memory back to the device if it held anything."""
    had = set(pool.keys())
    change()
    if had:
        from backend import memory_management

        memory_management.soft_empty_cache()
