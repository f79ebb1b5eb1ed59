"""Forge's IP-Adapter patches on given rows of one batched source call: a row gate per ``attn2`` replacement.

Forge's UNet hands an ``attn2`` replacement the whole call: ``patch(q, k, v, extra_options)`` with the projected
queries, keys and values of every row, and ``extra_options["cond_or_uncond"]`` naming the call's chunks (its rows are
those chunks one after another, each the call's variants one after another). The gate computes the plain attention
of every row first — exactly what the unreplaced ``attn2`` computes (``attention_function(q, k, v, heads)``) — and then
replaces the rows of each group's adapted variant by that group's ``CrossAttentionPatch`` run on those rows alone:
the same chunks, so the patch picks its cond and uncond image embeddings per chunk as it does for Forge's own units.
Rows of no group (the base, other groups without an image prompt) keep the plain attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class AdaptedRowsAttn2:
    """One ``attn2`` key's replacement: ``owners`` pairs a group's patch with the positions of its variants in the
    call's variant order; ``batch`` rows per variant."""

    def __init__(self, owners: Sequence[tuple[Any, Sequence[int]]], batch: int,
                 row_cache: dict[tuple, Tensor] | None = None) -> None:
        self.owners = [(patch, tuple(positions)) for patch, positions in owners]
        self.batch = batch
        # row indices by call shape, shared by the gates of one call: every attn2 asks for the same few, and
        # building one copies it to the device
        self._rows = {} if row_cache is None else row_cache

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, extra_options: dict) -> Tensor:
        from backend import attention

        out = attention.attention_function(q, k, v, extra_options["n_heads"])
        chunks = len(extra_options["cond_or_uncond"])
        per = q.shape[0] // chunks
        for patch, positions in self.owners:
            key = (positions, chunks, per, str(q.device))
            idx = self._rows.get(key)
            if idx is None:
                idx = self._rows[key] = rows(positions, chunks, per, self.batch, q.device)
            out[idx] = patch(q[idx], k[idx], v[idx], extra_options).to(out.dtype)
        return out


def rows(positions: Sequence[int], chunks: int, per: int, batch: int, device: Any) -> Tensor:
    """The rows of the variants at ``positions`` in every chunk, chunk by chunk (the order a patch expects; the
    ControlNet row gate takes its rows the same way)."""
    return torch.cat([torch.arange(c * per + j * batch, c * per + (j + 1) * batch)
                      for c in range(chunks) for j in positions]).to(device)


def gated(groups: Sequence[tuple[dict[Any, Any], Sequence[int]]], batch: int) -> dict[Any, AdaptedRowsAttn2]:
    """The call's ``patches_replace["attn2"]``: for every key any group patches, a gate over the groups that do."""
    keys = list(dict.fromkeys(k for attn2, _ in groups for k in attn2))
    row_cache: dict[tuple, Tensor] = {}
    return {key: AdaptedRowsAttn2([(attn2[key], positions) for attn2, positions in groups if key in attn2], batch,
                                  row_cache) for key in keys}
