"""The Forge host (Forge 2 and Neo, in their stand-ins) with the source on a device of its own.

With the "Device for the source model" setting on a GPU the target does not use, the conditioning modifier starts
the source's call of each step before the target's forward (``DeltaGuidance.prefetch_combined``), and the post-CFG
function takes that prediction: the same images, one source call per model call, each launched first. The source's
UNet is loaded by Forge's memory manager on its own device, with its activations budgeted there and nothing of it
reserved on the target's GPU. On the CPU the "other GPU" is simulated (the stand-in's target computes on the CPU);
the GPU test at the end runs the source on a real one, through the same code. Also here: Forge's skip-early-CFG and
NGMS steps run the source unguided, as AUTOMATIC1111's do, and a device that does not exist is refused by name.
"""

from __future__ import annotations

import pytest
import torch

from lib_delta.hosts.forge import memory as forge_memory
from tests.fake_forge import backend, harness, webui
from tests.fake_forge.harness import ADAPTED, failure

pytestmark = pytest.mark.usefixtures("one_thread")
forge, neo = harness.forge, harness.neo  # the fixtures


@pytest.fixture(params=["forge", "neo"])
def host(request):
    return request.getfixturevalue(request.param)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return torch.allclose(a, b, rtol=rel, atol=rel * b.abs().max().item())


class Calls:
    """Which model each forward of a generation ran, in order: "target" or "source" (every call goes through
    ``calc_cond_uncond_batch``, the target's from Forge's sampling function, the source's from ours)."""

    def __init__(self, monkeypatch, target):
        self.order: list[str] = []
        self.devices: list[torch.device] = []
        real = backend.calc_cond_uncond_batch
        module = target.forge_objects.unet.model

        def calc(model, cond, uncond, x_in, timestep, options):
            who = "target" if model is module else "source"
            self.order.append(who)
            if who == "source":
                self.devices.append(x_in.device)
            return real(model, cond, uncond, x_in, timestep, options)

        monkeypatch.setattr(backend, "calc_cond_uncond_batch", calc)

    def source_first(self) -> bool:
        """Every target forward follows a source call made since the previous target forward."""
        since = False
        for who in self.order:
            if who == "source":
                since = True
            elif not since:
                return False
            else:
                since = False
        return "target" in self.order


class Runs:
    """The source calls of each finished run, and how many of them were started before the target's forward."""

    def __init__(self, monkeypatch, adapter):
        self.done: list[tuple[int, int]] = []
        real = adapter.ForgeRun.close

        def close_run(run):
            first = not run.closed
            real(run)
            if first:
                self.done.append((run.source.calls, run.calls_beside))

        monkeypatch.setattr(adapter.ForgeRun, "close", close_run)


def beside(monkeypatch, on: bool = True) -> None:
    """Simulate the source on a second GPU: the stand-in's devices are all the CPU."""
    monkeypatch.setattr(forge_memory, "runs_beside", lambda source, target: on)


GENERATION = {"batch_size": 2, "enable_hr": True, "hr_second_pass_steps": 3, "denoising_strength": 0.6}


@pytest.mark.parametrize("trajectory", ["shared", "separate"])
@pytest.mark.parametrize("skip_early", [0.0, 0.4])
def test_the_source_beside_starts_first_and_gives_the_same_images(host, monkeypatch, trajectory, skip_early):
    monkeypatch.setattr(webui.opts, "skip_early_cond", skip_early)
    base = host.checkpoint("base", family="sd1", seed=0)
    target = host.load(base)
    lora = host.lora("style", target)
    group = {"loras": f"<lora:{lora}:1>", "adapted_prompt": ADAPTED, "trajectory": trajectory}
    runs = Runs(monkeypatch, host.adapter)
    calls = Calls(monkeypatch, target)
    sequential = host.run(target, base, group, **GENERATION)
    assert not calls.source_first()  # after the target's forward, in its post-CFG function
    calls.order.clear()
    beside(monkeypatch)
    got = host.run(target, base, group, **GENERATION)
    assert torch.equal(got, sequential)
    (calls_1, beside_1), (calls_2, beside_2) = runs.done
    assert calls_1 == calls_2 > 0
    if trajectory == "separate":  # its source point needs the target's previous prediction: never started early
        assert beside_2 == 0 and not calls.source_first()
    else:
        assert beside_1 == 0 and beside_2 == calls_2 and calls.source_first()
    assert not close(got, host.generate(target, **GENERATION), 1e-3)  # the delta really moved the images


def test_a_source_beside_is_loaded_on_its_own_device_and_budgeted_there(host, monkeypatch):
    """Beside: one load of the source's UNet by itself, with its activations; the target's sampling loads the
    target alone, with nothing reserved for the source. On the target's device: one load of both, the source's extra
    activations reserved with the target's."""
    source = host.checkpoint("sd1", family="sd1", seed=0)
    target = host.load(host.checkpoint("xl", family="sdxl", seed=5))
    lora = host.lora("style", host.load(source))
    mine = target.forge_objects.unet.model

    class Seen(list):  # each load as it is asked for: which of its models are the target's (the clones die)
        def append(self, call):
            models = [ref() for ref in call["models"]]
            super().append(([m.model is mine for m in models if m is not None], dict(call)))

    def loads():
        return list(backend.load_calls)

    extra_key = "minimum_memory_required" if host.neo else "hard_memory_preservation"
    monkeypatch.setattr(backend, "load_calls", Seen())
    host.run(target, source, {"loras": f"<lora:{lora}:1>"})
    together = [c for flags, c in loads() if True in flags]
    assert together and all(flags.count(False) == 1 for flags, c in loads() if True in flags)
    reserved = together[-1][extra_key] - (together[-1]["memory_required"] // 2 if host.neo else 0)
    assert reserved > 0  # the source's activations, on the target's GPU

    monkeypatch.setattr(backend, "load_calls", Seen())
    beside(monkeypatch)
    host.run(target, source, {"loras": f"<lora:{lora}:1>"})
    target_loads = [(flags, c) for flags, c in loads() if True in flags]
    source_loads = [(flags, c) for flags, c in loads() if flags == [False]]
    assert target_loads and all(flags == [True] for flags, _ in target_loads)  # the target alone
    plain = target_loads[-1][1]
    if host.neo:
        assert plain["minimum_memory_required"] == plain["memory_required"] // 2  # nothing of ours added
    else:
        assert plain["hard_memory_preservation"] == 0
    assert source_loads and source_loads[-1][1]["memory_required"] > 0  # the source's activations, on its own


def test_a_source_on_the_targets_device_or_the_cpu_runs_after_the_target(forge, monkeypatch):
    import torch as t

    assert not forge_memory.runs_beside(t.device("cpu"), t.device("cpu"))
    assert not forge_memory.runs_beside("cpu", "cuda:0")  # the CPU is not a second GPU
    monkeypatch.setattr(t.cuda, "current_device", lambda: 0)
    assert not forge_memory.runs_beside("cuda", "cuda:0")  # the same GPU, named two ways
    assert forge_memory.runs_beside("cuda:1", "cuda:0") and forge_memory.runs_beside("cuda:1", "cuda")
    assert forge_memory.runs_beside("cuda:0", "cpu")

    monkeypatch.setattr(webui.opts, "delta_sampling_device", "cpu", raising=False)
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    runs = Runs(monkeypatch, forge.adapter)
    calls = Calls(monkeypatch, target)
    forge.run(target, base, {"adapted_prompt": ADAPTED})
    assert runs.done[0][0] > 0 and runs.done[0][1] == 0 and not calls.source_first()


@pytest.mark.parametrize("choice, words", [("cuda:7", "does not exist on this machine"),
                                           ("gpu two", "is not a device name")])
def test_a_device_that_does_not_exist_is_refused_by_name_before_sampling(host, monkeypatch, choice, words):
    monkeypatch.setattr(webui.opts, "delta_sampling_device", choice, raising=False)
    base = host.checkpoint("base", family="sd1", seed=0)
    target = host.load(base)
    fresh = host.generate(target)
    status, message, _ = failure(lambda: host.run(target, base, {"adapted_prompt": ADAPTED}))
    assert status == 422 and f"'{choice}'" in message and words in message and "use 'same'" in message
    assert host.adapter.SLOT.get() is None
    assert torch.equal(host.generate(target), fresh)


@pytest.mark.parametrize("mode", ["base-first", "delta"])
@pytest.mark.parametrize("skip", ["early", "ngms"])
def test_skipped_cfg_steps_run_the_source_unguided_as_in_automatic1111(host, monkeypatch, mode, skip):
    """Where Forge's denoiser runs a call at scale 1 (skip-early-CFG, NGMS), the source runs unguided too, whatever
    its own scale, as AUTOMATIC1111's host does (its layout's ``uncond_from_cond``). With the source equal to the
    target at its scale, base-first over the whole window then samples exactly the target with the same skips;
    in delta mode a source scale far from the target's changes nothing on skipped steps."""
    kw = {"cfg_scale": 5.0, "steps": 6}
    if skip == "early":
        monkeypatch.setattr(webui.opts, "skip_early_cond", 0.5)
    else:
        kw["s_min_uncond"] = 100.0  # every odd step
    base = host.checkpoint("base", family="sd1", seed=0)
    target = host.load(base)
    guided = {"source": [], "target": []}  # per forward: whether it ran an uncond
    real = backend.calc_cond_uncond_batch
    module = target.forge_objects.unet.model

    def calc(model, cond, uncond, x_in, timestep, options):
        guided["target" if model is module else "source"].append(uncond is not None)
        return real(model, cond, uncond, x_in, timestep, options)

    monkeypatch.setattr(backend, "calc_cond_uncond_batch", calc)
    want = host.generate(target, **kw)
    guided["target"].clear()
    group = {"mode": "base-first", "source_cfg": 5.0} if mode == "base-first" else \
        {"adapted_prompt": ADAPTED, "source_cfg": 12.0}
    got = host.run(target, base, group, **kw)
    if mode == "base-first":
        assert close(got, want)
    # guided exactly where the target is: unguided on the skipped steps only
    assert guided["source"] == guided["target"] and False in guided["target"] and True in guided["target"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_a_source_on_cuda_runs_there_beside_the_target_and_gives_the_cpu_images(host, monkeypatch):
    """The source on cuda:0 (the setting; the stand-in's target computes on the CPU, so the source runs beside it):
    its UNet is loaded there by the memory manager, each call starts before the target's forward and its prediction
    stays on the GPU until the delta is added (moving it back at once would make the target's stream wait), and the
    images equal those of the source on the CPU up to the GPU's arithmetic; afterwards it is back on its offload
    device."""
    # in full fp32 on the GPU too: cuDNN's TF32 convolutions alone differ from the CPU by about 1e-3
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    base = host.checkpoint("base", family="sd1", seed=0)
    target = host.load(base)
    lora = host.lora("style", target)
    group = {"loras": f"<lora:{lora}:1>", "adapted_prompt": ADAPTED}
    kw = {**GENERATION, "steps": 8}
    plain = host.generate(target, **kw)
    monkeypatch.setattr(webui.opts, "delta_sampling_device", "cpu", raising=False)
    on_cpu = host.run(target, base, group, **kw)
    runs = Runs(monkeypatch, host.adapter)
    calls = Calls(monkeypatch, target)
    started = []  # where each prediction started early waits: on the source's GPU, so that nothing waits for it
    real_before = host.adapter.ForgeRun.before_call

    def before_call(run, *args):
        real_before(run, *args)
        pending = run.guidance._pending if run.guidance is not None else None
        if pending is not None:
            started.append(pending[1].device)

    monkeypatch.setattr(host.adapter.ForgeRun, "before_call", before_call)
    monkeypatch.setattr(webui.opts, "delta_sampling_device", "cuda:0", raising=False)
    on_gpu = host.run(target, base, group, **kw)
    (source_calls, calls_beside), = runs.done
    assert source_calls > 0 and calls_beside == source_calls and calls.source_first()
    assert calls.devices and all(d.type == "cuda" for d in calls.devices)
    assert len(started) == source_calls and all(d.type == "cuda" for d in started)
    assert close(on_gpu, on_cpu, 1e-3)
    assert not close(on_gpu, plain, 1e-2)  # the delta really moved the images
    from lib_delta.hosts.forge import models as forge_models

    for entry in forge_models.cached():  # settled: the kept engine is back on its offload device
        assert all(p.device.type == "cpu" for p in entry.unet.model.parameters())
    monkeypatch.setattr(webui.opts, "delta_sampling_device", "same", raising=False)
    assert torch.equal(host.generate(target, **kw), plain)  # and nothing of it is left behind
