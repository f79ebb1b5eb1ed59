"""Sampling with Delta Sampling exactly as a host drives it, and the measurements of one configuration.

The target's CFG denoiser builds rows ``[cond | uncond]``, hands its per-row x0 to ``DeltaGuidance.apply``
(A1111's ``cfg_denoised``), combines them with ``cfg_combine`` and feeds the result to ``after_combine`` (needed
by the separate trajectory). The source is one ``SourceModel``: one batched forward over ``[base | adapted]``
rows, the adaptation applied by ``lib_delta.lora`` to the adapted rows only.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from devkit import sampling
from lib_delta.args import AdaptationGroup, DeltaSettings, LoraRef
from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine
from lib_delta.lora import DeltaPatch
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SpaceBridge

from . import metrics
from .models import NULL_CLASS, DiffusionModel


@dataclass(frozen=True)
class Variant:
    """One Delta Sampling configuration; the defaults are the extension's defaults."""

    strength: float = 1.0
    schedule: str = "constant"
    start: float = 0.0
    end: float = 1.0
    cfg_mode: str = "cfg"
    trajectory: str = "shared"
    mode: str = "delta"
    clamp: bool = False  # the host evaluates the source at most at its own largest noise level (see PatchedSource)

    def settings(self, lora: str) -> DeltaSettings:
        group = AdaptationGroup(loras=(LoraRef(lora),), strength=self.strength, schedule=self.schedule,
                                start=self.start, end=self.end)
        return DeltaSettings(enabled=True, source="source", groups=(group,), mode=self.mode,
                             cfg_mode=self.cfg_mode, trajectory=self.trajectory).validated()

    def label(self) -> str:
        if self.mode == "base-first":
            return f"base-first {self.start:g}-{self.end:g}" + (" σ-clamp" if self.clamp else "")
        parts = [f"λ={self.strength:g}"]
        default = Variant()
        if self.schedule != default.schedule:
            parts.append(self.schedule)
        if (self.start, self.end) != (default.start, default.end):
            parts.append(f"{self.start:g}-{self.end:g}")
        if self.cfg_mode != default.cfg_mode:
            parts.append(self.cfg_mode)
        if self.trajectory != default.trajectory:
            parts.append(self.trajectory)
        if self.clamp:
            parts.append("σ-clamp")
        return " ".join(parts)

    def as_dict(self) -> dict:
        return asdict(self)


class PatchedSource:
    """The ``SourceModel``: variant 0 is the source base, variant k its adaptation (group k − 1 of ``patch``).

    With ``clamp``, a VE source asked above its own largest noise level σ_max (a flow target's first steps reach
    σ = t/(1 − t) → 10⁴) is evaluated at σ_max on the point with the same noise, ``x·σ_max/σ`` (the clean part is
    negligible there). Unclamped, an ε-source's x0 = x − σ·ε̂ carries its ε error times σ into the delta.
    """

    def __init__(self, model: DiffusionModel, patch: DeltaPatch, row_conds: Tensor, clamp: bool = False):
        self.model, self.patch, self.row_conds, self.clamp = model, patch, row_conds, clamp
        self.calls = 0

    def __call__(self, x: Tensor, level: Tensor, rows: Sequence[int], variants: Sequence[int]) -> Tensor:
        self.calls += 1
        n, k = len(rows), len(variants)
        if self.clamp and not self.model.is_flow:
            sigma_max = float(self.model.denoiser.sigma_max)
            ratio = (sigma_max / level).clamp(max=1.0)
            x, level = x * ratio[:, None, None, None], level * ratio
        cond = self.row_conds[list(rows)]
        plan = [(slice(i * n, (i + 1) * n), None if v == 0 else v - 1) for i, v in enumerate(variants)]
        with self.patch.rows(plan), _autocast(x.device):
            out = self.model.denoiser(x.repeat(k, 1, 1, 1), level.repeat(k), cond.repeat(k, 1, 1))
        return out.float().view(k, n, *x.shape[1:])


@torch.no_grad()
def sample(
    model: DiffusionModel,
    labels: Tensor,
    noise: Tensor,
    steps: int,
    cfg_scale: float,
    guidance_for: object = None,
    adapted: DeltaPatch | None = None,
) -> Tensor:
    """Euler-sample ``model`` with CFG from ``noise`` (unit variance); ``guidance_for(sigmas, row_conds)`` builds
    the DeltaGuidance for this loop, ``adapted`` samples the model with that patch (group 0) on every row."""
    sigmas = model.sigmas(steps).to(noise.device)
    b = labels.shape[0]
    layout = CfgLayout.simple(b, cfg_scale)
    cond = torch.cat([model.encode(labels), model.encode(torch.full_like(labels, NULL_CLASS))])
    guidance = guidance_for(sigmas, labels) if guidance_for is not None else None

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        x_in = torch.cat([x, x])
        s_in = torch.cat([sigma, sigma])
        ctx = adapted.rows([(slice(None), 0)]) if adapted is not None else nullcontext()
        with ctx, _autocast(x.device):
            out = model.denoiser(x_in, s_in, cond)
        out = out.float()
        if guidance is not None:
            guidance.apply(x_in, s_in, out, layout)
        den = cfg_combine(out, layout)
        if guidance is not None:
            guidance.after_combine(x, sigma, den)
        return den

    x = noise if model.is_flow else noise * sigmas[0]
    if adapted is not None:
        with adapted:
            return sampling.sample_euler(denoise, x, sigmas)
    return sampling.sample_euler(denoise, x, sigmas)


def delta_sample(
    target: DiffusionModel,
    source: DiffusionModel,
    patch: DeltaPatch,
    lora: str,
    variant: Variant,
    labels: Tensor,
    noise: Tensor,
    steps: int,
    cfg_scale: float,
) -> tuple[Tensor, int]:
    """Sample ``target`` with Delta Sampling from ``source`` + ``patch``; returns images and source calls."""
    made: list[PatchedSource] = []

    def guidance_for(sigmas: Tensor, labels: Tensor) -> DeltaGuidance:
        row_conds = torch.cat([source.encode(labels), source.encode(torch.full_like(labels, NULL_CLASS))])
        src = PatchedSource(source, patch, row_conds, variant.clamp)
        made.append(src)
        clock = ProgressClock(sigmas.tolist())
        return DeltaGuidance(variant.settings(lora), SpaceBridge(source.space, target.space), src, clock)

    with patch:
        images = sample(target, labels, noise, steps, cfg_scale, guidance_for)
    return images, made[0].calls


def measure(images: Tensor, labels: Tensor, detectors: metrics.Detectors, clf: torch.nn.Module,
            reference: Tensor | None = None) -> dict:
    """Attribute rates, class fidelity, diversity and (against ``reference``) how far the images moved."""
    out = {
        "red": detectors.rate("red", images),
        "striped": detectors.rate("striped", images),
        "fidelity": metrics.class_fidelity(clf, images, labels),
        "diversity": metrics.diversity(images, labels),
    }
    if reference is not None:
        out["change_rms"] = (images.float() - reference.float()).pow(2).mean().sqrt().item()
    return out


def timed(fn, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return result, time.perf_counter() - t


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
