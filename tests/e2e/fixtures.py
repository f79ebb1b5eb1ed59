"""Random-weight WebUI checkpoints and LoRA files for the end-to-end tests.

Runs under the WebUI's own python (the harness starts it as a subprocess):

    <webui python> tests/e2e/fixtures.py --webui <A1111 root> --out <dir> [--models sd15,sd21v,sdxl]
    <webui python> tests/e2e/fixtures.py --webui <A1111 root> --out <dir> --models cn_sd15 --controlnet <ext dir>

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
  yaml is written beside it). Built only when asked for by name.
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

ControlNets (not checkpoints: the harness puts them under models/ControlNet; built only when asked for by name):
- ip_sd15: a plain SD1.5 IP-Adapter (the layout of h94's ip-adapter_sd15: `image_proj.proj` 1024 -> 4 x 768 tokens and
  its LayerNorm; `ip_adapter.{2n+1}.to_k_ip`/`to_v_ip` for the 16 cross-attentions in sd-webui-controlnet's order),
  random fan-in-scaled weights (IP_STRENGTH), the LayerNorm's zero bias refilled; fp16 safetensors, 22 M parameters.
  sd-webui-controlnet lists it with the ControlNets (models/ControlNet) and builds its IPAdapterModel from it.
- ip_plus_sd15: an SD1.5 IP-Adapter Plus (h94's ip-adapter-plus_sd15 layout: the image projection is
  sd-webui-controlnet's own Resampler class, 16 tokens from the ViT-H penultimate hidden states, width 1280), the same
  `ip_adapter.*` layout; its zero-initialised biases refilled.
- clip_h: the ViT-H CLIP-vision encoder sd-webui-controlnet's `ip-adapter_clip_h` preprocessor loads, at full size
  (its ClipVisionDetector builds transformers' CLIPVisionModelWithProjection from a fixed config, read from the
  extension's annotator/clipvision/__init__.py, and loads `<annotator models>/clip_vision/clip_h.pth` into it: a
  reduced file could not load). Random transformers initialisation, its zero biases refilled; a plain state dict in
  fp16 saved with torch.save in the legacy format the WebUI's safe unpickler reads, 632 M parameters, 1.3 GB. The
  harness links it where the extension looks, so it never downloads the real one.
- cn_sd15: an SD1.5 ControlNet of the real full-size layout (`control_model.*` keys, the ldm layout of the official
  ControlNet 1.0/1.1 files), built from sd-webui-controlnet's own `scripts/cldm.py` ControlNet class with the SD1.5
  configuration its `controlnet_model_guess.py` loads such a file with (`--controlnet` names that extension's
  checkout). Both sd-webui-controlnet (`build_model_by_guess`) and Forge's built-in ControlNet
  (`try_load_supported_control_model`, which sizes the network from the shapes) load it. A trained ControlNet starts
  from zero convolutions (`zero_convs.*`, `middle_block_out`, the last conv of `input_hint_block`), and the copied
  UNet encoder has zero-initialised resblock output convs and `proj_out`s: all are refilled, so the control moves
  the image and depends on its hint. 361 M parameters, 0.72 GB in fp16.
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
# One model's own version on top of FIXTURE_VERSION (0 when absent): bumping an entry rebuilds that model alone, where
# FIXTURE_VERSION rebuilds every model (GBs). Written into the manifest as "model_version"; the harness compares it.
MODEL_VERSIONS = {"cn_sd15": 2, "ip_sd15": 1, "clip_h": 2, "ip_plus_sd15": 1}
SEED = 20251203
LORA_RANK = 4
LORA_ALPHA = 2.0
# A LoRA's ΔW has entries of std LORA_STRENGTH / sqrt(fan_in), about a sixth of a default-initialised layer's.
# Measured on the SD1.5 fixture (4-step 64x64): <lora:NAME:1> lands near 20 dB PSNR from the plain image, and the
# change still scales with the multiplier (about 6 dB per halving); at 3.5x this strength it saturates near 17 dB.
LORA_STRENGTH = 0.1

MODELS = ("sd15", "sd21v", "sdxl", "sd3", "sd35", "cn_sd15", "sdxl_full", "ip_sd15", "clip_h",
          "ip_plus_sd15")  # append only: an index seeds its generator
CHECKPOINT_NAMES = {"sd15": "delta_e2e_sd15", "sd21v": "delta_e2e_sd21v", "sdxl": "delta_e2e_sdxl_small",
                    "sd3": "delta_e2e_sd3_small", "sd35": "delta_e2e_sd35_small", "cn_sd15": "delta_e2e_cn_sd15",
                    "sdxl_full": "delta_e2e_sdxl", "ip_sd15": "ip-adapter_delta_e2e_sd15", "clip_h": "clip_h",
                    "ip_plus_sd15": "ip-adapter-plus_delta_e2e_sd15"}
# ControlNets, built from sd-webui-controlnet's classes (--controlnet); left out of the default --models. The name
# carries "sd15": sd-webui-controlnet tells a unit's family from its model's name and warns on an unknown one.
CONTROLNET_MODELS = ("cn_sd15", "ip_sd15", "clip_h", "ip_plus_sd15")
# An IP-Adapter's to_k_ip/to_v_ip entries have std IP_STRENGTH / sqrt(768). Measured on the SD1.5 fixture (4-step
# 64x64, weight 1): the extension's own IP-Adapter unit lands below 25 dB PSNR from the plain image (see docs/e2e.md).
IP_STRENGTH = 1.0
# sd-webui-controlnet's transformer order (input blocks 1, 2, 4, 5, 7, 8; output blocks 3-11; the middle block): the
# inner width of each SD1.5 cross-attention an IP-Adapter's ip_adapter.{2n+1}.* tensors serve
IP_SD15_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)
GPU_ONLY_MODELS = ("sdxl_full",)  # about 15 GB of RAM to build and to run on a CPU: left out of the default --models
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


def _controlnet_default_config(extension: Path) -> dict:
    """`controlnet_default_config` of sd-webui-controlnet's scripts/controlnet_model_guess.py, the configuration it
    builds an SD1.5 ldm-layout ControlNet with. Read, not imported: that module imports the WebUI's runtime and
    every other control type's code."""
    import ast

    source = (extension / "scripts" / "controlnet_model_guess.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "controlnet_default_config"
                                                for t in node.targets):
            return dict(ast.literal_eval(node.value))
    raise RuntimeError(f"controlnet_default_config not found in {extension}/scripts/controlnet_model_guess.py")


def _import_controlnet_class(webui: Path, extension: Path) -> type:
    """sd-webui-controlnet's `scripts.cldm.ControlNet`, imported without the WebUI's runtime: cldm.py imports
    `modules.devices` only for its low-VRAM helpers (importing the real one starts the WebUI's shared state and
    command-line parsing), so a stand-in module takes its place; the network itself is built from the ldm/sgm blocks
    of the WebUI's repositories, as the extension does at run time.

    The extension's modules import each other as `scripts.*`, but generative-models (on sys.path for sgm) holds a
    regular `scripts` package, which any import of `scripts` would find first: the extension's folder is
    registered as the `scripts` package explicitly."""
    import types

    folder = str(extension / "scripts")
    package = sys.modules.get("scripts")
    if package is None:
        package = types.ModuleType("scripts")
        package.__path__ = [folder]  # type: ignore[attr-defined]
        sys.modules["scripts"] = package
    elif list(getattr(package, "__path__", [])) != [folder]:
        raise RuntimeError(f"another `scripts` package is already imported: {package}")
    if str(webui) not in sys.path:
        sys.path.append(str(webui))  # the `modules` namespace package
    sys.modules.setdefault("modules.devices", types.ModuleType("modules.devices"))
    from scripts.cldm import ControlNet

    return ControlNet


def controlnet_hint(size: int = 64, outline: bool = False) -> torch.Tensor:
    """A [1, 3, size, size] hint in [0, 1]: a white square on black, as the tests' control image (what preprocessor
    "none" passes on), or only its outline, 2 px wide (about what canny makes of it)."""
    hint = torch.zeros(1, 3, size, size)
    lo, hi = size // 4, 3 * size // 4
    hint[..., lo:hi, lo:hi] = 1.0
    if outline:
        hint[..., lo + 1:hi - 1, lo + 1:hi - 1] = 0.0
        hint[..., lo - 1:hi + 1, lo - 1] = hint[..., lo - 1:hi + 1, hi] = 1.0
        hint[..., lo - 1, lo - 1:hi + 1] = hint[..., hi, lo - 1:hi + 1] = 1.0
    return hint


def calibrate_hint_block(net: torch.nn.Module, x: torch.Tensor, gen: torch.Generator) -> list[float]:
    """Redraw the hint encoder (`input_hint_block`, eight 3x3 convs with SiLU between) so that the hint reaches the
    network; returns the scale given to each conv.

    With default initialisation each conv and SiLU shrinks the signal by about a half, so after eight convs the
    encoded hint is a thousandth of the biases' constant: a fixture built so ignores its hint entirely (on
    sd-webui-controlnet, preprocessor "none" and "canny" gave images 74 dB apart, identical to the eye), and tests
    of the hint's path (preprocessor, resize) would prove nothing. So every conv is redrawn with fan-in-scaled
    weights and small biases, then scaled in turn to unit output std on the square hint (data-dependent
    initialisation), and the last so that the encoded hint, added to the features of the first input block, has
    their std on a unit-variance latent, as a trained ControlNet's hint is as strong as what it is added to."""
    convs = [m for m in net.input_hint_block if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * conv.weight[0].numel() ** -0.5)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen) * 0.02)
    target = float(net.input_blocks[0][0](x).std())  # the first input block is conv_in alone
    scales = []
    y = controlnet_hint(64)
    for module in net.input_hint_block:
        y = module(y)
        if isinstance(module, torch.nn.Conv2d):
            scale = (target if module is convs[-1] else 1.0) / float(y.std())
            module.weight.mul_(scale)
            module.bias.mul_(scale)
            y = y * scale
            scales.append(round(scale, 3))
    return scales


def write_controlnet(webui: Path, extension: Path, model: str, dest: Path, gen: torch.Generator,
                     started: float) -> dict:
    """The SD1.5 ControlNet fixture: the extension's ControlNet class with the configuration its model guess uses,
    every all-zero parameter refilled, saved in fp16 under the `control_model.` prefix of the official files."""
    from safetensors.torch import save_file

    control_net = _import_controlnet_class(webui, extension)
    config = _controlnet_default_config(extension)
    # what build_model_by_guess sets for an SD1.5 ldm-layout file: RGB hint, CLIP-L context, no global pooling
    config.update(hint_channels=3, context_dim=768, global_average_pooling=False, use_fp16=False)
    net = control_net(**config).eval()
    filled = fill_zero_parameters(net, gen)
    x = torch.randn(1, 4, 8, 8, generator=gen)  # a 64x64 image's latent, at the unit variance the UNet sees
    hint_scales = calibrate_hint_block(net, x, gen)
    # One forward on the fixture's kind of input: the 13 residuals it adds to the UNet (12 skips and the middle
    # block), and how much of them the hint decides (the outline against the filled square), recorded so that a
    # change of scale shows in the manifest.
    context = torch.randn(1, 77, 768, generator=gen)
    t = torch.tensor([500.0])
    outs = net(x, controlnet_hint(64), t, context)
    outline = net(x, controlnet_hint(64, outline=True), t, context)
    if not all(torch.isfinite(o).all() for o in [*outs, *outline]):
        raise RuntimeError("the ControlNet fixture's residuals are not finite")
    residual_std = [round(float(o.std()), 3) for o in outs]
    hint_share = [round(float((o - q).std() / o.std()), 3) for o, q in zip(outs, outline, strict=True)]
    half_parameters(net)
    state = {f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()}
    path = dest / f"{CHECKPOINT_NAMES[model]}.safetensors"
    save_file(state, str(path), metadata={"delta_e2e_fixture": str(FIXTURE_VERSION), "delta_e2e_model": model})
    manifest = {
        "fixture_version": FIXTURE_VERSION, "model_version": MODEL_VERSIONS.get(model, 0), "model": model,
        "kind": "controlnet", "seed": SEED, "files": {"controlnet": path.name}, "loras": {},
        "parameters": sum(v.numel() for v in state.values()), "tensors": len(state),
        "config": {k: v for k, v in config.items()}, "zero_tensors_filled": len(filled), "filled": filled,
        "hint_block_scales": hint_scales, "residual_std": residual_std, "residual_hint_share": hint_share,
        "seconds": round(time.monotonic() - started, 1),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _resampler_state(extension: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """An IP-Adapter Plus image projection: sd-webui-controlnet's Resampler with the SD1.5 Plus configuration
    (IPAdapterModel: dim = cross-attention width, depth 4, 12 heads of 64, 16 queries, ViT-H hidden width 1280), its
    zero parameters refilled. image_proj_models.py needs torch alone: loaded from its file."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("delta_e2e_image_proj_models",
                                                  extension / "scripts" / "ipadapter" / "image_proj_models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.Resampler(dim=768, depth=4, dim_head=64, heads=12, num_queries=16, embedding_dim=1280,
                           output_dim=768, ff_mult=4)
    fill_zero_parameters(net, gen)
    return {f"image_proj.{k}": v for k, v in net.state_dict().items()}


def write_ipadapter(model: str, dest: Path, gen: torch.Generator, started: float, extension: Path | None) -> dict:
    """The SD1.5 IP-Adapter fixtures, plain and Plus (see the module doc)."""
    from safetensors.torch import save_file

    context, tokens, clip_dim = 768, 4, 1024
    if model == "ip_plus_sd15":
        if extension is None:
            raise ValueError(f"{model} is built from sd-webui-controlnet's classes: pass --controlnet")
        state = _resampler_state(extension, gen)
    else:
        state = {"image_proj.proj.weight": torch.randn(tokens * context, clip_dim, generator=gen) / clip_dim ** 0.5,
                 "image_proj.proj.bias": torch.randn(tokens * context, generator=gen) * 0.02,
                 "image_proj.norm.weight": torch.ones(context),
                 "image_proj.norm.bias": torch.randn(context, generator=gen) * 0.02}
    for n, width in enumerate(IP_SD15_WIDTHS):
        for kind in ("k", "v"):
            weight = torch.randn(width, context, generator=gen) * IP_STRENGTH / context ** 0.5
            state[f"ip_adapter.{2 * n + 1}.to_{kind}_ip.weight"] = weight
    state = {k: v.half().contiguous() for k, v in state.items()}
    path = dest / f"{CHECKPOINT_NAMES[model]}.safetensors"
    save_file(state, str(path), metadata={"delta_e2e_fixture": str(FIXTURE_VERSION), "delta_e2e_model": model})
    manifest = {
        "fixture_version": FIXTURE_VERSION, "model_version": MODEL_VERSIONS.get(model, 0), "model": model,
        "kind": "ipadapter", "seed": SEED, "files": {"controlnet": path.name}, "loras": {},
        "parameters": sum(v.numel() for v in state.values()), "tensors": len(state), "strength": IP_STRENGTH,
        "seconds": round(time.monotonic() - started, 1),
    }
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _clip_vision_config(extension: Path, name: str) -> dict:
    """`config_<name>` of sd-webui-controlnet's annotator/clipvision/__init__.py (read: that module loads files and
    the WebUI's runtime on import)."""
    import ast

    source = (extension / "annotator" / "clipvision" / "__init__.py").read_text()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == f"config_{name}" for t in node.targets):
            return dict(ast.literal_eval(node.value))
    raise RuntimeError(f"config_{name} not found in {extension}/annotator/clipvision/__init__.py")


def write_clip_vision(extension: Path, model: str, dest: Path, gen: torch.Generator, started: float) -> dict:
    """The ViT-H CLIP-vision fixture (see the module doc)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    config = _clip_vision_config(extension, model)
    net = CLIPVisionModelWithProjection(CLIPVisionConfig(**config)).eval()
    filled = fill_zero_parameters(net, gen)
    half_parameters(net)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    path = dest / f"{CHECKPOINT_NAMES[model]}.pth"
    # The legacy (non-zip) format: the zip format of torch >= 2.5 holds a `.format_version` entry, which the
    # WebUI's safe unpickler (modules/safe.py, through which the extension's torch.load goes) refuses.
    torch.save(state, str(path), _use_new_zipfile_serialization=False)
    manifest = {
        "fixture_version": FIXTURE_VERSION, "model_version": MODEL_VERSIONS.get(model, 0), "model": model,
        "kind": "clip_vision", "seed": SEED, "files": {"clip_vision": path.name}, "loras": {},
        "parameters": sum(v.numel() for v in state.values()), "tensors": len(state), "config": config,
        "zero_tensors_filled": len(filled), "seconds": round(time.monotonic() - started, 1),
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


def write_model(webui: Path, model: str, out: Path, controlnet: Path | None = None) -> dict:
    """Write one model's checkpoint (+ yaml) and its LoRA files into out/<model>/; returns its manifest.
    ``controlnet``: the sd-webui-controlnet checkout, for the models of CONTROLNET_MODELS."""
    from safetensors.torch import save_file

    started = time.monotonic()
    dest = out / model
    dest.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(SEED)  # module default initialisation draws from the global generator
    gen = torch.Generator().manual_seed(SEED + MODELS.index(model))
    if model in ("sd3", "sd35"):
        return write_sd3(webui, dest, gen, started, model)
    if model in ("ip_sd15", "ip_plus_sd15"):
        return write_ipadapter(model, dest, gen, started, controlnet)
    if model in CONTROLNET_MODELS:
        if controlnet is None:
            raise ValueError(f"{model} is built from sd-webui-controlnet's classes: pass --controlnet")
        if model == "clip_h":
            return write_clip_vision(controlnet, model, dest, gen, started)
        return write_controlnet(webui, controlnet, model, dest, gen, started)

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
    checkpoints = [m for m in MODELS if m not in CONTROLNET_MODELS and m not in GPU_ONLY_MODELS]
    parser.add_argument("--models", default=",".join(checkpoints), help=f"comma-separated subset of {MODELS}")
    parser.add_argument("--controlnet", type=Path, help="sd-webui-controlnet checkout (for the ControlNet models)")
    args = parser.parse_args(argv)

    webui = args.webui.resolve()
    paths = _repositories(webui)
    sys.path[:0] = [str(paths["ldm"]), str(paths["sgm"])]
    os.chdir(webui)  # some configs and modules resolve paths relative to the WebUI root
    torch.set_grad_enabled(False)
    for model in args.models.split(","):
        manifest = write_model(webui, model.strip(), args.out.resolve(),
                               args.controlnet.resolve() if args.controlnet else None)
        print(json.dumps(manifest), flush=True)


if __name__ == "__main__":
    main()
