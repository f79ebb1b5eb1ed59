"""Random-weight WebUI checkpoints and LoRA files for the end-to-end tests.

Runs under the WebUI's own python (the harness starts it as a subprocess):

    <webui python> tests/e2e/fixtures.py --webui <A1111 root> --out <dir> [--models sd15,sd21v,sdxl]

Each checkpoint is built by instantiating the WebUI's own model classes (ldm / sgm from its `repositories/`) from
the configs shipped in the install, so the key layout is exactly what the WebUI loads. Default initialisation
leaves many tensors at zero (UNet output conv, every `proj_out`, resblock output convs, norm and CLIP biases); a
model like that predicts the same thing whatever its prompt or LoRA, so every all-zero parameter is refilled with
fan-in-scaled noise before saving. The VAE encoder is rescaled to a trained one's latent statistics (see
calibrate_vae_encoder), so that img2img and inpainting see their init image.

Models (written to <out>/<model>/):
- sd15:  SD1.5 layout (configs/v1-inference.yaml), eps-prediction.
- sd21v: SD2.1-768-v layout (v2-inference-v.yaml), v-prediction; the yaml is written beside the checkpoint because
  the WebUI guesses eps for random weights otherwise.
- sdxl:  SDXL base layout with transformer depth [1, 1, 1] instead of [1, 2, 10] (one transformer block per
  attention layer instead of 2 and 10). Every key keeps its real SDXL name and shape; only the extra
  `transformer_blocks.N` (N >= 1) are absent. A full-size random SDXL needs about 15 GB of RAM to run on the CPU,
  this one about 6-9 GB. Its yaml is written beside it.
- sdxl_full: SDXL base at full size (sd_xl_base.yaml as the WebUI ships it: transformer depth [1, 2, 10]), 2.6 B
  UNet parameters, 6.9 GB in fp16. About 15 GB of RAM to build; for a GPU (the WebUI detects it from its keys, so no
  yaml is written beside it).
- sd3:   SD3 (medium) single-file layout with an MMDiT of depth SD3_DEPTH instead of 24: both WebUIs size the MMDiT
  from the checkpoint's shapes (hidden size 64 * depth). Built from the WebUI's own SD3 classes
  (modules/models/sd3/): the MMDiT, the 16-channel VAE, and full-size CLIP-L and CLIP-G under `text_encoders.*`
  (their sizes are fixed in both WebUIs). T5-XXL is left out but for its 50 norm and relative-position tensors
  (200 K values): both WebUIs generate with T5 off by default (option sd3_enable_t5) and then never run it; A1111
  does not build it, and Forge, which refuses a checkpoint without T5 tensors ("You do not have T5 state dict!"),
  loads the ones given and reports the rest missing. 1.8 GB in fp16 (CLIP-G is 1.4 GB of it). No LoRA files.
- sd35:  the same with SD3.5 (large)'s q/k RMS norms in every attention (`ln_q`/`ln_k`), from the WebUI's own MMDiT
  class with qk_norm="rms". Forge builds its SD3.5 MMDiT from those keys; AUTOMATIC1111 1.10 has no SD3.5.

LoRA files per model (kohya naming, rank 4, alpha 2): `<model>_lora`; for sd15 also a LyCORIS LoHa (`sd15_loha`) and
a truncated, unreadable copy of the LoRA (`sd15_corrupt`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch

# Bump when the generated files change, so that cached fixtures are rebuilt.
FIXTURE_VERSION = 4
SEED = 20251203
LORA_RANK = 4
LORA_ALPHA = 2.0
# A LoRA's ΔW has entries of std LORA_STRENGTH / sqrt(fan_in), about a sixth of a default-initialised layer's.
# Measured on the SD1.5 fixture (4-step 64x64): <lora:NAME:1> lands near 20 dB PSNR from the plain image, and the
# change still scales with the multiplier (about 6 dB per halving); at 3.5x this strength it saturates near 17 dB.
LORA_STRENGTH = 0.1

MODELS = ("sd15", "sd21v", "sdxl", "sd3", "sd35", "sdxl_full")  # append only: a model's index seeds its generator
CHECKPOINT_NAMES = {"sd15": "delta_e2e_sd15", "sd21v": "delta_e2e_sd21v", "sdxl": "delta_e2e_sdxl_small",
                    "sd3": "delta_e2e_sd3_small", "sd35": "delta_e2e_sd35_small", "sdxl_full": "delta_e2e_sdxl"}
SDXL_TRANSFORMER_DEPTH = "[1, 1, 1]"
SD3_DEPTH = 2  # joint blocks; SD3 medium has 24 (hidden size 64 * depth, one attention head per block)
SD3_POS_EMBED_MAX_SIZE = 192  # SD3 medium's position-embedding grid (patches per side)
SD3_SCALE, SD3_SHIFT = 1.5305, 0.0609  # SD3's latent scale and shift (SD3LatentFormat)
# modules/models/sd3/sd3_cond.py's CLIPL_CONFIG and CLIPG_CONFIG (that module imports the WebUI's runtime state)
SD3_CLIPL_CONFIG = {"hidden_act": "quick_gelu", "hidden_size": 768, "intermediate_size": 3072,
                    "num_attention_heads": 12, "num_hidden_layers": 12}
SD3_CLIPG_CONFIG = {"hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                    "num_hidden_layers": 32, "textual_inversion_key": "clip_g"}
SD3_T5_LAYERS, SD3_T5_DIM, SD3_T5_HEADS = 24, 4096, 64  # T5-XXL encoder (the shapes of the tensors written)


def _repositories(webui: Path) -> dict[str, Path]:
    repos = webui / "repositories"
    return {
        "ldm": repos / "stable-diffusion-stability-ai",
        "sgm": repos / "generative-models",
        "sd1_config": webui / "configs" / "v1-inference.yaml",
        "sd2v_config": repos / "stable-diffusion-stability-ai" / "configs" / "stable-diffusion" / "v2-inference-v.yaml",
        "sdxl_config": repos / "generative-models" / "configs" / "inference" / "sd_xl_base.yaml",
    }


def _l14_text_config():  # openai/clip-vit-large-patch14's text tower, so no Hub access is needed
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, layer_norm_eps=1e-5,
        bos_token_id=0, eos_token_id=2, pad_token_id=1,
    )


class _NoVisual(torch.nn.Module):
    """Stands in for an OpenCLIP vision tower: the text embedders delete it right away (ViT-bigG's is 1.8B params)."""

    image_size = 224


_MISSING = object()


@contextlib.contextmanager
def offline_text_encoders() -> Iterator[None]:
    """Build the text encoders from their architecture alone: no tokenizer files, no pretrained weights."""
    import open_clip
    import open_clip.model
    import transformers

    create = open_clip.create_model_and_transforms
    patches = [
        (transformers.CLIPTextModel, "from_pretrained", classmethod(lambda cls, *a, **k: cls(_l14_text_config()))),
        (transformers.CLIPTokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: None)),
        (open_clip, "create_model_and_transforms", lambda *a, pretrained=None, **k: create(*a, pretrained=None, **k)),
        (open_clip.model, "_build_vision_tower", lambda *a, **k: _NoVisual()),
    ]
    # vars(), not getattr(): an inherited classmethod is restored by deleting the override
    saved = [(owner, name, vars(owner).get(name, _MISSING)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            if value is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def fill_zero_parameters(model: torch.nn.Module, gen: torch.Generator) -> list[str]:
    """Refill every all-zero float parameter with noise; returns their names.

    Weights get std 1/sqrt(fan_in) (the scale of a default-initialised layer); 1-D parameters (biases, norm
    shifts) get a small std so that they shift activations without dominating them.
    """
    filled = []
    for name, p in model.named_parameters():
        if not p.is_floating_point() or p.numel() == 0 or p.dim() == 0 or p.detach().any():
            continue
        std = p[0].numel() ** -0.5 if p.dim() > 1 else 0.02
        with torch.no_grad():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)
        filled.append(name)
    return filled


def calibrate_vae_encoder(model: torch.nn.Module, scale_factor: float, gen: torch.Generator) -> float:
    """Give the random VAE a real one's encoding statistics; returns the factor applied to the latent means.

    A random encoder's posterior has log-variance about 0 and means of std about 0.3, so `encode(image)` is mostly
    sampling noise and, once multiplied by the scale factor, far smaller than a real latent: img2img and inpainting
    would then hardly see their init image, and would depend on the unseeded posterior sample. Rescaling
    `quant_conv`'s mean rows (latent std 1/scale_factor, i.e. 1 after scaling, as for trained SD VAEs) and pushing
    its log-variance rows below the -30 clamp of DiagonalGaussianDistribution (std 3e-7, about half an fp32 ulp of
    the means: the unseeded sample still flips the last bit of some latent values, so img2img repeats to float
    rounding, not bit for bit) fixes both; the keys and the decoder are untouched. A random decoder is no inverse
    of the encoder, so pixels still do not survive an encode/decode round trip.
    """
    vae = model.first_stage_model
    conv = vae.quant_conv
    return _rescale_posterior(conv, lambda images: conv(vae.encoder(images)), scale_factor, gen)


def _rescale_posterior(conv: torch.nn.Module, moments, scale_factor: float, gen: torch.Generator) -> float:
    """Scale the mean rows of `conv` (the layer that outputs the posterior's means and log-variances, as `moments`
    of an image batch) to latent std 1/scale_factor, and push its log-variances below the -30 clamp."""
    half = conv.out_channels // 2
    # smooth random images in [-1, 1], closer to photos than per-pixel noise
    images = torch.rand(4, 3, 16, 16, generator=gen) * 2 - 1
    images = torch.nn.functional.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    mean_std = float(moments(images)[:, :half].std())
    factor = 1.0 / (scale_factor * mean_std)
    with torch.no_grad():
        conv.weight[:half] *= factor
        conv.bias[:half] *= factor
        conv.bias[half:] -= 40.0
    return factor


def _instantiate(config) -> torch.nn.Module:
    if str(config.model.target).startswith("sgm."):
        from sgm.util import instantiate_from_config
    else:
        from ldm.util import instantiate_from_config
    with offline_text_encoders():
        return instantiate_from_config(config.model).eval()


def sdxl_small_yaml(base_yaml: str) -> str:
    """sd_xl_base.yaml with one transformer block per attention layer (the first entry is unused by SDXL)."""
    out, n = re.subn(r"transformer_depth: \[1, 2, 10\]", f"transformer_depth: {SDXL_TRANSFORMER_DEPTH}", base_yaml)
    if n != 1:
        raise RuntimeError("sd_xl_base.yaml does not have the expected transformer_depth line")
    return out


def build_model(webui: Path, model: str) -> tuple[torch.nn.Module, str | None]:
    """Instantiate a model; returns it and the yaml text to write beside the checkpoint (None: the WebUI's default)."""
    from omegaconf import OmegaConf

    paths = _repositories(webui)
    yaml_beside = None
    if model == "sd15":
        config = OmegaConf.load(paths["sd1_config"])
    elif model == "sd21v":
        yaml_beside = paths["sd2v_config"].read_text()
        config = OmegaConf.create(yaml_beside)
    elif model in ("sdxl", "sdxl_full"):
        if model == "sdxl":
            yaml_beside = sdxl_small_yaml(paths["sdxl_config"].read_text())
            config = OmegaConf.create(yaml_beside)
        else:
            config = OmegaConf.load(paths["sdxl_config"])
        # The WebUI makes the same substitution when xformers is absent; the module keys are identical.
        config.model.params.first_stage_config.params.ddconfig.attn_type = "vanilla"
        config.model.params.network_config.params.use_checkpoint = False
    else:
        raise ValueError(model)
    return _instantiate(config), yaml_beside


def _import_sd3_classes(webui: Path) -> dict:
    """The WebUI's SD3 model classes, imported without its runtime: other_impls.py needs only
    sd_hijack.TextualInversionEmbeddings, an nn.Embedding with the same parameters (stood in for here, since
    importing sd_hijack starts the WebUI's shared state and command-line parsing)."""
    import types

    if str(webui) not in sys.path:
        sys.path.insert(0, str(webui))
    if "modules.sd_hijack" not in sys.modules:

        class TextualInversionEmbeddings(torch.nn.Embedding):
            def __init__(self, num_embeddings: int, embedding_dim: int, textual_inversion_key: str = "clip_l",
                         **kwargs) -> None:
                super().__init__(num_embeddings, embedding_dim, **kwargs)

        stub = types.ModuleType("modules.sd_hijack")
        stub.TextualInversionEmbeddings = TextualInversionEmbeddings  # type: ignore[attr-defined]
        sys.modules["modules.sd_hijack"] = stub
    from modules.models.sd3.mmdit import MMDiT, get_2d_sincos_pos_embed
    from modules.models.sd3.other_impls import SDClipModel, SDXLClipG
    from modules.models.sd3.sd3_impls import SDVAE, BaseModel

    return {"BaseModel": BaseModel, "MMDiT": MMDiT, "SDVAE": SDVAE, "SDClipModel": SDClipModel, "SDXLClipG": SDXLClipG,
            "sincos": get_2d_sincos_pos_embed}


def build_sd3(webui: Path, gen: torch.Generator, qk_norm: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The reduced SD3 checkpoint's state dict (fp16, the single-file key layout) and build statistics.

    ``qk_norm="rms"``: SD3.5 (large)'s MMDiT, whose attentions normalise q and k (``ln_q``/``ln_k`` in every
    block); Forge tells SD3.5 from SD3 by those keys."""
    import numpy as np

    classes = _import_sd3_classes(webui)
    hidden = 64 * SD3_DEPTH
    prefix = "model.diffusion_model."
    # BaseModel reads the MMDiT's size from these four shapes, as the WebUI does when it loads a checkpoint
    shapes = {"x_embedder.proj.weight": (hidden, 16, 2, 2), "pos_embed": (1, SD3_POS_EMBED_MAX_SIZE ** 2, hidden),
              "y_embedder.mlp.0.weight": (hidden, 768 + 1280), "context_embedder.weight": (hidden, 4096)}
    sizing = {prefix + k: torch.empty(v) for k, v in shapes.items()}
    if qk_norm is None:
        mmdit = classes["BaseModel"](shift=3, state_dict=sizing, prefix=prefix, device="cpu",
                                     dtype=torch.float32).diffusion_model.eval()
    else:  # BaseModel builds SD3's MMDiT only; the same arguments, with the q/k norms
        mmdit = classes["MMDiT"](
            input_size=None, pos_embed_scaling_factor=None, pos_embed_offset=None,
            pos_embed_max_size=SD3_POS_EMBED_MAX_SIZE, patch_size=2, in_channels=16, depth=SD3_DEPTH,
            num_patches=SD3_POS_EMBED_MAX_SIZE ** 2, adm_in_channels=768 + 1280, qk_norm=qk_norm,
            context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 4096,
                                                                               "out_features": hidden}},
            device="cpu", dtype=torch.float32).eval()
        with torch.no_grad():  # the RMS norms' weights are left uninitialised (torch.empty): near 1, as trained
            for name, param in mmdit.named_parameters():
                if ".ln_q." in name or ".ln_k." in name:
                    param.copy_(1 + 0.1 * torch.randn(param.shape, generator=gen))
    with torch.no_grad():  # the fixed sin-cos embedding the trained model holds (the class leaves zeros)
        mmdit.pos_embed.copy_(torch.from_numpy(
            classes["sincos"](hidden, SD3_POS_EMBED_MAX_SIZE).astype(np.float32)).unsqueeze(0))
    vae = classes["SDVAE"](device="cpu", dtype=torch.float32).eval()
    clip_l = classes["SDClipModel"](layer="hidden", layer_idx=-2, device="cpu", dtype=torch.float32,
                                    layer_norm_hidden_state=False, return_projected_pooled=False,
                                    textmodel_json_config=SD3_CLIPL_CONFIG).eval()
    clip_g = classes["SDXLClipG"](SD3_CLIPG_CONFIG, device="cpu", dtype=torch.float32).eval()
    parts = {prefix: mmdit, "first_stage_model.": vae, "text_encoders.clip_l.": clip_l,
             "text_encoders.clip_g.": clip_g}
    filled = [p + name for p, module in parts.items() for name in fill_zero_parameters(module, gen)]
    # SD3's VAE has no quant_conv: the encoder's conv_out gives the posterior's means and log-variances
    factor = _rescale_posterior(vae.encoder.conv_out, vae.encoder, SD3_SCALE, gen)
    for module in parts.values():
        half_parameters(module)  # in place, one module at a time: CLIP-G alone is 2.8 GB in fp32
    state = {p + k: v.half().contiguous() for p, module in parts.items() for k, v in module.state_dict().items()}
    del parts, mmdit, vae, clip_l, clip_g
    t5 = "text_encoders.t5xxl.transformer.encoder."
    for i in range(SD3_T5_LAYERS):
        for j in (0, 1):
            state[f"{t5}block.{i}.layer.{j}.layer_norm.weight"] = torch.ones(SD3_T5_DIM, dtype=torch.float16)
    state[f"{t5}final_layer_norm.weight"] = torch.ones(SD3_T5_DIM, dtype=torch.float16)
    state[f"{t5}block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (
        torch.randn(32, SD3_T5_HEADS, generator=gen) * 0.02).half()
    return state, {"zero_tensors_filled": len(filled), "vae_mean_rescale": round(factor, 3), "sd3_depth": SD3_DEPTH,
                   "mmdit_parameters": sum(v.numel() for k, v in state.items() if k.startswith(prefix))}


def write_sd3(webui: Path, dest: Path, gen: torch.Generator, started: float, model: str = "sd3") -> dict:
    from safetensors.torch import save_file

    state, stats = build_sd3(webui, gen, qk_norm="rms" if model == "sd35" else None)
    ckpt = dest / f"{CHECKPOINT_NAMES[model]}.safetensors"
    save_file(state, str(ckpt), metadata={"delta_e2e_fixture": str(FIXTURE_VERSION), "delta_e2e_model": model})
    manifest = {
        "fixture_version": FIXTURE_VERSION, "model": model, "seed": SEED, "files": {"checkpoint": ckpt.name},
        "loras": {}, **stats, "seconds": round(time.monotonic() - started, 1),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def half_parameters(model: torch.nn.Module) -> None:
    """fp16 parameters (half the disk; the WebUI upcasts with --no-half); buffers such as alphas_cumprod stay fp32."""
    for p in model.parameters():
        if p.is_floating_point():
            p.data = p.data.half()


# ---------------------------------------------------------------------------------------------- LoRA key names


_UNET_LAYERS = re.compile(
    r"(?:attn[12]\.(?:to_q|to_k|to_v|to_out\.0)|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)\.weight$"
)
_CLIP_LAYERS = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])\.weight$")
_OPENCLIP_LAYERS = re.compile(r"transformer\.resblocks\.(\d+)\.(attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc"
                              r"\.weight|mlp\.c_proj\.weight)$")
_OPENCLIP_TO_HF = {"attn.out_proj.weight": "self_attn_out_proj", "mlp.c_fc.weight": "mlp_fc1",
                   "mlp.c_proj.weight": "mlp_fc2"}


def _diffusers_unet_name(compvis: str) -> str:
    """compvis -> diffusers: input_blocks.4.1.transformer_blocks.0.attn1.to_q -> down_blocks_1_attentions_0_..."""
    m = re.match(r"middle_block\.1\.(.+)$", compvis)
    if m:
        return f"mid_block_attentions_0_{m.group(1).replace('.', '_')}"
    m = re.match(r"(input|output)_blocks\.(\d+)\.1\.(.+)$", compvis)
    if not m:
        raise ValueError(compvis)
    i, rest = int(m.group(2)), m.group(3).replace(".", "_")
    if m.group(1) == "input":
        return f"down_blocks_{(i - 1) // 3}_attentions_{(i - 1) % 3}_{rest}"
    return f"up_blocks_{i // 3}_attentions_{i % 3}_{rest}"


def lora_targets(model: str, shapes: dict[str, torch.Size]) -> dict[str, torch.Size]:
    """kohya module name -> weight shape of the layer it adapts, for the layers real LoRA trainers target."""
    targets: dict[str, torch.Size] = {}
    for key, shape in shapes.items():
        if key.startswith("model.diffusion_model.") and _UNET_LAYERS.search(key):
            compvis = key[len("model.diffusion_model."):-len(".weight")]
            if model.startswith("sdxl"):  # kohya's SDXL names are the compvis ones
                targets["lora_unet_" + compvis.replace(".", "_")] = shape
            else:
                targets["lora_unet_" + _diffusers_unet_name(compvis)] = shape
            continue
        m = _CLIP_LAYERS.search(key)
        if m and (key.startswith("cond_stage_model.") or key.startswith("conditioner.embedders.0.")):
            prefix = "lora_te1" if model.startswith("sdxl") else "lora_te"
            targets[f"{prefix}_text_model_encoder_layers_{m.group(1)}_{m.group(2).replace('.', '_')}"] = shape
            continue
        m = _OPENCLIP_LAYERS.search(key)
        if m and (key.startswith("cond_stage_model.model.") or key.startswith("conditioner.embedders.1.")):
            prefix = f"{'lora_te2' if model.startswith('sdxl') else 'lora_te'}_text_model_encoder_layers_{m.group(1)}"
            if m.group(2) == "attn.in_proj_weight":  # q, k and v are stacked in one MultiheadAttention weight
                dim = shape[1]
                for part in "qkv":
                    targets[f"{prefix}_self_attn_{part}_proj"] = torch.Size([dim, dim])
            else:
                targets[f"{prefix}_{_OPENCLIP_TO_HF[m.group(2)]}"] = shape
    return targets


def _factor_shapes(shape: torch.Size, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(down, up) shapes: linear [r, in] / [out, r]; 1x1 conv [r, in, 1, 1] / [out, r, 1, 1]."""
    out_dim, in_dim = shape[0], shape[1]
    tail = tuple(shape[2:])
    return (rank, in_dim, *tail), (out_dim, rank, *([1] * len(tail)))


def make_lora(targets: dict[str, torch.Size], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """kohya LoRA: ΔW = up @ down * alpha / rank, with entries of std LORA_STRENGTH / sqrt(fan_in)."""
    sd: dict[str, torch.Tensor] = {}
    scale = LORA_ALPHA / LORA_RANK
    for name, shape in targets.items():
        down_shape, up_shape = _factor_shapes(shape, LORA_RANK)
        fan_in = math.prod(shape[1:])
        down = torch.randn(down_shape, generator=gen) / math.sqrt(fan_in)
        # std(ΔW) = sqrt(rank) * std(up) * std(down) * scale  ->  LORA_STRENGTH / sqrt(fan_in)
        up = torch.randn(up_shape, generator=gen) * LORA_STRENGTH / (math.sqrt(LORA_RANK) * scale)
        sd[f"{name}.lora_down.weight"] = down.half()
        sd[f"{name}.lora_up.weight"] = up.half()
        sd[f"{name}.alpha"] = torch.tensor(LORA_ALPHA, dtype=torch.float16)
    return sd


def make_loha(targets: dict[str, torch.Size], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa: ΔW = (w1a @ w1b) ⊙ (w2a @ w2b) * alpha / rank, linear layers only, same overall strength."""
    sd: dict[str, torch.Tensor] = {}
    scale = LORA_ALPHA / LORA_RANK
    for name, shape in targets.items():
        if len(shape) != 2:
            continue
        out_dim, in_dim = shape
        # factors of std f: each product has std sqrt(rank) * f^2, their Hadamard product rank * f^4
        target = LORA_STRENGTH / math.sqrt(in_dim) / scale
        f = (target / LORA_RANK) ** 0.25
        for w in ("w1", "w2"):
            sd[f"{name}.hada_{w}_a"] = (torch.randn(out_dim, LORA_RANK, generator=gen) * f).half()
            sd[f"{name}.hada_{w}_b"] = (torch.randn(LORA_RANK, in_dim, generator=gen) * f).half()
        sd[f"{name}.alpha"] = torch.tensor(LORA_ALPHA, dtype=torch.float16)
    return sd


_BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd21v": "sd_v2", "sdxl": "sdxl_base_v1-0", "sdxl_full": "sdxl_base_v1-0"}


def _lora_metadata(model: str, module: str) -> dict[str, str]:
    return {"ss_network_module": module, "ss_network_dim": str(LORA_RANK), "ss_network_alpha": str(LORA_ALPHA),
            "ss_base_model_version": _BASE_MODEL_VERSION[model], "ss_v2": str(model == "sd21v")}


# ---------------------------------------------------------------------------------------------- writing


def write_model(webui: Path, model: str, out: Path) -> dict:
    """Write one model's checkpoint (+ yaml) and its LoRA files into out/<model>/; returns its manifest."""
    from safetensors.torch import save_file

    started = time.monotonic()
    dest = out / model
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)  # module default initialisation draws from the global generator
    gen = torch.Generator().manual_seed(SEED + MODELS.index(model))
    if model in ("sd3", "sd35"):
        return write_sd3(webui, dest, gen, started, model)

    net, yaml_beside = build_model(webui, model)
    filled = fill_zero_parameters(net, gen)
    vae_factor = calibrate_vae_encoder(net, float(net.scale_factor), gen)
    half_parameters(net)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    shapes = {k: v.shape for k, v in state.items()}
    targets = lora_targets(model, shapes)
    name = CHECKPOINT_NAMES[model]
    ckpt = dest / f"{name}.safetensors"
    save_file(state, str(ckpt), metadata={"delta_e2e_fixture": str(FIXTURE_VERSION), "delta_e2e_model": model})
    del state, net
    files = {"checkpoint": ckpt.name}
    if yaml_beside is not None:
        (dest / f"{name}.yaml").write_text(yaml_beside)
        files["yaml"] = f"{name}.yaml"

    lora_name = f"{name}_lora"
    save_file(make_lora(targets, gen), str(dest / f"{lora_name}.safetensors"),
              metadata=_lora_metadata(model, "networks.lora"))
    loras = {"lora": lora_name}
    if model == "sd15":
        save_file(make_loha(targets, gen), str(dest / f"{name}_loha.safetensors"),
                  metadata=_lora_metadata(model, "lycoris.kohya"))
        loras["loha"] = f"{name}_loha"
        data = (dest / f"{lora_name}.safetensors").read_bytes()
        (dest / f"{name}_corrupt.safetensors").write_bytes(data[: len(data) // 2])
        loras["corrupt"] = f"{name}_corrupt"

    manifest = {
        "fixture_version": FIXTURE_VERSION, "model": model, "seed": SEED, "files": files, "loras": loras,
        "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_modules": len(targets),
        "zero_tensors_filled": len(filled), "vae_mean_rescale": round(vae_factor, 3),
        "seconds": round(time.monotonic() - started, 1),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--webui", type=Path, required=True, help="AUTOMATIC1111 install (the repo root)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {MODELS}")
    args = parser.parse_args(argv)

    webui = args.webui.resolve()
    paths = _repositories(webui)
    sys.path[:0] = [str(paths["ldm"]), str(paths["sgm"])]
    os.chdir(webui)  # some configs and modules resolve paths relative to the WebUI root
    torch.set_grad_enabled(False)
    for model in args.models.split(","):
        manifest = write_model(webui, model.strip(), args.out.resolve())
        print(json.dumps(manifest), flush=True)


if __name__ == "__main__":
    main()
