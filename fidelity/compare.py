"""Delta Sampling against the naive route, adaptive λ, and where transfer breaks; two training budgets.

    python -m fidelity.compare --part 1 --device cuda --results $OUT/budget1   # 1× training (≈ 9 minutes)
    python -m fidelity.compare --part 2 --device cuda --results $OUT/budget2   # 2×: part 1's models trained on
    python -m fidelity.compare --part 1 --toy --out fidelity/out/toy            # the pipeline at toy size, CPU

Part 1 trains every model, adapter and the classifier at the 1× budget and saves them under ``--out``/budget1;
part 2 loads the classifier, trains those models on for another 1× budget (from scratch, at 2×, where part 1's
files are missing) and retrains the adapters on the longer-trained source at 2×. The stages are split between the
parts (``STAGES``) so that each runs once inside one call: part 1 the latent-scale and steps gaps and the DiT's
uniform-t training, part 2 the colour gap (fine-tunes of the source, where the merged file is a user's route) and
the adaptive rules. Every configuration runs on each evaluation seed; stages run in priority order until
``--deadline`` and the rest is listed as skipped.
results.json, log.txt, the figures and ``compare.md`` (this part's tables, and both parts' where the other's
results.json is found under ``--results``/..) go to ``--results``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from devkit.sampling import get_sigmas_flow

from . import adaptive, compare_plots, compare_tables, config, gaps, metrics, models, naive, pipeline, world
from .config import ADAPTATIONS, SEEDS
from .evaluation import EvalSet
from .study import Variant, delta_sample, sample

EVAL_SEEDS = (41, 42)
LAMBDAS = {1: (0.5, 1.0, 1.5), 2: (1.0, 1.5)}  # the sweep; part 2 leaves out 0.5 (weak at 1× already)
LAMBDA_TAIL = {1: (2.0,), 2: ()}  # past the effect (recovered ≥ 1.1 at 1.5): last, the first thing a cut loses
NAIVE_WEIGHTS = {1: (0.5, 1.0, 1.5), 2: (1.0, 1.5)}  # the weights whose λ the part's sweep runs
TARGETS = ("same_family", "v_unet", "flow_dit")
TOY = {"lambdas": (1.0,), "naive_weights": (1.0,), "adaptive_targets": ("v_unet",)}  # the CPU smoke run's grid
CLAMP = {"flow_dit"}
# Each part's stages in priority order: a run cut at its deadline loses the last first. Every stage runs in one
# part at least; the references, the λ sweep and the merged file on the independent same-family target in both.
STAGES = {1: ("references", "lambda", "naive", "gap_scale", "gap_steps", "dit", "lambda_tail"),
          2: ("references", "lambda", "naive", "gap_colour", "adaptive", "dit_checks")}
DEADLINE_S = 540.0  # of the study's own clock; the call's 600 s also hold the imports, the figures and the page
# Wall seconds on one H100, from the two parts run on 2026-12-06 (docs/fidelity-runs/compare-budget{1,2}-h100.json,
# read by tests/test_fidelity_compare.py): one configuration at 80 images × 2 seeds × 20 steps (Delta Sampling
# 2.8 s on average: the target plus the source's base and adapted rows; an adaptive rule 3.3 s; the merged file,
# one model, 1.4 s), with about 0.1 s of measuring and logging and some headroom; scaled by images × seeds × steps
EST_CONFIG_S = {"delta": 3.2, "adaptive": 3.35, "naive": 1.6}
EST_REF_UNITS = 80 * 2 * 20
EST_FIXED_S = {"references": 10.0,  # six models alone and two adapted sources (10.0 and 9.5 s)
               "gap_steps": 9.5,  # three step counts: a reference and four short runs each (9.3 s)
               "dit_checks": 2.0}  # the DiT alone at 40 steps, CFG 5, shift 3 (1.7 s)
EST_MEASURES_S = {"trained": 16.0, "loaded": 3.0}  # detectors and the classifier (15.8 s), or detectors only
EST_OVERHEAD_S = {"model": 1.5, "adapter": 5.0, "finetune": 2.0, "load": 1.0}  # beyond each training budget:
# probes, the restyled data, the file written and read back, a gapped target's reference


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fidelity.compare", description=__doc__.split("\n")[0])
    p.add_argument("--part", type=int, choices=(1, 2), required=True)
    p.add_argument("--out", type=Path, default=Path("fidelity/out"))
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--toy", action="store_true", help="tiny models and a few steps: the CPU smoke run")
    p.add_argument("--deadline", type=float, default=None, help="seconds; later configurations are skipped past it")
    p.add_argument("--images", type=int, default=None, help="evaluation images per seed (default 80; toy 5)")
    p.add_argument("--seeds", default=",".join(map(str, EVAL_SEEDS)), help="evaluation noise seeds")
    return p.parse_args(argv)


def study_config(part: int, toy: bool, images: int | None, deadline: float | None) -> config.StudyConfig:
    cfg = config.toy() if toy else config.full(train_scale=1.0)
    cfg = replace(cfg, images=images or (6 if toy else 80), deadline_s=deadline or (1e9 if toy else DEADLINE_S))
    if part == 2:
        cfg = replace(cfg, adapter_train={k: _scaled(v, 2.0) for k, v in cfg.adapter_train.items()})
    return cfg


def _scaled(t: models.TrainConfig, k: float) -> models.TrainConfig:
    return replace(t, steps=int(t.steps * k), seconds=None if t.seconds is None else t.seconds * k)


class Runner:
    """Runs configurations in priority order while the deadline leaves room for one more of the slowest kind."""

    def __init__(self, st: pipeline.Study, ev: EvalSet):
        self.st, self.ev = st, ev
        self.slowest = 0.0
        st.res.setdefault("runs", [])
        st.res.setdefault("skipped", [])

    def room(self, seconds: float = 0.0) -> bool:
        return self.st.log.elapsed + max(1.5 * self.slowest, seconds) <= self.st.cfg.deadline_s

    def run(self, stage: str, meta: dict, sampler, target_ref: str, adaptation: str | None,
            image_key: str | None = None) -> dict | None:
        """One configuration on every seed; ``image_key`` keeps its first images for the sample figure."""
        if not self.room():
            self.st.res["skipped"].append({"stage": stage, **meta})
            return None
        t = time.perf_counter()
        row = self.ev.run(sampler, target_ref, adaptation)
        secs = _sync_elapsed(t)
        self.slowest = max(self.slowest, secs)
        row = {"stage": stage, **meta, "reference": target_ref, **row, "seconds": round(secs, 2)}
        self.st.res["runs"].append(row)
        if image_key is not None:  # the images just measured: no second sampling pass for the figure
            self.st.images[image_key] = self.ev.last_images[self.ev.seeds[0]][: self.st.cfg.grid_images]
        self.st.log(f"{stage:9s} {meta.get('target', ''):14s} {meta.get('adaptation', ''):12s} "
                    f"{meta.get('label', ''):24s} {_fmt(row)} {secs:.2f}s")
        return row

    def reference(self, key: str, sampler) -> dict:
        t = time.perf_counter()
        row = self.ev.reference(key, sampler)
        row["seconds"] = round(_sync_elapsed(t), 2)
        self.st.res["references"][key] = row
        self.st.log(f"{key}: {_fmt(row)}")
        return row


def _sync_elapsed(t: float) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _fmt(m: dict) -> str:
    keys = ("red", "striped", "fidelity", "diversity", "recovered", "fidelity_vs_adapted")
    spread = m.get("spread", {})
    return " ".join(f"{k}={m[k]:.3f}±{spread.get(k, 0) / 2:.3f}" for k in keys if isinstance(m.get(k), float))


# --- measures and models --------------------------------------------------------------------------------------------


def _measures(st: pipeline.Study, part: int) -> tuple[metrics.Detectors, torch.nn.Module]:
    """Part 1 calibrates the detectors and trains the classifier (saved under out/budget1); part 2 calibrates the
    detectors (1 s) and loads that classifier, so both budgets are judged by the same one."""
    cfg, res = st.cfg, st.res
    weights = st.out / "budget1" / "classifier.safetensors"
    if part == 1 or not weights.exists():
        detectors, clf = pipeline._measures(st)
        weights.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in clf.state_dict().items()}, str(weights))
        weights.with_suffix(".json").write_text(json.dumps(res["classifier"]))
        return detectors, clf
    detectors = metrics.calibrate(cfg.calibration_images, SEEDS["detector_calibration"], st.device, cfg.size)
    res["detectors"] = {"stripe_threshold": detectors.stripe_threshold, "accuracy": detectors.accuracy,
                        "red_min_fraction": metrics.RED_MIN_FRACTION}
    clf = metrics.ShapeClassifier(cfg.classifier_width).to(st.device)
    clf.load_state_dict(load_file(str(weights), device=str(st.device)))
    clf.eval().requires_grad_(False)
    res["classifier"] = json.loads(weights.with_suffix(".json").read_text()) | {"reused": True}
    st.log(f"detectors: {res['detectors']}; classifier loaded from part 1: {res['classifier']}")
    st.checkpoint("measures")
    return detectors, clf


def _models(st: pipeline.Study, part: int) -> dict[str, models.DiffusionModel]:
    """Part 1: train every model at 1× (pipeline's own training, saved to out/budget1). Part 2: load those and
    train them on for another 1× budget, saved to out/budget2."""
    root = st.out
    st.out = root / "budget1"
    st.out.mkdir(parents=True, exist_ok=True)
    st.cfg = replace(st.cfg, reuse_models=part == 2)
    missing = [n for n in models.specs(st.cfg.toy) if not (st.out / f"{n}.safetensors").exists()]
    if part == 2 and missing:
        st.res["warning"] = (f"part 1's models {', '.join(missing)} were not found under {st.out}: trained here from "
                             "scratch at 1× first, which leaves less time for the grid")
        st.log("WARNING: " + st.res["warning"])
    zoo = pipeline._train_models(st)
    if part == 1:
        return zoo
    first = st.res["training"]
    st.res["training"] = {}
    st.out = root / "budget2"
    st.out.mkdir(parents=True, exist_ok=True)
    for name, model in zoo.items():
        if name == "self":
            continue
        rep = models.train_model(model, st.cfg.model_train[name], st.cfg.size, probe_images=16 if st.cfg.toy else 256,
                                 round_=1)
        rep["first_round"] = {k: first[name].get(k) for k in ("steps", "seconds", "reused", "last_loss")}
        st.res["training"][name] = rep
        pipeline.save_model(model, st.out / f"{name}.safetensors")
        st.log(f"trained {name} on: {rep['steps']} more steps in {rep['seconds']}s "
               f"(first round {rep['first_round']['steps']} steps), loss -> {rep['last_loss']:.4f}")
        st.checkpoint(f"train_{name}")
    return zoo


# --- stages ---------------------------------------------------------------------------------------------------------


def references(r: Runner, zoo: dict, patches: dict) -> None:
    cfg = r.st.cfg
    for name in ("source", *TARGETS):
        r.reference(f"alone:{name}", lambda lab, noi, m=zoo[name]: sample(m, lab, noi, cfg.steps, cfg.cfg_scale))
    for ad, patch in patches.items():
        r.reference(f"adapted:{ad}", lambda lab, noi, p=patch: sample(zoo["source"], lab, noi, cfg.steps,
                                                                       cfg.cfg_scale, adapted=p))
    r.ev.refs["alone:self"] = r.st.res["references"]["alone:self"] = r.ev.refs["alone:source"]
    r.ev.ref_images["alone:self"] = r.ev.ref_images["alone:source"]
    for key in ("alone:source", *(f"alone:{t}" for t in TARGETS), *(f"adapted:{a}" for a in patches)):
        r.st.images[key] = r.ev.first_images(key, cfg.grid_images)


def _ds(target, source, patch, ad, variant, steps, cfg_scale, decode=None):
    def run(labels, noise):
        imgs, _ = delta_sample(target, source, patch, ad, variant, labels, noise, steps, cfg_scale)
        return imgs if decode is None else decode(imgs)
    return run


def lambda_stage(r: Runner, zoo: dict, patches: dict, lambdas: tuple[float, ...], control: bool = True) -> None:
    """Delta Sampling at each λ on every target; ``control`` first runs the source as its own target at λ = 1."""
    cfg = r.st.cfg
    if control:
        for ad, patch in patches.items():
            r.run("lambda", {"target": "self", "adaptation": ad, "method": "delta", "strength": 1.0, "label": "λ=1"},
                  _ds(zoo["source"], zoo["source"], patch, ad, Variant(), cfg.steps, cfg.cfg_scale), "alone:self", ad)
    for lam in lambdas:
        for target in TARGETS:
            for ad, patch in patches.items():
                v = Variant(strength=lam, clamp=target in CLAMP)
                r.run("lambda", {"target": target, "adaptation": ad, "method": "delta", "strength": lam,
                                 "label": f"λ={lam:g}"},
                      _ds(zoo[target], zoo["source"], patch, ad, v, cfg.steps, cfg.cfg_scale), f"alone:{target}", ad,
                      image_key=f"ds:{target}:{ad}:{lam:g}" if lam in (1.0, 2.0) else None)


def naive_stage(r: Runner, zoo: dict, paths: dict, weights: tuple[float, ...], targets: tuple[str, ...],
                gap: dict | None = None) -> None:
    """The adapter files merged into each target at each weight where they load; where not, the reason."""
    cfg = r.st.cfg
    na = r.st.res.setdefault("naive_unavailable", {})
    for target in targets:
        for ad, path in paths.items():
            for w in weights:
                patch = naive.naive_patch(zoo[target], path, w)
                if isinstance(patch, str):
                    na[f"{target}/{ad}"] = patch
                    break
                meta = {"target": target, "adaptation": ad, "method": "naive", "strength": w, "label": f"merged ×{w:g}"}
                if gap is not None:
                    meta["gap"] = gap
                r.run("naive" if gap is None else f"gap_{gap['axis']}", meta,
                      lambda lab, noi, m=zoo[target], p=patch: naive.naive_sample(m, p, lab, noi, cfg.steps,
                                                                                   cfg.cfg_scale),
                      f"alone:{target}", ad, image_key=f"naive:{target}:{ad}:1" if w == 1.0 else None)


def adaptive_stage(r: Runner, zoo: dict, patches: dict) -> None:
    cfg = r.st.cfg
    for rule in adaptive.RULES:
        for target in TOY["adaptive_targets"] if cfg.toy else TARGETS:
            for ad, patch in patches.items():
                gains: list[dict] = []

                def run(labels, noise, target=target, ad=ad, patch=patch, rule=rule, gains=gains):
                    imgs, g = adaptive.adaptive_sample(zoo[target], zoo["source"], patch, ad, rule, 1.0,
                                                       target in CLAMP, labels, noise, cfg.steps, cfg.cfg_scale)
                    gains.append(g)
                    return imgs

                row = r.run("adaptive", {"target": target, "adaptation": ad, "method": "adaptive", "rule": rule,
                                         "strength": 1.0, "label": f"adaptive {rule}"}, run, f"alone:{target}", ad)
                if row is not None:
                    row["gains"] = gains


def steps_stage(r: Runner, zoo: dict, patches: dict, target: str = "v_unet") -> None:
    """Fewer sampling steps on one target: Delta Sampling at λ = 1 and base-first over the first half."""
    cfg = r.st.cfg
    levels = (max(cfg.steps // 2, 2),) if cfg.toy else gaps.STEP_LEVELS
    for n in levels:
        if not r.room():
            r.st.res["skipped"].append({"stage": "gap_steps", "level": n})
            continue
        ref = f"alone:{target}@{n}"
        r.reference(ref, lambda lab, noi, n=n: sample(zoo[target], lab, noi, n, cfg.cfg_scale))
        for ad, patch in patches.items():
            for variant, method in ((Variant(), "delta"), (Variant(mode="base-first", end=0.5), "base-first")):
                r.run("gap_steps", {"target": target, "adaptation": ad, "method": method, "strength": 1.0,
                                    "label": variant.label(), "gap": {"axis": "steps", "level": n}},
                      _ds(zoo[target], zoo["source"], patch, ad, variant, n, cfg.cfg_scale), ref, ad)


def _finetune(cfg: config.StudyConfig) -> models.TrainConfig:
    """The gapped targets' fine-tune of the source."""
    return gaps.finetune_config(cfg.model_train["source"], seconds=None if cfg.toy else gaps.FINETUNE_S,
                                steps=2 if cfg.toy else 600)


def colour_stage(r: Runner, zoo: dict, patches: dict, paths: dict, n_seeds: int) -> None:
    """The source fine-tuned on a colder world, k = 0.33, 0.67, 1: Delta Sampling at λ = 1 and the file merged
    at ×1 on each. k = 0 is the source itself: Delta Sampling there is the sweep's control row, and the merged
    file (the adapted source) runs here."""
    cfg = r.st.cfg
    naive_stage(r, zoo, paths, (1.0,), targets=("self",), gap={"axis": "colour", "level": 0.0})
    level_s = stage_estimate(cfg, "gap_colour", n_seeds, per_level=True)
    for i, k in enumerate((gaps.COLOUR_LEVELS[-1],) if cfg.toy else gaps.COLOUR_LEVELS):
        if not r.room(level_s):
            r.st.res["skipped"].append({"stage": "gap_colour", "level": k})
            continue
        name = f"colour_{k:g}"
        zoo[name] = gaps.colour_target(zoo["source"], k, _finetune(cfg), cfg.size, i, 16 if cfg.toy else 256)
        r.st.res.setdefault("gap_training", {})[name] = zoo[name].train_report
        r.reference(f"alone:{name}", lambda lab, noi, m=zoo[name]: sample(m, lab, noi, cfg.steps, cfg.cfg_scale))
        for ad, patch in patches.items():
            r.run("gap_colour", {"target": name, "adaptation": ad, "method": "delta", "strength": 1.0, "label": "λ=1",
                                 "gap": {"axis": "colour", "level": k}},
                  _ds(zoo[name], zoo["source"], patch, ad, Variant(), cfg.steps, cfg.cfg_scale), f"alone:{name}", ad,
                  image_key=f"ds:{name}:{ad}:1")
        naive_stage(r, zoo, paths, (1.0,), targets=(name,), gap={"axis": "colour", "level": k})


def scale_stage(r: Runner, zoo: dict, patches: dict, n_seeds: int) -> None:
    """The source fine-tuned at latent scale s = 0.6, 0.35; Delta Sampling at λ = 1 with the scale declared to
    the bridge and undeclared."""
    cfg = r.st.cfg
    level_s = stage_estimate(cfg, "gap_scale", n_seeds, per_level=True)
    for i, s in enumerate((gaps.SCALE_LEVELS[-1],) if cfg.toy else gaps.SCALE_LEVELS):
        if not r.room(level_s):
            r.st.res["skipped"].append({"stage": "gap_scale", "level": s})
            continue
        name = f"scale_{s:g}"
        model = gaps.scale_target(zoo["source"], s, _finetune(cfg), cfg.size, i, 16 if cfg.toy else 256)
        r.st.res.setdefault("gap_training", {})[name] = model.train_report
        r.reference(f"alone:{name}",
                    lambda lab, noi, m=model: m.decode(sample(m, lab, noi, cfg.steps, cfg.cfg_scale)))
        for ad, patch in patches.items():
            for declared in (True, False):
                r.run("gap_scale", {"target": name, "adaptation": ad, "method": "delta", "strength": 1.0,
                                    "label": "λ=1 " + ("declared" if declared else "undeclared"),
                                    "declared": declared, "gap": {"axis": "scale", "level": s}},
                      _ds(model.declared_as(declared), zoo["source"], patch, ad, Variant(), cfg.steps, cfg.cfg_scale,
                          decode=model.decode), f"alone:{name}", ad)


def dit_stage(r: Runner, zoo: dict, uniform_t: bool) -> None:
    """What limits the flow DiT's class fidelity: more sampling steps, a higher CFG scale, and (``uniform_t``) the
    same DiT trained with uniform t instead of logit-normal t, from its own initialisation and on the same budget."""
    st, cfg = r.st, r.st.cfg
    dit = zoo["flow_dit"]
    out: dict = st.res.setdefault("dit", {})
    out["per_class"] = {"as trained": _per_class(r, "alone:flow_dit")}
    shifted = ShiftedFlow(dit.spec, dit.encoder, dit.net, dit.denoiser, shift=3.0)
    for label, model, steps, scale in (("40 steps", dit, cfg.steps * 2, cfg.cfg_scale),
                                       ("CFG 5", dit, cfg.steps, 5.0), ("shift 3", shifted, cfg.steps, cfg.cfg_scale)):
        if r.room():
            out[label] = _strip(r.reference(f"alone:flow_dit {label}",
                                            lambda lab, noi, m=model, s=steps, c=scale: sample(m, lab, noi, s, c)))
            out["per_class"][label] = _per_class(r, f"alone:flow_dit {label}")
    if not uniform_t:
        return
    train = replace(cfg.model_train["flow_dit"], flow_t="uniform")
    if not r.room((train.seconds or 0) + 10):
        st.res["skipped"].append({"stage": "dit", "what": "uniform-t DiT"})
        return
    model = models.build(models.specs(cfg.toy)["flow_dit"], st.device)
    rep = models.train_model(model, train, cfg.size, probe_images=16 if cfg.toy else 256)
    pipeline.save_model(model, st.out / "flow_dit_uniform_t.safetensors")
    out["uniform_t_training"] = {k: rep[k] for k in ("steps", "seconds", "last_loss", "x0_mse_by_sigma")}
    out["uniform t"] = _strip(r.reference("alone:flow_dit uniform t",
                                          lambda lab, noi: sample(model, lab, noi, cfg.steps, cfg.cfg_scale)))
    out["per_class"]["uniform t"] = _per_class(r, "alone:flow_dit uniform t")


class ShiftedFlow(models.DiffusionModel):
    """A flow model sampled on SD3's shifted schedule, which spends more of its steps at high noise."""

    def __init__(self, *args, shift: float = 3.0):
        super().__init__(*args)
        self.shift = shift

    def sigmas(self, steps: int) -> torch.Tensor:
        return get_sigmas_flow(steps, self.shift)


def _per_class(r: Runner, key: str) -> dict[str, float]:
    """Class fidelity of a reference per class, over every seed: which shapes a model misdraws."""
    imgs = torch.cat([r.ev.ref_images[key][s] for s in r.ev.seeds])
    labels = r.ev.labels.repeat(len(r.ev.seeds))
    hit = metrics.classify(r.ev.classifier, imgs) == labels
    return {c: hit[labels == i].float().mean().item() for i, c in enumerate(world.CLASSES)}


def _strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "seeds"}


# --- the plan -------------------------------------------------------------------------------------------------------


def est_config_s(cfg: config.StudyConfig, method: str, n_seeds: int, steps: int | None = None) -> float:
    """One configuration's estimated wall seconds: the measured cost scaled by images × seeds × steps."""
    return EST_CONFIG_S[method] * cfg.images * n_seeds * (steps or cfg.steps) / EST_REF_UNITS


def stage_estimate(cfg: config.StudyConfig, stage: str, n_seeds: int, part: int = 1, per_level: bool = False) -> float:
    """A stage's estimated wall seconds (``per_level``: one level of a gap axis: the fine-tune and its runs)."""
    n_ad = len(ADAPTATIONS)

    def c(method: str) -> float:
        return est_config_s(cfg, method, n_seeds)

    scale = cfg.images * n_seeds / (80 * 2)
    finetune = gaps.FINETUNE_S + EST_OVERHEAD_S["finetune"]
    if stage == "references":
        return EST_FIXED_S["references"] * scale
    if stage == "lambda":
        return n_ad * (1 + len(LAMBDAS[part]) * len(TARGETS)) * c("delta")
    if stage == "lambda_tail":
        return n_ad * len(LAMBDA_TAIL[part]) * len(TARGETS) * c("delta")
    if stage == "naive":  # the merged file loads on the same-family target only
        return n_ad * len(NAIVE_WEIGHTS[part]) * c("naive")
    if stage == "adaptive":
        return len(adaptive.RULES) * len(TARGETS) * n_ad * c("adaptive")
    if stage == "gap_colour":
        level = finetune + n_ad * (c("delta") + c("naive"))
        return level if per_level else n_ad * c("naive") + len(gaps.COLOUR_LEVELS) * level
    if stage == "gap_scale":
        level = finetune + 2 * n_ad * c("delta")
        return level if per_level else len(gaps.SCALE_LEVELS) * level
    if stage == "gap_steps":
        return EST_FIXED_S["gap_steps"] * scale
    if stage == "dit_checks":
        return EST_FIXED_S["dit_checks"] * scale
    if stage == "dit":  # the checks, then a DiT trained with uniform t on the DiT's own budget
        return EST_FIXED_S["dit_checks"] * scale + (cfg.model_train["flow_dit"].seconds or 0) + 3.0
    raise ValueError(f"no estimate for stage {stage!r}")


def plan(cfg: config.StudyConfig, part: int, n_seeds: int, classifier_saved: bool = True) -> dict:
    """Each stage's estimated wall seconds and the part's estimated end on the study's clock: the measures, the
    training budgets plus their measured overheads, then ``STAGES[part]`` in order."""
    measures = EST_MEASURES_S["loaded" if part == 2 and classifier_saved else "trained"]
    train = {"models": sum((t.seconds or 0) + EST_OVERHEAD_S["model"] for t in cfg.model_train.values())
             + (EST_OVERHEAD_S["load"] if part == 2 else 0.0),
             "adapters": sum((t.seconds or 0) + EST_OVERHEAD_S["adapter"] for t in cfg.adapter_train.values())}
    stages = {name: round(stage_estimate(cfg, name, n_seeds, part), 1) for name in STAGES[part]}
    end, ends = measures + sum(train.values()), {}
    for name, secs in stages.items():
        end += secs
        ends[name] = round(end, 1)
    return {"measures_s": measures, "train_s": {k: round(v, 1) for k, v in train.items()}, "stages_s": stages,
            "ends_at_s": ends, "total_s": round(end, 1)}


# --- the run --------------------------------------------------------------------------------------------------------


def run_part(part: int, cfg: config.StudyConfig, device: torch.device, out: Path, results: Path,
             seeds: tuple[int, ...]) -> tuple[dict, dict]:
    out.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    st = pipeline.Study(cfg, device, out, results)
    n = len(seeds)
    st.res.update(part=part, budget=f"{part}×", eval={"seeds": list(seeds), "images_per_seed": cfg.images},
                  plan=plan(cfg, part, n, (out / "budget1" / "classifier.safetensors").exists()), references={})
    st.log(f"part {part} ({part}× training); plan {st.res['plan']}")
    detectors, clf = _measures(st, part)
    zoo = _models(st, part)
    patches = pipeline._train_adapters(st, zoo["source"])
    paths = {name: st.out / f"{name}.safetensors" for name in ADAPTATIONS}
    ev = EvalSet(seeds, cfg.images, cfg.size, device, detectors, clf)
    r = Runner(st, ev)
    toy = cfg.toy
    run = {
        "references": lambda: references(r, zoo, patches),
        "lambda": lambda: lambda_stage(r, zoo, patches, TOY["lambdas"] if toy else LAMBDAS[part]),
        "lambda_tail": lambda: lambda_stage(r, zoo, patches, () if toy else LAMBDA_TAIL[part], control=False),
        "naive": lambda: naive_stage(r, zoo, paths, TOY["naive_weights"] if toy else NAIVE_WEIGHTS[part], TARGETS),
        "adaptive": lambda: adaptive_stage(r, zoo, patches),
        "gap_colour": lambda: colour_stage(r, zoo, patches, paths, n),
        "gap_scale": lambda: scale_stage(r, zoo, patches, n),
        "gap_steps": lambda: steps_stage(r, zoo, patches),
        "dit": lambda: dit_stage(r, zoo, uniform_t=True),
        "dit_checks": lambda: dit_stage(r, zoo, uniform_t=False),
    }
    for name in STAGES[part]:
        run[name]()
        st.checkpoint(name)
    st.res["summary"] = compare_tables.summarise(st.res)
    st.checkpoint("summary")
    return st.res, st.images


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    cfg = study_config(args.part, args.toy, args.images, args.deadline)
    results = args.results or args.out / f"compare{args.part}"
    seeds = tuple(int(s) for s in args.seeds.split(","))
    t0 = time.perf_counter()
    st_res, images = run_part(args.part, cfg, torch.device(args.device), args.out, results, seeds)
    st_res["timings"]["total"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(st_res, indent=1, default=float)
    (results / "results.json").write_text(text)
    (args.out / f"results_part{args.part}.json").write_text(text)  # for the other part's compare.md
    written = compare_plots.make_all(st_res, images, results)
    page = compare_tables.write_markdown(results, also=args.out)
    print(f"wrote {results / 'results.json'}, {page} and {len(written)} figures in {st_res['timings']['total']}s "
          f"({round(time.perf_counter() - t0, 1)}s with the figures and the page)")
    return st_res


if __name__ == "__main__":
    main()
