"""A ControlNet on the source, carried to the other targets: does the shape land where the control says?

    python -m fidelity.run --stages control --device cuda --out $OUT     # under 4 minutes on one GPU
    python -m fidelity.run --stages control --toy --out /tmp/control     # the pipeline at toy size on the CPU

The control is a mask of where the shape goes (the silhouette the world drew it with). The adapter is ControlNet's
recipe at the study's size: a trainable copy of the source UNet's encoder (``devkit.controlnet.ControlNet``, started
from the source's weights) fed the mask through a hint block at the image's own resolution (its last conv random, see
:func:`build_control`), its zero-initialised 1×1 convs adding a residual to each skip and to the middle block.
It is trained on the frozen source with the diffusion loss on fresh world images and their masks. It runs through
the AUTOMATIC1111 host's own row hooks (:class:`~lib_delta.hosts.a1111.control_rows.RowControl`): in Delta Sampling
on the source's adapted rows only.

Per target (the main study's same-family ε-UNet, v-UNet and flow DiT, trained here from scratch on the same world):
the target alone, and Delta Sampling from the source with its control at λ = 1 and 2; beside them the source base
and the source with its control. Measured by :mod:`fidelity.placement` (IoU with the asked mask, hits at IoU ≥ 0.5,
centre distance) and the main study's class fidelity; ``recovered`` is the IoU Delta Sampling adds to the target
alone over what the control adds to the source base. Check: the source as its own target at λ = 1 gives the source
with its control.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from devkit.controlnet import ControlNet
from devkit.families import fill_zero_tensors
from lib_delta.guidance import DeltaGuidance
from lib_delta.hosts.a1111.control_rows import RowControl
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SpaceBridge

from . import metrics, models, placement, world
from .config import SEEDS
from .models import NULL_CLASS, DiffusionModel, TrainConfig
from .resolution import Log
from .study import Variant, sample, timed

HINT_WIDTHS = (16, 16, 32, 32, 32, 32, 64)
LABEL = "mask_control"  # the group's name in the settings; the guidance reads only its strength and window
CONTROL_SEEDS = {"control_init": 51, "control_data": 52, "eval_masks": 53}
CLAMPED = ("flow_dit",)  # targets whose schedule reaches above the source's σ_max (as in the main study)
MIN_EFFECT = 0.05  # IoU the control must add to the source for "recovered" to be a ratio worth printing


@dataclass(frozen=True)
class ControlConfig:
    toy: bool
    size: int
    images: int
    steps: int
    cfg_scale: float
    model_train: dict[str, TrainConfig]
    control_train: TrainConfig
    classifier_steps: int
    classifier_batch: int
    deadline_s: float
    targets: tuple[str, ...] = ("same_family", "v_unet", "flow_dit")
    strengths: tuple[float, ...] = (1.0, 2.0)


def full(train_scale: float = 1.0, deadline_s: float = 220.0) -> ControlConfig:
    """The GPU run, in under 4 minutes: training budgeted in seconds (the steps reached are reported; the main
    study's models reach about 9 steps a second of batch 256 on an H200, so these are short trainings, and the
    λ = 2 runs are the first to go past the deadline)."""

    def budget(seconds: float, lr: float = 1e-3, batch: int = 256, **kw) -> TrainConfig:
        return TrainConfig(steps=max(int(4000 * train_scale), 20), seconds=seconds * train_scale, batch=batch, lr=lr,
                           warmup=100, **kw)

    return ControlConfig(
        toy=False, size=world.SIZE, images=160, steps=20, cfg_scale=3.0,
        model_train={"source": budget(45), "same_family": budget(28), "v_unet": budget(22),
                     "flow_dit": budget(30, lr=5e-4)},
        control_train=budget(50, batch=128, ema=0.98),
        classifier_steps=max(int(400 * train_scale), 20), classifier_batch=512, deadline_s=deadline_s)


def toy() -> ControlConfig:
    model = TrainConfig(steps=6, batch=8, lr=2e-3, warmup=2, ema=0.0)
    return ControlConfig(
        toy=True, size=16, images=6, steps=3, cfg_scale=3.0, model_train=dict.fromkeys(
            ("source", "same_family", "v_unet", "flow_dit"), model),
        control_train=TrainConfig(steps=6, batch=8, lr=5e-3, warmup=2, ema=0.0), classifier_steps=5,
        classifier_batch=32, deadline_s=1e9, strengths=(1.0,))


# --- the control -------------------------------------------------------------------------------------------------


class MaskUnit:
    """What :class:`RowControl` asks of a unit: the net, the hint of the rows it runs on, and its weights."""

    def __init__(self, net: ControlNet) -> None:
        self.net = net
        self.masks: Tensor | None = None  # [b, 1, H, W]: one per image
        self.index: list[int] = []  # the image of each row the coming forward controls

    def hint(self, height: int, width: int, device: torch.device) -> Tensor:
        assert self.masks is not None
        return self.masks[self.index]  # the UNet's own resolution: pixel space, whatever the host's 8 px cell says

    def scales(self, hires: bool) -> list[float]:
        return [1.0] * (len(self.net.zero_convs) + 1)


def build_control(source: DiffusionModel) -> ControlNet:
    """ControlNet's start: the encoder copied from the source, zero convs at zero (the source unchanged until it
    learns), a hint block at pixel scale. Unlike ControlNet, the hint block's last conv starts random rather than at
    zero: the mask reaches the encoder from the first step, which a training of a few hundred steps needs (with both
    at zero the mask's path opens only once the zero convs have grown)."""
    device = next(source.net.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(CONTROL_SEEDS["control_init"])
        net = ControlNet(source.spec.unet, hint_channels=1, hint_widths=HINT_WIDTHS, hint_halvings=0)
        fill_zero_tensors(net.input_hint_block, torch.Generator().manual_seed(CONTROL_SEEDS["control_init"]))
    missing, _ = net.load_state_dict(source.net.state_dict(), strict=False)
    assert all(k.startswith(("zero_convs", "middle_block_out", "input_hint_block")) for k in missing), missing
    return net.to(device)


def train_control(source: DiffusionModel, unit: MaskUnit, control: RowControl, cfg: TrainConfig, size: int) -> dict:
    """The diffusion loss of the frozen source with the ControlNet on every row, on fresh world images and their
    masks (CFG dropout drops the class, never the mask, as ControlNet's training drops the prompt)."""
    device = next(source.net.parameters()).device

    def data(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x, labels, masks = world.batch_with_masks(n, "plain", g, device, size)
        flip = torch.rand(n, generator=g, device=device) < 0.5
        unit.masks = torch.where(flip[:, None, None, None], masks.flip(-1), masks)
        unit.index = list(range(n))
        return torch.where(flip[:, None, None, None], x.flip(-1), x), labels

    unit.net.train().requires_grad_(True)
    try:
        with control.rows([(slice(None), [unit])]):
            report = models.train(source, list(unit.net.parameters()), data, cfg, seed=CONTROL_SEEDS["control_data"])
    finally:
        unit.net.eval().requires_grad_(False)
    report["params"] = sum(p.numel() for p in unit.net.parameters())
    return report


class ControlledSource:
    """The ``SourceModel``: one batched forward of the source over ``[base | adapted]`` rows, the ControlNet on the
    adapted rows only; a VE source asked above its σ_max is clamped as :class:`fidelity.study.PatchedSource` does."""

    def __init__(self, model: DiffusionModel, unit: MaskUnit, control: RowControl, row_conds: Tensor, images: int,
                 clamp: bool = False) -> None:
        self.model, self.unit, self.control, self.row_conds = model, unit, control, row_conds
        self.images, self.clamp = images, clamp
        self.calls = 0

    def __call__(self, x: Tensor, level: Tensor, rows: Sequence[int], variants: Sequence[int]) -> Tensor:
        self.calls += 1
        n, k = len(rows), len(variants)
        if self.clamp and not self.model.is_flow:
            ratio = (float(self.model.denoiser.sigma_max) / level).clamp(max=1.0)
            x, level = x * ratio[:, None, None, None], level * ratio
        self.unit.index = [r % self.images for r in rows]  # target rows are [cond | uncond] of the same images
        plan = [(slice(i * n, (i + 1) * n), [self.unit]) for i, v in enumerate(variants) if v > 0]
        with self.control.rows(plan), _autocast(x.device):
            out = self.model.denoiser(x.repeat(k, 1, 1, 1), level.repeat(k), self.row_conds[list(rows)].repeat(k, 1, 1))
        return out.float().view(k, n, *x.shape[1:])


class ControlOnEveryRow:
    """The source with its control, for :func:`fidelity.study.sample`'s ``adapted`` (a patch's interface)."""

    def __init__(self, unit: MaskUnit, control: RowControl, images: int) -> None:
        self.unit, self.control, self.images = unit, control, images

    @contextlib.contextmanager
    def rows(self, plan: object) -> Iterator[None]:
        self.unit.index = list(range(self.images)) * 2  # [cond | uncond]
        with self.control.rows([(slice(None), [self.unit])]):
            yield

    def __enter__(self) -> ControlOnEveryRow:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def delta_sample(target: DiffusionModel, source: DiffusionModel, unit: MaskUnit, control: RowControl,
                 variant: Variant, labels: Tensor, noise: Tensor, steps: int, cfg_scale: float) -> tuple[Tensor, int]:
    made: list[ControlledSource] = []

    def guidance_for(sigmas: Tensor, labels: Tensor) -> DeltaGuidance:
        row_conds = torch.cat([source.encode(labels), source.encode(torch.full_like(labels, NULL_CLASS))])
        src = ControlledSource(source, unit, control, row_conds, labels.shape[0], variant.clamp)
        made.append(src)
        return DeltaGuidance(variant.settings(LABEL), SpaceBridge(source.space, target.space), src,
                             ProgressClock(sigmas.tolist()))

    images = sample(target, labels, noise, steps, cfg_scale, guidance_for)
    return images, made[0].calls


# --- the stage -----------------------------------------------------------------------------------------------------


def run_stage(cfg: ControlConfig, device: torch.device, out: Path, results_dir: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    log = Log(None if cfg.toy else results_dir / "log.txt")
    res: dict = {"stage": "control", "config": asdict(cfg), "seeds": {**SEEDS, **CONTROL_SEEDS}, "timings": {},
                 "machine": {"torch": torch.__version__, "device": str(device),
                             "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}

    def save(stage: str) -> None:
        res["timings"][stage] = round(log.elapsed, 1)
        (results_dir / "results.json").write_text(json.dumps(res, indent=1, default=float))

    clf, res["classifier"] = metrics.train_classifier(
        cfg.classifier_steps, cfg.classifier_batch, SEEDS["classifier"], device, 8 if cfg.toy else 32, size=cfg.size,
        held_out=64 if cfg.toy else 1024)
    log(f"classifier {res['classifier']}")

    specs = models.specs(cfg.toy)
    trained: dict[str, DiffusionModel] = {}
    res["training"] = {}
    for name in ("source", *cfg.targets):
        model = models.build(specs[name], device)
        rep = models.train_model(model, cfg.model_train[name], cfg.size, probe_images=16 if cfg.toy else 256)
        res["training"][name] = {k: rep[k] for k in ("steps", "seconds", "first_loss", "last_loss")}
        trained[name] = model
        log(f"trained {name}: {rep['steps']} steps in {rep['seconds']}s, loss {rep['first_loss']:.4f} -> "
            f"{rep['last_loss']:.4f}")
        save(f"train_{name}")
    source = trained["source"]
    unit = MaskUnit(build_control(source))
    control = RowControl(source.net)
    try:
        rep = train_control(source, unit, control, cfg.control_train, cfg.size)
        res["training"]["control"] = {k: rep[k] for k in ("steps", "seconds", "first_loss", "last_loss", "params")}
        log(f"trained the ControlNet: {rep['steps']} steps in {rep['seconds']}s, loss {rep['first_loss']:.4f} -> "
            f"{rep['last_loss']:.4f}")
        save("train_control")
        _evaluate(cfg, res, trained, unit, control, clf, device, log, save)
    finally:
        control.remove()
    (results_dir / "control.md").write_text(markdown(res))
    log(f"wrote {results_dir / 'results.json'} and control.md")
    return res


def _evaluate(cfg: ControlConfig, res: dict, trained: dict[str, DiffusionModel], unit: MaskUnit,
              control: RowControl, clf: nn.Module, device: torch.device, log: Log, save) -> None:
    source = trained["source"]
    g = world.generator(CONTROL_SEEDS["eval_masks"], device)
    labels = (torch.arange(cfg.images, device=device) % len(world.CLASSES))
    real, masks = world.render_with_masks(labels, "plain", g, device, cfg.size)
    unit.masks = masks
    noise = torch.randn(cfg.images, 3, cfg.size, cfg.size, generator=world.generator(SEEDS["eval_noise"])).to(device)

    def measured(images: Tensor, **extra: object) -> dict:
        return {**placement.placement(images, masks), "fidelity": metrics.class_fidelity(clf, images, labels),
                **extra}

    refs = {"world": placement.placement(real, masks)}  # the measure's ceiling
    base = sample(source, labels, noise, cfg.steps, cfg.cfg_scale)
    refs["source base"] = measured(base)
    with_control = sample(source, labels, noise, cfg.steps, cfg.cfg_scale,
                          adapted=ControlOnEveryRow(unit, control, cfg.images))
    refs["source with its control"] = measured(with_control)
    res["references"] = refs
    for k, v in refs.items():
        log(f"{k}: {_fmt(v)}")
    self_ds, _ = delta_sample(source, source, unit, control, Variant(strength=1.0), labels, noise, cfg.steps,
                              cfg.cfg_scale)
    res["checks"] = {"self_identity_max_abs": (self_ds - with_control).abs().max().item(),
                     "control_change_rms": (with_control - base).pow(2).mean().sqrt().item()}
    log(f"checks: {res['checks']}")
    save("references")

    effect = refs["source with its control"]["iou"] - refs["source base"]["iou"]
    res["runs"], res["skipped"] = [], []
    slowest = 0.0
    for strength in (0.0, *cfg.strengths):
        for name in cfg.targets:
            if log.elapsed + 1.5 * slowest > cfg.deadline_s:
                res["skipped"].append({"target": name, "strength": strength})
                continue
            target = trained[name]
            if strength == 0.0:
                (imgs, calls), secs = timed(lambda t=target: (sample(t, labels, noise, cfg.steps, cfg.cfg_scale), 0))
            else:
                variant = Variant(strength=strength, clamp=name in CLAMPED)
                (imgs, calls), secs = timed(delta_sample, target, source, unit, control, variant, labels, noise,
                                            cfg.steps, cfg.cfg_scale)
            slowest = max(slowest, secs)
            row = {"target": name, "strength": strength, "source_calls": calls, "seconds": round(secs, 2),
                   **measured(imgs)}
            alone = next((r for r in res["runs"] if r["target"] == name and r["strength"] == 0.0), None)
            row["recovered"] = (row["iou"] - alone["iou"]) / effect if alone is not None and effect > MIN_EFFECT \
                else None
            res["runs"].append(row)
            log(f"{name:12s} λ={strength:g} {_fmt(row)} calls={calls} {secs:.2f}s")
        save("runs")


def _fmt(m: dict) -> str:
    return " ".join(f"{k}={m[k]:.3f}" for k in ("iou", "hit", "centre_px", "fidelity", "recovered")
                    if isinstance(m.get(k), float))


def markdown(res: dict) -> str:
    refs = res.get("references", {})
    cfg = res["config"]
    lines = ["# ControlNet on the source: the fidelity study", "",
             f"{cfg['images']} images of {cfg['size']} px, {cfg['steps']} Euler steps, CFG {cfg['cfg_scale']}; the "
             "control asks for each image's shape at a drawn place (the world's own silhouette of the class).", "",
             "| model | λ | IoU | hits (IoU ≥ 0.5) | centre distance (px) | class fidelity | recovered |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key in ("world", "source base", "source with its control"):
        if key in refs:
            r = refs[key]
            fid = f"{r['fidelity']:.3f}" if "fidelity" in r else "–"
            label = "world images (the measure's ceiling)" if key == "world" else key
            lines.append(f"| {label} | – | {r['iou']:.3f} | {r['hit']:.3f} | {r['centre_px']:.2f} | {fid} | – |")
    for r in res.get("runs", []):
        rec = "–" if r["recovered"] is None else f"{r['recovered']:.2f}"
        what = f"{r['target']} alone" if r["strength"] == 0 else f"{r['target']} + Delta Sampling"
        lines.append(f"| {what} | {r['strength']:g} | {r['iou']:.3f} | {r['hit']:.3f} | {r['centre_px']:.2f} | "
                     f"{r['fidelity']:.3f} | {rec} |")
    lines += ["", f"Training: {json.dumps(res.get('training', {}))}", "",
              f"Checks: {json.dumps(res.get('checks', {}))}"]
    if res.get("skipped"):
        lines.append(f"Skipped past the deadline: {res['skipped']}")
    return "\n".join(lines) + "\n"


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


__all__ = ["ControlConfig", "full", "run_stage", "toy"]
