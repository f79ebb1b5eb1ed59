"""Figures of a ``fidelity.compare`` result: recovered effect and class fidelity against the gap (with the bounds),
Delta Sampling against the merged adapter and the adaptive rules, and a sample grid.

Charts need matplotlib (present on the GPU machine, never needed by the tests); the sample grid falls back to the
plain PNG writer without it.
"""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
from torch import Tensor

from . import png, report
from .compare_tables import TARGET_NAMES, _find, alone_of, best_constant, gap_series, holds_on_gap
from .config import ADAPTATIONS
from .evaluation import acceptable
from .gaps import COLOUR_LEVELS
from .plots import _pyplot


def make_all(res: dict, images: dict[str, Tensor], outdir: Path) -> list[Path]:
    written = []
    plt = _pyplot()
    for fn in (samples, gaps_plot, naive_adaptive_plot):
        try:
            path = fn(res, images, outdir, plt)
        except Exception:  # the measurements are written already; a figure must not lose them
            traceback.print_exc()
            path = None
        if path is not None:
            written.append(path)
    return written


def gaps_plot(res: dict, images, outdir: Path, plt) -> Path | None:
    axes_present = sorted({r["gap"]["axis"] for r in res["runs"] if "gap" in r})
    if plt is None or not axes_present:
        return None
    fig, axes = plt.subplots(2, len(axes_present), figsize=(5.2 * len(axes_present), 7.5), squeeze=False)
    for j, axis in enumerate(axes_present):
        labels = list(dict.fromkeys(r["label"] for r in res["runs"] if r.get("gap", {}).get("axis") == axis))
        for i, ad in enumerate(ADAPTATIONS):
            for k, label in enumerate(labels):
                rows = gap_series(res, axis, ad, label)
                if not rows:
                    continue
                x = [r["gap"]["level"] for r in rows]
                kw = {"color": f"C{i}", "ls": ["-", "--", ":", "-."][k % 4], "marker": "o", "capsize": 3,
                      "label": f"{ad}: {label}"}
                axes[0, j].errorbar(x, [r["recovered"] if r["recovered"] is not None else np.nan for r in rows],
                                    yerr=[r["spread"].get("recovered", 0) / 2 for r in rows], **kw)
                axes[1, j].errorbar(x, [r["fidelity"] for r in rows],
                                    yerr=[r["spread"].get("fidelity", 0) / 2 for r in rows], **kw)
                for r in rows:  # crosses: outside the bounds relative to the gapped target alone
                    if not holds_on_gap(res, r):
                        axes[1, j].plot(r["gap"]["level"], r["fidelity"], "x", color="k", ms=9)
        axes[0, j].axhline(report.GOAL_RECOVERED, color="k", ls=":", lw=1)
        axes[1, j].axhline(report.MIN_FIDELITY, color="r", ls=":", lw=1)
        axes[0, j].set_title(f"gap: {axis}")
        axes[1, j].set_xlabel({"colour": "colour shift k of the target's world", "scale": "target latent scale s",
                               "steps": "target sampling steps"}.get(axis, axis))
        if axis in ("scale", "steps"):
            axes[0, j].invert_xaxis()
            axes[1, j].invert_xaxis()
        axes[0, j].set_ylabel("recovered effect")
        axes[1, j].set_ylabel("class fidelity (× : outside the bounds)")
        for ax in axes[:, j]:
            ax.grid(alpha=0.3)
        axes[0, j].legend(fontsize=7)
    fig.suptitle(f"Where transfer breaks ({res.get('budget')} training)\nmean of the seeds, bars: half the spread\n"
                 "dotted: 0.8 recovered, 95 % fidelity", fontsize=9)
    fig.tight_layout()
    path = outdir / "compare_gaps.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def naive_adaptive_plot(res: dict, images, outdir: Path, plt) -> Path | None:
    if plt is None or not res.get("runs"):
        return None
    rules = list(dict.fromkeys(r["rule"] for r in res["runs"] if r["stage"] == "adaptive"))
    series = ["best constant", *rules, "merged ×1"]
    fig, axes = plt.subplots(len(ADAPTATIONS), 1, figsize=(12, 3.8 * len(ADAPTATIONS)), squeeze=False)
    targets = ("same_family", "v_unet", "flow_dit")
    width = 0.8 / len(series)
    for i, ad in enumerate(ADAPTATIONS):
        ax = axes[i, 0]
        for j, name in enumerate(series):
            vals, errs, ok = [], [], []
            for t in targets:
                if name == "best constant":
                    row = best_constant(res, t, ad)
                elif name == "merged ×1":
                    row = _find(res, stage="naive", target=t, adaptation=ad, strength=1.0)
                else:
                    row = _find(res, stage="adaptive", target=t, adaptation=ad, rule=name)
                good = row is not None and row.get("recovered") is not None
                vals.append(row["recovered"] if good else np.nan)
                errs.append(row["spread"].get("recovered", 0) / 2 if good else 0)
                ok.append(good and acceptable(row, alone_of(res, row), "relative"))
            xs = [k + (j - (len(series) - 1) / 2) * width for k in range(len(targets))]
            bars = ax.bar(xs, vals, width, yerr=errs, capsize=2, color=f"C{j}", label=name)
            for bar, good, v in zip(bars, ok, vals, strict=True):
                if not good:
                    bar.set_hatch("///")
                    bar.set_alpha(0.45)
                if not np.isnan(v) and v < 0.05:  # a bar too short to see is a measured near-zero, not a gap
                    ax.annotate(f"{v:.2f}", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom",
                                fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.axhline(report.GOAL_RECOVERED, color="k", ls="--", lw=1)
        ax.set_xticks(range(len(targets)), [TARGET_NAMES[t] for t in targets])
        ax.set_ylabel(f"{ad}: recovered effect")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=3)
    fig.suptitle(f"Best constant λ, adaptive rules (λ = 1) and the merged adapter ({res.get('budget')} training)\n"
                 "hatched: outside the bounds; missing: does not load", fontsize=10)
    fig.tight_layout()
    path = outdir / "compare_naive_adaptive.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def samples(res: dict, images: dict[str, Tensor], outdir: Path, plt) -> Path | None:
    rows = []
    for key in ("alone:source", *(f"adapted:{a}" for a in ADAPTATIONS), "alone:same_family"):
        if key in images:
            rows.append(images[key])
    tuned = f"colour_{COLOUR_LEVELS[0]:g}"  # the first fine-tune of the source: both routes exist there
    for ad in ADAPTATIONS:
        for key in (f"ds:same_family:{ad}:1", f"naive:same_family:{ad}:1", f"ds:v_unet:{ad}:1",
                    f"ds:flow_dit:{ad}:1", f"ds:{tuned}:{ad}:1", f"naive:{tuned}:{ad}:1"):
            if key in images:
                rows.append(images[key])
    if not rows:
        return None
    n = min(r.shape[0] for r in rows)
    path = outdir / "compare_samples.png"
    png.save_png(path, png.grid([r[:n] for r in rows], scale=3))
    return path
