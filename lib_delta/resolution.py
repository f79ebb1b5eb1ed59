"""The source at its own resolution: a target latent larger than the source family's training area is resized to
that area (the target's aspect ratio kept) before the source sees it, and the delta is resized back.

An SD1.5 source asked for a 1024 px image costs more than an SDXL target (SD1.5 attends at its highest-resolution
level) and is outside what it was trained for (it repeats subjects). At 512² it costs a quarter and composes as it
was trained to; the delta it returns is smooth at the target's scale, so it is upsampled back with little loss.

Resizing a noisy latent is not resizing a clean one. ``x = x0 + σ·ε``: an area average of a k×k block keeps the
smooth x0 but divides the white noise's variance by k², so the source would see a point far less noisy than the σ
it is told (at 1024 → 512 the noise is halved) and predict an x0 that is too sharp and off its schedule. The
resamplers below (``METHODS``) differ in how they account for that; ``fidelity/resolution.py`` measures them and
:data:`METHOD` is the one the product uses:

- ``area``: the plain area average of x, told σ: the noise statistics are wrong (at 2× the source sees half the
  noise it is told), which strengthens its delta at low noise; measured, it carries the adaptation's effect as the
  source at the target's size does, where ``shift`` loses a third of a texture's (docs/fidelity.md);
- ``shift``: the plain area average of x, told the noise level it really has, ``σ·√v`` (σ/2 at 2×), the few
  pixels whose window was larger topped up to it with fixed fresh noise. The same point the target is at, seen
  coarser: a coarse structure is as noisy at σ in 1024 px as at σ/2 in 512 px (the resolution shift of the noise
  schedule), so the source is asked at the stage of the target's sampling it is really at;
- ``topup``: the area average of x plus fixed fresh noise of the variance the averaging removed, per pixel;
- ``renoise``: the area average of the target's denoised estimate x̂0 plus σ times fixed fresh noise;
- ``rescale``: the area average of x̂0 plus the area average of the target's own noise part ``x − x̂0``, each
  pixel divided by the standard deviation the averaging left it: the target's noise, whitened back to unit
  variance. No fresh noise: the source sees the same noise field as the target, coarsened.

``shift``, ``area`` and ``topup`` need only the target's noisy latent; ``renoise`` and ``rescale`` its estimate x̂0
of the same call, and ``rescale`` doubles (at 2×) any smooth error of that estimate along with the noise.

All work in the VE form (``x = x0 + σ·ε``, any latent format: the map between formats is affine and commutes with
a resize). Every resize here is linear and separable, so the variance it leaves white noise is exact
(:func:`noise_variance`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from .spaces import _bcast

METHODS = ("area", "shift", "topup", "renoise", "rescale")
# "area", by measurement: in the controlled world (docs/fidelity.md, "Source resolution"; two runs) it recovered
# 1.10 / 1.03 of a colour LoRA's and a stripe LoHa's effect against 0.97 / 0.68 for "shift", which is exact only
# in a world of white-noise images. Like "shift" it needs no estimate of the target's (a source on another GPU can
# start before the target's forward) and keeps the target's own noise.
METHOD = "area"
NEEDS_X0 = frozenset({"renoise", "rescale"})
UPSAMPLE = "bilinear"  # the delta back to the target's grid: smooth, no overshoot (bicubic rings at edges)
LATENT_FACTOR = 8  # pixels per latent cell (every family the host runs)
GRID = 8  # latent cells: the SD UNets halve the latent three times, so each side is a multiple of 8 (64 px)
NOISE_SEED = 20251203  # the fixed fresh noise of "topup" and "renoise": the same image for the same request

# The families' training areas, as a square side in pixels (the source runs at this area, the target's aspect kept).
NATIVE_SIDE = {"SD1": 512, "SD2": 512, "SD2-v": 768, "SDXL": 1024, "SD3": 1024, "Flux": 1024}


def native_side(family: str, v_prediction: bool = False) -> int | None:
    """The training side (px) of a latent family (``LatentFormat.name``); SD2's v models were trained at 768."""
    if family == "SD2" and v_prediction:
        family = "SD2-v"
    return NATIVE_SIDE.get(family)


def native_size(target_hw: tuple[int, int], side_px: int, grid: int = GRID) -> tuple[int, int]:
    """The source's latent (height, width) for a target latent of ``target_hw``: the area of a ``side_px`` square,
    the target's aspect ratio, each side rounded to ``grid`` cells. A target at or below that area, or one whose
    rounding would not shrink it, is kept as it is: upsampling would cost more and invent detail."""
    h, w = target_hw
    area = (side_px / LATENT_FACTOR) ** 2
    if h * w <= area:
        return h, w
    s = math.sqrt(area / (h * w))
    nh, nw = (min(n, max(grid, round(n * s / grid) * grid)) for n in (h, w))
    return (h, w) if nh * nw >= h * w else (nh, nw)


def _resize_matrix(n_in: int, n_out: int, mode: str, device: torch.device) -> Tensor:
    """The 1-D resize ``mode`` from ``n_in`` to ``n_out`` samples as an ``[n_out, n_in]`` matrix."""
    eye = torch.eye(n_in, dtype=torch.float64, device=device)[None]  # row c: a one at position c
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(eye, size=n_out, mode=mode, **kw)[0].T


def noise_variance(src_hw: tuple[int, int], dst_hw: tuple[int, int], device: torch.device | str = "cpu") -> Tensor:
    """Per output pixel, the variance an area resize leaves unit white noise: the sum of its squared weights."""
    device = torch.device(device)
    vh = _resize_matrix(src_hw[0], dst_hw[0], "area", device).pow(2).sum(1)
    vw = _resize_matrix(src_hw[1], dst_hw[1], "area", device).pow(2).sum(1)
    return (vh[:, None] * vw[None, :]).float()


def down(t: Tensor, hw: tuple[int, int]) -> Tensor:
    """Area average to ``hw``: every target pixel counts once (no aliasing of the latent's fine detail)."""
    return t if tuple(t.shape[-2:]) == tuple(hw) else F.interpolate(t, size=hw, mode="area")


def up(t: Tensor, hw: tuple[int, int], mode: str = UPSAMPLE) -> Tensor:
    if tuple(t.shape[-2:]) == tuple(hw):
        return t
    return F.interpolate(t, size=hw, mode=mode, align_corners=False)


@dataclass
class SourceGrid:
    """The resize between one pass's target latent grid and the source's (see the module doc).

    Fixed fresh noise is drawn per image (``images``: each row's image, of ``batch``), so that every row of an image
    sees one point.
    """

    target_hw: tuple[int, int]
    source_hw: tuple[int, int]
    method: str = METHOD
    upsample: str = UPSAMPLE
    _variance: Tensor | None = field(default=None, repr=False)
    _peak: float = field(default=1.0, repr=False)
    _least: float = field(default=1.0, repr=False)
    _noise: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown resampling {self.method!r}; expected one of {METHODS}")

    @property
    def needs_x0(self) -> bool:
        return self.method in NEEDS_X0

    def to_source(self, x: Tensor, sigma: Tensor, x0: Tensor | None, images: Tensor | None = None,
                  batch: int = 1) -> tuple[Tensor, Tensor]:
        """A VE point ``x`` at noise ``sigma`` (per row) on the source's grid, and its noise level there (σ, or
        less for ``shift``). ``x0``: the target's denoised estimate for each row (the methods in
        :data:`NEEDS_X0`)."""
        s = _bcast(sigma.to(x.dtype), x)
        if self.method == "area":
            return down(x, self.source_hw), sigma
        if self.method in ("shift", "topup"):
            v = self.variance(x.device)
            # shift: every pixel up to the largest variance the averaging left; topup: up to 1
            goal = self._peak if self.method == "shift" else 1.0
            xs = down(x, self.source_hw)
            if goal > self._least:  # an integer factor leaves every pixel the same variance: nothing to add
                xs = xs + s * (goal - v).clamp_min(0.0).sqrt() * self.noise(x, images, batch)
            return xs, sigma * goal**0.5
        if x0 is None:
            raise ValueError(f"the {self.method!r} resampling needs the target's denoised estimate")
        x0 = x0.to(x.dtype)
        if self.method == "renoise":
            return down(x0, self.source_hw) + s * self.noise(x, images, batch), sigma
        return down(x0, self.source_hw) + down(x - x0, self.source_hw) / self.variance(x.device).sqrt(), sigma

    def to_target(self, t: Tensor) -> Tensor:
        """A delta (or any smooth field) on the source's grid, upsampled to the target's."""
        return up(t, self.target_hw, self.upsample)

    def variance(self, device: torch.device) -> Tensor:
        if self._variance is None or self._variance.device != device:
            self._variance = noise_variance(self.target_hw, self.source_hw, device)
            self._peak, self._least = float(self._variance.max()), float(self._variance.min())  # once per pass
        return self._variance

    def noise(self, like: Tensor, images: Tensor | None, batch: int = 1) -> Tensor:
        """Fixed unit noise on the source's grid, one field per image (rows of an image share it)."""
        n = 1 if images is None else batch
        key = (n, like.shape[1], like.device, like.dtype)
        if key not in self._noise:
            g = torch.Generator().manual_seed(NOISE_SEED)
            self._noise = {key: torch.randn((n, like.shape[1], *self.source_hw), generator=g).to(like)}
        fields = self._noise[key]
        return fields.expand(like.shape[0], *fields.shape[1:]) if images is None else fields.index_select(0, images)


def _resized_hw(resolution: str, target_hw: tuple[int, int], side_px: int | None) -> tuple[int, int] | None:
    """The source's latent grid where it differs from the target's: ``native``, a known family, a target above the
    source's area; else None."""
    if resolution != "native" or side_px is None:
        return None
    hw = native_size(target_hw, side_px)
    return None if hw == tuple(target_hw) else hw


def source_grid(resolution: str, target_hw: tuple[int, int], side_px: int | None,
                method: str = METHOD) -> SourceGrid | None:
    """The pass's resize, or None where the source runs on the target's grid (``target``, an unknown family, a
    target at or below the source's area): then nothing changes, bit for bit."""
    hw = _resized_hw(resolution, target_hw, side_px)
    return None if hw is None else SourceGrid(tuple(target_hw), hw, method)


def source_pixels(resolution: str, size_px: tuple[int, int], side_px: int | None) -> tuple[int, int]:
    """The image (width, height) the source runs at: its native area where :func:`source_grid` resizes, else the
    image's own. What its size conditioning must say (SDXL's original and target size): the source is asked for
    the image it draws, not the one the target draws."""
    w, h = size_px
    hw = _resized_hw(resolution, (h // LATENT_FACTOR, w // LATENT_FACTOR), side_px)
    return (w, h) if hw is None else (hw[1] * LATENT_FACTOR, hw[0] * LATENT_FACTOR)


__all__ = ["METHOD", "METHODS", "NATIVE_SIDE", "SourceGrid", "down", "native_side", "native_size",
           "noise_variance", "source_grid", "source_pixels", "up"]
