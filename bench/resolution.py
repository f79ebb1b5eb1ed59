"""The source at its own resolution against the source at the target's: SD1.5 → SDXL at 1024² and 1536×1024.

    python -m bench.resolution --out bench/out-resolution          # on a CUDA machine (about 3 minutes on an H100)
    python -m bench.resolution --toy --out bench/out-resolution    # tiny models on the CPU: checks the machinery

Side by side in one run, per image size: the target alone, and DS default with ``source_resolution`` "target"
and "native", each eager and with the source call replayed from a CUDA graph. Per step (interleaved rounds, as
``bench.run``'s step tables) and per whole generation. Writes results.json and resolution.md to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from lib_delta.resolution import native_size
from lib_delta.spaces import ModelSpace, SpaceBridge

from .rig import Env, Models, Pair
from .run import machine, measure_generations, measure_schemes
from .schemes import PairRig, Scheme

SD15_SIDE = 512  # px: the source family's training side
SIZES = ((1024, 1024), (1024, 1536))  # (height, width) in pixels
GOAL = 1.4  # DS with the native source at 1024 px, as a multiple of the target alone


def toy_side(px_per_cell: float) -> int:
    """The source side that gives the toy latents the full run's ratio of source to target area."""
    return round(SD15_SIDE / px_per_cell * 8)


class SizedRig(PairRig):
    """A :class:`PairRig` at a (possibly non-square) latent, its source knowing its training side."""

    def __init__(self, models: Models, pair: Pair, hw: tuple[int, int], side_px: int) -> None:
        super().__init__(models, pair)
        g = torch.Generator(self.env.device).manual_seed(5)
        self.x = torch.randn(1, 4, *hw, generator=g, device=self.env.device) * self.sigma
        self.bridge = SpaceBridge(ModelSpace(self.bridge.source.latent, native_px=side_px), self.bridge.target)
        self.hw = hw

    def start_latent(self, sigma: torch.Tensor, seed: int = 5) -> torch.Tensor:
        g = torch.Generator(self.env.device).manual_seed(seed)
        return torch.randn(1, 4, *self.hw, generator=g, device=self.env.device) * sigma


def schemes(rig: SizedRig) -> list[tuple[str, Callable[[], Scheme]]]:
    """(key, factory); no output check against the reference (a fp32 SDXL copy would not fit the time): the
    native source's output differs from it by design."""
    return [(key, lambda make=make: _unchecked(make())) for key, make in _schemes(rig)]


def _unchecked(scheme: Scheme) -> Scheme:
    scheme.check = "none"
    return scheme


def _schemes(rig: SizedRig) -> list[tuple[str, Callable[[], Scheme]]]:
    return [
        ("target", rig.target_only),
        ("default", lambda: rig.delta("default", "DS default, source at the target's size")),
        ("native", lambda: rig.delta("native", "DS default, source at its own size", resolution="native")),
        ("graph", lambda: rig.delta("graph", "DS + CUDA graph, source at the target's size", graphed=True)),
        ("graph-native", lambda: rig.delta("graph-native", "DS + CUDA graph, source at its own size",
                                           graphed=True, resolution="native")),
    ]


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    env = Env.detect(args.toy)
    if env.toy:
        torch.set_num_threads(1)
    models = Models(env)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    res: dict = {"machine": machine(env), "command": " ".join(["python -m bench.resolution", *argv]),
                 "toy": env.toy, "settings": vars(args), "sizes": {}}
    for h_px, w_px in SIZES:
        key = f"sd15-sdxl-{w_px}x{h_px}"
        cell = 8 if not env.toy else 64  # pixels per latent cell (the toy latents are 8× smaller)
        hw = (h_px // cell, w_px // cell)
        side = SD15_SIDE if not env.toy else toy_side(cell)
        pair = Pair(key, "sd1", "sdxl", max(h_px, w_px), hw[0])
        print(f"-- {key} ({time.perf_counter() - t0:.0f} s)", flush=True)
        entry: dict = {"label": f"SD1.5 → SDXL, {w_px}×{h_px} px", "latent": list(hw),
                       "source_latent": list(native_size(hw, side))}
        try:
            with env.sampling():
                rig = SizedRig(models, pair, hw, side)
                made = [make() for _, make in schemes(rig)]
                entry["steps"] = measure_schemes(env, rig, made, args)
                for s in made:
                    s.close()
                entry["generation"] = _generations(env, rig, args)
        except Exception as e:  # keep what the other size measures
            traceback.print_exc()
            entry["error"] = f"{type(e).__name__}: {e}"
        res["sizes"][key] = entry
        res["elapsed_s"] = round(time.perf_counter() - t0, 1)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        print(size_table(entry), flush=True)
    (out / "resolution.md").write_text(markdown(res))
    print(f"-- done in {time.perf_counter() - t0:.0f} s; {out / 'resolution.md'}", flush=True)
    return res


def _generations(env: Env, rig: SizedRig, args: argparse.Namespace) -> list[dict]:
    """Whole generations of every scheme from one starting latent; the PSNR column is against the exact default
    at the target's size (how far the native source moves the result; random weights: a cost check, not a
    quality one)."""
    return measure_generations(env, rig, schemes(rig), args.gen_steps, args.gen_runs, exact="default")


def _ratio(rows: list[dict], key: str, base: str = "target") -> float | None:
    got = {r["key"]: r for r in rows if "median" in r}
    return got[key]["median"] / got[base]["median"] if key in got and base in got else None


def size_table(entry: dict) -> str:
    if "steps" not in entry:
        return f"**{entry['label']}**: failed: {entry.get('error')}"
    h, w = entry["latent"]
    sh, sw = entry["source_latent"]
    lines = [f"**{entry['label']}** (target latent {w}×{h}; native source latent {sw}×{sh})", "",
             "| scheme | ms/step | IQR | × target | generation ms | × target | source calls | PSNR vs default |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    gens = {r["key"]: r for r in entry.get("generation", [])}
    for r in entry["steps"]:
        if "median" not in r:
            lines.append(f"| {r['label']} | failed: {r.get('error', '?')} | | | | | | |")
            continue
        ratio = _ratio(entry["steps"], r["key"])
        g = gens.get(r["key"], {})
        g_ratio = _ratio(entry.get("generation", []), r["key"])
        psnr = g.get("psnr")
        lines.append(f"| {r['label']} | {r['median']:.2f} | {r['iqr']:.2f} | {ratio:.2f} | "
                     f"{g.get('median', float('nan')):.0f} | {g_ratio or float('nan'):.2f} | "
                     f"{g.get('source_calls', '–')} | "
                     f"{'–' if psnr is None else ('exact' if psnr == float('inf') else f'{psnr:.1f} dB')} |")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    where = ", ".join(res["machine"]["gpus"]) or "the CPU (toy models)"
    parts = ["# Source resolution: the benchmark", "", f"`{res['command']}` on {where}", ""]
    for entry in res["sizes"].values():
        parts += [size_table(entry), ""]
    first = next(iter(res["sizes"].values()), {})
    for key in ("native", "graph-native"):
        r = _ratio(first.get("steps", []), key)
        if r is not None:
            verdict = "met" if r <= GOAL else "not met"
            parts.append(f"- goal ≤ {GOAL}× the target alone at 1024² ({key}): {r:.2f}× per step, {verdict}")
    return "\n".join(parts) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.resolution", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--toy", action="store_true", help="tiny models on the CPU (seconds)")
    ap.add_argument("--out", default="bench/out-resolution")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--gen-runs", type=int, default=None)
    ap.add_argument("--gen-steps", type=int, default=None)
    args = ap.parse_args(argv)
    toy = args.toy or not torch.cuda.is_available()
    defaults = {"rounds": 1 if toy else 3, "iters": 2 if toy else 6, "warmup": 1 if toy else 2,
                "gen_runs": 1, "gen_steps": 4 if toy else 20}
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    return run(parse(argv), argv)


if __name__ == "__main__":
    main()
