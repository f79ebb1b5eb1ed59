"""The source as a host runs it: one forward over ``[base rows | adapted rows]``, the LoRA on its own rows."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from devkit.denoisers import Cond
from lib_delta.cuda_graph import GraphedCall, storage_fingerprint
from lib_delta.lora import DeltaPatch

Plan = tuple[tuple[int, int, int], ...]  # (first row, end row, LoRA group) of each adapted block


def take(cond: Cond, rows: Sequence[int], repeat: int = 1) -> Cond:
    """The conditioning of ``rows`` (target layout [cond, uncond]), repeated for each variant."""
    if isinstance(cond, dict):
        return {k: take(v, rows, repeat) for k, v in cond.items()}
    index = torch.tensor(list(rows), device=cond.device)
    return cond.index_select(0, index).repeat(repeat, *[1] * (cond.dim() - 1))


class BatchedSource:
    """A :class:`~lib_delta.guidance.SourceModel` over one denoiser and its LoRA patch.

    ``hold``: the patch stays attached between calls (Forge's host does this) until :meth:`release`; otherwise
    it is moved to the model's device and attached around each call, as the A1111 host does. ``graphed``
    replays the call from a CUDA graph (:mod:`lib_delta.cuda_graph`); ``compiled`` runs the denoiser through
    ``torch.compile`` (the patch held).
    """

    def __init__(self, denoiser: nn.Module, cond: Cond, patch: DeltaPatch | None, *, hold: bool = False,
                 graphed: bool = False, compiled: bool = False) -> None:
        self.denoiser = denoiser
        self.cond = cond
        self.patch = patch
        self.hold = hold or compiled
        self.compiled = compiled
        self.device = next(denoiser.parameters()).device
        self.calls = 0
        self._conds: dict[tuple, Cond] = {}
        self._model = torch.compile(denoiser, dynamic=False) if compiled else denoiser
        if compiled and patch is not None:
            # unfolded, on compact weights: folded layers' strided outputs make dynamo recompile to its limit
            patch.release()
            patch.folding = False
        self.graph: GraphedCall | None = None
        if graphed:
            weights = storage_fingerprint([denoiser])
            self.graph = GraphedCall(self._forward, fingerprint=lambda: (weights(), id(patch)))

    def __call__(self, x: Tensor, level: Tensor, rows: Sequence[int], variants: Sequence[int]) -> Tensor:
        self.calls += 1
        n, k = len(rows), len(variants)
        key = (tuple(rows), k)
        if key not in self._conds:  # the host caches its conditioning per step the same way
            self._conds[key] = take(self.cond, rows, k)
        plan = tuple((i * n, (i + 1) * n, v - 1) for i, v in enumerate(variants) if v > 0)
        xb, lb = x.repeat(k, *[1] * (x.dim() - 1)), level.repeat(k)
        out = (self.graph or self._forward)(xb, lb, self._conds[key], plan)
        return out.view(k, n, *x.shape[1:])

    def _forward(self, x: Tensor, level: Tensor, cond: Cond, plan: Plan) -> Tensor:
        if self.patch is None or not plan:
            return self._model(x, level, cond)
        rows = [(slice(a, b), g) for a, b, g in plan]
        if self.hold:
            self.patch.attach()  # once: a no-op while attached
            with self.patch.rows(rows):
                return self._model(x, level, cond)
        self.patch.to(device=self.device)
        with self.patch, self.patch.rows(rows):
            return self._model(x, level, cond)

    def release(self) -> None:
        """Detach a held patch, so that another patch of the same model can attach. Not for a compiled model:
        attaching again makes new layer forwards, and torch.compile would recompile."""
        if self.hold and self.patch is not None and not self.compiled:
            self.patch.detach()

    def close(self) -> None:
        if self.patch is not None and self.hold:
            self.patch.detach()
            self.patch.folding = True
        if self.graph is not None:
            self.graph.reset()
