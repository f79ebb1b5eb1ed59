"""File keys: which model part, which layer and which weight part each tensor of a LoRA file belongs to.

Two key styles exist. kohya/LyCORIS keys flatten the layer path with underscores and put the weight part after
the first dot (``lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight``); diffusers/peft keys keep the
dotted path and end in a known part (``unet.down_blocks.0.attentions.0.proj_in.lora_A.weight``). Both reduce to a
*flat* layer name (dots turned into underscores), which is what the model index is keyed by, as in the WebUI.
Names of another layout than the model's are translated here: a diffusers UNet's to the ldm UNet's, Hugging Face
CLIP's to open_clip's, and a diffusers Flux transformer's to BFL's, where q, k and v are rows of one fused layer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Weight parts of every supported module type, in the names the WebUI's Lora extension uses.
WEIGHT_PARTS = frozenset({
    "lora_up.weight", "lora_down.weight", "lora_mid.weight", "alpha", "scale", "dora_scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "weight", "on_input", "diff", "diff_b", "w_norm", "b_norm", "oft_blocks", "oft_diag", "rescale",
    "a1.weight", "a2.weight", "b1.weight", "b2.weight", "bias",
})
PART_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
}
# In dotted keys a bare ``weight``/``bias`` is the layer's own tensor, not a LoRA part.
_DOTTED_SUFFIXES = sorted(
    (p for p in WEIGHT_PARTS | PART_ALIASES.keys() if p not in {"weight", "bias"}), key=len, reverse=True
)

# Model part of a kohya-style head. "te" is the only/first text encoder of SD1/SD2 files (``lora_te_``).
_KOHYA_PREFIXES = (
    ("lora_unet_", "unet"), ("lycoris_", "unet"), ("oft_unet_", "unet"),
    ("lora_te1_", "te1"), ("lora_te2_", "te2"), ("lora_te3_", "te3"), ("lora_te_", "te"),
    ("lora_transformer_", "dit"),
)
_DOTTED_PREFIXES = (
    ("text_encoder_2.", "te2"), ("text_encoder.", "te1"), ("unet.", "unet"),
    ("model.diffusion_model.", "unet"), ("diffusion_model.", "unet"), ("lora_unet.", "unet"),
    ("transformer.", "dit"),
)
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(up|down)\.weight$")


@dataclass(frozen=True)
class ParsedKey:
    key: str  # as in the file
    part: str  # "unet", "te" (lora_te_), "te1", "te2", "te3", "dit"
    flat: str  # layer path with underscores, without the part prefix
    weight_part: str  # normalised: "lora_up.weight", "alpha", "hada_w1_a", ...
    style: str  # "kohya" or "diffusers"


def parse_key(key: str) -> ParsedKey | None:
    """Split one file key; None for keys that name no LoRA layer part."""
    head, dot, rest = key.partition(".")
    if dot and "." not in head:
        weight_part = PART_ALIASES.get(rest, rest)
        if weight_part in WEIGHT_PARTS:
            for prefix, part in _KOHYA_PREFIXES:
                if head.startswith(prefix):
                    return ParsedKey(key, part, head[len(prefix):], weight_part, "kohya")
    return _parse_dotted(key)


def _parse_dotted(key: str) -> ParsedKey | None:
    key_norm = _OLD_PROCESSOR.sub(lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.{m[2]}.weight", key)
    for suffix in _DOTTED_SUFFIXES:
        if key_norm.endswith("." + suffix):
            path = key_norm[: -len(suffix) - 1]
            break
    else:
        return None
    weight_part = PART_ALIASES.get(suffix, suffix)
    if path.startswith("base_model.model."):  # raw peft: a text encoder if its path says so
        path = path[len("base_model.model."):]
        part = "te1" if path.startswith("text_model.") else "unet"
        return ParsedKey(key, part, path.replace(".", "_"), weight_part, "diffusers")
    for prefix, part in _DOTTED_PREFIXES:
        if path.startswith(prefix):
            return ParsedKey(key, part, path[len(prefix):].replace(".", "_"), weight_part, "diffusers")
    return None


# --- UNet: diffusers layout → ldm (compvis) layout ------------------------------------------------------------

_RESNET_SUFFIX = {
    "conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection",
}
_RE_DOWN = re.compile(r"down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_RE_MID = re.compile(r"mid_block_(attentions|resnets)_(\d+)_(.+)")
_RE_UP = re.compile(r"up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")
_RE_DOWNSAMPLE = re.compile(r"down_blocks_(\d+)_downsamplers_0_conv(.*)")
_RE_UPSAMPLE = re.compile(r"up_blocks_(\d+)_upsamplers_0_conv(.*)")
_RE_TIME = re.compile(r"time_embedding_linear_(\d+)(.*)")
_RE_ADD = re.compile(r"add_embedding_linear_(\d+)(.*)")


def _suffix(kind: str, rest: str) -> str:
    return _RESNET_SUFFIX.get(rest, rest) if kind == "resnets" else rest


def unet_candidates(flat: str) -> list[str]:
    """ldm-layout flat names a UNet layer name may stand for, most likely first.

    Every UNet the WebUIs load has two ResBlocks per level, so a diffusers block index maps by arithmetic; only
    an upsampler's position inside its output block (after a transformer or not) depends on the family, so both
    places are offered and the index keeps the one that exists.
    """
    if m := _RE_DOWN.fullmatch(flat):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return [f"input_blocks_{1 + 3 * b + j}_{1 if kind == 'attentions' else 0}_{_suffix(kind, rest)}"]
    if m := _RE_MID.fullmatch(flat):
        kind, j, rest = m[1], int(m[2]), m[3]
        return [f"middle_block_{1 if kind == 'attentions' else 2 * j}_{_suffix(kind, rest)}"]
    if m := _RE_UP.fullmatch(flat):
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        return [f"output_blocks_{3 * b + j}_{1 if kind == 'attentions' else 0}_{_suffix(kind, rest)}"]
    if m := _RE_DOWNSAMPLE.fullmatch(flat):
        return [f"input_blocks_{3 + 3 * int(m[1])}_0_op{m[2]}"]
    if m := _RE_UPSAMPLE.fullmatch(flat):
        b = int(m[1])
        return [f"output_blocks_{2 + 3 * b}_{i}_conv{m[2]}" for i in (2, 1)]
    if m := _RE_TIME.fullmatch(flat):
        return [f"time_embed_{2 * int(m[1]) - 2}{m[2]}"]
    if m := _RE_ADD.fullmatch(flat):
        return [f"label_emb_0_{2 * int(m[1]) - 2}{m[2]}"]
    if flat.startswith("conv_in"):
        return ["input_blocks_0_0" + flat[len("conv_in"):]]
    if flat.startswith("conv_out"):
        return ["out_2" + flat[len("conv_out"):]]
    if flat.startswith("conv_norm_out"):
        return ["out_0" + flat[len("conv_norm_out"):]]
    return [flat]


# --- Text encoders: Hugging Face CLIP names → open_clip names --------------------------------------------------

_RE_HF_LAYER = re.compile(r"text_model_encoder_layers_(\d+)_(.+)")
_HF_TO_OPENCLIP = {
    "self_attn_q_proj": "attn_q_proj", "self_attn_k_proj": "attn_k_proj", "self_attn_v_proj": "attn_v_proj",
    "self_attn_out_proj": "attn_out_proj", "mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj",
    "layer_norm1": "ln_1", "layer_norm2": "ln_2",
}


def hf_to_openclip(flat: str) -> str | None:
    """kohya text-encoder names follow Hugging Face CLIP; SD2 and SDXL's second encoder are open_clip models."""
    if flat == "text_model_final_layer_norm":
        return "ln_final"
    m = _RE_HF_LAYER.fullmatch(flat)
    if m and m[2] in _HF_TO_OPENCLIP:
        return f"transformer_resblocks_{m[1]}_{_HF_TO_OPENCLIP[m[2]]}"
    return None


# --- Flux: diffusers layout → BFL layout ------------------------------------------------------------------------

# Where a diffusers Flux module sits in the BFL layer it is part of, as Forge's key map places it (the
# ``flux_to_diffusers`` table it ships): None for the whole layer; 0, 1, 2 for q, k, v, each one model width of rows
# of a fused projection (``qkv``, or the head of a single block's ``linear1``); "mlp" for the MLP input, the rows of
# ``linear1`` after them; "swap" for the final adaLN, whose diffusers layer gives (scale, shift) and BFL's
# (shift, scale), so the two halves of its rows change places.
FluxRows = int | str | None

_FLUX_DOUBLE: dict[str, tuple[str, FluxRows]] = {
    "attn_to_q": ("img_attn_qkv", 0), "attn_to_k": ("img_attn_qkv", 1), "attn_to_v": ("img_attn_qkv", 2),
    "attn_add_q_proj": ("txt_attn_qkv", 0), "attn_add_k_proj": ("txt_attn_qkv", 1),
    "attn_add_v_proj": ("txt_attn_qkv", 2),
    "attn_to_out_0": ("img_attn_proj", None), "attn_to_add_out": ("txt_attn_proj", None),
    "norm1_linear": ("img_mod_lin", None), "norm1_context_linear": ("txt_mod_lin", None),
    "ff_net_0_proj": ("img_mlp_0", None), "ff_net_2": ("img_mlp_2", None),
    "ff_context_net_0_proj": ("txt_mlp_0", None), "ff_context_net_2": ("txt_mlp_2", None),
}
_FLUX_SINGLE: dict[str, tuple[str, FluxRows]] = {
    "attn_to_q": ("linear1", 0), "attn_to_k": ("linear1", 1), "attn_to_v": ("linear1", 2),
    "proj_mlp": ("linear1", "mlp"), "proj_out": ("linear2", None), "norm_linear": ("modulation_lin", None),
}
_FLUX_TOP: dict[str, tuple[str, FluxRows]] = {
    "x_embedder": ("img_in", None), "context_embedder": ("txt_in", None), "proj_out": ("final_layer_linear", None),
    "norm_out_linear": ("final_layer_adaLN_modulation_1", "swap"),
    "time_text_embed_timestep_embedder_linear_1": ("time_in_in_layer", None),
    "time_text_embed_timestep_embedder_linear_2": ("time_in_out_layer", None),
    "time_text_embed_text_embedder_linear_1": ("vector_in_in_layer", None),
    "time_text_embed_text_embedder_linear_2": ("vector_in_out_layer", None),
    "time_text_embed_guidance_embedder_linear_1": ("guidance_in_in_layer", None),
    "time_text_embed_guidance_embedder_linear_2": ("guidance_in_out_layer", None),
}
_RE_FLUX_BLOCK = re.compile(r"(single_transformer_blocks|transformer_blocks)_(\d+)_(.+)")


def flux_from_diffusers(flat: str) -> tuple[str, FluxRows] | None:
    """The BFL layer (flat name) that a diffusers Flux module's name stands for, and where in its rows the module
    sits; None for a name Flux's layers have no place for."""
    if m := _RE_FLUX_BLOCK.fullmatch(flat):
        single = m[1] == "single_transformer_blocks"
        found = (_FLUX_SINGLE if single else _FLUX_DOUBLE).get(m[3])
        return None if found is None else (f"{'single' if single else 'double'}_blocks_{m[2]}_{found[0]}", found[1])
    return _FLUX_TOP.get(flat)
