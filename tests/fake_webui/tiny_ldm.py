"""Tiny stand-ins for ldm's ``LatentDiffusion`` (SD1, SD2) and sgm's ``DiffusionEngine`` (SDXL).

They have the attribute layout and state-dict key prefixes the WebUI relies on (``model.diffusion_model``,
``cond_stage_model.transformer`` / ``.model``, ``conditioner.embedders.N``, ``first_stage_model``,
``alphas_cumprod``) and are built from a config's ``target``/``params`` like the real ones; the networks are the
devkit's tiny UNet and text encoders.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from devkit.denoisers import scaled_linear_alphas_cumprod
from devkit.families import size_vector
from devkit.ldm_unet import PRESETS, UNetModel
from devkit.text_encoders import CLIPTextModel, OpenCLIPTextModel, TextConfig, WordHashTokenizer


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: nn.Module, conditioning_key: str):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = conditioning_key

    def forward(self, x, t, c_concat=None, c_crossattn=None, c_adm=None):
        if self.conditioning_key == "hybrid":
            x = torch.cat([x, *c_concat], dim=1)
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class OpenAIWrapper(nn.Module):
    """sgm's wrapper: reads ``crossattn``, ``vector`` and (inpainting) ``concat``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c, **kwargs):
        if "concat" in c:
            x = torch.cat([x, c["concat"]], dim=1)
        return self.diffusion_model(x, t, context=c.get("crossattn"), y=c.get("vector"))


class FakeVAE(nn.Module):
    """Stands in for the VAE only so that checkpoints carry ``first_stage_model.*`` keys; never run."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Conv2d(4, 3, 1)


# --- raw text encoders (what the WebUI's hijack wraps) -----------------------------------------------------------


class FrozenCLIPEmbedder(nn.Module):
    """HF CLIP; ``layer="last"`` (SD1) or ``"penultimate"`` (SDXL's first encoder, no final norm)."""

    def __init__(self, layer: str = "last", width: int = 32):
        super().__init__()
        self.tokenizer = WordHashTokenizer()
        self.transformer = CLIPTextModel(TextConfig(width=width))
        self.layer = layer

    def encode_ids(self, ids):
        out = self.transformer(ids)
        hidden = out.last_hidden_state if self.layer == "last" else out.hidden_states[-2]
        return hidden, out.pooled


class FrozenOpenCLIPEmbedder(nn.Module):
    """SD2's OpenCLIP: penultimate block output, then ``ln_final``."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.tokenizer = WordHashTokenizer(pad_with_eos=False)
        self.model = OpenCLIPTextModel(TextConfig(width=width))

    def encode_ids(self, ids):
        out = self.model(ids)
        return self.model.ln_final(out.hidden_states[-2]), out.pooled


class FrozenOpenCLIPEmbedder2(nn.Module):
    """SDXL's second encoder: penultimate output (no final norm) and the projected pooled EOS token."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.tokenizer = WordHashTokenizer(pad_with_eos=False)
        self.model = OpenCLIPTextModel(TextConfig(width=width, projection_dim=width))

    def encode_ids(self, ids):
        out = self.model(ids)
        return out.hidden_states[-2], out.pooled


class GeneralConditioner(nn.Module):
    def __init__(self):
        super().__init__()
        self.embedders = nn.ModuleList([FrozenCLIPEmbedder("penultimate"), FrozenOpenCLIPEmbedder2()])

    def forward(self, batch, force_zero_embeddings=()):
        texts = batch["txt"]
        outs = [e(texts) for e in self.embedders]
        crossattn = torch.cat(outs, dim=-1)
        pooled = outs[-1].pooled
        if "txt" in force_zero_embeddings:
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        h, w = (int(v) for v in batch["original_size_as_tuple"][0])
        sizes = size_vector(len(texts), h, w).to(pooled)
        return {"crossattn": crossattn, "vector": torch.cat([pooled, sizes], dim=-1)}


# --- the models -------------------------------------------------------------------------------------------------


class LatentDiffusion(nn.Module):
    """SD1 / SD2 (``family``), eps or v, optionally a 9-channel inpainting UNet (``conditioning_key="hybrid"``)."""

    def __init__(self, family: str = "sd1", parameterization: str = "eps", conditioning_key: str = "crossattn",
                 cond_stage_key: str = "txt", in_channels: int | None = None, use_ema: bool = False):
        super().__init__()
        in_channels = in_channels or (9 if conditioning_key == "hybrid" else 4)
        self.model = DiffusionWrapper(UNetModel(replace(PRESETS[family]["tiny"], in_channels=in_channels)),
                                      conditioning_key)
        self.cond_stage_model = FrozenCLIPEmbedder() if family == "sd1" else FrozenOpenCLIPEmbedder()
        self.first_stage_model = FakeVAE()
        self.register_buffer("alphas_cumprod", scaled_linear_alphas_cumprod())
        self.parameterization = parameterization
        self.cond_stage_key = cond_stage_key

    def apply_model(self, x_noisy, t, cond, return_ids=False):
        if not isinstance(cond, dict):
            cond = {"c_crossattn": [cond]}
        return self.model(x_noisy, t, **cond)

    def get_learned_conditioning(self, c):
        return self.cond_stage_model(c)


class DiffusionEngine(nn.Module):
    """SDXL (sgm)."""

    def __init__(self, parameterization: str = "eps", in_channels: int = 4, use_ema: bool = False):
        super().__init__()
        self.model = OpenAIWrapper(UNetModel(replace(PRESETS["sdxl"]["tiny"], in_channels=in_channels)))
        self.conditioner = GeneralConditioner()
        self.first_stage_model = FakeVAE()
        self.v_prediction = parameterization == "v"


def build(config: dict, seed: int) -> nn.Module:
    """A model with random, non-degenerate weights (for writing fixture checkpoints)."""
    from modules import sd_models

    from devkit.families import fill_zero_tensors

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = sd_models.instantiate_from_config(config)
    fill_zero_tensors(model, torch.Generator().manual_seed(seed + 7919))
    return model.eval().requires_grad_(False)
