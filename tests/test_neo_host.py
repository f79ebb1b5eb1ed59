"""The Forge host in Forge Neo: the Forge 2 stand-in's tests again in its Neo flavour, and what only Neo has.

The imported tests run here with ``forge`` bound to the Neo flavour (``tests/fake_forge/neo.py``); those that read a
Forge 2 signature (``hard_memory_preservation``, the stand-in's ``unloads`` counter) or load SD2/SD3, which Neo
cannot, have their Neo counterparts below. What only Neo has: its version string picks the Neo paths; its loader
resets the active model's global flags; its text encoder records infotext in a global dict the next target
conditioning reads; its VAE carries no latent scale; its loaded-model list holds patchers weakly and unloads with
other parameters; it loads no SD2.x or SD3 checkpoints, and has families of other latent spaces.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lib_delta.errors import DeltaError
from tests.fake_forge import backend, harness, webui
from tests.fake_forge import neo as neo_flavour
from tests.fake_forge.harness import ADAPTED, APPENDED, PROMPT, Loads, failure
from tests.test_forge_adapter import (  # noqa: F401  (collected here again, on Neo)
    test_a_flux_source_gets_the_distilled_guidance_of_the_pass,
    test_a_near_miss_is_refused_with_the_closest_listed_names,
    test_a_refusal_is_an_http_exception_when_fastapi_is_there,
    test_an_absurd_number_in_the_request_is_refused_before_anything_runs,
    test_an_unforeseen_error_stops_the_generation_as_a_server_error,
    test_any_exception_inside_start_is_a_server_error_that_stops_the_generation,
    test_base_first_guides_the_source_at_its_own_scale_beside_a_cfg_one_target,
    test_cfg_one_and_weighted_and_prompts_keep_the_identity,
    test_hires_fix_hook_called_twice_per_pass_applies_the_delta_once,
    test_preview_strip_is_appended_after_the_images,
    test_source_equal_to_target_at_unit_strength_samples_the_adapted_model,
    test_the_source_resolves_by_its_listed_names,
    test_zero_strength_is_bit_identical_to_off_and_never_runs_the_source,
)
from tests.test_forge_faults import (  # noqa: F401
    scene,
    test_a_checkpoint_forge_cannot_build_fails_the_start_and_releases_what_it_loaded,
    test_a_damaged_lora_is_refused_and_left_where_it_is,
    test_a_damaged_source_checkpoint_is_refused_before_forge_reads_it,
    test_a_request_over_a_limit_is_refused_before_anything_loads,
    test_an_exception_escaping_another_scripts_process_is_closed_by_the_next_generation,
    test_an_interrupt_at_step_k_returns_what_was_sampled_and_leaves_nothing,
    test_another_extensions_post_cfg_function_failing_at_step_k_closes_the_run,
    test_out_of_memory_at_step_k_stops_with_a_server_error,
)
from tests.test_forge_pickles import (  # noqa: F401
    plant,
    test_a_pickled_lora_payload_never_runs,
    test_a_pickled_source_checkpoint_is_refused_without_being_unpickled,
    test_a_plain_pickled_lora_loads_with_the_original_restricted_torch_load,
)
from tests.test_forge_pool import (  # noqa: F401
    test_a_dropped_engine_gives_its_weights_back_even_while_something_holds_it,
    test_a_kept_source_is_reused_and_gives_the_same_image,
    test_at_most_the_kept_number_of_engines_stays_between_generations,
    test_switching_sources_frees_every_dropped_engine_without_a_collection,
    test_the_old_source_is_released_before_the_new_one_loads,
)

pytestmark = pytest.mark.usefixtures("one_thread")
forge = harness.neo  # the imported tests' fixture, in the Neo flavour
no_cycle_collection = harness.no_cycle_collection


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def _cached():
    from lib_delta.hosts.forge import models as forge_models

    return forge_models.cached()


# --- detection -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("neo", [False, True])
def test_neo_is_told_from_forge_2_by_its_version(tmp_path, monkeypatch, neo):
    from lib_delta import hosts
    from tests.fake_forge import installed

    with installed(neo=neo):
        assert hosts.is_forge() and hosts.is_neo() is neo
    assert not hosts.is_neo()  # neither installed (AUTOMATIC1111 has no modules_forge)


# --- the global flags Neo's loader resets ----------------------------------------------------------------------------


def _flags() -> type:
    return neo_flavour.dynamic_args


def test_the_stand_in_resets_the_flags_as_neos_loader_does(forge):
    base = forge.checkpoint("base", family="sd1", seed=0)
    args = _flags()
    args.kontext = args.klein = args.wan = True
    args.ref_latents.append(torch.ones(1))
    forge.load(base)
    assert (args.kontext, args.klein, args.wan, args.ref_latents) == (False, False, False, [])


def test_loading_the_source_keeps_the_active_models_flags(forge, monkeypatch):
    """An active Flux Kontext / Klein / Wan model's flags and latents survive the private load of an SD1.5 source."""
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    args = _flags()
    ref, concat, lq, handler = torch.ones(1, 16, 8, 8), torch.ones(1, 4), [torch.ones(1), torch.zeros(1)], object()
    refs, extra = args.ref_latents, args.last_extra_generation_params
    args.kontext = args.klein = args.wan = args.edit = args.krea2 = True
    refs.append(ref)
    args.concat_latent, args.lq_latent, args.context_handler, args.ops = concat, lq, handler, "ActiveOperations"
    loads = Loads(monkeypatch)
    forge.run(target, base, {"adapted_prompt": ADAPTED})
    assert len(loads.engines) == 1, "the source was loaded by Neo's loader"
    assert (args.kontext, args.klein, args.wan, args.edit, args.krea2) == (True,) * 5
    assert args.ref_latents is refs and len(refs) == 1 and refs[0] is ref
    assert args.concat_latent is concat and args.lq_latent is lq and args.context_handler is handler
    assert args.ops == "ActiveOperations" and args.last_extra_generation_params is extra


# --- the infotext Neo's text encoder records ------------------------------------------------------------------------


@pytest.mark.parametrize("isolated", [True, False])
def test_the_sources_encoding_never_reaches_the_targets_infotext(forge, monkeypatch, isolated):
    """The source encodes the adapted prompt, whose embedding Neo records as "TI"; the target's hires conditioning
    would read it into the target's parameters (the un-isolated run shows the test can see it)."""
    from lib_delta.hosts.forge import isolation

    if not isolated:
        monkeypatch.setattr(isolation, "infotext_params_kept", contextlib.nullcontext)
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    p = forge.processing(target, {"enabled": True, "source": base, "adapted_prompt": "watercolor-emb"},
                         enable_hr=True, hr_second_pass_steps=2)
    webui.process_images(p)
    assert p.extra_generation_params["Emphasis"] == "Original"  # the target's own
    assert ("TI" in p.extra_generation_params) is not isolated
    if isolated:
        assert _flags().last_extra_generation_params == {}  # as the target's own conditioning left it


def test_an_embedding_in_the_targets_prompt_is_still_recorded(forge):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    p = forge.processing(target, {"enabled": True, "source": base, "adapted_prompt": ADAPTED},
                         prompt=f"{PROMPT}, watercolor-emb")
    webui.process_images(p)
    assert p.extra_generation_params["TI"] == "watercolor-emb"


# --- latent formats and families --------------------------------------------------------------------------------------


def test_the_latent_format_comes_from_the_models_guess(forge):
    from lib_delta.hosts.forge import models as forge_models

    sd1 = forge.load(forge.checkpoint("sd1", family="sd1", seed=0))
    xl = forge.load(forge.checkpoint("xl", family="sdxl", seed=1))
    flux = forge.load(forge.checkpoint("flux", family="flow", latent_format="flux", seed=2))
    assert not hasattr(sd1.forge_objects.vae.first_stage_model, "scaling_factor")
    got = {type(e).__name__: forge_models.latent_format(e) for e in (sd1, xl, flux)}
    assert {k: (f.name, f.channels, f.scale, f.shift) for k, f in got.items()} == {
        "StableDiffusion": ("SD1", 4, 0.18215, 0.0), "StableDiffusionXL": ("SDXL", 4, 0.13025, 0.0),
        "Flux": ("Flux", 16, 0.3611, 0.1159)}


@pytest.mark.parametrize(("name", "flags", "family"), [
    ("Mugen", {"is_sdxl": True}, "mugen"),  # an SDXL flag on a 32-channel flow model (diffusion_engine/mugen.py:61)
    ("StableDiffusionXLRefiner", {"is_sdxl": True}, "sdxl"),
    ("QwenImage", {"is_wan": True}, "qwen"),
    ("ZImage", {}, "zimage"),
    ("StableDiffusion", {"is_sd1": True}, "sd1"),
])
def test_the_family_is_read_from_the_class_before_the_flags(name, flags, family):
    from lib_delta.hosts.forge import models as forge_models

    engine = type(name, (), flags)()
    assert forge_models.family_of(engine) == family


def test_an_sd1_source_steers_an_sdxl_target_with_neos_memory_budget(forge):
    source = forge.checkpoint("sd1", family="sd1", seed=0)
    lora = forge.lora("style", forge.load(source))
    target = forge.load(forge.checkpoint("xl", family="sdxl", seed=5))
    off = forge.generate(target)
    got = forge.run(target, source, {"loras": f"<lora:{lora}:1>"})
    assert torch.isfinite(got).all() and (got - off).abs().mean() > 1e-3
    calls = backend.load_calls[-1]
    assert calls["minimum_memory_required"] > calls["memory_required"] // 2 > 0  # our extra memory in both
    loaded = [ref() for ref in calls["models"]]
    assert any(m is not None and m.model.diffusion_model is not target.forge_objects.unet.model.diffusion_model
               for m in loaded)


def test_a_four_channel_source_on_a_sixteen_channel_target_is_refused_before_it_loads(forge, monkeypatch):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(forge.checkpoint("flux", family="flow", latent_format="flux", seed=2))
    fresh = forge.generate(target)
    loads = Loads(monkeypatch)
    status, message, _ = failure(lambda: forge.run(target, base, {"adapted_prompt": ADAPTED}))
    assert status == 422
    assert "'base' (SD1, 4 latent channels)" in message and "(Flux, 16 latent channels)" in message
    assert loads.engines == [] and torch.equal(forge.generate(target), fresh)
    assert forge.adapter.SLOT.get() is None


def test_latents_normalised_per_channel_are_not_converted_into_another_space(forge):
    flux = forge.checkpoint("flux", family="flow", latent_format="flux", seed=2)
    anima = forge.checkpoint("anima", family="flow", latent_format="flux", seed=3, neo_class="Anima")
    target = forge.load(anima)
    fresh = forge.generate(target)
    with pytest.raises(DeltaError) as err:
        forge.run(target, flux, {"adapted_prompt": ADAPTED})
    assert "'flux' (Flux) and the target 'Anima' (Anima)" in str(err.value) and err.value.status_code == 422
    assert torch.equal(forge.generate(target), fresh)
    # the same space is no conversion: the Anima-like model is its own source
    assert close(forge.run(target, anima, {"adapted_prompt": ADAPTED}), forge.generate(target, prompt=APPENDED))


@pytest.mark.parametrize(("spec", "label"), [({"family": "sd2v"}, "SD2.x"),
                                             ({"family": "flow", "latent_format": "sd3"}, "SD3/3.5")])
def test_sd2_and_sd3_sources_are_refused_before_neo_fails_to_load_them(forge, monkeypatch, spec, label):
    base = forge.checkpoint("base", family="sd1", seed=0)
    old = forge.checkpoint("old", seed=1, **spec)
    with pytest.raises(ModuleNotFoundError):  # what Neo's loader does with them
        forge.load(old)
    target = forge.load(base)
    loads = Loads(monkeypatch)
    status, message, _ = failure(lambda: forge.run(target, old, {"adapted_prompt": ADAPTED}))
    assert status == 422 and f"'old.safetensors' is an {label} checkpoint" in message and "Forge Neo" in message
    assert loads.engines == []


# --- the loaded-model list ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lora", [False, True])
def test_a_clone_someone_keeps_is_handed_back_to_the_targets_own_patcher(forge, monkeypatch, lora):
    """Neo's entry for the target's UNet holds our clone weakly and turns to the clone's parent when it dies; one
    kept alive by another extension is handed back at the end of the run, as Neo would on its death, and stays with
    the target's patcher when the clone dies later (with a LoRA in the prompt, Neo's own patcher is itself a clone,
    networks.py:137-151, whose parent lacks the LoRA)."""
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    if lora:
        target.forge_objects.unet = target.forge_objects_original.unet.clone()
        target.forge_objects_after_applying_lora = target.forge_objects.shallow_copy()
    own = target.forge_objects_after_applying_lora.unet
    kept = []
    real_arm = forge.adapter.ForgeRun.arm
    monkeypatch.setattr(forge.adapter.ForgeRun, "arm",
                        lambda run, p, x: (real_arm(run, p, x), kept.append(p.sd_model.forge_objects.unet)))
    forge.run(target, base, {"adapted_prompt": ADAPTED})
    (clone,) = kept
    assert clone is not own and clone.parent is own
    entries = [e for e in backend.current_loaded_models if e.model is not None and e.model.model is own.model]
    assert [e.model for e in entries] == [own]
    assert not clone.model_options["sampler_post_cfg_function"]  # stripped, in case it is used again
    assert clone.extra_model_patchers_during_sampling == []
    del clone, kept[:]
    entries = [e for e in backend.current_loaded_models if e.model is not None and e.model.model is own.model]
    assert [e.model for e in entries] == [own]


def test_a_released_source_leaves_neos_list_and_dies_by_reference_counting(forge, monkeypatch,
                                                                          no_cycle_collection):
    """Neo reports a loaded module whose patcher is gone as a potential leak and collects; a released source leaves
    no entry behind, and its engine dies with the cycle collector off."""
    a = forge.checkpoint("a", family="sd1", seed=0)
    b = forge.checkpoint("b", family="sd1", seed=1)
    target = forge.load(a)
    webui.opts.delta_sampling_cache = "free"
    loads = Loads(monkeypatch)
    for name in (a, b, a):
        forge.run(target, name, {"adapted_prompt": ADAPTED})
        assert _cached() == [] and loads.alive() == 0
    forge.generate(target)  # Neo's load_models_gpu looks for dead entries first
    assert all(e.model is not None for e in backend.current_loaded_models), "an entry whose patcher is gone"
    assert [e.model for e in backend.current_loaded_models] == [target.forge_objects.unet,
                                                                 target.forge_objects.clip.patcher]
    assert neo_flavour.leak_reports == []


def test_a_kept_source_is_unloaded_with_its_weights_moved_and_released_without(forge):
    """Neo's ``model_unload(unpatch_weights=...)``: the "ram" policy moves a kept source to the offload device
    (detach with unpatching), a release only detaches it (its weights are emptied next)."""
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    forge.run(target, base, {"adapted_prompt": ADAPTED})
    (entry,) = _cached()
    unet = entry.unet
    assert unet.detaches and unet.detaches[-1] is True
    assert not any(e.model is unet for e in backend.current_loaded_models)
    webui.opts.delta_sampling_cache = "free"
    forge.run(target, base, {"adapted_prompt": ADAPTED})
    assert _cached() == []


# --- files ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_the_stand_in_reads_pickles_as_neo_does(forge, tmp_path, how):
    """Neo's loader unpickles with torch's weights-only loader (the payload never runs) and its torch.load wrapper
    renames the file it failed to read: why a pickled source is refused before Neo reads it."""
    marker = tmp_path / "ran"
    path = plant(tmp_path / "evil.ckpt", marker, how)
    with pytest.raises(BufferError):
        backend.forge_loader(str(path))
    assert not marker.exists() and not path.exists() and Path(f"{path}.corrupted").exists()


def test_a_pickled_source_keeps_its_name_and_the_refusal_says_why_on_neo(forge, tmp_path):
    marker = tmp_path / "ran"
    path = plant(tmp_path / "evil.ckpt", marker, "torch.save")
    webui.add_checkpoint(str(path))
    target = forge.load(forge.checkpoint("base", family="sd1", seed=0))
    status, message, _ = failure(lambda: forge.run(target, "evil", {"adapted_prompt": ADAPTED}))
    assert status == 422 and "Forge Neo would unpickle it" in message and "convert it to .safetensors" in message
    assert path.exists() and not marker.exists()


def test_an_unrecognised_source_is_a_clear_refusal(forge, tmp_path):
    save_file({"model.diffusion_model.odd.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    webui.add_checkpoint(str(tmp_path / "odd.safetensors"))
    target = forge.load(forge.checkpoint("base", family="sd1", seed=0))
    status, message, _ = failure(lambda: forge.run(target, "odd", {"adapted_prompt": ADAPTED}))
    assert status == 422 and "ModuleNotFoundError: Failed to recognize model" in message
    assert _cached() == []

