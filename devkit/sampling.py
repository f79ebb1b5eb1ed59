"""Samplers in the style of k-diffusion's ``sampling.py``: ``model(x, sigma, **extra_args) -> x0``.

The same functions sample flow models when given flow sigmas in (0, 1] (``get_sigmas_flow``): the Euler
direction d = (x − x0)/σ is then the flow velocity. ``sample_ddim`` follows A1111's timestep sampler instead
(VP latent, ε-model).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Model = Callable[..., torch.Tensor]
Callback = Callable[[dict], None] | None


def append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


def get_sigmas_karras(
    n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Karras et al. (2022) noise schedule, n sigmas then 0."""
    ramp = torch.linspace(0, 1, n, device=device)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_flow(n: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """n flow sigmas from 1 down (evenly spaced t, then SD3's shift), then 0."""
    t = torch.linspace(1, 0, n + 1, device=device)[:-1]
    sigmas = t if shift == 1.0 else shift * t / (1 + (shift - 1) * t)
    return append_zero(sigmas)


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The ODE derivative dx/dσ = (x − x0)/σ."""
    return (x - denoised) / sigma


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """(σ_down, σ_up) for an ancestral step (VE): step deterministically to σ_down, then add σ_up noise."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Noise drawn on the generator's device (CPU generators give the same noise on any device)."""
    device = generator.device if generator is not None else x.device
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


def _report(callback: Callback, i: int, x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback: Callback = None
) -> torch.Tensor:
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_euler_ancestral(
    model: Model,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Ancestral Euler (VE sigmas only); noise comes from ``generator`` so runs are reproducible."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + _randn_like(x, generator) * sigma_up
    return x


@torch.no_grad()
def sample_heun(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback: Callback = None
) -> torch.Tensor:
    """Heun's second-order method: two model calls per step, Euler on the last step to σ = 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    model: Model, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None, callback: Callback = None
) -> torch.Tensor:
    """DPM-Solver++(2M), multistep in t = −log σ (VE sigmas)."""
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        _report(callback, i, x, sigmas[i], denoised)
        t, t_next = -sigmas[i].log(), -sigmas[i + 1].log()
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised
        else:
            r = (t + sigmas[i - 1].log()) / h  # h_last / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigmas[i + 1] / sigmas[i]) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
    return x


def get_timesteps_ddim(steps: int, num_timesteps: int = 1000) -> torch.Tensor:
    """A1111's timestep list for DDIM/PLMS: ascending, ``range(0, T, T // steps) + 1`` clipped to T − 1."""
    return (torch.arange(0, num_timesteps, num_timesteps // steps) + 1).clamp(0, num_timesteps - 1)


@torch.no_grad()
def sample_ddim(
    eps_model: Model,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    extra_args: dict | None = None,
    callback: Callback = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DDIM as A1111 runs it: ``x`` is the VP latent, ``eps_model(x, t) -> ε``; ``timesteps`` ascending.

    Like A1111 it makes ``len(timesteps) − 1`` model calls and ends at ᾱ of ``timesteps[0]``, not at ᾱ = 1.
    """
    extra_args = extra_args or {}
    ac = alphas_cumprod.to(torch.float64)
    alphas = ac[timesteps]
    alphas_prev = ac[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))]
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = eps_model(x, timesteps[index].item() * s_in, **extra_args)
        a_t, a_prev, sigma_t = alphas[index].item(), alphas_prev[index].item(), sigmas[index].item()
        pred_x0 = (x - (1 - a_t) ** 0.5 * e_t) / a_t**0.5
        x = a_prev**0.5 * pred_x0 + (1 - a_prev - sigma_t**2) ** 0.5 * e_t
        if sigma_t > 0:
            x = x + sigma_t * _randn_like(x, generator)
        if callback is not None:
            callback({"i": i, "x": x, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x
