"""The optional speed-ups through whole sampling loops: prefetch and OnDevice are exact, ReusedDelta calls less.

Tiny eps models on the CPU; the GPU timings live in bench/ and docs/performance.md, never in a test.
"""

from __future__ import annotations

import pytest
import torch

from bench.speedups import OnDevice, ReusedDelta
from devkit import sampling
from devkit.families import tiny_sd1, tiny_sdxl
from lib_delta.args import AdaptationGroup, DeltaSettings
from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SD1, SDXL, ModelSpace, SpaceBridge

PROMPTS, NEG = ["a red cube", "a tall tree"], ["", ""]
LAYOUT = CfgLayout.simple(2, 5.0)


def _cat(a, b):
    return {k: torch.cat([a[k], b[k]]) for k in a} if isinstance(a, dict) else torch.cat([a, b])


def _rows(c, rows):
    return {k: v[rows] for k, v in c.items()} if isinstance(c, dict) else c[rows]


class CountingSource:
    def __init__(self, models, cond):
        self.models, self.cond, self.calls = models, cond, 0

    def __call__(self, x, level, rows, variants):
        self.calls += 1
        return torch.stack([self.models[v](x, level, _rows(self.cond, list(rows))) for v in variants])


def denoiser(target, cond, guidance=None, prefetch=False):
    def model(x, sigma):
        x_in, s_in = torch.cat([x, x]), torch.cat([sigma, sigma])
        if guidance is not None and prefetch:
            guidance.prefetch(x_in, s_in, LAYOUT)
        out = target(x_in, s_in, cond)
        if guidance is not None:
            guidance.apply(x_in, s_in, out, LAYOUT)
        return cfg_combine(out, LAYOUT)

    return model


@pytest.fixture(scope="module")
def setup():
    base, adapted, xl = tiny_sd1(0), tiny_sd1(1, text_seed=0), tiny_sdxl(5)
    src_cond = _cat(base.encode(PROMPTS), base.encode(NEG))
    xl_cond = _cat(xl.encode(PROMPTS), xl.encode(NEG))
    sigmas = xl.denoiser.get_sigmas(6)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * sigmas[0]
    return base, adapted, xl, src_cond, xl_cond, sigmas, x


def _guidance(setup, wrap=lambda s: s, **group):
    base, adapted, _, src_cond, _, sigmas, _ = setup
    source = CountingSource([base.denoiser, adapted.denoiser], src_cond)
    s = DeltaSettings(enabled=True, source="base", groups=(AdaptationGroup(prompt="x", **group),))
    g = DeltaGuidance(s, SpaceBridge(ModelSpace(SD1), ModelSpace(SDXL)), wrap(source), ProgressClock(sigmas.tolist()))
    return g, source


def _sample(setup, g=None, prefetch=False):
    _, _, xl, _, xl_cond, sigmas, x = setup
    return sampling.sample_euler(denoiser(xl.denoiser, xl_cond, g, prefetch), x.clone(), sigmas)


@pytest.mark.parametrize("on_device", [False, True])
def test_prefetch_gives_the_same_image_with_one_source_call_per_model_call(setup, on_device):
    exact, exact_src = _guidance(setup)
    want = _sample(setup, exact)
    wrap = (lambda s: OnDevice(s, "cpu")) if on_device else (lambda s: s)
    g, source = _guidance(setup, wrap)
    got = _sample(setup, g, prefetch=True)
    assert torch.equal(got, want)
    assert source.calls == exact_src.calls == 6 and g.source_calls == 6


def test_a_prefetch_for_other_tensors_is_not_used(setup):
    g, source = _guidance(setup)
    exact, _ = _guidance(setup)
    _, _, xl, _, xl_cond, sigmas, x = setup
    x_in, s_in = torch.cat([x, x]), sigmas[1].expand(4).clone()
    g.prefetch(x_in * 2, s_in, LAYOUT)  # not the call that follows
    out, want = xl.denoiser(x_in, s_in, xl_cond), xl.denoiser(x_in, s_in, xl_cond)
    g.apply(x_in, s_in, out, LAYOUT)
    exact.apply(x_in, s_in, want, LAYOUT)
    assert torch.equal(out, want) and source.calls == 2


def test_prefetch_outside_the_window_calls_nothing(setup):
    g, source = _guidance(setup, end=0.5)
    got = _sample(setup, g, prefetch=True)
    assert torch.equal(got, _sample(setup, _guidance(setup, end=0.5)[0]))
    assert source.calls == 3


def test_reused_delta_every_call_is_exact_and_every_other_call_halves_the_source(setup):
    exact, _ = _guidance(setup)
    want = _sample(setup, exact)
    same, same_src = _guidance(setup, lambda s: ReusedDelta(s, 1))
    assert torch.equal(_sample(setup, same), want) and same_src.calls == 6
    half, half_src = _guidance(setup, lambda s: ReusedDelta(s, 2))
    got = _sample(setup, half)
    off = _sample(setup)
    assert half_src.calls == 3 and torch.isfinite(got).all()
    # an approximation: nearer the exact image than sampling without the delta
    assert (got - want).norm() < (off - want).norm()


def test_reused_delta_evaluates_again_for_other_rows():
    calls = []

    def source(x, level, rows, variants):
        calls.append(tuple(rows))
        return torch.zeros(len(variants), len(rows), 1)

    r = ReusedDelta(source, 3)
    x, lv = torch.zeros(4, 1), torch.ones(4)
    for rows in ([0, 1, 2, 3], [0, 1, 2, 3], [0, 1], [0, 1], [0, 1], [0, 1]):
        r(x[: len(rows)], lv[: len(rows)], rows, [0, 1])
    assert calls == [(0, 1, 2, 3), (0, 1), (0, 1)]
    with pytest.raises(ValueError):
        ReusedDelta(source, 0)
