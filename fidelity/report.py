"""What the numbers say: recovered effect per run, the goal check per target, and how the defaults rank.

recovered = (rate_DS − rate_target_alone) / (rate_adapted_source − rate_source_base): 1 means the target shows the
attribute as much more often as the adapted source does over its base. A run is *acceptable* when its class
fidelity is at least ``MIN_FIDELITY`` and its diversity at least ``MIN_DIVERSITY`` of the target alone's. The
fidelity bound is read two ways: ``absolute`` (≥ 95 % of the images show their class) and ``relative`` (≥ 95 % of
the target alone's class fidelity), since a target that misdraws some classes on its own fails the first at λ = 0.
"""

from __future__ import annotations

from .config import ADAPTATIONS, ATTRIBUTE

GOAL_RECOVERED = 0.8
MIN_FIDELITY = 0.95
MIN_DIVERSITY = 0.9
DEFAULT_LABEL = "λ=1"
CLAMP = " σ-clamp"


def model_of(target: str) -> str:
    return "source" if target == "self" else target


def recovered(row: dict, refs: dict, target: str, adaptation: str) -> float | None:
    attr = ATTRIBUTE[adaptation]
    effect = refs[f"adapted:{adaptation}"][attr] - refs["alone:source"][attr]
    if effect <= 0:
        return None
    return (row[attr] - refs[f"alone:{model_of(target)}"][attr]) / effect


def acceptable(row: dict, alone: dict, reading: str = "absolute") -> bool:
    floor = MIN_FIDELITY if reading == "absolute" else MIN_FIDELITY * alone["fidelity"]
    return row["fidelity"] >= floor - 1e-9 and row["diversity"] >= MIN_DIVERSITY * alone["diversity"]


def canonical(row: dict, clamp_targets: list[str]) -> bool:
    """Rows run the way the study runs each target: clamped on the flow target, as the core does elsewhere."""
    return row["variant"]["clamp"] == (row["target"] in clamp_targets)


def setting(row: dict) -> str:
    """The Delta Sampling settings of a row, without the study's source clamp."""
    return row["label"].replace(CLAMP, "")


READINGS = ("absolute", "relative")


def summarise(res: dict) -> dict:
    refs, runs = res["references"], res["runs"]
    out: dict = {"goal": {"recovered": GOAL_RECOVERED, "fidelity": MIN_FIDELITY, "diversity_ratio": MIN_DIVERSITY},
                 "adaptation_effect": {}, "targets": {}}
    for name in ADAPTATIONS:
        attr = ATTRIBUTE[name]
        out["adaptation_effect"][name] = {
            "attribute": attr, "source_base": refs["alone:source"][attr],
            "adapted_source": refs[f"adapted:{name}"][attr],
            "source_base_fidelity": refs["alone:source"]["fidelity"],
            "adapted_source_fidelity": refs[f"adapted:{name}"]["fidelity"],
        }
    clamp_targets = res["config"]["clamp_targets"]
    targets = sorted({r["target"] for r in runs}, key=["self", "same_family", "v_unet", "flow_dit"].index)
    for target in targets:
        alone = refs[f"alone:{model_of(target)}"]
        for name in ADAPTATIONS:
            every = [r for r in runs if r["target"] == target and r["adaptation"] == name]
            if not every:
                continue
            rows = [r for r in every if r["recovered"] is not None]  # none when the adaptation had no effect
            default = next((r for r in every if setting(r) == DEFAULT_LABEL and canonical(r, clamp_targets)), None)
            entry = {
                "target_alone": {k: alone[k] for k in ("red", "striped", "fidelity", "diversity")},
                "default": _brief(default, alone),
                "default_unclamped": _brief(next((r for r in every if r["label"] == DEFAULT_LABEL), None), alone),
                "most_recovered_any": _brief(max(rows, key=lambda r: r["recovered"], default=None), alone),
            }
            for reading in READINGS:
                ok = [r for r in rows if acceptable(r, alone, reading)]
                best = max(ok, key=lambda r: r["recovered"], default=None)
                entry[f"best_{reading}"] = _brief(best, alone)
                entry[f"goal_met_{reading}"] = bool(best is not None and best["recovered"] >= GOAL_RECOVERED)
                entry[f"default_is_best_{reading}"] = bool(
                    default is not None and best is not None and default["recovered"] >= best["recovered"] - 1e-9)
            out["targets"][f"{target}/{name}"] = entry
    out["variant_ranking"] = {reading: _ranking(res, reading) for reading in READINGS}
    return out


def _brief(row: dict | None, alone: dict) -> dict | None:
    if row is None:
        return None
    return {"label": row["label"], "stage": row["stage"], "recovered": row["recovered"],
            "rate": row[ATTRIBUTE[row["adaptation"]]], "fidelity": row["fidelity"],
            "diversity_ratio": row["diversity"] / alone["diversity"] if alone["diversity"] else None,
            "acceptable": {reading: acceptable(row, alone, reading) for reading in READINGS}}


def _ranking(res: dict, reading: str) -> dict:
    """Per adaptation, every setting run on all transfer targets, by its mean recovered effect over them (capped at
    1; runs that break the fidelity/diversity bounds count as 0): which settings carry an adaptation best."""
    refs, runs = res["references"], res["runs"]
    clamp_targets = res["config"]["clamp_targets"]
    out = {}
    for name in ADAPTATIONS:
        by_label: dict[str, list[float]] = {}
        targets = {r["target"] for r in runs if r["target"] != "self" and r["adaptation"] == name}
        for r in runs:
            if (r["target"] == "self" or r["adaptation"] != name or r["recovered"] is None
                    or not canonical(r, clamp_targets)):
                continue
            alone = refs[f"alone:{model_of(r['target'])}"]
            score = min(r["recovered"], 1.0) if acceptable(r, alone, reading) else 0.0
            by_label.setdefault(setting(r), []).append(score)
        ranked = sorted(((sum(v) / len(v), k) for k, v in by_label.items() if len(v) == len(targets)), reverse=True)
        out[name] = [{"label": k, "mean_recovered_acceptable": round(m, 4)} for m, k in ranked]
    return out
