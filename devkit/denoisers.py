"""k-diffusion-style wrappers: every model, whatever it predicts, seen as ``denoiser(x, sigma, cond) -> x0``.

VE convention (SD1/SD2/SDXL): ``x = x0 + σ·ε`` on the scaled latent. Flow convention (SD3/Flux-like):
``x = (1 − σ)·x0 + σ·noise`` with σ ∈ (0, 1]. The inner model is called as ``model(x, t, context=..., y=...)``;
``cond`` is the context tensor, or a dict ``{"crossattn": context, "vector": y}`` as A1111 builds for SDXL.
"""

from __future__ import annotations

import torch
from torch import nn

from devkit.sampling import get_sigmas_flow

Cond = torch.Tensor | dict[str, torch.Tensor]


def scaled_linear_alphas_cumprod(n: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """ᾱ of the DDPM "scaled linear" schedule used by SD1/SD2/SDXL (float64 math, float32 like ldm's buffer)."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def _bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    v = torch.as_tensor(v, dtype=x.dtype, device=x.device)
    if v.ndim == 0:
        v = v.expand(x.shape[0])
    return v.reshape(-1, *([1] * (x.ndim - 1)))


def call_model(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    """Call a UNet/DiT with the conditioning in either of its two forms."""
    t = torch.as_tensor(t, device=x.device).float()
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    if isinstance(cond, dict):
        return model(x, t, context=cond["crossattn"], y=cond.get("vector"))
    return model(x, t, context=cond)


class DiscreteSchedule(nn.Module):
    """The discrete VE schedule over ᾱ, with k-diffusion's ``DiscreteSchedule`` σ ↔ t maps."""

    def __init__(self, alphas_cumprod: torch.Tensor | None = None, quantize: bool = False):
        super().__init__()
        ac = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.float()
        sigmas = ((1 - ac) / ac) ** 0.5
        self.register_buffer("alphas_cumprod", ac, persistent=False)
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.quantize = quantize

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """Fractional timestep by interpolating log σ between its two neighbours in the table."""
        quantize = self.quantize if quantize is None else quantize
        sigma = torch.as_tensor(sigma, device=self.log_sigmas.device)
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = self.log_sigmas[low_idx], self.log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=self.log_sigmas.device).float()
        low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low_idx] + w * self.log_sigmas[high_idx]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """``n`` evenly spaced timesteps from the top, plus a final 0 (k-diffusion ``get_sigmas``)."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return torch.cat([self.t_to_sigma(t), t.new_zeros(1)])


class DiscreteVEDenoiser(DiscreteSchedule):
    """A model on the discrete schedule; subclasses set the parameterisation through ``get_scalings``."""

    prediction = ""

    def __init__(self, model: nn.Module, alphas_cumprod: torch.Tensor | None = None, quantize: bool = False):
        super().__init__(alphas_cumprod, quantize)
        self.inner_model = model

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        c_skip, c_out, c_in = (_bcast(s, x) for s in self.get_scalings(sigma))
        out = call_model(self.inner_model, x * c_in, self.sigma_to_t(sigma), cond)
        return out * c_out + x * c_skip


class EpsDenoiser(DiscreteVEDenoiser):
    """ε-prediction (k-diffusion ``CompVisDenoiser``): x0 = x − σ·ε."""

    prediction = "eps"

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1) ** 0.5


class VDenoiser(DiscreteVEDenoiser):
    """v-prediction (k-diffusion ``CompVisVDenoiser``, σ_data = 1)."""

    prediction = "v"

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return 1 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5, 1 / (sigma**2 + 1) ** 0.5


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift: σ = shift·t / (1 + (shift − 1)·t)."""
    return t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)


class FlowDenoiser(nn.Module):
    """Rectified flow (ComfyUI ``CONST`` / ``ModelSamplingDiscreteFlow``): the model predicts v = noise − x0 from
    the unscaled input at timestep 1000·σ, and x0 = x − σ·v."""

    prediction = "flow"

    def __init__(self, model: nn.Module, shift: float = 1.0, multiplier: float = 1000.0, timesteps: int = 1000):
        super().__init__()
        self.inner_model = model
        self.shift = shift
        self.multiplier = multiplier
        t = torch.arange(1, timesteps + 1, dtype=torch.float32) / timesteps
        self.register_buffer("sigmas", flow_shift(t, shift), persistent=False)

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """The model's timestep input; the shift lives in the schedule, not here."""
        return torch.as_tensor(sigma) * self.multiplier

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(t) / self.multiplier

    def get_sigmas(self, n: int) -> torch.Tensor:
        """``n`` shifted sigmas from 1 down, plus a final 0 (ComfyUI's "simple" on this schedule)."""
        return get_sigmas_flow(n, self.shift).to(self.sigmas.device)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
        v = call_model(self.inner_model, x, self.sigma_to_t(sigma), cond)
        return x - _bcast(sigma, x) * v


class TimestepsDenoiser(nn.Module):
    """A1111's ``CompVisTimestepsDenoiser`` / ``CompVisTimestepsVDenoiser`` for DDIM/PLMS/UniPC: takes the VP
    latent ``x_t = √ᾱ·x0 + √(1−ᾱ)·ε`` and a (possibly fractional) timestep and returns ε.

    For v-models ε = √ᾱ·v + √(1−ᾱ)·x_t; A1111 reads ᾱ at ``int(t)``, here ᾱ follows the same log-σ
    interpolation as the VE wrappers (identical at integer t).
    """

    def __init__(self, model: nn.Module, prediction: str = "eps", alphas_cumprod: torch.Tensor | None = None):
        super().__init__()
        if prediction not in ("eps", "v"):
            raise ValueError(f"timestep samplers need an eps or v model, not {prediction!r}")
        self.inner_model = model
        self.schedule = DiscreteSchedule(alphas_cumprod)
        self.prediction = prediction

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.schedule.alphas_cumprod

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device).float()
        out = call_model(self.inner_model, x, t, cond)
        if self.prediction == "eps":
            return out
        sigma = self.schedule.t_to_sigma(t.expand(x.shape[0]) if t.ndim == 0 else t)
        ac = _bcast(1 / (sigma**2 + 1), x)
        return ac.sqrt() * out + (1 - ac).sqrt() * x


def make_denoiser(model: nn.Module, prediction: str, **kwargs) -> nn.Module:
    """The x0 wrapper for a prediction type: ``"eps"``, ``"v"`` or ``"flow"``."""
    return {"eps": EpsDenoiser, "v": VDenoiser, "flow": FlowDenoiser}[prediction](model, **kwargs)
