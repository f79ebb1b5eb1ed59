"""Forge host adapter (Forge 2 and Forge Neo): the source as private engines, the delta in a post-CFG function on a
clone of the UNet.

Neo keeps the Forge 2 API this adapter calls and changes what lies beneath it; where the two differ the parts ask
``hosts.is_neo()`` or what the API offers: the latent scale (:mod:`.models`), the global flags the loader resets and
the infotext the text encoder records (:mod:`.isolation`), the loaded-model list (:mod:`.memory`), the prompt
parser's arguments (:mod:`.source`).

Forge never fires ``cfg_denoised``; its post-CFG function sees the CFG-combined x0 before the inpaint blend, which
the core corrects through ``DeltaGuidance.apply_combined``. Each sampling pass clones the target's UNet patcher and
gives the clone the post-CFG function, a conditioning modifier that records the scale Forge really uses for the
call, the source UNets as extra models (so Forge's memory manager loads them beside the target, with their
activation memory budgeted) — and nothing else: the clone is dropped with the run. Conditioning is computed
before sampling, never inside the per-step function (loading a text encoder there can evict the target's UNet).

Per generation there is one :class:`ForgeRun`, created by :func:`start` and held by the host's run slot
(:mod:`lib_delta.hosts.common.runs`), which closes it at :func:`finish`, at the next generation's :func:`begin`, or
when anything raises while a guarded sampler samples (:mod:`.guard`). Closing takes every clone of ours off the target
and out of Forge's loaded-model list, so nothing of the run outlives it.
"""

from __future__ import annotations

import math
import time
import traceback
import weakref
from typing import Any

from ...args import DeltaSettings
from ...errors import DeltaError
from ...guidance import CfgLayout, DeltaGuidance
from ...schedule import ProgressClock
from ...spaces import ModelSpace, SpaceBridge, check_latent_compatible
from .. import is_neo
from ..common import credits as credits_mod
from ..common.http import as_failure, as_http_exception
from ..common.runs import RunSlot
from . import control as forge_control
from . import guard as guard_mod
from . import ipadapter as forge_ip
from . import memory as forge_memory
from . import models as forge_models
from . import source as forge_source
from .source import ForgeSource

_MARK = "delta_sampling"  # set on our post-CFG function, to find it on a UNet patcher
SLOT = RunSlot()  # the generation in progress (the WebUI runs one at a time)


def register() -> None:
    from modules import script_callbacks

    from ...webui.interfaces import register_interfaces

    register_interfaces()
    script_callbacks.on_script_unloaded(forget_all)


def forget_all() -> None:
    """The scripts are being reloaded: close the run and release every engine."""
    SLOT.close()
    forge_models.forget_all()
    forge_control.forget_all()
    forge_ip.forget_all()


def begin(p: Any) -> None:
    """A generation starts: close the previous one, whatever ended it (Forge skips ``postprocess`` after a failure)."""
    SLOT.close()


def start(p: Any, settings: DeltaSettings) -> None:
    """Check every name, limit and file, then load the source and adaptations and write the infotext. A start that
    fails releases whatever it loaded."""
    request = forge_source.plan(settings, p)
    forge_models.prepare(request.keys)
    forge_control.prepare(request.control_keys)
    forge_ip.prepare(request.image_keys)
    try:
        run = ForgeRun(p, settings, forge_source.build(settings, request, p))
    except BaseException:
        forge_models.discard_fresh()
        forge_control.discard_fresh()
        forge_ip.discard_fresh()
        forge_models.settle(request.keys)
        forge_control.settle(request.control_keys)
        forge_ip.settle(request.image_keys)
        raise
    run.credits = request.credits
    SLOT.open(p, run)
    p.extra_generation_params = run.credits.into({**p.extra_generation_params, **settings.to_infotext()})


def fail(p: Any, error: BaseException) -> None:
    """Stop this generation with ``error``, a 422 for a DeltaError and a 500 for anything else: script hooks'
    exceptions are only logged, the sampler's are not, so the sampling itself raises it."""
    SLOT.close()
    if not isinstance(error, DeltaError):
        traceback.print_exception(type(error), error, error.__traceback__)
    error = _detached(as_http_exception(as_failure(error)))
    print(f"Delta Sampling: {error}")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise error

    p.sample = refuse
    sampler = getattr(p, "sampler", None)
    if sampler is not None:  # a pass already under way: refuse before it samples
        sampler.sample = sampler.sample_img2img = refuse


def _detached(error: BaseException) -> BaseException:
    """The error without its tracebacks (printed already): kept on ``p`` until it is raised, it would otherwise hold
    every frame it passed through, the failed run's among them, and ``p`` itself in a cycle."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        e.__traceback__ = None
        e = e.__cause__ or e.__context__
    return error


def before_sampling(p: Any, **kwargs: Any) -> None:
    """Arm the per-step correction for this pass (``process_before_every_sampling``)."""
    run = SLOT.get(p)
    if run is None:
        return
    # again now that Forge's LoRA support has written its "Lora hashes" for this pass
    p.extra_generation_params = run.credits.into(p.extra_generation_params)
    try:
        run.arm(p, kwargs.get("x"))
    except Exception as e:
        fail(p, e)


def after_sampling(p: Any) -> None:
    """The last batch is sampled (``post_sample``, before the VAE decodes it): close the run now, so that the source
    leaves Forge's loaded models before the decode needs the memory, and a decode that fails leaves nothing of the
    run behind (``postprocess`` is skipped then). ``finish`` still adds the preview from what the run kept."""
    run = SLOT.get(p)
    if run is not None and getattr(p, "iteration", 0) >= getattr(p, "n_iter", 1) - 1:
        run.close()


def finish(p: Any, processed: Any = None) -> None:
    """The generation ended (``postprocess``): add the preview and close the run."""
    run = SLOT.take(p)
    if run is None:
        return
    try:
        if processed is not None and run.settings.preview:
            run.append_preview(processed)
    finally:
        run.close()


class ForgeRun:
    """One generation: its settings, the source, and the per-pass guidance. Created by start(), closed by the slot."""

    def __init__(self, p: Any, settings: DeltaSettings, source: ForgeSource) -> None:
        self.p = p
        self.settings = settings
        self.credits = credits_mod.Credits()  # the source's resources, for the infotext's hash keys
        self.started = time.perf_counter()
        self.source = source
        try:
            self.source.attach()
        except BaseException:
            self.source.detach()
            raise
        self.guidance: DeltaGuidance | None = None
        self.pass_key: tuple | None = None
        self.notes: list[str] = []
        self.armed: list[Any] = []  # target models whose UNet got our hook
        # the UNet patchers we cloned (one per pass) and the samplers we guarded, weakly: with a batch count above
        # one, each batch's sampler and clone would otherwise stay until the end, holding what they sampled with
        self.clones: list[weakref.ref] = []
        self.samplers: list[weakref.ref] = []
        self.records: list = []  # preview records of every pass
        self.target_latent: str | None = None  # the preview's target label, kept past close()
        self.hints: list = []  # the units' control maps for the preview, kept past close()
        self.layout: CfgLayout | None = None  # the coming model call's, set just before the target's forward
        self.beside = False  # the source computes on a GPU of its own, started before the target's forward
        self.calls_beside = 0  # source calls of the finished passes that ran beside the target's forward
        self.closed = False

    # -- one sampling pass -------------------------------------------------------------------------------------

    def arm(self, p: Any, x: Any) -> None:
        """Set up the pass about to run; hires fix calls this twice per pass, the second time on a fresh UNet."""
        target = p.sd_model
        key = (getattr(p, "iteration", 0), bool(getattr(p, "is_hr_pass", False)), id(target))
        if key != self.pass_key:
            self._count_beside()
            bridge = self._bridge(target)
            levels = sampling_levels(p)
            self.source.encode(p, self.settings.source_resolution)
            self.source.begin_pass(p)
            self.guidance = DeltaGuidance(self.settings, bridge, self.source,
                                          ProgressClock(levels, log_space=bridge.target.convention == "ve"),
                                          record=self.settings.preview)
            self.guidance.records = self.records  # one strip over all passes
            if self.guidance.trajectory is not None and _starts_from_image(p) and x is not None:
                self.guidance.trajectory.init_x0 = x
            self.pass_key = key
        self.source.denoiser = p.sampler.model_wrap_cfg
        if all(ref() is not p.sampler for ref in self.samplers):
            guard_mod.guard(p.sampler, on_failure=SLOT.close)
            self.samplers.append(weakref.ref(p.sampler))
        unet = target.forge_objects.unet
        self.beside = forge_memory.runs_beside(self.source.base.unet.load_device, unet.load_device)
        if self.beside and x is not None:  # on its own GPU, budgeted there: nothing of it on the target's
            forge_memory.load_beside(self.source.patchers(),
                                     self.source.activations(tuple(x.shape)) + self.source.patch_bytes())
        if _carries_hook(unet):
            return  # this UNet already carries the hook
        unet = unet.clone()
        self.clones.append(weakref.ref(unet))
        if not self.beside:  # loaded beside the target, with the activations it adds to the target's budgeted
            for patcher in self.source.patchers():
                unet.add_extra_model_patcher_during_sampling(patcher)
            if x is not None:
                unet.add_extra_preserved_memory_during_sampling(self.source.extra_memory(tuple(x.shape), unet))
        unet.add_conditioning_modifier(self._call_modifier())
        unet.set_model_sampler_post_cfg_function(self._post_cfg_function())
        target.forge_objects.unet = unet
        if target not in self.armed:
            self.armed.append(target)

    def _count_beside(self) -> None:
        if self.guidance is not None:
            self.calls_beside += self.guidance.prefetched

    def _bridge(self, target: Any) -> SpaceBridge:
        source = self.source.base.engine
        src, tgt = self.source.base.latent, forge_models.latent_format(target)
        src_name, tgt_name = self.source.base.title, forge_models.model_label(target)
        check_latent_compatible(src, tgt, src_name, tgt_name, forge_models.sources_for(target))
        forge_models.check_convertible(source, target, src_name, tgt_name)
        if not forge_models.same_latent_space(source, target):
            note = f"{src.name}->{tgt.name} via the unscaled latent (different VAEs: approximate)"
            if note not in self.notes:
                self.notes.append(note)
                print(f"Delta Sampling: warning: the source '{src_name}' ({src.name}) and the target '{tgt_name}' "
                      f"({tgt.name}) have different VAEs; the source sees the target's latent converted through "
                      "the unscaled latent, an approximation.")
            self.p.extra_generation_params["Delta latent conversion"] = "; ".join(self.notes)
        return SpaceBridge(ModelSpace(src, forge_models.convention(source), sigma_max=forge_models.sigma_max(source),
                                      native_px=self.source.base.native_px),
                           ModelSpace(tgt, forge_models.convention(target)))

    def _call_modifier(self):
        run = weakref.ref(self)  # the clone may outlive the run: it must not keep it alive

        def modify(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            current = run()
            if current is not None:
                current.before_call(x, timestep, uncond, float(cond_scale), model_options)
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed

        setattr(modify, _MARK, True)
        return modify

    def before_call(self, x: Any, sigma: Any, uncond: Any, cond_scale: float, model_options: dict) -> None:
        """A conditioning modifier, just before the target's forward: Forge has decided the call's scale by then
        (hires CFG, skip-early-CFG, NGMS). Lays out the call, and starts the source's prediction on its own GPU."""
        source = self.source
        source.cond_scale = cond_scale
        if skips_cfg(source.denoiser, sigma):
            # Forge runs this call unguided by its own choice: so does the source, whatever its scale, as in
            # AUTOMATIC1111, whose denoiser puts each image's cond row in place of the skipped uncond
            source.skip_uncond = True
            self.layout = CfgLayout.from_conds_list([[(i, 1.0)] for i in range(x.shape[0])], 1.0,
                                                    uncond_from_cond=True)
        else:
            # At CFG 1 Forge encodes no negative prompt and skips the target's uncond; the source (which encodes its
            # own) skips its uncond only if it too combines at 1: base-first guides a distilled target's source at
            # its own scale.
            cfg1 = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
            source.skip_uncond = (uncond is None or cfg1) and math.isclose(self.settings.source_cfg_for(cond_scale),
                                                                           1.0)
            self.layout = CfgLayout.simple(x.shape[0], cond_scale)
        if self.beside and self.guidance is not None:
            self.guidance.prefetch_combined(x, sigma, self.layout)

    def _post_cfg_function(self):
        # a plain function holding the run weakly: Forge deep-copies model_options on every clone (a function is
        # copied as itself), and a clone kept by anyone must not keep the run and its source alive
        run = weakref.ref(self)

        def post_cfg(args: dict) -> Any:
            current = run()
            return args["denoised"] if current is None else current.correct(args)

        setattr(post_cfg, _MARK, True)
        return post_cfg

    def correct(self, args: dict) -> Any:
        denoised, x, sigma = args["denoised"], args["input"], args["sigma"]
        guidance = self.guidance
        if guidance is None:  # a clone that outlived its generation
            return denoised
        layout = self.layout
        if layout is None or layout.batch != denoised.shape[0]:  # no modifier ran: another extension replaced ours
            layout = CfgLayout.simple(denoised.shape[0], self.source.cond_scale)
        if guidance.apply_combined(x, sigma, denoised, layout) and guidance.record:
            from ... import preview

            preview.compact(guidance.records)
        guidance.after_combine(x, sigma, denoised)
        return denoised

    # -- end of the generation ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Unguard the samplers, take every clone of ours off the targets and out of Forge's loaded-model list,
        detach the LoRA patches and settle the pool; idempotent, whatever ended the run."""
        if self.closed:
            return
        self.closed = True
        ours = self.source.patchers()
        self._count_beside()
        samplers, clones = _alive(self.samplers), _alive(self.clones)
        try:
            for sampler in samplers:
                guard_mod.unguard(sampler)
            for target in self.armed:  # as Forge does at the next batch: our clone (and the source it holds) goes
                if _carries_hook(target.forge_objects.unet):
                    target.forge_objects = target.forge_objects_after_applying_lora.shallow_copy()
            _drop_loaded_clones(clones, self.armed)
            for clone in clones:
                _strip(clone, ours)
            self.source.detach()
        finally:
            if self.guidance is not None:
                self.target_latent = self.guidance.bridge.target.latent.name
            keys = [s.entry.key for s in self.source.slots]
            control_keys = forge_control.keys(u.plan for u in self.source.units())
            units = forge_control.describe(self.source.units())
            image_keys = forge_ip.keys(p for g in self.source.image_prompts() for p in g.plans)
            images = forge_ip.describe(self.source.image_prompts())
            if self.settings.preview:
                self.hints = _hints(self.source.units())
            self.source.release_units()
            self.samplers, self.armed, self.clones = [], [], []
            self.guidance, self.layout, self.source.denoiser, self.p = None, None, None, None
            forge_models.settle(keys)
            forge_control.settle(control_keys)
            forge_ip.settle(image_keys)
        seconds = time.perf_counter() - self.started
        loras = self.source.lora_summary()
        for slot in self.source.slots:  # detached: its terms would only hold memory until the run object goes
            slot.patch = None
        device = self.source.base.unet.load_device
        beside = f" ({self.calls_beside} beside the target on {device})" if self.calls_beside else ""
        print(f"{self.settings.summary()}; {self.source.calls} source calls{beside}; {seconds:.1f}s"
              + (f"; LoRA {loras}" if loras else "") + (f"; ControlNet on the adapted rows: {units}" if units else "")
              + (f"; IP-Adapter on the adapted rows: {images}" if images else ""))

    def append_preview(self, processed: Any) -> None:
        from ... import preview

        target = self.guidance.bridge.target.latent.name if self.guidance is not None else self.target_latent
        strip = preview.render(self.records, self.source.base.latent.name, target, self.hints)
        if strip is None:
            return
        preview.append_to(processed, strip)


def _hints(units: Any) -> list:
    """The units' control maps for the preview, taken before the units are released (releasing drops them)."""
    try:
        return [u.shown_hint() for u in units]
    except Exception as e:
        print(f"Delta Sampling: no control maps in the preview ({type(e).__name__}: {e})")
        return []


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


def skips_cfg(denoiser: Any, sigma: Any) -> bool:
    """Whether Forge's CFG denoiser runs this call at scale 1 by its own choice: skip-early-CFG or NGMS
    (modules/sd_samplers_cfg_denoiser.py:190-197 of Forge 2; Neo never skips the first step, and takes NGMS only
    above σ = 0)."""
    from modules import shared

    opts = shared.opts
    step, total = int(getattr(denoiser, "step", 0)), int(getattr(denoiser, "total_steps", 0) or 0)
    first_too = not is_neo()
    early = float(getattr(opts, "skip_early_cond", 0.0) or 0.0)
    if early > 0 and total and (step > 0 or first_too) and step / total <= early:
        return True
    extra = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", None) or {}
    s_min = float(extra.get("s_min_uncond") or 0.0)
    if s_min <= 0 or not (step % 2 or getattr(opts, "s_min_uncond_all", False)):
        return False
    level = float(sigma.reshape(-1)[0])
    return level < s_min and (level > 0 or first_too)


def _alive(refs: list[weakref.ref]) -> list[Any]:
    return [o for o in (ref() for ref in refs) if o is not None]


def _carries_hook(unet: Any) -> bool:
    return any(getattr(f, _MARK, False) for f in unet.model_options.get("sampler_post_cfg_function", []))


def _drop_loaded_clones(clones: list[Any], targets: list[Any]) -> None:
    """Forge's loaded-model list keeps the last UNet patcher it sampled with (our clone, or another extension's
    clone of it) until a clone of the same module loads. Each such entry is handed the target's own patcher of the
    same module, as loading that would (memory_management.py:552-559, unload_model_clones), but without moving a
    weight: Forge's accounting of the loaded module stays as it is, and our clone goes."""
    loaded = forge_memory.entries()
    for i in range(len(loaded) - 1, -1, -1):
        patcher = loaded[i].model
        if patcher is None or not (_carries_hook(patcher) or any(patcher is c for c in clones)):
            continue
        own = next((t.forge_objects.unet for t in targets if t.forge_objects.unet.model is patcher.model), None)
        if own is None or any(entry.model is own for entry in loaded):
            forge_memory.unload(loaded.pop(i), move_weights=False)
        else:
            forge_memory.hand_over(loaded[i], own)


def _strip(unet: Any, ours: list[Any]) -> None:
    """Our functions and extra models off a clone, in case anything still holds it."""
    options = unet.model_options
    for key in ("sampler_post_cfg_function", "conditioning_modifiers"):
        if key in options:
            options[key] = [f for f in options[key] if not getattr(f, _MARK, False)]
    unet.extra_model_patchers_during_sampling = [m for m in unet.extra_model_patchers_during_sampling
                                                 if all(m is not o for o in ours)]


def _starts_from_image(p: Any) -> bool:
    """img2img and the hires pass start from a partly noised image (a truncated schedule)."""
    return bool(getattr(p, "is_hr_pass", False)) or hasattr(p, "init_images")
