"""The source at its own resolution: sizes, the resamplers' noise statistics, and the guidance around them."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lib_delta.args import AdaptationGroup, DeltaSettings, LoraRef, from_positional, to_positional
from lib_delta.errors import DeltaError
from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine
from lib_delta.resolution import (
    METHOD,
    METHODS,
    SourceGrid,
    down,
    native_side,
    native_size,
    noise_variance,
    source_grid,
    source_pixels,
)
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SD1, SDXL, ModelSpace, SpaceBridge, VPSchedule, vp_to_ve

SIGMAS = [10.0, 5.0, 2.0, 1.0, 0.0]
LAYOUT = CfgLayout.simple(2, 7.0)
GEN = torch.Generator().manual_seed(3)
COND = torch.randn(8, 4, 1, 1, generator=GEN, dtype=torch.float64)
VARIANT = torch.randn(4, 4, 1, 1, generator=GEN, dtype=torch.float64)


def model(x, sigma, rows, variant=0):
    """A nonlinear stand-in denoiser whose x0 depends on the row's conditioning, the variant and the position
    (a local blur: its prediction at a pixel depends on its neighbours, as a UNet's does)."""
    s = sigma.reshape(-1, 1, 1, 1)
    local = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return torch.tanh(local / (1 + s) + COND[rows]) * (1 + VARIANT[variant])


class Source:
    """Records the shapes it is called with."""

    def __init__(self, fn=model):
        self.fn, self.calls, self.shapes = fn, [], []

    def __call__(self, x, level, rows, variants):
        self.calls.append((list(rows), list(variants)))
        self.shapes.append(tuple(x.shape[-2:]))
        return torch.stack([self.fn(x, level, list(rows), v) for v in variants])


def settings(resolution="native", strength=1.0, **kw):
    group = AdaptationGroup(loras=(LoraRef("l"),), strength=strength)
    return DeltaSettings(enabled=True, source="src", groups=(group,), source_resolution=resolution, **kw)


def guidance(s, source, native_px=16, target=None, **kw):
    """A source trained at ``native_px`` pixels, i.e. ``native_px / 8`` latent cells on a side."""
    bridge = SpaceBridge(ModelSpace(SD1, native_px=native_px), target or ModelSpace(SD1))
    return DeltaGuidance(s, bridge, source, ProgressClock(SIGMAS), **kw)


def latent(hw, layout=LAYOUT, seed=2):
    return torch.randn(layout.n_rows, 4, *hw, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def apply(dg, x, sigma=5.0, layout=LAYOUT, out=None):
    level = torch.full((layout.n_rows,), sigma, dtype=torch.float64)
    out = model(x, level, list(range(layout.n_rows))) if out is None else out
    before = out.clone()
    applied = dg.apply(x, level, out, layout)
    return before, out, applied


# --- sizes ---------------------------------------------------------------------------------------------------------


def test_native_area_keeps_the_aspect_on_the_latent_grid():
    assert native_size((128, 128), 512) == (64, 64)  # SD1.5 source, 1024² target
    assert native_size((128, 192), 512) == (56, 80)  # 1024 high, 1536 wide: 448×640 px, aspect 1.43 for 1.5
    assert native_size((128, 192), 1024) == (104, 160)  # SDXL source at 1536×1024
    assert native_size((96, 96), 768) == (96, 96)  # SD2-v at its own size
    h, w = native_size((200, 120), 512)
    assert h % 8 == 0 and w % 8 == 0 and h > w and abs(h * w - 64 * 64) <= 64 * 8


def test_a_target_at_or_below_the_source_area_is_kept():
    assert native_size((64, 64), 512) == (64, 64)
    assert native_size((48, 80), 512) == (48, 80)  # fewer cells than 64²: left alone, never upsampled
    assert native_size((72, 64), 512) == (64, 64)  # just above: shrunk onto the grid
    assert source_grid("native", (64, 64), 512) is None
    assert source_grid("target", (128, 128), 512) is None
    assert source_grid("native", (128, 128), None) is None  # a family of unknown size


def test_the_source_is_conditioned_on_the_size_it_runs_at():
    """An SDXL source's size conditioning: 1152×896 px for a 2048×1536 image (its native area, the image's aspect on
    the latent grid), the image's own size where it runs at the image's grid."""
    assert source_pixels("native", (2048, 1536), 1024) == (1152, 896)  # (width, height)
    assert native_size((192, 256), 1024) == (112, 144)  # the same in latent cells, (height, width)
    assert source_pixels("native", (1536, 1024), 1024) == (1280, 832)
    assert source_pixels("native", (1024, 1024), 1024) == (1024, 1024)  # at its own size: unchanged
    assert source_pixels("target", (2048, 1536), 1024) == (2048, 1536)
    assert source_pixels("native", (2048, 1536), None) == (2048, 1536)  # a family of unknown size


def test_native_sides_of_the_families():
    assert (native_side("SD1"), native_side("SD2"), native_side("SD2", v_prediction=True),
            native_side("SDXL")) == (512, 512, 768, 1024)
    assert native_side("pixels") is None


# --- the resamplers ------------------------------------------------------------------------------------------------


def test_noise_variance_is_the_variance_area_resizing_leaves_white_noise():
    assert torch.allclose(noise_variance((64, 64), (32, 32)), torch.full((32, 32), 0.25))
    v = noise_variance((30, 45), (18, 25))
    eps = torch.randn(20000, 1, 30, 45, generator=torch.Generator().manual_seed(0))
    empirical = down(eps, (18, 25)).var(dim=0)[0]
    assert torch.allclose(empirical, v, rtol=0.08)
    assert not torch.allclose(v, v.mean().expand_as(v), rtol=0.01)  # uneven windows: per-pixel variances differ


@pytest.mark.parametrize("method", METHODS)
def test_each_resampling_keeps_the_clean_part_and_only_area_loses_noise(method):
    g = torch.Generator().manual_seed(1)
    x0 = F.interpolate(torch.randn(8, 4, 8, 12, generator=g), size=(64, 96), mode="bilinear")
    eps = torch.randn(8, 4, 64, 96, generator=g)
    sigma = torch.full((8,), 3.0)
    grid = SourceGrid((64, 96), (32, 48), method)
    xs, level = grid.to_source(x0 + 3.0 * eps, sigma, x0, torch.arange(8), 8)
    assert torch.equal(level, sigma / 2 if method == "shift" else sigma)  # shift: the level the average has
    noise = (xs - down(x0, (32, 48))) / level[:, None, None, None]
    assert abs(noise.mean().item()) < 0.02
    assert noise.std().item() == pytest.approx(0.5 if method == "area" else 1.0, rel=0.03)
    kept = torch.corrcoef(torch.stack([noise.flatten(), down(eps, (32, 48)).flatten()]))[0, 1].item()
    # area, shift and rescale carry the target's own noise (coarsened); renoise draws its own; topup keeps part
    expected = {"area": 1.0, "shift": 1.0, "rescale": 1.0, "topup": 0.5, "renoise": 0.0}[method]
    assert kept == pytest.approx(expected, abs=0.03)


def test_shift_tops_uneven_windows_up_to_the_largest_variance():
    grid = SourceGrid((30, 45), (18, 25), "shift")
    eps = torch.randn(20000, 1, 30, 45, generator=torch.Generator().manual_seed(4))
    xs, level = grid.to_source(eps, torch.ones(20000), None, torch.arange(20000), 20000)
    v = noise_variance((30, 45), (18, 25))
    assert level[0].item() == pytest.approx(v.max().sqrt().item())
    assert torch.allclose(xs.var(dim=0)[0], v.max().expand_as(v), rtol=0.08)


def test_fixed_noise_is_per_image_and_the_same_for_every_rows_of_an_image():
    grid = SourceGrid((32, 32), (16, 16), "renoise")
    images = torch.tensor([0, 1, 0, 1])
    n = grid.noise(torch.zeros(4, 4, 1, 1), images, 2)
    assert torch.equal(n[0], n[2]) and torch.equal(n[1], n[3]) and not torch.equal(n[0], n[1])
    again = SourceGrid((32, 32), (16, 16), "renoise").noise(torch.zeros(4, 4, 1, 1), images, 2)
    assert torch.equal(n, again)  # the same request gives the same image


def test_the_methods_that_need_the_target_estimate_say_so():
    with pytest.raises(ValueError, match="needs the target's denoised estimate"):
        SourceGrid((32, 32), (16, 16), "rescale").to_source(torch.zeros(1, 4, 32, 32), torch.ones(1), None)
    SourceGrid((32, 32), (16, 16), "shift").to_source(torch.zeros(1, 4, 32, 32), torch.ones(1), None)  # needs none
    with pytest.raises(ValueError, match="unknown resampling"):
        SourceGrid((32, 32), (16, 16), "nearest")


# --- the guidance --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution", ["native", "target"])
def test_at_the_source_size_both_settings_are_todays_computation_bit_for_bit(resolution):
    x = latent((2, 2))  # 16 px: the source's own size
    ref_src, src = Source(), Source()
    want = apply(guidance(settings("target"), ref_src, native_px=None), x)[1]
    got = apply(guidance(settings(resolution), src), x)[1]
    assert torch.equal(got, want) and src.shapes == ref_src.shapes == [(2, 2)]


def test_zero_strength_never_calls_the_source_at_any_size():
    src = Source()
    dg = guidance(settings(strength=0.0), src)
    for hw in ((2, 2), (8, 8), (8, 16)):
        before, out, applied = apply(dg, latent(hw))
        assert not applied and torch.equal(before, out)
    assert src.calls == []


def test_identity_at_the_source_native_size_with_cfg():
    """source == target, λ = 1, cfg mode: the corrected prediction is the adapted model's, native or not."""
    x = latent((2, 2))
    for resolution in ("native", "target"):
        _, out, _ = apply(guidance(settings(resolution), Source()), x)
        level = torch.full((4,), 5.0, dtype=torch.float64)
        adapted = cfg_combine(model(x, level, [0, 1, 2, 3], 1), LAYOUT)
        assert torch.allclose(cfg_combine(out, LAYOUT), adapted, atol=1e-12)


def test_native_source_runs_at_its_area_and_its_delta_comes_back_upsampled():
    src = Source()
    x = latent((8, 12))  # 64×96 px for a 16 px source: 2×2 · (4/3)… → its grid
    applied = apply(guidance(settings(), src), x)[2]
    assert applied and src.shapes == [native_size((8, 12), 16, grid=8)]
    assert src.shapes[0] != (8, 12)


def test_a_smooth_delta_is_carried_whole():
    """An adaptation that adds a constant to every x0 gives that constant back at the target's size."""
    shift = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64).reshape(1, 4, 1, 1)

    def shifted(x, sigma, rows, variant=0):
        return model(x, sigma, rows) + (shift if variant else 0.0)

    for method in METHODS:
        grid_size = 2
        src = Source(shifted)
        x = latent((4 * grid_size, 4 * grid_size))
        dg = guidance(settings(), src, native_px=8 * 8, resampling=method)  # an 8×8-cell source: a 4× smaller area
        before, out, _ = apply(dg, x)
        assert src.shapes == [(8, 8)]
        assert torch.allclose(cfg_combine(out, LAYOUT) - cfg_combine(before, LAYOUT), shift.expand(2, 4, 8, 8))


def _big_grid_guidance(s, src, **kw):
    # the grid rounds to 8 cells: a 16×16-cell target and an 8×8-cell source
    return guidance(s, src, native_px=64, **kw)


def test_native_changes_the_result_and_stays_finite():
    x = latent((16, 16))
    got = apply(_big_grid_guidance(settings(), Source()), x)[1]
    want = apply(_big_grid_guidance(settings("target"), Source()), x)[1]
    assert torch.isfinite(got).all() and not torch.allclose(got, want, atol=1e-3)


def test_eps_targets_get_the_upsampled_delta_in_their_parameterisation():
    """A1111's timestep samplers: the target hands eps on a VP latent; Δeps = −Δx0 / σ per row."""
    ac = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64)
    target = ModelSpace(SD1, "vp", "eps", VPSchedule(ac))
    shift = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64).reshape(1, 4, 1, 1)
    src = Source(lambda x, s, rows, v=0: model(x, s, rows) + (shift if v else 0.0))
    bridge = SpaceBridge(ModelSpace(SD1, native_px=64), target)
    dg = DeltaGuidance(settings(), bridge, src, ProgressClock([999.0, 500.0, 0.0], log_space=False))
    x = latent((16, 16))
    t = torch.full((4,), 500.0, dtype=torch.float64)
    out = torch.zeros_like(x)
    dg.apply(x, t, out, LAYOUT)
    _, sigma = vp_to_ve(x, ac[500].reshape(1).float())
    assert src.shapes == [(8, 8)]
    assert torch.allclose(out, (-shift / sigma.double()).expand_as(out), rtol=1e-5)


def test_base_first_replaces_the_coarse_scales_and_keeps_the_target_fine_ones():
    """A source predicting exactly the target's coarsened x0 changes nothing; one predicting a constant moves
    the coarse part to it and leaves the target's fine detail."""
    x = latent((16, 16))
    level = torch.full((4,), 5.0, dtype=torch.float64)
    target_x0 = model(x, level, [0, 1, 2, 3])

    class Echo:
        def __init__(self):
            self.shapes = []

        def __call__(self, xs, ls, rows, variants):
            self.shapes.append(tuple(xs.shape[-2:]))
            return down(target_x0, (8, 8))[list(rows)][None]

    s = replace(settings(), mode="base-first")
    echo = Echo()
    dg = _big_grid_guidance(s, echo)
    out = target_x0.clone()
    dg.apply(x, level, out, LAYOUT)
    assert echo.shapes == [(8, 8)] and torch.allclose(out, target_x0, atol=1e-12)


def test_separate_trajectory_runs_on_the_source_grid():
    src = Source()
    dg = _big_grid_guidance(settings(trajectory="separate"), src)
    x = latent((16, 16))
    for sigma in (10.0, 5.0):
        level = torch.full((4,), sigma, dtype=torch.float64)
        out = model(x, level, [0, 1, 2, 3])
        dg.apply(x, level, out, LAYOUT)
        dg.after_combine(x[2:], level[2:], cfg_combine(out, LAYOUT))
        assert torch.isfinite(out).all()
    assert src.shapes == [(8, 8), (8, 8)]


@pytest.mark.parametrize("method", METHODS)
def test_prefetch_only_where_the_point_needs_no_target_prediction(method):
    src = Source()
    dg = _big_grid_guidance(settings(), src, resampling=method)
    x = latent((16, 16))
    level = torch.full((4,), 5.0, dtype=torch.float64)
    dg.prefetch(x, level, LAYOUT)
    started = len(src.calls)
    dg.apply(x, level, model(x, level, [0, 1, 2, 3]), LAYOUT)
    assert started == (0 if method in ("renoise", "rescale") else 1)
    assert len(src.calls) == 1 and dg.prefetched == started


def test_records_for_the_preview_are_on_the_target_grid():
    src = Source()
    dg = _big_grid_guidance(settings(preview=True), src)
    dg.record = True
    apply(dg, latent((16, 16)))
    r = dg.records[0]
    assert r.base_x0.shape[-2:] == r.delta.shape[-2:] == r.target_x0.shape[-2:] == (16, 16)


def test_a_sdxl_target_gets_the_delta_in_its_latent_format():
    shift = torch.tensor([0.3, -0.2, 0.1, 0.5], dtype=torch.float64).reshape(1, 4, 1, 1)
    src = Source(lambda x, s, rows, v=0: model(x, s, rows) + (shift if v else 0.0))
    dg = guidance(settings(), src, native_px=64, target=ModelSpace(SDXL))
    before, out, _ = apply(dg, latent((16, 16)))
    change = cfg_combine(out, LAYOUT) - cfg_combine(before, LAYOUT)
    assert torch.allclose(change, (shift * SDXL.scale / SD1.scale).expand_as(change))


def test_the_default_resampling_is_one_of_the_measured():
    assert METHOD in METHODS


# --- the setting ---------------------------------------------------------------------------------------------------


def test_source_resolution_reaches_every_form():
    s = settings()
    assert DeltaSettings.from_dict(s.to_dict()) == s
    assert s.to_infotext()["Delta source resolution"] == "native"
    assert DeltaSettings.from_infotext(s.to_infotext()) == s
    assert "Delta source resolution" not in settings("target").to_infotext()  # today's behaviour: no key
    assert from_positional(to_positional(s)) == s
    assert settings("target").with_overrides({"source_resolution": "native"}) == s
    assert "source_resolution=native" in s.summary()
    with pytest.raises(DeltaError, match="source_resolution is 'half'; allowed: target, native"):
        DeltaSettings.from_dict({**s.to_dict(), "source_resolution": "half"}).validated()


# --- why "shift": a world where every denoiser is known exactly ---------------------------------------------------


def test_only_shift_gives_the_delta_a_source_of_the_coarse_world_owes_the_fine_one():
    """Pixels i.i.d. N(m, 1) on the target's grid; the source's world is the same one averaged 2×2, N(m, 1/4) per
    pixel. The exact denoiser of an N(m, v) world at noise σ is ``m + v / (v + σ²) · (x − m)``, so an adaptation
    that moves m from 0 to μ changes the target's prediction by μ·σ² / (1 + σ²). Only the source asked at σ/2, the
    level the averaged noise has, owes that same delta; one told σ owes μ·σ² / (1/4 + σ²), too much."""
    mu = torch.tensor([0.4, -0.3, 0.2, 0.1], dtype=torch.float64).reshape(1, 4, 1, 1)

    def coarse_world(x, sigma, rows, variant=0):
        s2 = sigma.reshape(-1, 1, 1, 1) ** 2
        m = mu if variant else 0.0
        return m + 0.25 / (0.25 + s2) * (x - m)

    x = latent((16, 16))
    for sigma in (10.0, 2.0, 0.5):
        owed = (mu * sigma**2 / (1 + sigma**2)).expand(2, 4, 16, 16)
        for method in METHODS:
            dg = guidance(settings(), Source(coarse_world), native_px=64, resampling=method)
            before, out, _ = apply(dg, x, sigma=sigma, out=torch.zeros_like(x))
            got = cfg_combine(out, LAYOUT) - cfg_combine(before, LAYOUT)
            assert torch.allclose(got, owed, atol=1e-12) == (method == "shift"), (method, sigma)
        # the source run on the fine grid is outside its world: it owes the same too-large delta
        before, out, _ = apply(guidance(settings("target"), Source(coarse_world), native_px=64), x, sigma=sigma)
        got = cfg_combine(out, LAYOUT) - cfg_combine(before, LAYOUT)
        assert torch.allclose(got, (mu * sigma**2 / (0.25 + sigma**2)).expand_as(got), atol=1e-12)
