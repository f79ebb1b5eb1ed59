"""Functional LoRA on a private source model: base and adapted rows of one batch in one forward.

``build_patch`` validates every file of every group against the source model (key map, family, shapes) and
precomputes the per-layer ops; nothing touches the model until ``attach()``. While attached, each affected layer
runs its own forward on the whole batch, then adds its groups' terms to the rows a :meth:`DeltaPatch.rows` plan
gives them. Rows of group ``None``, and every row outside a plan, are the plain layer output, bit for bit (the
same numbers the unpatched model gives for the same batch).

Memory: low-rank changes cost what the file costs (Σ r·(in+out) per layer, in the model's dtype: 81 MiB for a
rank-16 LoRA on the 722 attention layers of SDXL). Dense ones (LoHa with Tucker cores, IA3, DoRA, OFT/BOFT,
full-diff, low-rank sums that are cheaper dense, or ``dense=True``) cost one weight copy per patched layer and
group: 4.2 GiB for DoRA on those SDXL layers, 0.5 GiB on SD1's 192. Text-encoder attention (open_clip's
``nn.MultiheadAttention``) builds merged projections during each encoder call and drops them after.

Speed (H100, float16 under autocast as the WebUI samples, full-size UNets with random weights,
tests/lora/bench_functional_lora.py; "rows" = base + adapted rows of one source call, timings ±10 %):

    model, rows       plain    rank-16 LoRA    same, dense=True    two UNet copies (base + merged)
    SD1 64², 2        23 ms    +36 %           +28 %               +100 %
    SD1 64², 16       65 ms    +9 %            +9 %                +13 %
    SDXL 128², 2      58 ms    +68 %           +23 %               +70–100 %
    SDXL 128², 4      95 ms    +16 %           +19 %               +16–28 %

(That table predates folding: on CUDA, low-rank down factors now sit under the layer's weight and come out of its
own GEMM, :mod:`~lib_delta.lora.fold`, one kernel fewer per layer; docs/performance.md has the source call at 512 px
replayed as a CUDA graph, +8.1 % folded and +9.4 % unfolded, and its GPU time by operator.) Small calls are
launch-bound: each patched layer adds two kernels (one when dense or folded) and a few view ops to the ~1,500 of the
plain UNet, so the overhead follows the launch count, not the FLOPs; at larger batches it is the extra activation
traffic of the adapted rows. Either way one functional call is no slower, and mostly much faster, than two calls on
two weight copies.

Precision: adapted rows equal a forward of the merged model within float rounding (≤ 1e-5 relative in float32;
about 1e-3 in float16 on the GPU, which is that dtype's own noise). In half precision the functional path is as
accurate as merging into half-precision weights (tests/lora/test_precision.py has the numbers).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DeltaError
from .family import guess_family, label, looks_like
from .files import LoraFile
from .fold import WeightFold
from .formats import Delta, ShapeMismatch, build_delta, detect_format, format_label, take_rows
from .index import Layer, ModelIndex
from .keys import parse_key
from .ops import (
    ConvDense,
    ConvLowRank,
    LinearDense,
    LinearLowRank,
    LinearRowBlocks,
    MhaReplace,
    NormReplace,
    compute_dtype,
    fuse,
)

RowPlan = Iterable[tuple[slice, int | None]]


@dataclass(frozen=True)
class LoraUse:
    """One file in a group with its multipliers, as ``<lora:name:te:unet>`` (unet defaults to te)."""

    file: LoraFile
    te: float = 1.0
    unet: float | None = None

    @property
    def unet_multiplier(self) -> float:
        return self.te if self.unet is None else self.unet


@dataclass(frozen=True)
class LoadReport:
    file: str
    formats: tuple[str, ...]  # e.g. ("LoRA", "LoCon") or ("LoKr+DoRA",)
    key_style: str  # "kohya", "diffusers" or "kohya+diffusers"
    looks_like: str  # family judged from the file, e.g. "SD1.x or SD2.x"
    keys_matched: int
    keys_total: int
    unet_modules: int
    te_modules: int
    te_multiplier: float
    unet_multiplier: float
    unmatched: tuple[str, ...] = field(default=(), repr=False)  # file keys not applied (first 50)

    def summary(self) -> str:
        return (f"{self.file}: {'/'.join(self.formats)} ({self.key_style} keys, looks like {self.looks_like}); "
                f"{self.keys_matched}/{self.keys_total} keys matched; {self.unet_modules} UNet and "
                f"{self.te_modules} text-encoder layers; te {self.te_multiplier:g}, unet {self.unet_multiplier:g}")


def plan_file(use: LoraUse, index: ModelIndex, weight_of: Callable[[Layer], torch.Tensor] | None = None
              ) -> tuple[LoadReport, list[tuple[Layer, Delta]]]:
    """Map and compute one file against the source model, or raise DeltaError; touches nothing.

    ``weight_of(layer)`` gives the weight that IA3, DoRA and OFT transform (default: the layer's own); a group
    passes the weight as changed by its earlier files, which is what the WebUI's stacked merge does.
    """
    f = use.file
    parsed, unmatched = [], []
    for key in f.tensors:
        if key.startswith("bundle_emb."):  # embeddings bundled for the prompt; not layer weights
            continue
        pk = parse_key(key)
        if pk is None:
            unmatched.append(key)
        else:
            parsed.append(pk)
    total = len(parsed) + len(unmatched)
    looks = guess_family(parsed, f.tensors, f.metadata)
    if index.family not in looks:
        raise DeltaError(
            f"{f.name} looks made for {label(looks)}, but the source model is {index.family_label}. Choose a "
            f"LoRA trained on {index.family_label}, or set the source base to a checkpoint of the LoRA's family."
        )

    by_layer: dict[tuple[str, str], dict[str, str]] = {}
    for pk in parsed:
        by_layer.setdefault((pk.part, pk.flat), {})[pk.weight_part] = pk.key
    entries: list[tuple[Layer, Delta]] = []
    formats: set[str] = set()
    unsupported: set[str] = set()
    styles = {pk.style for pk in parsed}
    matched = 0
    layers_seen: dict[str, set] = {"unet": set(), "te": set()}
    for (part, flat), keys in by_layer.items():
        target = index.resolve(part, flat)
        fmt = detect_format(keys) if target is not None else None
        if target is None or fmt in (None, "glora"):
            unmatched.extend(keys.values())
            if fmt == "glora":
                unsupported.add("GLoRA")
            continue
        layer, rows = target
        tensors = {wp: f.tensors[k] for wp, k in keys.items()}
        if fmt in ("ia3", "oft") or "dora_scale" in keys:  # these transform the weight itself
            weight = weight_of(layer) if weight_of else layer.weight().detach().float()
        else:  # the others need only its shape and device
            weight = layer.weight().detach()
        try:
            if rows is None:
                delta = build_delta(fmt, tensors, weight, layer.kind)
            else:  # a module that is rows of a fused layer changes its own rows, as if it were a layer of them
                delta = build_delta(fmt, tensors, take_rows(weight, rows), layer.kind).in_rows(rows, weight.shape[0])
        except ShapeMismatch as e:
            raise DeltaError(
                f"{f.name} does not fit the {index.family_label} source model: {min(keys.values())}: {e}; "
                f"{looks_like(looks)}. Choose a LoRA trained on {index.family_label}, or set the source base to a "
                f"checkpoint of the family the LoRA was trained on."
            ) from e
        matched += len(keys)
        formats.add(format_label(fmt, tensors, layer.kind == "conv"))
        layers_seen["unet" if layer.part == "unet" else "te"].add((id(layer.module), layer.slot))
        multiplier = use.unet_multiplier if layer.part == "unet" else use.te
        if multiplier != 0:
            entries.append((layer, delta if multiplier == 1 else delta.scaled(multiplier)))
    missed = set(unmatched)
    if index.quantized and any(pk.key in missed and index.part_for(pk.part) == "unet" for pk in parsed):
        raise DeltaError(
            f"{f.name} cannot be applied in full: {index.quantized} linear layers of the "
            f"{index.family_label} source hold quantized weights (NF4, FP4 or GGUF), which a LoRA cannot be added to "
            f"here. Choose an unquantized file of the source (fp16, bf16 or fp8) as the source base."
        )
    extra = f" ({', '.join(sorted(unsupported))} modules are not supported)" if unsupported else ""
    if index.family == "flux" and (lost := sorted(pk.key for pk in parsed if pk.part == "dit" and pk.key in missed)):
        raise DeltaError(  # the WebUI would leave these out and apply the rest: a different LoRA, unannounced
            f"{f.name} is a Flux LoRA in the diffusers layout (transformer.… keys), but {len(lost)} of its keys name "
            f"no layer of the Flux model that Delta Sampling can change{extra}, e.g. {lost[0]}. Use the LoRA in the "
            f"kohya layout (lora_unet_double_blocks_… keys), or transfer a checkpoint with it merged."
        )
    if matched == 0:
        raise DeltaError(
            f"None of the {total} keys of {f.name} names a layer of the {index.family_label} source model{extra}; "
            f"{looks_like(looks)}. It may be for another model type, or not a LoRA. Choose a LoRA/LyCORIS file "
            f"trained on {index.family_label}."
        )
    report = LoadReport(
        file=f.name,
        formats=tuple(sorted(formats)),
        key_style="+".join(sorted(styles)),
        looks_like=label(looks),
        keys_matched=matched,
        keys_total=total,
        unet_modules=len(layers_seen["unet"]),
        te_modules=len(layers_seen["te"]),
        te_multiplier=use.te,
        unet_multiplier=use.unet_multiplier,
        unmatched=tuple(sorted(unmatched)[:50]),
    )
    return report, entries


def build_patch(roots: Mapping[str, nn.Module], family: str, groups: Sequence[Sequence[LoraUse]], *,
                dense: bool = False, fold: bool | None = None) -> DeltaPatch:
    """Validate and precompute every group; returns a detached patch.

    ``roots``: ``{"unet": diffusion_model, "te": text_encoder}`` for "sd1"/"sd2",
    ``{"unet": ..., "te1": clip_l, "te2": open_clip_g}`` for "sdxl", ``{"unet": flux_transformer, "te1": clip_l,
    "t5": t5xxl}`` for "flux"; wrappers around them are fine and text encoders are optional. Group ``g`` of the
    result is ``groups[g]``.

    ``dense=True`` materialises every change as a full ``ΔW``: one kernel per layer instead of two, which pays off
    when the call is launch-bound (small batches), at the memory of one weight copy per patched layer and group.

    ``fold`` stacks low-rank down factors under the weights of plain Linear/Conv2d layers
    (:mod:`~lib_delta.lora.fold`): one kernel per layer and group fewer, which matters where launches are the
    cost. ``None`` (default): on CUDA devices only; ``True``: wherever the model is; ``False``: never. Leave it
    off where the model's parameters move between calls (the WebUI's lowvram mode): each move undoes the stack,
    and the next :meth:`DeltaPatch.attach` builds it again.
    """
    index = ModelIndex(roots, family)
    reports: list[list[LoadReport]] = []
    collected: dict[int, tuple[nn.Module, str, dict[int, dict]]] = {}
    with torch.no_grad():
        for g, uses in enumerate(groups):
            reports.append([])
            so_far: dict[tuple[int, object], list[Delta]] = {}

            def weight_of(layer: Layer, so_far=so_far) -> torch.Tensor:
                weight = layer.weight().detach().float()
                for d in so_far.get((id(layer.module), layer.slot), ()):
                    weight = weight + d.full(weight.shape[0]).materialise().float().reshape(weight.shape)
                return weight

            for use in uses:
                report, entries = plan_file(use, index, weight_of)
                reports[-1].append(report)
                for layer, delta in entries:
                    _, _, per_group = collected.setdefault(id(layer.module), (layer.module, layer.kind, {}))
                    slots = per_group.setdefault(g, {})
                    delta = _compact(delta, layer)
                    slots.setdefault(layer.slot, []).append(delta)
                    so_far.setdefault((id(layer.module), layer.slot), []).append(delta)
        sites = []
        for module, kind, per_group in collected.values():
            ops = tuple(_make_op(module, kind, per_group.get(g), not dense) for g in range(len(groups)))
            sites.append(_Site(module, kind, ops, WeightFold(module, ops)
                               if fold is not False and WeightFold.applies(module, ops) else None))
    return DeltaPatch(sites, reports, fold_on_cpu=fold is True)


def _compact(delta: Delta, layer: Layer) -> Delta:
    """Dense changes wait for fusion in the layer's dtype, so a big group does not pile up float32 copies."""
    if delta.dense is None:
        return delta
    return Delta(dense=delta.dense.to(compute_dtype(layer.weight())), bias=delta.bias)


def _make_op(module: nn.Module, kind: str, slots: dict | None, low_rank: bool):
    if not slots:
        return None
    if kind == "mha":
        e = module.embed_dim
        fused = {slot: fuse([_f32(d) for d in ds], torch.Size((e, e))) for slot, ds in slots.items()}
        weight = module.in_proj_weight
        return MhaReplace(module, fused, compute_dtype(weight), weight.device)
    weight = module.weight
    dtype, device = compute_dtype(weight), weight.device
    deltas = [_f32(d) for d in slots[None]]
    if any(d.rows is not None for d in deltas):  # diffusers Flux modules, each low-rank on rows of a fused layer
        if kind == "linear" and low_rank and LinearRowBlocks.pays(deltas, weight.shape):
            return LinearRowBlocks(deltas, weight.shape, dtype, device)
        deltas = [d.full(weight.shape[0]) for d in deltas]
    delta = fuse(deltas, weight.shape, low_rank)
    if kind == "norm":
        return NormReplace(module, delta, weight.dtype, device)
    if kind == "linear":
        return (LinearLowRank if delta.up is not None else LinearDense)(delta, dtype, device)
    if delta.up is not None and module.groups == 1:
        return ConvLowRank(module, delta, dtype, device)
    if delta.up is not None:
        delta = Delta(dense=delta.materialise(), bias=delta.bias)
    return ConvDense(module, delta, dtype, device)


def _f32(d: Delta) -> Delta:
    return Delta(*(None if t is None else t.float() for t in (d.up, d.down, d.dense, d.bias)), rows=d.rows)


# --- patching -------------------------------------------------------------------------------------------------


class _RowState:
    __slots__ = ("folding", "segments")

    def __init__(self):
        self.segments: tuple[tuple[slice | None, int], ...] = ()
        self.folding = True


@dataclass(eq=False)
class _Site:
    module: nn.Module
    kind: str
    ops: tuple  # one op or None per group
    fold: WeightFold | None = None
    saved_forward: object = None  # an instance-level forward that was there before us
    forward: object = None  # our forward, kept between attaches
    built_for: object = None  # the instance-level forward it wraps


_MARK = "_delta_lora_patched"


class DeltaPatch:
    """Reversible functional LoRA on the layers of one source model, for any number of groups."""

    def __init__(self, sites: list[_Site], reports: list[list[LoadReport]], fold_on_cpu: bool = False):
        self._sites = sites
        self._fold_on_cpu = fold_on_cpu
        self.reports = reports
        self.groups = len(reports)
        self._state = _RowState()
        self.attached = False

    # attach / detach

    def attach(self) -> DeltaPatch:
        if self.attached:
            return self
        clashing = [s for s in self._sites if _MARK in s.module.__dict__]
        if clashing:
            raise RuntimeError("another LoRA patch is attached to this model; detach it first")
        for site in self._sites:
            module = site.module
            saved = module.__dict__.get("forward")
            if site.forward is None or site.built_for is not saved:  # the host attaches at every call: build once
                fold = site.fold if saved is None else None
                site.forward = _FORWARDS[site.kind](module, site.ops, self._state, saved, fold)
                site.built_for = saved
            site.saved_forward = saved
            module.forward = site.forward
            module.__dict__[_MARK] = True
        self.attached = True
        self.lay_out()
        return self

    def detach(self) -> None:
        if not self.attached:
            return
        for site in self._sites:
            module = site.module
            del module.__dict__[_MARK]
            if site.saved_forward is None:
                module.__dict__.pop("forward", None)
            else:
                module.forward = site.saved_forward
            site.saved_forward = None
        self._state.segments = ()
        self.attached = False

    @property
    def folding(self) -> bool:
        """Whether forwards use stacked weights where there are any; False runs the unfolded path (the stacks stay)."""
        return self._state.folding

    @folding.setter
    def folding(self, on: bool) -> None:
        self._state.folding = bool(on)

    def lay_out(self) -> None:
        """Stack folded layers' weights where they are now (a no-op for those in place). :meth:`attach` does it;
        a host calls it once the model sits on its device and before a CUDA graph records the call, whose key
        names the weights' addresses."""
        if self._state.folding:
            for site in self._sites:
                if site.fold is None:
                    continue
                own_forward = site.saved_forward if self.attached else site.module.__dict__.get("forward")
                if own_forward is None:
                    site.fold.lay_out(self._fold_on_cpu)

    def release(self) -> None:
        """Detach and give folded layers compact weights again: the model is as it was built, values and memory."""
        self.detach()
        for site in self._sites:
            if site.fold is not None:
                site.fold.undo()

    def __enter__(self) -> DeltaPatch:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    # row plans

    @contextmanager
    def rows(self, plan: RowPlan):
        """Within the block, forwards add group ``g``'s terms to the rows of each ``(slice, g)``.

        Slices index dim 0 of every patched layer's input (batch-first: the UNet, Hugging Face CLIP); for a
        text encoder that runs sequence-first (open_clip in the WebUI) use the whole batch, ``slice(None)``.
        """
        if not self.attached:
            raise RuntimeError("attach() the patch before running a row plan")
        segments = []
        for rows, group in plan:
            if not isinstance(rows, slice) or rows.step not in (None, 1):
                raise ValueError(f"row plans take slices with step 1, got {rows!r}")
            if group is None:
                continue
            if not isinstance(group, int) or not 0 <= group < self.groups:
                raise ValueError(f"group {group!r} does not exist; this patch has {self.groups}")
            whole = rows.start in (None, 0) and rows.stop is None
            segments.append((None if whole else rows, group))
        previous = self._state.segments
        self._state.segments = tuple(segments)
        try:
            yield self
        finally:
            self._state.segments = previous

    # merged reference and housekeeping

    @torch.no_grad()
    def merge_into(self, group: int, sign: float = 1.0) -> None:
        """Add ``sign ×`` group's change into the layer weights themselves (a merged reference model).

        Changes computed from the layer's own weight (IA3, DoRA, OFT) were fixed at build time, so ``sign=-1``
        undoes a merge up to rounding. Not allowed while attached.
        """
        if self.attached:
            raise RuntimeError("detach() the patch before merging it into the weights")
        for site in self._sites:
            op = site.ops[group]
            if op is None:
                continue
            if isinstance(op, MhaReplace):
                for owner, name, rows, change in op.changes():
                    _add_param(owner, name, rows, change, sign, size=owner.out_proj.weight.shape[0] * 3
                               if name.startswith("in_proj") else None)
                continue
            module = site.module
            change = op.weight_delta()
            if change is not None:
                _add_param(module, "weight", slice(None), change.reshape(module.weight.shape), sign)
            bias = op.bias_delta if isinstance(op, NormReplace) else op.bias
            if bias is not None:
                _add_param(module, "bias", slice(None), bias.reshape(-1), sign)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> DeltaPatch:
        """Move the precomputed tensors (e.g. with the source model between CPU and GPU)."""
        for site in self._sites:
            for op in site.ops:
                if op is not None:
                    op.to(device=device, dtype=dtype)
        return self

    def nbytes(self) -> int:
        """Memory held by the precomputed changes."""
        return sum(op.nbytes() for site in self._sites for op in site.ops if op is not None)

    @property
    def folded_layers(self) -> int:
        """How many layers run folded now: stacked, and with folding on."""
        return sum(1 for s in self._sites if s.fold is not None and s.fold.wide() is not None) if self.folding else 0

    @property
    def modules(self) -> list[nn.Module]:
        return [s.module for s in self._sites]

    def summary(self) -> str:
        lines = [f"group {g}: {r.summary()}" for g, reports in enumerate(self.reports) for r in reports]
        lines.append(f"{len(self._sites)} layers patched, {self.nbytes() / 2**20:.1f} MiB extra")
        return "\n".join(lines)


def _add_param(owner: nn.Module, name: str, rows: slice, change: torch.Tensor, sign: float,
               size: int | None = None) -> None:
    param = owner._parameters[name]
    if param is None:  # a bias the layer was built without
        ref = owner._parameters["weight"] if "weight" in owner._parameters else owner.in_proj_weight
        param = nn.Parameter(torch.zeros(size or change.shape[0], device=ref.device, dtype=ref.dtype),
                             requires_grad=False)
        owner._parameters[name] = param
    param.data[rows] += sign * change.to(device=param.device, dtype=param.dtype)


# --- forwards -------------------------------------------------------------------------------------------------


@functools.cache
def _autocast_probe():
    """``dtype_of(device_type)``: the active autocast dtype or None (torch < 2.4 knows only CUDA's, by old names)."""
    if hasattr(torch, "get_autocast_dtype"):
        return lambda dt: torch.get_autocast_dtype(dt) if torch.is_autocast_enabled(dt) else None
    return lambda dt: torch.get_autocast_gpu_dtype() if dt == "cuda" and torch.is_autocast_enabled() else None


def _additive_forward(module: nn.Module, ops: tuple, state: _RowState, saved, fold: WeightFold | None):
    cls = type(module)  # looked up per call: hosts patch class forwards (the WebUI's Lora, manual casts)
    dtype = compute_dtype(module.weight)
    autocast_dtype = _autocast_probe()
    conv = isinstance(module, nn.Conv2d)

    def forward(x, *args, **kwargs):
        if state.segments:
            cast = autocast_dtype(x.device.type)
            if x.dtype != dtype and cast == dtype:
                x = x.to(dtype)  # the layer casts its input anyway: cast once, for it and for the LoRA terms
            if fold is not None and state.folding and x.dtype == dtype and cast in (None, dtype) and not args \
                    and not kwargs and (wide := fold.wide()) is not None:
                return _folded_call(module, ops, state.segments, fold, wide, x, conv)
        out = saved(x, *args, **kwargs) if saved is not None else cls.forward(module, x, *args, **kwargs)
        for rows, group in state.segments:
            op = ops[group]
            if op is not None:
                if rows is None:
                    op(x, out)
                else:
                    op(x[rows], out[rows])
        return out

    return forward


def _folded_call(module: nn.Module, ops: tuple, segments: tuple, fold: WeightFold, wide: tuple, x: torch.Tensor,
                 conv: bool) -> torch.Tensor:
    """One GEMM (or convolution) over the stacked weight; its first columns are the layer's output, each
    group's columns the down-projection that its up-projection adds into that group's rows."""
    weight, bias = wide
    full = module._conv_forward(x, weight, bias) if conv else F.linear(x, weight, bias)
    dim = 1 if conv else -1
    out = full.narrow(dim, 0, fold.rows)
    for rows, group in segments:
        op = ops[group]
        if op is None:
            continue
        span = fold.spans.get(group)
        if span is None:  # this group's change is dense here
            op(x if rows is None else x[rows], out if rows is None else out[rows])
        else:
            op.add_up((full if rows is None else full[rows]).narrow(dim, *span), out if rows is None else out[rows])
    return out


def _norm_forward(module: nn.Module, ops: tuple, state: _RowState, saved, fold=None):
    cls = type(module)

    def call(x):
        return saved(x) if saved is not None else cls.forward(module, x)

    def forward(x):
        out = call(x)
        for rows, group in state.segments:
            op = ops[group]
            if op is not None:
                if rows is None:
                    op(x, out, call)
                else:
                    op(x[rows], out[rows], call)
        return out

    return forward


@functools.cache
def _mha_signature() -> inspect.Signature:
    return inspect.signature(nn.MultiheadAttention.forward)


def _mha_forward(module: nn.MultiheadAttention, ops: tuple, state: _RowState, saved, fold=None):
    cls = type(module)

    def call(*args, **kwargs):
        return saved(*args, **kwargs) if saved is not None else cls.forward(module, *args, **kwargs)

    def forward(*args, **kwargs):
        result = call(*args, **kwargs)
        for rows, group in state.segments:
            op = ops[group]
            if op is None:
                continue
            with op.swapped():
                if rows is None:
                    result = call(*args, **kwargs)
                else:
                    result = _mha_rows(module, call, args, kwargs, rows, result)
        return result

    return forward


def _mha_rows(module: nn.MultiheadAttention, call, args: tuple, kwargs: dict, rows: slice, result):
    bound = _mha_signature().bind(module, *args, **kwargs)
    a = bound.arguments
    query = a["query"]
    if query.dim() != 3:
        raise ValueError("a partial row plan needs batched MultiheadAttention input")
    dim = 0 if module.batch_first else 1
    start, stop, _ = rows.indices(query.shape[dim])
    for name in ("query", "key", "value"):
        a[name] = a[name].narrow(dim, start, stop - start)
    if a.get("key_padding_mask") is not None:
        a["key_padding_mask"] = a["key_padding_mask"][start:stop]
    mask = a.get("attn_mask")
    if mask is not None and mask.dim() == 3:
        a["attn_mask"] = mask[start * module.num_heads: stop * module.num_heads]
    del a["self"]
    sub = call(**a)
    result[0].narrow(dim, start, stop - start).copy_(sub[0])
    if result[1] is not None and sub[1] is not None:
        result[1][start:stop].copy_(sub[1])
    return result


_FORWARDS = {"linear": _additive_forward, "conv": _additive_forward, "norm": _norm_forward, "mha": _mha_forward}
