"""IP-Adapter units for a group's adapted pass in AUTOMATIC1111, through the sd-webui-controlnet extension.

Reused from the extension: its model list (IP-Adapters are listed with the ControlNets, exact names), its builder
(``build_model_by_guess`` → ``IPAdapterModel``, fed from the WebUI's safe reader), its image encoders (the
``ip-adapter_clip_*`` / ``ip-adapter_face_id*`` preprocessors and their CLIP-vision files) and
``IPAdapterModel.get_image_emb``. Not reused: ``PlugableIPAdapter.hook`` and ``clear_all_ip_adapter``, which keep
the hooked model in module globals (``current_model``, ``all_hacks``) that the user's own IP-Adapter on the active
model reads and that the extension clears at every generation; and the extension's ``to_kvs`` cache, which keeps
the first batch layout it saw. The image-prompt attention reaches the adapted rows through our own hooks
(:mod:`.ip_rows`); nothing of the extension's state is written, and an encoder we loaded is unloaded again.

:func:`plan_units` checks a request before anything loads (a pickled adapter is checked once read, before it is
built); :func:`load_units` builds the adapters (kept in :data:`POOL` across generations while named) and embeds
each image; :class:`LoadedIPUnit` gives each attention layer its image-prompt keys and values.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ...args import DeltaSettings, IPAdapterUnit
from ...errors import DeltaError
from ...fields import group_where, num
from ..common import names as listed
from ..common.control import FAMILIES, check_face_model, is_ipadapter
from ..common.files import safetensors_shapes
from ..common.pool import Limits, ModelPool, free_weights
from . import control as control_mod
from .control import EXTENSION

# The extension's IP-Adapter preprocessors (by name; their labels resolve too): the CLIP-vision file each loads
# (annotator models folder, clip_vision/<config>.pth) and the encoder it is, as the adapter's shapes name it.
ENCODERS = {
    "ip-adapter_clip_sd15": ("clip_h", "ViT-H"),  # label ip-adapter_clip_h
    "ip-adapter_clip_sdxl_plus_vith": ("clip_h", "ViT-H"),
    "ip-adapter_clip_sdxl": ("clip_g", "ViT-bigG"),  # label ip-adapter_clip_g
    "ip-adapter_face_id_plus": ("clip_h", "ViT-H"),
    "ip-adapter_face_id": (None, None),  # face embedding only
}
FACE_MODULES = ("ip-adapter_face_id", "ip-adapter_face_id_plus")
# The image projection's input width names the encoder: a plain adapter projects the pooled, projected embedding
# (ViT-H 1024, ViT-bigG 1280); Plus (resampler) and Full (MLP) ones read the penultimate hidden states (1280, 1664).
_WIDTHS = {"proj.weight": {1024: "ViT-H", 1280: "ViT-bigG"},
           "proj_in.weight": {1280: "ViT-H", 1664: "ViT-bigG"}, "proj.0.weight": {1280: "ViT-H", 1664: "ViT-bigG"}}
_CONTEXTS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}


# --- what an adapter file is -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterShape:
    """What an IP-Adapter's tensors say: its cross-attention width, layer count, encoder and kind."""

    context: int | None
    layers: int
    encoder: str | None  # "ViT-H", "ViT-bigG", None (FaceID: a face embedding)
    faceid: bool
    plus: bool


def _split(shapes: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """``(image_proj, ip_adapter)`` shapes of a flat (safetensors) or nested (``.bin``) state dict."""
    if "image_proj" in shapes and "ip_adapter" in shapes:
        return dict(shapes["image_proj"]), dict(shapes["ip_adapter"])
    proj = {k.removeprefix("image_proj."): v for k, v in shapes.items() if k.startswith("image_proj.")}
    ip = {k.removeprefix("ip_adapter."): v for k, v in shapes.items() if k.startswith("ip_adapter.")}
    return (proj, ip) if proj and ip else None


def adapter_shape(shapes: dict[str, Any], filename: str) -> AdapterShape | None:
    """The adapter's shape from its tensor shapes (lists or tensors), by the extension's rules
    (``IPAdapterModel.load``: FaceID by file name, Plus by its resampler or MLP); None when it is no IP-Adapter."""
    parts = _split(shapes)
    if parts is None:
        return None
    proj, ip = parts
    shape = {k: list(getattr(v, "shape", v)) for k, v in proj.items()}
    to_k = ip.get("1.to_k_ip.weight")
    context = int(list(getattr(to_k, "shape", to_k))[1]) if to_k is not None else None
    faceid = "faceid" in os.path.basename(filename).lower()
    plus = "proj.3.weight" in shape or "latents" in shape or "perceiver_resampler.proj_in.weight" in shape
    key = next((k for k in _WIDTHS if k in shape), None)
    encoder = "ViT-H" if faceid and plus else None if faceid or key is None else _WIDTHS[key].get(shape[key][1])
    return AdapterShape(context, sum(1 for k in ip if k.endswith("to_k_ip.weight")), encoder, faceid, plus)


# --- checking a request ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IPPlan:
    """One unit, checked: its listed model and file, its decoded image, its encoder (preprocessor)."""

    group: int
    unit: IPAdapterUnit
    listed: str
    path: str
    image: np.ndarray  # HWC uint8 RGB
    preprocessor: Any
    config: str | None  # the CLIP-vision file's config ("clip_h"), None for FaceID's face embedding


def plan_units(settings: DeltaSettings, p: Any, source_family: str | None, source_context: int | None,
               source_label: str) -> tuple[IPPlan, ...]:
    """Every group's IP-Adapter units checked (see the module doc); nothing is loaded. ``()`` when none."""
    if not any(g.ipadapters for g in settings.groups):
        return ()
    ext = _extension()
    control_mod.cn_script(ext, p)
    plans = []
    for i, g in enumerate(settings.groups):
        for k, unit in enumerate(g.ipadapters, 1):
            where = f" (IP-Adapter unit {k}{group_where(i + 1, len(settings.groups))})"
            name, path = _resolve(ext, unit.model)
            pre = _preprocessor(ext, unit.module, where)
            shapes = safetensors_shapes(path)
            shape = adapter_shape(shapes or {}, path)
            if shapes and shape is None:
                raise _not_an_adapter(name)
            if shape is not None:  # a pickle is checked once read, before it is built
                check_shape(shape, name, pre, source_family, source_context, source_label)
            config = ENCODERS[pre.name][0]
            _check_encoder_file(config, pre, where)
            image = control_mod.decode_image(unit.image, where, "reference image") if unit.image else \
                _init_image(p, where)
            plans.append(IPPlan(i, unit, name, path, image, pre, config))
    return tuple(plans)


def _not_an_adapter(name: str) -> DeltaError:
    return DeltaError(f"'{name}' is not an IP-Adapter (it has no image_proj/ip_adapter tensors): a ControlNet goes in "
                      "'controlnets'; for 'ipadapters' choose an IP-Adapter file.")


def _extension() -> control_mod.Extension:
    try:
        return control_mod.extension()
    except DeltaError:
        raise DeltaError(f"Delta Sampling IP-Adapter units need the {EXTENSION} extension, which is not installed or "
                         "not enabled: install it (Extensions tab) and restart, or remove 'ipadapters' from the "
                         "request.") from None


def _resolve(ext: control_mod.Extension, name: str) -> tuple[str, str]:
    return control_mod.resolve_listed(ext, name, "IP-Adapter model", is_ipadapter,
                                      "IP-Adapters sit in the ControlNet models folder; after adding a file, "
                                      "refresh the list")


def _preprocessor(ext: control_mod.Extension, module: str, where: str) -> Any:
    pre = ext.preprocessor.get_preprocessor(module)
    if pre is None or pre.name not in ENCODERS:
        usable = [getattr(p, "label", n) for n in ENCODERS if (p := ext.preprocessor.get_preprocessor(n))]
        if pre is None:
            raise listed.unknown(f"Delta Sampling IP-Adapter encoder{where}", module, f"{EXTENSION}'s IP-Adapter "
                                 "preprocessors", usable, "Use 'ip-adapter_clip_h' for the usual SD1.5 adapters.")
        raise DeltaError(f"'{module}'{where} is not an IP-Adapter image encoder; use one of {', '.join(usable)} "
                         "(the one the adapter was trained with).")
    return pre


def check_shape(shape: AdapterShape, name: str, pre: Any, source_family: str | None, source_context: int | None,
                source_label: str) -> None:
    """The adapter against the source (its cross-attention width) and against the chosen encoder."""
    label = getattr(pre, "label", pre.name)
    if "instant_id" in name.lower() or "pulid" in name.lower():
        raise DeltaError(f"'{name}' is an InstantID/PuLID adapter, which needs models beside it that Delta Sampling "
                         "does not run on the source: use a plain, Plus or FaceID IP-Adapter.")
    mine = FAMILIES.get(source_family or "")
    theirs = FAMILIES.get(_CONTEXTS.get(shape.context or 0, ""))
    if (mine and theirs and mine != theirs) or (None not in (shape.context, source_context)
                                                and shape.context != source_context):
        raise DeltaError(f"The IP-Adapter '{name}' ({theirs or f'{shape.context}-wide context'}) is not made for the "
                         f"source '{source_label}' ({mine or f'{source_context}-wide context'}): an IP-Adapter runs "
                         "on the source, so choose one of the source's family (e.g. an SD1.5 IP-Adapter on an SD1.5 "
                         "source, whatever the active model).")
    if shape.faceid != (pre.name in FACE_MODULES):
        want = "an ip-adapter_face_id encoder" if shape.faceid else "a CLIP-vision encoder (ip-adapter_clip_*)"
        raise DeltaError(f"The IP-Adapter '{name}' needs {want}, not '{label}'.")
    if shape.faceid and (pre.name == "ip-adapter_face_id_plus") != shape.plus:
        want = "ip-adapter_face_id_plus" if shape.plus else "ip-adapter_face_id"
        raise DeltaError(f"The FaceID adapter '{name}' needs the encoder '{want}', not '{label}'.")
    encoder = ENCODERS[pre.name][1]
    if not shape.faceid and shape.encoder is not None and encoder != shape.encoder:
        raise DeltaError(f"The IP-Adapter '{name}' was trained with the {shape.encoder} image encoder, but '{label}' "
                         f"is {encoder}: choose the encoder that matches the adapter (e.g. ip-adapter_clip_h for "
                         "ViT-H adapters, ip-adapter_clip_g for ViT-bigG ones).")


def annotator_models() -> str | None:
    """The extension's annotator models folder (where its preprocessors look for, and download, their files)."""
    path = getattr(sys.modules.get("annotator.annotator_path"), "models_path", None)
    return str(path) if path else None


def _check_encoder_file(config: str | None, pre: Any, where: str) -> None:
    """A request never downloads: the encoder's files must already be where the extension looks for them."""
    root = annotator_models()
    if root is None:
        raise DeltaError(f"{EXTENSION}'s annotator folder is unknown, so the IP-Adapter encoder{where} cannot be "
                         "found; update the extension.")
    label = getattr(pre, "label", pre.name)
    if config is not None:
        path = os.path.join(root, "clip_vision", f"{config}.pth")
        if not os.path.isfile(path):
            raise DeltaError(f"The image encoder '{label}'{where} is not downloaded ({path} is missing): Delta "
                             f"Sampling does not download models during a request. Run an IP-Adapter unit of "
                             f"{EXTENSION} once with this preprocessor (it downloads the file), or place it there.")
    if pre.name in FACE_MODULES:
        check_face_model(root, label, where, EXTENSION)


def _init_image(p: Any, where: str) -> np.ndarray:
    images = getattr(p, "init_images", None)
    if images:  # img2img: the init image serves, as in the extension
        return np.ascontiguousarray(np.asarray(images[0].convert("RGB"), dtype=np.uint8))
    raise DeltaError(f"No reference image was given{where}: send it as base64 PNG/JPEG in 'image' (the image is "
                     "never kept in infotext: after pasting parameters, give it again).")


# --- the adapters, kept across generations ---------------------------------------------------------------------


@dataclass(eq=False)
class Adapter:
    """A built adapter (the extension's ``IPAdapterModel``, fp32 on the CPU, as the extension runs it)."""

    path: str
    model: torch.nn.Module


def _release(entry: Adapter) -> None:
    free_weights(entry.model)


POOL: ModelPool[Adapter] = ModelPool(release=_release, stash=lambda entry: None)  # always on the CPU


def pool_key(path: str) -> tuple[str, float, int]:
    st = os.stat(path)
    return os.path.abspath(path), st.st_mtime, st.st_size


def prepare(plans: Iterable[IPPlan]) -> None:
    """A generation starts: adapters it does not name are released before anything loads."""
    POOL.prepare([pool_key(p.path) for p in plans])


def settle(plans: Iterable[IPPlan], cache: str) -> None:
    """A generation ended: keep the adapters it used (unless the cache policy is "free"), release the rest."""
    keys = list(dict.fromkeys(pool_key(p.path) for p in plans if os.path.exists(p.path)))
    POOL.settle(keys, Limits(kept=len(keys), cache="gpu" if cache != "free" else "free"))


def forget_all() -> None:
    POOL.clear()


def _acquire(ext: control_mod.Extension, plan: IPPlan, source_family: str | None, source_context: int | None,
             source_label: str) -> Adapter:
    def load() -> Adapter:
        from modules import sd_models

        state_dict = sd_models.read_state_dict(plan.path, map_location="cpu")
        if not isinstance(state_dict, dict) or not state_dict:
            raise DeltaError(f"The IP-Adapter '{plan.listed}' could not be read: the WebUI's safe loader refused it "
                             "or it is empty. Convert it to .safetensors.")
        shape = adapter_shape(state_dict, plan.path)
        if shape is None:
            raise _not_an_adapter(plan.listed)
        check_shape(shape, plan.listed, plan.preprocessor, source_family, source_context, source_label)
        try:
            built = ext.model_guess.build_model_by_guess(state_dict, None, plan.path)
        except Exception as e:
            raise DeltaError(f"{EXTENSION} cannot build the IP-Adapter '{plan.listed}' ({type(e).__name__}: "
                             f"{e}).") from e
        if getattr(built.type, "name", str(built.type)) != "IPAdapter":
            raise DeltaError(f"'{plan.listed}' is a {getattr(built.type, 'name', built.type)}, not an IP-Adapter.")
        model = built.model.ipadapter.to("cpu", dtype=torch.float32).eval().requires_grad_(False)
        return Adapter(plan.path, model)

    return POOL.get(pool_key(plan.path), load)


# --- the loaded units ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class LoadedIPUnit:
    """A unit's image-prompt keys and values for one run: per attention layer, the cond and uncond image
    embeddings through ``to_k_ip``/``to_v_ip`` (fp32 on the CPU, as the extension computes them), moved and cast
    on first use; per row layout, stacked."""

    plan: IPPlan
    kvs: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: K, V of [2, tokens, inner] (cond, uncond)
    placed: dict[tuple[int, tuple[bool, ...], str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = \
        field(default_factory=dict)

    @property
    def weight(self) -> float:
        return self.plan.unit.weight

    def active(self, fraction: float) -> bool:
        """Inside the unit's window, by the extension's rule (step / total steps)."""
        u = self.plan.unit
        return not (fraction < u.guidance_start or fraction > u.guidance_end)

    def kv(self, n: int, marks: tuple[bool, ...], device: torch.device, dtype: torch.dtype) \
            -> tuple[torch.Tensor, torch.Tensor]:
        key = (n, marks, str(device), dtype)
        if key not in self.placed:
            rows = torch.tensor([0 if m else 1 for m in marks])
            k, v = self.kvs[n]
            self.placed[key] = (k[rows].to(device=device, dtype=dtype), v[rows].to(device=device, dtype=dtype))
        return self.placed[key]

    def release(self) -> None:
        self.placed.clear()
        self.kvs = []


def load_units(plans: Iterable[IPPlan], p: Any, unet_of: Any, source_family: str | None,
               source_context: int | None, source_label: str) -> list[LoadedIPUnit]:
    """Build (or reuse) each adapter, embed its image with the extension's encoder, and compute every layer's
    image-prompt keys and values. ``unet_of(group)`` is the UNet the group runs on (its attentions must match)."""
    from .ip_rows import cross_attentions

    ext = _extension()
    units: list[LoadedIPUnit] = []
    try:
        for plan in plans:
            adapter = _acquire(ext, plan, source_family, source_context, source_label)
            layers = cross_attentions(unet_of(plan.group))
            _check_layers(adapter.model, layers, plan.listed)
            embed = _embed(plan, adapter.model)
            units.append(LoadedIPUnit(plan, _kvs(adapter.model, embed, len(layers))))
    except BaseException:
        units.clear()
        raise
    return units


def _check_layers(model: torch.nn.Module, layers: list[torch.nn.Module], name: str) -> None:
    to_kvs = model.ip_layers.to_kvs
    if len(to_kvs) != 2 * len(layers):
        raise DeltaError(f"The IP-Adapter '{name}' has {len(to_kvs) // 2} cross-attention layers, the source's UNet "
                         f"{len(layers)}: it is made for another UNet layout.")
    for n, attn in enumerate(layers):
        ip_k = to_kvs[f"{2 * n + 1}_to_k_ip"]
        if (ip_k.out_features, ip_k.in_features) != (attn.to_k.out_features, attn.to_k.in_features):
            raise DeltaError(f"The IP-Adapter '{name}' does not fit the source's cross-attention {n}: "
                             f"{ip_k.in_features}→{ip_k.out_features} against {attn.to_k.in_features}→"
                             f"{attn.to_k.out_features}.")


@torch.no_grad()
def _embed(plan: IPPlan, model: torch.nn.Module) -> Any:
    """The image's ``ImageEmbed`` (cond, uncond) through the extension's encoder and ``get_image_emb``. The encoder
    is unloaded again when it was not loaded before (the extension keeps it while its own units use it)."""
    before = _loaded_encoders()
    pre = plan.preprocessor
    try:
        output = pre(plan.image, resolution=pre.slider_resolution.value, slider_1=pre.slider_1.value,
                     slider_2=pre.slider_2.value, low_vram=False)
    except Exception as e:
        raise DeltaError(f"The IP-Adapter encoder '{getattr(pre, 'label', pre.name)}' failed on the reference image "
                         f"({type(e).__name__}: {e}).") from e
    finally:
        if before is not None and plan.config is not None and plan.config not in before:
            pre.unload()
    try:
        return model.get_image_emb(output)
    finally:
        del output


def _loaded_encoders() -> set[str] | None:
    """The extension's CLIP-vision encoders in memory (its ``clip_encoder`` table); None when it cannot be read."""
    table = getattr(sys.modules.get("scripts.preprocessor.legacy.processor"), "clip_encoder", None)
    return {k for k, v in table.items() if v is not None} if isinstance(table, dict) else None


@torch.no_grad()
def _kvs(model: torch.nn.Module, embed: Any, layers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    cond, uncond = (e.to(device="cpu", dtype=torch.float32) for e in (embed.cond_emb, embed.uncond_emb))
    if uncond.shape[0] != cond.shape[0]:
        uncond = uncond.expand(cond.shape[0], *uncond.shape[1:])
    both = torch.cat([cond[:1], uncond[:1]])  # one image: row 0 cond, row 1 uncond
    to_kvs = model.ip_layers.to_kvs
    return [(to_kvs[f"{2 * n + 1}_to_k_ip"](both), to_kvs[f"{2 * n + 1}_to_v_ip"](both)) for n in range(layers)]


def describe(units: Iterable[LoadedIPUnit]) -> str:
    """For the log line: each unit's model, encoder, weight and window."""
    return "; ".join(f"{u.plan.listed} ({getattr(u.plan.preprocessor, 'label', u.plan.unit.module)}, "
                     f"{num(u.plan.unit.weight)}, {num(u.plan.unit.guidance_start)}-{num(u.plan.unit.guidance_end)})"
                     for u in units)
