"""The delta arithmetic: per model call, evaluate the source where λ ≠ 0 and correct the target's prediction.

The target's denoiser hands its per-row outputs *before* the CFG combine (A1111's ``cfg_denoised``): cond rows
first (one per AND sub-prompt of each image), then one uncond row per image. Because the combine is linear,
adding Δ to every row of an image adds exactly Δ to its combined prediction, and blending every row blends the
combined prediction, so the host's own combine, inpaint blend and CFG variants all stay untouched.

    delta mode:       x0' = x0_target + Σ_g λ_g(t) · (x0_adapted_g − x0_base)
    base-first mode:  x0' = x0_target + λ(t) · (x0_source − x0_target)

"cfg" mode combines every source prediction with the target's AND-weights and the source's CFG scale (by default the
target's in delta mode, so that target == source, λ = 1 equals sampling the adapted model; a guided scale in
base-first mode, whose distilled targets run nearly unguided) before the difference; "cond" mode uses the cond rows
only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import Tensor

from . import resolution
from .args import DeltaSettings
from .schedule import ProgressClock, strength_at
from .spaces import SpaceBridge, _bcast, eps_from_x0


@dataclass(frozen=True)
class CfgLayout:
    """The rows of one CFG batch.

    ``conds_list[i]`` lists ``(cond_row, weight)`` for image i (A1111's AND composition); cond rows come first,
    then one uncond row per image, in image order. ``uncond_from_cond``: the host skipped the uncond rows of this
    call (A1111's skip-early-CFG and NGMS) and put each image's first cond row in their place.
    """

    conds_list: tuple[tuple[tuple[int, float], ...], ...]
    cond_scale: float
    uncond_from_cond: bool = False

    @staticmethod
    def simple(batch: int, cond_scale: float) -> CfgLayout:
        """One prompt per image: rows ``[cond_0 .. cond_{B-1}, uncond_0 .. uncond_{B-1}]``."""
        return CfgLayout(tuple(((i, 1.0),) for i in range(batch)), cond_scale)

    @staticmethod
    def from_conds_list(conds_list: Sequence[Sequence[tuple[int, float]]], cond_scale: float,
                        uncond_from_cond: bool = False) -> CfgLayout:
        return CfgLayout(tuple(tuple((int(r), float(w)) for r, w in c) for c in conds_list), float(cond_scale),
                         uncond_from_cond)

    @property
    def batch(self) -> int:
        return len(self.conds_list)

    @property
    def n_cond(self) -> int:
        return sum(len(c) for c in self.conds_list)

    @property
    def n_rows(self) -> int:
        return self.n_cond + self.batch

    def row_images(self) -> list[int]:
        """Image index of every row, cond rows then uncond rows."""
        images = [0] * self.n_cond
        for i, conds in enumerate(self.conds_list):
            for row, _ in conds:
                images[row] = i
        return images + list(range(self.batch))


def cfg_combine(rows: Tensor, layout: CfgLayout) -> Tensor:
    """A1111's combine: ``uncond_i + Σ_j w_j · scale · (cond_j − uncond_i)`` for each image i."""
    uncond = rows[layout.n_cond:]
    out = uncond.clone()
    for i, conds in enumerate(layout.conds_list):
        for row, weight in conds:
            out[i] += (rows[row] - uncond[i]) * (weight * layout.cond_scale)
    return out


def with_guidance_scale(rows: Tensor, layout: CfgLayout, scale: float, images: Tensor) -> Tensor:
    """Rows that the host's combine at ``layout.cond_scale`` turns into the combine at ``scale``: each cond row moved
    to ``uncond + (scale / layout scale) · (cond − uncond)``, the uncond rows kept. ``images``: the image index of
    every row (``layout.row_images()`` on the rows' device)."""
    k = scale / layout.cond_scale
    uncond = rows[layout.n_cond:].index_select(0, images[:layout.n_cond])
    return torch.cat([uncond + (rows[:layout.n_cond] - uncond) * k, rows[layout.n_cond:]])


def cond_mean(rows: Tensor, layout: CfgLayout) -> Tensor:
    """Per image, the AND-weight-averaged cond rows (``rows`` may hold the cond rows only)."""
    out = []
    for conds in layout.conds_list:
        total = sum(w for _, w in conds) or 1.0
        out.append(sum(rows[r] * (w / total) for r, w in conds))
    return torch.stack(out)


class SourceModel(Protocol):
    """Evaluates the source under several variants in one batched call.

    ``x`` and ``level`` are rows in the source's own space and convention; ``rows`` are the indices of those rows
    in the target's CFG layout (so the host picks each row's conditioning); ``variants`` lists 0 for the source
    base and g + 1 for the source with group g's adaptation. Returns x0 predictions in the source's scaled latent,
    variant-major: shape ``[len(variants), len(rows), C, H, W]``.
    """

    def __call__(self, x: Tensor, level: Tensor, rows: Sequence[int], variants: Sequence[int]) -> Tensor: ...


@dataclass
class StepRecord:
    """What one corrected call did, for previews and logs."""

    progress: float
    strengths: tuple[float, ...]
    target_x0: Tensor | None = None
    base_x0: Tensor | None = None
    adapted_x0: Tensor | None = None
    delta: Tensor | None = None


class DeltaGuidance:
    """Per-generation state: settings, the bridge between the two models' spaces, the clock and the source.

    Create one per sampling pass and drop it afterwards; it holds no global state.
    """

    def __init__(
        self,
        settings: DeltaSettings,
        bridge: SpaceBridge,
        source: SourceModel,
        clock: ProgressClock,
        record: bool = False,
        resampling: str = resolution.METHOD,
    ) -> None:
        self.settings = settings
        self.resampling = resampling  # how a target latent is resized to the source's own area (resolution.py)
        self._grids: dict[tuple[int, int], resolution.SourceGrid | None] = {}
        self.bridge = bridge
        self.source = source
        self.clock = clock
        self.record = record
        self.records: list[StepRecord] = []
        self.source_calls = 0
        self.prefetched = 0  # calls whose source prediction was started before the target's forward
        self.trajectory = SeparateTrajectory(bridge) if settings.trajectory == "separate" else None
        self._pending: tuple[tuple, Tensor] | None = None  # (call key, prediction) from prefetch()
        self._row_indices: dict[tuple, Tensor] = {}

    def strengths(self, level: float) -> tuple[float, ...]:
        p = self.clock.progress(level)
        return tuple(strength_at(p, g.strength, g.schedule, g.start, g.end) for g in self.settings.groups)

    def apply(self, x: Tensor, level: Tensor, out: Tensor, layout: CfgLayout) -> bool:
        """Correct the target's per-row outputs ``out`` in place; returns False when λ = 0 left them untouched.

        ``x``/``level`` are the rows' noisy latent and noise level as the target's sampler passed them, ``out`` its
        per-row outputs (x0, or ε for timestep samplers), laid out as ``layout``.
        """
        return self._apply(x, level, out, layout, (x, level))

    def _apply(self, x: Tensor, level: Tensor, out: Tensor, layout: CfgLayout, call: tuple[Tensor, Tensor]
               ) -> bool:
        """:meth:`apply`; ``call``: the tensors the host passed for this model call, which name its prefetch."""
        pending, self._pending = self._pending, None
        progress, lam, active = self._strengths_at(level)
        target = self.bridge.target
        x_ve, sigma = target.to_ve(_wide(x), _wide(level).reshape(-1))
        grid = self.grid_for(x)
        if not active:
            if self.trajectory is not None:
                self.trajectory.source_point(x_ve, sigma, layout)
            return False
        base_first, cond_only, rows, variants = self._request(layout, active)
        if pending is not None and pending[0] == _call_key(*call, progress, rows, variants):
            pred = pending[1]
            self.prefetched += 1
        else:
            if self.trajectory is not None:
                xs, ls = self.trajectory.source_point(x_ve, sigma, layout)
            elif grid is not None:
                x0 = self._target_x0(x_ve, sigma, out, layout) if grid.needs_x0 else None
                xs, ls = self._to_source_grid(grid, x_ve, sigma, x0, layout)
            else:
                xs, ls = self.bridge.to_source(_wide(x), _wide(level).reshape(-1))
            pred = self._call_source(xs, ls, rows, variants, layout)
        pred = _wide(pred)
        if pred.device != out.device:  # a source on another GPU
            pred = pred.to(out.device)
        record = StepRecord(progress, lam, self._target_x0(x_ve, sigma, out, layout)) if self.record else None
        if base_first:
            self._replace(out, x_ve, sigma, pred[0], lam[0], layout, record, grid)
        else:
            self._add_delta(out, sigma, pred, [lam[g] for g in active], layout, cond_only, record, grid)
        if record is not None:
            self.records.append(record)
        return True

    def prefetch(self, x: Tensor, level: Tensor, layout: CfgLayout) -> None:
        """Optionally start this model call's source evaluation before the target's forward.

        The next :meth:`apply` with the same ``x`` and ``level`` tensors uses the result instead of calling the
        source again, so the outcome is unchanged. It pays where the source runs elsewhere (a host with the source
        on a second GPU): both models then compute at the same time. Does nothing with a
        separate trajectory, whose source point only exists once the target's previous prediction is known.
        """
        self._prefetch(x, level, layout, (x, level))

    def prefetch_combined(self, x: Tensor, level: Tensor, layout: CfgLayout) -> None:
        """:meth:`prefetch` for a host that corrects the combined prediction (:meth:`apply_combined`): ``x`` and
        ``level`` per image, the very tensors the following :meth:`apply_combined` receives."""
        images = self._row_index(layout, x.device)
        self._prefetch(x.index_select(0, images), level.reshape(-1).index_select(0, images.to(level.device)), layout,
                       (x, level))

    def _prefetch(self, x: Tensor, level: Tensor, layout: CfgLayout, call: tuple[Tensor, Tensor]) -> None:
        self._pending = None
        if self.trajectory is not None:
            return
        progress, _, active = self._strengths_at(level)
        if not active:
            return
        grid = self.grid_for(x)
        if grid is not None and grid.needs_x0:
            return  # its source point needs the target's prediction of this very call
        _, _, rows, variants = self._request(layout, active)
        if grid is not None:
            xs, ls = self._to_source_grid(grid, *self.bridge.target.to_ve(_wide(x), _wide(level).reshape(-1)), None,
                                          layout)
        else:
            xs, ls = self.bridge.to_source(_wide(x), _wide(level).reshape(-1))
        pred = self._call_source(xs, ls, rows, variants, layout)
        self._pending = (_call_key(*call, progress, rows, variants), pred)

    def grid_for(self, x: Tensor) -> resolution.SourceGrid | None:
        """The resize to the source's own area for latents of ``x``'s size, or None: the source sees the target's
        grid (``source_resolution`` "target", or a target no larger than the source's training area)."""
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        if hw not in self._grids:
            self._grids[hw] = resolution.source_grid(self.settings.source_resolution, hw,
                                                      self.bridge.source.native_px, self.resampling)
            if self.trajectory is not None:
                self.trajectory.grid = self._grids[hw]
        return self._grids[hw]

    def _to_source_grid(self, grid: resolution.SourceGrid, x_ve: Tensor, sigma: Tensor, x0: Tensor | None,
                        layout: CfgLayout) -> tuple[Tensor, Tensor]:
        """The target's VE point on the source's grid (per row; ``x0``: the target's estimate, per image) as the
        source's (x, level)."""
        images = self._row_index(layout, x_ve.device)
        x0_rows = None if x0 is None else x0.index_select(0, images)
        return self.bridge.ve_to_source(*grid.to_source(x_ve, sigma, x0_rows, images, layout.batch))

    def _strengths_at(self, level: Tensor) -> tuple[float, tuple[float, ...], list[int]]:
        progress = self.clock.progress(float(level.reshape(-1)[0]))
        lam = tuple(strength_at(progress, g.strength, g.schedule, g.start, g.end) for g in self.settings.groups)
        return progress, lam, [g for g, v in enumerate(lam) if v != 0.0]

    def _cond_only(self) -> bool:
        return self.settings.cfg_mode == "cond" and self.settings.mode != "base-first"

    def _request(self, layout: CfgLayout, active: list[int]) -> tuple[bool, bool, list[int], list[int]]:
        """(base-first, cond-only, the target rows the source is evaluated for, its variants)."""
        base_first = self.settings.mode == "base-first"
        cond_only = self._cond_only()
        rows = list(range(layout.n_cond if cond_only or layout.uncond_from_cond else layout.n_rows))
        variants = [1 if self.settings.groups[0].has_adaptation else 0] if base_first else [0, *(g + 1 for g in active)]
        return base_first, cond_only, rows, variants

    def _call_source(self, xs: Tensor, ls: Tensor, rows: list[int], variants: list[int], layout: CfgLayout
                     ) -> Tensor:
        if len(rows) < xs.shape[0]:
            xs, ls = xs[: len(rows)], ls[: len(rows)]
        self.source_calls += 1
        pred = self.source(xs, ls, rows, variants)
        if layout.uncond_from_cond and len(rows) == layout.n_cond and not self._cond_only():
            # the target combines with its first cond rows as uncond: the source takes the same rows, not an
            # uncond prediction of its own that the target never made
            firsts = self._first_cond_rows(layout, pred.device)
            pred = torch.cat([pred, pred.index_select(1, firsts)], dim=1)
        return pred

    def apply_combined(self, x: Tensor, level: Tensor, denoised: Tensor, layout: CfgLayout) -> bool:
        """Correct an already combined prediction ``denoised`` (one x0 per image) in place, as :meth:`apply` would.

        For hosts that only hand over the combined result (Forge's post-CFG function). ``x``/``level`` are per
        image. Every row is taken to equal the combined prediction: the combine is affine with weights summing to
        one, so it gives that prediction back exactly, and combining the corrected rows is the corrected result.
        """
        images = self._row_index(layout, denoised.device)
        rows = denoised.index_select(0, images)
        if not self._apply(x.index_select(0, images), level.reshape(-1).index_select(0, images.to(level.device)),
                           rows, layout, (x, level)):
            return False
        denoised.copy_(cfg_combine(rows, layout))
        return True

    def after_combine(self, x: Tensor, level: Tensor, denoised: Tensor) -> None:
        """Feed the target's combined, corrected prediction (per image) to a separate source trajectory.

        ``x``/``level`` are the per-image noisy latent and level of the call, as the target's sampler passed them.
        """
        if self.trajectory is None:
            return
        x_ve, sigma = self.bridge.target.to_ve(_wide(x), _wide(level).reshape(-1))
        self.trajectory.observe(x_ve, sigma, _wide(denoised), self.bridge.target.output)

    # -- internals ------------------------------------------------------------------------------------------------

    def _source_scale(self, layout: CfgLayout) -> float:
        """The scale the source's rows are combined with. Where the host skipped the uncond rows (their place taken
        by cond rows) the call is unguided by design, for the source too."""
        return layout.cond_scale if layout.uncond_from_cond else self.settings.source_cfg_for(layout.cond_scale)

    def _add_delta(self, out: Tensor, sigma: Tensor, pred: Tensor, lams: list[float], layout: CfgLayout,
                   cond_only: bool, record: StepRecord | None, grid: resolution.SourceGrid | None = None) -> None:
        combine = cond_mean if cond_only else cfg_combine
        scale = self._source_scale(layout)
        source_layout = layout if scale == layout.cond_scale else replace(layout, cond_scale=scale)
        base = combine(pred[0], source_layout)
        deltas = [combine(pred[k], source_layout) - base for k in range(1, len(pred))]
        total = sum(lam * d for lam, d in zip(lams, deltas, strict=False))
        if grid is not None:  # the delta is smooth at the target's scale: upsampled, it keeps what it carries
            total = grid.to_target(total)
            if record is not None:
                base, deltas = grid.to_target(base), [grid.to_target(deltas[0])]
        per_row = self.bridge.delta_to_target(total).index_select(0, self._row_index(layout, total.device))
        if self.bridge.target.output == "eps":
            per_row = -per_row / _bcast(sigma, per_row)  # x0 = x - sigma*eps, so Δeps = -Δx0 / sigma
        out += per_row.to(out.dtype)
        if record is not None:
            record.base_x0, record.adapted_x0, record.delta = base, base + deltas[0], total

    def _replace(self, out: Tensor, x_ve: Tensor, sigma: Tensor, pred: Tensor, lam: float, layout: CfgLayout,
                 record: StepRecord | None, grid: resolution.SourceGrid | None = None) -> None:
        src = self.bridge.x0_to_target(pred)
        if grid is not None:
            # the source's prediction replaces the target's on the scales the source's grid holds; the finer
            # ones stay the target's (an upsampled x0 alone would blur every base-first step)
            own = _wide(out) if self.bridge.target.output == "x0" else x_ve - _bcast(sigma, x_ve) * _wide(out)
            src = own + grid.to_target(src - resolution.down(own, grid.source_hw))
            pred = grid.to_target(pred) if record is not None else pred
        scale = self._source_scale(layout)
        if scale != layout.cond_scale and layout.cond_scale != 0:
            src = with_guidance_scale(src, layout, scale, self._row_index(layout, src.device))
        if self.bridge.target.output == "eps":
            src = eps_from_x0(x_ve, sigma, src)
        out += (lam * (src - _wide(out))).to(out.dtype)
        if record is not None:
            record.base_x0 = cfg_combine(pred, replace(layout, cond_scale=scale))

    def _row_index(self, layout: CfgLayout, device: torch.device) -> Tensor:
        """``layout.row_images()`` as an index tensor, made once: indexing a GPU tensor with a Python list copies
        the list to the GPU and waits for it, a host sync on every call."""
        key = (layout, device)
        if key not in self._row_indices:
            self._row_indices[key] = torch.tensor(layout.row_images(), device=device)
        return self._row_indices[key]

    def _first_cond_rows(self, layout: CfgLayout, device: torch.device) -> Tensor:
        """Each image's first cond row, the row the host put in place of its skipped uncond, as an index tensor
        made once (see :meth:`_row_index`)."""
        key = (layout, device, "firsts")
        if key not in self._row_indices:
            self._row_indices[key] = torch.tensor([conds[0][0] for conds in layout.conds_list], device=device)
        return self._row_indices[key]

    def _target_x0(self, x_ve: Tensor, sigma: Tensor, out: Tensor, layout: CfgLayout) -> Tensor:
        combined = cfg_combine(_wide(out), layout)
        if self.bridge.target.output == "x0":
            return combined
        uncond = slice(layout.n_cond, layout.n_rows)
        return x_ve[uncond] - _bcast(sigma[uncond], combined) * combined


def _call_key(x: Tensor, level: Tensor, progress: float, rows: list[int], variants: list[int]) -> tuple:
    """Which model call a prefetched prediction belongs to: the very tensors, unmodified since (inference-mode
    tensors keep no version counter; their identity and storage still tell calls apart)."""
    return (*(_identity(t) for t in (x, level)), progress, tuple(rows), tuple(variants))


def _identity(t: Tensor) -> tuple:
    return id(t), t.data_ptr(), tuple(t.shape), None if t.is_inference() else t._version


def _wide(t: Tensor) -> Tensor:
    """At least float32: deltas of half-precision predictions lose their small differences."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


class SeparateTrajectory:
    """The source's own noisy latent, as the reference implementation keeps it.

    The source walks the same noise levels as the target but keeps its own (unscaled) noise; its clean part
    follows the target's corrected prediction, mapped into the source's latent format. Between calls it moves
    with a deterministic DDIM step: ``x(σ) = d + (σ / σ_prev) · (x_prev − d)``.
    """

    def __init__(self, bridge: SpaceBridge) -> None:
        self.bridge = bridge
        self.x: Tensor | None = None  # per image, source VE
        self.sigma: Tensor | None = None
        self.denoised: Tensor | None = None  # per image, source format
        self.init_x0: Tensor | None = None  # img2img: the target's clean starting latent, per image
        self.grid: resolution.SourceGrid | None = None  # the source's own area (DeltaGuidance.grid_for sets it)

    def source_point(self, x_ve: Tensor, sigma: Tensor, layout: CfgLayout) -> tuple[Tensor, Tensor]:
        images = layout.row_images()
        first_rows = [layout.n_cond + i for i in range(layout.batch)]
        xi, si = x_ve[first_rows], sigma[first_rows]
        if self.x is None or self.denoised is None or self.sigma is None:
            # start at the target's point with the same, unscaled noise; only the clean part changes format
            init = torch.zeros_like(xi) if self.init_x0 is None else self.init_x0.to(xi)
            self.x = xi - init + self.bridge.x0_to_source(init)
        else:
            ratio = _bcast(si / self.sigma, self.x)
            self.x = self.denoised + ratio * (self.x - self.denoised)
        self.sigma = si
        x, s = self.x, si
        if self.grid is not None:
            x0 = self.denoised if self.denoised is not None else self.bridge.x0_to_source(
                torch.zeros_like(xi) if self.init_x0 is None else self.init_x0.to(xi))
            per_image = torch.arange(layout.batch, device=x.device)
            x, s = self.grid.to_source(x, si, x0, per_image, layout.batch)
        xs, ls = self.bridge.source.from_ve(x, s)
        return xs[images], ls[images]

    def observe(self, x_ve: Tensor, sigma: Tensor, denoised: Tensor, output: str) -> None:
        x0 = denoised if output == "x0" else x_ve - _bcast(sigma, x_ve) * denoised
        self.denoised = self.bridge.x0_to_source(x0)


__all__ = ["CfgLayout", "DeltaGuidance", "SeparateTrajectory", "SourceModel", "StepRecord", "cfg_combine",
           "cond_mean"]
