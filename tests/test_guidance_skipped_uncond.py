"""Calls whose uncond rows the host skipped (AUTOMATIC1111's skip-early-CFG and NGMS; the Forge host's layout of the
same steps): the source is evaluated on the cond rows only, each image's first cond row stands in for its uncond, as
the host's denoiser does for the target, and the combine runs at scale 1, unguided, whatever the source's own scale.

Checked against the arithmetic written out row by row, with an AND layout whose images' first cond rows (0 and 2)
differ from the image indices (0 and 1), and with the prefetched call giving the same result.
"""

from __future__ import annotations

import pytest
import torch

from lib_delta.args import AdaptationGroup, DeltaSettings, LoraRef
from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SD1, ModelSpace, SpaceBridge

SIGMAS = [10.0, 5.0, 2.0, 1.0, 0.0]
GEN = torch.Generator().manual_seed(7)
COND = torch.randn(6, 4, 1, 1, generator=GEN, dtype=torch.float64)
VARIANT = torch.randn(3, 4, 1, 1, generator=GEN, dtype=torch.float64)
# image 0: rows 0 and 1 (AND, weights 1 and 0.5); image 1: row 2 (weight 0.8); uncond rows 3 and 4 skipped
SKIPPED = CfgLayout.from_conds_list([[(0, 1.0), (1, 0.5)], [(2, 0.8)]], 1.0, uncond_from_cond=True)
FIRSTS = [0, 2]


def model(x, sigma, rows, variant=0):
    s = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x / (1 + s) + COND[rows]) * (1 + VARIANT[variant])


class Source:
    def __init__(self):
        self.calls: list[tuple[list[int], list[int], int]] = []

    def __call__(self, x, level, rows, variants):
        self.calls.append((list(rows), list(variants), x.shape[0]))
        return torch.stack([model(x, level, list(rows), v) for v in variants])


def guidance(**kw) -> tuple[DeltaGuidance, Source]:
    group = AdaptationGroup(loras=(LoraRef("l"),), strength=0.7)
    settings = DeltaSettings(enabled=True, source="s", groups=(group,), **kw)
    source = Source()
    return DeltaGuidance(settings, SpaceBridge(ModelSpace(SD1), ModelSpace(SD1)), source, ProgressClock(SIGMAS)), \
        source


def inputs():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SKIPPED.n_rows, 4, 4, 4, generator=g, dtype=torch.float64)
    x[SKIPPED.n_cond:] = x[FIRSTS]  # the host's rows: the skipped uncond rows hold the images' latents
    level = torch.full((SKIPPED.n_rows,), 5.0, dtype=torch.float64)
    return x, level


def rows_with_firsts_as_uncond(pred: torch.Tensor) -> torch.Tensor:
    """The target's rows as AUTOMATIC1111's denoiser hands them: cond rows, then each image's first cond row."""
    return torch.cat([pred, pred[FIRSTS]])


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("kw", [{}, {"source_cfg": 9.0}, {"cfg_mode": "cond"}, {"mode": "base-first"},
                                {"mode": "base-first", "source_cfg": 4.0}])
def test_skipped_uncond_rows_take_the_sources_first_cond_rows_unguided(kw, prefetch):
    x, level = inputs()
    conds = list(range(SKIPPED.n_cond))
    out = rows_with_firsts_as_uncond(model(x[:SKIPPED.n_cond], level[:SKIPPED.n_cond], conds))
    g, source = guidance(**kw)
    got = out.clone()
    if prefetch:
        g.prefetch(x, level, SKIPPED)
    assert g.apply(x, level, got, SKIPPED)
    assert g.prefetched == int(prefetch)
    (rows, variants, n), = source.calls  # one call, on the cond rows only
    assert rows == conds and n == SKIPPED.n_cond

    lam = 0.7
    xc, lc = x[:SKIPPED.n_cond], level[:SKIPPED.n_cond]
    preds = {v: rows_with_firsts_as_uncond(model(xc, lc, conds, v)) for v in variants}
    if kw.get("mode") == "base-first":  # every row moves towards the source's row, combined at scale 1
        want = out + lam * (preds[variants[0]] - out)
    elif kw.get("cfg_mode") == "cond":  # the AND-weighted mean of each image's cond rows
        mean = [lambda p: p[0] * (1 / 1.5) + p[1] * (0.5 / 1.5), lambda p: p[2]]
        delta = torch.stack([m(preds[1]) - m(preds[0]) for m in mean])
        want = out + lam * delta[SKIPPED.row_images()]
    else:  # the combine at scale 1: uncond_i + Σ w (cond_j − uncond_i), uncond_i being image i's first cond row
        delta = cfg_combine(preds[1], SKIPPED) - cfg_combine(preds[0], SKIPPED)
        want = out + lam * delta[SKIPPED.row_images()]
    assert not torch.allclose(got, out)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)
    # and the host's combine of the corrected rows, unguided, moves each image by the delta alone
    if kw.get("mode") != "base-first" and kw.get("cfg_mode") != "cond":
        assert torch.allclose(cfg_combine(got, SKIPPED) - cfg_combine(out, SKIPPED), lam * delta, atol=1e-12)


def test_the_stand_in_rows_are_each_images_first_cond_row_not_the_image_index():
    """Image 1's uncond is cond row 2: taking row 1 (its image index, image 0's second AND part) would be wrong."""
    x, level = inputs()
    g, _ = guidance()
    pred = torch.stack([model(x[:3], level[:3], [0, 1, 2], v) for v in (0, 1)])
    got = g._call_source(x, level, [0, 1, 2], [0, 1], SKIPPED)
    assert torch.equal(got[:, 3:], pred[:, FIRSTS])
    assert not torch.equal(got[:, 4], pred[:, 1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_the_stand_in_rows_are_taken_without_a_host_sync():
    """On a GPU the first cond rows are picked with an index made once on that device: indexing with a Python list
    would copy the list to the GPU and wait for it, a host sync in every skipped call."""
    g, _ = guidance()
    g.source = lambda x, level, rows, variants: torch.stack([torch.tanh(x * (1 + v)) for v in variants])
    x, level = (t.cuda() for t in inputs())
    want = g._call_source(x, level, [0, 1, 2], [0, 1], SKIPPED)  # makes the index
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = g._call_source(x, level, [0, 1, 2], [0, 1], SKIPPED)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got, want) and torch.equal(got[:, 3:], got[:, FIRSTS])
