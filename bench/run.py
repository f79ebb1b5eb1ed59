"""Run the benchmark and write results.json, performance.md and performance.png.

    python -m bench.run --out bench/out            # on a CUDA machine (two GPUs add the second-GPU schemes)
    python -m bench.run --toy --out bench/out      # tiny models on the CPU, in seconds: checks the machinery
    python -m bench.run --sections controlnet --out bench/out-cn --budget 200   # the ControlNet call alone
    python -m bench.report bench/out/results.json --flops --docs   # docs/performance.md and its chart

Sections run in order of importance and the JSON is rewritten after each, so a run cut short keeps what it
measured; ``--budget`` (seconds) skips the optional sections that would not fit.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import math
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from devkit.sampling import sample_euler
from lib_delta.cuda_graph import GraphedCall

from . import report
from .control import measure_control
from .encoder import measure_encoder
from .layers import measure_lora_layers
from .measure import PeakMemory, psnr, rel_err, summary, time_calls
from .profiling import gpu_time_by_op, profile_steps
from .rig import ADAPTERS, FULL_PAIRS, TOY_PAIRS, Env, Models, Pair
from .schemes import STEPS, PairRig, Scheme, step_schemes
from .sources import take

# --toy (float32): relative error of the output / of the delta against the reference scheme
TOLERANCE = (1e-5, 1e-4)
# fp16 on a GPU: the delta's error against the float32 truth may exceed the fp16 reference's own by this factor
TRUTH_MARGIN = 1.5


class Run:
    def __init__(self, args: argparse.Namespace, argv: list[str]) -> None:
        self.args = args
        self.env = Env.detect(args.toy)
        self.models = Models(self.env)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()
        self.rigs: dict[str, PairRig] = {}
        self.results: dict = {
            "machine": machine(self.env),
            "command": " ".join(["python -m bench.run", *argv]),
            "toy": self.env.toy,
            "settings": {"rounds": args.rounds, "iters": args.iters, "warmup": args.warmup},
            "adapters": ADAPTERS,
            "pairs": {},
            "skipped": {},
        }

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def rig(self, pair: Pair) -> PairRig:
        if pair.key not in self.rigs:
            self.rigs[pair.key] = PairRig(self.models, pair)
        return self.rigs[pair.key]

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed, 1)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))

    def section(self, name: str, fn: Callable[[], None], needs: float = 0.0) -> None:
        """Run one section unless the budget is short; a failure is recorded, and the run goes on."""
        left = self.args.budget - self.elapsed
        if needs and left < needs:
            self.results["skipped"][name] = f"{left:.0f} s of the budget left, {needs:.0f} s needed"
            print(f"-- {name}: skipped ({self.results['skipped'][name]})", flush=True)
            return
        print(f"-- {name} ({self.elapsed:.0f} s)", flush=True)
        try:
            with self.env.sampling():
                fn()
        except Exception as e:  # keep what the other sections measure
            self.results["skipped"][name] = f"failed: {type(e).__name__}: {e}"
            traceback.print_exc()
        self.save()

    # -- sections ----------------------------------------------------------------------------------------------

    def steps(self, pair: Pair) -> None:
        rig = self.rig(pair)
        schemes, failed = [], []
        for key, label, make in step_schemes(rig, remote=self.env.second is not None, full=not self.args.quick):
            try:
                schemes.append(make())
            except Exception as e:  # e.g. no second GPU after all: the other schemes still run
                failed.append({"key": key, "label": label, "adapter": None, "error": f"{type(e).__name__}: {e}"})
                traceback.print_exc()
        rows = measure_schemes(self.env, rig, schemes, self.args, failed)
        self.results["pairs"][pair.key] = {"label": pair.label, "px": pair.px, "latent": pair.latent,
                                           "schemes": rows}
        for s in schemes:
            s.close()
        print(report.pair_table(self.results["pairs"][pair.key]), flush=True)

    def source_call(self) -> None:
        out = []
        for pair in self.pairs[:1] if self.env.toy else [p for p in self.pairs if p.target == "sdxl"]:
            out += measure_source_call(self.env, self.models, self.rig(pair), self.args)
        self.results["source_call"] = out

    def lora_layers(self) -> None:
        pair = next(p for p in self.pairs if p.px == 512) if not self.env.toy else self.pairs[0]
        self.results["lora_layers"] = measure_lora_layers(self.env, self.models, self.rig(pair))

    def generation(self, pair: Pair) -> None:
        rig = self.rig(pair)
        make: list[tuple[str, Callable[[], Scheme]]] = [
            ("target", rig.target_only),
            ("cond-window", lambda: rig.delta("cond-window", "DS cond-only, first half", cfg_mode="cond", end=0.5)),
            ("cond-window-graph", lambda: rig.delta("cond-window-graph", "DS cond-only, first half, CUDA graph",
                                                    cfg_mode="cond", end=0.5, graphed=True)),
        ]
        if self.env.second is not None:
            make.append(("cond-window-remote", lambda: rig.delta(
                "cond-window-remote", "DS cond-only, first half, GPU 1 + graph", cfg_mode="cond", end=0.5,
                remote=True, graphed=True)))
        steps = self.args.gen_steps
        self.results["generation"] = {"pair": pair.key, "label": pair.label, "steps": steps,
                                      "rows": measure_generations(self.env, rig, make, steps, self.args.gen_runs)}

    def forge_two_gpu(self) -> None:
        """P4 and P3 through the Forge host's order of a step, the source on GPU 1: per step at 512 and 1024 px (cfg
        and cond-only deltas) and a whole generation at 1024 px (cond-only on the first half). Needs two GPUs."""
        if self.env.second is None:
            self.results["skipped"]["forge-two-gpu"] = "needs two GPUs"
            print("-- forge-two-gpu: skipped (needs two GPUs)", flush=True)
            return
        out: dict = {"pairs": {}}
        self.results["forge_two_gpu"] = out
        pairs = [p for p in self.pairs if p.target == "sdxl"] or list(self.pairs[:1])
        for pair in pairs:
            rig = self.rig(pair)
            schemes = [rig.target_only(),
                       rig.forge_remote("forge-remote", "Forge: DS, source on GPU 1 (concurrent)"),
                       rig.forge_remote("forge-remote-cond", "Forge: DS cond-only, source on GPU 1 (concurrent)",
                                        cfg_mode="cond")]
            rows = measure_schemes(self.env, rig, schemes, self.args)
            for s in schemes:
                s.close()
            out["pairs"][pair.key] = {"label": pair.label, "px": pair.px, "latent": pair.latent, "schemes": rows}
            print(report.pair_table(out["pairs"][pair.key]), flush=True)
            self.save()
        big = next((p for p in pairs if p.px >= 1024), pairs[0])
        rig = self.rig(big)
        make: list[tuple[str, Callable[[], Scheme]]] = [
            ("target", rig.target_only),
            ("forge-cond-window-remote", lambda: rig.forge_remote(
                "forge-cond-window-remote", "Forge: DS cond-only, first half, source on GPU 1", cfg_mode="cond",
                end=0.5)),
        ]
        steps = self.args.gen_steps
        out["generation"] = {"pair": big.key, "label": big.label, "steps": steps,
                             "rows": measure_generations(self.env, rig, make, steps, self.args.gen_runs)}

    def reuse(self, pair: Pair) -> None:
        rig = self.rig(pair)
        make: list[tuple[str, Callable[[], Scheme]]] = [
            ("target", rig.target_only),
            ("default", lambda: rig.delta("default", "DS default (exact)")),
            ("reuse-2", lambda: rig.delta("reuse-2", "DS, delta reused for 2 steps", reuse=2)),
            ("reuse-3", lambda: rig.delta("reuse-3", "DS, delta reused for 3 steps", reuse=3)),
            ("graph-reuse-2", lambda: rig.delta("graph-reuse-2", "DS + CUDA graph, delta reused for 2 steps",
                                                graphed=True, reuse=2)),
        ]
        steps = self.args.reuse_steps
        rows = measure_generations(self.env, rig, make, steps, self.args.gen_runs, exact="default")
        self.results["reuse"] = {"pair": pair.key, "label": pair.label, "steps": steps, "rows": rows}

    def profiles(self) -> None:
        out = {}
        pairs = self.pairs[:1] if self.env.toy else self.pairs
        for pair in [p for p in pairs if not self.args.profile_px or p.px == self.args.profile_px]:
            rig = self.rig(pair)
            schemes = [rig.target_only(), rig.delta("default", "DS default"),
                       rig.delta("graph", "DS + CUDA graph of the source call", graphed=True)]
            if self.env.second is not None:  # where the time goes when the source runs beside the target
                schemes.append(rig.delta("remote-graph", "DS, source on GPU 1 + CUDA graph", remote=True,
                                         graphed=True))
            for scheme in schemes:
                prof = profile_steps(self.env, lambda s=scheme, r=rig: s.step(r.x, r.sigma), 1 if self.env.toy else 3)
                out[f"{pair.key}/{scheme.key}"] = {"label": f"{pair.label}: {scheme.label}", **prof}
                scheme.close()
        self.results["profiles"] = out

    def compiled(self, pair: Pair) -> None:
        rig = self.rig(pair)
        rig.reference("lora").close()  # the merged copy, made before the compiled scheme holds the patch
        made: dict[str, object] = {}

        def compiled_scheme() -> Scheme:
            """The one compiled scheme, compiled by its first step; kept open across the generations and the
            per-step rounds: nothing else may attach the patch meanwhile, as new layer forwards would recompile."""
            if "scheme" not in made:
                comp = rig.delta("compile", "DS + torch.compile of the source (patch held)", hold=True, compiled=True)
                t0 = time.perf_counter()
                made["first"] = comp.step(rig.x, rig.sigma)
                self.env.sync()
                made["compile_s"], made["scheme"] = time.perf_counter() - t0, comp
            comp = made["scheme"]
            for src in comp.sources:
                src.calls = 0
            return dataclasses.replace(comp, closers=[])

        # the whole generation first: the exact default attaches the patch per call, so it runs before the
        # compiled source holds it
        make: list[tuple[str, Callable[[], Scheme]]] = [
            ("target", rig.target_only),
            ("default", lambda: rig.delta("default", "DS default (exact)")),
            ("compile", compiled_scheme),
        ]
        steps = self.args.reuse_steps
        gen = measure_generations(self.env, rig, make, steps, self.args.gen_runs, exact="default")
        comp = compiled_scheme()
        rows = measure_schemes(self.env, rig, [rig.target_only(), rig.reference("lora"), comp], self.args)
        ref = rig.reference("lora").step(rig.x, rig.sigma)
        self.results["compile"] = {"pair": pair.key, "compile_s": made["compile_s"], "rows": rows,
                                   "first_call_err": rel_err(made["first"], ref),
                                   "generation": {"pair": pair.key, "label": pair.label, "steps": steps,
                                                  "rows": gen}}
        made["scheme"].close()

    def controlnet(self) -> None:
        self.results["controlnet"] = measure_control(self.env, self.models, self.args)
        print(report.controlnet_table(self.results["controlnet"]), flush=True)

    def ip_encoder(self) -> None:
        if importlib.util.find_spec("transformers") is None:  # the encoder's class; the GPU machine has it
            raise ModuleNotFoundError("transformers is not installed")
        self.results["ip_encoder"] = measure_encoder(self.env)
        print(report.encoder_table(self.results["ip_encoder"]), flush=True)

    def flops(self) -> None:
        self.results["flops"] = count_flops(self.env, self.pairs[:1] if self.env.toy else self.pairs)

    @property
    def pairs(self) -> tuple[Pair, ...]:
        pairs = TOY_PAIRS if self.env.toy else FULL_PAIRS
        if self.args.pairs:
            pairs = tuple(p for p in pairs if p.key in self.args.pairs.split(","))
        return pairs[:1] if self.args.quick else pairs

    def main(self) -> None:
        pairs = self.pairs
        wanted = set(self.args.sections.split(",")) if self.args.sections else set(SECTIONS)
        if "steps" in wanted:
            for pair in pairs:
                self.section(f"steps {pair.key}", lambda p=pair: self.steps(p), needs=20 if pair != pairs[0] else 0)
        big = next((p for p in pairs if p.px >= 1024), pairs[0])
        small = pairs[0]
        sections: dict[str, tuple[Callable[[], None], float]] = {
            "generation": (lambda: self.generation(big), 40),
            "forge-two-gpu": (self.forge_two_gpu, 60),
            "source-call": (self.source_call, 20),
            "lora-layers": (self.lora_layers, 15),
            "reuse": (lambda: self.reuse(small), 30),
            "profiles": (self.profiles, 20),
            "compile": (lambda: self.compiled(small), 100),
            "flops": (self.flops, 0 if self.env.toy else 30),
            "controlnet": (self.controlnet, 45),
            "ip-encoder": (self.ip_encoder, 15),
        }
        for name, (fn, needs) in sections.items():
            # compiling the toy models takes minutes on the CPU: there, only when named
            toy_compile = self.env.toy and not (self.args.sections and "compile" in wanted)
            if name in wanted and not (name == "compile" and (toy_compile or self.args.no_compile)) \
                    and not (name == "flops" and self.args.no_flops):
                self.section(name, fn, needs=needs)
        report.write(self.results, self.out)
        print(f"-- done in {self.elapsed:.0f} s; {self.out / 'performance.md'}", flush=True)


SECTIONS = ("steps", "generation", "forge-two-gpu", "source-call", "lora-layers", "reuse", "profiles", "compile",
            "flops", "controlnet", "ip-encoder")


# --- measuring helpers -------------------------------------------------------------------------------------------


def measure_schemes(env: Env, rig: PairRig, schemes: list[Scheme], args: argparse.Namespace,
                    failed: list[dict] | None = None) -> list[dict]:
    """Interleaved rounds of every scheme (this keeps slow drifts of the machine out of the ratios).

    A scheme that raises is reported with its error and dropped from the later rounds; the others go on.
    """
    samples: list[list[float]] = [[] for _ in schemes]
    peaks: list[dict[str, int]] = [{} for _ in schemes]
    errors: dict[int, str] = {}
    for rnd in range(args.rounds):
        for i, s in enumerate(schemes):
            if i in errors:
                continue
            try:
                with PeakMemory(env) as mem:
                    warmup = args.warmup if rnd == 0 else 1
                    samples[i] += time_calls(env, lambda s=s: s.step(rig.x, rig.sigma), warmup, args.iters)
                for d, b in mem.peaks.items():
                    peaks[i][d] = max(peaks[i].get(d, 0), b)
            except Exception as e:
                errors[i] = f"{type(e).__name__}: {e}"
                traceback.print_exc()
            for src in s.sources:
                src.release()
    target = next((s for i, s in enumerate(schemes) if s.key == "target" and i not in errors), None)
    t_out = target.step(rig.x, rig.sigma) if target else None
    refs: dict[tuple[str, str], torch.Tensor] = {}
    rows = list(failed or [])
    for i, s in enumerate(schemes):
        row = {"key": s.key, "label": s.label, "adapter": s.adapter}
        if i in errors:
            rows.append({**row, "error": errors[i]})
            continue
        row.update(**summary(samples[i]), weights_mb=s.weights / 2**20, lora_mb=s.lora_bytes / 2**20,
                   transient_mb={d: b / 2**20 for d, b in peaks[i].items()}, check=s.check)
        try:
            check_output(env, rig, s, row, t_out, refs)
        except Exception as e:
            row["check_error"] = f"{type(e).__name__}: {e}"
            traceback.print_exc()
        rows.append(row)
    return rows


def check_output(env: Env, rig: PairRig, s: Scheme, row: dict, t_out: torch.Tensor | None, refs: dict) -> None:
    """The scheme's output on the timed input against the reference scheme's (same adapter, same CFG mode) and,
    on a GPU, against the float32 truth; "ok" when it is as close to that truth as the fp16 reference is."""
    out = s.step(rig.x, rig.sigma)
    for src in s.sources:
        src.release()
        if src.graph is not None:
            row["graph"] = {"captures": src.graph.captures, "replays": src.graph.replays,
                            "failures": src.graph.failures[:2]}
    row["finite"] = bool(torch.isfinite(out).all())
    if s.check == "none" or t_out is None:
        return
    adapter = s.adapter or "lora"
    cond_only = s.check == "reference-cond"
    if not env.toy:
        if ("truth", adapter, cond_only) not in refs:
            refs["truth", adapter, cond_only] = rig.truth(adapter, cond_only)
        truth, truth_t = refs["truth", adapter, cond_only]
        row["err_truth"] = rel_err(out - t_out, truth - truth_t)
    if s.check == "self":
        refs[adapter, cond_only] = out
        return
    if (adapter, cond_only) not in refs:
        refs[adapter, cond_only] = rig.reference(adapter, cond_only=cond_only).step(rig.x, rig.sigma)
    ref = refs[adapter, cond_only]
    row["err_out"] = rel_err(out, ref)
    row["err_delta"] = rel_err(out - t_out, ref - t_out)
    row["delta_size"] = rel_err(ref, t_out)
    if env.toy:
        tol_out, tol_delta = TOLERANCE
        row["ok"] = row["finite"] and row["err_out"] <= tol_out and row["err_delta"] <= tol_delta
    else:
        ref_truth = rel_err(ref - t_out, truth - truth_t)
        row["ref_err_truth"] = ref_truth
        row["ok"] = row["finite"] and row["err_truth"] <= TRUTH_MARGIN * ref_truth


def measure_source_call(env: Env, models: Models, rig: PairRig, args: argparse.Namespace) -> list[dict]:
    """The source's 4-row call alone: plain weights against the functional LoRA on [base | adapted]."""
    den = rig.source
    xs, ss = rig.bridge.to_source(rig.x, rig.sigma)
    x4, s4 = torch.cat([xs] * 4), torch.cat([ss] * 4)
    cond4 = take(rig.source_cond, [0, 1], 2)
    plan = [(slice(0, 2), None), (slice(2, 4), 0)]
    out = []
    for adapter in ADAPTERS:
        patch = models.patch(adapter)
        merged = models.denoiser(models.merged(adapter))

        def held(patch=patch):
            patch.attach()
            with patch.rows(plan):
                return den(x4, s4, cond4)

        def per_call(patch=patch):
            patch.to(device=env.device)
            with patch, patch.rows(plan):
                return den(x4, s4, cond4)

        def held_on(x, s, c, patch=patch):
            patch.attach()
            with patch.rows(plan):
                return den(x, s, c)

        def unfolded(x=x4, s=s4, c=cond4, patch=patch):  # the same patch, its down-projections as GEMMs of their own
            patch.attach()
            patch.folding = False
            try:
                with patch.rows(plan):
                    return den(x, s, c)
            finally:
                patch.folding = True

        # replayed as CUDA graphs, as the A1111 host runs the source on a GPU: launches no longer count
        graph_plain, graph_held, graph_unfolded = GraphedCall(den), GraphedCall(held_on), GraphedCall(unfolded)
        calls = {"plain": lambda: den(x4, s4, cond4), "held": held, "attach": per_call, "unfolded": unfolded,
                 "two_calls": lambda merged=merged: (den(x4[:2], s4[:2], take(cond4, [0, 1])),
                                                     merged(x4[2:], s4[2:], take(cond4, [2, 3]))),
                 "graph_plain": lambda g=graph_plain: g(x4, s4, cond4),
                 "graph_held": lambda g=graph_held: g(x4, s4, cond4),
                 "graph_unfolded": lambda g=graph_unfolded: g(x4, s4, cond4)}
        samples: dict[str, list[float]] = {k: [] for k in calls}
        for rnd in range(args.rounds):
            for k, fn in calls.items():
                samples[k] += time_calls(env, fn, args.warmup if rnd == 0 else 1, args.iters)
            patch.detach()
        # where the extra GPU time goes, operator by operator (eager calls, so launches don't count)
        ops = {k: gpu_time_by_op(env, calls[k]) for k in ("plain", "held", "unfolded")} if env.cuda else {}
        got = held()[2:]
        got_graph = graph_held(x4, s4, cond4)[2:]
        patch.detach()
        want = merged(x4[2:], s4[2:], take(cond4, [2, 3]))
        graphed = graph_held.replays > 0 and graph_plain.replays > 0 and graph_unfolded.replays > 0
        folded = patch.folded_layers
        for g in (graph_plain, graph_held, graph_unfolded):
            g.reset()
        out.append({"px": rig.pair.px, "adapter": adapter, "layers": len(patch.modules), "folded": folded,
                    "lora_mb": patch.nbytes() / 2**20, "err_vs_merged": rel_err(got, want),
                    "graph_err_vs_merged": rel_err(got_graph, want), "graphed": graphed, "ops": ops,
                    **{k: summary(v) for k, v in samples.items()}})
    return out


def measure_generations(env: Env, rig: PairRig, make: list[tuple[str, Callable[[], Scheme]]], steps: int,
                        runs: int, exact: str | None = None) -> list[dict]:
    """Whole Euler generations; a fresh scheme per run (reuse state and graphs start empty, as in a host)."""
    sigmas = rig.target.get_sigmas(steps)
    x0 = rig.start_latent(sigmas[0].reshape(1), seed=9)
    rows, finals = [], {}
    for key, factory in make:
        times, final, evals, label = [], None, None, key
        try:
            for run in range(runs + 1):  # the first run warms up
                scheme = factory()
                label = scheme.label
                env.sync()
                t0 = time.perf_counter()
                final = sample_euler(lambda x, s, sc=scheme: sc.step(x, s), x0.clone(), sigmas)
                env.sync()
                if run:
                    times.append((time.perf_counter() - t0) * 1e3)
                evals = sum(src.calls for src in scheme.sources)
                scheme.close()
        except Exception as e:
            traceback.print_exc()
            rows.append({"key": key, "label": label, "error": f"{type(e).__name__}: {e}"})
            continue
        finals[key] = final
        rows.append({"key": key, "label": label, **summary(times), "source_calls": evals})
    if exact in finals:
        for row in rows:
            if row["key"] in finals:
                row["psnr"] = psnr(finals[row["key"]], finals[exact])
    return rows


def count_flops(env: Env, pairs: tuple[Pair, ...]) -> list[dict]:
    """FLOPs of one UNet call, counted on the meta device (no memory, no GPU)."""
    from torch.utils.flop_counter import FlopCounterMode

    from devkit.ldm_unet import build_unet

    out = []
    seen = set()
    for pair in pairs:
        for family, rows in ((pair.source, 4), (pair.source, 2), (pair.target, 2)):
            if (family, rows, pair.latent) in seen:
                continue
            seen.add((family, rows, pair.latent))
            unet = build_unet(family, env.size, device="meta").to(env.dtype)
            cfg = unet.config
            x = torch.empty(rows, 4, pair.latent, pair.latent, device="meta", dtype=env.dtype)
            ctx = torch.empty(rows, env.tokens, cfg.context_dim, device="meta", dtype=env.dtype)
            y = torch.empty(rows, cfg.adm_in_channels, device="meta", dtype=env.dtype) if cfg.adm_in_channels \
                else None
            with FlopCounterMode(display=False) as counter:
                unet(x, torch.ones(rows, device="meta"), context=ctx, y=y)
            out.append({"family": family, "rows": rows, "px": pair.px, "latent": pair.latent,
                        "tflop": counter.get_total_flops() / 1e12})
    return out


def machine(env: Env) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or "?"}
    if env.cuda:
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
    else:
        info["gpus"] = []
    return info


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="tiny models on the CPU (seconds)")
    ap.add_argument("--quick", action="store_true", help="the first pair only, fewer schemes")
    ap.add_argument("--out", default="bench/out")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds per scheme")
    ap.add_argument("--iters", type=int, default=None, help="timed steps per scheme and round")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before a scheme's first round")
    ap.add_argument("--gen-runs", type=int, default=None, help="timed whole generations per variant")
    ap.add_argument("--gen-steps", type=int, default=None, help="steps of the whole-generation section")
    ap.add_argument("--reuse-steps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds (default 480 on a GPU, none for --toy); sections that won't fit are skipped")
    ap.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--pairs", default=None, help="comma-separated pair keys, e.g. sd15-sdxl-512")
    ap.add_argument("--profile-px", type=int, default=None, help="profile only the pairs of this image size")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-flops", action="store_true", help="leave FLOP counting to bench.report --flops")
    args = ap.parse_args(argv)
    toy = args.toy or not torch.cuda.is_available()
    defaults = {"rounds": 1 if toy else 3, "iters": 2 if toy else 6, "warmup": 1 if toy else 2,
                "budget": math.inf if toy else 480.0, "gen_runs": 1 if toy else 2,
                "gen_steps": 4 if toy else STEPS, "reuse_steps": 4 if toy else 20}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    run = Run(parse(argv), argv)
    if run.env.toy:
        torch.set_num_threads(1)  # the tiny models are launch-bound; threads only spin
    run.main()
    return run.results


if __name__ == "__main__":
    main()
