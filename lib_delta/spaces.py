"""Latent formats, noise conventions and parameterisations, and the bridge that makes two models agree.

Conventions used throughout:
- A *scaled* latent is what a diffusion model sees: ``x = (z - shift) * scale`` for the VAE's unscaled latent z.
- **VE** (variance exploding, k-diffusion): ``x = x0 + sigma * eps``; SD1/SD2/SDXL samplers work here.
- **flow** (rectified flow, SD3/Flux): ``x = (1 - t) * x0 + t * eps`` with t in [0, 1]; the same noisy point in VE
  form is ``x_ve = x / (1 - t)`` at ``sigma = t / (1 - t)``.
- **VP** (DDPM timesteps, A1111's DDIM/PLMS/UniPC): ``x = sqrt(a) * x0 + sqrt(1 - a) * eps`` with a = alphas_cumprod[t];
  in VE form ``x_ve = x / sqrt(a)`` at ``sigma = sqrt((1 - a) / a)``.
Every model is evaluated through a wrapper that returns x0, so deltas are taken between x0 predictions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import DeltaError


@dataclass(frozen=True)
class LatentFormat:
    """How a family's VAE latent is scaled for its diffusion model."""

    name: str
    channels: int
    scale: float
    shift: float = 0.0

    def to_unscaled(self, x: Tensor) -> Tensor:
        return x / self.scale + self.shift

    def from_unscaled(self, z: Tensor) -> Tensor:
        return (z - self.shift) * self.scale


SD1 = LatentFormat("SD1", 4, 0.18215)
SD2 = LatentFormat("SD2", 4, 0.18215)
SDXL = LatentFormat("SDXL", 4, 0.13025)
SD3 = LatentFormat("SD3", 16, 1.5305, 0.0609)
FLUX = LatentFormat("Flux", 16, 0.3611, 0.1159)
LATENT_FORMATS = {f.name: f for f in (SD1, SD2, SDXL, SD3, FLUX)}


def check_latent_compatible(source: LatentFormat, target: LatentFormat, source_name: str, target_name: str,
                            examples: Sequence[str] | None = None) -> None:
    """Refuse a pairing whose latents cannot be converted into each other. ``examples``: the model families the
    running host loads that could steer this target, named in the refusal (by default the families of this module
    with the target's channel count)."""
    if source.channels != target.channels:
        if examples is None:
            examples = [f.name for f in LATENT_FORMATS.values() if f.channels == target.channels]
        such = ", ".join(examples) if examples else f"another {target.channels}-channel model"
        raise DeltaError(
            f"The source model '{source_name}' ({source.name}, {source.channels} latent channels) cannot steer the "
            f"target '{target_name}' ({target.name}, {target.channels} latent channels): Delta Sampling needs both "
            f"models to share a latent space. Choose a source of the target's family (a {target.channels}-channel "
            f"model such as {such})."
        )


@dataclass(frozen=True)
class LatentMap:
    """The affine map ``x_dst = a * x_src + b`` between two scaled latent formats (through the unscaled latent)."""

    a: float
    b: float

    @staticmethod
    def between(src: LatentFormat, dst: LatentFormat) -> LatentMap:
        a = dst.scale / src.scale
        return LatentMap(a, (src.shift - dst.shift) * dst.scale)

    @property
    def identity(self) -> bool:
        return self.a == 1.0 and self.b == 0.0

    def x0(self, x0: Tensor) -> Tensor:
        """Map a clean latent (or x0 prediction)."""
        return x0 if self.identity else x0 * self.a + self.b

    def delta(self, d: Tensor) -> Tensor:
        """Map a difference of latents: the shift cancels."""
        return d if self.a == 1.0 else d * self.a


# --- noise conventions ------------------------------------------------------------------------------------------


def flow_to_ve(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """The same noisy point in VE form: ``x_ve = x / (1 - t)``, ``sigma = t / (1 - t)``."""
    one_minus = 1.0 - t
    return x / _bcast(one_minus, x), t / one_minus


def ve_to_flow(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`flow_to_ve`: ``t = sigma / (1 + sigma)``, ``x_flow = x / (1 + sigma)``."""
    one_plus = 1.0 + sigma
    return x / _bcast(one_plus, x), sigma / one_plus


def vp_to_ve(x: Tensor, alpha_cumprod: Tensor) -> tuple[Tensor, Tensor]:
    """A DDPM (VP) latent at cumulative alpha ``a`` in VE form: ``x / sqrt(a)`` at ``sqrt((1 - a) / a)``."""
    return x / _bcast(alpha_cumprod.sqrt(), x), ((1.0 - alpha_cumprod) / alpha_cumprod).sqrt()


def ve_to_vp(x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of :func:`vp_to_ve`; returns the VP latent and its cumulative alpha ``1 / (1 + sigma^2)``."""
    a = 1.0 / (1.0 + sigma**2)
    return x * _bcast(a.sqrt(), x), a


class VPSchedule:
    """A discrete DDPM schedule (``alphas_cumprod``) read at integer or fractional timesteps."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        self.alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu()

    def alpha_at(self, t: Tensor) -> Tensor:
        """Linear interpolation of ``alphas_cumprod`` at timestep(s) t (UniPC passes fractional ones)."""
        ac = self.alphas_cumprod
        tf = t.detach().to(torch.float64).cpu().clamp(0, len(ac) - 1)
        lo = tf.floor().long()
        hi = (lo + 1).clamp(max=len(ac) - 1)
        w = tf - lo
        return (ac[lo] * (1 - w) + ac[hi] * w).to(device=t.device, dtype=torch.float32)

    def sigma_at(self, t: Tensor) -> Tensor:
        a = self.alpha_at(t)
        return ((1.0 - a) / a).sqrt()


# --- parameterisations -------------------------------------------------------------------------------------------


def x0_from_eps(x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """VE: ``x0 = x - sigma * eps``."""
    return x - _bcast(sigma, x) * eps


def eps_from_x0(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """VE: ``eps = (x - x0) / sigma``."""
    return (x - x0) / _bcast(sigma, x)


def x0_from_v(x: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    """VE input ``x = x0 + sigma * eps`` and the v-prediction of the model fed ``x / sqrt(sigma^2 + 1)``."""
    s = _bcast(sigma, x)
    return x / (s**2 + 1) - v * s / (s**2 + 1).sqrt()


def v_from_x0(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    """Inverse of :func:`x0_from_v`."""
    s = _bcast(sigma, x)
    return (x / (s**2 + 1) - x0) * (s**2 + 1).sqrt() / s


def x0_from_flow(x: Tensor, t: Tensor, v: Tensor) -> Tensor:
    """Flow: ``x = (1 - t) x0 + t eps`` and ``v = eps - x0`` give ``x0 = x - t * v``."""
    return x - _bcast(t, x) * v


def flow_v_from_x0(x: Tensor, t: Tensor, x0: Tensor) -> Tensor:
    """Inverse of :func:`x0_from_flow`."""
    return (x - x0) / _bcast(t, x)


def _bcast(s: Tensor | float, like: Tensor) -> Tensor | float:
    """Shape a per-row noise level to broadcast over a latent batch."""
    if isinstance(s, Tensor) and s.ndim == 1 and like.ndim > 1:
        return s.reshape(-1, *([1] * (like.ndim - 1)))
    return s


# --- the two models' spaces ---------------------------------------------------------------------------------------

CONVENTIONS = ("ve", "flow", "vp")
FLOW_T_MAX = 1.0 - 1e-4


@dataclass(frozen=True)
class ModelSpace:
    """Where a model's sampler lives.

    ``convention`` is how its noisy latent and noise level are expressed (see the module doc), ``output`` what its
    denoiser returns to the sampler ("x0", or "eps" for A1111's timestep samplers). A ``vp`` space needs
    ``vp_schedule`` to turn timesteps into noise levels.
    """

    latent: LatentFormat
    convention: str = "ve"
    output: str = "x0"
    vp_schedule: VPSchedule | None = None
    sigma_max: float | None = None  # a VE source's largest trained noise level (see SpaceBridge.ve_to_source)
    native_px: int | None = None  # a source's training side in pixels, for source_resolution "native"

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ValueError(f"unknown noise convention {self.convention!r}; expected one of {CONVENTIONS}")
        if self.output not in ("x0", "eps"):
            raise ValueError(f"unknown denoiser output {self.output!r}; expected 'x0' or 'eps'")
        if self.convention == "vp" and self.vp_schedule is None:
            raise ValueError("a 'vp' model space needs its vp_schedule (alphas_cumprod)")

    def to_ve(self, x: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """This space's (noisy latent, noise level) as VE (x, sigma), same latent format."""
        if self.convention == "ve":
            return x, level
        if self.convention == "flow":
            # pure noise (t = 1) is infinitely far out in VE form; read it as t = 1 - 1e-4 (sigma ~ 1e4)
            return flow_to_ve(x, level.clamp(max=FLOW_T_MAX))
        assert self.vp_schedule is not None
        return vp_to_ve(x, self.vp_schedule.alpha_at(level).to(x.dtype))

    def from_ve(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of :meth:`to_ve` for the ``ve`` and ``flow`` conventions (sources are never VP)."""
        if self.convention == "ve":
            return x, sigma
        if self.convention == "flow":
            return ve_to_flow(x, sigma)
        raise ValueError("a source model is evaluated in the VE or flow convention, not from VP timesteps")


@dataclass(frozen=True)
class SpaceBridge:
    """Carries the target's noisy latent into the source's space and the source's predictions back.

    With ``rescale_noise`` (the default, "shared" trajectory) the target's noisy latent is mapped as a whole:
    ``x_s = a * x_t + b`` is the same noisy point, at ``sigma_s = a * sigma_t``. The separate-trajectory mode keeps
    the source's own noisy latent and only needs :meth:`x0_to_source` and :meth:`delta_to_target`.
    """

    source: ModelSpace
    target: ModelSpace

    @property
    def to_source_map(self) -> LatentMap:
        return LatentMap.between(self.target.latent, self.source.latent)

    @property
    def to_target_map(self) -> LatentMap:
        return LatentMap.between(self.source.latent, self.target.latent)

    def to_source(self, x: Tensor, level: Tensor) -> tuple[Tensor, Tensor]:
        """A target point, in the target's own convention, as the source's (x, level)."""
        if self.target.convention == "flow" and self.source.convention == "flow":
            # exact, also at t = 1: x_s = (a x + b (1 - t)) / (1 - t + a t) at t_s = a t / (1 - t + a t)
            m = self.to_source_map
            if m.identity:
                return x, level
            denom = 1.0 - level + m.a * level
            xs = (x * m.a + _bcast(m.b * (1.0 - level), x)) / _bcast(denom, x)
            return xs, m.a * level / denom
        return self.ve_to_source(*self.target.to_ve(x, level))

    def ve_to_source(self, x_ve: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        """A target VE point as the source's (x, level) in the source's own convention."""
        m = self.to_source_map
        x_s, sigma_s = m.x0(x_ve), sigma * m.a
        cap = self.source.sigma_max
        if cap is not None and self.source.convention == "ve" and bool((sigma_s > cap).any()):
            # Far beyond its schedule (a flow target's pure noise is sigma ~ 1e4) a VE source's x0 = x - sigma*eps
            # multiplies every base/adapted difference by sigma. Read such a point at the source's own largest
            # level instead: at that noise the clean part is negligible, so scaling x keeps the same noise.
            factor = torch.where(sigma_s > cap, cap / sigma_s, torch.ones_like(sigma_s))
            x_s, sigma_s = x_s * _bcast(factor, x_s), sigma_s * factor
        return self.source.from_ve(x_s, sigma_s)

    def x0_to_source(self, x0: Tensor) -> Tensor:
        return self.to_source_map.x0(x0)

    def x0_to_target(self, x0: Tensor) -> Tensor:
        return self.to_target_map.x0(x0)

    def delta_to_target(self, d: Tensor) -> Tensor:
        return self.to_target_map.delta(d)
