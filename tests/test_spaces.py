"""Conversions between latent formats, noise conventions and parameterisations round-trip and agree."""

import pytest
import torch

from lib_delta.errors import DeltaError
from lib_delta.spaces import (
    FLUX,
    SD1,
    SD3,
    SDXL,
    LatentMap,
    ModelSpace,
    SpaceBridge,
    VPSchedule,
    check_latent_compatible,
    eps_from_x0,
    flow_to_ve,
    flow_v_from_x0,
    v_from_x0,
    ve_to_flow,
    ve_to_vp,
    vp_to_ve,
    x0_from_eps,
    x0_from_flow,
    x0_from_v,
)

g = torch.Generator().manual_seed(0)
X0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
EPS = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
SIGMA = torch.tensor([0.3, 7.0], dtype=torch.float64)


def _b(s):
    return s.reshape(-1, 1, 1, 1)


def test_latent_formats_round_trip_through_the_unscaled_latent():
    for src, dst in [(SD1, SDXL), (SDXL, SD1), (SD3, FLUX)]:
        there = LatentMap.between(src, dst).x0(X0)
        assert torch.allclose(dst.to_unscaled(there), src.to_unscaled(X0))
        back = LatentMap.between(dst, src).x0(there)
        assert torch.allclose(back, X0)
    assert LatentMap.between(SD1, SD1).identity


def test_channel_mismatch_is_refused_with_both_names():
    with pytest.raises(DeltaError) as e:
        check_latent_compatible(SD1, SD3, "v1-5.safetensors", "sd3_medium.safetensors")
    msg = str(e.value)
    assert "v1-5.safetensors" in msg and "sd3_medium.safetensors" in msg and "4 latent channels" in msg
    assert "16 latent channels" in msg
    check_latent_compatible(SD1, SDXL, "a", "b")  # same channels: fine


def test_eps_v_x0_agree():
    x = X0 + _b(SIGMA) * EPS
    assert torch.allclose(x0_from_eps(x, SIGMA, EPS), X0)
    assert torch.allclose(eps_from_x0(x, SIGMA, X0), EPS)
    v = v_from_x0(x, SIGMA, X0)
    assert torch.allclose(x0_from_v(x, SIGMA, v), X0)
    # the v target as k-diffusion defines it: v = (eps - sigma * x0) / sqrt(sigma^2 + 1) ... for c_in-scaled input
    a = 1 / (SIGMA**2 + 1).sqrt()
    v_ref = _b(a) * EPS - _b(a * SIGMA) * X0
    assert torch.allclose(v, v_ref)


def test_flow_and_ve_are_the_same_noisy_point():
    t = torch.tensor([0.2, 0.9], dtype=torch.float64)
    x_flow = _b(1 - t) * X0 + _b(t) * EPS
    x_ve, sigma = flow_to_ve(x_flow, t)
    assert torch.allclose(sigma, t / (1 - t))
    assert torch.allclose(x_ve, X0 + _b(sigma) * EPS)
    back, t2 = ve_to_flow(x_ve, sigma)
    assert torch.allclose(back, x_flow) and torch.allclose(t2, t)
    v = flow_v_from_x0(x_flow, t, X0)
    assert torch.allclose(v, EPS - X0)
    assert torch.allclose(x0_from_flow(x_flow, t, v), X0)


def test_vp_and_ve_are_the_same_noisy_point():
    a = torch.tensor([0.9, 0.02], dtype=torch.float64)
    x_vp = _b(a.sqrt()) * X0 + _b((1 - a).sqrt()) * EPS
    x_ve, sigma = vp_to_ve(x_vp, a)
    assert torch.allclose(x_ve, X0 + _b(sigma) * EPS)
    back, a2 = ve_to_vp(x_ve, sigma)
    assert torch.allclose(back, x_vp) and torch.allclose(a2, a)


def test_vp_schedule_interpolates_fractional_timesteps():
    ac = torch.linspace(0.99, 0.01, 1000)
    sched = VPSchedule(ac)
    assert torch.allclose(sched.alpha_at(torch.tensor([10.0])), ac[10:11])
    mid = sched.alpha_at(torch.tensor([10.5]))
    assert torch.allclose(mid, (ac[10] + ac[11]) / 2)


def test_bridge_maps_the_same_noisy_point_between_formats():
    src = ModelSpace(SD1)
    tgt = ModelSpace(SDXL)
    bridge = SpaceBridge(src, tgt)
    x_t = X0 + _b(SIGMA) * EPS
    x_s, sigma_s = bridge.ve_to_source(x_t, SIGMA)
    x0_s = bridge.x0_to_source(X0)
    # the source sees its own clean latent plus the same noise at a rescaled level
    assert torch.allclose(x_s, x0_s + _b(sigma_s) * EPS)
    assert torch.allclose(bridge.x0_to_target(x0_s), X0)
    d = torch.ones(1, 4, 1, 1, dtype=torch.float64)
    assert torch.allclose(bridge.delta_to_target(d), d * SDXL.scale / SD1.scale)


def test_bridge_into_a_flow_source():
    bridge = SpaceBridge(ModelSpace(SD3, "flow"), ModelSpace(FLUX, "flow"))
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    x_flow = _b(1 - t) * X0 + _b(t) * EPS
    x_ve, sigma = bridge.target.to_ve(x_flow, t)
    xs, ts = bridge.ve_to_source(x_ve, sigma)
    x0_s = bridge.x0_to_source(X0)
    a = SD3.scale / FLUX.scale
    s_s = sigma * a
    assert torch.allclose(ts, s_s / (1 + s_s))
    assert torch.allclose(xs, _b(1 - ts) * x0_s + _b(ts) * EPS)


def test_model_space_rejects_unknown_conventions():
    with pytest.raises(ValueError, match="unknown noise convention"):
        ModelSpace(SD1, "edm")
    with pytest.raises(ValueError, match="needs its vp_schedule"):
        ModelSpace(SD1, "vp", "eps")


def test_flow_to_flow_is_exact_at_pure_noise():
    bridge = SpaceBridge(ModelSpace(SD3, "flow"), ModelSpace(FLUX, "flow"))
    t = torch.tensor([1.0, 0.5], dtype=torch.float64)
    x = _b(1 - t) * X0 + _b(t) * EPS
    xs, ts = bridge.to_source(x, t)
    assert torch.allclose(ts[0], torch.tensor(1.0, dtype=torch.float64)) and torch.allclose(xs[0], EPS[0])
    x0_s = bridge.x0_to_source(X0)
    assert torch.allclose(xs, _b(1 - ts) * x0_s + _b(ts) * EPS)
    same = SpaceBridge(ModelSpace(SD3, "flow"), ModelSpace(SD3, "flow"))
    assert torch.equal(same.to_source(x, t)[0], x)


def test_pure_flow_noise_has_a_finite_ve_form():
    x_ve, sigma = ModelSpace(SD3, "flow").to_ve(EPS, torch.ones(2, dtype=torch.float64))
    assert torch.isfinite(x_ve).all() and torch.isfinite(sigma).all() and sigma[0] > 9e3


def test_a_ve_source_is_never_read_beyond_its_largest_noise_level():
    bridge = SpaceBridge(ModelSpace(SD1, sigma_max=14.6), ModelSpace(SD3, "flow"))
    bridge_same = SpaceBridge(ModelSpace(SD1, sigma_max=14.6), ModelSpace(SD1))
    t = torch.tensor([1.0, 0.5], dtype=torch.float64)  # pure noise, and a point well inside the schedule
    x_ve, sigma = bridge.target.to_ve(EPS, t)
    xs, ss = bridge.ve_to_source(x_ve, sigma)
    assert torch.allclose(ss[0], torch.tensor(14.6, dtype=torch.float64))
    m = LatentMap.between(SD3, SD1)
    uncapped = m.x0(x_ve[0])
    assert torch.allclose(xs[0], uncapped * 14.6 / (sigma[0] * m.a))  # the same noise direction, capped level
    assert torch.allclose(ss[1], sigma[1] * SD1.scale / SD3.scale)  # inside the range: untouched
    x = X0 + _b(SIGMA) * EPS
    assert torch.equal(bridge_same.ve_to_source(x, SIGMA)[0], x)
