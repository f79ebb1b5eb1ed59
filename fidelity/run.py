"""Run the fidelity study.

    python -m fidelity.run --out fidelity/out --device cuda          # the full study (a few minutes on one GPU)
    python -m fidelity.run --out fidelity/out --toy                  # the whole pipeline at toy size on the CPU
    python -m fidelity.run --stages resolution --out fidelity/out-resolution --device cuda   # fidelity/resolution.py
    python -m fidelity.run --stages control --out fidelity/out-control --device cuda         # fidelity/control.py

Trained models and adapter files go to ``--out``; results.json, log.txt and the figures to ``--results``
(default: the same folder).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from . import config, plots
from .models import WEIGHTINGS
from .pipeline import run_study


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fidelity.run", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("fidelity/out"))
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--toy", action="store_true", help="tiny models and a few steps: the CPU smoke run")
    p.add_argument("--deadline", type=float, default=None, help="seconds; later grid runs are skipped past it")
    p.add_argument("--train-scale", type=float, default=1.0,
                   help="multiply every training budget (seconds and planned steps)")
    p.add_argument("--batch-scale", type=float, default=1.0, help="multiply the models' and adapters' batches")
    p.add_argument("--images", type=int, default=None, help="evaluation images per configuration")
    p.add_argument("--steps", type=int, default=None, help="sampling steps")
    p.add_argument("--stages", default=None, help="comma-separated subset of the grid's stages; 'resolution' runs "
                   "the source-resolution study (fidelity/resolution.py) on its own, 'control' the ControlNet study "
                   "(fidelity/control.py)")
    p.add_argument("--reuse-models", action="store_true",
                   help="load models an earlier run trained into the same --out instead of training them again")
    p.add_argument("--models-only", default=None,
                   help="comma-separated models to train (or reuse), save to --out, measure each alone, and stop: a "
                        "long training split over several runs, finished by one with --reuse-models")
    p.add_argument("--eps-channels", type=int, default=None,
                   help="base width of the two ε UNets (the layout's GroupNorm has 32 groups: at 32 channels it "
                        "normalises every channel on its own)")
    p.add_argument("--eps-weighting", choices=sorted(WEIGHTINGS), default=config.EPS_WEIGHTING,
                   help="loss weighting of the two ε UNets: none (the plain ε MSE, the default), x0 (their x0 "
                        "error weighted as the v objective weighs it) or min_snr (min-SNR-5)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    if args.stages == "resolution":  # its own world sizes, models and runs
        from . import resolution

        cfg = resolution.toy() if args.toy else resolution.full(args.train_scale)
        cfg = replace(cfg, **{k: v for k, v in (("deadline_s", args.deadline), ("images", args.images),
                                                 ("steps", args.steps)) if v is not None})
        return resolution.run_stage(cfg, torch.device(args.device), args.out, args.results or args.out)
    if args.stages == "control":  # its own models, adapter and measures
        from . import control

        ccfg = control.toy() if args.toy else control.full(args.train_scale)
        ccfg = replace(ccfg, **{k: v for k, v in (("deadline_s", args.deadline), ("images", args.images),
                                                   ("steps", args.steps)) if v is not None})
        return control.run_stage(ccfg, torch.device(args.device), args.out, args.results or args.out)
    cfg = (config.toy(args.eps_weighting) if args.toy
           else config.full(args.train_scale, batch_scale=args.batch_scale, eps_weighting=args.eps_weighting))
    cfg = config.with_overrides(cfg, images=args.images, steps=args.steps, deadline_s=args.deadline,
                                stages=tuple(args.stages.split(",")) if args.stages else None,
                                reuse_models=args.reuse_models or None, eps_channels=args.eps_channels,
                                models_only=tuple(args.models_only.split(",")) if args.models_only else None)
    results_dir = args.results or args.out
    device = torch.device(args.device)
    t0 = time.perf_counter()
    res, images = run_study(cfg, device, args.out, results_dir)
    res["timings"]["total"] = round(time.perf_counter() - t0, 1)
    results_dir.mkdir(parents=True, exist_ok=True)
    if cfg.models_only:
        alone = ", ".join(f"{k[6:]} {v['fidelity']:.1%}" for k, v in res.get("references", {}).items())
        print(f"trained {', '.join(cfg.models_only)} into {args.out} in {res['timings']['total']}s; "
              f"class fidelity alone: {alone}")
        return res
    (results_dir / "results.json").write_text(json.dumps(res, indent=1, default=float))
    try:
        written = plots.make_all(res, images, results_dir)
    except Exception:  # the measurements are written already; a figure must not lose them
        traceback.print_exc()
        written = []
    print(f"wrote {results_dir / 'results.json'} and {len(written)} figures in {res['timings']['total']}s")
    return res


if __name__ == "__main__":
    main()
