"""The whole study: detectors, classifier, models, adapters, then the grid of sampling runs and the summary.

``run_study`` returns a JSON-ready result dict (and the sample images the plots need); it writes the trained
models and adapter files under ``out`` and the result JSON under ``results`` after every stage, so a run cut
short still leaves what it measured.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lib_delta.lora import DeltaPatch, LoraUse, build_patch, read_lora
from lib_delta.schedule import SCHEDULES

from . import adapters, metrics, models, report, world
from .config import ADAPTATIONS, SEEDS, StudyConfig
from .study import Variant, delta_sample, measure, sample, timed


def grid(cfg: StudyConfig) -> list[tuple[str, str, Variant]]:
    """(stage, target, variant) in priority order: the λ sweep first, on every target ("self": the source base as
    its own target, the control). Targets in ``cfg.clamp_targets`` (flow) run the λ sweep both as the core does
    it and with the source's noise level clamped, and every later stage clamped (see ``PatchedSource``)."""
    runs: list[tuple[str, str, Variant]] = []

    def v(target: str, **kw) -> Variant:
        return Variant(clamp=target in cfg.clamp_targets, **kw)

    if "lambda" in cfg.stages:
        runs += [("lambda", t, Variant(strength=lam)) for t in cfg.targets
                 for lam in (cfg.self_lambdas if t == "self" else cfg.lambdas)]
        runs += [("lambda", t, Variant(strength=lam, clamp=True)) for t in cfg.clamp_targets if t in cfg.targets
                 for lam in cfg.lambdas if lam]
    if "base_first" in cfg.stages:
        runs += [("base_first", t, v(t, mode="base-first", end=e)) for t in cfg.sweep_targets
                 for e in cfg.base_first_ends]
    skip_first = 0.5 / cfg.steps  # a window that leaves out the first step only
    for lam in cfg.sweep_strengths:  # every stage at the first strength before any at the next
        for stage in cfg.stages:
            if stage == "schedule":
                runs += [(stage, t, v(t, strength=lam, schedule=s)) for t in cfg.sweep_targets
                         for s in SCHEDULES if s != "constant"]
            elif stage == "cfg_mode":
                runs += [(stage, t, v(t, strength=lam, cfg_mode="cond")) for t in cfg.sweep_targets]
            elif stage == "trajectory":
                runs += [(stage, t, v(t, strength=lam, trajectory="separate")) for t in cfg.sweep_targets]
            elif stage == "window":
                runs += [(stage, t, v(t, strength=lam, start=a, end=b)) for t in cfg.sweep_targets
                         for a, b in ((skip_first, 1.0), (0.0, 0.5), (0.5, 1.0))]
                runs += [(stage, t, Variant(strength=lam, start=skip_first)) for t in cfg.clamp_targets
                         if t in cfg.sweep_targets]
            elif stage not in ("lambda", "base_first"):
                raise ValueError(f"unknown stage {stage!r}")
    return runs


class Log:
    def __init__(self, path: Path | None):
        self.path, self.t0 = path, time.perf_counter()

    def __call__(self, msg: str) -> None:
        line = f"[{time.perf_counter() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(line + "\n")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.t0


def machine(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
            "cpu": platform.processor() or platform.machine()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


class Study:
    """One run's shared state: config, device, folders, the log and the result dict being filled."""

    def __init__(self, cfg: StudyConfig, device: torch.device, out: Path, results_dir: Path):
        self.cfg, self.device, self.out, self.results_dir = cfg, device, out, results_dir
        self.log = Log(results_dir / "log.txt" if not cfg.toy else None)
        self.res: dict = {"config": cfg.as_dict(), "machine": machine(device), "seeds": SEEDS, "timings": {}}
        self.images: dict[str, Tensor] = {}  # the few samples the figures show

    def checkpoint(self, stage: str) -> None:
        self.res["timings"][stage] = round(self.log.elapsed, 1)
        if not self.cfg.toy:
            (self.results_dir / "results.json").write_text(json.dumps(self.res, indent=1, default=float))


def run_study(cfg: StudyConfig, device: torch.device, out: Path, results_dir: Path) -> tuple[dict, dict[str, Tensor]]:
    out.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # a handful of fixed shapes: autotuning pays back at once
    st = Study(cfg, device, out, results_dir)
    detectors, clf = _measures(st)
    zoo = _train_models(st)
    if cfg.models_only:
        _alone(st, zoo, [n for n in models.specs(cfg.toy, cfg.eps_channels) if n in zoo], detectors, clf)
        st.checkpoint("models_only")
        return st.res, st.images
    patches = _train_adapters(st, zoo["source"])
    labels, noise, alone = _references(st, zoo, patches, detectors, clf)
    _grid(st, zoo, patches, labels, noise, alone, detectors, clf)
    st.res["summary"] = report.summarise(st.res)
    st.checkpoint("summary")
    return st.res, st.images


def _measures(st: Study) -> tuple[metrics.Detectors, torch.nn.Module]:
    cfg, res = st.cfg, st.res
    detectors = metrics.calibrate(cfg.calibration_images, SEEDS["detector_calibration"], st.device, cfg.size)
    res["detectors"] = {"stripe_threshold": detectors.stripe_threshold, "accuracy": detectors.accuracy,
                        "red_min_fraction": metrics.RED_MIN_FRACTION}
    st.log(f"detectors: {res['detectors']}")
    clf, res["classifier"] = metrics.train_classifier(cfg.classifier_steps, cfg.classifier_batch, SEEDS["classifier"],
                                                      st.device, cfg.classifier_width, size=cfg.size,
                                                      held_out=64 if cfg.toy else 2048)
    st.log(f"classifier: {res['classifier']}")
    st.checkpoint("measures")
    return detectors, clf


def _train_models(st: Study) -> dict[str, models.DiffusionModel]:
    zoo: dict[str, models.DiffusionModel] = {}
    st.res["training"] = {}
    for name, spec in models.specs(st.cfg.toy, st.cfg.eps_channels).items():
        if st.cfg.models_only and name not in st.cfg.models_only:
            continue
        model = models.build(spec, st.device)
        weights, report = st.out / f"{name}.safetensors", st.out / f"{name}.json"
        train_cfg = st.cfg.model_train[name]
        saved = json.loads(report.read_text()) if st.cfg.reuse_models and report.exists() else {}
        # another weighting or width trains anew
        if (weights.exists() and saved.get("weighting", "none") == train_cfg.weighting
                and saved.get("params") == model.n_params()):
            # trained by an earlier run into this folder (a long training split over several runs)
            load_model(model, weights)
            rep = json.loads(report.read_text()) | {"reused": True}
            model.train_report = rep
            verb = "reused"
        else:
            rep = models.train_model(model, train_cfg, st.cfg.size,
                                     probe_images=16 if st.cfg.toy else 256)
            save_model(model, weights)
            report.write_text(json.dumps(rep, default=float))
            verb = "trained"
        zoo[name] = model
        st.res["training"][name] = rep
        st.log(f"{verb} {name}: {rep['params']:,} params, {rep['steps']} steps in {rep['seconds']}s, "
               f"loss {rep['first_loss']:.4f} -> {rep['last_loss']:.4f}; x0 MSE by σ {rep.get('x0_mse_by_sigma')}")
        st.checkpoint(f"train_{name}")
    zoo["self"] = zoo["source"]
    return zoo


def save_model(model: models.DiffusionModel, path: Path) -> None:
    save_file({f"net.{k}": v.contiguous() for k, v in model.net.state_dict().items()}
              | {f"encoder.{k}": v.contiguous() for k, v in model.encoder.state_dict().items()}, str(path))


def load_model(model: models.DiffusionModel, path: Path) -> None:
    """Weights saved by ``save_model``, loaded in place; the model is left frozen in eval mode."""
    state = load_file(str(path), device=str(next(model.net.parameters()).device))
    model.net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    model.encoder.load_state_dict({k[8:]: v for k, v in state.items() if k.startswith("encoder.")})
    model.net.eval().requires_grad_(False)
    model.encoder.eval().requires_grad_(False)


def _train_adapters(st: Study, source: models.DiffusionModel) -> dict[str, DeltaPatch]:
    """Fine-tune each adaptation on the source, save it as a LoRA/LyCORIS file and load that file back through
    lib_delta.lora, as a host would."""
    patches: dict[str, DeltaPatch] = {}
    st.res["adapters"] = {}
    probe = _probe_batch(source, st.device, st.cfg.size)
    for name, (kind, style, rank, alpha) in ADAPTATIONS.items():
        spec = adapters.AdapterSpec(kind, rank, alpha, SEEDS["adapter_init"][name])
        adapter, rep = adapters.train_adapter(source, spec, style, st.cfg.adapter_images,
                                              st.cfg.adapter_train[name], SEEDS["adapter_data"][name], st.cfg.size)
        path = adapter.save(st.out / f"{name}.safetensors", name)
        patch = build_patch({"unet": source.net}, "sd1", [[LoraUse(read_lora(path))]])
        patches[name] = patch
        rep.update(file=path.name, file_bytes=path.stat().st_size, load_report=patch.summary(),
                   file_vs_training_rel_err=_file_vs_training(source, adapter, patch, probe))
        st.res["adapters"][name] = rep
        st.log(f"adapter {name}: {rep['steps']} steps in {rep['seconds']}s, loss {rep['first_loss']:.4f} -> "
               f"{rep['last_loss']:.4f}; file vs training rel. err {rep['file_vs_training_rel_err']:.2e}\n"
               f"  {rep['load_report']}")
        st.checkpoint(f"adapter_{name}")
    return patches


def _references(st: Study, zoo: dict, patches: dict, detectors: metrics.Detectors,
                clf: torch.nn.Module) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Every model alone and the adapted source alone, on the evaluation seeds (classes in turn)."""
    cfg = st.cfg
    labels, noise, alone, refs = _alone(st, zoo, ["source", "same_family", "v_unet", "flow_dit"], detectors, clf,
                                        log=False)
    alone["self"] = alone["source"]
    for name, patch in patches.items():
        imgs, secs = timed(sample, zoo["source"], labels, noise, cfg.steps, cfg.cfg_scale, adapted=patch)
        alone[f"adapted:{name}"] = imgs
        st.images[f"adapted:{name}"] = imgs[: cfg.grid_images]
        refs[f"adapted:{name}"] = measure(imgs, labels, detectors, clf, alone["source"]) | {"seconds": round(secs, 2)}
    st.res["references"] = refs
    for k, v in refs.items():
        st.log(f"{k}: {_fmt(v)}")
    st.checkpoint("references")
    return labels, noise, alone


def _alone(st: Study, zoo: dict, names: list[str], detectors: metrics.Detectors, clf: torch.nn.Module,
           log: bool = True) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, dict]]:
    """Each model of ``names`` on its own on the evaluation seeds (classes in turn, the same noise for every
    model); the measures go to ``st.res["references"]`` as ``alone:<name>``."""
    cfg = st.cfg
    g = torch.Generator().manual_seed(SEEDS["eval_noise"])
    labels = (torch.arange(cfg.images) % len(world.CLASSES)).to(st.device)
    noise = torch.randn(cfg.images, 3, cfg.size, cfg.size, generator=g).to(st.device)
    refs: dict[str, dict] = st.res.setdefault("references", {})
    alone: dict[str, Tensor] = {}
    for name in names:
        imgs, secs = timed(sample, zoo[name], labels, noise, cfg.steps, cfg.cfg_scale)
        alone[name] = imgs
        st.images[f"alone:{name}"] = imgs[: cfg.grid_images]
        refs[f"alone:{name}"] = measure(imgs, labels, detectors, clf) | {"seconds": round(secs, 2)}
        if log:
            st.log(f"alone:{name}: {_fmt(refs[f'alone:{name}'])}")
    return labels, noise, alone, refs


def _grid(st: Study, zoo: dict, patches: dict, labels: Tensor, noise: Tensor, alone: dict[str, Tensor],
          detectors: metrics.Detectors, clf: torch.nn.Module) -> None:
    """Every configuration of ``grid(cfg)`` with both adaptations, in priority order, until the deadline."""
    cfg, res = st.cfg, st.res
    res["runs"], res["skipped"], res["checks"] = [], [], {"lambda0_identical": {}, "self_identity_max_abs": {}}
    per_run = 0.0  # the slowest run so far: the deadline leaves room for one more
    for stage, target, variant in grid(cfg):
        for name in ADAPTATIONS:
            if st.log.elapsed + 1.5 * per_run > cfg.deadline_s:
                res["skipped"].append({"stage": stage, "target": target, "adaptation": name,
                                       "variant": variant.as_dict()})
                continue
            (imgs, calls), secs = timed(delta_sample, zoo[target], zoo["source"], patches[name], name, variant,
                                        labels, noise, cfg.steps, cfg.cfg_scale)
            per_run = max(per_run, secs)
            row = {"stage": stage, "target": target, "adaptation": name, "label": variant.label(),
                   "variant": variant.as_dict(), "source_calls": calls, "seconds": round(secs, 2)}
            row |= measure(imgs, labels, detectors, clf, alone[target])
            row["recovered"] = report.recovered(row, res["references"], target, name)
            res["runs"].append(row)
            if stage == "lambda" and variant.strength == 0.0:
                res["checks"]["lambda0_identical"][f"{target}/{name}"] = bool(torch.equal(imgs, alone[target]))
            if target == "self" and variant == Variant():
                diff = (imgs - alone[f"adapted:{name}"]).abs().max().item()
                res["checks"]["self_identity_max_abs"][name] = diff
            if (stage == "lambda" and variant.strength in (1.0, 2.0) and target != "self"
                    and variant.clamp == (target in cfg.clamp_targets)):
                st.images[f"ds:{target}:{name}:{variant.strength:g}"] = imgs[: cfg.grid_images]
            st.log(f"{stage:10s} {target:11s} {name:12s} {variant.label():28s} {_fmt(row)} calls={calls} "
                   f"{secs:.2f}s")
    st.checkpoint("grid")


def _fmt(m: dict) -> str:
    keys = ("red", "striped", "fidelity", "diversity", "change_rms", "recovered")
    return " ".join(f"{k}={m[k]:.3f}" for k in keys if isinstance(m.get(k), float))


def _probe_batch(model: models.DiffusionModel, device: torch.device, size: int) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 3, size, size, generator=g).to(device)
    t = torch.linspace(50, 950, 8).to(device)
    ctx = model.encode((torch.arange(8) % len(world.CLASSES)).to(device))
    return x, t, ctx


@torch.no_grad()
def _file_vs_training(model: models.DiffusionModel, adapter: adapters.Adapter, patch: DeltaPatch,
                      probe: tuple[Tensor, Tensor, Tensor]) -> float:
    """How closely the saved file, applied by lib_delta.lora, reproduces the adapter as trained (float32)."""
    x, t, ctx = probe
    base = model.net(x, t, context=ctx)
    adapter.attach()
    try:
        want = model.net(x, t, context=ctx)
    finally:
        adapter.detach()
    with patch, patch.rows([(slice(None), 0)]):
        got = model.net(x, t, context=ctx)
    return ((got - want).norm() / (want - base).norm().clamp_min(1e-12)).item()
