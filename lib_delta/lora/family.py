"""Which model family a LoRA file was made for, judged from its keys, shapes and kohya metadata.

The answer is a set of families, narrowed by evidence from the strongest to the weakest; evidence that would
empty the set is ignored, so a mislabelled metadata field cannot outvote the key layout. Only facts that hold for
the real layouts are used (a test model with fewer levels keeps them), and the shape check against the source
model catches what this guess cannot see.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from .keys import ParsedKey

SD_FAMILIES = frozenset({"sd1", "sd2", "sdxl"})
LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux"}

_DEEP_TRANSFORMER = re.compile(r"transformer_blocks_[1-9]\d*_")
_LEVEL0_ATTENTION = re.compile(r"(input_blocks_[12]_1_|down_blocks_0_attentions_)")
_FOURTH_LEVEL = re.compile(r"(input_blocks_(9|10|11)_|output_blocks_(9|10|11)_|down_blocks_3_|up_blocks_3_)")
_FLUX = re.compile(r"(double_blocks|single_blocks|single_transformer_blocks)")
_SD3 = re.compile(r"(joint_blocks|context_block|add_k_proj|add_q_proj)")
_CONTEXT_DIM = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # cross-attention key input of the real models
_TE_WIDTH = {768: "sd1", 1024: "sd2"}  # the text encoder of a ``lora_te_`` file


def label(families: Iterable[str]) -> str:
    """Readable name of a guess: "SDXL", "SD1.x or SD2.x", ..."""
    names = [LABELS.get(f, f) for f in sorted(families, key=list(LABELS).index)]
    if not names or set(families) == SD_FAMILIES:
        return "any SD1/SD2/SDXL model"
    return " or ".join(names)


def looks_like(families: Iterable[str]) -> str:
    """A clause for messages: "it looks made for SDXL", or that the keys do not tell."""
    if set(families) >= SD_FAMILIES:
        return "its keys do not show which SD family it was made for"
    return f"it looks made for {label(families)}"


def guess_family(
    keys: list[ParsedKey], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> frozenset[str]:
    parts = {k.part for k in keys}
    unet_flats = {k.flat for k in keys if k.part == "unet"}
    dit_flats = {k.flat for k in keys if k.part == "dit"}
    if dit_flats or "te3" in parts or any(_FLUX.search(f) or _SD3.search(f) for f in unet_flats):
        if any(_FLUX.search(f) for f in unet_flats | dit_flats):
            return frozenset({"flux"})
        if dit_flats:  # diffusers names of joint blocks alone: SD3's and Flux's are alike; the shapes tell them apart
            return frozenset({"sd3", "flux"})
        return frozenset({"sd3"})

    evidence: list[set[str]] = []
    if "te2" in parts:
        evidence.append({"sdxl"})
    if any(_DEEP_TRANSFORMER.search(f) for f in unet_flats):
        evidence.append({"sdxl"})
    if any(_LEVEL0_ATTENTION.match(f) or _FOURTH_LEVEL.match(f) for f in unet_flats):
        evidence.append({"sd1", "sd2"})
    evidence.append(_metadata_family(metadata))
    for k in keys:
        tensor = tensors[k.key]
        if k.part == "unet" and k.weight_part == "lora_down.weight":
            if k.flat.endswith("proj_in"):
                evidence.append({"sd1"} if tensor.dim() == 4 else {"sd2", "sdxl"})
            if k.flat.endswith("attn2_to_k") and tensor.dim() == 2 and tensor.shape[1] in _CONTEXT_DIM:
                evidence.append({_CONTEXT_DIM[tensor.shape[1]]})
        if k.part == "te" and k.weight_part == "lora_down.weight" and k.flat.endswith("self_attn_q_proj"):
            if tensor.dim() == 2 and tensor.shape[1] in _TE_WIDTH:
                evidence.append({_TE_WIDTH[tensor.shape[1]]})
    if "te" in parts:
        evidence.append({"sd1", "sd2"})
    elif "te1" in parts and "te2" not in parts and any(k.style == "kohya" for k in keys if k.part == "te1"):
        evidence.append({"sd1", "sdxl"})  # the WebUI also reads SD1 files written with ``lora_te1_``

    guess = set(SD_FAMILIES)
    for families in evidence:
        if families and guess & families:
            guess &= families
    return frozenset(guess)


def _metadata_family(metadata: Mapping[str, str]) -> set[str]:
    version = str(metadata.get("ss_base_model_version", ""))
    if version.startswith("sdxl"):
        return {"sdxl"}
    if version.startswith("sd_v2") or str(metadata.get("ss_v2", "")) == "True":
        return {"sd2"}
    if version.startswith("sd_v1"):
        return {"sd1"}
    return set()
