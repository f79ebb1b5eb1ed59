"""What the comparison runs say, and their markdown: ``python -m fidelity.compare_tables RESULTS.json ... [--page
docs/fidelity.md --images docs/images]``.

Given one results.json per training budget (``fidelity.compare`` parts 1 and 2), prints the tables; with
``--page`` it replaces the part of the page between ``BEGIN``/``END`` markers with them and copies the figures into
``--images``. Cells read ``recovered ±h · class fidelity (of the adapted source's) · diversity``: the mean over the
evaluation seeds, ±h half the spread between seeds; ✗ marks a run outside the bounds read relative to the target
alone (class fidelity < 95 % of its own or diversity < 90 % of its own).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from . import report
from .config import ADAPTATIONS, ATTRIBUTE
from .evaluation import acceptable

BEGIN = "<!-- fidelity.compare_tables: begin (generated; edit the generator, not this text) -->"
END = "<!-- fidelity.compare_tables: end -->"
TARGET_NAMES = {"self": "self (source)", "same_family": "same architecture, trained independently (ε UNet)",
                "v_unet": "v-prediction UNet", "flow_dit": "flow DiT (σ-clamp)"}
FINETUNE_NAME = "fine-tune of the source, colour cast k"  # the gap_colour targets: what an SD1.5 fine-tune is
READINGS = ("absolute", "relative", "vs_adapted")
REC_NOISE_FLOOR = 0.05  # the smallest difference in recovered effect read as a difference
FIGURES = ("compare_gaps", "compare_naive_adaptive", "compare_samples")  # per part, as <name>_<part>x.png


# --- the summary ------------------------------------------------------------------------------------------------


def alone_of(res: dict, row: dict) -> dict:
    return res["references"][row.get("reference") or f"alone:{report.model_of(row['target'])}"]


def adaptation_cost(res: dict, adaptation: str) -> float:
    """The share of the source's class fidelity its adaptation keeps (≤ 1): what a faithful transfer also costs."""
    source, adapted = res["references"]["alone:source"], res["references"].get(f"adapted:{adaptation}")
    if adapted is None or not source["fidelity"]:
        return 1.0
    return min(1.0, adapted["fidelity"] / source["fidelity"])


def holds_on_gap(res: dict, row: dict) -> bool:
    """A gapped run inside the bounds: class fidelity ≥ 95 % of the gapped target alone's, less what the adaptation
    costs the source itself (a briefly trained adapter damages shapes, and Delta Sampling carries that faithfully:
    the gap is not what broke), and diversity ≥ 90 % of the gapped target alone's."""
    alone = alone_of(res, row)
    floor = report.MIN_FIDELITY * alone["fidelity"] * adaptation_cost(res, row["adaptation"])
    return row["fidelity"] >= floor - 1e-9 and row["diversity"] >= report.MIN_DIVERSITY * alone["diversity"]


def _score(row: dict) -> float:
    return min(row["recovered"], 1.0) if row.get("recovered") is not None else float("-inf")


def _noise(res: dict, a: dict, b: dict, key: str) -> float:
    floor = REC_NOISE_FLOOR if key == "recovered" else 2 / (res["eval"]["images_per_seed"] * len(res["eval"]["seeds"]))
    return max(a.get("spread", {}).get(key, 0.0) + b.get("spread", {}).get(key, 0.0), floor)


def best_constant(res: dict, target: str, ad: str, reading: str = "relative") -> dict | None:
    """The λ of the sweep inside the bounds whose recovered effect is nearest 1 from below (capped at 1; the lower
    λ on a tie)."""
    rows = [r for r in res["runs"] if r["stage"] == "lambda" and r["target"] == target and r["adaptation"] == ad
            and r.get("recovered") is not None and acceptable(r, alone_of(res, r), reading)]
    return max(rows, key=lambda r: (round(_score(r), 6), -r["strength"]), default=None)


def matches(res: dict, row: dict, best: dict | None, reading: str = "relative") -> bool:
    """``row`` as good as ``best`` within the seeds' noise: inside the bounds, its capped recovered effect and
    class fidelity no lower than the best's by more than the summed spreads (or the floors)."""
    if best is None:
        return row.get("recovered") is not None and acceptable(row, alone_of(res, row), reading)
    if row.get("recovered") is None or not acceptable(row, alone_of(res, row), reading):
        return False
    return (_score(row) >= _score(best) - _noise(res, row, best, "recovered")
            and row["fidelity"] >= best["fidelity"] - _noise(res, row, best, "fidelity"))


def winner(res: dict, a: dict | None, b: dict | None, names: tuple[str, str]) -> str:
    """Which of two runs carries the effect better inside the bounds (relative reading), or "tie" within noise. A
    run that carries none of the effect (recovered within the noise floor of 0) wins nothing: keeping the target's
    class fidelity by changing nothing is not a transfer."""
    ok = [r is not None and r.get("recovered") is not None and _score(r) > REC_NOISE_FLOOR
          and acceptable(r, alone_of(res, r), "relative") for r in (a, b)]
    if ok[0] != ok[1]:
        return names[0] if ok[0] else names[1]
    if not ok[0]:
        return "neither"
    diff = _score(a) - _score(b)
    if abs(diff) <= _noise(res, a, b, "recovered"):
        dfid = a["fidelity"] - b["fidelity"]
        if abs(dfid) <= _noise(res, a, b, "fidelity"):
            return "tie"
        return names[0] if dfid > 0 else names[1]
    return names[0] if diff > 0 else names[1]


def _find(res: dict, **kw) -> dict | None:
    return next((r for r in res["runs"] if all(r.get(k) == v for k, v in kw.items())), None)


BASE_LEVEL = {"colour": 0.0, "scale": 1.0}  # the ungapped point of each axis: the source itself


def gap_series(res: dict, axis: str, ad: str, label: str) -> list[dict]:
    """The runs of one gap axis, adaptation and setting by level, with the ungapped point where it was run: for
    colour and scale the source itself (the gapped targets are its fine-tunes: Delta Sampling there is the sweep's
    control row at λ = 1, the merged file a run of the colour stage at k = 0), for steps the 20-step v-UNet."""
    rows = [r for r in res["runs"] if r.get("gap", {}).get("axis") == axis and r["adaptation"] == ad
            and r["label"] == label]
    if rows and axis in BASE_LEVEL and not label.startswith("merged"):  # (only beside a gapped run)
        base = _find(res, stage="lambda", target="self", adaptation=ad, strength=1.0)
        if base is not None:  # at s = 1 declaring the scale changes nothing
            rows.append(base | {"gap": {"axis": axis, "level": BASE_LEVEL[axis]}})
    if rows and axis == "steps":
        base = _find(res, stage="lambda", target="v_unet", adaptation=ad, strength=1.0)
        if base is not None and label == "λ=1":
            rows.append(base | {"gap": {"axis": axis, "level": res["config"]["steps"]}})
    return sorted(rows, key=lambda r: r["gap"]["level"])


def finetune_pairs(res: dict, ad: str) -> list[tuple[float, dict | None, dict | None]]:
    """Per colour level run (k = 0: the source itself), Delta Sampling at λ = 1 and the file merged at ×1 on the
    source fine-tuned on that cast: the route a user of an SD1.5 fine-tune has, beside Delta Sampling."""
    ds = {r["gap"]["level"]: r for r in gap_series(res, "colour", ad, "λ=1")}
    nv = {r["gap"]["level"]: r for r in gap_series(res, "colour", ad, "merged ×1")}
    return [(k, ds.get(k), nv.get(k)) for k in sorted(set(ds) | set(nv))]


def summarise(res: dict) -> dict:
    out: dict = {"budget": res.get("budget"), "goal": {}, "naive_vs_delta": {}, "adaptive": {}, "gaps": {}}
    targets = [t for t in ("self", "same_family", "v_unet", "flow_dit")
               if any(r["target"] == t and r["stage"] == "lambda" for r in res["runs"])]
    for t in targets:
        for ad in ADAPTATIONS:
            row = _find(res, stage="lambda", target=t, adaptation=ad, strength=1.0)
            if row is not None:
                alone = alone_of(res, row)
                out["goal"][f"{t}/{ad}"] = {
                    reading: bool(row["recovered"] is not None and row["recovered"] >= report.GOAL_RECOVERED
                                  and acceptable(row, alone, reading)) for reading in READINGS}
    for ad in ADAPTATIONS:
        for w in sorted({r["strength"] for r in res["runs"] if r["stage"] == "naive"}):
            ds = _find(res, stage="lambda", target="same_family", adaptation=ad, strength=w)
            nv = _find(res, stage="naive", target="same_family", adaptation=ad, strength=w)
            if ds is not None and nv is not None:
                out["naive_vs_delta"][f"{ad}@{w:g}"] = winner(res, ds, nv, ("delta", "naive"))
    out["finetune_naive_vs_delta"] = {
        f"{ad}@k={level:g}": winner(res, ds, nv, ("delta", "naive"))
        for ad in ADAPTATIONS for level, ds, nv in finetune_pairs(res, ad) if ds is not None and nv is not None}
    rules = list(dict.fromkeys(r["rule"] for r in res["runs"] if r["stage"] == "adaptive"))
    for rule in rules:
        per = {}
        for t in [t for t in targets if t != "self"]:
            for ad in ADAPTATIONS:
                row = _find(res, stage="adaptive", target=t, adaptation=ad, rule=rule)
                if row is not None:
                    per[f"{t}/{ad}"] = matches(res, row, best_constant(res, t, ad))
        out["adaptive"][rule] = {"matches": per, "everywhere": bool(per) and all(per.values())}
    for axis, ad, label in dict.fromkeys((r["gap"]["axis"], r["adaptation"], r["label"])
                                         for r in res["runs"] if "gap" in r):
        out["gaps"][f"{axis}/{ad}/{label}"] = [{
            "level": r["gap"]["level"], "recovered": r["recovered"], "fidelity": r["fidelity"],
            "fidelity_vs_adapted": r.get("fidelity_vs_adapted"),
            "acceptable": holds_on_gap(res, r),
            "spread": {k: r["spread"].get(k) for k in ("recovered", "fidelity")}}
            for r in gap_series(res, axis, ad, label)]
    return out


# --- markdown ---------------------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f} %"


PCT1 = "{:.1%}"  # a share to a tenth of a point, written "98.1 %" like the page's other percentages


def _pm(row: dict, key: str, fmt: str = "{:.2f}") -> str:
    v = row.get(key)
    if v is None:
        return "–"
    h = row.get("spread", {}).get(key)
    text = fmt.format(v) + ("" if not h else "±" + fmt.format(h / 2))
    return text.replace("%", "") + " %" if fmt == PCT1 else text


def cell(res: dict, row: dict | None) -> str:
    if row is None:
        return "–"
    alone = alone_of(res, row)
    mark = "" if acceptable(row, alone, "relative") else "✗"
    vs = row.get("fidelity_vs_adapted")
    div = row["diversity"] / alone["diversity"] if alone["diversity"] else float("nan")
    return (f"{_pm(row, 'recovered')} · {_pct(row['fidelity'])}" + (f" ({_pct(vs)})" if vs is not None else "")
            + f" · {div:.2f}{mark}")


def models_table(res: dict) -> str:
    lines = ["| model | training steps (s) | class fidelity alone | diversity | red · striped alone |",
             "|---|---:|---:|---:|---|"]
    for name, t in res["training"].items():
        a = res["references"].get(f"alone:{name}")
        if a is None:
            continue
        first = t.get("first_round")
        steps = (f"{first['steps']} + {t['steps']} ({(first.get('seconds') or 0) + t['seconds']:.0f})" if first
                 else f"{t['steps']} ({t['seconds']:.0f})")
        lines.append(f"| {name} | {steps} | {_pm(a, 'fidelity', PCT1)} | {a['diversity']:.3f} | "
                     f"{_pct(a['red'])} · {_pct(a['striped'])} |")
    for name, a in res["adapters"].items():
        ad = res["references"].get(f"adapted:{name}")
        if ad is not None:
            lines.append(f"| source + {name} | {a['steps']} ({a['seconds']:.0f}) | {_pm(ad, 'fidelity', PCT1)} | "
                         f"{ad['diversity']:.3f} | {_pct(ad['red'])} · {_pct(ad['striped'])} |")
    return "\n".join(lines)


def lambda_table(res: dict, ad: str) -> str:
    lams = sorted({r["strength"] for r in res["runs"] if r["stage"] == "lambda" and r["target"] != "self"})
    lines = ["| target | " + " | ".join(f"λ = {x:g}" for x in lams) + " |", "|---|" + "---|" * len(lams)]
    for t in ("self", "same_family", "v_unet", "flow_dit"):
        rows = {r["strength"]: r for r in res["runs"] if r["stage"] == "lambda" and r["target"] == t
                and r["adaptation"] == ad}
        if rows:
            lines.append(f"| {TARGET_NAMES[t]} | " + " | ".join(cell(res, rows.get(x)) for x in lams) + " |")
    return "\n".join(lines)


def goal_table(res: dict) -> str:
    s = summarise(res)
    lines = ["| target / adaptation (λ = 1) | fidelity ≥ 95 % | ≥ 95 % of the target alone's | ≥ 95 % of the adapted "
             "source's |", "|---|---|---|---|"]
    for key, g in s["goal"].items():
        t, ad = key.split("/")
        lines.append(f"| {TARGET_NAMES[t]} / {ad} | " + " | ".join("yes" if g[r] else "no" for r in READINGS) + " |")
    return "\n".join(lines)


def naive_table(res: dict) -> str:
    weights = sorted({r["strength"] for r in res["runs"] if r["stage"] == "naive"})
    lines = ["| target / adaptation | weight = λ | Delta Sampling | merged into the target | better |",
             "|---|---:|---|---|---|"]
    s = summarise(res)
    for ad in ADAPTATIONS:
        for w in weights:
            ds = _find(res, stage="lambda", target="same_family", adaptation=ad, strength=w)
            nv = _find(res, stage="naive", target="same_family", adaptation=ad, strength=w)
            lines.append(f"| {TARGET_NAMES['same_family']} / {ad} | {w:g} | {cell(res, ds)} | {cell(res, nv)} | "
                         f"{s['naive_vs_delta'].get(f'{ad}@{w:g}', '–')} |")
        for t in ("v_unet", "flow_dit"):
            why = res.get("naive_unavailable", {}).get(f"{t}/{ad}", "n/a: the adapter does not load")
            ds = _find(res, stage="lambda", target=t, adaptation=ad, strength=1.0)
            lines.append(f"| {TARGET_NAMES[t]} / {ad} | 1 | {cell(res, ds)} | {why} | delta (the only route) |")
    for ad in ADAPTATIONS:
        for level, ds, nv in finetune_pairs(res, ad):
            lines.append(f"| {FINETUNE_NAME} = {level:g} / {ad} | 1 | {cell(res, ds)} | {cell(res, nv)} | "
                         f"{s['finetune_naive_vs_delta'].get(f'{ad}@k={level:g}', '–')} |")
    return "\n".join(lines)


def adaptive_table(res: dict) -> str:
    rules = list(dict.fromkeys(r["rule"] for r in res["runs"] if r["stage"] == "adaptive"))
    if not rules:
        return "(no adaptive runs)"
    head = "| target / adaptation | best constant λ | " + " | ".join(rules) + " |"
    lines = [head, "|---|---|" + "---|" * len(rules)]
    for t in ("same_family", "v_unet", "flow_dit"):
        for ad in ADAPTATIONS:
            best = best_constant(res, t, ad)
            cells = []
            for rule in rules:
                row = _find(res, stage="adaptive", target=t, adaptation=ad, rule=rule)
                if row is None:
                    cells.append("–")
                    continue
                gain = sum(g["mean"] for g in row.get("gains", [])) / max(len(row.get("gains", [])), 1)
                cells.append(f"{cell(res, row)} (k̄ {gain:.2f}){' =' if matches(res, row, best) else ''}")
            b = "none inside the bounds" if best is None else f"λ={best['strength']:g}: {cell(res, best)}"
            lines.append(f"| {TARGET_NAMES[t]} / {ad} | {b} | " + " | ".join(cells) + " |")
    every = summarise(res)["adaptive"]
    verdict = "; ".join(f"{rule}: {'matches everywhere' if v['everywhere'] else 'not everywhere'} "
                        f"({sum(v['matches'].values())}/{len(v['matches'])})" for rule, v in every.items())
    return "\n".join(lines) + f"\n\n= marks a rule within the seeds' noise of the best constant. {verdict}."


def gaps_table(res: dict) -> str:
    rows = [r for r in res["runs"] if "gap" in r]
    if not rows:
        return "(no gap runs)"
    lines = ["| axis | level | adaptation | setting | result |", "|---|---:|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["gap"]["axis"], str(r["adaptation"]), r["label"], r["gap"]["level"])):
        lines.append(f"| {r['gap']['axis']} | {r['gap']['level']:g} | {r['adaptation']} | {r['label']} | "
                     f"{cell(res, r)} |")
    alone = [(k.split(":", 1)[1], v) for k, v in res["references"].items()
             if k.startswith(("alone:colour_", "alone:scale_", "alone:v_unet@"))]
    if alone:
        lines.append("\nThe gapped targets alone (class fidelity · red · striped): " + "; ".join(
            f"{name} {_pct(v['fidelity'])} · {_pct(v['red'])} · {_pct(v['striped'])}" for name, v in alone) + ".")
    return "\n".join(lines)


def dit_table(res: dict) -> str:
    d = res.get("dit", {})
    base = res["references"].get("alone:flow_dit")
    if base is None:
        return "(no DiT runs)"
    lines = ["| flow DiT alone | class fidelity | diversity |", "|---|---:|---:|",
             f"| as trained (logit-normal t), {res['config']['steps']} steps, CFG {res['config']['cfg_scale']:g} | "
             f"{_pm(base, 'fidelity', PCT1)} | "
             f"{base['diversity']:.3f} |"]
    for label in ("40 steps", "CFG 5", "shift 3", "uniform t"):
        if label in d:
            lines.append(f"| {label} | {_pm(d[label], 'fidelity', PCT1)} | {d[label]['diversity']:.3f} |")
    per = d.get("per_class", {})
    if per:
        classes = list(next(iter(per.values())))
        lines += ["", "| class fidelity per class | " + " | ".join(classes) + " |", "|---|" + "---:|" * len(classes)]
        lines += [f"| {label} | " + " | ".join(_pct(v[c]) for c in classes) + " |" for label, v in per.items()]
    return "\n".join(lines)


def skipped(res: dict) -> str:
    counts: dict[str, int] = {}
    for s in res.get("skipped", []):
        counts[s["stage"]] = counts.get(s["stage"], 0) + 1
    return ", ".join(f"{k}: {n}" for k, n in counts.items()) or "none"


def part_markdown(res: dict) -> str:
    b = res.get("budget", "?")
    ev = res["eval"]
    parts = [f"#### {b} training: models and adaptations",
             f"Evaluation seeds {', '.join(map(str, ev['seeds']))}, {ev['images_per_seed']} images each; run on "
             f"{res['machine'].get('gpu', res['machine']['device'])} in {res['timings'].get('total', '?')} s.",
             models_table(res)]
    if res.get("warning"):
        parts.insert(2, f"**Warning:** {res['warning']}.")
    for ad in ADAPTATIONS:
        parts += [f"#### {b} training: λ sweep, {ad} ({ATTRIBUTE[ad]})", lambda_table(res, ad)]
    parts += [f"#### {b} training: the goal at λ = 1, three ways", goal_table(res),
              f"#### {b} training: Delta Sampling against the adapter merged into the target", naive_table(res),
              f"#### {b} training: adaptive λ against the best constant", adaptive_table(res),
              f"#### {b} training: growing the gap", gaps_table(res),
              f"#### {b} training: the flow DiT on its own", dit_table(res),
              f"Configurations skipped at the deadline: {skipped(res)}."]
    parts += [f"![{f} at {b} training](images/{f}_{res['part']}x.png)" for f in FIGURES]
    parts.append("Sample rows (the same seeds and classes in every row): source base, source + each adaptation, the "
                 "independently trained same-architecture target alone; then per adaptation: that target with Delta "
                 "Sampling at λ = 1 and with the adapter merged at ×1, v-UNet and flow DiT with Delta Sampling at "
                 "λ = 1, and where the colour gap ran, the source fine-tuned on the first cast with Delta Sampling "
                 "at λ = 1 and with the adapter merged at ×1.")
    return "\n\n".join(parts)


def usage_hints(results: list[dict]) -> str:
    """Start-here suggestions read off the runs: per target kind, the λ inside the bounds nearest full effect."""
    lines = []
    for res in results:
        for t in ("same_family", "v_unet", "flow_dit"):
            for ad in ADAPTATIONS:
                best = best_constant(res, t, ad)
                rec = "none inside the bounds" if best is None else f"λ = {best['strength']:g} ({cell(res, best)})"
                lines.append(f"- {res.get('budget')} · {TARGET_NAMES[t]} · {ad}: {rec}")
    return "\n".join(lines)


def breaks_at(points: list[dict], unit: str = "{:g}") -> str:
    """Where along the axis (points in the axis' order) the runs first fall under the bounds: recovered < 0.8,
    or outside the fidelity/diversity bounds relative to the gapped target alone (:func:`holds_on_gap`)."""
    for p in points:
        if p["recovered"] is None or p["recovered"] < report.GOAL_RECOVERED or not p["acceptable"]:
            return f"falls under the bounds at {unit.format(p['level'])}"
    return "holds at every level run"


def findings(results: list[dict]) -> str:
    """The answer in brief, worded from the summaries (so that it always says what the numbers say)."""
    lines = []
    for res in results:
        s, b = summarise(res), res.get("budget")  # from the runs, by this generator
        goal = s["goal"]
        transfer = [k for k in goal if not k.startswith("self/")]
        counts = {r: sum(goal[k][r] for k in transfer) for r in READINGS}
        lines.append(f"- **{b} training, the goal at λ = 1** (recovered ≥ 0.8 inside the bounds) on "
                     f"{len(transfer)} transfer pairs: {counts['absolute']} with class fidelity ≥ 95 %, "
                     f"{counts['relative']} with ≥ 95 % of the target alone's, {counts['vs_adapted']} with ≥ 95 % of "
                     f"the adapted source's.")
        wins: dict[str, list[str]] = {}
        for key, who in s["naive_vs_delta"].items():
            wins.setdefault(who, []).append(key.replace("@", " at "))
        if wins:
            lines.append(f"- **{b}, Delta Sampling against the merged adapter** on the same-architecture target "
                         "trained independently (not a fine-tune of the source): "
                         + "; ".join(f"{who}: {', '.join(keys)}" for who, keys in sorted(wins.items()))
                         + ". On the other targets the merged route does not exist (the adapter does not load).")
        tuned: dict[str, list[str]] = {}
        for key, who in s.get("finetune_naive_vs_delta", {}).items():
            tuned.setdefault(who, []).append(key.replace("@", " at "))
        if tuned:
            lines.append(f"- **{b}, Delta Sampling (λ = 1) against the merged adapter (×1) on fine-tunes of the "
                         "source** (colour cast k; k = 0 is the source, where both are the adapted source): "
                         + "; ".join(f"{who}: {', '.join(keys)}" for who, keys in sorted(tuned.items())) + ".")
        for rule, v in s["adaptive"].items():
            lines.append(f"- **{b}, adaptive `{rule}`** matches the best constant λ within the seeds' noise on "
                         f"{sum(v['matches'].values())} of {len(v['matches'])} pairs"
                         + (" (everywhere)." if v["everywhere"] else
                            f"; not on {', '.join(k for k, ok in v['matches'].items() if not ok)}."))
        for key, points in sorted(s["gaps"].items()):
            axis, ad, label = key.split("/", 2)
            order = _axis_order(axis, points)
            unit = GAP_UNIT.get(axis, "{:g}")
            lines.append(f"- **{b}, gap `{axis}`**, {ad}, {label}: {breaks_at(order, unit)} "
                         f"(levels run: {', '.join(unit.format(p['level']) for p in order)}).")
        dit = res.get("dit", {})
        alone = res["references"].get("alone:flow_dit")
        if alone is not None:
            tried = ", ".join(f"{k} {_pct(v['fidelity'])}" for k, v in dit.items() if isinstance(v, dict)
                              and "fidelity" in v)
            lines.append(f"- **{b}, the flow DiT alone**: {_pct(alone['fidelity'])} as trained; "
                         f"{tried or 'nothing else run'}.")
    return "\n".join(lines)


def start_here(results: list[dict]) -> str:
    """The README's start-here table: per target kind and adaptation, the constant λ inside the bounds nearest
    full effect at the longest training budget run, and where merging the file does as well."""
    res = results[-1]
    s = summarise(res)
    lines = ["| target | " + " | ".join(f"{ad} ({ATTRIBUTE[ad]})" for ad in ADAPTATIONS) + " |",
             "|---|" + "---|" * len(ADAPTATIONS)]
    for t in ("same_family", "v_unet", "flow_dit"):
        cells = []
        for ad in ADAPTATIONS:
            best = best_constant(res, t, ad)
            text = "no λ inside the bounds" if best is None else f"λ = {best['strength']:g}"
            if t == "same_family":
                merged = [k.split("@")[1] for k, who in s["naive_vs_delta"].items()
                          if k.startswith(ad) and who in ("naive", "tie")]
                if merged:
                    text += f"; merging the file ×{merged[0]} does as well" + ("" if len(merged) == 1 else " or better")
            cells.append(text)
        lines.append(f"| {TARGET_NAMES[t]} | " + " | ".join(cells) + " |")
    for res in results:  # the gap axes, from whichever budget ran them
        gaps = summarise(res)["gaps"]
        for axis, what in GAP_ROWS.items():
            cells = ["; ".join(f"{key.split('/', 2)[2]}: {holds_to(_axis_order(axis, points), GAP_UNIT[axis])}"
                               for key, points in sorted(gaps.items()) if key.startswith(f"{axis}/{ad}/"))
                     for ad in ADAPTATIONS]
            if any(cells):
                lines.append(f"| {what} ({res.get('budget')} training) | " + " | ".join(c or "–" for c in cells)
                             + " |")
    return "\n".join(lines)


GAP_ROWS = {"colour": "the source fine-tuned on shifted colours (cast k), as an SD1.5 fine-tune is",
            "scale": "the source fine-tuned at another latent scale s", "steps": "v-prediction UNet with fewer steps"}
GAP_UNIT = {"colour": "k = {:g}", "scale": "s = {:g}", "steps": "{:g} steps"}


def _axis_order(axis: str, points: list[dict]) -> list[dict]:
    """The ungapped end first: colour from k = 0 up, scale from s = 1 down, steps from the most down."""
    return sorted(points, key=lambda p: p["level"], reverse=axis in ("scale", "steps"))


def holds_to(points: list[dict], unit: str) -> str:
    """How far along the axis the runs stay inside the bounds with ≥ 0.8 recovered."""
    last = None
    for p in points:
        if p["recovered"] is None or p["recovered"] < report.GOAL_RECOVERED or not p["acceptable"]:
            return f"fails already at {unit.format(p['level'])}" if last is None else \
                f"holds to {unit.format(last)}, fails at {unit.format(p['level'])}"
        last = p["level"]
    return "–" if last is None else f"holds to {unit.format(last)} (the last level run)"


def markdown(results: list[dict]) -> str:
    body = ["#### What the runs say\n\n" + findings(results)]
    body += [part_markdown(res) for res in results]
    body.append("#### Start-here values read off these runs (the README's usage section is written from them)\n\n"
                + usage_hints(results))
    return "\n\n".join(body) + "\n"


def write_markdown(results_dir: Path, also: Path | None = None) -> Path:
    """This part's tables, and the other part's too where its results are found: a results.json in a folder
    beside this one, or ``also``/results_part<N>.json (the copy each part leaves in its ``--out``)."""
    found = [results_dir / "results.json", *results_dir.parent.glob("*/results.json")]
    if also is not None:
        found += sorted(also.glob("results_part*.json"))
    by_part: dict[int, dict] = {}
    for p in found:
        r = json.loads(p.read_text()) if p.exists() else {}
        if "part" in r:
            by_part.setdefault(r["part"], r)  # this run's own results first
    results = [by_part[k] for k in sorted(by_part)]
    path = results_dir / "compare.md"
    path.write_text(markdown(results))
    return path


def update_page(page: Path, text: str) -> None:
    doc = page.read_text()
    if BEGIN not in doc or END not in doc:
        raise SystemExit(f"{page} has no {BEGIN!r} … {END!r} markers: add them where the generated part goes")
    head, rest = doc.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    page.write_text(head + BEGIN + "\n\n" + text + "\n" + END + tail)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m fidelity.compare_tables")
    p.add_argument("results", type=Path, nargs="+", help="results.json of fidelity.compare part 1 and/or 2")
    p.add_argument("--page", type=Path, default=None, help="replace the generated part of this page")
    p.add_argument("--images", type=Path, default=None, help="copy the figures found beside the results here")
    p.add_argument("--readme", type=Path, default=None, help="replace the generated start-here table of this file")
    args = p.parse_args(argv)
    results = sorted((json.loads(r.read_text()) for r in args.results), key=lambda r: r["part"])
    text = markdown(results)
    if args.page is None:
        print(text)
    else:
        update_page(args.page, text)
        print(f"updated {args.page}")
    if args.readme is not None:
        update_page(args.readme, start_here(results))
        print(f"updated {args.readme}")
    if args.images is not None:
        args.images.mkdir(parents=True, exist_ok=True)
        for r in args.results:
            part = json.loads(r.read_text())["part"]
            for f in FIGURES:
                if (r.parent / f"{f}.png").exists():
                    shutil.copy(r.parent / f"{f}.png", args.images / f"{f}_{part}x.png")


if __name__ == "__main__":
    main()
