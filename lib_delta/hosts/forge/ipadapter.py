"""IP-Adapter units for a group's adapted pass in Forge 2 and Forge Neo, through Forge's built-in IP-Adapter.

Forge's own pieces are reused: the model list of its ControlNet extension (IP-Adapters are listed with the
ControlNets, exact names), its loader (``modules_forge.shared.try_load_supported_control_model`` →
``IPAdapterPatcher``), its IP-Adapter preprocessors (which name the CLIP-vision file in
``models/ControlNetPreprocessor``), its CLIP-vision loader (``backend.patcher.clipvision.load``, whose encoder the
memory manager loads to encode) and ``IPAdapterApply.apply_ipadapter``, which embeds the image, builds the adapter
and sets a ``CrossAttentionPatch`` per cross-attention on a clone of the patcher it is given. Ours is given the
private source's patcher; its ``attn2`` patches are taken off that clone and run, through :mod:`.ip_rows`, on the
rows of the group's adapted variant alone: base rows get the plain attention.

Loaded here, kept in :data:`POOL` across generations as the ControlNets are: the adapters' tensors and each encoder
(an encoder Forge's preprocessor already holds is shared, never freed by us). Built per run and released with it: the
adapter modules and image embeddings ``apply_ipadapter`` makes. Neo's ``apply_ipadapter`` is a classmethod that keeps
its last adapter on the class: that state is put back as it was after every call.

Nothing downloads during a request: the encoder's file must be where Forge's preprocessor looks, and a FaceID unit
needs insightface and its face model installed. Only safetensors files load (see :mod:`.control`).
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...args import DeltaSettings, IPAdapterUnit
from ...errors import DeltaError
from ...fields import group_where, num
from ..common import names as listed
from ..common.control import FAMILIES, check_face_model, decode_image, is_ipadapter
from ..common.files import checkpoint_family, safetensors_shapes
from ..common.pool import Limits, ModelPool, free_weights
from . import control as control_mod
from . import memory

EXTENSION = "Forge's built-in IP-Adapter (sd_forge_ipadapter)"
# Forge's IP-Adapter preprocessors (forge_ipadapter.py): the image encoder each runs and whether it needs a face model
ENCODERS = {"CLIP-ViT-H (IPAdapter)": False, "CLIP-ViT-bigG (IPAdapter)": False,
            "InsightFace+CLIP-H (IPAdapter)": True}
# sd-webui-controlnet's names of the same encoders (the unit's default, and what AUTOMATIC1111's infotext holds)
ALIASES = {"ip-adapter_clip_h": "CLIP-ViT-H (IPAdapter)", "ip-adapter_clip_sd15": "CLIP-ViT-H (IPAdapter)",
           "ip-adapter_clip_sdxl_plus_vith": "CLIP-ViT-H (IPAdapter)", "ip-adapter_clip_g": "CLIP-ViT-bigG (IPAdapter)",
           "ip-adapter_clip_sdxl": "CLIP-ViT-bigG (IPAdapter)", "ip-adapter_face_id": "InsightFace+CLIP-H (IPAdapter)",
           "ip-adapter_face_id_plus": "InsightFace+CLIP-H (IPAdapter)"}
IPADAPTER_HINT = ("IP-Adapters sit in the ControlNet models folder; use a name exactly as /controlnet/model_list "
                  "shows it (after adding a file, refresh the ControlNet model list).")
_CONTEXTS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_ENCODER_NAMES = {(1280, 1024): "ViT-H", (1664, 1280): "ViT-bigG", (1024, 768): "ViT-L"}
# Neo's apply_ipadapter keeps these on its class (IPAdapterPlus.py:557-733)
_CLASS_STATE = ("dtype", "device", "weight", "is_full", "is_portrait", "is_faceid", "is_plus", "is_instant_id",
                "is_sdxl", "ipadapter")


# --- reaching Forge's IP-Adapter ---------------------------------------------------------------------------------


def ip_module() -> Any:
    """``lib_ipadapter.IPAdapterPlus`` of Forge's built-in extension."""
    module = sys.modules.get("lib_ipadapter.IPAdapterPlus")
    if module is None or not hasattr(module, "IPAdapterApply"):
        raise DeltaError(f"Delta Sampling IP-Adapter units need {EXTENSION}, which is not enabled: enable it "
                         "(Extensions tab) and restart, or remove 'ipadapters' from the request.")
    return module


# --- what the files are, from their headers --------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterShape:
    """What an IP-Adapter's tensors say, by the rules of Forge's ``apply_ipadapter``."""

    context: int  # ip_adapter.1.to_k_ip.weight.shape[1]: 768 SD1, 2048 SDXL
    layers: int
    faceid: bool
    plus: bool
    reads: str | None  # "embeds" (the projected image embedding), "hidden" (penultimate hidden states), None (face)
    width: int | None  # the width it reads


def adapter_shape(shapes: dict[str, list[int]]) -> AdapterShape | None:
    proj = {k.removeprefix("image_proj."): v for k, v in shapes.items() if k.startswith("image_proj.")}
    ip = {k.removeprefix("ip_adapter."): v for k, v in shapes.items() if k.startswith("ip_adapter.")}
    if not ip or "1.to_k_ip.weight" not in ip:
        return None
    full = "proj.3.weight" in proj
    portrait = "proj.2.weight" in proj and not full and "0.to_q_lora.down.weight" not in ip
    faceid = portrait or "0.to_q_lora.down.weight" in ip
    plus = full or "latents" in proj or "perceiver_resampler.proj_in.weight" in proj
    reads, width = None, None
    if not faceid:
        if "proj_in.weight" in proj:  # the Plus resampler
            reads, width = "hidden", proj["proj_in.weight"][1]
        elif full and "proj.0.weight" in proj:  # the Full MLP
            reads, width = "hidden", proj["proj.0.weight"][1]
        elif "proj.weight" in proj:
            reads, width = "embeds", proj["proj.weight"][1]
    layers = sum(1 for k in ip if k.endswith("to_k_ip.weight"))
    return AdapterShape(int(ip["1.to_k_ip.weight"][1]), layers, faceid, plus, reads, width)


@dataclass(frozen=True)
class EncoderShape:
    hidden: int
    projection: int

    @property
    def name(self) -> str:
        return _ENCODER_NAMES.get((self.hidden, self.projection), f"a {self.hidden}-wide CLIP-vision encoder")


def encoder_shape(shapes: dict[str, list[int]]) -> EncoderShape | None:
    """A CLIP-vision encoder's widths, in the transformers layout or OpenCLIP's (both of which Forge loads)."""
    if "vision_model.embeddings.class_embedding" in shapes and "visual_projection.weight" in shapes:
        return EncoderShape(shapes["vision_model.embeddings.class_embedding"][0],
                            shapes["visual_projection.weight"][0])
    if "visual.class_embedding" in shapes and "visual.proj" in shapes:
        return EncoderShape(shapes["visual.class_embedding"][0], shapes["visual.proj"][1])
    return None


# --- checking a request, before anything loads ---------------------------------------------------------------------


@dataclass(frozen=True)
class IPPlan:
    group: int
    unit: IPAdapterUnit
    listed: str
    path: str
    key: tuple[str, str]
    shape: AdapterShape
    image: np.ndarray  # HWC uint8 RGB
    preprocessor: Any  # Forge's IP-Adapter preprocessor (PreprocessorClipVision)
    encoder_path: str
    encoder_key: tuple[str, str]


def plan_units(settings: DeltaSettings, p: Any, source_info: Any, source_label: str) -> tuple[IPPlan, ...]:
    """Every group's IP-Adapter units checked: listed safetensors adapter of the source's family, a listed encoder
    whose file is in place and fits the adapter, a face model where one is needed, a readable image (``()``: none)."""
    if not any(g.ipadapters for g in settings.groups):
        return ()
    fg = control_mod.forge()
    ip_module()
    family = checkpoint_family(source_info.filename)
    plans = []
    for i, g in enumerate(settings.groups):
        for k, unit in enumerate(g.ipadapters, 1):
            where = f" (IP-Adapter unit {k}{group_where(i + 1, len(settings.groups))})"
            name, path = control_mod.listed_model(fg, unit.model, "IP-Adapter", IPADAPTER_HINT, is_ipadapter)
            control_mod.check_file(path, f"IP-Adapter '{name}'")
            shape = adapter_shape(safetensors_shapes(path) or {})
            if shape is None:
                raise DeltaError(f"'{name}' is not an IP-Adapter (it has no ip_adapter.*.to_k_ip tensors): a "
                                 "ControlNet goes in 'controlnets'; for 'ipadapters' choose an IP-Adapter file.")
            check_family(shape, name, family, None, source_label)
            pre = _preprocessor(fg, unit.module, where)
            encoder = _encoder_file(pre, where)
            check_encoder(shape, name, pre, encoder)
            if ENCODERS[pre.name]:  # FaceID
                from modules_forge.shared import models_path

                check_face_model(models_path, pre.name, where, "Forge's ControlNet")
            image = decode_image(unit.image, where, "reference image") if unit.image else _init_image(p, where)
            plans.append(IPPlan(i, unit, name, path, control_mod.file_key(path), shape, image, pre, encoder,
                                control_mod.file_key(encoder)))
    return tuple(plans)


def check_family(shape: AdapterShape, name: str, source_family: str | None, source_context: int | None,
                 source_label: str) -> None:
    """The adapter against the source: its family from the header, or the built source's cross-attention width."""
    mine = FAMILIES.get(source_family or "")
    theirs = FAMILIES.get(_CONTEXTS.get(shape.context, ""))
    if (mine and theirs and mine != theirs) or (source_context is not None and shape.context != source_context) \
            or (source_family is not None and mine is None):
        raise DeltaError(f"The IP-Adapter '{name}' ({theirs or f'{shape.context}-wide context'}) is not made for the "
                         f"source '{source_label}' ({mine or source_family or f'{source_context}-wide context'}): "
                         "an IP-Adapter runs on the source, so choose one of the source's family (e.g. an SD1.5 "
                         "IP-Adapter on an SD1.5 source, whatever the active model).")


def _preprocessor(fg: control_mod.Forge, module: str, where: str) -> Any:
    wanted = ALIASES.get(module.strip().casefold(), module.strip())
    names = {n.casefold(): n for n in ENCODERS}
    pre = control_mod.preprocessor_named(fg, names.get(wanted.casefold(), wanted))
    usable = [n for n in ENCODERS if control_mod.preprocessor_named(fg, n) is not None]
    if pre is None:
        raise listed.unknown(f"Delta Sampling IP-Adapter encoder{where}", module, f"{EXTENSION}'s preprocessors",
                             usable, "Use 'CLIP-ViT-H (IPAdapter)' for the usual SD1.5 adapters.")
    if pre.name not in ENCODERS or not hasattr(pre, "filename"):
        raise DeltaError(f"'{module}'{where} is not an IP-Adapter image encoder; use one of {', '.join(usable)} "
                         "(the one the adapter was trained with).")
    return pre


def _encoder_file(pre: Any, where: str) -> str:
    """The encoder's file where Forge's preprocessor looks for it: present (a request never downloads) and sound."""
    from modules_forge.shared import preprocessor_dir

    path = os.path.join(preprocessor_dir, pre.filename)
    if not os.path.isfile(path):
        raise DeltaError(f"The image encoder '{pre.name}'{where} is not downloaded ({path} is missing): Delta "
                         "Sampling does not download models during a request. Run an IP-Adapter unit of Forge's "
                         "ControlNet once with this preprocessor (it downloads the file), or place it there.")
    control_mod.check_file(path, f"image encoder '{pre.name}'{where}")
    return path


def check_encoder(shape: AdapterShape, name: str, pre: Any, encoder_path: str) -> None:
    """The adapter against the chosen encoder: a FaceID adapter with the face encoder and no other, and the width
    the adapter reads from the encoder (from both headers)."""
    face = ENCODERS[pre.name]
    if shape.faceid != face:
        want = "the encoder 'InsightFace+CLIP-H (IPAdapter)'" if shape.faceid else "a CLIP-vision encoder " \
            "('CLIP-ViT-H (IPAdapter)' or 'CLIP-ViT-bigG (IPAdapter)')"
        raise DeltaError(f"The IP-Adapter '{name}' {'is a FaceID adapter and ' if shape.faceid else ''}needs {want}, "
                         f"not '{pre.name}'.")
    encoder = encoder_shape(safetensors_shapes(encoder_path) or {})
    if encoder is None:
        raise DeltaError(f"The image encoder file of '{pre.name}' ({os.path.basename(encoder_path)}) is not a "
                         "CLIP-vision model: download it again.")
    if shape.reads is None:
        return
    has = encoder.projection if shape.reads == "embeds" else encoder.hidden
    if has != shape.width:
        raise DeltaError(f"The IP-Adapter '{name}' reads a {shape.width}-wide image embedding, but '{pre.name}' is "
                         f"{encoder.name} ({has} wide): choose the encoder the adapter was trained with (ViT-H for "
                         "the SD1.5 adapters and the SDXL 'vit-h' ones, ViT-bigG for the other SDXL adapters).")


def _init_image(p: Any, where: str) -> np.ndarray:
    images = getattr(p, "init_images", None)
    if images:  # img2img: the init image serves, as in Forge's units
        return np.ascontiguousarray(np.asarray(images[0].convert("RGB"), dtype=np.uint8))
    raise DeltaError(f"No reference image was given{where}: send it as base64 PNG/JPEG in 'image' (the image is "
                     "never kept in infotext: after pasting parameters, give it again).")


def check_built(plans: Iterable[IPPlan], unet: Any, label: str) -> None:
    """The adapters against the built source (one whose header did not tell): its cross-attention width and count."""
    attn2 = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    width = getattr(getattr(attn2[0], "to_k", None), "in_features", None) if attn2 else None
    for plan in plans:
        check_family(plan.shape, plan.listed, None, width, label)
        if plan.shape.layers != len(attn2):
            raise DeltaError(f"The IP-Adapter '{plan.listed}' has {plan.shape.layers} cross-attention layers, the "
                             f"source '{label}' {len(attn2)}: it is made for another UNet layout.")


# --- the pool: adapters' tensors and encoders ------------------------------------------------------------------------


@dataclass(eq=False)
class Pooled:
    adapter: Any = None  # Forge's IPAdapterPatcher (its .ip_adapter: {"image_proj": ..., "ip_adapter": ...})
    encoder: Any = None  # backend.patcher.clipvision.ClipVisionModel
    shared: bool = False  # the encoder is Forge's preprocessor's own: never freed by us


def _release(entry: Pooled) -> None:
    """Free an encoder of ours now (out of Forge's loaded models first); one Forge's preprocessor holds stays."""
    if entry.encoder is not None and not entry.shared:
        memory.forget_module(entry.encoder.model, move_weights=False)
        vars(entry.encoder.model).pop("lora_loader", None)  # the patcher's cycle back to the module
        free_weights(entry.encoder.model)
    entry.adapter = entry.encoder = None


def _stash(entry: Pooled) -> None:
    """Out of the device between generations: the encoder leaves Forge's loaded models."""
    if entry.encoder is not None:
        memory.forget_module(entry.encoder.model, move_weights=True)



POOL: ModelPool[Pooled] = ModelPool(release=_release, stash=_stash)


def _load_adapter(plan: IPPlan) -> Pooled:
    from modules_forge.shared import try_load_supported_control_model

    try:
        patcher = try_load_supported_control_model(plan.path)
    except Exception as e:
        raise DeltaError(f"Forge cannot load the IP-Adapter '{plan.listed}' ({type(e).__name__}: {e}).") from e
    if not isinstance(getattr(patcher, "ip_adapter", None), dict):
        raise DeltaError(f"Forge does not load '{plan.listed}' as an IP-Adapter (a {type(patcher).__name__}).")
    return Pooled(adapter=patcher)


def _load_encoder(plan: IPPlan) -> Pooled:
    """The encoder Forge's preprocessor already holds (shared), or one loaded through Forge's loader for us alone."""
    from modules_forge.supported_preprocessor import PreprocessorClipVision

    shared = getattr(plan.preprocessor, "clipvision", None) or PreprocessorClipVision.global_cache.get(
        plan.encoder_path)
    if shared is not None:
        return Pooled(encoder=shared, shared=True)
    from backend.patcher import clipvision

    try:
        encoder = clipvision.load(plan.encoder_path)
    except Exception as e:
        known = isinstance(e, AttributeError) and "'device'" in str(e) and "no setter" in str(e)
        # Neo's ModelPatcher assigns `model.device`, read-only on every transformers model (no transformers version
        # helps); Neo's later builds skip the assignment when it fails
        hint = (" This Forge's model patcher assigns 'device' on the transformers model, a read-only property in "
                "every transformers version: Forge's own IP-Adapter units fail the same way. Update Forge Neo: "
                "later builds skip that assignment.") if known else ""
        raise DeltaError(f"Forge cannot load the image encoder '{plan.preprocessor.name}' ({type(e).__name__}: "
                         f"{e}).{hint}") from e
    if encoder is None:
        raise DeltaError(f"Forge does not recognise the image encoder file of '{plan.preprocessor.name}' as a "
                         "CLIP-vision model (ViT-H, ViT-bigG or ViT-L): download it again.")
    return Pooled(encoder=encoder)


def keys(plans: Iterable[IPPlan]) -> list[tuple[str, str]]:
    return list(dict.fromkeys(k for p in plans for k in (p.key, ("encoder", *p.encoder_key))))


# --- a run's units ------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class GroupPatches:
    """One group's image prompt on one private engine: Forge's ``CrossAttentionPatch`` per ``attn2`` key, each
    unit of the group stacked on it as Forge stacks units (``set_new_condition``)."""

    group: int
    plans: list[IPPlan]
    attn2: dict[Any, Any] = field(default_factory=dict)

    def modules(self) -> list[torch.nn.Module]:
        """The adapter modules ``apply_ipadapter`` built (one per unit, shared by its patches)."""
        return list({id(m): m for patch in self.attn2.values() for m in patch.ipadapters}.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules() for t in (*m.parameters(), *m.buffers())) \
            + sum(t.numel() * t.element_size() for patch in self.attn2.values() for ts in (patch.conds, patch.unconds)
                  for t in ts if isinstance(t, torch.Tensor))

    def release(self) -> None:
        for module in self.modules():
            free_weights(module)
        self.attn2.clear()


def load_group(plans: Sequence[IPPlan], unet: Any) -> GroupPatches:
    """The group's units applied by Forge's ``apply_ipadapter`` to clones of the private UNet patcher ``unet``, on
    its device: embeds each image (the encoder loaded by Forge's memory manager) and builds each adapter."""
    patches = GroupPatches(plans[0].group, list(plans))
    try:
        for plan in plans:
            adapter = POOL.get(plan.key, lambda plan=plan: _load_adapter(plan)).adapter
            encoder = POOL.get(("encoder", *plan.encoder_key), lambda plan=plan: _load_encoder(plan)).encoder
            _stack(patches.attn2, _apply(plan, adapter, encoder, unet))
        _place(patches, unet.load_device)
    except BaseException:
        patches.release()
        raise
    return patches


@torch.no_grad()  # as Forge applies its units (process_unit_before_every_sampling)
def _apply(plan: IPPlan, adapter: Any, encoder: Any, unet: Any) -> dict[Any, Any]:
    """``apply_ipadapter`` on a clone of ``unet`` with the preprocessor's conditioning (forge_ipadapter.py:21-30,
    the image as Forge's units hand it over); returns the clone's ``attn2`` patches. Neo's class state is restored."""
    from modules_forge.utils import numpy_to_pytorch

    cls = ip_module().IPAdapterApply
    saved = {k: vars(cls)[k] for k in _CLASS_STATE if k in vars(cls)}
    u = plan.unit
    cond = dict(clip_vision=encoder, image=numpy_to_pytorch(plan.image), weight_type="original", noise=0.0,
                embeds=None, unfold_batch=False)
    if ENCODERS[plan.preprocessor.name]:
        cond["insightface"] = plan.preprocessor.load_insightface()
    try:
        apply = cls.apply_ipadapter if isinstance(inspect.getattr_static(cls, "apply_ipadapter"), classmethod) \
            else cls().apply_ipadapter
        out = apply(ipadapter=adapter.ip_adapter, model=unet, weight=float(u.weight), start_at=float(u.guidance_start),
                    end_at=float(u.guidance_end), faceid_v2=bool(getattr(adapter, "faceid_v2", False)),
                    weight_v2=bool(getattr(adapter, "weight_v2", False)), attn_mask=None, **cond)
    except DeltaError:
        raise
    except Exception as e:
        raise DeltaError(f"Forge's IP-Adapter failed on '{plan.listed}' ({type(e).__name__}: {e}).") from e
    finally:
        for k in _CLASS_STATE:
            if k in saved:
                setattr(cls, k, saved[k])
            elif k in vars(cls):
                delattr(cls, k)
    work = out[0] if isinstance(out, tuple) else out
    return dict(work.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {}))


def _stack(into: dict[Any, Any], patches: dict[Any, Any]) -> None:
    """A further unit's patches onto the group's, through Forge's own ``set_new_condition`` (no clone of a patched
    patcher: its deep copy would duplicate every adapter and embedding)."""
    for key, patch in patches.items():
        if key not in into:
            into[key] = patch
            continue
        for i in range(len(patch.weights)):
            into[key].set_new_condition(weight=patch.weights[i], ipadapter=patch.ipadapters[i], number=patch.number,
                                        cond=patch.conds[i], uncond=patch.unconds[i], weight_type=patch.weight_type[i],
                                        mask=patch.masks[i], sigma_start=patch.sigma_start[i],
                                        sigma_end=patch.sigma_end[i], unfold_batch=patch.unfold_batch[i])


def _place(patches: GroupPatches, device: Any) -> None:
    """``apply_ipadapter`` builds on Forge's main device; a source on a GPU of its own needs them there."""
    device = torch.device(device)
    for module in patches.modules():
        module.to(device)
    for patch in patches.attn2.values():
        patch.conds = [c.to(device) for c in patch.conds]
        patch.unconds = [c.to(device) for c in patch.unconds]


def describe(groups: Iterable[GroupPatches]) -> str:
    """For the log line: each unit's model, encoder, weight and window."""
    return "; ".join(f"{p.listed} ({p.preprocessor.name}, {num(p.unit.weight)}, {num(p.unit.guidance_start)}-"
                     f"{num(p.unit.guidance_end)})" for g in groups for p in g.plans)


# --- the pool's life, beside the engines' ------------------------------------------------------------------------


def prepare(wanted: Sequence[Any]) -> None:
    control_mod._emptying_cache_of(POOL, lambda: POOL.prepare(wanted))


def settle(in_use: Sequence[Any]) -> None:
    """After a generation: keep all it used (an adapter and its encoder go together) unless the cache policy is
    "free"; release the rest."""
    from .models import limits

    kept = Limits(kept=len(in_use), cache=limits().cache)
    control_mod._emptying_cache_of(POOL, lambda: POOL.settle(in_use, kept))


def discard_fresh() -> None:
    control_mod._emptying_cache_of(POOL, POOL.discard_fresh)


def forget_all() -> None:
    control_mod._emptying_cache_of(POOL, POOL.clear)
