"""Flat layer name → layer of the source model, for the UNet and the text encoders as each host builds them.

The host hands over named roots; each root is searched for the container whose children carry the canonical
names (an ldm ``UNetModel``, a Hugging Face ``CLIPTextTransformer`` or an open_clip text tower), so wrappers such as
``wrapped.``, ``transformer.``, ``model.`` or ``diffusion_model.`` around it do not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeltaError
from .family import LABELS
from .keys import hf_to_openclip, unet_candidates

FAMILY_PARTS = {"sd1": ("unet", "te"), "sd2": ("unet", "te"), "sdxl": ("unet", "te1", "te2")}
MHA_SLOTS = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "out_proj": "out"}


@dataclass(eq=False)
class Layer:
    """One weight a LoRA key can change: a module, or one projection of an ``nn.MultiheadAttention``."""

    part: str  # "unet", "te", "te1", "te2"
    name: str  # canonical dotted path, for reports
    module: nn.Module
    kind: str  # "linear", "conv", "norm", "mha"
    slot: int | str | None = None  # MultiheadAttention: 0/1/2 for q/k/v rows of in_proj_weight, "out"

    def weight(self) -> torch.Tensor:
        m = self.module
        if self.kind != "mha":
            return m.weight
        if self.slot == "out":
            return m.out_proj.weight
        e = m.embed_dim
        return m.in_proj_weight[self.slot * e: (self.slot + 1) * e]

    def bias(self) -> torch.Tensor | None:
        m = self.module
        if self.kind != "mha":
            return m.bias
        if self.slot == "out":
            return m.out_proj.bias
        if m.in_proj_bias is None:
            return None
        e = m.embed_dim
        return m.in_proj_bias[self.slot * e: (self.slot + 1) * e]


def layer_kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.MultiheadAttention):
        return "mha" if module._qkv_same_embed_dim else None
    if isinstance(module, nn.Linear) or _is_plain_linear(module):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
        return "norm" if getattr(module, "weight", None) is not None else None
    return None


def _is_plain_linear(module: nn.Module) -> bool:
    """A linear layer that is not an ``nn.Linear``: Forge's ``operations.Linear`` is a bare ``nn.Module`` with the
    same attributes (quantized weights, which are not plain 2-D tensors, are left out)."""
    weight = getattr(module, "weight", None)
    return (isinstance(getattr(module, "in_features", None), int) and isinstance(weight, torch.Tensor)
            and type(weight) in (torch.Tensor, nn.Parameter) and weight.ndim == 2
            and tuple(weight.shape) == (module.out_features, module.in_features))


class ModelIndex:
    """Layers of one source model by part and flat name."""

    def __init__(self, roots: Mapping[str, nn.Module], family: str):
        if family not in FAMILY_PARTS:
            raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILY_PARTS)}")
        self.family = family
        self.family_label = LABELS[family]
        wanted = FAMILY_PARTS[family]
        roots = dict(roots)
        if family != "sdxl" and "te1" in roots and "te" not in roots:
            roots["te"] = roots.pop("te1")
        unknown = set(roots) - set(wanted)
        if unknown or "unet" not in roots:
            raise ValueError(f"roots for {family} are {wanted} (unet required); got {sorted(roots)}")
        self.parts: dict[str, dict[str, Layer]] = {}
        self.openclip: set[str] = set()
        for part, root in roots.items():
            if root is None:
                continue
            self.parts[part] = _index_unet(root) if part == "unet" else self._index_text(part, root)

    def part_for(self, file_part: str) -> str | None:
        """Root a file part goes to: ``lora_te_``/``lora_te1_``/``text_encoder.`` are the first text encoder."""
        if file_part in ("te", "te1"):
            return "te1" if self.family == "sdxl" else "te"
        if file_part == "te2":
            return "te2" if self.family == "sdxl" else None
        return "unet" if file_part == "unet" else None

    def lookup(self, file_part: str, flat: str) -> Layer | None:
        part = self.part_for(file_part)
        layers = self.parts.get(part) if part else None
        if not layers:
            return None
        if part == "unet":
            candidates = unet_candidates(flat)
        elif part in self.openclip:
            candidates = [c for c in (hf_to_openclip(flat), flat) if c]
        else:
            candidates = [flat]
        for name in candidates:
            layer = layers.get(name)
            if layer is not None:
                return layer
        return None

    def _index_text(self, part: str, root: nn.Module) -> dict[str, Layer]:
        hf = _find(root, _is_hf_text_transformer)
        oc = _find(root, _is_openclip_text)
        if hf is None and oc is None:
            raise DeltaError(
                f"the {part} root of the source model is neither a Hugging Face CLIP text model nor an open_clip "
                f"text tower; the text-encoder part of a LoRA cannot be applied to it"
            )
        if oc is not None and (hf is None or oc[0].count(".") < hf[0].count(".")):
            self.openclip.add(part)
            return _index_layers(part, oc[1], "")
        return _index_layers(part, hf[1], "text_model.")


def _find(root: nn.Module, test) -> tuple[str, nn.Module] | None:
    """Shallowest submodule passing ``test``, skipping vision towers."""
    best = None
    for name, module in root.named_modules():
        if "visual" in name.split(".") or not test(module):
            continue
        if best is None or name.count(".") < best[0].count("."):
            best = (name, module)
    return best


def _is_unet(m: nn.Module) -> bool:
    return all(hasattr(m, a) for a in ("input_blocks", "middle_block", "output_blocks"))


def _is_hf_text_transformer(m: nn.Module) -> bool:
    return hasattr(m, "embeddings") and isinstance(getattr(getattr(m, "encoder", None), "layers", None), nn.ModuleList)


def _is_openclip_text(m: nn.Module) -> bool:
    return isinstance(getattr(getattr(m, "transformer", None), "resblocks", None), nn.ModuleList)


def _index_unet(root: nn.Module) -> dict[str, Layer]:
    found = _find(root, _is_unet)
    if found is None:
        raise DeltaError("the unet root of the source model has no input_blocks/middle_block/output_blocks")
    return _index_layers("unet", found[1], "")


def _index_layers(part: str, container: nn.Module, prefix: str) -> dict[str, Layer]:
    layers: dict[str, Layer] = {}
    mha_children: set[int] = set()
    for name, module in container.named_modules():
        if not name:
            continue
        kind = layer_kind(module)
        if kind == "mha":
            mha_children.add(id(module.out_proj))
            for proj, slot in MHA_SLOTS.items():
                flat = (prefix + name).replace(".", "_") + "_" + proj
                layers[flat] = Layer(part, f"{prefix}{name}.{proj}", module, "mha", slot)
        elif kind is not None and id(module) not in mha_children:
            layers[(prefix + name).replace(".", "_")] = Layer(part, prefix + name, module, kind)
    return layers
