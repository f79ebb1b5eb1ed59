"""Forge 2 host adapter: the source as private engines, the delta in a post-CFG function on a clone of the UNet.

Forge never fires ``cfg_denoised``; its post-CFG function sees the CFG-combined x0 before the inpaint blend, which
the core corrects through ``DeltaGuidance.apply_combined``. Each sampling pass clones the target's UNet patcher and
gives the clone the post-CFG function, a conditioning modifier that records the scale Forge really uses for the
call, the source UNets as extra models (so Forge's memory manager loads them beside the target, with their
activation memory budgeted) — and nothing else: the clone is dropped with the pass. Conditioning is computed
before sampling, never inside the per-step function (loading a text encoder there can evict the target's UNet).
"""

from __future__ import annotations

import math
import time
import traceback
from typing import Any

from ...args import DeltaSettings
from ...errors import DeltaError
from ...guidance import CfgLayout, DeltaGuidance
from ...schedule import ProgressClock
from ...spaces import ModelSpace, SpaceBridge, check_latent_compatible
from ..common.http import as_failure, as_http_exception
from . import models as forge_models
from . import source as forge_source
from .source import ForgeSource

_MARK = "delta_sampling"  # set on our post-CFG function, to find it on a UNet patcher
_run: ForgeRun | None = None  # the generation in progress (the WebUI runs one at a time)


def register() -> None:
    from modules import script_callbacks

    from ...webui.interfaces import register_interfaces

    register_interfaces()
    script_callbacks.on_script_unloaded(forge_models.forget_all)


def begin(p: Any) -> None:
    """A generation starts: close the previous one, whatever ended it."""
    finish(p)


def start(p: Any, settings: DeltaSettings) -> None:
    global _run
    finish(p)
    try:
        run = ForgeRun(p, settings)
    except DeltaError:
        raise
    except Exception as e:  # a bug must not let the generation go on silently without the delta
        traceback.print_exc()
        raise _unexpected("could not prepare the source", e) from e
    _run = run
    p.extra_generation_params.update(settings.to_infotext())


def fail(p: Any, error: Exception) -> None:
    """Stop this generation with ``error``: script hooks' exceptions are only logged, the sampler's are not."""
    finish(p)
    error = as_http_exception(as_failure(error))
    print(f"Delta Sampling: {error}")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise error

    p.sample = refuse
    sampler = getattr(p, "sampler", None)
    if sampler is not None:  # a pass already under way: refuse before it samples
        sampler.sample = sampler.sample_img2img = refuse


def before_sampling(p: Any, **kwargs: Any) -> None:
    run = _run
    if run is None or run.p is not p:
        return
    try:
        run.arm(p, kwargs.get("x"))
    except DeltaError as e:
        fail(p, e)
    except Exception as e:
        traceback.print_exc()
        fail(p, _unexpected("could not arm the sampler", e))


def finish(p: Any, processed: Any = None) -> None:
    global _run
    run, _run = _run, None
    if run is None:
        return
    try:
        if processed is not None and run.settings.preview:
            run.append_preview(processed)
    finally:
        run.close()


class ForgeRun:
    """One generation: its settings, the source, and the per-pass guidance. Created by start(), dropped by finish()."""

    def __init__(self, p: Any, settings: DeltaSettings) -> None:
        self.p = p
        self.settings = settings
        self.started = time.perf_counter()
        self.source: ForgeSource = forge_source.build(settings)
        self.source.attach()
        self.guidance: DeltaGuidance | None = None
        self.pass_key: tuple | None = None
        self.notes: list[str] = []
        self.armed: list[Any] = []  # target models whose UNet got our hook
        self.records: list = []  # preview records of every pass

    # -- one sampling pass -------------------------------------------------------------------------------------

    def arm(self, p: Any, x: Any) -> None:
        """Set up the pass about to run; hires fix calls this twice per pass, the second time on a fresh UNet."""
        target = p.sd_model
        key = (getattr(p, "iteration", 0), bool(getattr(p, "is_hr_pass", False)), id(target))
        if key != self.pass_key:
            bridge = self._bridge(target)
            levels = sampling_levels(p)
            self.source.encode(p)
            self.guidance = DeltaGuidance(self.settings, bridge, self.source,
                                          ProgressClock(levels, log_space=bridge.target.convention == "ve"),
                                          record=self.settings.preview)
            self.guidance.records = self.records  # one strip over all passes
            if self.guidance.trajectory is not None and _starts_from_image(p) and x is not None:
                self.guidance.trajectory.init_x0 = x
            self.pass_key = key
        self.source.denoiser = p.sampler.model_wrap_cfg
        unet = target.forge_objects.unet
        if _carries_hook(unet):
            return  # this UNet already carries the hook
        unet = unet.clone()
        for patcher in self.source.patchers():
            unet.add_extra_model_patcher_during_sampling(patcher)
        if x is not None:
            unet.add_extra_preserved_memory_during_sampling(self.source.extra_memory(tuple(x.shape), unet))
        unet.add_conditioning_modifier(self._scale_recorder())
        unet.set_model_sampler_post_cfg_function(self._post_cfg_function())
        target.forge_objects.unet = unet
        if target not in self.armed:
            self.armed.append(target)

    def _bridge(self, target: Any) -> SpaceBridge:
        source = self.source.base.engine
        src, tgt = self.source.base.latent, forge_models.latent_format(target)
        src_name, tgt_name = self.source.base.title, forge_models.model_label(target)
        check_latent_compatible(src, tgt, src_name, tgt_name)
        if not forge_models.same_latent_space(source, target):
            note = f"{src.name}->{tgt.name} via the unscaled latent (different VAEs: approximate)"
            if note not in self.notes:
                self.notes.append(note)
                print(f"Delta Sampling: warning: the source '{src_name}' ({src.name}) and the target '{tgt_name}' "
                      f"({tgt.name}) have different VAEs; the source sees the target's latent converted through "
                      "the unscaled latent, an approximation.")
            self.p.extra_generation_params["Delta latent conversion"] = "; ".join(self.notes)
        return SpaceBridge(ModelSpace(src, forge_models.convention(source), sigma_max=forge_models.sigma_max(source)),
                           ModelSpace(tgt, forge_models.convention(target)))

    def _scale_recorder(self):
        source = self.source

        def record(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            # Forge decides the scale after the denoiser callback (hires CFG, skip-early-CFG, NGMS); see it here.
            source.cond_scale = float(cond_scale)
            source.skip_uncond = uncond is None or (math.isclose(cond_scale, 1.0)
                                                    and not model_options.get("disable_cfg1_optimization", False))
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed

        return record

    def _post_cfg_function(self):
        # a plain function, not a bound method: Forge deep-copies model_options on every clone, and a bound method
        # would be copied together with this run
        def post_cfg(args: dict) -> Any:
            return self.correct(args)

        setattr(post_cfg, _MARK, True)
        return post_cfg

    def correct(self, args: dict) -> Any:
        denoised, x, sigma = args["denoised"], args["input"], args["sigma"]
        guidance = self.guidance
        if guidance is None:  # a clone that outlived its generation
            return denoised
        layout = CfgLayout.simple(denoised.shape[0], self.source.cond_scale)
        if guidance.apply_combined(x, sigma, denoised, layout) and guidance.record:
            from ... import preview

            preview.compact(guidance.records)
        guidance.after_combine(x, sigma, denoised)
        return denoised

    # -- end of the generation ---------------------------------------------------------------------------------

    def close(self) -> None:
        for target in self.armed:  # as Forge does at the next batch: our clone (and the source it holds) goes
            if _carries_hook(target.forge_objects.unet):
                target.forge_objects = target.forge_objects_after_applying_lora.shallow_copy()
        self.armed.clear()
        self.source.detach()
        forge_models.settle({s.entry.key for s in self.source.slots})
        seconds = time.perf_counter() - self.started
        loras = self.source.lora_summary()
        print(f"{self.settings.summary()}; {self.source.calls} source calls; {seconds:.1f}s"
              + (f"; LoRA {loras}" if loras else ""))
        self.guidance = None

    def append_preview(self, processed: Any) -> None:
        from ... import preview

        target = self.guidance.bridge.target.latent.name if self.guidance is not None else None
        strip = preview.render(self.records, self.source.base.latent.name, target)
        if strip is None:
            return
        preview.append_to(processed, strip)


def sampling_levels(p: Any) -> list[float]:
    """The noise levels the sampler of the coming pass walks, in the units Forge's post-CFG function sees."""
    import torch
    from modules import sd_samplers_common

    sampler = p.sampler
    hr = bool(getattr(p, "is_hr_pass", False))
    requested = (p.hr_second_pass_steps or p.steps) if hr else None
    from_image = _starts_from_image(p)
    if hasattr(sampler, "get_sigmas"):  # k-diffusion samplers
        if not from_image:
            return sampler.get_sigmas(p, p.steps).tolist()
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, requested)
        return sampler.get_sigmas(p, steps)[steps - t_enc - 1:].tolist()
    if hasattr(sampler, "get_timesteps"):  # DDIM, PLMS, UniPC...: Forge's denoiser turns timesteps into sigmas
        if from_image:
            steps, t_enc = sd_samplers_common.setup_img2img_steps(p, requested)
            timesteps = sampler.get_timesteps(p, steps)[:t_enc]
        else:
            timesteps = sampler.get_timesteps(p, p.steps)
        sigmas = p.sd_model.forge_objects.unet.model.predictor.sigmas.to(timesteps.device)
        return [*torch.flip(sigmas[timesteps.long()], (0,)).tolist(), 0.0]
    raise DeltaError(f"Delta Sampling does not know the sampler {type(sampler).__name__}; use a k-diffusion "
                     "sampler (Euler, DPM++ ...) or DDIM/PLMS/UniPC.")


def _unexpected(what: str, e: Exception) -> DeltaError:
    error = DeltaError(f"Delta Sampling {what} ({type(e).__name__}: {e}).")
    error.status_code = 500
    return error


def _carries_hook(unet: Any) -> bool:
    return any(getattr(f, _MARK, False) for f in unet.model_options.get("sampler_post_cfg_function", []))


def _starts_from_image(p: Any) -> bool:
    """img2img and the hires pass start from a partly noised image (a truncated schedule)."""
    return bool(getattr(p, "is_hr_pass", False)) or hasattr(p, "init_images")
