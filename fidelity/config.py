"""The study's sizes, step counts and seeds: ``full`` for the GPU run, ``toy`` for the CPU smoke test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from .models import TrainConfig

ADAPTATIONS = {  # name -> (adapter kind, world style it is fine-tuned on, rank, alpha)
    "red_lora": ("lora", "red", 8, 8.0),
    "striped_loha": ("loha", "striped", 8, 2.0),
}
# The ε UNets' loss weighting (models.WEIGHTINGS): "none" is the plain ε MSE, which weighs an x0 error by 1/σ²;
# "x0" weighs it as the v objective does, "min_snr" by min(1/σ², 5). Selectable with ``--eps-weighting``.
EPS_WEIGHTING = "none"
ATTRIBUTE = {"red_lora": "red", "striped_loha": "striped"}

SEEDS = {
    "detector_calibration": 12,
    "classifier": 11,
    "adapter_data": {"red_lora": 31, "striped_loha": 32},
    "adapter_init": {"red_lora": 21, "striped_loha": 22},
    "eval_noise": 41,
    "models": "per model in fidelity.models.specs (source 1000, same_family 2000, v_unet 3000, flow_dit 4000)",
}


@dataclass(frozen=True)
class StudyConfig:
    toy: bool
    images: int  # evaluation images per configuration (classes in turn; the same noise for every model)
    steps: int  # Euler steps
    cfg_scale: float
    model_train: dict[str, TrainConfig]
    adapter_train: dict[str, TrainConfig]
    adapter_images: int  # size of the restyled fine-tuning set
    classifier_steps: int
    classifier_batch: int
    calibration_images: int
    lambdas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0)
    self_lambdas: tuple[float, ...] = (0.0, 1.0, 2.0)  # the control: the source base as its own target
    sweep_strengths: tuple[float, ...] = (1.0, 2.0)  # λ at which schedules / cond / separate are compared
    base_first_ends: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)
    stages: tuple[str, ...] = ("lambda", "cfg_mode", "trajectory", "base_first", "schedule", "window")
    deadline_s: float = 500.0  # wall-clock budget for the whole run; later stages are skipped past it
    grid_images: int = 10
    size: int = 32  # image side in pixels
    classifier_width: int = 32
    targets: tuple[str, ...] = ("self", "same_family", "v_unet", "flow_dit")
    sweep_targets: tuple[str, ...] = ("same_family", "v_unet", "flow_dit")  # targets of the non-λ stages
    clamp_targets: tuple[str, ...] = ("flow_dit",)  # targets whose schedule reaches above the source's σ_max
    reuse_models: bool = False  # load a model trained by an earlier run into the same --out instead of training it
    models_only: tuple[str, ...] = ()  # train (or reuse) just these models, save them and stop
    eps_channels: int | None = None  # the ε UNets' base width, if not models.specs' own (``--eps-channels``)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["model_train"] = {k: asdict(v) for k, v in self.model_train.items()}
        d["adapter_train"] = {k: asdict(v) for k, v in self.adapter_train.items()}
        return d


def full(train_scale: float = 1.0, deadline_s: float = 470.0, batch_scale: float = 1.0,
         eps_weighting: str = EPS_WEIGHTING) -> StudyConfig:
    """The GPU run. Training is budgeted in seconds (step counts are cut to what fits; the counts reached are
    reported) so that the whole study fits about eight minutes of one GPU; ``train_scale`` scales both,
    ``batch_scale`` the training batches (small models' steps look bound by kernel launches, so a larger batch
    should cost little time); ``eps_weighting`` is the ε UNets' loss weighting."""

    def budget(steps: int, seconds: float, batch: int, **kw) -> TrainConfig:
        return TrainConfig(steps=max(int(steps * train_scale), 20), seconds=seconds * train_scale,
                           batch=max(int(batch * batch_scale), 1), **kw)

    return StudyConfig(
        toy=False,
        images=160,
        steps=20,
        cfg_scale=3.0,
        model_train={
            "source": budget(4000, 60, batch=256, lr=1e-3, warmup=100, weighting=eps_weighting),
            "same_family": budget(4000, 55, batch=256, lr=1e-3, warmup=100, weighting=eps_weighting),
            "v_unet": budget(4000, 55, batch=256, lr=1e-3, warmup=100),
            "flow_dit": budget(4000, 55, batch=256, lr=5e-4, warmup=100),
        },
        adapter_train={
            "red_lora": budget(600, 20, batch=128, lr=1e-3, warmup=20, ema=0.98),
            "striped_loha": budget(600, 20, batch=128, lr=1e-3, warmup=20, ema=0.98),
        },
        adapter_images=2000,
        classifier_steps=max(int(400 * train_scale), 20),
        classifier_batch=512,
        calibration_images=3000,
        deadline_s=deadline_s,
    )


def toy(eps_weighting: str = EPS_WEIGHTING) -> StudyConfig:
    model = TrainConfig(steps=6, batch=8, lr=2e-3, warmup=2, ema=0.0)
    eps_model = replace(model, weighting=eps_weighting)
    adapter = TrainConfig(steps=4, batch=8, lr=5e-3, warmup=2, ema=0.0)
    return StudyConfig(
        toy=True,
        images=6,  # class 0 twice, so diversity has a pair to measure
        steps=3,
        cfg_scale=3.0,
        model_train={"source": eps_model, "same_family": eps_model, "v_unet": model, "flow_dit": model},
        adapter_train=dict.fromkeys(ADAPTATIONS, adapter),
        adapter_images=16,
        classifier_steps=5,
        classifier_batch=32,
        calibration_images=100,
        lambdas=(0.0, 1.0),
        self_lambdas=(0.0, 1.0),
        sweep_strengths=(1.0,),
        base_first_ends=(0.5,),
        stages=("lambda", "cfg_mode", "trajectory", "base_first"),
        deadline_s=1e9,
        grid_images=5,
        size=16,
        classifier_width=8,
        sweep_targets=("flow_dit",),
    )


def with_overrides(cfg: StudyConfig, **kwargs) -> StudyConfig:
    return replace(cfg, **{k: v for k, v in kwargs.items() if v is not None})
