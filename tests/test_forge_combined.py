"""The core's combined-prediction path (``DeltaGuidance.apply_combined``), which Forge's post-CFG hook uses: it must
equal correcting the per-row outputs and combining them, for every mode and an AND layout."""

import pytest
import torch

from lib_delta.args import AdaptationGroup, DeltaSettings, LoraRef
from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SD1, SDXL, ModelSpace, SpaceBridge

SIGMAS = [10.0, 5.0, 2.0, 1.0, 0.0]
GEN = torch.Generator().manual_seed(11)
COND = torch.randn(8, 4, 1, 1, generator=GEN, dtype=torch.float64)
VARIANT = torch.randn(4, 4, 1, 1, generator=GEN, dtype=torch.float64)
LAYOUTS = [CfgLayout.simple(2, 6.0), CfgLayout.from_conds_list([[(0, 1.0), (1, 0.5)], [(2, 0.8)]], 4.5)]


def model(x, sigma, rows, variant=0):
    s = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x / (1 + s) + COND[rows]) * (1 + VARIANT[variant])


def source(x, level, rows, variants):
    return torch.stack([model(x, level, list(rows), v) for v in variants])


def guidance(strength=0.7, target=SD1, **kw):
    s = DeltaSettings(enabled=True, source="s", groups=(AdaptationGroup(loras=(LoraRef("l"),), strength=strength),),
                      **kw)
    return DeltaGuidance(s, SpaceBridge(ModelSpace(SD1), ModelSpace(target)), source, ProgressClock(SIGMAS))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kw", [{}, {"cfg_mode": "cond"}, {"mode": "base-first"}, {"target": SDXL}])
def test_combined_equals_per_row_then_combine(layout, kw):
    x_img = torch.randn(layout.batch, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    level_img = torch.full((layout.batch,), 5.0, dtype=torch.float64)
    images = layout.row_images()
    rows = model(x_img[images], level_img[images], list(range(layout.n_rows)))
    combined = cfg_combine(rows, layout)

    assert guidance(**kw).apply(x_img[images], level_img[images], rows, layout)
    got = combined.clone()
    assert guidance(**kw).apply_combined(x_img, level_img, got, layout)
    want = cfg_combine(rows, layout)
    assert not torch.allclose(got, combined)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_zero_strength_leaves_the_combined_prediction_bit_identical():
    layout = LAYOUTS[1]
    x_img = torch.randn(layout.batch, 4, 4, 4, dtype=torch.float64)
    denoised = torch.randn(layout.batch, 4, 4, 4, dtype=torch.float64)
    before = denoised.clone()
    assert not guidance(0.0).apply_combined(x_img, torch.full((layout.batch,), 5.0), denoised, layout)
    assert torch.equal(denoised, before)
