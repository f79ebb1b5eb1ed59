"""Ready-made tiny model families: denoiser + text encoders + latent format + prediction type.

Every factory is deterministic in its seed and leaves the global RNG untouched. Default initialisation zeroes the
output convs, every transformer ``proj_out``, DiT's adaLN and final layer (and norm biases), so a fresh "random"
model ignores its prompt; ``fill_zero_tensors`` gives those tensors noise so that prompts, CFG and adaptations
actually move the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from devkit.denoisers import Cond, TimestepsDenoiser, make_denoiser
from devkit.dit import DiT, DiTConfig
from devkit.ldm_unet import PRESETS, UNetModel, timestep_embedding
from devkit.text_encoders import CLIPTextModel, OpenCLIPTextModel, TextConfig, TextOutput, WordHashTokenizer


@dataclass(frozen=True)
class LatentFormat:
    channels: int
    scale: float
    shift: float = 0.0


# Scaled latent x relates to the VAE's own latent z by z = x / scale + shift.
LATENT_FORMATS: dict[str, LatentFormat] = {
    "sd1": LatentFormat(4, 0.18215),  # SD1 and SD2
    "sdxl": LatentFormat(4, 0.13025),
    "sd3": LatentFormat(16, 1.5305, 0.0609),
    "flux": LatentFormat(16, 0.3611, 0.1159),
}


@torch.no_grad()
def fill_zero_tensors(module: nn.Module, generator: torch.Generator, scale: float = 1.0) -> int:
    """Fill every all-zero float parameter with noise; returns how many were filled.

    Matrices and conv kernels get std ``scale/√fan_in`` (variance-preserving); vectors (biases, norm shifts) get
    std ``0.1·scale``.
    """
    filled = 0
    for p in module.parameters():
        if not p.is_floating_point() or p.is_meta or p.numel() == 0 or bool(p.any()):
            continue
        std = scale / (p[0].numel() ** 0.5) if p.ndim >= 2 else 0.1 * scale
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32, device=generator.device)
        p.copy_(noise * std)
        filled += 1
    return filled


@dataclass
class Family:
    """A tiny model family. ``denoiser(x, sigma, cond) -> x0`` in the family's own noise convention."""

    name: str
    model: nn.Module
    text_encoders: list[nn.Module]
    tokenizers: list[WordHashTokenizer]
    latent_format: str
    prediction: str  # "eps", "v" or "flow"
    denoiser: nn.Module
    encoder: Callable[..., Cond] = field(repr=False)

    @property
    def unet(self) -> nn.Module:
        return self.model

    @property
    def latent_channels(self) -> int:
        return LATENT_FORMATS[self.latent_format].channels

    @property
    def is_flow(self) -> bool:
        return self.prediction == "flow"

    @torch.no_grad()
    def encode(self, prompts: str | list[str], **kwargs) -> Cond:
        """Conditioning as A1111 builds it: a context tensor (SD1/SD2), or ``{"crossattn", "vector"}``."""
        return self.encoder(self, [prompts] if isinstance(prompts, str) else list(prompts), **kwargs)

    def timestep_denoiser(self) -> TimestepsDenoiser:
        """The ε-returning timestep wrapper A1111 uses for DDIM/PLMS/UniPC (eps and v families)."""
        return TimestepsDenoiser(self.model, self.prediction, getattr(self.denoiser, "alphas_cumprod", None))

    def to(self, *args, **kwargs) -> Family:
        for m in (self.model, self.denoiser, *self.text_encoders):
            m.to(*args, **kwargs)
        return self

    def modules(self) -> list[nn.Module]:
        return [self.model, *self.text_encoders]


def _build(seed: int, ctor: Callable[[], nn.Module]) -> nn.Module:
    """Construct under a private RNG seeded with ``seed``, then fill the zero-initialised tensors."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = ctor()
    fill_zero_tensors(module, torch.Generator().manual_seed(seed + 7919))
    return module.eval().requires_grad_(False)


def _run(fam: Family, i: int, prompts: list[str]) -> TextOutput:
    te = fam.text_encoders[i]
    return te(fam.tokenizers[i](prompts).to(next(te.parameters()).device))


def _encode_sd1(fam: Family, prompts: list[str]) -> Cond:
    return _run(fam, 0, prompts).last_hidden_state


def _encode_sd2(fam: Family, prompts: list[str]) -> Cond:
    # SD2 (FrozenOpenCLIPEmbedder, layer="penultimate"): penultimate block output, then ln_final.
    return fam.text_encoders[0].ln_final(_run(fam, 0, prompts).hidden_states[-2])


def size_vector(
    batch: int, height: int, width: int, crop: tuple[int, int] = (0, 0), target: tuple[int, int] | None = None
) -> torch.Tensor:
    """SDXL's size conditioning: original (h, w), crop (top, left), target (h, w), 256-dim embedding each."""
    values = torch.tensor([height, width, *crop, *(target or (height, width))], dtype=torch.float32)
    return timestep_embedding(values, 256).flatten()[None].expand(batch, -1)


def _encode_sdxl(
    fam: Family,
    prompts: list[str],
    height: int = 1024,
    width: int = 1024,
    crop: tuple[int, int] = (0, 0),
    target: tuple[int, int] | None = None,
) -> Cond:
    # CLIP-L: penultimate hidden state, no final norm; OpenCLIP-bigG: penultimate (no ln_final) + projected pool.
    out_l, out_g = _run(fam, 0, prompts), _run(fam, 1, prompts)
    crossattn = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1)
    vector = torch.cat([out_g.pooled, size_vector(len(prompts), height, width, crop, target).to(out_g.pooled)], dim=-1)
    return {"crossattn": crossattn, "vector": vector}


def _encode_flow(fam: Family, prompts: list[str]) -> Cond:
    out = _run(fam, 0, prompts)
    return {"crossattn": out.last_hidden_state, "vector": out.pooled}


def tiny_sd1(seed: int = 0, text_seed: int | None = None) -> Family:
    """SD1.x layout (conv proj_in/out, HF CLIP), ε-prediction. ``text_seed`` lets two UNets share a text encoder."""
    unet = _build(seed, lambda: UNetModel(PRESETS["sd1"]["tiny"]))
    te = _build(seed if text_seed is None else text_seed, lambda: CLIPTextModel(TextConfig(width=32)))
    return Family("sd1", unet, [te], [WordHashTokenizer()], "sd1", "eps", make_denoiser(unet, "eps"), _encode_sd1)


def tiny_sd2v(seed: int = 0, text_seed: int | None = None) -> Family:
    """SD2.x-768-v layout (linear proj, OpenCLIP), v-prediction."""
    unet = _build(seed, lambda: UNetModel(PRESETS["sd2"]["tiny"]))
    te = _build(seed if text_seed is None else text_seed, lambda: OpenCLIPTextModel(TextConfig(width=32)))
    tok = WordHashTokenizer(pad_with_eos=False)
    return Family("sd2v", unet, [te], [tok], "sd1", "v", make_denoiser(unet, "v"), _encode_sd2)


def tiny_sdxl(seed: int = 0, text_seed: int | None = None) -> Family:
    """SDXL layout: two text encoders (32 + 32 context), pooled + size vector into ``y``, ε-prediction."""
    unet = _build(seed, lambda: UNetModel(PRESETS["sdxl"]["tiny"]))
    ts = seed if text_seed is None else text_seed
    clip_l = _build(ts, lambda: CLIPTextModel(TextConfig(width=32)))
    clip_g = _build(ts + 1, lambda: OpenCLIPTextModel(TextConfig(width=32, projection_dim=32)))
    toks = [WordHashTokenizer(), WordHashTokenizer(pad_with_eos=False)]
    return Family("sdxl", unet, [clip_l, clip_g], toks, "sdxl", "eps", make_denoiser(unet, "eps"), _encode_sdxl)


def tiny_flow(seed: int = 0, latent_format: str = "sd3", shift: float = 1.0, text_seed: int | None = None) -> Family:
    """A DiT rectified-flow model (predicts v = noise − x0); channels follow ``latent_format``."""
    channels = LATENT_FORMATS[latent_format].channels
    model = _build(seed, lambda: DiT(DiTConfig(in_channels=channels, context_dim=32, adm_in_channels=32)))
    te = _build(seed if text_seed is None else text_seed, lambda: CLIPTextModel(TextConfig(width=32)))
    denoiser = make_denoiser(model, "flow", shift=shift)
    return Family("flow", model, [te], [WordHashTokenizer()], latent_format, "flow", denoiser, _encode_flow)


FAMILIES: dict[str, Callable[..., Family]] = {
    "sd1": tiny_sd1,
    "sd2v": tiny_sd2v,
    "sdxl": tiny_sdxl,
    "flow": tiny_flow,
}
