"""What a patched layer adds for one adaptation group, precomputed once and run on that group's rows.

Every op is ``op(x, out)`` on the group's rows of the layer input and of the plain layer output, which it changes
in place. All files of a group that touch one layer are fused into a single op at load: low-rank factors are
concatenated along the rank (one thin GEMM pair however many files), and when any file is dense or the summed
rank costs more than the full matrix, everything is summed into one ``ΔW``. Scales and multipliers are folded in;
tensors are stored in the layer's dtype on its device (and follow the input to another device on first use).

Kernel launches per layer and group: Linear low-rank 2 (mm, addmm into a view of the output), Linear dense 1,
Conv low-rank 2 (conv, baddbmm into the output), Conv dense 2; +1 for a bias change; diffusers Flux modules that are
rows of one fused layer (q, k, v of ``qkv``) share the mm and add one addmm per block of rows. Folded (on CUDA,
:mod:`.fold`), a low-rank op's down-projection comes out of the layer's own GEMM and :meth:`add_up` is all it
runs. Normalisation layers and ``nn.MultiheadAttention`` recompute their rows with merged parameters swapped in
(text encoders run once per batch, so simplicity wins there).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .formats import Delta


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The layer's dtype, or float16 for storage-only dtypes (fp8) that matmul cannot take."""
    if weight.is_floating_point() and weight.element_size() >= 2:
        return weight.dtype
    return torch.float16


def fuse(deltas: list[Delta], weight_shape: torch.Size, low_rank: bool = True) -> Delta:
    """One delta for all files of a group on one weight (float32); dense unless ``low_rank`` and cheaper so."""
    bias = _bias(deltas)
    low = [d for d in deltas if d.up is not None]
    dense = [d.dense for d in deltas if d.dense is not None]
    if low and not dense:
        up = torch.cat([d.up for d in low], dim=1)
        down = torch.cat([d.down for d in low], dim=0)
        fan_in, fan_out = math.prod(weight_shape[1:]), weight_shape[0]
        if low_rank and up.shape[1] * (fan_in + fan_out) < fan_in * fan_out:
            return Delta(up=up, down=down, bias=bias)
        dense = [Delta(up=up, down=down).materialise()]
    elif low:
        dense += [d.materialise() for d in low]
    total = None
    for t in dense:
        total = t.clone() if total is None else total.add_(t)
    return Delta(dense=total, bias=bias)


def _bias(deltas: list[Delta]) -> torch.Tensor | None:
    bias = None
    for d in deltas:
        if d.bias is not None:
            bias = d.bias if bias is None else bias + d.bias
    return bias


class _Op:
    """Tensors in one dtype on one device; moved once if the input arrives elsewhere."""

    tensors: tuple[str, ...] = ()

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        for name in self.tensors:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(device=device, dtype=dtype if t.is_floating_point() else None))
        self._sync()

    def _sync(self) -> None:
        pass

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for n in self.tensors if (t := getattr(self, n)) is not None)


class LinearLowRank(_Op):
    tensors = ("down", "up", "bias")

    def __init__(self, delta: Delta, dtype: torch.dtype, device: torch.device):
        self.down = delta.down.to(device, dtype).contiguous()  # (R, in)
        self.up = delta.up.to(device, dtype).contiguous()  # (out, R)
        self.bias = None if delta.bias is None else delta.bias.to(device, dtype)
        self._sync()

    def _sync(self) -> None:
        self.down_t, self.up_t = self.down.t(), self.up.t()

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        dt = self.down.dtype
        if x.dtype != dt or x.device != self.down.device:
            if x.device != self.down.device:
                self.to(device=x.device)
            x = x.to(dt)
        self.add_up(torch.mm(x.reshape(-1, x.shape[-1]), self.down_t), out)

    def add_up(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """``out += h @ upᵀ (+ bias)``: ``h`` the rows' down-projection, ``out`` their output (may be strided)."""
        if self.up.device != out.device:
            self.to(device=out.device)
        h = h.reshape(-1, h.shape[-1])
        _add_product(h, self.up_t, out, _flat_rows(out) if h.dtype == self.up.dtype == out.dtype else None)
        if self.bias is not None:
            out.add_(self.bias)

    def weight_delta(self) -> torch.Tensor:
        return self.up @ self.down


class LinearRowBlocks(LinearLowRank):
    """Low-rank changes to blocks of a fused layer's rows (diffusers Flux modules: q, k and v of ``qkv``), each
    added into its own rows: one down-projection for all of them (folded like any other, :mod:`.fold`), then one
    GEMM per block, so no up factor is padded with zeros to the layer's height. A change to the whole layer (a
    kohya file of the same group) is a block of every row."""

    tensors = ("down", "bias")

    def __init__(self, deltas: list[Delta], weight_shape: torch.Size, dtype: torch.dtype, device: torch.device):
        self.height = weight_shape[0]
        blocks: dict[tuple[int, int], list[Delta]] = {}
        for d in deltas:
            if d.up is not None:
                blocks.setdefault(d.rows or (0, self.height), []).append(d)
        self.down = torch.cat([d.down for ds in blocks.values() for d in ds]).to(device, dtype).contiguous()  # (R, in)
        self.ups = tuple(torch.cat([d.up for d in ds], dim=1).to(device, dtype).contiguous()
                         for ds in blocks.values())  # (rows of the block, its rank)
        self.spans: list[tuple[slice, slice]] = []  # (the block's rows, its columns of the down-projection)
        start = 0
        for (first, count), up in zip(blocks, self.ups, strict=True):
            self.spans.append((slice(first, first + count), slice(start, start + up.shape[1])))
            start += up.shape[1]
        bias = _bias(deltas)
        self.bias = None if bias is None else bias.to(device, dtype)
        self._sync()

    @staticmethod
    def pays(deltas: list[Delta], weight_shape: torch.Size) -> bool:
        """Whether every change is low-rank and the blocks hold fewer numbers than one dense ``ΔW``."""
        if any(d.dense is not None for d in deltas):
            return False
        fan_in = math.prod(weight_shape[1:])
        numbers = sum(d.up.shape[1] * (fan_in + d.up.shape[0]) for d in deltas if d.up is not None)
        return numbers < fan_in * weight_shape[0]

    def _sync(self) -> None:
        self.down_t = self.down.t()
        self.ups_t = tuple(up.t() for up in self.ups)

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.ups = tuple(up.to(device=device, dtype=dtype) for up in self.ups)
        super().to(device=device, dtype=dtype)

    def nbytes(self) -> int:
        return super().nbytes() + sum(up.numel() * up.element_size() for up in self.ups)

    def add_up(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """``out[…, block] += h[:, its ranks] @ upᵀ`` for every block (+ bias)."""
        if self.down.device != out.device:
            self.to(device=out.device)
        h = h.reshape(-1, h.shape[-1])
        rows = _flat_rows(out) if h.dtype == self.down.dtype == out.dtype else None
        for (block, ranks), up_t in zip(self.spans, self.ups_t, strict=True):
            _add_product(h[:, ranks], up_t, out, rows, block)
        if self.bias is not None:
            out.add_(self.bias)

    def weight_delta(self) -> torch.Tensor:
        change = self.down.new_zeros(self.height, self.down.shape[1])
        for (block, ranks), up in zip(self.spans, self.ups, strict=True):
            change[block] += up @ self.down[ranks]
        return change


class LinearDense(_Op):
    tensors = ("delta", "bias")

    def __init__(self, delta: Delta, dtype: torch.dtype, device: torch.device):
        self.delta = None if delta.dense is None else delta.dense.to(device, dtype).contiguous()  # (out, in)
        self.bias = None if delta.bias is None else delta.bias.to(device, dtype)
        self._sync()

    def _sync(self) -> None:
        self.delta_t = None if self.delta is None else self.delta.t()

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if self.delta is not None:
            if x.dtype != self.delta.dtype or x.device != self.delta.device:
                if x.device != self.delta.device:
                    self.to(device=x.device)
                x = x.to(self.delta.dtype)
            x2 = x.reshape(-1, x.shape[-1])
            if out.dtype == x2.dtype and out.is_contiguous():  # in-place addmm_ is never autocast
                out.view(-1, out.shape[-1]).addmm_(x2, self.delta_t)
            else:
                out.add_(torch.mm(x2, self.delta_t).view(out.shape).to(out.dtype))
        if self.bias is not None:
            if self.bias.device != out.device:
                self.to(device=out.device)
            out.add_(self.bias)

    def weight_delta(self) -> torch.Tensor | None:
        return self.delta


class _ConvOp(_Op):
    def __init__(self, module: nn.Conv2d):
        self.module = module  # stride/padding/padding_mode read per call: the WebUI's tiling switches them

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        m = self.module
        if m.padding_mode != "zeros":
            return F.conv2d(F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), weight, bias,
                            m.stride, 0, m.dilation, m.groups)
        return F.conv2d(x, weight, bias, m.stride, m.padding, m.dilation, m.groups)


class ConvLowRank(_ConvOp):
    tensors = ("down", "up", "bias")

    def __init__(self, module: nn.Conv2d, delta: Delta, dtype: torch.dtype, device: torch.device):
        super().__init__(module)
        self.down = delta.down.to(device, dtype).contiguous()  # (R, in, kh, kw): the layer's own kernel geometry
        self.up = delta.up.to(device, dtype).contiguous()  # (out, R): a 1×1 conv, done as a batched GEMM
        self.bias = None if delta.bias is None else delta.bias.to(device, dtype)[:, None, None]

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        if x.dtype != self.down.dtype or x.device != self.down.device:
            if x.device != self.down.device:
                self.to(device=x.device)
            x = x.to(self.down.dtype)
        # groups == 1 is guaranteed at load (grouped convs go dense)
        m = self.module
        if m.padding_mode != "zeros":
            h = self.conv(x, self.down)
        else:
            h = F.conv2d(x, self.down, None, m.stride, m.padding, m.dilation)
        self.add_up(h, out)

    def add_up(self, h: torch.Tensor, out: torch.Tensor) -> None:
        """``out += up ⊛ h (+ bias)``, the 1×1 up-projection as a batched GEMM into the output (may be strided)."""
        if self.up.device != out.device:
            self.to(device=out.device)
        same = h.dtype == self.up.dtype == out.dtype
        planes = _flat_planes(out) if same else None
        pixels = _flat_pixels(out) if same and planes is None else None
        if planes is not None:
            n = h.shape[0]
            planes.baddbmm_(self.up.expand(n, -1, -1), h.reshape(n, h.shape[1], -1))
        elif pixels is not None:  # channels-last memory (a model so converted, or a permuted input): pixel rows
            pixels.addmm_(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]), self.up.t())
        else:  # another dtype
            out.add_(torch.matmul(self.up, h.to(self.up.dtype).flatten(2)).view(out.shape).to(out.dtype))
        if self.bias is not None:
            out.add_(self.bias)

    def weight_delta(self) -> torch.Tensor:
        return (self.up @ self.down.flatten(1)).reshape(self.up.shape[0], *self.down.shape[1:])


class ConvDense(_ConvOp):
    tensors = ("delta", "bias")

    def __init__(self, module: nn.Conv2d, delta: Delta, dtype: torch.dtype, device: torch.device):
        super().__init__(module)
        self.delta = None if delta.dense is None else delta.dense.to(device, dtype).contiguous()
        self.bias = None if delta.bias is None else delta.bias.to(device, dtype)

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> None:
        ref = self.delta if self.delta is not None else self.bias
        if x.dtype != ref.dtype or x.device != ref.device:
            if x.device != ref.device:
                self.to(device=x.device)
            x = x.to(ref.dtype)
        if self.delta is None:
            out.add_(self.bias[:, None, None].to(out.dtype))
        else:
            out.add_(self.conv(x, self.delta, self.bias).to(out.dtype))

    def weight_delta(self) -> torch.Tensor | None:
        return self.delta


def _add_product(h: torch.Tensor, up_t: torch.Tensor, out: torch.Tensor, rows: torch.Tensor | None,
                 block: slice | None = None) -> None:
    """``out[…, block] += h @ up_t`` (every feature without ``block``): in place into the output's own memory where
    ``rows`` is its flat view (one GEMM with beta = 1), else through a product in ``up_t``'s dtype (an autocast to
    another dtype, or an output whose rows cannot be flattened)."""
    if rows is not None:
        (rows if block is None else rows[:, block]).addmm_(h, up_t)
        return
    target = out if block is None else out[..., block]
    target.add_(torch.mm(h.to(up_t.dtype), up_t).view(target.shape).to(out.dtype))


def _flat_rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as (rows, features) without a copy: contiguous, or the leading columns of a wider output."""
    try:
        flat = t.view(-1, t.shape[-1])
    except RuntimeError:
        return None
    return flat if flat.stride(1) == 1 else None


def _flat_pixels(t: torch.Tensor) -> torch.Tensor | None:
    """A channels-last NCHW output as (N·H·W, C) rows without a copy (the leading channels of a wider one too)."""
    return _flat_rows(t.permute(0, 2, 3, 1)) if t.dim() == 4 else None


def _flat_planes(t: torch.Tensor) -> torch.Tensor | None:
    """An NCHW output as (N, C, H·W) without a copy, for a batched GEMM (cuBLAS takes any batch stride)."""
    try:
        flat = t.view(t.shape[0], t.shape[1], -1)
    except RuntimeError:
        return None
    return flat if flat.stride(2) == 1 and flat.stride(1) >= flat.shape[2] else None


def _swap(module: nn.Module, name: str, value: torch.Tensor | None) -> torch.Tensor | None:
    """Put ``value`` in place of parameter ``name``; returns the original, to be put back."""
    old = module._parameters[name]
    module._parameters[name] = value
    return old


class NormReplace(_Op):
    """GroupNorm/LayerNorm rows recomputed by the layer's own forward with ``W + ΔW`` and ``b + Δb``."""

    tensors = ("weight", "bias", "delta", "bias_delta")

    def __init__(self, module: nn.Module, delta: Delta, dtype: torch.dtype, device: torch.device):
        self.module = module
        w = module.weight.detach().float().to(device)
        b = None if module.bias is None else module.bias.detach().float().to(device)
        self.delta = None if delta.dense is None else delta.dense.to(device)
        self.bias_delta = None if delta.bias is None else delta.bias.to(device)
        self.weight = (w if self.delta is None else w + self.delta).to(dtype)
        if self.bias_delta is None:
            self.bias = None if b is None else b.to(dtype)
        else:
            self.bias = (self.bias_delta if b is None else b + self.bias_delta).to(dtype)

    def __call__(self, x: torch.Tensor, out: torch.Tensor, call) -> None:
        m = self.module
        if self.weight.device != x.device:
            self.to(device=x.device)
        old_w, old_b = _swap(m, "weight", self.weight), _swap(m, "bias", self.bias)
        try:
            out.copy_(call(x))
        finally:
            m._parameters["weight"], m._parameters["bias"] = old_w, old_b

    def weight_delta(self) -> torch.Tensor | None:
        return self.delta


class MhaReplace(_Op):
    """``nn.MultiheadAttention`` rows recomputed with the q/k/v/out changes merged into transient weights."""

    def __init__(self, module: nn.MultiheadAttention, slots: dict[int | str, Delta], dtype: torch.dtype,
                 device: torch.device):
        self.module = module
        self.slots = {slot: _delta_to(d, device, dtype) for slot, d in slots.items()}

    def to(self, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        self.slots = {slot: _delta_to(d, device, dtype) for slot, d in self.slots.items()}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in self.slots.values()
                   for t in (d.up, d.down, d.dense, d.bias) if t is not None)

    def changes(self) -> list[tuple[nn.Module, str, slice, torch.Tensor]]:
        """(owner, parameter name, rows, change) for every changed projection weight and bias."""
        m, e = self.module, self.module.embed_dim
        found = []
        for slot, d in self.slots.items():
            if slot == "out":
                owner, prefix, rows = m.out_proj, "", slice(None)
            else:
                owner, prefix, rows = m, "in_proj_", slice(slot * e, (slot + 1) * e)
            for name, change in ((prefix + "weight", d.materialise()), (prefix + "bias", d.bias)):
                if change is not None:
                    found.append((owner, name, rows, change))
        return found

    @contextmanager
    def swapped(self):
        """The module's projections temporarily replaced by merged copies (the originals untouched)."""
        m, e = self.module, self.module.embed_dim
        merged: dict[tuple[nn.Module, str], torch.Tensor] = {}
        for owner, name, rows, change in self.changes():
            if (owner, name) not in merged:
                base = owner._parameters[name]
                if base is None:  # a bias the layer was built without
                    size = 3 * e if name.startswith("in_proj") else e
                    base = torch.zeros(size, device=m.out_proj.weight.device, dtype=m.out_proj.weight.dtype)
                merged[owner, name] = base.detach().clone()
            target = merged[owner, name]
            target[rows] += change.to(device=target.device, dtype=target.dtype)
        old = [(owner, name, _swap(owner, name, t)) for (owner, name), t in merged.items()]
        try:
            yield
        finally:
            for owner, name, t in reversed(old):
                owner._parameters[name] = t


def _delta_to(d: Delta, device: torch.device | None, dtype: torch.dtype | None) -> Delta:
    def move(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device=device, dtype=dtype)

    return Delta(move(d.up), move(d.down), move(d.dense), move(d.bias))
