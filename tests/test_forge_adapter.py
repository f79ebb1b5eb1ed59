"""The Forge host adapter end to end in a faithful stand-in of Forge (tests/fake_forge), with devkit tiny models.

The script is the real ``scripts/delta_sampling.py``; Forge's processing loop, sampler, CFG denoiser, patchers and
memory manager are the stand-in's. Checked: λ = 0 is bit-identical to the extension off; target == source with
λ = 1 samples the adapted model (LoRA, fine-tuned checkpoint, adapted prompt; with hires fix, whose hook runs twice
per pass; with CFG 1 and AND prompts); a cross-family pair runs and moves the image; refusals stop the generation
with a clear error and leave nothing behind; any exception while a generation starts takes the one failure path;
names resolve exactly, a near miss is refused with the closest listed names.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lib_delta.errors import DeltaError
from lib_delta.lora import LoraUse, build_patch, read_lora
from tests.fake_forge import backend, harness, webui
from tests.fake_forge.harness import ADAPTED, APPENDED, PROMPT, Forge, Loads, failure, forward_calls

pytestmark = pytest.mark.usefixtures("one_thread")
forge = harness.forge  # the fixtures
no_cycle_collection = harness.no_cycle_collection


def merged(forge: Forge, name: str, lora: str, family: str):
    """The checkpoint with the LoRA merged into its weights: what sampling "the adapted model" means."""
    engine = forge.load(name)
    objects = engine.forge_objects
    encoders = objects.clip.cond_stage_model
    roots = {"unet": objects.unet.model.diffusion_model, "te": encoders["clip_l"]}
    build_patch(roots, family, [[LoraUse(read_lora(Path(webui.lora_dir) / f"{lora}.safetensors"))]]).merge_into(0)
    return engine


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_zero_strength_is_bit_identical_to_off_and_never_runs_the_source(forge, monkeypatch):
    base = forge.checkpoint("base", family="sd1", seed=0)
    lora = forge.lora("style", forge.load(base))
    target = forge.load(base)
    calls = []
    monkeypatch.setattr("lib_delta.hosts.forge.source.ForgeSource.__call__",
                        lambda *a, **k: calls.append(1))
    off = forge.generate(target)
    for group in ({"loras": f"<lora:{lora}:1>", "strength": 0.0}, {"adapted_prompt": ADAPTED, "start": 0.5,
                                                                     "end": 0.5}):
        assert torch.equal(forge.run(target, base, group), off)
    assert calls == []


@pytest.mark.parametrize("kind", ["lora", "prompt", "checkpoint"])
def test_source_equal_to_target_at_unit_strength_samples_the_adapted_model(forge, kind):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    if kind == "lora":
        lora = forge.lora("style", target)
        group = {"loras": f"<lora:{lora}:1>"}
        adapted = lambda **kw: forge.generate(merged(forge, base, lora, "sd1"), **kw)  # noqa: E731
    elif kind == "prompt":
        group, adapted = {"adapted_prompt": ADAPTED}, lambda **kw: forge.generate(target, prompt=APPENDED, **kw)
    else:
        tuned = forge.checkpoint("tuned", family="sd1", seed=1, text_seed=0)
        group, adapted = {"checkpoint": tuned}, lambda **kw: forge.generate(forge.load(tuned), **kw)
    got = forge.run(target, base, group)
    want = adapted()
    assert not close(forge.generate(target), want), "the adaptation must move the image for this to mean anything"
    assert close(got, want)


def test_hires_fix_hook_called_twice_per_pass_applies_the_delta_once(forge, monkeypatch):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    from lib_delta.hosts.forge.source import ForgeSource

    encodes, hooks = [], []
    real_encode, real_arm = ForgeSource.encode, forge.adapter.ForgeRun.arm

    def arm(run, p, x):
        real_arm(run, p, x)
        options = p.sd_model.forge_objects.unet.model_options
        hooks.append((len(options["sampler_post_cfg_function"]), len(options["conditioning_modifiers"])))

    monkeypatch.setattr(ForgeSource, "encode",
                        lambda self, p, *a: (encodes.append(p.is_hr_pass), real_encode(self, p, *a)))
    monkeypatch.setattr(forge.adapter.ForgeRun, "arm", arm)
    hr = {"enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.6}
    got = forge.run(target, base, {"adapted_prompt": ADAPTED}, **hr)
    want = forge.generate(target, prompt=APPENDED, **hr)
    assert encodes == [False, True]
    assert hooks == [(1, 1)] * 3
    assert close(got, want)


def test_cfg_one_and_weighted_and_prompts_keep_the_identity(forge):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    # the adapted text goes into every AND part, before its weight, so the rows stay the target's
    for kw, adapted in (({"cfg_scale": 1.0}, APPENDED),
                        ({"prompt": "a red cube AND a tall tree:0.6"},
                         f"a red cube, {ADAPTED} AND a tall tree, {ADAPTED} :0.6")):
        got = forge.run(target, base, {"adapted_prompt": ADAPTED}, **kw)
        assert close(got, forge.generate(target, **{**kw, "prompt": adapted}))


def test_base_first_guides_the_source_at_its_own_scale_beside_a_cfg_one_target(forge):
    """Forge skips the uncond of a CFG 1 target; base-first's source, guided at 7 by default, still runs its own
    uncond, and over the whole window the image is the source's at CFG 7."""
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    got = forge.run(target, base, {"mode": "base-first"}, cfg_scale=1.0)
    assert close(got, forge.generate(target, cfg_scale=7.0))
    assert close(forge.run(target, base, {"mode": "base-first", "source_cfg": 1.0}, cfg_scale=1.0),
                 forge.generate(target, cfg_scale=1.0))


def test_sd1_source_steers_an_sdxl_target(forge):
    source = forge.checkpoint("sd1", family="sd1", seed=0)
    xl = forge.checkpoint("xl", family="sdxl", seed=5)
    lora = forge.lora("style", forge.load(source))
    target = forge.load(xl)
    off = forge.generate(target)
    got = forge.run(target, source, {"loras": f"<lora:{lora}:1>"})
    assert torch.isfinite(got).all() and (got - off).abs().mean() > 1e-3
    calls = backend.load_calls[-1]
    assert calls["hard_memory_preservation"] > 0
    loaded = [ref() for ref in calls["models"]]
    assert any(m is not None and m.model.diffusion_model is not target.forge_objects.unet.model.diffusion_model
               for m in loaded)


def test_different_vaes_of_equal_channels_convert_with_a_warning(forge):
    sd3 = forge.checkpoint("sd3", family="flow", latent_format="sd3", seed=0)
    flux = forge.checkpoint("flux", family="flow", latent_format="flux", seed=2)
    target = forge.load(flux)
    p = webui.Processing(target, PROMPT)
    p.scripts = webui.ScriptRunner(forge.script, ({"enabled": True, "source": sd3, "adapted_prompt": ADAPTED},))
    got = webui.process_images(p)
    assert torch.isfinite(got).all()
    assert "SD3->Flux" in p.extra_generation_params["Delta latent conversion"]
    assert p.extra_generation_params["Delta source"] == sd3


def test_the_source_and_its_lora_are_credited_in_the_hash_keys(forge):
    base = forge.checkpoint("base", family="sd1", seed=0)
    lora = forge.lora("style", forge.load(base))
    target = forge.load(base)
    p = webui.Processing(target, PROMPT)
    p.scripts = webui.ScriptRunner(forge.script, ({"enabled": True, "source": base, "loras": f"<lora:{lora}:1>"},))
    webui.process_images(p)
    params = p.extra_generation_params
    entry = webui.available_networks[lora]
    assert params["Lora hashes"] == f"{lora}: {entry.shorthash}" and len(entry.shorthash) == 12
    info = webui.checkpoint_aliases[base]
    hashes = [k for k in params if k.startswith("Hashes: ")]
    assert hashes == [f'Hashes: {{"model:{info.model_name}": "{info.shorthash}", "lora:{lora}": "{entry.shorthash}"}}']
    assert params[hashes[0]] == hashes[0]  # written verbatim: readers match it unquoted


def test_a_flux_source_gets_the_distilled_guidance_of_the_pass(forge):
    from lib_delta.hosts.forge import models as forge_models

    flux = forge.checkpoint("flux", family="flow", latent_format="flux", seed=2)
    target = forge.load(flux)
    got = forge.run(target, flux, {"adapted_prompt": ADAPTED}, distilled_cfg_scale=2.5)
    assert torch.isfinite(got).all()
    (entry,) = forge_models.cached()
    assert set(entry.engine.distilled_seen) == {2.5}


@pytest.mark.parametrize("case", ["channels", "source", "lora", "strength"])
def test_refusals_stop_the_generation_and_leave_nothing_behind(forge, case):
    from lib_delta.hosts.forge import models as forge_models

    base = forge.checkpoint("base", family="sd1", seed=0)
    flow = forge.checkpoint("flow", family="flow", latent_format="sd3", seed=0)
    lora = forge.lora("style", forge.load(base))
    target = forge.load(flow if case == "channels" else base)
    fresh = forge.generate(target)
    group = {"source": base, "loras": f"<lora:{lora}:1>"}
    group.update({"channels": {}, "source": {"source": "missing"}, "lora": {"loras": "<lora:missing:1>"},
                  "strength": {"strength": 9.0}}[case])
    with pytest.raises(DeltaError) as err:
        forge.generate(target, {"enabled": True, **group})
    words = {"channels": "latent channels", "source": "not among Forge's checkpoints",
             "lora": "not among Forge's LoRAs", "strength": "must lie between"}[case]
    assert words in str(err.value) and err.value.status_code == 422
    if case in ("source", "lora", "strength"):
        assert forge_models.cached() == [], "names and files are checked before any model loads"
    assert torch.equal(forge.generate(target), fresh)
    assert forge.adapter.SLOT.get() is None


def test_a_refusal_is_an_http_exception_when_fastapi_is_there(forge, monkeypatch):
    """Forge's app answers an HTTPException itself; any other exception also reaches the ASGI server, which then
    drops the client's connection. The refusal stays a DeltaError with its message for the UI."""
    import sys
    import types

    class HTTPException(Exception):  # fastapi.HTTPException's interface
        def __init__(self, status_code: int, detail=None, headers=None):
            self.status_code, self.detail, self.headers = status_code, detail, headers

        def __str__(self) -> str:
            return f"{self.status_code}: {self.detail}"

    monkeypatch.setitem(sys.modules, "fastapi", types.SimpleNamespace(HTTPException=HTTPException))
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    with pytest.raises(DeltaError) as err:
        forge.generate(target, {"enabled": True, "source": "missing", "adapted_prompt": ADAPTED})
    assert isinstance(err.value, HTTPException) and type(err.value).__name__ == "DeltaError"
    assert err.value.status_code == 422 and "not among Forge's checkpoints" in err.value.detail
    assert str(err.value) == err.value.detail
    assert forge.adapter.SLOT.get() is None


def test_cleanup_detaches_the_lora_and_unloads_or_drops_the_source(forge):
    from lib_delta.hosts.forge import models as forge_models

    base = forge.checkpoint("base", family="sd1", seed=0)
    lora = forge.lora("style", forge.load(base))
    target = forge.load(base)
    forge.run(target, base, {"loras": f"<lora:{lora}:1>"})
    assert forge.adapter.SLOT.get() is None
    (entry,) = forge_models.cached()
    modules = [*entry.unet.model.diffusion_model.modules(), *entry.engine.forge_objects.clip.cond_stage_model.modules()]
    assert not any("forward" in m.__dict__ for m in modules)
    assert all(loaded.model not in entry.patchers() for loaded in backend.current_loaded_models)
    assert entry.unet.unloads > 0
    assert "sampler_post_cfg_function" not in target.forge_objects.unet.model_options
    webui.opts.delta_sampling_cache = "free"
    forge.run(target, base, {"loras": f"<lora:{lora}:1>"})
    assert forge_models.cached() == []


def test_preview_strip_is_appended_after_the_images(forge):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    p = webui.Processing(target, PROMPT)
    p.scripts = webui.ScriptRunner(forge.script, ({"enabled": True, "source": base, "adapted_prompt": ADAPTED,
                                                   "preview": True},))
    webui.process_images(p)
    assert len(p.processed.images) == 3 and len(p.processed.infotexts) == 3
    strip = np.asarray(p.processed.images[-1])  # an image with PIL, else the array
    assert strip.ndim == 3 and strip.shape[2] == 3 and strip.shape[1] >= strip.shape[0]


def test_an_unforeseen_error_stops_the_generation_as_a_server_error(forge, monkeypatch):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)

    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr("lib_delta.hosts.forge.source.build", broken)
    with pytest.raises(DeltaError, match="boom") as err:
        forge.run(target, base, {"adapted_prompt": ADAPTED})
    assert err.value.status_code == 500


def test_any_exception_inside_start_is_a_server_error_that_stops_the_generation(forge, monkeypatch,
                                                                                no_cycle_collection):
    """The one failure path: a non-DeltaError raised inside start(), after the source loaded, is a 500 that names it;
    the target never samples (no plain image), and what the failed start loaded is released at once."""
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    fresh = forge.generate(target)

    def overflow(*args, **kwargs):
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr("lib_delta.hosts.forge.source._check_source", overflow)
    loads = Loads(monkeypatch)
    calls = forward_calls(monkeypatch, target)
    status, message, _ = failure(lambda: forge.run(target, base, {"adapted_prompt": ADAPTED}))
    assert status == 500 and "OverflowError: int too large to convert to float" in message
    assert calls == [], "the generation ran without the delta"
    assert len(loads.engines) == 1 and loads.alive() == 0
    assert torch.equal(forge.generate(target), fresh)


@pytest.mark.parametrize("value", [10**400, -(10**30), float("nan")])
def test_an_absurd_number_in_the_request_is_refused_before_anything_runs(forge, monkeypatch, value):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    calls = forward_calls(monkeypatch, target)
    status, message, _ = failure(lambda: forge.run(target, base, {"adapted_prompt": ADAPTED, "strength": value}))
    assert status in (422, 500) and message
    assert calls == []


@pytest.mark.parametrize("name", ["base", "base.safetensors"])
def test_the_source_resolves_by_its_listed_names(forge, name):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    assert close(forge.run(target, name, {"adapted_prompt": ADAPTED}), forge.generate(target, prompt=APPENDED))


@pytest.mark.parametrize(("what", "name"), [("source", "Base"), ("source", "bas"), ("lora", "Style"),
                                            ("lora", "styl")])
def test_a_near_miss_is_refused_with_the_closest_listed_names(forge, what, name):
    from lib_delta.hosts.forge import models as forge_models

    base = forge.checkpoint("base", family="sd1", seed=0)
    forge.checkpoint("other", family="sd1", seed=1)
    target = forge.load(base)
    forge.lora("style", target)
    delta = {"source": name, "adapted_prompt": ADAPTED} if what == "source" else \
        {"source": base, "loras": f"<lora:{name}:1>"}
    status, message, _ = failure(lambda: forge.generate(target, {"enabled": True, **delta}))
    listed = "base.safetensors" if what == "source" else "style"
    assert status == 422 and f"'{name}'" in message and f"Closest: '{listed}'" in message
    assert forge_models.cached() == []


def test_a_native_sdxl_source_is_conditioned_on_the_size_it_runs_at(forge, monkeypatch):
    """SDXL's size conditioning says the size the source runs at: its own area behind a larger image."""
    from lib_delta import resolution

    monkeypatch.setitem(resolution.NATIVE_SIDE, "SDXL", 64)
    xl = forge.checkpoint("xl", family="sdxl", seed=5)
    target = forge.load(xl)
    seen, real = [], backend.Engine.get_learned_conditioning
    monkeypatch.setattr(backend.Engine, "get_learned_conditioning",
                        lambda self, prompts: (seen.append((self is target, prompts.width, prompts.height)),
                                               real(self, prompts))[1])
    big = {"width": 128, "height": 96}
    forge.run(target, xl, {"adapted_prompt": ADAPTED}, **big)
    assert {s for s in seen if not s[0]} == {(False, 128, 96)}
    seen.clear()
    native = forge.run(target, xl, {"adapted_prompt": ADAPTED, "source_resolution": "native"}, **big)
    assert {s for s in seen if not s[0]} == {(False, 64, 64)}, "where it runs: 64² in area on the latent grid"
    assert {s for s in seen if s[0]} == {(True, 128, 96)}, "the target's own stays the image's"
    assert torch.isfinite(native).all()


def test_a_native_source_runs_at_its_own_size_and_changes_the_image(forge, monkeypatch):
    """The tiny SD1 source's training size taken as 64 px: a 128 px SDXL request runs it at 64 px (8×8 latent
    cells) and upsamples its delta; at 64 px "native" is today's computation bit for bit."""
    from lib_delta import resolution
    from lib_delta.hosts.forge.source import ForgeSource

    monkeypatch.setitem(resolution.NATIVE_SIDE, "SD1", 64)
    source = forge.checkpoint("sd1", family="sd1", seed=0)
    xl = forge.checkpoint("xl", family="sdxl", seed=5)
    lora = forge.lora("style", forge.load(source))
    target = forge.load(xl)
    seen, real = [], ForgeSource.__call__
    monkeypatch.setattr(ForgeSource, "__call__", lambda self, x, *a: (seen.append(tuple(x.shape[-2:])),
                                                                       real(self, x, *a))[1])
    group = {"loras": f"<lora:{lora}:1>"}
    big = {"width": 128, "height": 128}
    off = forge.generate(target, **big)
    at_target = forge.run(target, source, group, **big)
    assert set(seen) == {(16, 16)}
    seen.clear()
    p = forge.processing(target, {"enabled": True, "source": source, **group, "source_resolution": "native"},
                         **big)
    native = webui.process_images(p)
    assert set(seen) == {(8, 8)}
    assert torch.isfinite(native).all() and (native - off).abs().mean() > 1e-3
    assert not close(native, at_target)
    assert p.extra_generation_params["Delta source resolution"] == "native"
    assert torch.equal(forge.run(target, source, {**group, "source_resolution": "native"}),
                       forge.run(target, source, group))
