"""Fault injection in the Forge stand-in: what a generation leaves behind, however it ends.

Faults come as Forge meets them: an out-of-memory error in a forward at step k, an interrupt at step k (the denoiser
raises at its next call, the sampler returns its last latent and processing goes on to ``postprocess``), another
script's exception (swallowed by Forge's script runner, escaping it, or raised by its own post-CFG function inside
sampling), a damaged checkpoint or LoRA, a request over a limit. After each: a clear error where one is due
(``status_code`` and a message that names the reason), nothing the run built still alive by weak reference with the
cycle collector off, nothing of it on the target or in Forge's loaded-model list, and the next plain generation
bit-identical to one from before.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fake_forge import backend, harness, webui
from tests.fake_forge.harness import ADAPTED, Loads, RunSpy, assert_clean, failure, forward_calls, lora_tensors

pytestmark = pytest.mark.usefixtures("one_thread", "no_cycle_collection")
forge = harness.forge  # the fixtures
no_cycle_collection = harness.no_cycle_collection

OOM = "CUDA out of memory. Tried to allocate 2.00 GiB"
OOMS = {"OutOfMemoryError": lambda: torch.cuda.OutOfMemoryError(OOM), "RuntimeError": lambda: RuntimeError(OOM)}


@dataclass
class Scene:
    base: str
    lora: str
    target: object
    fresh: torch.Tensor
    spy: RunSpy
    loads: Loads

    @property
    def delta(self) -> dict:
        return {"enabled": True, "source": self.base, "loras": f"<lora:{self.lora}:1>", "adapted_prompt": ADAPTED}


@pytest.fixture
def scene(forge, monkeypatch) -> Scene:
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    lora = forge.lora("style", target)
    fresh = forge.generate(target)
    return Scene(base, lora, target, fresh, RunSpy(monkeypatch, forge.adapter), Loads(monkeypatch))


def assert_left_nothing(forge, scene: Scene) -> None:
    assert scene.spy.alive() == []
    assert_clean(scene.target)
    assert torch.equal(forge.generate(scene.target), scene.fresh)
    assert scene.spy.alive() == []


def _source_raises_at(monkeypatch, target, at: int, error) -> None:
    """The source's forward (any UNet but the target's) raises ``error()`` at its ``at``-th call."""
    real = backend.KModel.apply_model
    calls: list[int] = []

    def apply_model(model, *args, **kwargs):
        if model is not target.forge_objects.unet.model:
            calls.append(1)
            if len(calls) == at:
                raise error()
        return real(model, *args, **kwargs)

    monkeypatch.setattr(backend.KModel, "apply_model", apply_model)


# --- (a) out of memory in a forward at step k --------------------------------------------------------------------


@pytest.mark.parametrize("kind", OOMS)
@pytest.mark.parametrize("where", ["target", "source"])
def test_out_of_memory_at_step_k_stops_with_a_server_error(forge, scene, monkeypatch, kind, where):
    def oom():
        raise OOMS[kind]()

    if where == "target":
        forward_calls(monkeypatch, scene.target, at=3, do=oom)
    else:
        _source_raises_at(monkeypatch, scene.target, 3, OOMS[kind])
    try:
        forge.generate(scene.target, scene.delta, enable_hr=True)
    except Exception as e:  # what the API answers with, read here so that nothing keeps the exception
        status, message, name, detail = getattr(e, "status_code", None), str(e), type(e).__name__, e.detail
    else:
        pytest.fail("the generation did not fail")
    assert status == 500 and "out of memory" in message and name == kind
    assert detail.startswith(message) and "set CFG mode to cond" in detail  # and the ways to make room
    assert scene.spy.alive() == [], "the run outlived its failed sampling"
    assert_left_nothing(forge, scene)


def test_out_of_memory_in_the_decode_finds_the_run_closed_already(forge, scene, monkeypatch):
    """The decode comes after ``post_sample``, where the run closes: when it fails (Forge then skips
    ``postprocess``) the source has left Forge's loaded models and the target already, not at the next generation."""
    def decode(model, batch, target_device=None, check_for_nans=False):
        raise torch.cuda.OutOfMemoryError(OOM)

    with monkeypatch.context() as mp:
        mp.setattr(webui, "decode_latent_batch", decode)
        try:  # not pytest.raises: its kept traceback would hold the frames, and so the run, with the collector off
            forge.generate(scene.target, scene.delta)
            pytest.fail("the decode's error did not reach the caller")
        except torch.cuda.OutOfMemoryError:
            pass
    run = forge.adapter.SLOT.get()
    assert run is not None and run.closed, "the run holds its source until the next generation"
    del run
    assert_clean(scene.target)
    assert set(scene.spy.alive()) <= {"run", "source"}  # the closed run's record, dropped by the next process()
    assert torch.equal(forge.generate(scene.target), scene.fresh)
    assert_left_nothing(forge, scene)


# --- (b) an interrupt at step k ----------------------------------------------------------------------------------


def test_an_interrupt_at_step_k_returns_what_was_sampled_and_leaves_nothing(forge, scene, monkeypatch):
    calls = forward_calls(monkeypatch, scene.target, at=2, do=lambda: setattr(webui.state, "interrupted", True))
    images = forge.generate(scene.target, scene.delta, enable_hr=True)
    assert len(calls) == 2, "the sampler stops at the step after the interrupt; the hires pass is skipped"
    assert torch.isfinite(images).all() and not torch.equal(images, scene.fresh)
    assert_left_nothing(forge, scene)


# --- (c) another script --------------------------------------------------------------------------------------------


class Escape(BaseException):
    """Something Forge's script runner does not catch (it catches ``Exception``)."""


class FailingProcess:
    """Another extension whose ``process`` raises; it runs after ours."""

    def __init__(self, error: BaseException):
        self.error = error

    def process(self, p, *args):
        raise self.error


class FailingGuidance:
    """Another extension in the style of Forge's Perturbed Attention Guidance: it clones the UNet after ours and sets
    a post-CFG function of its own, which raises at its ``at``-th call."""

    def __init__(self, at: int):
        self.at, self.calls, self.clones = at, 0, []

    def process_before_every_sampling(self, p, *args, **kwargs):
        unet = p.sd_model.forge_objects.unet.clone()

        def post_cfg(args):
            self.calls += 1
            if self.calls == self.at:
                raise RuntimeError("another extension's guidance failed")
            return args["denoised"]

        unet.set_model_sampler_post_cfg_function(post_cfg)
        p.sd_model.forge_objects.unet = unet
        self.clones.append(weakref.ref(unet))


def test_an_exception_in_another_scripts_process_is_logged_by_forge_and_the_delta_still_applies(forge, scene):
    want = forge.generate(scene.target, scene.delta)
    got = forge.generate(scene.target, scene.delta, others=[(FailingProcess(RuntimeError("another extension")), ())])
    assert torch.equal(got, want) and not torch.equal(got, scene.fresh)
    assert_left_nothing(forge, scene)


def test_an_exception_escaping_another_scripts_process_is_closed_by_the_next_generation(forge, scene):
    """Forge runs nothing of ours after such an exception (no sampling, no postprocess): the run waits in the slot,
    holding no clone and no hook on the target, and the next generation's process() closes it."""
    with pytest.raises(Escape):
        forge.generate(scene.target, scene.delta, others=[(FailingProcess(Escape("stop")), ())])
    assert "run" in scene.spy.alive() and "cloned UNet patcher" not in scene.spy.alive()
    assert "sampler_post_cfg_function" not in scene.target.forge_objects.unet.model_options
    assert torch.equal(forge.generate(scene.target), scene.fresh)
    assert_left_nothing(forge, scene)


def test_another_extensions_post_cfg_function_failing_at_step_k_closes_the_run(forge, scene):
    other = FailingGuidance(at=3)
    status, message, _ = failure(lambda: forge.generate(scene.target, scene.delta, others=[(other, ())]))
    assert status == 500 and "another extension's guidance failed" in message
    assert scene.spy.alive() == [] and [ref() for ref in other.clones] == [None]
    assert_left_nothing(forge, scene)


# --- (d) damaged files ---------------------------------------------------------------------------------------------


def _truncate(path: Path, by: int = 16) -> Path:
    path.write_bytes(path.read_bytes()[:-by])
    return path


def _untouched(path: Path) -> bool:
    """Still there, and not renamed to ``.corrupted`` by Forge's loader wrapper."""
    return path.exists() and not Path(f"{path}.corrupted").exists()


def test_a_damaged_source_checkpoint_is_refused_before_forge_reads_it(forge, scene, tmp_path):
    path = tmp_path / "broken.safetensors"
    backend.write_checkpoint(path, {"family": "sd1", "seed": 4})
    webui.add_checkpoint(str(_truncate(path)))
    status, message, _ = failure(lambda: forge.generate(scene.target, {**scene.delta, "source": "broken"}))
    assert status == 422 and "broken.safetensors" in message and "damaged" in message
    assert _untouched(path) and scene.loads.engines == []
    assert_left_nothing(forge, scene)


def test_a_checkpoint_forge_cannot_build_fails_the_start_and_releases_what_it_loaded(forge, scene, tmp_path):
    """A sound safetensors file of no model type Forge knows, found out when its loader reads it: by then the source
    has loaded, and the failed start releases it."""
    from lib_delta.hosts.forge import models as forge_models

    save_file({"unknown.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    webui.add_checkpoint(str(tmp_path / "odd.safetensors"))
    status, message, _ = failure(lambda: forge.generate(scene.target, {**scene.delta, "checkpoint": "odd"}))
    assert status == 422 and "odd.safetensors" in message
    assert len(scene.loads.engines) == 1 and scene.loads.alive() == 0 and forge_models.cached() == []
    assert_left_nothing(forge, scene)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_damaged_lora_is_refused_and_left_where_it_is(forge, scene, suffix):
    path = Path(webui.lora_dir) / f"broken{suffix}"
    tensors = lora_tensors(scene.target)
    save_file(tensors, str(path)) if suffix == ".safetensors" else torch.save(tensors, path)
    _truncate(path, by=200)
    webui.list_available_networks()
    status, message, _ = failure(lambda: forge.generate(scene.target, {**scene.delta, "loras": "<lora:broken:1>"}))
    assert status == 422 and f"broken{suffix}" in message
    assert _untouched(path) and scene.loads.engines == []
    assert_left_nothing(forge, scene)


# --- (e) over a limit ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "words"), [("checkpoints", "different checkpoints"), ("loras", "LoRAs")])
@pytest.mark.parametrize("configured", [True, False])
def test_a_request_over_a_limit_is_refused_before_anything_loads(forge, scene, monkeypatch, limit, words, configured):
    if limit == "checkpoints":
        names = [forge.checkpoint(f"tuned{i}", family="sd1", seed=10 + i) for i in range(2 if configured else 3)]
        delta = {"enabled": True, "source": scene.base, "groups": [{"checkpoint": n} for n in names]}
    else:
        delta = {**scene.delta, "loras": f"<lora:{scene.lora}:0.1>" * (2 if configured else 17)}
    if configured:
        monkeypatch.setattr(webui.opts, f"delta_sampling_max_{limit}", 1, raising=False)
    status, message, _ = failure(lambda: forge.generate(scene.target, delta))
    assert status == 422 and words in message and "at most" in message
    assert scene.loads.engines == []
    assert_left_nothing(forge, scene)
