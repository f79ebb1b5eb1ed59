"""Figures of a result dict: attribute rate / fidelity / diversity against λ, the variants compared, sample grids.

Line and bar charts need matplotlib (present on the GPU machine, never needed by the tests); the sample grids fall
back to the plain PNG writer, without row labels, when it is missing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from torch import Tensor

from . import png
from .config import ADAPTATIONS, ATTRIBUTE
from .report import MIN_DIVERSITY, MIN_FIDELITY, acceptable, canonical, model_of, setting

TARGET_STYLE = {"self": ("self (source)", "0.55", ":"), "same_family": ("same family (eps UNet)", "C0", "-"),
                "v_unet": ("v-prediction UNet", "C1", "-"), "flow_dit": ("flow DiT", "C2", "-")}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def make_all(res: dict, images: dict[str, Tensor], outdir: Path) -> list[Path]:
    """Every figure; ``images`` may be empty (re-drawing the charts from a results.json)."""
    written = []
    plt = _pyplot()
    for name in ADAPTATIONS:
        written.append(sample_grid(res, images, name, outdir / f"fidelity_samples_{name}.png", plt))
    if plt is not None and res.get("runs"):
        written.append(lambda_plot(res, outdir / "fidelity_lambda.png", plt))
        written.append(variants_plot(res, outdir / "fidelity_variants.png", plt))
    return [p for p in written if p is not None]


def lambda_plot(res: dict, path: Path, plt) -> Path:
    refs = res["references"]
    clamp_targets = res["config"]["clamp_targets"]
    fig, axes = plt.subplots(len(ADAPTATIONS), 3, figsize=(13, 3.6 * len(ADAPTATIONS)), squeeze=False)
    for i, name in enumerate(ADAPTATIONS):
        attr = ATTRIBUTE[name]
        for target, (label, colour, ls) in TARGET_STYLE.items():
            lines = [(True, label + (" (σ-clamp)" if target in clamp_targets else ""), ls)]
            if target in clamp_targets:
                lines.append((False, label + " (core as is)", "--"))
            runs = [r for r in res["runs"] if r["stage"] == "lambda" and r["target"] == target
                    and r["adaptation"] == name]
            zero = [r for r in runs if r["variant"]["strength"] == 0.0]  # λ = 0 is the same either way
            for want_canonical, text, style in lines:
                rows = zero + sorted((r for r in runs if r["variant"]["strength"] != 0.0
                                      and canonical(r, clamp_targets) == want_canonical),
                                     key=lambda r: r["variant"]["strength"])
                if not rows:
                    continue
                lam = [r["variant"]["strength"] for r in rows]
                alone = refs[f"alone:{model_of(target)}"]
                kw = {"color": colour, "marker": "o" if want_canonical else "x", "label": text}
                axes[i, 0].plot(lam, [r[attr] for r in rows], style, **kw)
                axes[i, 1].plot(lam, [r["fidelity"] for r in rows], style, **kw)
                axes[i, 2].plot(lam, [min(r["diversity"] / alone["diversity"], 2.0) for r in rows], style, **kw)
        axes[i, 0].axhline(refs[f"adapted:{name}"][attr], color="k", ls="--", lw=1, label="adapted source alone")
        axes[i, 0].set_ylabel(f"{name}\n{attr} rate")
        axes[i, 1].axhline(MIN_FIDELITY, color="r", ls=":", lw=1)
        axes[i, 1].set_ylabel("class fidelity")
        axes[i, 2].axhline(MIN_DIVERSITY, color="r", ls=":", lw=1)
        axes[i, 2].set_ylabel("diversity / target alone (capped at 2)")
        for ax in axes[i]:
            ax.set_xlabel("λ")
            ax.grid(alpha=0.3)
        axes[i, 0].set_ylim(-0.03, 1.03)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Delta Sampling: attribute rate, class fidelity and diversity against λ (constant, cfg, shared)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def variants_plot(res: dict, path: Path, plt) -> Path:
    refs = res["references"]
    clamp_targets = res["config"]["clamp_targets"]
    targets = [t for t in TARGET_STYLE if t != "self"]
    fig, axes = plt.subplots(len(ADAPTATIONS), 1, figsize=(15, 4.2 * len(ADAPTATIONS)), squeeze=False)
    for i, name in enumerate(ADAPTATIONS):
        ax = axes[i, 0]
        rows = [r for r in res["runs"] if r["adaptation"] == name and r["target"] != "self"
                and canonical(r, clamp_targets)]
        labels = list(dict.fromkeys(setting(r) for r in rows if setting(r) != "λ=0"))
        width = 0.8 / len(targets)
        for j, target in enumerate(targets):
            alone = refs[f"alone:{target}"]
            by = {setting(r): r for r in rows if r["target"] == target}
            xs = [k + (j - (len(targets) - 1) / 2) * width for k in range(len(labels))]
            vals = [by[lab]["recovered"] if lab in by and by[lab]["recovered"] is not None else np.nan
                    for lab in labels]
            ok = [lab in by and acceptable(by[lab], alone, "relative") for lab in labels]
            _, colour, _ = TARGET_STYLE[target]
            bars = ax.bar(xs, vals, width, color=colour, label=TARGET_STYLE[target][0])
            for bar, good in zip(bars, ok, strict=True):
                if not good:
                    bar.set_hatch("///")
                    bar.set_alpha(0.45)
        ax.axhline(0.8, color="k", ls="--", lw=1)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=8)
        ax.set_ylabel(f"{name}: recovered effect")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=3)
    fig.suptitle("Recovered effect per setting (flow DiT with σ-clamp; hatched: class fidelity < 95 % or diversity "
                 "< 90 % of the target alone's; dashed: the 80 % goal)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sample_grid(res: dict, images: dict[str, Tensor], name: str, path: Path, plt) -> Path | None:
    rows, labels = [], []

    def add(key: str, label: str) -> None:
        if key in images:
            rows.append(images[key])
            labels.append(label)

    add("alone:source", "source base")
    add(f"adapted:{name}", f"source + {name}")
    for target in ("same_family", "v_unet", "flow_dit"):
        add(f"alone:{target}", f"{target} alone")
        add(f"ds:{target}:{name}:1", f"{target} DS λ=1")
        add(f"ds:{target}:{name}:2", f"{target} DS λ=2")
    if not rows:
        return None
    n = min(r.shape[0] for r in rows)
    scale = 3
    pic = png.grid([r[:n] for r in rows], scale=scale)
    if plt is None:
        png.save_png(path, pic)
        return path
    h, w, _ = pic.shape
    fig = plt.figure(figsize=(w / 100 + 2.2, h / 100 + 0.5), dpi=100)
    ax = fig.add_axes((2.2 / (w / 100 + 2.2), 0.0, (w / 100) / (w / 100 + 2.2), (h / 100) / (h / 100 + 0.5)))
    ax.imshow(pic, interpolation="nearest")
    step = h / len(rows)
    ax.set_yticks([step * (k + 0.5) for k in range(len(rows))], labels, fontsize=9)
    ax.set_xticks([])
    for side in ("top", "right", "bottom", "left"):
        ax.spines[side].set_visible(False)
    fig.suptitle(f"{name}: the same seeds and classes in every row", fontsize=10, y=0.995)
    fig.savefig(path)
    plt.close(fig)
    return path
