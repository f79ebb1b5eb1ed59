"""The AUTOMATIC1111 host's lifecycle: what a generation leaves behind, however it ends.

Faults are injected into the stand-in WebUI (tests/fake_webui) as the real one meets them: an out-of-memory error in
the target's forward, an interrupt, another script's exception, a damaged file, a request over a limit. After each,
weak references prove that nothing the run built is still alive (with the cycle collector off, since the WebUI
rarely runs it), and the next plain generation is bit-identical to one from a fresh session.
"""

from __future__ import annotations

import contextlib
import weakref

import pytest
import test_a1111_host as world
import torch
from memory import no_cycle_collection

from lib_delta.errors import DeltaError
from lib_delta.hosts import a1111 as host
from lib_delta.hosts.a1111 import source as a1111_source
from lib_delta.hosts.a1111 import step as a1111_step

files, ui = world.files, world.ui  # the stand-in WebUI's fixtures: checkpoint files, a fresh session
BASE, delta, images = world.BASE, world.delta, world.images


class RunSpy:
    """Weak references to what a run builds: the run, its passes, its guidance and LoRA patches."""

    def __init__(self, monkeypatch):
        self.refs: list[tuple[str, weakref.ref]] = []
        real_open = host.SLOT.open

        def open_(p, run):
            self.refs.append(("run", weakref.ref(run)))
            if run.lora is not None:
                self.refs += [("lora patch", weakref.ref(patch)) for patch in run.lora._patches.values()]
            real_open(p, run)

        real_arm = a1111_step.Pass.arm

        def arm(ps, **kwargs):
            self.refs += [("pass", weakref.ref(ps)), ("source eval", weakref.ref(ps.source))]
            real_arm(ps, **kwargs)

        monkeypatch.setattr(host.SLOT, "open", open_)
        monkeypatch.setattr(a1111_step.Pass, "arm", arm)

    def alive(self) -> list[str]:
        return [name for name, ref in self.refs if ref() is not None]

    def live(self, kind: str) -> list:
        return [obj for name, ref in self.refs if name == kind and (obj := ref()) is not None]


def _assert_clean(ui, fresh):
    from modules import shared

    assert host.SLOT.get() is None
    for m in shared.sd_model.modules():
        assert "forward" not in vars(m)
    for entry in a1111_source.cached():
        assert not any("_delta_lora_patched" in vars(m) or "forward" in vars(m) for m in entry.model.modules())
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)


def _target_raises_at(monkeypatch, call: int, error: BaseException):
    """The active model's forward raises ``error`` at its ``call``-th call (counting from 1)."""
    from modules import shared

    model = shared.sd_model.model
    original = type(model).forward
    calls = []

    def forward(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", forward)
    return calls


# --- a generation that dies in the middle ------------------------------------------------------------------------


@pytest.mark.parametrize("make_error", [lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                        lambda: RuntimeError("an extension's UNet hook failed")], ids=["oom", "other"])
def test_a_failure_in_the_target_closes_the_run_at_once(ui, monkeypatch, make_error):
    fresh = images(ui.txt2img(**BASE))
    error = make_error()
    spy = RunSpy(monkeypatch)
    with no_cycle_collection():
        undo = contextlib.ExitStack()
        with undo:
            mp = undo.enter_context(monkeypatch.context())
            calls = _target_raises_at(mp, 3, error)
            with pytest.raises(type(error)) as raised:
                ui.txt2img(delta(loras="<lora:style:1>", adapted_prompt="in the snow"), **BASE)
            assert raised.value is error and len(calls) == 3
            oom = isinstance(error, torch.OutOfMemoryError)  # the API's detail then names the ways to make room
            assert ("set CFG mode to cond" in getattr(error, "detail", "")) == oom
        # The WebUI skipped postprocess. While the exception lives, its traceback holds the guarded sampler's frame
        # and so the pass object, emptied: nothing of what the run built.
        assert spy.alive() in ([], ["pass"]), "the failed run is still referenced"
        for ps in spy.live("pass"):
            assert (ps.source, ps.guidance, ps.call) == (None, None, None)
    _assert_clean(ui, fresh)


def test_an_interrupted_generation_finishes_and_leaves_nothing(ui, monkeypatch):
    from modules import shared

    fresh = images(ui.txt2img(**BASE))
    spy = RunSpy(monkeypatch)
    real = a1111_step.Pass.after_call
    calls = []

    def after_call(ps, params):
        real(ps, params)
        calls.append(1)
        if len(calls) == 2:
            shared.state.interrupted = True  # the Interrupt button, between two steps

    monkeypatch.setattr(a1111_step.Pass, "after_call", after_call)
    with no_cycle_collection():
        out = ui.txt2img(delta(adapted_prompt="in the snow"), **BASE)
        shared.state.interrupted = False
        assert len(calls) == 2 and torch.isfinite(images(out)).all()
        assert spy.alive() == []
    _assert_clean(ui, fresh)


def test_another_scripts_failing_process_leaves_the_generation_and_the_next_intact(ui, monkeypatch):
    fresh = images(ui.txt2img(**BASE))
    adapted = images(ui.txt2img(**{**BASE, "prompt": BASE["prompt"] + ", in the snow"}))
    script = ui.runner.alwayson_scripts[0]
    real = type(script).process

    def process(self, p, *args):
        real(self, p, *args)
        raise RuntimeError("another extension's process failed")

    monkeypatch.setattr(type(script), "process", process)
    spy = RunSpy(monkeypatch)
    with no_cycle_collection():
        out = images(ui.txt2img(delta(adapted_prompt="in the snow"), **BASE))  # the WebUI logs it and goes on
        assert spy.alive() == []
    assert float((out - adapted).norm() / adapted.norm()) < 1e-5
    monkeypatch.undo()
    _assert_clean(ui, fresh)


def test_a_run_that_died_is_closed_by_the_next_generation(ui, monkeypatch):
    """Even when nothing closed it at the failure (an exception outside the guarded sampler), the next process()
    does, before the next generation starts."""
    fresh = images(ui.txt2img(**BASE))
    spy = RunSpy(monkeypatch)
    from modules import processing

    real = processing.StableDiffusionProcessingTxt2Img.sample

    def sample(p, *args, **kwargs):
        real(p, *args, **kwargs)
        raise RuntimeError("decoding ran out of memory")

    with no_cycle_collection():
        with monkeypatch.context() as mp:
            mp.setattr(processing.StableDiffusionProcessingTxt2Img, "sample", sample)
            with pytest.raises(RuntimeError, match="decoding"):
                ui.txt2img(delta(adapted_prompt="in the snow"), **BASE)
        assert "run" in spy.alive()  # only the next generation can tell
        assert torch.equal(images(ui.txt2img(**BASE)), fresh)
        assert spy.alive() == [] and host.SLOT.get() is None


def test_a_decode_that_runs_out_of_memory_finds_the_run_closed_already(ui, monkeypatch):
    """The VAE decode comes after the last batch's ``post_sample``, where the run closes: a decode that fails (the
    WebUI then skips ``postprocess``) leaves nothing of the run holding memory until the next generation."""
    from modules import processing

    fresh = images(ui.txt2img(**BASE))
    spy = RunSpy(monkeypatch)

    def decode(model, batch, target_device=None, check_for_nans=False):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")

    with no_cycle_collection():
        with monkeypatch.context() as mp:
            mp.setattr(processing, "decode_latent_batch", decode)
            with pytest.raises(torch.OutOfMemoryError):
                ui.txt2img(delta(loras="<lora:style:1>", adapted_prompt="in the snow"), **BASE)
        run = host.SLOT.get()
        assert run is not None and run.closed, "the run still holds its source until the next generation"
        assert spy.alive() == ["run"]  # its passes, source calls and LoRA patches are gone with the close
        assert run.passes == [] and run.graphs is None and run.lora is None
    assert torch.equal(images(ui.txt2img(**BASE)), fresh)  # whose process() drops the closed run from the slot
    _assert_clean(ui, fresh)


def test_with_a_batch_count_the_run_closes_after_the_last_batch_only(ui, monkeypatch, capsys):
    from lib_delta.hosts.a1111 import lora as a1111_lora

    closes, released = [], []
    real, real_release = host.Run.close, a1111_lora.Adapter.close

    def close(run):
        closes.append(run.closed)
        real(run)

    monkeypatch.setattr(host.Run, "close", close)
    monkeypatch.setattr(a1111_lora.Adapter, "close", lambda self: released.append(1) or real_release(self))
    both = images(ui.txt2img(delta(loras="<lora:style:1>", adapted_prompt="in the snow"), **{**BASE, "n_iter": 2}))
    said = capsys.readouterr().out
    assert closes.count(False) == 1  # closed once, after the second batch
    # and closed whole: the first batch's pass, disarmed when the second armed, still reports its calls
    assert released == [1] and "Error" not in said and f"{2 * BASE['steps']} source calls" in said, said
    second = images(ui.txt2img(delta(loras="<lora:style:1>", adapted_prompt="in the snow"),
                               **{**BASE, "seed": BASE["seed"] + 1}))
    plain = images(ui.txt2img(**{**BASE, "seed": BASE["seed"] + 1}))
    assert torch.equal(both[1:], second) and not torch.equal(second, plain)  # the second batch had its delta


# --- bad files and requests over a limit --------------------------------------------------------------------------


def test_a_damaged_source_file_is_a_clear_error_and_loads_nothing(ui):
    fresh = images(ui.txt2img(**BASE))
    with pytest.raises(DeltaError, match="broken") as e:
        ui.txt2img(delta(source="broken", adapted_prompt="x"), **BASE)
    assert e.value.status_code == 422
    assert a1111_source.cached() == []
    _assert_clean(ui, fresh)


def test_an_unsafe_pickle_is_refused_as_one(ui, files, monkeypatch):
    """The WebUI's safe unpickler prints why and returns None; its reader then fails on None."""
    from modules import sd_models

    real = sd_models.read_state_dict

    def refusing(path, *args, **kwargs):
        if path.endswith(".ckpt"):
            None.pop("state_dict")  # what read_state_dict meets when safe.load refused the file
        return real(path, *args, **kwargs)

    monkeypatch.setattr(sd_models, "read_state_dict", refusing)
    with pytest.raises(DeltaError, match=r"refused .* as an unsafe pickle") as e:
        ui.txt2img(delta(source="pickled", adapted_prompt="x"), **BASE)
    assert "safetensors" in str(e.value) and e.value.status_code == 422


def _counting_loads(monkeypatch) -> list[str]:
    loaded = []
    real = a1111_source._load

    def load(info, *args, **kwargs):
        loaded.append(info.name_for_extra)
        return real(info, *args, **kwargs)

    monkeypatch.setattr(a1111_source, "_load", load)
    return loaded


def test_a_request_over_the_checkpoint_limit_loads_nothing(ui, monkeypatch):
    from modules import shared

    loaded = _counting_loads(monkeypatch)
    groups = [{"checkpoint": name, "strength": 0.5} for name in ("tuned", "other", "tuned", "other")]
    monkeypatch.setattr(shared.opts, "delta_sampling_max_checkpoints", 2, raising=False)
    with pytest.raises(DeltaError, match=r"3 different checkpoints.*at most 2") as e:
        ui.txt2img({"enabled": True, "source": "base", "groups": groups}, **BASE)
    assert e.value.status_code == 422 and loaded == [] and a1111_source.cached() == []
    monkeypatch.setattr(shared.opts, "delta_sampling_max_checkpoints", 3, raising=False)
    ui.txt2img({"enabled": True, "source": "base", "groups": groups}, **BASE)
    assert loaded == ["base", "tuned", "other"]  # each file read once


def test_a_request_over_the_lora_limit_loads_nothing(ui, monkeypatch):
    from modules import shared

    loaded = _counting_loads(monkeypatch)
    monkeypatch.setattr(shared.opts, "delta_sampling_max_loras", 3, raising=False)
    with pytest.raises(DeltaError, match=r"4 LoRAs.*at most 3"):
        ui.txt2img(delta(loras="<lora:style:1>" * 4), **BASE)
    assert loaded == []


def test_every_name_and_family_is_checked_before_anything_loads(ui, monkeypatch):
    loaded = _counting_loads(monkeypatch)
    for settings, words in (
            ({"groups": [{"checkpoint": "tuned", "strength": 0.5}, {"loras": "<lora:missing:1>"}]}, "missing"),
            ({"groups": [{"checkpoint": "tuned", "strength": 0.5}, {"checkpoint": "xl"}]}, "not of the source's"),
            ({"source": "xl", "adapted_prompt": "x"}, None),  # SDXL beside an SD1 target: allowed (same channels)
    ):
        ctx = pytest.raises(DeltaError, match=words) if words else contextlib.nullcontext()
        with ctx:
            ui.txt2img({"enabled": True, "source": "base", **settings}, **BASE)
        if words:
            assert loaded == [], settings
    assert loaded == ["xl"]


def test_a_start_that_fails_after_loading_releases_what_it_loaded(ui, monkeypatch):
    """A pickled fine-tune has no header to check: it loads, fails its family check, and is released."""
    ui.txt2img(delta(adapted_prompt="x"), **BASE)
    (base,) = a1111_source.cached()
    with pytest.raises(DeltaError, match="not of the source's"):
        ui.txt2img(delta(checkpoint="pickled_xl"), **BASE)
    assert a1111_source.cached() == [base]


# --- the pool ----------------------------------------------------------------------------------------------------


def test_switching_sources_frees_each_dropped_model_at_once(ui):
    """The WebUI's hijack leaves a bound method on each model (a cycle): dropping a model from a cache freed nothing
    until a full collection, and each switch of source kept one more model."""
    gone = []
    with no_cycle_collection():
        for name in ("base", "other", "base", "other", "base"):
            ui.txt2img(delta(source=name, adapted_prompt="in the snow"), **BASE)
            (entry,) = a1111_source.cached()
            assert entry.info.name_for_extra == name
            model, unet = weakref.ref(entry.model), weakref.ref(entry.model.model.diffusion_model)
            weights = next(entry.model.model.diffusion_model.parameters())
            del entry
            assert all(ref() is None for ref in gone), "a dropped source model is still alive"
            gone = [model, unet]
            last_weights = weights
            del weights
        ui.txt2img(delta(source="other", adapted_prompt="x"), **BASE)
        assert all(ref() is None for ref in gone)
        assert last_weights.numel() == 0  # freed even where something still refers to the tensor


def test_at_most_the_kept_models_stay_between_generations(ui, monkeypatch):
    from modules import shared

    ui.txt2img({"enabled": True, "source": "base", "groups": [{"checkpoint": "tuned"}]}, **BASE)
    assert [e.info.name_for_extra for e in a1111_source.cached()] == ["base"]  # one by default: the source
    monkeypatch.setattr(shared.opts, "delta_sampling_kept_models", 2, raising=False)
    ui.txt2img({"enabled": True, "source": "base", "groups": [{"checkpoint": "tuned"}]}, **BASE)
    assert [e.info.name_for_extra for e in a1111_source.cached()] == ["base", "tuned"]
    assert all(e.device.type == "cpu" for e in a1111_source.cached())


# --- names -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bas", "e", "BASE"])
def test_a_near_miss_is_refused_with_the_closest_names(ui, name):
    with pytest.raises(DeltaError, match="not among the WebUI's checkpoints") as e:
        ui.txt2img(delta(source=name, adapted_prompt="x"), **BASE)
    assert "base" in str(e.value).split("Closest:")[1] and a1111_source.cached() == []


def test_a_checkpoint_is_found_by_title_file_name_model_name_and_hash(ui):
    from modules import sd_models

    info = sd_models.checkpoint_aliases["base"]
    info.calculate_shorthash()
    for name in (info.title, info.name, info.model_name, info.shorthash, info.sha256):
        ui.txt2img(delta(source=name, adapted_prompt="x"), **BASE)
        assert [e.info for e in a1111_source.cached()] == [info]


# --- the source's own schedule -----------------------------------------------------------------------------------


def test_the_source_reads_its_own_schedule_under_a_zero_terminal_snr_target(ui):
    """The WebUI's "Zero Terminal SNR" schedule rewrites the active model's alphas_cumprod before sampling; the
    source was trained on its own and maps σ with it."""
    from modules import shared

    target = shared.sd_model
    own = target.alphas_cumprod.clone()
    rescaled = own.clone()
    rescaled[-1] = 4.8973451890853435e-08  # the rescaled table's last level, as the WebUI computes it
    target.alphas_cumprod = rescaled
    try:
        ui.txt2img(delta(adapted_prompt="in the snow"), **BASE)
    finally:
        target.alphas_cumprod = own
    (entry,) = a1111_source.cached()
    assert torch.equal(entry.model.alphas_cumprod.cpu(), entry.model.alphas_cumprod_original.cpu())


# --- --lowvram / --medvram ---------------------------------------------------------------------------------------


def test_under_lowvram_the_lora_data_goes_back_with_its_model(ui, monkeypatch):
    """The source visits the GPU for each call under --lowvram/--medvram; its dense LoRA data (LoHa, DoRA) went
    there with it and never came back."""
    from lib_delta.hosts.a1111 import lora as a1111_lora
    from lib_delta.lora.patch import DeltaPatch

    made = []
    real_create = a1111_lora.Adapter.create.__func__
    monkeypatch.setattr(a1111_lora.Adapter, "create",
                        classmethod(lambda cls, *a: made.append(real_create(cls, *a)) or made[-1]))
    ui.txt2img(delta(loras="<lora:style:1>"), **BASE)
    (adapter,) = made
    moves = []
    monkeypatch.setattr(DeltaPatch, "to", lambda self, device=None, dtype=None: moves.append(str(device)) or self)
    monkeypatch.setattr(a1111_source, "target_uses_lowvram", lambda: True)
    on_gpu = a1111_lora.Adapter(adapter._patches, adapter._group_model, adapter._te, adapter._unet,
                                torch.device("cuda"))
    (entry,) = a1111_source.cached()
    terms = on_gpu.unet_terms(0)
    with on_gpu.unet_rows(entry, [(1, terms)]):
        assert moves == ["cuda"]
    with on_gpu.te_active(entry, on_gpu.te_terms(0)):
        pass
    assert moves == ["cuda", "cpu", "cuda", "cpu"]


@pytest.mark.parametrize("flag, free_gib, resident", [("medvram", 8, True), ("medvram", 1, False),
                                                      ("lowvram", 64, False)])
def test_under_medvram_the_source_stays_on_the_gpu_when_it_fits(monkeypatch, flag, free_gib, resident):
    """One move per generation instead of two per step when the card has room beside the target (--medvram); per
    call, with the target's modules stepping aside, when it has not or under --lowvram."""
    from modules import lowvram, shared

    module = torch.nn.Linear(4, 4)
    moves, evicted = [], []
    monkeypatch.setattr(module, "to", lambda device: moves.append(str(device)) or module)
    monkeypatch.setattr(lowvram, "send_everything_to_cpu", lambda: evicted.append(1))
    monkeypatch.setattr(shared.cmd_opts, flag, True)
    monkeypatch.setattr(a1111_source, "target_uses_lowvram", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free_gib << 30, 80 << 30))
    gpu = torch.device("cuda", 0)
    assert a1111_source.stays_resident(module, gpu) is resident
    for _ in range(3):  # three source calls
        with a1111_source.on_device(None, module, gpu):
            pass
    if resident:
        assert moves == ["cuda:0"] * 3 and evicted == []  # .to() on a module already there moves nothing
    else:
        assert moves == ["cuda:0", "cpu"] * 3 and len(evicted) == 3
