"""AUTOMATIC1111 1.10 host: the functions ``scripts/delta_sampling.py`` calls (see ``lib_delta.hosts``).

Per generation there is one :class:`Run`, created by :func:`start` and held by the host's run slot
(:mod:`lib_delta.hosts.common.runs`), which closes it at :func:`finish`, at the next generation's :func:`begin`, or
when anything raises inside its sampling; per sampling pass (hires fix has two) one
:class:`~lib_delta.hosts.a1111.step.Pass`. The per-step work happens in
two global callbacks, ``cfg_denoiser`` (remember the rows' inputs) and ``cfg_denoised`` (add the delta to every row
before the WebUI's CFG combine and inpaint blend, in place); they act only for the sampler a pass was armed on.

Failing loudly: the WebUI only prints exceptions raised inside script hooks and callbacks, so an error is kept on
``p`` (or on the pass) and raised from the guarded ``sample``/``sample_img2img`` of that pass's own sampler
object, which stops the generation; the API returns it with ``status_code``/``detail`` (422 for a
:class:`~lib_delta.errors.DeltaError`, 500 for anything unforeseen).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from ...args import DeltaSettings
from ...cuda_graph import GraphedCall, storage_fingerprint
from ...errors import DeltaError
from ...resolution import native_side
from ...spaces import SD1, SD2, SD3, SDXL, ModelSpace, check_latent_compatible
from ..common import credits as credits_mod
from ..common.files import checkpoint_family
from ..common.http import as_failure
from ..common.runs import RunSlot
from . import conds as conds_mod
from . import control as control_mod
from . import ipadapter as ip_mod
from . import source as source_mod
from . import step as step_mod
from .control_rows import RowControl
from .ip_rows import RowImagePrompt

ERROR_ATTR = "delta_sampling_error"
SLOT = RunSlot()  # the generation in progress (the WebUI runs one at a time)
_FAMILY_FORMATS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "sdxl-refiner": SDXL, "sd3": SD3}
_LOADABLE = (SD1, SD2, SDXL, SD3)  # the model families AUTOMATIC1111 1.10 loads (no Flux)


# --- registration ------------------------------------------------------------------------------------------------


def register() -> None:
    """Per-step callbacks, the settings section and the X/Y/Z axes. The WebUI clears all callbacks when it
    reloads scripts (and then re-imports the script file, which calls this again), so the callbacks' presence is
    checked in its own lists rather than remembered."""
    from modules import script_callbacks

    from ...webui import interfaces as a1111_interfaces

    for kind, fn in (("cfg_denoiser", _on_cfg_denoiser), ("cfg_denoised", _on_cfg_denoised)):
        registered = script_callbacks.callback_map.get(f"callbacks_{kind}", [])
        if not any(getattr(c, "callback", None) is fn for c in registered):
            getattr(script_callbacks, f"on_{kind}")(fn, name=f"delta_sampling_{kind}")
    a1111_interfaces.register_interfaces()


def _on_cfg_denoiser(params: Any) -> None:
    d = getattr(params, "denoiser", None)
    run = SLOT.get(getattr(d, "p", None))
    ps = run.current if run is not None else None
    if ps is None or ps.sampler is not getattr(d, "sampler", None) or ps.error is not None:
        return
    try:
        ps.before_call(params)
    except BaseException as e:
        ps.abort(e)


def _on_cfg_denoised(params: Any) -> None:
    ps = vars(params.inner_model).get(step_mod.PASS_ATTR) if hasattr(params.inner_model, "__dict__") else None
    if ps is None or ps.call is None or ps.error is not None:
        return
    try:
        ps.after_call(params)
    except step_mod.Abort:
        raise
    except BaseException as e:
        ps.abort(e)


# --- per generation ------------------------------------------------------------------------------------------------


@dataclass
class Group:
    """One adaptation group, resolved: its fine-tuned checkpoint (if any) and its LoRA terms."""

    checkpoint: source_mod.PrivateModel | None


@dataclass(eq=False)
class Run:
    """Everything one generation holds. :meth:`close` drops it all and settles the pool, whatever ended the run."""

    settings: DeltaSettings
    source: source_mod.PrivateModel
    groups: list[Group]
    device: Any
    lora: Any = None  # a1111_lora.Adapter or None
    setup_seconds: float = 0.0
    passes: list[step_mod.Pass] = field(default_factory=list)
    current: step_mod.Pass | None = None
    graphs: dict[int, GraphedCall] | None = None  # the source's forward per model, replayed as a CUDA graph
    wrappers: dict[int, Any] = field(default_factory=dict)  # per model: its x0 wrapper
    units: list[control_mod.LoadedUnit] = field(default_factory=list)  # ControlNet units, in group order
    controls: dict[int, RowControl] = field(default_factory=dict)  # per model with units: its row hooks
    ip_units: list[ip_mod.LoadedIPUnit] = field(default_factory=list)  # IP-Adapter units, in group order
    images: dict[int, RowImagePrompt] = field(default_factory=dict)  # per model with IP-Adapter units: its hooks
    log: list[str] = field(default_factory=list)  # what the generation's log line reports, kept past close()
    credits: credits_mod.Credits = field(default_factory=credits_mod.Credits)  # the source's, for the hash keys
    records: list = field(default_factory=list)  # the preview's records, kept past close()
    target_latent: str | None = None
    hints: list = field(default_factory=list)  # the units' control maps for the preview, kept past close()
    closed: bool = False

    @property
    def models(self) -> list[source_mod.PrivateModel]:
        return [self.source, *(g.checkpoint for g in self.groups if g.checkpoint is not None)]

    def close(self) -> None:
        """Disarm every pass and drop what the run built (graphs, wrappers, LoRA terms); idempotent."""
        if self.closed:
            return
        self.closed = True
        keys = [m.key for m in self.models]
        try:
            for ps in self.passes:
                ps.disarm()
            tallies = [ps.tally() for ps in self.passes]
            self.records = [r for t in tallies for r in t.records]
            self.target_latent = next((t.target_latent for t in reversed(tallies) if t.target_latent), None)
            self.log = self._summary(tallies)
            if self.settings.preview:
                self.hints = _hints(self)
            if self.graphs:
                for graph in self.graphs.values():
                    graph.reset()  # their memory pool goes with the last reference
            if self.lora is not None:
                self.lora.close()
        finally:
            for control in self.controls.values():
                control.remove()
            for image in self.images.values():
                image.remove()
            for unit in self.units:
                unit.release()
            ip_plans = [u.plan for u in self.ip_units]
            for ip_unit in self.ip_units:
                ip_unit.release()
            self.passes, self.current, self.graphs, self.lora = [], None, None, None
            self.wrappers.clear()
            self.controls.clear()
            self.images.clear()
            self.units.clear()
            self.ip_units.clear()
            ip_mod.settle(ip_plans, source_mod.limits().cache)
            source_mod.settle(keys)

    def _summary(self, tallies: list[step_mod.PassTally]) -> list[str]:
        calls, beside = sum(t.calls for t in tallies), sum(t.prefetched for t in tallies)
        where = f" ({beside} beside the target on {self.device})" if beside else ""
        overhead = self.setup_seconds + sum(t.seconds for t in tallies)
        out = [f"{calls} source calls{where}", f"{overhead:.1f}s source overhead"]
        if self.units:
            out.append(f"ControlNet on the adapted rows: {control_mod.describe(self.units)}")
        if self.ip_units:
            out.append(f"IP-Adapter on the adapted rows: {ip_mod.describe(self.ip_units)}")
        return out


def begin(p: Any) -> None:
    """A generation starts: close the previous one, whose ``postprocess`` the WebUI skips when sampling raised."""
    SLOT.close()
    if hasattr(p, ERROR_ATTR):
        delattr(p, ERROR_ATTR)


@dataclass(frozen=True)
class Plan:
    """What a request needs, checked before anything loads: listed checkpoints (the source, then each group's
    fine-tuned one or None) and their pool keys."""

    source: Any
    tuned: tuple[Any, ...]
    keys: tuple[tuple[str, str], ...]
    units: tuple[control_mod.UnitPlan, ...] = ()
    credits: credits_mod.Credits = field(default_factory=credits_mod.Credits)
    ip_units: tuple[ip_mod.IPPlan, ...] = ()
    family: str | None = None  # the source's, from its header (None for a pickle: read from the built model)
    context: int | None = None


def start(p: Any, settings: DeltaSettings) -> None:
    """Check every name, limit and file family, then load the source and the adaptations and write the infotext.
    Conditioning waits for the pass. A start that fails releases whatever it loaded."""
    from modules import shared

    t0 = time.perf_counter()
    target = shared.sd_model
    _check_target(target)
    plan = _plan(settings, target, p)
    settings = control_mod.named_as_listed(settings, plan.units)
    source_mod.POOL.prepare(plan.keys)
    ip_mod.prepare(plan.ip_units)
    try:
        run = _load(settings, plan, target, p)
    except BaseException:
        source_mod.POOL.discard_fresh()
        ip_mod.POOL.discard_fresh()
        source_mod.settle(list(plan.keys))
        raise
    run.setup_seconds = time.perf_counter() - t0
    run.credits = plan.credits
    SLOT.open(p, run)
    _write_infotext(p, run)
    if source_mod.target_uses_lowvram() and run.device.type != "cpu":
        if source_mod.shared_flag("lowvram"):
            print("Delta Sampling: under --lowvram the source's UNet moves to the GPU and back at every step and the "
                  "active model's modules step aside for it: expect each step to take several times longer.")


def _plan(settings: DeltaSettings, target: Any, p: Any = None) -> Plan:
    source = source_mod.resolve(settings.source)
    tuned = tuple(source_mod.resolve(g.checkpoint, "fine-tuned checkpoint") if g.checkpoint else None
                  for g in settings.groups)
    files = {os.path.abspath(i.filename) for i in (source, *tuned) if i is not None}
    source_mod.limits().check_request(len(files), sum(len(g.loras) for g in settings.groups))
    loras: dict[str, Any] = {}
    if any(g.loras for g in settings.groups):
        from . import lora as a1111_lora

        loras = {ref.name: a1111_lora.resolve(ref) for g in settings.groups for ref in g.loras}
    family = checkpoint_family(source.filename)
    if family in _FAMILY_FORMATS:
        check_latent_compatible(_FAMILY_FORMATS[family], source_mod.latent_format(target),
                                source_mod.info_label(source), source_mod.model_label(target),
                                _sources_for(source_mod.latent_format(target)))
    for info in {id(i): i for i in tuned if i is not None}.values():
        theirs = checkpoint_family(info.filename)
        if family in _FAMILY_FORMATS and theirs in _FAMILY_FORMATS and \
                _FAMILY_FORMATS[theirs] != _FAMILY_FORMATS[family]:
            raise _not_a_fine_tune(source_mod.info_label(info), _FAMILY_FORMATS[theirs].name,
                                   _FAMILY_FORMATS[family].name, source_mod.info_label(source))
    keys = tuple(dict.fromkeys(source_mod.key_of(i) for i in (source, *tuned) if i is not None))
    context = _context_width(source.filename)
    units = control_mod.plan_units(settings, p, family, context, source_mod.info_label(source))
    ip_units = ip_mod.plan_units(settings, p, family, context, source_mod.info_label(source))
    checkpoints = {credits_mod.checkpoint_name(i): i for i in (source, *tuned) if i is not None}
    return Plan(source, tuned, keys, units, credits_mod.gather(checkpoints, loras), ip_units, family, context)


def _context_width(filename: str) -> int | None:
    """The source UNet's cross-attention width, from its header (None for a pickle: checked once built)."""
    from ..common.files import safetensors_shapes

    shapes = safetensors_shapes(filename) or {}
    return next((v[1] for k, v in shapes.items()
                 if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight")), None)


def _load(settings: DeltaSettings, plan: Plan, target: Any, p: Any = None) -> Run:
    device = source_mod.source_device()
    source = source_mod.acquire(plan.source)
    _check_pair(source.model, target, "source")
    groups = []
    for info in plan.tuned:
        ckpt = source_mod.acquire(info, "fine-tuned checkpoint") if info is not None else None
        if ckpt is not None:
            _check_tuned(ckpt, source)
        groups.append(Group(ckpt))
    lora = None
    if any(g.loras for g in settings.groups):
        from . import lora as a1111_lora

        lora = a1111_lora.Adapter.create(settings, source, groups, device)
    for entry in {id(m): m for m in (source, *(g.checkpoint for g in groups if g.checkpoint))}.values():
        source_mod.place_for_generation(entry, device)
    if lora is not None:
        lora.lay_out()
    units = _load_units(plan, source, groups, device, p)
    ip_units = _load_ip_units(plan, source, groups, p)
    run = Run(settings, source, groups, device, lora, units=units, ip_units=ip_units)
    for g, resolved in enumerate(groups):
        model = resolved.checkpoint or source
        if any(u.plan.group == g for u in units) and id(model) not in run.controls:
            run.controls[id(model)] = RowControl(model.model.model.diffusion_model)
        if any(u.plan.group == g for u in ip_units) and id(model) not in run.images:
            run.images[id(model)] = RowImagePrompt(model.model.model.diffusion_model)
    if source_mod.graphs_allowed(device) and (units or ip_units):
        # the units' Python branches (window, rows) would need to key the graph: run such generations eagerly
        print("Delta Sampling: CUDA graph replay is off for generations with ControlNet or IP-Adapter units.")
    elif source_mod.graphs_allowed(device):
        run.graphs = {id(m): GraphedCall(step_mod.forward_source, fingerprint=storage_fingerprint([m.model.model]))
                      for m in run.models}
    return run


def _load_units(plan: Plan, source: source_mod.PrivateModel, groups: list[Group], device: Any,
                p: Any) -> list[control_mod.LoadedUnit]:
    if not plan.units:
        return []
    for unit in plan.units:  # a pickled source had no header to check against: its built UNet decides
        model = groups[unit.group].checkpoint or source
        control_mod.check_built(unit, model.model, source_mod.model_label(model.model))
    wanted = source_mod.placement(device)
    return control_mod.load_units(plan.units, p, lambda g: (groups[g].checkpoint or source).model.model.diffusion_model,
                                  wanted)


def _load_ip_units(plan: Plan, source: source_mod.PrivateModel, groups: list[Group],
                   p: Any) -> list[ip_mod.LoadedIPUnit]:
    if not plan.ip_units:
        return []
    model = source.model
    family = plan.family or ("sdxl" if getattr(model, "is_sdxl", False) else "sd2" if getattr(model, "is_sd2", False)
                             else "sd1")
    to_k = next((m for n, m in model.model.diffusion_model.named_modules() if n.endswith("attn2.to_k")), None)
    context = plan.context or getattr(to_k, "in_features", None)
    return ip_mod.load_units(plan.ip_units, p, lambda g: (groups[g].checkpoint or source).model.model.diffusion_model,
                             family, context, source_mod.model_label(model))


def _check_target(target: Any) -> None:
    from modules import sd_unet

    if getattr(sd_unet, "current_unet", None) is not None:  # it would run in place of every UNet, the source's too
        option = getattr(getattr(sd_unet, "current_unet_option", None), "label", "an alternative UNet")
        raise DeltaError(f"Delta Sampling cannot run while the SD UNet setting uses {option}: it replaces every "
                         "UNet's forward, the source model's included. Set 'SD Unet' to None (Settings > "
                         "Stable Diffusion).")
    why = source_mod.unsupported_kind(target)
    if why:
        raise DeltaError(f"Delta Sampling cannot steer the active model '{source_mod.model_label(target)}': it is "
                         f"{why}, whose extra image conditioning the delta does not carry.")


def _sources_for(target: Any) -> list[str]:
    """The families this WebUI loads that share the target's latent channels: what a refusal suggests."""
    return [f.name for f in _LOADABLE if f.channels == target.channels]


def _check_pair(model: Any, target: Any, role: str, against: str = "target") -> None:
    label = source_mod.model_label(model)
    why = source_mod.unsupported_kind(model)
    if why:
        raise DeltaError(f"The Delta Sampling {role} '{label}' is {why}; choose a plain text-to-image checkpoint.")
    check_latent_compatible(source_mod.latent_format(model), source_mod.latent_format(target), label,
                            source_mod.model_label(target), _sources_for(source_mod.latent_format(target)))
    if source_mod.is_inpainting(model) and not (
            source_mod.is_inpainting(target) and source_mod.latent_format(model) == source_mod.latent_format(target)):
        raise DeltaError(f"The Delta Sampling {role} '{label}' is an inpainting model, but the {against} "
                         f"'{source_mod.model_label(target)}' is not one of its family: choose the plain base "
                         "checkpoint the adaptation was made for.")


def _check_tuned(tuned: source_mod.PrivateModel, source: source_mod.PrivateModel) -> None:
    """A fine-tuned checkpoint runs on the source's noisy latent: it must share the source's latent format."""
    _check_pair(tuned.model, source.model, "fine-tuned checkpoint", against="source")
    if tuned.latent != source.latent:
        raise _not_a_fine_tune(source_mod.model_label(tuned.model), tuned.latent.name, source.latent.name,
                               source_mod.model_label(source.model))


def _not_a_fine_tune(label: str, family: str, source_family: str, source_label: str) -> DeltaError:
    return DeltaError(f"The fine-tuned checkpoint '{label}' ({family}) is not of the source's family "
                      f"({source_family}, '{source_label}'): its delta is taken against that source. Choose the base "
                      "model it was fine-tuned from as the source.")


def _write_infotext(p: Any, run: Run) -> None:
    # X/Y/Z cells are shallow copies of one p that share this dict: write into a copy of our own.
    p.extra_generation_params = run.credits.into({**p.extra_generation_params, **run.settings.to_infotext()})


def _credit(p: Any, run: Run) -> None:
    """Merge the credits again once the WebUI's LoRA support has written its "Lora hashes" for this pass."""
    p.extra_generation_params = run.credits.into(p.extra_generation_params)


def fail(p: Any, error: BaseException) -> None:
    """Make ``error`` stop this generation: it is raised from the sampler of its next sampling pass."""
    SLOT.close()
    error = as_failure(error)
    setattr(p, ERROR_ATTR, error)
    print(f"Delta Sampling: {error}")


def before_sampling(p: Any, **kwargs: Any) -> None:
    """Arm the per-step correction on this pass's sampler (``process_before_every_sampling``)."""
    sampler = getattr(p, "sampler", None)
    error = getattr(p, ERROR_ATTR, None)
    run = SLOT.get(p)
    if sampler is None or (error is None and run is None):
        return
    if error is None:
        _credit(p, run)
        try:
            _arm(p, run, sampler)
            return
        except Exception as e:
            fail(p, e)
            error = getattr(p, ERROR_ATTR)

    def raise_error() -> None:
        raise error

    step_mod.guard(sampler, raise_error, lambda: error, on_failure=SLOT.close)


def _arm(p: Any, run: Run, sampler: Any) -> None:
    from modules import shared

    t0 = time.perf_counter()
    target = shared.sd_model
    if run.current is not None:  # the previous pass (img2img reuses one sampler for all its batches)
        run.current.disarm()
    if any(not ps.runs_on(target) for ps in run.passes[:1]):  # a hires checkpoint took over
        _check_target(target)
        _check_pair(run.source.model, target, "source")
    native_px = native_side(run.source.latent.name, getattr(run.source.model, "parameterization", "") == "v")
    ps_prompts = conds_mod.at_source_size(conds_mod.prompts_for_pass(p), run.settings.source_resolution, native_px)
    variants = _variants(run, ps_prompts)
    for m in {id(v.model): v.model for v in variants}.values():
        if id(m) not in run.wrappers:  # kept for the run: a CUDA graph recorded with a wrapper is replayed with it
            run.wrappers[id(m)] = step_mod.denoiser_for(m, run.device)
    image_cond_rows = source_mod.is_inpainting(target) and source_mod.is_inpainting(run.source.model)
    hires = bool(getattr(p, "is_hr_pass", False))
    steps = int((getattr(p, "hr_second_pass_steps", 0) if hires else 0) or getattr(p, "steps", 0) or 0)
    graphs = run.graphs if steps >= source_mod.MIN_GRAPH_STEPS else None
    for control in run.controls.values():
        control.hires = hires
    source = step_mod.SourceEval(variants, run.device, run.wrappers, image_cond_rows, run.lora, graphs,
                                 concurrent=source_mod.runs_beside(run.device), controls=run.controls or None,
                                 images=run.images or None)
    convention = "flow" if getattr(run.source.model, "is_sd3", False) else "ve"
    space = ModelSpace(run.source.latent, convention, "x0", sigma_max=run.source.sigma_max, native_px=native_px)
    label = "hires" if getattr(p, "is_hr_pass", False) else "first"
    ps = step_mod.Pass(run.settings, sampler, target, source, space, label)
    ps.arm(on_failure=SLOT.close)
    run.passes.append(ps)
    run.current = ps
    run.setup_seconds += time.perf_counter() - t0


def _variants(run: Run, prompts: conds_mod.PromptSet) -> list[step_mod.Variant]:
    """Variant 0: the source base; variant g + 1: group g's adaptation (same conditioning where nothing differs)."""
    base_conds = _encode(run, run.source, prompts, None)
    variants = [step_mod.Variant(run.source, base_conds)]
    for i, (g, resolved) in enumerate(zip(run.settings.groups, run.groups, strict=True)):
        model = resolved.checkpoint or run.source
        te = run.lora.te_terms(i) if run.lora is not None else None
        if model is run.source and te is None and not g.prompt.strip():
            conds = base_conds
        else:
            conds = _encode(run, model, prompts.with_extra(g.prompt), te)
        unet = run.lora.unet_terms(i) if run.lora is not None else None
        controls = tuple(u for u in run.units if u.plan.group == i)
        ips = tuple(u for u in run.ip_units if u.plan.group == i)
        variants.append(step_mod.Variant(model, conds, unet, controls, ips))
    return variants


def _encode(run: Run, entry: source_mod.PrivateModel, prompts: conds_mod.PromptSet, te: Any) -> Any:
    import contextlib

    module = getattr(entry.model, "conditioner", None) or entry.model.cond_stage_model
    with source_mod.on_device(entry, module, run.device), \
            (run.lora.te_active(entry, te) if te is not None else contextlib.nullcontext()):
        return conds_mod.encode(entry.model, prompts)


def after_sampling(p: Any) -> None:
    """The last batch is sampled (``post_sample``, before the VAE decodes it): the source is not needed any more, so
    its graphs, patches and GPU memory go now. The VAE decode gets that memory, and a decode that runs out of it
    leaves nothing of the run behind (the WebUI skips ``postprocess`` then). ``finish`` still writes the log line
    and the preview from what the closed run kept."""
    run = SLOT.get(p)
    if run is not None and getattr(p, "iteration", 0) >= getattr(p, "n_iter", 1) - 1:
        run.close()


def finish(p: Any, processed: Any = None) -> None:
    """The generation ended (``postprocess``): close its run, add the preview and write its log line."""
    if hasattr(p, ERROR_ATTR):
        delattr(p, ERROR_ATTR)
    run = SLOT.take(p)
    if run is None:
        return
    run.close()  # a no-op when after_sampling closed it already
    if processed is not None and run.settings.preview:
        try:
            _append_preview(run, run.records, run.target_latent, processed, run.hints)
        except Exception as e:
            print(f"Delta Sampling: no preview ({type(e).__name__}: {e})")
    print(f"{run.settings.summary()}; source hash {run.source.shorthash}; {', '.join(run.log)}")


def _hints(run: Run) -> list:
    """The units' control maps for the preview, taken before the run closes (closing drops them)."""
    try:
        return [u.shown_hint() for u in run.units]
    except Exception as e:
        print(f"Delta Sampling: no control maps in the preview ({type(e).__name__}: {e})")
        return []


def _append_preview(run: Run, records: list, target: str | None, processed: Any, hints: list) -> None:
    from ... import preview

    strip = preview.render(records, run.source.latent.name, target, hints)
    if strip is None:
        return
    preview.append_to(processed, strip)
