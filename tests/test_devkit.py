"""The devkit's models have the real layouts, respond to their inputs, and its wrappers/samplers get the math right."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from devkit import sampling
from devkit.denoisers import EpsDenoiser, FlowDenoiser, TimestepsDenoiser, VDenoiser, scaled_linear_alphas_cumprod
from devkit.families import FAMILIES, fill_zero_tensors, tiny_sd1, tiny_sdxl
from devkit.ldm_unet import build_unet
from devkit.text_encoders import CLIPTextModel, OpenCLIPTextModel, TextConfig, WordHashTokenizer

# Real checkpoint keys (without "model.diffusion_model.") and shapes.
REAL_KEYS = {
    "sd1": {
        "time_embed.0.weight": (1280, 320),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
        "input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": (10240, 1280),
        "output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.11.1.proj_out.weight": (320, 320, 1, 1),
        "out.2.weight": (4, 320, 3, 3),
    },
    "sd2": {
        "input_blocks.1.1.proj_in.weight": (320, 320),
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
        "output_blocks.8.2.conv.weight": (640, 640, 3, 3),
    },
    "sdxl": {
        "label_emb.0.0.weight": (1280, 2816),
        "label_emb.0.2.weight": (1280, 1280),
        "input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight": (640, 640),
        "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        "middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
        "output_blocks.5.2.conv.weight": (640, 640, 3, 3),
    },
}
REAL_COUNTS = {"sd1": (686, 859_520_964), "sd2": (686, 865_910_724), "sdxl": (1680, 2_567_463_684)}


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_full_unet_matches_real_checkpoint_layout(family):
    sd = build_unet(family, "full", device="meta").state_dict()
    for key, shape in REAL_KEYS[family].items():
        assert tuple(sd[key].shape) == shape, key
    n_keys, n_params = REAL_COUNTS[family]
    assert (len(sd), sum(t.numel() for t in sd.values())) == (n_keys, n_params)
    if family == "sdxl":  # level 0 of SDXL has no attention
        assert not any(k.startswith("input_blocks.1.1.") for k in sd)


def test_tiny_unets_keep_the_key_pattern():
    keys = {f: set(build_unet(f, "tiny").state_dict()) for f in ("sd1", "sd2", "sdxl")}
    for f in ("sd1", "sd2"):
        assert {
            "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
            "output_blocks.2.2.conv.weight",
            "middle_block.1.proj_out.weight",
            "input_blocks.2.0.out_layers.3.weight",
        } <= keys[f]
    assert {
        "label_emb.0.0.weight",
        "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj.weight",
        "output_blocks.2.2.conv.weight",
    } <= keys["sdxl"]
    assert not any(k.startswith("input_blocks.1.1.") for k in keys["sdxl"])


def test_text_encoder_names():
    hf = CLIPTextModel(TextConfig()).state_dict()
    for key in (
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.1.self_attn.q_proj.weight",
        "text_model.encoder.layers.0.mlp.fc2.bias",
        "text_model.encoder.layers.0.layer_norm2.weight",
        "text_model.final_layer_norm.weight",
    ):
        assert key in hf
    oc = OpenCLIPTextModel(TextConfig(projection_dim=32)).state_dict()
    for key in (
        "token_embedding.weight",
        "positional_embedding",
        "transformer.resblocks.1.attn.in_proj_weight",
        "transformer.resblocks.0.attn.out_proj.weight",
        "transformer.resblocks.0.mlp.c_fc.weight",
        "transformer.resblocks.0.ln_2.bias",
        "ln_final.weight",
        "text_projection",
    ):
        assert key in oc
    ids = WordHashTokenizer()(["a cat", "a cat"])
    assert ids.shape == (2, 77) and torch.equal(ids[0], ids[1]) and ids[0, 3] == 999


@pytest.mark.parametrize("name", list(FAMILIES))
def test_families_respond_to_prompt_and_seed(name):
    fam = FAMILIES[name](0)
    for m in fam.modules():
        assert all(p.any() for p in m.parameters()), "a zero-initialised tensor was left unfilled"
    x = torch.randn(1, fam.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0)).expand(2, -1, -1, -1)
    sigma = torch.full((2,), 0.6 if fam.is_flow else 2.0)
    out = fam.denoiser(x, sigma, fam.encode(["a red cat", "a castle at night"]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert (out[0] - out[1]).abs().mean() > 1e-2 * out.abs().mean()

    again, other = FAMILIES[name](0), FAMILIES[name](1)
    assert all(torch.equal(a, b) for a, b in zip(fam.model.parameters(), again.model.parameters(), strict=True))
    assert not all(torch.equal(a, c) for a, c in zip(fam.model.parameters(), other.model.parameters(), strict=True))


def test_fill_zero_tensors_fills_only_zeros():
    m = nn.Linear(4, 3)
    nn.init.zeros_(m.weight)
    bias = m.bias.clone()
    assert fill_zero_tensors(m, torch.Generator().manual_seed(0)) == 1
    assert m.weight.any() and torch.equal(m.bias, bias)


def test_sdxl_cond_layout():
    fam = tiny_sdxl(0)
    cond = fam.encode(["a", "b"], height=512, width=768)
    assert cond["crossattn"].shape == (2, 77, 64) and cond["vector"].shape == (2, 32 + 1536)
    assert not torch.equal(cond["vector"], fam.encode(["a", "b"])["vector"])


# --- parameterisation math -------------------------------------------------------------------------------------

X0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
NOISE = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
SCHEDULE = EpsDenoiser(nn.Identity())


class Oracle(nn.Module):
    """Knows x0 and derives the exact prediction from what it is given (the input and timestep), so the test
    checks the wrappers' input scaling and σ ↔ t maps as well as the output formula."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def forward(self, x, t, context=None, y=None):
        t = t.reshape(-1, 1, 1, 1)
        if self.kind == "flow":
            sigma = t / 1000
            return (x - X0) / sigma  # v = noise − x0, since x = x0 + σ(noise − x0)
        sigma = SCHEDULE.t_to_sigma(t)
        alpha, s = 1 / (1 + sigma**2) ** 0.5, sigma / (1 + sigma**2) ** 0.5
        eps = (x - alpha * X0) / s  # x is the VP latent α·x0 + s·ε
        return eps if self.kind == "eps" else alpha * eps - s * X0


@pytest.mark.parametrize("wrapper", [EpsDenoiser, VDenoiser])
def test_ve_wrappers_return_x0(wrapper):
    d = wrapper(Oracle("eps" if wrapper is EpsDenoiser else "v"))
    sigma = torch.tensor([0.1, 7.3])  # off-grid, per-row sigmas
    torch.testing.assert_close(d(X0 + sigma[:, None, None, None] * NOISE, sigma, None), X0, atol=1e-4, rtol=1e-4)


def test_flow_wrapper_returns_x0():
    d = FlowDenoiser(Oracle("flow"), shift=3.0)
    sigma = torch.tensor([0.05, 0.9])
    s = sigma[:, None, None, None]
    torch.testing.assert_close(d((1 - s) * X0 + s * NOISE, sigma, None), X0, atol=1e-4, rtol=1e-4)
    assert d.get_sigmas(4)[0] == 1 and d.get_sigmas(4)[-1] == 0 and d.get_sigmas(4)[2] > 0.5  # shifted up


def test_schedule():
    ac = scaled_linear_alphas_cumprod()
    d = EpsDenoiser(nn.Identity())
    assert abs(d.sigma_min.item() - 0.0292) < 1e-3 and abs(d.sigma_max.item() - 14.6146) < 1e-3
    torch.testing.assert_close(d.sigmas, ((1 - ac) / ac) ** 0.5)
    t = torch.tensor([0.0, 10.5, 998.25])
    torch.testing.assert_close(d.sigma_to_t(d.t_to_sigma(t)), t, atol=1e-3, rtol=0)
    sig = d.get_sigmas(5)
    assert len(sig) == 6 and sig[-1] == 0 and torch.allclose(sig[0], d.sigma_max)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_timestep_wrapper_returns_eps(kind):
    d = TimestepsDenoiser(Oracle(kind), kind)
    t = torch.tensor([3.0, 700.0])
    a = d.alphas_cumprod[t.long()].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(d(a.sqrt() * X0 + (1 - a).sqrt() * NOISE, t, None), NOISE, atol=1e-3, rtol=1e-3)


# --- samplers ----------------------------------------------------------------------------------------------------


def x0_oracle(x, sigma):
    return X0.expand_as(x)


@pytest.mark.parametrize(
    "sampler", [sampling.sample_euler, sampling.sample_heun, sampling.sample_dpmpp_2m, sampling.sample_euler_ancestral]
)
def test_samplers_reach_x0_of_a_perfect_denoiser(sampler):
    sigmas = sampling.get_sigmas_karras(5, 0.03, 14.6)
    steps = []
    out = sampler(x0_oracle, X0 + 14.6 * NOISE, sigmas, callback=steps.append)
    torch.testing.assert_close(out, X0, atol=1e-4, rtol=1e-4)
    assert [s["i"] for s in steps] == list(range(5)) and torch.equal(steps[0]["denoised"], X0)


def test_flow_euler_follows_the_velocity():
    sigmas = sampling.get_sigmas_flow(4, shift=3.0)
    out = sampling.sample_euler(x0_oracle, NOISE, sigmas)  # σ = 1: pure noise
    torch.testing.assert_close(out, X0, atol=1e-5, rtol=1e-5)


def test_ancestral_is_seeded():
    fam = tiny_sd1(0)
    cond = fam.encode(["a cat"])
    sigmas = fam.denoiser.get_sigmas(3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * sigmas[0]

    def run(seed):
        return sampling.sample_euler_ancestral(
            fam.denoiser, x, sigmas, {"cond": cond}, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))
    assert torch.equal(
        sampling.sample_dpmpp_2m(fam.denoiser, x, sigmas, {"cond": cond}),
        sampling.sample_dpmpp_2m(fam.denoiser, x, sigmas, {"cond": cond}),
    )


def test_ddim_matches_closed_form():
    ts = sampling.get_timesteps_ddim(5)
    assert ts.tolist() == [1, 201, 401, 601, 801]
    ac = scaled_linear_alphas_cumprod()
    eps_model = TimestepsDenoiser(Oracle("eps"))
    a = ac[801]
    calls = []
    out = sampling.sample_ddim(
        eps_model, a.sqrt() * X0 + (1 - a).sqrt() * NOISE, ts, ac, {"cond": None}, callback=calls.append
    )
    # A1111 stops at ᾱ of the first timestep after len(timesteps) − 1 calls.
    torch.testing.assert_close(out, ac[1].sqrt() * X0 + (1 - ac[1]).sqrt() * NOISE, atol=1e-4, rtol=1e-4)
    assert len(calls) == 4


def test_the_full_size_controlnet_has_cldms_hint_convs():
    """The benchmark's real-size ControlNet: cldm.ControlNet's hint convs (3 → 16, 16, 32, 32, 96, 96, 256 → 320)
    and one zero conv per SD1.5 input block plus the middle block's."""
    import torch

    from devkit.controlnet import build_controlnet

    with torch.device("meta"):
        net = build_controlnet("sd1", "full")
    sd = net.state_dict()
    hint = [tuple(sd[f"input_hint_block.{i}.weight"].shape[:2]) for i in range(0, 16, 2)]
    assert hint == [(16, 3), (16, 16), (32, 16), (32, 32), (96, 32), (96, 96), (256, 96), (320, 256)]
    assert len(net.zero_convs) == 12 and sd["middle_block_out.0.weight"].shape == (1280, 1280, 1, 1)
