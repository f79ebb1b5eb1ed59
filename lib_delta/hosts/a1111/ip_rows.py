"""IP-Adapter image-prompt attention on given rows of one private UNet forward: two reversible hooks per attn2.

IP-Adapter adds, in every cross-attention ``n``, a second attention of the same queries over the image prompt's
tokens: ``out = Attn(q, K, V) + w · Attn(q, K_ip[n], V_ip[n])`` before ``to_out``. A forward hook on ``attn2.to_q``
keeps ``q``; a forward pre-hook on ``attn2.to_out[0]`` adds ``w · SDPA(q[R], K_ip, V_ip)`` to the rows ``R`` of a plan
only. Both run under every attention optimisation of the WebUI (each computes ``to_q(x)`` and ends in ``to_out``), so
the source's own attention stays the WebUI's; rows outside the plan get nothing added: bit-identical to no adapter.
The layers are numbered as sd-webui-controlnet numbers them: the input blocks' cross-attentions in order, then the
output blocks', then the middle block's. The hooks act only inside :meth:`RowImagePrompt.rows`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import DeltaError

# (rows of the call, ((unit, marks), ...)): marks say, per row of the slice, whether it is a cond (True) or an uncond
# row; a unit is an ipadapter.LoadedIPUnit (its ``kv(n, marks, device, dtype)`` and ``weight``).
Plan = Sequence[tuple[slice, Sequence[tuple[Any, tuple[bool, ...]]]]]


def cross_attentions(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """Every ``attn2`` of an ldm/sgm UNet in sd-webui-controlnet's order: input blocks, output blocks, middle."""
    out = []
    for part in (unet.input_blocks, unet.output_blocks, unet.middle_block):
        out += [m for name, m in part.named_modules() if name.endswith("attn2")]
    return out


class RowImagePrompt:
    def __init__(self, unet: torch.nn.Module) -> None:
        self.layers = cross_attentions(unet)
        self._plan: Plan = ()
        self._q: dict[int, Tensor] = {}
        self._fired = False
        self._handles = []
        for n, attn in enumerate(self.layers):
            self._handles.append(attn.to_q.register_forward_hook(functools.partial(self._keep_q, n)))
            self._handles.append(attn.to_out[0].register_forward_pre_hook(functools.partial(self._add, n)))

    @contextlib.contextmanager
    def rows(self, plan: Plan) -> Iterator[None]:
        """One forward whose ``plan`` rows get their units' image-prompt attention."""
        self._plan, self._fired, self._q = tuple(plan), False, {}
        try:
            yield
            if self._plan and not self._fired:  # another attention ran in place of the source's own
                raise DeltaError("Delta Sampling could not apply its IP-Adapter: the source UNet's cross-attention "
                                 "was replaced (an SD UNet option or another extension). Turn that off for this run.")
        finally:
            self._plan, self._q = (), {}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._plan, self._q = (), {}

    def _keep_q(self, n: int, module: torch.nn.Module, args: tuple, out: Tensor) -> None:
        if self._plan:
            self._q[n] = out

    def _add(self, n: int, module: torch.nn.Module, args: tuple) -> None:
        if not self._plan:
            return
        q = self._q.pop(n, None)
        if q is None:  # to_q ran outside this attention (a fused projection): nothing safe to add
            return
        self._fired = True
        h = args[0]
        heads = self.layers[n].heads
        for rows, units in self._plan:
            qr = _heads(q[rows], heads)
            for unit, marks in units:
                k, v = unit.kv(n, marks, q.device, q.dtype)
                ip = torch.nn.functional.scaled_dot_product_attention(qr, _heads(k, heads), _heads(v, heads))
                h[rows] += ip.transpose(1, 2).reshape(h[rows].shape) * unit.weight


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[b, n, heads·d]`` as ``[b, heads, n, d]``."""
    b, n, inner = t.shape
    return t.view(b, n, heads, inner // heads).transpose(1, 2)
