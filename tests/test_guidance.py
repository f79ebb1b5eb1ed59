"""The delta arithmetic on one model call, with analytic stand-in models."""

import pytest
import torch

from lib_delta.args import AdaptationGroup, DeltaSettings, LoraRef
from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine, cond_mean
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SD1, SDXL, ModelSpace, SpaceBridge, VPSchedule, vp_to_ve

SIGMAS = [10.0, 5.0, 2.0, 1.0, 0.0]
GEN = torch.Generator().manual_seed(1)
COND = torch.randn(8, 4, 1, 1, generator=GEN, dtype=torch.float64)  # per-row "conditioning"
VARIANT = torch.randn(4, 4, 1, 1, generator=GEN, dtype=torch.float64)  # per-variant weight change


def model(x, sigma, rows, variant=0):
    """A nonlinear stand-in denoiser: its x0 depends on the row's conditioning and on the variant."""
    s = sigma.reshape(-1, 1, 1, 1)
    return torch.tanh(x / (1 + s) + COND[rows]) * (1 + VARIANT[variant])


class Source:
    def __init__(self):
        self.calls = []

    def __call__(self, x, level, rows, variants):
        self.calls.append((list(rows), list(variants)))
        return torch.stack([model(x, level, list(rows), v) for v in variants])


def settings(*groups, **kw):
    return DeltaSettings(enabled=True, source="src", groups=tuple(groups), **kw)


def group(strength=1.0, **kw):
    return AdaptationGroup(loras=(LoraRef("l"),), strength=strength, **kw)


def run(s, layout, sigma=5.0, space=SD1, target_space=None, x=None, out=None):
    source = Source()
    bridge = SpaceBridge(ModelSpace(space), target_space or ModelSpace(SD1))
    dg = DeltaGuidance(s, bridge, source, ProgressClock(SIGMAS))
    x = torch.randn(layout.n_rows, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) \
        if x is None else x
    level = torch.full((layout.n_rows,), sigma, dtype=torch.float64)
    rows = list(range(layout.n_rows))
    out = model(x, level, rows) if out is None else out
    before = out.clone()
    applied = dg.apply(x, level, out, layout)
    return before, out, applied, source, x, level


LAYOUT = CfgLayout.simple(2, 7.0)


def test_layout_and_combine_match_a1111():
    layout = CfgLayout.from_conds_list([[(0, 1.0), (1, 0.5)], [(2, 1.0)]], 5.0)
    assert (layout.batch, layout.n_cond, layout.n_rows) == (2, 3, 5)
    assert layout.row_images() == [0, 0, 1, 0, 1]
    rows = torch.randn(5, 4, 2, 2, dtype=torch.float64)
    expected0 = rows[3] + (rows[0] - rows[3]) * 5.0 + (rows[1] - rows[3]) * 2.5
    expected1 = rows[4] + (rows[2] - rows[4]) * 5.0
    assert torch.allclose(cfg_combine(rows, layout), torch.stack([expected0, expected1]))
    assert torch.allclose(cond_mean(rows, layout)[0], (rows[0] + 0.5 * rows[1]) / 1.5)


def test_zero_strength_and_empty_window_leave_everything_untouched():
    for s in (settings(group(0.0)), settings(group(1.0, start=0.5, end=0.5)), settings(group(1.0, start=0.6))):
        before, out, applied, source, *_ = run(s, LAYOUT, sigma=10.0)
        assert not applied and source.calls == [] and torch.equal(before, out)


def test_adding_to_every_row_adds_once_after_combine():
    before, out, applied, source, x, level = run(settings(group()), LAYOUT)
    assert applied and source.calls == [([0, 1, 2, 3], [0, 1])]
    rows = list(range(4))
    expected_delta = cfg_combine(model(x, level, rows, 1), LAYOUT) - cfg_combine(model(x, level, rows, 0), LAYOUT)
    assert torch.allclose(cfg_combine(out, LAYOUT) - cfg_combine(before, LAYOUT), expected_delta)


def test_target_equal_to_source_with_unit_strength_is_the_adapted_model():
    # target == source base: its own prediction is variant 0 of the same model
    _, out, *_ , x, level = run(settings(group()), LAYOUT)
    adapted = cfg_combine(model(x, level, list(range(4)), 1), LAYOUT)
    assert torch.allclose(cfg_combine(out, LAYOUT), adapted, rtol=1e-12, atol=1e-12)


def test_linear_in_strength():
    b, o1, *_ = run(settings(group(1.0)), LAYOUT)
    _, o2, *_ = run(settings(group(2.5)), LAYOUT)
    assert torch.allclose(o2 - b, 2.5 * (o1 - b))


def test_two_groups_add_their_deltas_in_one_source_call():
    _b, o1, *_ = run(settings(group(0.7)), LAYOUT)
    both = settings(group(0.7), AdaptationGroup(prompt="p", strength=-1.3))
    _, o12, _, source, x, level = run(both, LAYOUT)
    assert source.calls == [([0, 1, 2, 3], [0, 1, 2])]
    rows = list(range(4))
    d2 = cfg_combine(model(x, level, rows, 2), LAYOUT) - cfg_combine(model(x, level, rows, 0), LAYOUT)
    assert torch.allclose(cfg_combine(o12, LAYOUT), cfg_combine(o1, LAYOUT) - 1.3 * d2)


def test_a_group_outside_its_window_is_not_evaluated():
    s = settings(group(1.0, end=0.25), AdaptationGroup(prompt="p", start=0.25))
    _, _, _, source, *_ = run(s, LAYOUT, sigma=5.0)  # progress 0.25: only group 2
    assert source.calls == [([0, 1, 2, 3], [0, 2])]


def test_cond_mode_uses_cond_rows_only():
    layout = CfgLayout.from_conds_list([[(0, 1.0), (1, 0.5)], [(2, 1.0)]], 5.0)
    before, out, _, source, x, level = run(settings(group(), cfg_mode="cond"), layout)
    assert source.calls == [([0, 1, 2], [0, 1])]
    diff = model(x[:3], level[:3], [0, 1, 2], 1) - model(x[:3], level[:3], [0, 1, 2], 0)
    d = cond_mean(diff, layout)
    assert torch.allclose(cfg_combine(out, layout) - cfg_combine(before, layout), d)


def test_base_first_replaces_the_target_inside_the_window():
    s = DeltaSettings(enabled=True, source="src", mode="base-first", groups=(AdaptationGroup(end=0.5),))
    target_out = torch.zeros(4, 4, 4, 4, dtype=torch.float64) + 3.0
    _, out, applied, source, x, level = run(s, LAYOUT, out=target_out)
    assert applied and source.calls == [([0, 1, 2, 3], [0])]
    assert torch.allclose(out, model(x, level, list(range(4)), 0))
    _, out2, applied2, *_ = run(s, LAYOUT, sigma=2.0, out=torch.zeros(4, 4, 4, 4, dtype=torch.float64) + 3.0)
    assert not applied2 and torch.all(out2 == 3.0)


def test_delta_is_carried_into_the_target_latent_format():
    before, out, _, _, x, level = run(settings(group()), LAYOUT, space=SD1, target_space=ModelSpace(SDXL))
    # the source saw the target's point mapped into its format, at a rescaled sigma
    a = SD1.scale / SDXL.scale
    rows = list(range(4))
    xs, ls = x * a, level * a
    d_src = cfg_combine(model(xs, ls, rows, 1), LAYOUT) - cfg_combine(model(xs, ls, rows, 0), LAYOUT)
    assert torch.allclose(cfg_combine(out, LAYOUT) - cfg_combine(before, LAYOUT), d_src / a)


def test_eps_output_gets_the_same_correction_as_x0():
    """A1111's timestep samplers hand ε and a timestep: the same delta, expressed in ε."""
    ac = torch.linspace(0.9985, 0.0047, 1000, dtype=torch.float64)
    sched = VPSchedule(ac)
    t = torch.full((4,), 600.0, dtype=torch.float64)
    alpha = sched.alpha_at(t).double()
    x_vp = torch.randn(4, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x_ve, sigma = vp_to_ve(x_vp, alpha)
    rows = list(range(4))
    x0_target = model(x_ve, sigma, rows, 3)
    eps_target = (x_ve - x0_target) / sigma.reshape(-1, 1, 1, 1)
    s = settings(group())
    # x0 path
    _b_x0, o_x0, *_ = run(s, LAYOUT, x=x_ve, out=x0_target.clone(), sigma=float(sigma[0]))
    # eps path, target in the VP convention
    eps_space = ModelSpace(SD1, "vp", "eps", sched)
    source = Source()
    dg = DeltaGuidance(s, SpaceBridge(ModelSpace(SD1), eps_space), source, ProgressClock([999, 600, 0], False))
    out = eps_target.clone()
    assert dg.apply(x_vp, t, out, LAYOUT)
    x0_from_eps = x_ve - sigma.reshape(-1, 1, 1, 1) * out
    assert torch.allclose(x0_from_eps, o_x0, atol=1e-5)


def test_records_for_the_preview():
    source = Source()
    dg = DeltaGuidance(settings(group()), SpaceBridge(ModelSpace(SD1), ModelSpace(SD1)), source,
                       ProgressClock(SIGMAS), record=True)
    x = torch.randn(4, 4, 4, 4, dtype=torch.float64)
    level = torch.full((4,), 5.0, dtype=torch.float64)
    dg.apply(x, level, model(x, level, [0, 1, 2, 3]), LAYOUT)
    (r,) = dg.records
    assert r.progress == pytest.approx(0.25) and r.strengths == (1.0,)
    assert r.target_x0.shape == r.base_x0.shape == r.adapted_x0.shape == r.delta.shape == (2, 4, 4, 4)
    assert torch.allclose(r.adapted_x0 - r.base_x0, r.delta)


def test_separate_trajectory_keeps_its_own_noise_scale():
    s = settings(group(), trajectory="separate")
    source = Source()
    bridge = SpaceBridge(ModelSpace(SD1), ModelSpace(SDXL))
    dg = DeltaGuidance(s, bridge, source, ProgressClock(SIGMAS))
    noise = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    x = torch.cat([noise, noise]) * 10.0
    level = torch.full((4,), 10.0, dtype=torch.float64)
    seen = []
    dg.source = lambda xs, ls, rows, variants: (seen.append((xs, ls)), Source()(xs, ls, rows, variants))[1]
    out = model(x, level, [0, 1, 2, 3])
    dg.apply(x, level, out, LAYOUT)
    xs, ls = seen[0]
    assert torch.allclose(xs, x) and torch.allclose(ls, level)  # same noise, unscaled, at the target's sigma
    denoised = torch.zeros(2, 4, 4, 4, dtype=torch.float64) + 0.5
    dg.after_combine(x[2:], level[2:], denoised)
    x2 = x * 0.5
    level2 = torch.full((4,), 5.0, dtype=torch.float64)
    dg.apply(x2, level2, model(x2, level2, [0, 1, 2, 3]), LAYOUT)
    d_src = bridge.x0_to_source(denoised)
    expected = d_src + 0.5 * (x[2:] - d_src)  # a DDIM step from the last point towards the corrected x0
    assert torch.allclose(seen[1][0], torch.cat([expected, expected]))
