"""A layer's weight and its groups' LoRA down-projections in one buffer, so that one GEMM gives both.

With low-rank terms a patched layer launches three kernels where the merged model launches one: its own GEMM on
the whole batch, the down-projection of the adapted rows, and the up-projection added into their output. On a
launch-bound call (the source at 512 px) the count is the cost. Folding stacks the down factors under the weight,
``[W; A₀; A₁ …]``, and makes the layer's parameter a view of the stack's first rows: the layer's output and every
group's ``A·x`` come out of one GEMM (or convolution) of ``out + Σr`` columns (rounded up to a multiple of 16 with
zero rows, see ``_ALIGN``), and only the up-projection remains.
Memory: the stack replaces the weight; the down factors it holds are the ones the ops keep anyway (a second copy
of them, ``Σ r·in`` per layer: a few MiB).

The base rows pay ``r/out`` more FLOPs. Their columns matched the unfolded layer bit for bit on an H100
(float16, cuBLAS: the GPU test in tests/lora/test_fold.py, and a full-size SD1.5 UNet at 512 and 1024 px), but
nothing in BLAS promises it for every width: on the CPU a float32 GEMM of another width rounded a text-encoder
layer differently (8e-7). Hence folding only on CUDA by default, where it pays, and ``fold=False`` for exactness
by construction.

Only exact ``nn.Linear`` and 1×1 ``nn.Conv2d`` layers in float16/bfloat16/float32 are folded: their forward is one
``F.linear``/``_conv_forward``, which the folded call reproduces, and a 1×1 convolution is a GEMM over the channels.
A 3×3 convolution (LoCon's) is not: on an H100 cuDNN took another algorithm for the wider output and moved the
base rows by float16 rounding (1e-3 relative, on some widths; the same layers unfolded were exact). A subclass
with its own forward (Forge's manual-cast operations), an instance-level forward, or storage-only dtypes keep the
unfolded path too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .ops import ConvLowRank, LinearLowRank

_FOLDABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The layer's output becomes the first columns of a wider one, so its rows sit ``width`` elements apart. Kernels
# downstream assume aligned rows: PyTorch's fused attention on CUDA returned wrong values (not an error) for
# float16 q/k/v rows 36 elements apart, and exact ones at 40. A stack width that is a multiple of 16 keeps every
# row 32-byte aligned, as a contiguous output of such a layer is.
_ALIGN = 16


class WeightFold:
    """The stacked weight of one layer; :meth:`lay_out` builds it, :meth:`wide` hands it to a forward."""

    __slots__ = ("_bias", "_ptrs", "_weight", "module", "ops", "rows", "spans", "width")

    def __init__(self, module: nn.Module, ops: tuple) -> None:
        self.module = module
        self.ops = ops
        self.rows = module.weight.shape[0]
        self.spans: dict[int, tuple[int, int]] = {}  # group → (first row in the stack, rank)
        start = self.rows
        for group, op in enumerate(ops):
            if isinstance(op, (LinearLowRank, ConvLowRank)):
                self.spans[group] = (start, op.down.shape[0])
                start += op.down.shape[0]
        self.width = -(-start // _ALIGN) * _ALIGN  # zero rows pad the stack: see _ALIGN
        self._weight: Tensor | None = None
        self._bias: Tensor | None = None
        self._ptrs: tuple[int, int] = (0, 0)

    @staticmethod
    def applies(module: nn.Module, ops: tuple) -> bool:
        return ((type(module) is nn.Linear or (type(module) is nn.Conv2d and module.kernel_size == (1, 1)))
                and module.weight.dtype in _FOLDABLE_DTYPES
                and any(isinstance(op, (LinearLowRank, ConvLowRank)) for op in ops))

    def wide(self) -> tuple[Tensor, Tensor | None] | None:
        """(stacked weight, stacked bias) while the layer's parameters still live in them; else None (the model
        was moved or its parameters replaced since :meth:`lay_out`)."""
        if self._weight is None or self._where() != self._ptrs:
            return None
        return self._weight, self._bias

    def lay_out(self, on_cpu: bool = False) -> None:
        """Stack the weight (and bias) with the down factors where the layer is (a CPU layer only if ``on_cpu``);
        a no-op when in place, decided before any context is entered: hosts call it at every source call."""
        if self.wide() is None and (on_cpu or self.module.weight.is_cuda):
            self._stack()

    def _stack(self) -> None:
        with _like(self.module.weight):
            self._stack_now()

    def _stack_now(self) -> None:
        m = self.module
        weight = m.weight
        downs = [self.ops[g].down.to(device=weight.device, dtype=weight.dtype).reshape(r, *weight.shape[1:])
                 for g, (_, r) in self.spans.items()]
        pad = weight.new_zeros(self.width - self.rows - sum(r for _, r in self.spans.values()), *weight.shape[1:])
        stacked = torch.cat([weight.detach(), *downs, pad])
        bias = None
        if m.bias is not None:
            bias = torch.cat([m.bias.detach(), m.bias.new_zeros(stacked.shape[0] - self.rows)])
            m.bias.data = bias[: self.rows]
        m.weight.data = stacked[: self.rows]
        self._weight, self._bias = stacked, bias
        self._ptrs = self._where()

    def _where(self) -> tuple[int, int]:
        params = self.module._parameters  # not module.weight: nn.Module.__getattr__ costs more than the check
        bias = params.get("bias")
        return params["weight"].data_ptr(), 0 if bias is None else bias.data_ptr()

    def undo(self) -> None:
        """Give the layer compact parameters again and drop the stack (the layer's values are unchanged)."""
        if self.wide() is not None:
            self._unstack()
        self._weight = self._bias = None
        self._ptrs = (0, 0)

    def _unstack(self) -> None:
        with _like(self.module.weight):
            self._unstack_now()

    def _unstack_now(self) -> None:
        m = self.module
        m.weight.data = m.weight.data.clone()
        if m.bias is not None:
            m.bias.data = m.bias.data.clone()


@contextmanager
def _like(weight: Tensor) -> Iterator[None]:
    """Make the stack the same kind of tensor as the parameter whose data it takes. The WebUIs sample in
    inference mode: a stack made there from ordinary parameters would turn them into inference tensors (a later
    in-place update outside that mode fails), and an ordinary stack under parameters made in inference mode
    fails in the layer's own forward ("Inference tensors do not track version counter")."""
    with torch.inference_mode(weight.is_inference()), torch.no_grad():
        yield
