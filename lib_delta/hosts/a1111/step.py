"""One sampling pass of an A1111 generation: the source evaluated per model call, and the guard on the sampler.

A pass starts in ``process_before_every_sampling`` (hires fix has two passes, each with a fresh sampler object) and
ends with that sampler. Everything it patches is an attribute of that one sampler instance (its ``sample`` and
``sample_img2img``, which raise a failure that the WebUI's callback dispatcher would otherwise swallow, and its
schedule getter, whose result gives the progress clock) or of that sampler's model wrapper, and is removed when
the generation finishes.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ... import resolution
from ...args import DeltaSettings
from ...cuda_graph import GraphedCall
from ...errors import DeltaError
from ...guidance import CfgLayout, DeltaGuidance, cfg_combine
from ...schedule import ProgressClock
from ...spaces import ModelSpace, SpaceBridge, VPSchedule
from ..common.http import answered, http_error, unexpected
from . import conds as conds_mod
from . import source as source_mod

PASS_ATTR = "_delta_sampling_pass"
_GUARDED = ("sample", "sample_img2img")
_SCHEDULES = ("get_sigmas", "get_timesteps")


class Abort(BaseException):
    """Stops the sampler from inside a callback.

    The WebUI's callback dispatcher catches ``Exception`` and only prints it; this passes through it (and through
    ``launch_sampling``, which catches only its own interrupt) up to the guarded ``sample`` of the same pass,
    which turns it back into the stored error. It is only raised while that guard is in place.
    """


def guard(sampler: Any, check: Callable[[], None], on_abort: Callable[[], BaseException],
          on_schedule: Callable[[Tensor], None] | None = None, on_failure: Callable[[], None] = lambda: None) -> None:
    """Patch one sampler instance (see the module doc); :func:`unguard` removes the patches. ``on_failure`` runs
    when sampling raises, whatever raised (an out-of-memory error in the target, another extension), which goes on
    with the ``status_code`` and ``detail`` the API answers with (out of memory: the ways to make room)."""
    if PASS_ATTR in vars(sampler):
        unguard(sampler)
    originals = {}
    for name in _GUARDED:
        if hasattr(sampler, name):
            originals[name] = getattr(sampler, name)
            setattr(sampler, name, _guarded(originals[name], check, on_abort, on_failure))
    if on_schedule is not None:
        for name in _SCHEDULES:
            if hasattr(sampler, name):
                originals[name] = getattr(sampler, name)
                setattr(sampler, name, _capturing(originals[name], on_schedule))
    vars(sampler)[PASS_ATTR] = tuple(originals)


def unguard(sampler: Any) -> None:
    for name in vars(sampler).pop(PASS_ATTR, ()):
        vars(sampler).pop(name, None)


def _guarded(original: Callable, check: Callable[[], None], on_abort: Callable[[], BaseException],
             on_failure: Callable[[], None]) -> Callable:
    def sample(*args, **kwargs):
        try:
            check()
            try:
                result = original(*args, **kwargs)
            except Abort:
                raise on_abort() from None
            check()
        except BaseException as e:
            on_failure()
            if isinstance(e, Exception):  # not an interrupt of the process itself
                answered(e)
            raise
        return result

    return sample


def _capturing(original: Callable, on_schedule: Callable[[Tensor], None]) -> Callable:
    def schedule(*args, **kwargs):
        result = original(*args, **kwargs)
        on_schedule(result)
        return result

    return schedule


# --- the source, evaluated for the rows of one model call ----------------------------------------------------------


@dataclass
class Variant:
    """The source base (variant 0) or one group's adaptation: which model, which conditioning, which UNet terms."""

    model: source_mod.PrivateModel
    conds: conds_mod.SourceConds
    unet_terms: Any = None  # the LoRA package's handle for this variant's UNet terms, or None
    controls: tuple = ()  # the ControlNet units (control.LoadedUnit) on this variant's rows
    ipadapters: tuple = ()  # the IP-Adapter units (ipadapter.LoadedIPUnit) on this variant's rows


@dataclass
class CallState:
    """What the ``cfg_denoiser`` callback saw, for the ``cfg_denoised`` callback of the same model call."""

    x: Tensor
    sigma: Tensor
    image_cond: Tensor
    step: int
    denoiser: Any
    layout: CfgLayout | None = None  # read once per call: at cfg_denoiser when the source starts there
    fraction: float = 0.0  # sampling step / total steps: the ControlNet window's clock, as the extension's


@dataclass
class SourceEval:
    """The :class:`~lib_delta.guidance.SourceModel` of a pass: one batched forward per model (and token length)
    over the rows of every requested variant."""

    variants: list[Variant]
    device: torch.device
    wrappers: dict[int, Any]
    image_cond_rows: bool  # give the source the target's image conditioning (both are inpainting models)
    lora: Any = None  # a1111_lora.Adapter, or None
    graphs: dict[int, GraphedCall] | None = None  # per source model; None: run eagerly
    concurrent: bool = False  # on another GPU than the target: started before the target's forward
    controls: dict[int, Any] | None = None  # per model with ControlNet units: its control_rows.RowControl
    images: dict[int, Any] | None = None  # per model with IP-Adapter units: its ip_rows.RowImagePrompt
    call: CallState | None = None
    seconds: float = 0.0
    _rows_cache: dict[tuple[int, int], tuple] = field(default_factory=dict)

    def __call__(self, x: Tensor, level: Tensor, rows: Sequence[int], variants: Sequence[int]) -> Tensor:
        t0 = time.perf_counter()
        assert self.call is not None
        # concurrent: the prediction stays on the source's GPU until the guidance adds it (no wait for the target)
        device = self.device if self.concurrent else x.device
        out = torch.empty((len(variants), len(rows), *x.shape[1:]), dtype=torch.float32, device=device)
        batches: dict[tuple[int, int], list[tuple[int, list[int], Any, int]]] = {}
        for k, v in enumerate(variants):
            for positions, cond in self._cond_chunks(v, rows):
                model_id = id(self.variants[v].model)
                batches.setdefault((model_id, conds_mod.token_length(cond)), []).append((k, positions, cond, v))
        for chunks in batches.values():
            self._forward(x, level, rows, chunks, out)
        self.seconds += time.perf_counter() - t0
        return out

    def _cond_chunks(self, v: int, rows: Sequence[int]) -> list[tuple[list[int], Any]]:
        """The variant's conditioning for ``rows`` (target layout), in one chunk per token length."""
        assert self.call is not None
        key = (v, self.call.step)
        if key not in self._rows_cache:
            self._rows_cache = {k: c for k, c in self._rows_cache.items() if k[1] == self.call.step}
            self._rows_cache[key] = self.variants[v].conds.at(self.call.step)[1:]
        cond, uncond = self._rows_cache[key]
        n_cond = int((cond["crossattn"] if isinstance(cond, dict) else cond).shape[0])
        c_pos = [i for i, r in enumerate(rows) if r < n_cond]
        u_pos = [i for i, r in enumerate(rows) if r >= n_cond]
        chunks = []
        if c_pos:
            chunks.append((c_pos, conds_mod.take_rows(cond, [rows[i] for i in c_pos])))
        if u_pos:
            chunks.append((u_pos, conds_mod.take_rows(uncond, [rows[i] - n_cond for i in u_pos])))
        if len(chunks) == 2 and conds_mod.token_length(chunks[0][1]) == conds_mod.token_length(chunks[1][1]):
            chunks = [(c_pos + u_pos, conds_mod.cat_rows([chunks[0][1], chunks[1][1]]))]
        return chunks

    def _forward(self, x: Tensor, level: Tensor, rows: Sequence[int], chunks: list, out: Tensor) -> None:
        assert self.call is not None
        entry = self.variants[chunks[0][3]].model
        positions = [i for _, pos, _, _ in chunks for i in pos]
        xs = _take(x, positions).to(self.device)
        ls = _take(level.reshape(-1), positions).to(self.device)
        cond = conds_mod.move(conds_mod.cat_rows([c for _, _, c, _ in chunks]), self.device)
        if self.image_cond_rows:
            image_cond = _take(self.call.image_cond, [rows[i] for i in positions]).to(self.device)
            image_cond = resolution.down(image_cond, tuple(xs.shape[-2:]))  # a source at its own area
        else:
            image_cond = torch.zeros((len(positions), 5, 1, 1), dtype=xs.dtype, device=self.device)
        cond = {**cond, "c_concat": [image_cond]} if isinstance(cond, dict) else \
            {"c_crossattn": [cond], "c_concat": [image_cond]}
        plan = [(len(pos), self.variants[v].unet_terms) for _, pos, _, v in chunks]
        wrapper = self.wrappers[id(entry)]
        graph = None if self.graphs is None else self.graphs.get(id(entry))
        with source_mod.on_device(entry, entry.model.model, self.device), self._controlled(entry, chunks), \
                self._image_prompted(entry, rows, chunks):
            # the wrapper and the LoRA terms are keys of the graph (by identity): a new pass or plan records anew
            x0 = (graph or forward_source)(self.lora, entry, wrapper, xs, ls, cond, tuple(plan))
        x0 = x0.to(device=out.device, dtype=out.dtype)
        start = 0
        for k, pos, _, _ in chunks:
            span = _span(pos)
            out[k, span if span is not None else pos] = x0[start:start + len(pos)]
            start += len(pos)


    def _controlled(self, entry: source_mod.PrivateModel, chunks: list) -> contextlib.AbstractContextManager:
        """The call's ControlNet plan: each chunk's rows with its variant's units active at this step."""
        control = None if self.controls is None else self.controls.get(id(entry))
        if control is None:
            return contextlib.nullcontext()
        assert self.call is not None
        plan, start = [], 0
        for _, pos, _, v in chunks:
            units = tuple(u for u in self.variants[v].controls if u.active(self.call.fraction))
            if units:
                plan.append((slice(start, start + len(pos)), units))
            start += len(pos)
        if not plan:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        for net in {id(u.net): u.net for _, units in plan for u in units}.values():
            stack.enter_context(source_mod.on_device(entry, net, self.device))
        stack.enter_context(control.rows(plan))
        return stack


    def _image_prompted(self, entry: source_mod.PrivateModel, rows: Sequence[int],
                        chunks: list) -> contextlib.AbstractContextManager:
        """The call's IP-Adapter plan: each chunk's rows with its variant's units active at this step, and per row
        whether it is a cond row (the image embedding) or an uncond row (the empty one), as the extension marks
        them."""
        images = None if self.images is None else self.images.get(id(entry))
        if images is None:
            return contextlib.nullcontext()
        assert self.call is not None
        plan, start = [], 0
        for _, pos, _, v in chunks:
            units = tuple(u for u in self.variants[v].ipadapters if u.active(self.call.fraction))
            if units:
                n_cond = self._n_cond(v)
                marks = tuple(rows[i] < n_cond for i in pos)
                plan.append((slice(start, start + len(pos)), tuple((u, marks) for u in units)))
            start += len(pos)
        return images.rows(plan) if plan else contextlib.nullcontext()

    def _n_cond(self, v: int) -> int:
        """How many of the call's rows (target layout) are cond rows for variant ``v`` at this step."""
        assert self.call is not None
        cond, _ = self._rows_cache[(v, self.call.step)]
        return int((cond["crossattn"] if isinstance(cond, dict) else cond).shape[0])


def _span(rows: Sequence[int]) -> slice | None:
    """``rows`` as a slice when they are consecutive (the usual case): indexing by a list copies it to the GPU
    first, which waits for the device's queue."""
    if rows and list(rows) == list(range(rows[0], rows[0] + len(rows))):
        return slice(rows[0], rows[0] + len(rows))
    return None


def _take(t: Tensor, rows: Sequence[int]) -> Tensor:
    span = _span(rows)
    return t[span] if span is not None else t[list(rows)]


def forward_source(lora: Any, entry: source_mod.PrivateModel, wrapper: Any, xs: Tensor, ls: Tensor, cond: Any,
                   plan: tuple[tuple[int, Any], ...]) -> Tensor:
    """One forward of a source model's x0 wrapper, each block of rows (``(n_rows, terms)``) with its LoRA terms."""
    if lora is None or all(terms is None for _, terms in plan):
        return wrapper(xs, ls, cond=cond)
    with lora.unet_rows(entry, list(plan)):
        return wrapper(xs, ls, cond=cond)


def denoiser_for(entry: source_mod.PrivateModel, device: torch.device) -> Any:
    """The source's x0 wrapper: k-diffusion's CompVis(V)Denoiser, or the model's own (SD3) denoiser.

    It maps σ to a timestep with the source's own schedule: the target's may be rescaled (the WebUI's "Zero
    Terminal SNR" noise schedule rewrites the active model's ``alphas_cumprod`` before sampling), and the source was
    trained on its own. The WebUI's downcast option, a rounding of the table rather than another schedule, applies
    to both, so a source equal to the target reads the same table.
    """
    from modules import shared

    m = entry.model
    create = getattr(m, "create_denoiser", None)
    if create is not None:
        return create()
    own = getattr(m, "alphas_cumprod_original", None)
    if own is not None:
        if bool(getattr(shared.opts, "use_downcasted_alpha_bar", False)):
            own = own.half()
        m.alphas_cumprod = own.float().to(device)
    import k_diffusion.external

    cls = k_diffusion.external.CompVisVDenoiser if m.parameterization == "v" else k_diffusion.external.CompVisDenoiser
    return cls(m, quantize=bool(getattr(shared.opts, "enable_quantization", False)))


# --- the pass ----------------------------------------------------------------------------------------------------


@dataclass
class PassTally:
    """What a pass reports to the generation's log line and preview, kept when the pass is disarmed (a batch
    count disarms each batch's pass when the next one arms)."""

    seconds: float = 0.0  # in the source's calls
    calls: int = 0
    prefetched: int = 0
    records: list = field(default_factory=list)  # the preview's
    target_latent: str | None = None


class Pass:
    """One sampling pass: its source evaluation, its guidance (built at the first call, once the sampler's
    schedule is known) and the per-call bookkeeping between the two callbacks."""

    def __init__(self, settings: DeltaSettings, sampler: Any, target_model: Any, source: SourceEval,
                 source_space: ModelSpace, label: str) -> None:
        self.settings = settings
        self.sampler = sampler
        self.target_model = target_model
        self.target_file = _checkpoint_file(target_model)
        self.source = source
        self.source_space = source_space
        self.label = label
        self.timesteps = hasattr(sampler, "get_timesteps")
        self.schedule: list[float] | None = None
        self.guidance: DeltaGuidance | None = None
        self.call: CallState | None = None
        self.error: BaseException | None = None
        self.stopped = False
        self.kept: PassTally | None = None  # set by disarm()

    def tally(self) -> PassTally:
        if self.kept is not None:
            return self.kept
        g = self.guidance
        return PassTally(self.source.seconds if self.source is not None else 0.0,
                         g.source_calls if g is not None else 0, g.prefetched if g is not None else 0,
                         g.records if g is not None else [],
                         g.bridge.target.latent.name if g is not None else None)

    # -- the guard --------------------------------------------------------------------------------------------------

    def arm(self, on_failure: Callable[[], None]) -> None:
        """Guard this pass's sampler; ``on_failure`` runs when its sampling raises, whatever raised."""
        guard(self.sampler, self.check, self.take_error, self._on_schedule, on_failure)

    def disarm(self) -> None:
        """Remove the patches and drop what the pass holds (its source, its guidance): a traceback that still
        refers to this pass keeps nothing of the generation alive."""
        unguard(self.sampler)
        wrap = getattr(getattr(self.sampler, "model_wrap_cfg", None), "model_wrap", None)
        if wrap is not None:
            vars(wrap).pop(PASS_ATTR, None)
        self.kept = self.tally()
        self.call = self.guidance = self.source = None
        self.stopped = True

    def runs_on(self, model: Any) -> bool:
        """Whether ``model`` is still this pass's target: the same object holding the same checkpoint (with one
        checkpoint in memory the WebUI loads a refiner's weights into the active model's object)."""
        return model is self.target_model and _checkpoint_file(model) == self.target_file

    def check(self) -> None:
        if self.error is not None:
            raise self.take_error()

    def take_error(self) -> BaseException:
        return http_error(self.error if self.error is not None else unexpected(RuntimeError("aborted")))

    def abort(self, error: BaseException) -> None:
        """Remember why and stop the sampler now."""
        self.error = error if isinstance(error, DeltaError) else unexpected(error)
        self.stopped = True
        raise Abort()

    def _on_schedule(self, levels: Tensor) -> None:
        self.schedule = [float(v) for v in torch.as_tensor(levels).flatten().tolist()]

    # -- the callbacks ----------------------------------------------------------------------------------------------

    def before_call(self, params: Any) -> None:
        """``cfg_denoiser``: remember the rows' inputs; hand the model wrapper a link for ``cfg_denoised``."""
        from modules import shared

        d = params.denoiser
        if not self.runs_on(shared.sd_model):  # the refiner took over: its steps run without the delta
            self.stopped = True
            d.p.extra_generation_params["Delta refiner"] = "stopped"
        if self.stopped:
            self.call = None
            return
        wrap = getattr(d, "model_wrap", None)
        if wrap is not None:
            vars(wrap)[PASS_ATTR] = self
        total = int(getattr(params, "total_sampling_steps", 0) or 0)
        fraction = int(getattr(params, "sampling_step", 0) or 0) / total if total else 0.0
        self.call = CallState(params.x, params.sigma, params.image_cond, int(d.step), d, fraction=fraction)
        if self.source.concurrent:
            self._start_source(self.call)

    def _start_source(self, call: CallState) -> None:
        """Start this call's source prediction now, on its own GPU, so it runs while the target's forward does."""
        layout = call.layout = self._layout(call)
        if call.x.shape[0] != layout.n_rows:
            return  # after_call names the problem
        if self.guidance is None:
            self.guidance = self._build_guidance(call)
        self.source.call = call
        self.guidance.prefetch(call.x, call.sigma, layout)

    def after_call(self, params: Any) -> None:
        """``cfg_denoised``: correct the per-row outputs in place."""
        call, self.call = self.call, None
        if call is None or self.stopped:
            return
        layout = call.layout if call.layout is not None else self._layout(call)
        out = params.x
        if out.shape[0] != layout.n_rows or call.x.shape[0] != layout.n_rows:
            raise DeltaError(f"Delta Sampling met an unexpected batch layout ({out.shape[0]} rows for "
                             f"{layout.n_rows} prompts and images); another extension may have changed it.")
        if self.guidance is None:
            self.guidance = self._build_guidance(call)
        self.source.call = call
        if self.guidance.apply(call.x, call.sigma, out, layout) and self.guidance.record:
            from ... import preview

            preview.compact(self.guidance.records)
        if self.guidance.trajectory is not None:
            self._observe(call, out, layout)

    # -- internals ------------------------------------------------------------------------------------------------

    def _layout(self, call: CallState) -> CfgLayout:
        d = call.denoiser
        extra = d.sampler.sampler_extra_args
        conds_list = conds_mod.conds_list_of(extra["cond"])
        if _skips_uncond(d, call, extra, len(conds_list)):
            return CfgLayout.from_conds_list(conds_list, 1.0, uncond_from_cond=True)
        scale = float(extra["cond_scale"]) * float(getattr(d, "cond_scale_miltiplier", 1.0))
        return CfgLayout.from_conds_list(conds_list, scale)

    def _build_guidance(self, call: CallState) -> DeltaGuidance:
        from modules import shared

        d = call.denoiser
        latent = source_mod.latent_format(shared.sd_model)
        first = float(call.sigma.reshape(-1)[0])
        if self.timesteps:
            target = ModelSpace(latent, "vp", "eps", VPSchedule(d.alphas))
        elif getattr(shared.sd_model, "is_sd3", False):
            target = ModelSpace(latent, "flow", "x0")
        else:
            target = ModelSpace(latent, "ve", "x0")
        guidance = DeltaGuidance(self.settings, SpaceBridge(self.source_space, target), self.source,
                                 self._clock(first, d), record=self.settings.preview)
        if guidance.trajectory is not None and getattr(d, "init_latent", None) is not None:
            guidance.trajectory.init_x0 = d.init_latent.float()
        return guidance

    def _clock(self, first: float, d: Any) -> ProgressClock:
        """Progress over the steps this pass really runs: the sampler's schedule from the first level it calls
        the model at (img2img and hires fix start part-way down)."""
        if self.timesteps:
            ts = sorted(self.schedule or [], reverse=True)
            if getattr(self.sampler.func, "__name__", "") == "unipc" or not ts:
                n = max(len(ts), 1)
                return ProgressClock([first - (first * i) / n for i in range(n + 1)], log_space=False)
            levels = [t for t in ts if t <= first + 1e-3] or ts
            return ProgressClock(levels if len(levels) > 1 else [levels[0], 0.0], log_space=False)
        sigmas = self.schedule
        if not sigmas:
            total = int(getattr(d, "total_steps", 0) or getattr(d, "steps", 0) or 1)
            sigmas = [float(s) for s in d.inner_model.get_sigmas(total)]
        levels = [s for s in sigmas if s <= first * (1 + 1e-4)] or sigmas
        if levels[0] < first:
            levels = [first, *levels]
        return ProgressClock(levels if len(levels) > 1 else [levels[0], 0.0], log_space=True)

    def _observe(self, call: CallState, out: Tensor, layout: CfgLayout) -> None:
        """Feed the separate source trajectory the target's combined (and, for inpainting, blended) prediction,
        recomputed here: the after-CFG callback carries no link to the generation."""
        assert self.guidance is not None
        d = call.denoiser
        denoised = cfg_combine(out.float(), layout)
        if getattr(d, "mask", None) is not None and not getattr(d, "mask_before_denoising", False):
            denoised = denoised * d.nmask + d.init_latent * d.mask
        b = layout.batch
        self.guidance.after_combine(call.x[-b:], call.sigma[-b:], denoised)


def _checkpoint_file(model: Any) -> Any:
    return getattr(model, "sd_model_checkpoint", None) or getattr(getattr(model, "sd_checkpoint_info", None),
                                                                  "filename", None)


def _skips_uncond(d: Any, call: CallState, extra: dict, batch: int) -> bool:
    """Whether ``CFGDenoiser.forward`` skips the uncond rows of this call (skip_early_cond or NGMS), in which case
    it combines with scale 1 and so must the source."""
    from modules import shared

    opts = shared.opts
    skip_early = float(getattr(opts, "skip_early_cond", 0.0) or 0.0)
    if skip_early != 0.0 and d.total_steps and d.step / d.total_steps <= skip_early:
        return True
    s_min_uncond = float(extra.get("s_min_uncond") or 0.0)
    sigma = call.sigma[-batch:]
    odd = bool(d.step % 2) or bool(getattr(opts, "s_min_uncond_all", False))
    return odd and s_min_uncond > 0 and float(sigma[0]) < s_min_uncond
