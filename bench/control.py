"""The source call with a ControlNet unit on its adapted rows, against the same call without, and against the
reference scheme (the ControlNet on a second copy of the source), eager and replayed from a CUDA graph.

The call is the A1111 host's: one forward of the SD1.5 source over ``[base cond, base uncond | adapted cond,
adapted uncond]`` with :class:`~lib_delta.hosts.a1111.control_rows.RowControl` running the ControlNet on the
adapted rows only and adding its residuals to those rows' skips. The reference runs the plain source on the base
rows and a second source copy, ControlNet on all its rows, on the adapted ones (6 UNet-sized forwards become 4 +
2 ControlNet rows either way; the reference needs the copy's weights resident). The ControlNet has the real SD1.5
layout (``cldm.ControlNet``'s modules and hint convs) with random weights, its zero convs refilled so that it moves
the output. The host itself runs generations with units eagerly (their per-step windows and rows would have to key
the graph); the graphed rows say what a graph would gain.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from devkit.controlnet import build_controlnet, fill_zero_convs
from lib_delta.cuda_graph import GraphBackend, GraphedCall
from lib_delta.hosts.a1111.control_rows import RowControl

from .measure import PeakMemory, rel_err, summary, time_calls
from .rig import Env, Models, conditioning, nbytes
from .sources import take

SIZES = {False: ((512, 64), (1024, 128)), True: ((512, 8), (1024, 16))}  # (px, latent side), by --toy
SIGMA = 3.0  # a mid-schedule noise level: the ControlNet matters most there
FILL_SCALE = 0.5  # the refilled zero convs' noise: the control moves the output without swamping it
BASE, ADAPTED = slice(0, 2), slice(2, 4)


@dataclass
class BenchUnit:
    """What :class:`RowControl` asks of a loaded unit: its net, its hint at the call's size, and the per-residual
    weights (one per input block and the middle block)."""

    net: nn.Module
    hint_map: Tensor
    weight: float = 1.0

    def hint(self, height: int, width: int, device: torch.device) -> Tensor:
        assert self.hint_map.shape[-2:] == (height, width), (self.hint_map.shape, height, width)
        return self.hint_map

    def scales(self, hires: bool) -> list[float]:
        return [self.weight] * (len(self.net.zero_convs) + 1)


def build_control(env: Env, seed: int = 31) -> nn.Module:
    """The SD1.5 ControlNet of the benchmark's size (``--toy``: the tiny preset), its zero convs refilled."""
    with torch.device(env.device):
        net = build_controlnet("sd1", env.size)
    fill_zero_convs(net, torch.Generator(env.device).manual_seed(seed), FILL_SCALE)
    return net.to(env.dtype).eval().requires_grad_(False)


def hint_image(px: int, device: torch.device) -> Tensor:
    """A control image as a preprocessor hands it over: (1, 3, px, px) in [0, 1], a bright disc's outline (an edge
    map of a round shape)."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, px, device=device), torch.linspace(-1, 1, px, device=device),
                            indexing="ij")
    ring = ((xx.square() + yy.square()).sqrt() - 0.5).abs() < 4 / px
    return ring.float().expand(1, 3, px, px).contiguous()


def measure_control(env: Env, models: Models, args: argparse.Namespace, backend: GraphBackend | None = None) -> dict:
    """Per image size: every call eager and graphed, in interleaved rounds; how far they are apart. ``backend``:
    :class:`~lib_delta.cuda_graph.GraphedCall`'s (the default records CUDA graphs; tests pass a stand-in)."""
    unet = models.unet("sd1", "source")
    den = models.denoiser(unet)
    copy_unet = models._copy(unet)  # the reference's second source; copied before any hook is on the source
    copy_den = models.denoiser(copy_unet)
    net = build_control(env)
    ours, theirs = RowControl(unet), RowControl(copy_unet)
    cond = take(conditioning(unet, 2, env.tokens, 22, env.device), [0, 1], 2)
    sizes = []
    try:
        for px, side in SIZES[env.toy]:
            g = torch.Generator(env.device).manual_seed(5)
            x = torch.randn(1, 4, side, side, generator=g, device=env.device) * SIGMA
            unit = BenchUnit(net, hint_image(side * 8, env.device).to(env.dtype))
            sizes.append(_measure_size(env, args, den, copy_den, ours, theirs, unit, x, cond, px, backend))
    finally:
        ours.remove()
        theirs.remove()
    return {"controlnet_mb": nbytes(net) / 2**20, "source_mb": nbytes(unet) / 2**20,
            "layout": "SD1.5 cldm.ControlNet" + (" (tiny preset)" if env.toy else ""), "sizes": sizes}


def _calls(den: nn.Module, copy_den: nn.Module, ours: RowControl, theirs: RowControl, unit: BenchUnit,
           cond: object) -> dict[str, Callable[[Tensor, Tensor, object], Tensor]]:
    """The three calls on the 4 rows ``(x, sigma, cond)``, each returning all 4 rows' predictions. The reference's
    halves of ``cond`` are taken here, once: a host-to-device copy (the row index) cannot be captured in a graph."""
    cond_base, cond_adapted = take(cond, [0, 1]), take(cond, [2, 3])

    def plain(x: Tensor, s: Tensor, c: object) -> Tensor:
        return den(x, s, c)

    def rows(x: Tensor, s: Tensor, c: object) -> Tensor:
        with ours.rows([(ADAPTED, [unit])]):
            return den(x, s, c)

    def reference(x: Tensor, s: Tensor, c: object) -> Tensor:
        base = den(x[BASE], s[BASE], cond_base)
        with theirs.rows([(slice(0, 2), [unit])]):
            adapted = copy_den(x[ADAPTED], s[ADAPTED], cond_adapted)
        return torch.cat([base, adapted])

    return {"plain": plain, "rows": rows, "reference": reference}


def _measure_size(env: Env, args: argparse.Namespace, den: nn.Module, copy_den: nn.Module, ours: RowControl,
                  theirs: RowControl, unit: BenchUnit, x: Tensor, cond: object, px: int,
                  backend: GraphBackend | None) -> dict:
    x4, s4 = torch.cat([x] * 4), torch.full((4,), SIGMA, device=env.device)
    eager = _calls(den, copy_den, ours, theirs, unit, cond)
    graphs = {k: GraphedCall(fn, backend=backend) for k, fn in eager.items()}
    calls: dict[str, Callable[[], Tensor]] = {k: (lambda f=fn: f(x4, s4, cond)) for k, fn in eager.items()}
    calls |= {f"graph_{k}": (lambda g=g: g(x4, s4, cond)) for k, g in graphs.items()}
    samples: dict[str, list[float]] = {k: [] for k in calls}
    peaks: dict[str, int] = {}
    for rnd in range(args.rounds):
        for k, fn in calls.items():
            with PeakMemory(env) as mem:
                samples[k] += time_calls(env, fn, args.warmup if rnd == 0 else 1, args.iters)
            peaks[k] = max(peaks.get(k, 0), *mem.peaks.values(), 0)
    out = {k: fn() for k, fn in calls.items()}
    graphed = all(g.replays > 0 for g in graphs.values())
    for g in graphs.values():
        g.reset()
    plain, rows, ref = out["plain"], out["rows"], out["reference"]
    return {
        "px": px, "latent": x.shape[-1], "graphed": graphed,
        **{k: summary(v) for k, v in samples.items()},
        "transient_mb": {k: v / 2**20 for k, v in peaks.items()},
        "finite": all(bool(torch.isfinite(t).all()) for t in out.values()),
        # the ControlNet moves the adapted rows, so the agreements below mean something
        "control_size": rel_err(rows[ADAPTED], plain[ADAPTED]),
        # the base rows of the call with the unit are the plain call's (nothing added outside the plan)
        "base_rows_vs_plain": rel_err(rows[BASE], plain[BASE]),
        "adapted_rows_vs_reference": rel_err(rows[ADAPTED], ref[ADAPTED]),
        "graph_vs_eager": max(rel_err(out[f"graph_{k}"], out[k]) for k in eager),
    }
