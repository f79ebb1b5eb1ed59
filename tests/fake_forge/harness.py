"""The Forge tests' session: the stand-in installed with empty lists, the real script loaded against it, and
helpers that write checkpoints and LoRAs and run generations the way Forge's API does."""

from __future__ import annotations

import gc
import importlib.util
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests import memory

from . import backend, controlnet, installed, webui

ROOT = Path(__file__).resolve().parents[2]
PROMPT, ADAPTED = "a red cube on a table", "a watercolor painting of a red cube"
APPENDED = f"{PROMPT}, {ADAPTED}"  # what an adapted prompt adds to: the target's own prompt


@pytest.fixture
def forge(tmp_path, monkeypatch):
    """The stand-in installed, empty lists, and the real script class loaded against it."""
    yield from _session(tmp_path, monkeypatch, neo=False)


@pytest.fixture
def neo(tmp_path, monkeypatch):
    """The same with the Forge Neo flavour of the stand-in (``neo.py``)."""
    yield from _session(tmp_path, monkeypatch, neo=True)


def _session(tmp_path, monkeypatch, neo: bool):
    with installed(neo=neo):
        from lib_delta.hosts import forge as adapter
        from lib_delta.hosts.forge import control as forge_control
        from lib_delta.hosts.forge import ipadapter as forge_ip
        from lib_delta.hosts.forge import models as forge_models

        webui.checkpoints_list.clear()
        webui.checkpoint_aliases.clear()
        webui.lora_dir = str(tmp_path / "lora")
        Path(webui.lora_dir).mkdir()
        webui.list_available_networks()
        webui.opts.delta_sampling_cache = "ram"
        webui.opts.forge_additional_modules = []
        backend.loads.clear()
        webui.state.interrupted = False
        backend.current_loaded_models.clear()
        backend.load_calls.clear()
        backend.wrapped_calls.clear()
        monkeypatch.setattr(adapter, "register", lambda: None)
        spec = importlib.util.spec_from_file_location("delta_sampling_script", ROOT / "scripts" / "delta_sampling.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield Forge(tmp_path, module.DeltaSamplingScript(), adapter, neo)
        adapter.begin(None)
        forge_models.forget_all()
        forge_control.forget_all()
        forge_ip.forget_all()
        controlnet.forget_cached()  # Neo's cache of the user's ControlNets lives as long as the WebUI
        # a finished generation's processing object and its sampler refer to each other (as in the WebUI) and keep
        # the target until a cycle collection: it must happen while this flavour's loaded-model list is installed
        gc.collect()
        backend.current_loaded_models.clear()


class Forge:
    def __init__(self, tmp_path, script, adapter, neo: bool = False):
        self.tmp, self.script, self.adapter, self.neo = tmp_path, script, adapter, neo

    def checkpoint(self, name: str, diffusion_only: bool = False, **spec) -> str:
        path = self.tmp / f"{name}.safetensors"
        backend.write_checkpoint(path, spec, diffusion_only)
        webui.add_checkpoint(str(path))
        return name

    def load(self, name: str):
        return backend.forge_loader(webui.checkpoints_list[f"{name}.safetensors"].filename)

    def lora(self, name: str, engine, seed: int = 5) -> str:
        """A kohya LoRA over every linear layer of the engine's UNet transformers and first text encoder."""
        save_file(lora_tensors(engine, seed), str(Path(webui.lora_dir) / f"{name}.safetensors"))
        webui.list_available_networks()
        return name

    def processing(self, model, delta: dict | None = None, others=(), **kw) -> webui.Processing:
        p = webui.Processing(model, kw.pop("prompt", PROMPT), **kw)
        p.scripts = webui.ScriptRunner(self.script, (delta or {"enabled": False},), others)
        return p

    def generate(self, model, delta: dict | None = None, others=(), **kw) -> torch.Tensor:
        return webui.process_images(self.processing(model, delta, others, **kw))

    def run(self, model, source: str, group: dict, **kw) -> torch.Tensor:
        return self.generate(model, {"enabled": True, "source": source, **group}, **kw)


def lora_tensors(engine, seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    unet = engine.forge_objects.unet.model.diffusion_model
    encoders = engine.forge_objects.clip.cond_stage_model
    te = encoders["clip_l"] if "clip_l" in encoders else None
    for prefix, root, keep in (("lora_unet_", unet, "transformer_blocks"), ("lora_te_", te, "self_attn")):
        for path, module in (root.named_modules() if root is not None else ()):
            if isinstance(module, backend.ForgeLinear) and keep in path:
                out, inp = module.weight.shape
                key = prefix + path.replace(".", "_")
                tensors[f"{key}.lora_down.weight"] = torch.randn(4, inp, generator=g) * inp**-0.5
                tensors[f"{key}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.5
                tensors[f"{key}.alpha"] = torch.tensor(4.0)
    return tensors


# --- what a generation leaves behind ---------------------------------------------------------------------------------


@pytest.fixture
def no_cycle_collection():
    with memory.no_cycle_collection():
        yield


def failure(fn: Callable[[], object]) -> tuple[int | None, str, str]:
    """The ``status_code``, message and type name of what ``fn`` raised (``(None, "", "")`` if nothing), keeping
    no reference to the exception or its frames."""
    try:
        fn()
    except Exception as e:
        return getattr(e, "status_code", None), str(e), type(e).__name__
    return None, "", ""


class Loads:
    """Weak references to every engine Forge's loader builds (the host's private engines)."""

    def __init__(self, monkeypatch):
        import sys

        self.engines: list[weakref.ref] = []
        module = sys.modules["backend.loader"]
        real = module.forge_loader

        def forge_loader(*args, **kwargs):
            engine = real(*args, **kwargs)
            self.engines.append(weakref.ref(engine))
            return engine

        monkeypatch.setattr(module, "forge_loader", forge_loader)

    def alive(self) -> int:
        return sum(ref() is not None for ref in self.engines)


class RunSpy:
    """Weak references to what each run builds: the run, its source, LoRA patches and guidance, the cloned UNet
    patchers of its passes and the functions set on them."""

    def __init__(self, monkeypatch, adapter):
        self.refs: list[tuple[str, weakref.ref]] = []
        real_init, real_arm = adapter.ForgeRun.__init__, adapter.ForgeRun.arm

        def init(run, *args, **kwargs):
            real_init(run, *args, **kwargs)
            self.refs += [("run", weakref.ref(run)), ("source", weakref.ref(run.source))]
            self.refs += [("LoRA patch", weakref.ref(s.patch)) for s in run.source.slots if s.patch is not None]

        def arm(run, p, *args, **kwargs):
            real_arm(run, p, *args, **kwargs)
            unet = p.sd_model.forge_objects.unet
            self.refs.append(("cloned UNet patcher", weakref.ref(unet)))
            options = unet.model_options
            for key in ("sampler_post_cfg_function", "conditioning_modifiers"):
                self.refs += [(key, weakref.ref(f)) for f in options.get(key, [])]
            if run.guidance is not None:
                self.refs.append(("guidance", weakref.ref(run.guidance)))

        monkeypatch.setattr(adapter.ForgeRun, "__init__", init)
        monkeypatch.setattr(adapter.ForgeRun, "arm", arm)

    def alive(self) -> list[str]:
        return [name for name, ref in self.refs if ref() is not None]


def assert_clean(target) -> None:
    """Nothing of a run on the target or in Forge's lists: no post-CFG function, no clone of ours loaded, no LoRA
    hook on a kept engine."""
    from lib_delta.hosts.forge import models as forge_models

    assert "sampler_post_cfg_function" not in target.forge_objects.unet.model_options
    for loaded in backend.current_loaded_models:
        if loaded.model is None:  # Neo: a patcher that is gone
            continue
        assert "sampler_post_cfg_function" not in loaded.model.model_options
        assert not getattr(loaded.model, "extra_model_patchers_during_sampling", [])
    for entry in forge_models.cached():
        modules = [*entry.unet.model.modules(), *entry.engine.forge_objects.clip.cond_stage_model.modules()]
        assert not any("forward" in vars(m) for m in modules)


def assert_units_leave_nothing(world, monkeypatch, spy_of: Callable, after_interrupt: Callable[[], None] = lambda: None
                               ) -> None:
    """A finished, a failed (inside the source's UNet, mid-sampling) and an interrupted generation with a unit of
    ``world``: nothing that ``spy_of(monkeypatch)`` saw built survives any of them, nor any run, and the next plain
    image is the fresh one. ``after_interrupt`` checks more before the patches are undone."""
    from lib_delta.hosts.forge import models as forge_models

    spy = spy_of(monkeypatch)
    runs = RunSpy(monkeypatch, world.f.adapter)
    fresh = world.f.generate(world.target)
    world.ours([world.unit()], {"preview": True})
    assert spy.refs and spy.alive() == 0 and runs.alive() == []
    assert_clean(world.target)

    entry = forge_models.cached()[0]
    forward_calls(monkeypatch, entry.engine, at=3, do=lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    del entry
    _, text, _ = failure(lambda: world.ours([world.unit()]))
    assert "boom" in text and spy.alive() == 0 and runs.alive() == []
    monkeypatch.undo()
    spy = spy_of(monkeypatch)  # an interruption at the target's second step
    forward_calls(monkeypatch, world.target, at=2, do=lambda: setattr(webui.state, "interrupted", True))
    world.ours([world.unit()])
    assert spy.refs and spy.alive() == 0
    assert_clean(world.target)
    after_interrupt()
    monkeypatch.undo()
    assert torch.equal(world.f.generate(world.target), fresh)


def units_against_none(monkeypatch, slot_field: str) -> list[float]:
    """Recompute every source call with its units (the slot's ``slot_field``: ``units`` for ControlNets, ``images``
    for IP-Adapters) taken off: the rows of variants without units must be bit for bit the same; the relative
    change of every other row is appended to the returned list."""
    from lib_delta.hosts.forge import source as source_mod

    real = source_mod.ForgeSource._run
    changes: list[float] = []

    def run(self, slot, ks, compiled, x, level, run_uncond):
        got = real(self, slot, ks, compiled, x, level, run_uncond)
        units = getattr(slot, slot_field)
        setattr(slot, slot_field, [])
        try:
            plain = real(self, slot, ks, compiled, x, level, run_uncond)
        finally:
            setattr(slot, slot_field, units)
        for k in ks:
            if getattr(self.variants[k], slot_field) is None:
                assert torch.equal(got[k], plain[k])
            else:
                changes.append(float((got[k] - plain[k]).norm() / plain[k].norm()))
        return got

    monkeypatch.setattr(source_mod.ForgeSource, "_run", run)
    return changes


def forward_calls(monkeypatch, engine, at: int | None = None, do: Callable[[], None] | None = None) -> list[int]:
    """Count the engine's UNet forwards; at the ``at``-th (from 1) call ``do()`` first (raise, interrupt...)."""
    model = engine.forge_objects.unet.model
    real = model.apply_model
    calls: list[int] = []

    def apply_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == at and do is not None:
            do()
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "apply_model", apply_model)
    return calls
