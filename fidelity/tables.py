"""Markdown tables (and re-drawn charts) from a results.json: ``python -m fidelity.tables RESULTS [--plots DIR]``.

Each cell of the sweep tables reads ``recovered · fidelity · diversity``: the recovered share of the adaptation's
effect, class fidelity, and diversity relative to the target alone.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from . import plots, report
from .config import ADAPTATIONS, ATTRIBUTE

TARGET_NAMES = {"self": "self (source)", "same_family": "same family (ε UNet)", "v_unet": "v-prediction UNet",
                "flow_dit": "flow DiT"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


def _cell(row: dict | None, alone: dict) -> str:
    if row is None:
        return "–"
    rec = "–" if row["recovered"] is None else f"{row['recovered']:.2f}"
    mark = "" if report.acceptable(row, alone, "relative") else "✗"
    return f"{rec} · {_pct(row['fidelity'])} · {row['diversity'] / alone['diversity']:.2f}{mark}"


def models_table(res: dict) -> str:
    lines = ["| model | what | params | steps (s) | loss before → after | fidelity | diversity | red | striped |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|"]
    for name, t in res["training"].items():
        a = res["references"][f"alone:{name}"]
        lines.append(
            f"| {name} | {t['spec']['description']} | {t['params'] / 1e6:.1f} M | {t['steps']} ({t['seconds']:.0f}) | "
            f"{t['fixed_batch_loss']['before']:.3f} → {t['fixed_batch_loss']['after']:.3f} | {_pct(a['fidelity'])} | "
            f"{a['diversity']:.3f} | {_pct(a['red'])} | {_pct(a['striped'])} |")
    return "\n".join(lines)


def adapters_table(res: dict) -> str:
    lines = ["| adaptation | file | steps (s) | loss before → after | file vs training | source base rate | "
             "adapted source rate | fidelity base → adapted |", "|---|---|---:|---|---:|---:|---:|---|"]
    base = res["references"]["alone:source"]
    for name, a in res["adapters"].items():
        attr = ATTRIBUTE[name]
        ad = res["references"][f"adapted:{name}"]
        fmt = a["load_report"].split(": ", 2)[2].split(" (")[0]
        lines.append(
            f"| {name} ({attr}) | {fmt}, rank {a['rank']}, {a['file_bytes'] / 2**20:.1f} MiB | {a['steps']} "
            f"({a['seconds']:.0f}) | {a['fixed_batch_loss']['before']:.3f} → {a['fixed_batch_loss']['after']:.3f} | "
            f"{a['file_vs_training_rel_err']:.1e} | {_pct(base[attr])} | {_pct(ad[attr])} | "
            f"{_pct(base['fidelity'])} → {_pct(ad['fidelity'])} |")
    return "\n".join(lines)


def lambda_table(res: dict, name: str) -> str:
    lambdas = res["config"]["lambdas"]
    attr = ATTRIBUTE[name]
    head = "| target | alone: rate · fidelity | " + " | ".join(f"λ = {lam:g}" for lam in lambdas[1:]) + " |"
    lines = [head, "|---|---|" + "---|" * (len(lambdas) - 1)]
    for target in ("self", "same_family", "v_unet", "flow_dit"):
        alone = res["references"][f"alone:{report.model_of(target)}"]
        for clamp in (False, True):
            rows = {r["variant"]["strength"]: r for r in res["runs"] if r["stage"] == "lambda"
                    and r["target"] == target and r["adaptation"] == name and r["variant"]["clamp"] == clamp}
            if not any(lam in rows for lam in lambdas[1:]):
                continue
            label = TARGET_NAMES[target] + (" σ-clamp" if clamp else " (core as is)" if target == "flow_dit" else "")
            cells = " | ".join(_cell(rows.get(lam), alone) for lam in lambdas[1:])
            lines.append(f"| {label} | {_pct(alone[attr])} · {_pct(alone['fidelity'])} | {cells} |")
    return "\n".join(lines)


def settings_table(res: dict, name: str, strength: float = 1.0) -> str:
    clamp_targets = res["config"]["clamp_targets"]
    targets = [t for t in ("same_family", "v_unet", "flow_dit") if t in res["config"]["sweep_targets"]]
    rows = [r for r in res["runs"] if r["adaptation"] == name and r["target"] in targets
            and report.canonical(r, clamp_targets)
            and (r["variant"]["mode"] == "base-first" or r["variant"]["strength"] == strength)]
    labels = list(dict.fromkeys(report.setting(r) for r in rows))
    lines = ["| setting | " + " | ".join(TARGET_NAMES[t] for t in targets) + " |", "|---|" + "---|" * len(targets)]
    for label in labels:
        cells = []
        for t in targets:
            row = next((r for r in rows if r["target"] == t and report.setting(r) == label), None)
            cells.append(_cell(row, res["references"][f"alone:{t}"]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_table(res: dict) -> str:
    summary = report.summarise(res)
    lines = ["| target / adaptation | default (λ = 1) | best, fidelity ≥ 95 % | best, fidelity ≥ 95 % of target "
             "alone | goal met (abs. / rel.) |", "|---|---|---|---|---|"]

    def brief(b: dict | None) -> str:
        if b is None:
            return "none acceptable"
        rec = "–" if b["recovered"] is None else f"{b['recovered']:.2f}"
        return f"{b['label']}: {rec} · {_pct(b['fidelity'])} · {b['diversity_ratio']:.2f}"

    for key, e in summary["targets"].items():
        target, name = key.split("/")
        lines.append(f"| {TARGET_NAMES[target]} / {name} | {brief(e['default'])} | {brief(e['best_absolute'])} | "
                     f"{brief(e['best_relative'])} | {'yes' if e['goal_met_absolute'] else 'no'} / "
                     f"{'yes' if e['goal_met_relative'] else 'no'} |")
    return "\n".join(lines)


def skipped(res: dict) -> str:
    counts = Counter(s["stage"] for s in res.get("skipped", []))
    return ", ".join(f"{stage}: {n}" for stage, n in counts.items()) or "none"


def markdown(res: dict) -> str:
    parts = ["### Models", models_table(res), "### Adaptations (on the source only)", adapters_table(res)]
    for name in ADAPTATIONS:
        parts += [f"### λ sweep: {name}", lambda_table(res, name)]
    for name in ADAPTATIONS:
        parts += [f"### Settings at λ = 1: {name}", settings_table(res, name)]
    parts += ["### Goal check", goal_table(res), f"Runs skipped at the deadline: {skipped(res)}."]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fidelity.tables")
    p.add_argument("results", type=Path)
    p.add_argument("--plots", type=Path, default=None, help="re-draw the charts (needs matplotlib) into this folder")
    args = p.parse_args(argv)
    res = json.loads(args.results.read_text())
    print(markdown(res))
    if args.plots is not None:
        args.plots.mkdir(parents=True, exist_ok=True)
        plt = plots._pyplot()
        if plt is None:
            raise SystemExit("re-drawing the charts needs matplotlib")
        plots.lambda_plot(res, args.plots / "fidelity_lambda.png", plt)
        plots.variants_plot(res, args.plots / "fidelity_variants.png", plt)


if __name__ == "__main__":
    main()
