"""Flat layer name → layer of the source model, for the diffusion model and the text encoders as each host builds
them; for a diffusers Flux module, which rows of the fused BFL layer it is.

The host hands over named roots; each root is searched for the container whose children carry the canonical
names (an ldm ``UNetModel``, a Flux transformer with its double and single blocks, a Hugging Face
``CLIPTextTransformer``, an open_clip text tower or a T5 encoder), so wrappers such as ``wrapped.``, ``transformer.``,
``model.`` or ``diffusion_model.`` around it do not matter.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeltaError
from .family import LABELS
from .formats import Rows
from .keys import FluxRows, flux_from_diffusers, hf_to_openclip, unet_candidates

# the roots of each family; "unet" is the diffusion model whatever its architecture, "t5" Flux's T5-XXL
FAMILY_PARTS = {"sd1": ("unet", "te"), "sd2": ("unet", "te"), "sdxl": ("unet", "te1", "te2"),
                "flux": ("unet", "te1", "t5")}
# file part → root, where it is not the file part's own name. Flux files put CLIP-L under ``lora_te1_`` (or
# ``lora_te_``) and T5-XXL under ``lora_te3_`` (kohya, OneTrainer for SD3) or ``lora_te2_`` (OneTrainer for Flux), as
# Forge's key map reads them (backend/patcher/lora.py, comfyui_lora_collection/lora.py model_lora_keys_clip); their
# transformer in the diffusers layout (``transformer.``, ``lora_transformer_``) is the diffusion model.
_FILE_PARTS = {"sd1": {"te1": "te"}, "sd2": {"te1": "te"}, "sdxl": {"te": "te1"},
               "flux": {"te": "te1", "te2": "t5", "te3": "t5", "dit": "unet"}}
MHA_SLOTS = {"q_proj": 0, "k_proj": 1, "v_proj": 2, "out_proj": "out"}


@dataclass(eq=False)
class Layer:
    """One weight a LoRA key can change: a module, or one projection of an ``nn.MultiheadAttention``."""

    part: str  # "unet", "te", "te1", "te2", "t5"
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


def _is_quantized_linear(module: nn.Module) -> bool:
    """A linear layer whose weight is packed or quantized, to which a LoRA cannot be added here: Forge's NF4/FP4 and
    GGUF operations are classes named ``Linear`` that hold a tensor subclass and no sizes (backend/operations.py)."""
    return (type(module).__name__ == "Linear" and isinstance(getattr(module, "weight", None), torch.Tensor)
            and layer_kind(module) is None)


class ModelIndex:
    """Layers of one source model by part and flat name."""

    def __init__(self, roots: Mapping[str, nn.Module], family: str):
        if family not in FAMILY_PARTS:
            raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILY_PARTS)}")
        self.family = family
        self.family_label = LABELS[family]
        wanted = FAMILY_PARTS[family]
        # a host may name a root as a file names its part (``te1`` for SD1's only text encoder)
        renamed = {(k if k in wanted else _FILE_PARTS[family].get(k, k)): v for k, v in roots.items()}
        unknown = set(renamed) - set(wanted)
        if unknown or "unet" not in renamed or len(renamed) != len(roots):
            raise ValueError(f"roots for {family} are {wanted} (unet required); got {sorted(roots)}")
        self.parts: dict[str, dict[str, Layer]] = {}
        self.openclip: set[str] = set()
        # linear layers of the diffusion model left out because their weights are quantized
        self.quantized = sum(map(_is_quantized_linear, renamed["unet"].modules()))
        for part, root in renamed.items():
            if root is None:
                continue
            if part == "unet":
                self.parts[part] = _index_diffusion_model(root, family)
            elif part == "t5":
                self.parts[part] = _index_t5(root)
            else:
                self.parts[part] = self._index_text(part, root)

    def part_for(self, file_part: str) -> str | None:
        """Root a file part goes to: ``lora_te_``/``lora_te1_``/``text_encoder.`` are the first text encoder; the
        diffusers ``transformer.`` keys are Flux's diffusion model, and name no root of the SD families."""
        part = _FILE_PARTS[self.family].get(file_part, file_part)
        return part if part in FAMILY_PARTS[self.family] else None

    def resolve(self, file_part: str, flat: str) -> tuple[Layer, Rows | None] | None:
        """The layer a file's layer name changes, and which of its rows: None for all of them, or the blocks a
        diffusers Flux module is of the fused BFL layer it belongs to (its q rows of ``qkv``, say)."""
        layer = self.lookup(file_part, flat)
        if layer is not None:
            return layer, None
        if self.family != "flux" or self.part_for(file_part) != "unet" or (found := flux_from_diffusers(flat)) is None:
            return None
        layer = self.parts["unet"].get(found[0])
        if layer is None:
            return None
        out, width = layer.weight().shape
        return layer, flux_rows(found[1], out, width)

    def lookup(self, file_part: str, flat: str) -> Layer | None:
        part = self.part_for(file_part)
        layers = self.parts.get(part) if part else None
        if not layers:
            return None
        if part == "unet":  # diffusers UNet names to ldm ones; any other name (a DiT's) stands as it is
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


def flux_rows(where: FluxRows, out: int, width: int) -> Rows | None:
    """The rows of a fused Flux layer of ``out`` rows on a ``width``-wide input that a diffusers module is (see
    keys.FluxRows): q, k, v and the MLP input of ``linear1`` follow each other; the adaLN halves swap places."""
    if where is None:
        return None
    if where == "swap":
        half = out // 2
        return (half, half), (0, half)
    if where == "mlp":
        return ((3 * width, out - 3 * width),)
    return ((where * width, width),)


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


def _is_flux(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, a, None), nn.ModuleList) for a in ("double_blocks", "single_blocks"))


def _is_t5(m: nn.Module) -> bool:
    return isinstance(getattr(getattr(m, "encoder", None), "block", None), nn.ModuleList)


def _is_hf_text_transformer(m: nn.Module) -> bool:
    return hasattr(m, "embeddings") and isinstance(getattr(getattr(m, "encoder", None), "layers", None), nn.ModuleList)


def _is_openclip_text(m: nn.Module) -> bool:
    return isinstance(getattr(getattr(m, "transformer", None), "resblocks", None), nn.ModuleList)


def _index_diffusion_model(root: nn.Module, family: str) -> dict[str, Layer]:
    if family == "flux":
        found = _find(root, _is_flux)
        if found is None:
            raise DeltaError("the diffusion model of the Flux source has no double_blocks/single_blocks")
    else:
        found = _find(root, _is_unet)
        if found is None:
            raise DeltaError("the unet root of the source model has no input_blocks/middle_block/output_blocks")
    return _index_layers("unet", found[1], "")


def _index_t5(root: nn.Module) -> dict[str, Layer]:
    """T5 layers by the names under ``t5xxl.transformer.`` (``encoder_block_0_layer_0_SelfAttention_q``)."""
    found = _find(root, _is_t5)
    if found is None:
        raise DeltaError("the t5 root of the source model has no encoder blocks; the T5 part of a LoRA cannot be "
                         "applied to it")
    return _index_layers("t5", found[1], "")


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
