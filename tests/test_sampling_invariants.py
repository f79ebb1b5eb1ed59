"""The design's invariants through whole sampling loops: tiny eps, v and flow models, several samplers.

- λ = 0 or an empty window is bit-identical to sampling without the extension, and the source is never called;
- target == source base with λ = 1 in cfg mode equals sampling the adapted model itself;
- a cross-family pair (SD1-format source, SDXL-format target) runs and moves the result.
"""

from __future__ import annotations

import pytest
import torch

from devkit import sampling
from devkit.families import tiny_flow, tiny_sd1, tiny_sd2v, tiny_sdxl
from lib_delta.args import AdaptationGroup, DeltaSettings
from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SD1, SD3, SDXL, ModelSpace, SpaceBridge, VPSchedule

PROMPTS = ["a red cube", "a tall tree"]
NEG = ["", ""]
SCALE = 5.0
LAYOUT = CfgLayout.simple(2, SCALE)


def _cat(a, b):
    if isinstance(a, dict):
        return {k: torch.cat([a[k], b[k]]) for k in a}
    return torch.cat([a, b])


def _rows(c, rows):
    if isinstance(c, dict):
        return {k: v[rows] for k, v in c.items()}
    return c[rows]


class FamilySource:
    """The source as a host would run it: variant 0 the base, variant k the adapted model of group k-1."""

    def __init__(self, models, conds):
        self.models, self.conds, self.calls = models, conds, 0

    def __call__(self, x, level, rows, variants):
        self.calls += 1
        return torch.stack([self.models[v](x, level, _rows(self.conds[v], list(rows))) for v in variants])


def cfg_denoiser(denoiser, cond_rows, guidance=None):
    """A CFG denoiser like the WebUI's: rows [cond | uncond], the delta hook on rows, then the combine."""

    def model(x, sigma):
        x_in = torch.cat([x, x])
        s_in = sigma.reshape(-1).expand(x.shape[0]).repeat(2) if sigma.ndim < 1 or sigma.numel() == 1 else \
            torch.cat([sigma, sigma])
        out = denoiser(x_in, s_in, cond_rows)
        if guidance is not None:
            guidance.apply(x_in, s_in, out, LAYOUT)
        return cfg_combine(out, LAYOUT)

    return model


def settings(strength=1.0, **group):
    return DeltaSettings(enabled=True, source="base", groups=(AdaptationGroup(prompt="x", strength=strength, **group),))


FAMILIES = {
    "eps": (lambda s, t=None: tiny_sd1(s, text_seed=t), ModelSpace(SD1)),
    "v": (lambda s, t=None: tiny_sd2v(s, text_seed=t), ModelSpace(SD1)),
    "flow": (lambda s, t=None: tiny_flow(s, text_seed=t), ModelSpace(SD3, "flow")),
}


def _sigmas(fam, n=4):
    if fam.is_flow:
        return sampling.get_sigmas_flow(n)
    return fam.denoiser.get_sigmas(n)


SAMPLERS = {
    "euler": lambda m, x, s: sampling.sample_euler(m, x, s),
    "euler_a": lambda m, x, s: sampling.sample_euler_ancestral(m, x, s, generator=torch.Generator().manual_seed(7)),
    "dpmpp_2m": lambda m, x, s: sampling.sample_dpmpp_2m(m, x, s),
    "heun": lambda m, x, s: sampling.sample_heun(m, x, s),
}


def _setup(kind):
    make, space = FAMILIES[kind]
    base = make(0)
    adapted = make(1, 0)  # a "fine-tuned" model: other UNet weights, the same text encoder
    target = base
    cond = _cat(target.encode(PROMPTS), target.encode(NEG))
    return base, adapted, target, space, cond


def _noise(fam, sigmas):
    x = torch.randn(2, fam.latent_channels, 8, 8, generator=torch.Generator().manual_seed(3))
    return x if fam.is_flow else x * sigmas[0]


def _guidance(s, base, adapted, space, cond, sigmas, target_space=None):
    source = FamilySource([base.denoiser, adapted.denoiser], [cond, cond])
    g = DeltaGuidance(s, SpaceBridge(space, target_space or space), source, ProgressClock(sigmas.tolist()))
    return g, source


# ancestral and DPM++ 2M samplers are VE-only, as in k-diffusion
PAIRS = [(k, s) for k in FAMILIES for s in SAMPLERS if not (k == "flow" and s in ("euler_a", "dpmpp_2m"))]


@pytest.mark.parametrize(("kind", "sampler"), PAIRS)
def test_source_equal_to_target_with_unit_strength_samples_the_adapted_model(kind, sampler):
    base, adapted, target, space, cond = _setup(kind)
    sigmas = _sigmas(target)
    x = _noise(target, sigmas)
    g, source = _guidance(settings(), base, adapted, space, cond, sigmas)
    got = SAMPLERS[sampler](cfg_denoiser(target.denoiser, cond, g), x.clone(), sigmas)
    want = SAMPLERS[sampler](cfg_denoiser(adapted.denoiser, cond), x.clone(), sigmas)
    assert source.calls > 0
    assert not torch.allclose(want, SAMPLERS[sampler](cfg_denoiser(target.denoiser, cond), x.clone(), sigmas),
                              rtol=1e-3), "the adaptation must move the result for this check to mean anything"
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("kind", list(FAMILIES))
@pytest.mark.parametrize(("strength", "window"), [(0.0, (0.0, 1.0)), (1.0, (0.5, 0.5))])
def test_zero_strength_or_empty_window_is_bit_identical_and_never_calls_the_source(kind, strength, window):
    base, adapted, target, space, cond = _setup(kind)
    sigmas = _sigmas(target)
    x = _noise(target, sigmas)
    g, source = _guidance(settings(strength, start=window[0], end=window[1]), base, adapted, space, cond, sigmas)
    got = sampling.sample_heun(cfg_denoiser(target.denoiser, cond, g), x.clone(), sigmas)
    off = sampling.sample_heun(cfg_denoiser(target.denoiser, cond), x.clone(), sigmas)
    assert source.calls == 0
    assert torch.equal(got, off)


def test_window_limits_the_source_to_its_steps():
    base, adapted, target, space, cond = _setup("eps")
    sigmas = _sigmas(target, 8)
    g, source = _guidance(settings(end=0.5), base, adapted, space, cond, sigmas)
    sampling.sample_euler(cfg_denoiser(target.denoiser, cond, g), _noise(target, sigmas), sigmas)
    assert source.calls == 4  # progress 0, 1/8, 2/8, 3/8 of 8 steps


def test_ddim_eps_path_samples_the_adapted_model():
    """A1111's timestep samplers hand the hook ε and a timestep; the same identity holds there."""
    base, adapted, target, _, cond = _setup("eps")
    ac = target.denoiser.alphas_cumprod
    timesteps = sampling.get_timesteps_ddim(4)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    t_den, a_den = target.timestep_denoiser(), adapted.timestep_denoiser()
    levels = timesteps.flip(0).tolist()
    space = ModelSpace(SD1, "vp", "eps", VPSchedule(ac))
    source = FamilySource([base.denoiser, adapted.denoiser], [cond, cond])
    g = DeltaGuidance(settings(), SpaceBridge(ModelSpace(SD1), space), source, ProgressClock(levels, log_space=False))
    got = sampling.sample_ddim(cfg_denoiser(t_den, cond, g), x.clone(), timesteps, ac)
    want = sampling.sample_ddim(cfg_denoiser(a_den, cond), x.clone(), timesteps, ac)
    assert source.calls == len(timesteps) - 1
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_cross_family_source_moves_an_sdxl_format_target():
    """An SD1-format source steering an SDXL-format target: runs, is finite, and moves the image."""
    sd1, sd1_adapted = tiny_sd1(0), tiny_sd1(1, text_seed=0)
    xl = tiny_sdxl(5)
    src_cond = _cat(sd1.encode(PROMPTS), sd1.encode(NEG))
    xl_cond = _cat(xl.encode(PROMPTS), xl.encode(NEG))
    sigmas = _sigmas(xl)
    x = _noise(xl, sigmas)
    g, source = _guidance(settings(), sd1, sd1_adapted, ModelSpace(SD1), src_cond, sigmas, ModelSpace(SDXL))
    got = sampling.sample_euler(cfg_denoiser(xl.denoiser, xl_cond, g), x.clone(), sigmas)
    off = sampling.sample_euler(cfg_denoiser(xl.denoiser, xl_cond), x.clone(), sigmas)
    assert source.calls == 4 and torch.isfinite(got).all()
    assert (got - off).abs().mean() > 1e-3


def test_cond_mode_and_separate_trajectory_run_the_whole_loop():
    base, adapted, target, space, cond = _setup("eps")
    sigmas = _sigmas(target)
    x = _noise(target, sigmas)
    off = sampling.sample_euler(cfg_denoiser(target.denoiser, cond), x.clone(), sigmas)
    for s in (DeltaSettings(**{**settings().__dict__, "cfg_mode": "cond"}),
              DeltaSettings(**{**settings().__dict__, "trajectory": "separate"})):
        g, source = _guidance(s, base, adapted, space, cond, sigmas)
        den = cfg_denoiser(target.denoiser, cond, g)

        def model(xx, sigma, den=den, g=g):
            out = den(xx, sigma)
            g.after_combine(xx, sigma.reshape(-1).expand(xx.shape[0]), out)
            return out

        got = sampling.sample_euler(model, x.clone(), sigmas)
        assert source.calls == 4 and torch.isfinite(got).all() and not torch.equal(got, off)
