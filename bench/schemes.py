"""The ways to compute one step's corrected prediction, each as ``step(x, sigma) -> x0`` for one image.

Every scheme starts from the same noisy latent and returns the combined (CFG'd) x0 of the target, with the delta
added where the scheme computes one (λ = 1, CFG scale 7):

- ``target``: the target alone, one call on its 2 CFG rows;
- ``reference``: three separately CFG'd models as the authors' reference does: source base, a second copy of the
  source with the LoRA merged into its weights, and the target (6 UNet rows in 3 calls);
- ``floor``: the target's call plus one call of the source on 4 rows with plain weights (a LoRA for free);
- ``default``: :class:`~lib_delta.guidance.DeltaGuidance` with the functional LoRA: one source call on
  ``[base | adapted]`` rows, the patch attached around the call as the A1111 host does; ``held`` keeps it
  attached (as the Forge host does);
- ``cond``: cond-only deltas (2 source rows);
- ``graph``: the source call replayed from a CUDA graph; ``remote``: the source on the second GPU, started before
  the target's forward (:meth:`~lib_delta.guidance.DeltaGuidance.prefetch`); ``compile``: ``torch.compile`` of
  the source;
- ``forge-remote``: the Forge host's order of a step with the source on the second GPU: its conditioning modifier
  starts the source's call (:meth:`~lib_delta.guidance.DeltaGuidance.prefetch_combined`), the target's forward and
  CFG combine follow, and its post-CFG function corrects the combined prediction (``apply_combined``); eager, with
  the LoRA patch held attached, as that host runs it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bench.speedups import OnDevice, ReusedDelta
from devkit.denoisers import Cond
from lib_delta.args import AdaptationGroup, DeltaSettings, LoraRef
from lib_delta.cuda_graph import GraphedCall
from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SD1, SDXL, ModelSpace, SpaceBridge

from .rig import ADAPTERS, Models, Pair, conditioning, latent, nbytes
from .sources import BatchedSource, take

Step = Callable[[Tensor, Tensor], Tensor]
CFG_SCALE = 7.0
STEPS = 30
STEP_INDEX = 5  # the per-step timings run at this step of a 30-step schedule


@dataclass
class Scheme:
    key: str
    label: str
    adapter: str | None  # "lora", "lokr" or None
    step: Step
    weights: int  # bytes of the models it needs resident
    lora_bytes: int = 0
    check: str = "exact"  # compared with "reference" (cfg), "reference-cond", or "none"
    closers: list[Callable[[], None]] = field(default_factory=list)
    sources: list[BatchedSource] = field(default_factory=list)

    def close(self) -> None:
        for c in self.closers:
            c()


def cat2(t: Tensor) -> Tensor:
    return torch.cat([t, t])


class PairRig:
    """One pairing's models, conditioning, schedule and starting latent."""

    def __init__(self, models: Models, pair: Pair) -> None:
        env = self.env = models.env
        self.models, self.pair = models, pair
        self.target_unet = models.unet(pair.target, "target")
        self.source_unet = models.unet(pair.source, "source")
        self.target = models.denoiser(self.target_unet)
        self.source = models.denoiser(self.source_unet)
        self.target_cond = conditioning(self.target_unet, 2, env.tokens, 21, env.device)
        self.source_cond = conditioning(self.source_unet, 2, env.tokens, 22, env.device)
        target_space = ModelSpace(SDXL if pair.target == "sdxl" else SD1)
        self.bridge = SpaceBridge(ModelSpace(SD1), target_space)
        self.layout = CfgLayout.simple(1, CFG_SCALE)
        self.sigmas = self.target.get_sigmas(STEPS)
        self.sigma = self.sigmas[STEP_INDEX].reshape(1)
        self.x = latent(pair, self.sigma, env.device)
        self._remote: dict = {}

    def start_latent(self, sigma: Tensor, seed: int = 5) -> Tensor:
        """A generation's first latent at noise level ``sigma``."""
        return latent(self.pair, sigma, self.env.device, seed)

    # -- the schemes -------------------------------------------------------------------------------------------

    def target_only(self) -> Scheme:
        def step(x: Tensor, sigma: Tensor) -> Tensor:
            return cfg_combine(self.target(cat2(x), cat2(sigma), self.target_cond), self.layout)

        return Scheme("target", "target alone (2 rows)", None, step, nbytes(self.target_unet), check="none")

    def reference(self, adapter: str = "lora", cond_only: bool = False) -> Scheme:
        step = self._reference_step(self.target, self.source, self.models.denoiser(self.models.merged(adapter)),
                                    cond_only)
        key = "reference-cond" if cond_only else "reference"
        label = f"reference: 3 CFG'd models, merged copy ({ADAPTERS[adapter]})"
        return Scheme(key, label, adapter, step, nbytes(self.target_unet) + 2 * nbytes(self.source_unet),
                      check="self")

    def truth(self, adapter: str, cond_only: bool) -> tuple[Tensor, Tensor]:
        """(the reference's output, the target alone) in float32 without autocast or TF32, from the same weights
        before their fp16 rounding: what every fp16 scheme approximates."""
        m, f32 = self.models, torch.float32
        target = m.denoiser(m.unet(self.pair.target, "target", dtype=f32))
        step = self._reference_step(target, m.denoiser(m.unet("sd1", "source", dtype=f32)),
                                    m.denoiser(m.merged(adapter, f32)), cond_only)
        tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
        try:
            with torch.autocast("cuda", enabled=False):
                x, s = self.x, self.sigma
                return step(x, s), cfg_combine(target(cat2(x), cat2(s), self.target_cond), self.layout)
        finally:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32

    def _reference_step(self, target: torch.nn.Module, source: torch.nn.Module, merged: torch.nn.Module,
                        cond_only: bool) -> Step:
        src_cond = take(self.source_cond, [0]) if cond_only else self.source_cond

        def step(x: Tensor, sigma: Tensor) -> Tensor:
            x2, s2 = cat2(x), cat2(sigma)
            t = cfg_combine(target(x2, s2, self.target_cond), self.layout)
            xs, ss = self.bridge.to_source(x2, s2)
            if cond_only:
                xs, ss = xs[:1], ss[:1]
            base, adapted = source(xs, ss, src_cond), merged(xs, ss, src_cond)
            if not cond_only:
                base, adapted = cfg_combine(base, self.layout), cfg_combine(adapted, self.layout)
            return t + self.bridge.delta_to_target(adapted - base)

        return step

    def floor(self, sync: bool = False, graphed: bool = False) -> Scheme:
        """``sync``: plus one host read of the noise level, as the guidance makes to find λ(t). ``graphed``: the
        source call replayed as a CUDA graph, the floor of the schemes that replay theirs."""
        cond4 = take(self.source_cond, [0, 1], 2)
        source = GraphedCall(self.source) if graphed else self.source

        def step(x: Tensor, sigma: Tensor) -> Tensor:
            x2, s2 = cat2(x), cat2(sigma)
            out = self.target(x2, s2, self.target_cond)
            if sync:
                float(s2[0])
            xs, ss = self.bridge.to_source(x2, s2)
            source(cat2(xs), cat2(ss), cond4)
            return cfg_combine(out, self.layout)

        key, label = ("floor-sync", "floor + one host sync (the λ(t) read)") if sync else \
            ("floor", "floor: target + one plain 4-row source call")
        if graphed:
            key, label = "floor-graph", "floor, its source call as a CUDA graph"
        closers = [source.reset] if isinstance(source, GraphedCall) else []
        return Scheme(key, label, None, step, nbytes(self.target_unet) + nbytes(self.source_unet), check="none",
                      closers=closers)

    def delta(self, key: str, label: str, adapter: str = "lora", *, cfg_mode: str = "cfg", hold: bool = False,
              graphed: bool = False, compiled: bool = False, remote: bool = False, end: float = 1.0,
              reuse: int = 1, resolution: str = "target") -> Scheme:
        """A DeltaGuidance scheme; see the module doc for the options."""
        if remote:
            dev = self.env.second
            unet = self.models.unet("sd1", "source", dev)
            src = BatchedSource(self._remote_denoiser(dev, unet), self._remote_cond(dev),
                                self.models.patch(adapter, dev), hold=hold, graphed=graphed)
            source = OnDevice(src, dev)
        else:
            src = BatchedSource(self.source, self.source_cond, self.models.patch(adapter), hold=hold,
                                graphed=graphed, compiled=compiled)
            source = src
        if reuse > 1:
            source = ReusedDelta(source, reuse)
        group = AdaptationGroup(loras=(LoraRef("bench"),), strength=1.0, end=end)
        settings = DeltaSettings(enabled=True, source="bench", groups=(group,), cfg_mode=cfg_mode,
                                 source_resolution=resolution)
        guidance = DeltaGuidance(settings, self.bridge, source, ProgressClock(self.sigmas.tolist()))

        def step(x: Tensor, sigma: Tensor) -> Tensor:
            x2, s2 = cat2(x), cat2(sigma)
            if remote:
                guidance.prefetch(x2, s2, self.layout)
            out = self.target(x2, s2, self.target_cond)
            guidance.apply(x2, s2, out, self.layout)
            return cfg_combine(out, self.layout)

        weights = nbytes(self.target_unet) + (0 if remote else nbytes(self.source_unet))
        check = "reference-cond" if cfg_mode == "cond" else "reference"
        if reuse > 1 or end < 1.0:
            check = "none"
        return Scheme(key, label, adapter, step, weights, self.models.patch(adapter).nbytes(), check,
                      [src.close], [src])

    def forge_remote(self, key: str, label: str, *, cfg_mode: str = "cfg", end: float = 1.0) -> Scheme:
        """The Forge host's step with the source on the second GPU (see the module doc)."""
        dev = self.env.second
        unet = self.models.unet("sd1", "source", dev)
        src = BatchedSource(self._remote_denoiser(dev, unet), self._remote_cond(dev), self.models.patch("lora", dev),
                            hold=True)
        group = AdaptationGroup(loras=(LoraRef("bench"),), strength=1.0, end=end)
        settings = DeltaSettings(enabled=True, source="bench", groups=(group,), cfg_mode=cfg_mode)
        guidance = DeltaGuidance(settings, self.bridge, OnDevice(src, dev), ProgressClock(self.sigmas.tolist()))

        def step(x: Tensor, sigma: Tensor) -> Tensor:
            guidance.prefetch_combined(x, sigma, self.layout)  # the conditioning modifier
            denoised = cfg_combine(self.target(cat2(x), cat2(sigma), self.target_cond), self.layout)
            guidance.apply_combined(x, sigma, denoised, self.layout)  # the post-CFG function
            return denoised

        check = "none" if end < 1.0 else "reference-cond" if cfg_mode == "cond" else "reference"
        return Scheme(key, label, "lora", step, nbytes(self.target_unet), self.models.patch("lora").nbytes(), check,
                      [src.close], [src])

    def _remote_denoiser(self, dev: torch.device, unet: torch.nn.Module) -> torch.nn.Module:
        if "denoiser" not in self._remote:
            self._remote["denoiser"] = self.models.denoiser(unet)
        return self._remote["denoiser"]

    def _remote_cond(self, dev: torch.device) -> Cond:
        if "cond" not in self._remote:
            c = self.source_cond
            self._remote["cond"] = {k: v.to(dev) for k, v in c.items()} if isinstance(c, dict) else c.to(dev)
        return self._remote["cond"]


def step_schemes(rig: PairRig, remote: bool, full: bool) -> list[tuple[str, str, Callable[[], Scheme]]]:
    """The per-step comparison for one pair, as (key, label, factory); ``full`` adds the variants measured once."""
    out: list[tuple[str, str, Callable[[], Scheme]]] = [
        ("target", "target alone", rig.target_only),
        ("reference", "reference", lambda: rig.reference("lora")),
        ("floor", "floor", rig.floor),
        ("default", "DS default", lambda: rig.delta("default", "DS default: one source call, functional LoRA")),
        ("held", "DS held", lambda: rig.delta("held", "DS, LoRA patch held attached", hold=True)),
        ("cond", "DS cond", lambda: rig.delta("cond", "DS cond-only (2 source rows)", cfg_mode="cond")),
        ("floor-graph", "floor graph", lambda: rig.floor(graphed=True)),
        ("graph", "DS graph", lambda: rig.delta("graph", "DS + CUDA graph of the source call", graphed=True)),
    ]
    if full:
        out.append(("graph-cond", "DS cond graph", lambda: rig.delta(
            "graph-cond", "DS cond-only + CUDA graph", cfg_mode="cond", graphed=True)))
    if full:
        out.insert(3, ("floor-sync", "floor + sync", lambda: rig.floor(sync=True)))
    if remote:
        out.append(("remote", "DS remote", lambda: rig.delta("remote", "DS, source on GPU 1 (concurrent)",
                                                             remote=True)))
        out.append(("remote-graph", "DS remote graph", lambda: rig.delta(
            "remote-graph", "DS, source on GPU 1 + CUDA graph", remote=True, graphed=True)))
        out.append(("remote-graph-cond", "DS remote graph cond", lambda: rig.delta(
            "remote-graph-cond", "DS cond-only, source on GPU 1 + CUDA graph", cfg_mode="cond", remote=True,
            graphed=True)))
    out.append(("reference", "reference (LoKr)", lambda: rig.reference("lokr")))
    out.append(("default", "DS default (LoKr)", lambda: rig.delta(
        "default", "DS default: one source call, functional LoKr", "lokr")))
    if full:
        out.append(("graph", "DS graph (LoKr)", lambda: rig.delta(
            "graph", "DS + CUDA graph of the source call (LoKr)", "lokr", graphed=True)))
    return out
