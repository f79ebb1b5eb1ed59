"""ControlNet residuals on given rows of one private UNet forward: three kinds of reversible module hooks.

A forward pre-hook on the UNet sees its real inputs (ldm: ``diffusion_model(x, t, context=...)``, sgm: ``timesteps=``,
``y=``) and runs each active unit's ControlNet on its rows only; a forward hook on ``middle_block`` adds the last
residual to the middle output, and a pre-hook on each ``output_blocks[i]`` adds residual ``n - 2 - i`` to the skip
half of that block's input (ldm concatenates ``[h, hs.pop()]``, so adding to the last channels equals the
extension's ``hs.pop() + control``). Rows outside the plan get nothing added: bit-identical to no control.
The hooks act only inside :meth:`RowControl.rows`; :meth:`RowControl.remove` takes them off.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ...errors import DeltaError

LATENT_TO_PIXELS = 8  # the hint is an image at the generation's size: 8 pixels per latent cell

Plan = Sequence[tuple[slice, Sequence[Any]]]  # (rows of the call, the LoadedUnits active on them)


class RowControl:
    def __init__(self, unet: torch.nn.Module) -> None:
        self.unet = unet
        self.hires = False  # the pass: the extension weakens some maps in the hires pass
        self._plan: Plan = ()
        self._res: list[tuple[slice, list[Tensor]]] | None = None
        self._fired = False
        self._handles = [unet.register_forward_pre_hook(self._pre, with_kwargs=True),
                         unet.middle_block.register_forward_hook(self._mid)]
        self._handles += [block.register_forward_pre_hook(functools.partial(self._skip, i))
                          for i, block in enumerate(unet.output_blocks)]

    @contextlib.contextmanager
    def rows(self, plan: Plan) -> Iterator[None]:
        """One forward whose ``plan`` rows get their units' residuals."""
        self._plan, self._fired = tuple(plan), False
        try:
            yield
            if self._plan and not self._fired:  # another UNet forward ran in place of this one's blocks
                raise DeltaError("Delta Sampling could not apply its ControlNet: the source UNet's forward was "
                                 "replaced (an SD UNet option or another extension). Turn that off for this run.")
        finally:
            self._plan, self._res = (), None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._plan, self._res = (), None

    def _pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._res = None
        if not self._plan:
            return
        x = args[0]
        t = args[1] if len(args) > 1 else kwargs["timesteps"]
        context = args[2] if len(args) > 2 else kwargs.get("context")
        y = kwargs.get("y")
        height, width = x.shape[-2] * LATENT_TO_PIXELS, x.shape[-1] * LATENT_TO_PIXELS
        res = []
        for rows, units in self._plan:
            total: list[Tensor] | None = None
            for unit in units:
                net = unit.net
                x_in = x[rows, :net.input_blocks[0][0].in_channels]  # an inpainting source: the latent part only
                outs = net(x=x_in, hint=unit.hint(height, width, x.device), timesteps=t[rows],
                           context=context[rows], y=None if y is None else y[rows])
                outs = [o * s for o, s in zip(outs, unit.scales(self.hires), strict=False)]
                total = outs if total is None else [a + b for a, b in zip(total, outs, strict=True)]
            if total is not None:
                res.append((rows, total))
        self._res = res

    def _skip(self, i: int, module: torch.nn.Module, args: tuple) -> None:
        if not self._res:
            return
        h = args[0]
        for rows, outs in self._res:
            c = outs[len(outs) - 2 - i]
            h[rows, h.shape[1] - c.shape[1]:] += c

    def _mid(self, module: torch.nn.Module, args: tuple, out: Tensor) -> Tensor:
        if self._res:
            self._fired = True
            for rows, outs in self._res:
                out[rows] += outs[-1]
        return out
