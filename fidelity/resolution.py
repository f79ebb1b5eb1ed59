"""The source at its own resolution, in the controlled world: a target that renders at twice the source's
training size, steered by the source at the target's size (``source_resolution`` "target") or at its own
("native", with each resampling of :mod:`lib_delta.resolution`), and the delta reused for k = 2, 3 steps.

    python -m fidelity.run --stages resolution --device cuda --out $OUT     # about 3.5 minutes on one GPU
    python -m fidelity.run --stages resolution --toy --out /tmp/res          # the pipeline at toy size on the CPU

The world scales as a whole: at twice the size the shapes are twice as large and the stripes' period is 8 px
instead of 4 (the same image, rendered finer). The source (ε-UNet) and its two adapters are trained at the
source size; the target (the same architecture, another seed) at twice that. Every measure is taken as the main
study takes it (``fidelity.study.measure``): attribute rates, class fidelity (a classifier of the target's size),
diversity; ``recovered`` is the attribute rate DS adds to the target alone over what the adapter adds to the
source base, each at its own size. ``striped_px4`` reads stripes at the source's pixel period (4 px) in the
target's images: texture that keeps its size in pixels instead of scaling with the image.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from bench.speedups import ReusedDelta
from lib_delta.guidance import DeltaGuidance
from lib_delta.lora import DeltaPatch, LoraUse, build_patch, read_lora
from lib_delta.resolution import LATENT_FACTOR, METHOD, METHODS
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SpaceBridge

from . import adapters, metrics, models, world
from .config import ADAPTATIONS, ATTRIBUTE, SEEDS
from .models import NULL_CLASS, TrainConfig
from .study import PatchedSource, Variant, measure, sample, timed


@dataclass(frozen=True)
class ResolutionConfig:
    toy: bool
    source_size: int  # px; the target renders at twice this
    images: int
    steps: int
    cfg_scale: float
    source_train: TrainConfig
    target_train: TrainConfig
    adapter_train: TrainConfig
    adapter_images: int
    classifier_steps: int
    classifier_batch: int
    calibration_images: int
    deadline_s: float
    strengths: tuple[float, ...] = (1.0, 2.0)
    reuse: tuple[int, ...] = (2, 3)

    @property
    def target_size(self) -> int:
        return 2 * self.source_size

    def period(self, size: int) -> int:
        """The stripes' period at ``size``: the world's 4 px at the source size, scaled with the image."""
        return world.STRIPE_PERIOD * size // self.source_size


def full(train_scale: float = 1.0, deadline_s: float = 215.0) -> ResolutionConfig:
    """The GPU run, in about 3.5 minutes: training budgeted in seconds (the steps reached are reported)."""

    def budget(steps: int, seconds: float, batch: int, **kw) -> TrainConfig:
        return TrainConfig(steps=max(int(steps * train_scale), 20), seconds=seconds * train_scale, batch=batch, **kw)

    return ResolutionConfig(
        toy=False, source_size=world.SIZE, images=120, steps=20, cfg_scale=3.0,
        source_train=budget(4000, 35, batch=256, lr=1e-3, warmup=100),
        target_train=budget(4000, 50, batch=128, lr=1e-3, warmup=100),
        adapter_train=budget(600, 9, batch=128, lr=1e-3, warmup=20, ema=0.98),
        adapter_images=2000, classifier_steps=max(int(400 * train_scale), 20), classifier_batch=256,
        calibration_images=2000, deadline_s=deadline_s)


def toy() -> ResolutionConfig:
    model = TrainConfig(steps=6, batch=8, lr=2e-3, warmup=2, ema=0.0)
    return ResolutionConfig(
        toy=True, source_size=16, images=6, steps=3, cfg_scale=3.0, source_train=model, target_train=model,
        adapter_train=TrainConfig(steps=4, batch=8, lr=5e-3, warmup=2, ema=0.0), adapter_images=16,
        classifier_steps=5, classifier_batch=32, calibration_images=100, deadline_s=1e9, strengths=(1.0,))


@dataclass(frozen=True)
class Run:
    """One configuration: where the source runs, how its input is resampled, how often it is evaluated."""

    resolution: str = "target"
    method: str = METHOD
    upsample: str = "bilinear"
    reuse: int = 1
    strength: float = 1.0

    def label(self) -> str:
        parts = [f"λ={self.strength:g}", self.resolution]
        if self.resolution == "native":
            parts.append(self.method + ("" if self.upsample == "bilinear" else f", {self.upsample} up"))
        if self.reuse > 1:
            parts.append(f"reuse k={self.reuse}")
        return " ".join(parts)


def runs(cfg: ResolutionConfig) -> list[Run]:
    """In priority order (a run cut short by the deadline keeps the first): the two settings at λ = 1, the other
    of the two leading resamplings (``area``, ``shift``), reuse every second step, the other resamplings, reuse
    every third, λ = 2, then the delta upsampled bicubically."""
    first, *later = cfg.reuse
    pair = tuple(dict.fromkeys((METHOD, "area", "shift")))  # the product's first
    out = [Run("target")] + [Run("native", m) for m in pair]
    out += [Run(res, reuse=first) for res in ("native", "target")]
    out += [Run("native", m) for m in METHODS if m not in pair]
    out += [Run(res, reuse=k) for k in later for res in ("native", "target")]
    out += [Run(res, strength=lam) for lam in cfg.strengths if lam != 1.0 for res in ("target", "native")]
    out += [Run("native", upsample="bicubic")]
    return out


class Log:
    def __init__(self, path: Path | None) -> None:
        self.path, self.t0 = path, time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def __call__(self, msg: str) -> None:
        line = f"[{self.elapsed:7.1f}s] {msg}"
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")


def resolution_sample(target: models.DiffusionModel, source: models.DiffusionModel, patch: DeltaPatch, lora: str,
                      run: Run, labels: Tensor, noise: Tensor, steps: int, cfg_scale: float,
                      source_size: int) -> tuple[Tensor, int]:
    """Sample ``target`` with Delta Sampling from ``source`` + ``patch`` as a host does (``study.delta_sample``),
    the source knowing its training size; returns the images and the source's evaluations."""
    made: list[PatchedSource] = []

    def guidance_for(sigmas: Tensor, labels: Tensor) -> DeltaGuidance:
        row_conds = torch.cat([source.encode(labels), source.encode(torch.full_like(labels, NULL_CLASS))])
        src = PatchedSource(source, patch, row_conds)
        made.append(src)
        settings = replace(Variant(strength=run.strength).settings(lora), source_resolution=run.resolution)
        space = replace(source.space, native_px=source_size * LATENT_FACTOR)  # pixel space: a cell is a pixel
        guidance = DeltaGuidance(settings, SpaceBridge(space, target.space),
                                 ReusedDelta(src, run.reuse) if run.reuse > 1 else src,
                                 ProgressClock(sigmas.tolist()), resampling=run.method)
        if run.upsample != "bilinear":
            grid = guidance.grid_for(torch.empty(1, 1, *noise.shape[-2:]))
            if grid is not None:
                grid.upsample = run.upsample
        return guidance

    with patch:
        images = sample(target, labels, noise, steps, cfg_scale, guidance_for)
    return images, made[0].calls


def run_stage(cfg: ResolutionConfig, device: torch.device, out: Path, results_dir: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    log = Log(None if cfg.toy else results_dir / "log.txt")
    res: dict = {"stage": "resolution", "config": asdict(cfg), "seeds": SEEDS, "timings": {},
                 "machine": {"torch": torch.__version__, "device": str(device),
                             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}

    def save(stage: str) -> None:
        res["timings"][stage] = round(log.elapsed, 1)
        (results_dir / "results.json").write_text(json.dumps(res, indent=1, default=float))

    s_size, t_size = cfg.source_size, cfg.target_size
    det_src = metrics.calibrate(cfg.calibration_images, SEEDS["detector_calibration"], device, s_size,
                                cfg.period(s_size))
    det_tgt = metrics.calibrate(cfg.calibration_images, SEEDS["detector_calibration"], device, t_size,
                                cfg.period(t_size))
    det_px4 = metrics.calibrate(cfg.calibration_images, SEEDS["detector_calibration"], device, t_size,
                                world.STRIPE_PERIOD)
    clf, res["classifier"] = metrics.train_classifier(
        cfg.classifier_steps, cfg.classifier_batch, SEEDS["classifier"], device, 8 if cfg.toy else 32,
        size=t_size, held_out=64 if cfg.toy else 1024, stripe_period=cfg.period(t_size))
    res["detectors"] = {f"{name}": {"threshold": d.stripe_threshold, "accuracy": d.accuracy, "period": d.stripe_period}
                        for name, d in (("source", det_src), ("target", det_tgt), ("target_px4", det_px4))}
    log(f"detectors {res['detectors']}; classifier {res['classifier']}")
    save("measures")

    specs = models.specs(cfg.toy)
    source = models.build(specs["source"], device)
    target = models.build(replace(specs["same_family"], name="target_2x",
                                  description=f"ε-UNet trained at {t_size} px"), device)
    res["training"] = {}
    for name, model, size, train in (("source", source, s_size, cfg.source_train),
                                     ("target_2x", target, t_size, cfg.target_train)):
        rep = models.train_model(model, train, size, probe_images=16 if cfg.toy else 256)
        res["training"][name] = rep
        log(f"trained {name} at {size} px: {rep['steps']} steps in {rep['seconds']}s, loss {rep['first_loss']:.4f}"
            f" -> {rep['last_loss']:.4f}")
        save(f"train_{name}")

    patches: dict[str, DeltaPatch] = {}
    res["adapters"] = {}
    for name, (kind, style, rank, alpha) in ADAPTATIONS.items():
        spec = adapters.AdapterSpec(kind, rank, alpha, SEEDS["adapter_init"][name])
        adapter, rep = adapters.train_adapter(source, spec, style, cfg.adapter_images, cfg.adapter_train,
                                              SEEDS["adapter_data"][name], s_size)
        path = adapter.save(out / f"resolution_{name}.safetensors", name)
        patches[name] = build_patch({"unet": source.net}, "sd1", [[LoraUse(read_lora(path))]])
        res["adapters"][name] = {k: rep[k] for k in ("steps", "seconds", "first_loss", "last_loss") if k in rep}
        log(f"adapter {name}: {rep['steps']} steps, loss {rep['first_loss']:.4f} -> {rep['last_loss']:.4f}")
    save("adapters")

    g = torch.Generator().manual_seed(SEEDS["eval_noise"])
    labels = (torch.arange(cfg.images) % len(world.CLASSES)).to(device)
    noise_s = torch.randn(cfg.images, 3, s_size, s_size, generator=g).to(device)
    noise_t = torch.randn(cfg.images, 3, t_size, t_size, generator=g).to(device)

    def rates(images: Tensor, det: metrics.Detectors) -> dict:
        return {"red": det.rate("red", images), "striped": det.rate("striped", images)}

    refs: dict = {}
    src_alone = sample(source, labels, noise_s, cfg.steps, cfg.cfg_scale)
    refs["alone:source"] = rates(src_alone, det_src)
    adapted: dict[str, Tensor] = {}
    for name, patch in patches.items():
        adapted[name] = sample(source, labels, noise_s, cfg.steps, cfg.cfg_scale, adapted=patch)
        refs[f"adapted:{name}"] = rates(adapted[name], det_src)
    tgt_alone, secs = timed(sample, target, labels, noise_t, cfg.steps, cfg.cfg_scale)
    refs["alone:target_2x"] = measure(tgt_alone, labels, det_tgt, clf) | {
        "striped_px4": det_px4.rate("striped", tgt_alone), "seconds": round(secs, 2)}
    res["references"] = refs
    for k, v in refs.items():
        log(f"{k}: {_fmt(v)}")
    save("references")

    res["checks"] = _identity_at_native_size(cfg, source, patches, adapted, labels, noise_s)
    log(f"checks: {res['checks']}")
    save("checks")

    res["runs"], res["skipped"] = [], []
    exact: dict[tuple[str, str, float], Tensor] = {}
    slowest = 0.0
    for run in runs(cfg):
        for name, patch in patches.items():
            if log.elapsed + 1.5 * slowest > cfg.deadline_s:
                res["skipped"].append({"adaptation": name, **asdict(run)})
                continue
            (imgs, calls), secs = timed(resolution_sample, target, source, patch, name, run, labels, noise_t,
                                        cfg.steps, cfg.cfg_scale, s_size)
            slowest = max(slowest, secs)
            row = {"adaptation": name, "label": run.label(), "run": asdict(run), "source_calls": calls,
                   "seconds": round(secs, 2)}
            row |= measure(imgs, labels, det_tgt, clf, tgt_alone)
            row["striped_px4"] = det_px4.rate("striped", imgs)
            attr = ATTRIBUTE[name]
            effect = refs[f"adapted:{name}"][attr] - refs["alone:source"][attr]
            row["recovered"] = (row[attr] - refs["alone:target_2x"][attr]) / effect if effect > 0 else None
            key = (name, run.resolution, run.strength)
            if run.reuse == 1 and run.method == METHOD and run.upsample == "bilinear":
                exact[key] = imgs
            elif key in exact:  # how far reuse or another resampling moves the images from the exact run's
                row["rms_vs_exact"] = (imgs - exact[key]).pow(2).mean().sqrt().item()
            if run.resolution == "native" and (name, "target", run.strength) in exact:
                row["rms_vs_target"] = (imgs - exact[name, "target", run.strength]).pow(2).mean().sqrt().item()
            res["runs"].append(row)
            log(f"{name:12s} {run.label():34s} {_fmt(row)} calls={calls} {secs:.2f}s")
        save("runs")
    (results_dir / "resolution.md").write_text(markdown(res))
    log(f"wrote {results_dir / 'results.json'} and resolution.md")
    return res


@torch.no_grad()
def _identity_at_native_size(cfg: ResolutionConfig, source: models.DiffusionModel, patches: dict[str, DeltaPatch],
                             adapted: dict[str, Tensor], labels: Tensor, noise: Tensor) -> dict:
    """At the source's own size both settings are the same computation: the source as its own target with λ = 1
    gives the adapted source, and "native" equals "target" bit for bit."""
    out: dict = {}
    for name, patch in patches.items():
        imgs = {res: resolution_sample(source, source, patch, name, Run(res), labels, noise, cfg.steps,
                                       cfg.cfg_scale, cfg.source_size)[0] for res in ("target", "native")}
        out[name] = {"native_equals_target": bool(torch.equal(imgs["native"], imgs["target"])),
                     "self_identity_max_abs": (imgs["native"] - adapted[name]).abs().max().item()}
    return out


def _fmt(m: dict) -> str:
    keys = ("red", "striped", "striped_px4", "fidelity", "diversity", "change_rms", "recovered", "rms_vs_exact",
            "rms_vs_target")
    return " ".join(f"{k}={m[k]:.3f}" for k in keys if isinstance(m.get(k), float))


def markdown(res: dict) -> str:
    refs = res["references"]
    alone = refs["alone:target_2x"]
    lines = ["# Source resolution: the fidelity study", "",
             f"Source trained at {res['config']['source_size']} px, target at {2 * res['config']['source_size']} px;"
             f" {res['config']['images']} images, {res['config']['steps']} steps, CFG {res['config']['cfg_scale']}.",
             "", f"Target alone: fidelity {alone['fidelity']:.3f}, diversity {alone['diversity']:.3f}, red "
             f"{alone['red']:.3f}, striped {alone['striped']:.3f}.", ""]
    for name in ADAPTATIONS:
        attr = ATTRIBUTE[name]
        lines += [f"**{name}** ({attr}: adapted source {refs[f'adapted:{name}'][attr]:.3f}, source base "
                  f"{refs['alone:source'][attr]:.3f})", "",
                  f"| run | {attr} | recovered | striped at 4 px | class fidelity | diversity | source calls | "
                  "RMS vs exact | RMS vs target-size source |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in res["runs"] if r["adaptation"] == name):
            rec = "–" if r["recovered"] is None else f"{r['recovered']:.2f}"
            lines.append(f"| {r['label']} | {r[attr]:.3f} | {rec} | {r['striped_px4']:.3f} | {r['fidelity']:.3f} | "
                         f"{r['diversity']:.3f} | {r['source_calls']} | {_opt(r, 'rms_vs_exact')} | "
                         f"{_opt(r, 'rms_vs_target')} |")
        lines.append("")
    lines.append(f"Checks at the source's own size: {json.dumps(res['checks'])}")
    if res.get("skipped"):
        lines.append(f"Skipped past the deadline: {len(res['skipped'])} runs.")
    lines += ["", "## What the rules say", "", *(f"- {line}" for line in verdict(res))]
    return "\n".join(lines) + "\n"


# A setting that loses no more than this against the one it would replace is as good: one evaluation of 120
# images moves a rate by a few images either way.
SAME_RECOVERED = 0.05
SAME_FIDELITY = 0.02


def verdict(res: dict) -> list[str]:
    """The decisions this study informs, each with the rule it applies: ``native`` as the default, the resampling,
    delta reuse as a user option. A rule that lacks a run (cut by the deadline) says so."""
    runs = {(r["adaptation"], r["label"]): r for r in res["runs"]}

    def compare(label: str, against: str) -> tuple[bool, str] | None:
        worst_rec, worst_fid = 0.0, 0.0
        for name in ADAPTATIONS:
            got, ref = runs.get((name, label)), runs.get((name, against))
            if got is None or ref is None:
                return None
            if got["recovered"] is not None and ref["recovered"] is not None:
                worst_rec = min(worst_rec, got["recovered"] - ref["recovered"])
            worst_fid = min(worst_fid, got["fidelity"] - ref["fidelity"])
        ok = worst_rec >= -SAME_RECOVERED and worst_fid >= -SAME_FIDELITY
        return ok, f"worst recovered {worst_rec:+.2f}, worst class fidelity {worst_fid:+.3f}"

    out = []
    native = f"λ=1 native {METHOD}"
    found = compare(native, "λ=1 target")
    out.append("native as the default: " + ("not measured" if found is None else
               f"{'yes' if found[0] else 'no'} ({found[1]} against the source at the target's size; rule: "
               f"≥ −{SAME_RECOVERED} recovered and ≥ −{SAME_FIDELITY} class fidelity on both adaptations)"))
    scores = {}
    for m in METHODS:
        rows = [runs.get((name, f"λ=1 native {m}")) for name in ADAPTATIONS]
        if all(r is not None and r["recovered"] is not None for r in rows):
            scores[m] = (sum(r["recovered"] for r in rows) / len(rows), min(r["fidelity"] for r in rows))
    if scores:
        listed = ", ".join(f"{m} {rec:.2f} / {fid:.3f}" for m, (rec, fid) in scores.items())
        out.append(f"resampling (mean recovered / lowest class fidelity): {listed}; the product uses {METHOD}")
    for res_name in ("native", "target"):
        base = native if res_name == "native" else "λ=1 target"
        found = compare(f"{base} reuse k=2", base)
        out.append(f"reuse k=2 at {res_name}: " + ("not measured" if found is None else
                   f"{'as good as exact' if found[0] else 'worse than exact'} ({found[1]})"))
    return out


def _opt(row: dict, key: str) -> str:
    return f"{row[key]:.3f}" if isinstance(row.get(key), float) else "–"


__all__ = ["ResolutionConfig", "Run", "full", "resolution_sample", "run_stage", "runs", "toy"]
