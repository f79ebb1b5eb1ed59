"""The study's diffusion models: a class embedding for the "prompt" and a devkit UNet or DiT in pixel space.

Each model is a (class encoder, network, devkit denoiser) triple; the denoiser returns x0 in the model's own noise
convention (VE for eps/v UNets, flow for the DiT), which is what a host hands to ``lib_delta``. The class encoder
plays the text encoder: class ``c`` (or the null class ``len(CLASSES)`` for the unconditional rows) becomes a few
context tokens for the network's cross-attention.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import Tensor, nn

from devkit import sampling
from devkit.denoisers import make_denoiser
from devkit.dit import DiT, DiTConfig
from devkit.families import fill_zero_tensors
from devkit.ldm_unet import UNetConfig, UNetModel
from lib_delta.spaces import LatentFormat, ModelSpace

from . import world

PIXELS = LatentFormat("pixels", 3, 1.0)
NULL_CLASS = len(world.CLASSES)


class ClassEncoder(nn.Module):
    """Class index -> ``tokens`` context vectors of ``dim``; index ``NULL_CLASS`` is the CFG "empty prompt"."""

    def __init__(self, dim: int, tokens: int = 4):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.embedding = nn.Embedding(len(world.CLASSES) + 1, tokens * dim)
        nn.init.normal_(self.embedding.weight, std=1.0)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding(labels).view(-1, self.tokens, self.dim)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the study: architecture, parameterisation and seed."""

    name: str
    prediction: str  # "eps", "v" or "flow"
    seed: int
    unet: UNetConfig | None = None
    dit: DiTConfig | None = None
    description: str = ""

    @property
    def context_dim(self) -> int:
        return self.unet.context_dim if self.unet is not None else self.dit.context_dim


@dataclass
class DiffusionModel:
    spec: ModelSpec
    encoder: ClassEncoder
    net: nn.Module
    denoiser: nn.Module
    train_report: dict = field(default_factory=dict)

    @property
    def space(self) -> ModelSpace:
        return ModelSpace(PIXELS, "flow" if self.spec.prediction == "flow" else "ve")

    @property
    def is_flow(self) -> bool:
        return self.spec.prediction == "flow"

    def sigmas(self, steps: int) -> Tensor:
        if self.is_flow:
            return sampling.get_sigmas_flow(steps)
        return self.denoiser.get_sigmas(steps).cpu()

    @torch.no_grad()
    def encode(self, labels: Tensor) -> Tensor:
        return self.encoder(labels)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.net.parameters()]

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def to(self, device: torch.device | str) -> DiffusionModel:
        for m in (self.encoder, self.net, self.denoiser):
            m.to(device)
        return self


def build(spec: ModelSpec, device: torch.device | str = "cpu") -> DiffusionModel:
    """Construct under a private RNG; the zero-initialised output layers get small noise so training starts
    from a model that responds to its context (the devkit's own fill, at a tenth of its scale)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        net = UNetModel(spec.unet) if spec.unet is not None else DiT(spec.dit)
        encoder = ClassEncoder(spec.context_dim)
    fill_zero_tensors(net, torch.Generator().manual_seed(spec.seed + 7919), scale=0.1)
    denoiser = make_denoiser(net, spec.prediction)
    model = DiffusionModel(spec, encoder, net, denoiser).to(device)
    if torch.device(device).type == "cuda" and spec.unet is not None:
        net.to(memory_format=torch.channels_last)  # cuDNN's bf16 convolutions are fastest in NHWC
    return model


# --- training ---------------------------------------------------------------------------------------------------


WEIGHTINGS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "none": lambda sigma, c_out: torch.ones_like(sigma),
    # the x0-error weighting of the v objective: ‖x̂0 − x0‖²·(σ² + 1)/σ² whatever the network predicts (an ε error
    # is an x0 error divided by σ, so the ε MSE alone weighs it by 1/σ², almost nothing at high noise)
    "x0": lambda sigma, c_out: (sigma**2 + 1) / sigma**2 * c_out**2,
    # min-SNR-5 (Hang et al., 2023): the x0 error weighted by min(SNR, 5), SNR = 1/σ²; for ε, min(1, 5σ²)
    "min_snr": lambda sigma, c_out: (1 / sigma**2).clamp(max=5.0) * c_out**2,
}


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 100
    ema: float = 0.999
    cfg_dropout: float = 0.1
    seconds: float | None = None  # a time budget: the step count is cut to what fits, measured after warm-up
    weighting: str = "none"  # per-sample loss weighting of the VE objectives (see WEIGHTINGS)
    flow_t: str = "logit_normal"  # a flow model's training t: "logit_normal" (SD3's) or "uniform" (see FLOW_T)


FLOW_T: dict[str, Callable[[int, torch.Generator, torch.device], Tensor]] = {
    "logit_normal": lambda n, g, dev: torch.sigmoid(torch.randn(n, generator=g, device=dev)),
    # every noise level equally often: logit-normal t rarely reaches t > 0.9, where a sample's shape is decided
    "uniform": lambda n, g, dev: torch.rand(n, generator=g, device=dev),
}


def diffusion_loss(model: DiffusionModel, x0: Tensor, labels: Tensor, g: torch.Generator,
                   weighting: str = "none", flow_t: str = "logit_normal") -> Tensor:
    """The model's native objective: ε for eps, v for v-prediction (both on the discrete VE schedule), and the
    velocity ``noise − x0`` at logit-normal t for flow. ``weighting`` reweights the VE objectives per sample:
    "none" (the plain MSE), "x0" or "min_snr" (see WEIGHTINGS)."""
    n = x0.shape[0]
    noise = torch.randn(x0.shape, generator=g, device=x0.device)
    context = model.encoder(labels)
    if model.is_flow:
        t = FLOW_T[flow_t](n, g, x0.device)
        x = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
        out = model.net(x, t * 1000.0, context=context)
        return (out.float() - (noise - x0)).pow(2).mean()
    den = model.denoiser
    idx = torch.randint(0, len(den.sigmas), (n,), generator=g, device=x0.device)
    sigma = den.sigmas[idx]
    x = x0 + sigma[:, None, None, None] * noise
    c_skip, c_out, c_in = (s[:, None, None, None] for s in den.get_scalings(sigma))
    out = model.net(x * c_in, idx.float(), context=context)
    target = (x0 - c_skip * x) / c_out  # ε for eps, v for v-prediction
    per_sample = (out.float() - target).pow(2).mean(dim=(1, 2, 3))
    return (per_sample * WEIGHTINGS[weighting](sigma, c_out)).mean()


def train(
    model: DiffusionModel,
    params: list[nn.Parameter],
    data: Callable[[int, torch.Generator], tuple[Tensor, Tensor]],
    cfg: TrainConfig,
    seed: int,
    extra_loss: Callable[[], Tensor] | None = None,
    ema_params: list[nn.Parameter] | None = None,
) -> dict:
    """Train ``params`` on batches from ``data(n, g)``; AdamW, warmup then cosine, bf16 autocast on CUDA.

    With ``ema_params`` (default: ``params``) an exponential moving average is kept and copied in at the end.
    Returns a report: steps done, seconds, loss at the start and the end.
    """
    device = params[0].device
    g = world.generator(seed, device)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    ema_src = params if ema_params is None else ema_params
    ema = [p.detach().clone() for p in ema_src] if cfg.ema else None

    total = cfg.steps

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        u = (step - cfg.warmup) / max(total - cfg.warmup, 1)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(u, 1.0))))

    losses: list[Tensor] = []
    start = time.perf_counter()
    marks: dict[int, float] = {}
    step = 0
    while step < total:
        if cfg.seconds is not None and step in (_TIMING_FROM, _TIMING_TO):
            marks[step] = _now(device)
            if step == _TIMING_TO:
                per_step = (marks[_TIMING_TO] - marks[_TIMING_FROM]) / (_TIMING_TO - _TIMING_FROM)
                left = cfg.seconds - (marks[_TIMING_TO] - start)
                total = max(min(cfg.steps, _TIMING_TO + int(left / per_step)), _TIMING_TO + 1)
        x0, labels = data(cfg.batch, g)
        drop = torch.rand(labels.shape, generator=g, device=labels.device) < cfg.cfg_dropout
        labels = torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with _autocast(device):
            loss = diffusion_loss(model, x0, labels, g, cfg.weighting, cfg.flow_t)
            if extra_loss is not None:
                loss = loss + extra_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            decay = min(cfg.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in ema_src], 1 - decay)
        losses.append(loss.detach())
        step += 1
    if ema is not None:
        with torch.no_grad():
            for p, e in zip(ema_src, ema, strict=True):
                p.copy_(e)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    values = torch.stack(losses).float().cpu().tolist() if losses else []
    head, tail = values[: max(len(values) // 20, 1)], values[-max(len(values) // 20, 1):]
    return {
        "steps": len(values), "planned_steps": cfg.steps, "seconds": round(seconds, 2), "batch": cfg.batch,
        "lr": cfg.lr, "weighting": cfg.weighting, "flow_t": cfg.flow_t,
        "first_loss": sum(head) / max(len(head), 1), "last_loss": sum(tail) / max(len(tail), 1),
        "cut_by_time_budget": len(values) < cfg.steps, "loss_curve": _downsample(values, 40),
    }


_TIMING_FROM, _TIMING_TO = 5, 15  # steps between which a time budget measures the step time (after warm-up)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def fixed_batch_loss(model: DiffusionModel, x0: Tensor, labels: Tensor, seed: int, weighting: str = "none") -> float:
    """The training objective on a fixed batch with fixed noise: comparable before and after training."""
    with torch.no_grad(), _autocast(x0.device):
        return diffusion_loss(model, x0, labels, world.generator(seed, x0.device), weighting).item()


PROBE_SIGMAS = (14.6, 5.0, 2.0, 1.0, 0.3)  # VE noise levels (σ_max of the SD schedule first); a flow model at equal SNR


@torch.no_grad()
def x0_error_by_sigma(model: DiffusionModel, x0: Tensor, labels: Tensor, seed: int) -> dict[str, float]:
    """The denoiser's x0 mean squared error at a few noise levels, conditional, on a fixed batch and noise: where
    in the schedule a model's x0 estimate (the thing a sampler follows) is poor. A flow model is probed at the same
    signal-to-noise ratio, t = σ/(1 + σ)."""
    noise = torch.randn(x0.shape, generator=world.generator(seed, x0.device), device=x0.device)
    context = model.encoder(labels)
    out = {}
    for s in PROBE_SIGMAS:
        if model.is_flow:
            t = s / (1 + s)
            x, level = (1 - t) * x0 + t * noise, t
        else:
            x, level = x0 + s * noise, s
        with _autocast(x0.device):
            pred = model.denoiser(x, torch.full((x0.shape[0],), level, device=x0.device), context)
        out[f"{s:g}"] = round((pred.float() - x0).pow(2).mean().item(), 5)
    return out


def train_model(model: DiffusionModel, cfg: TrainConfig, size: int = world.SIZE, style: str = "plain",
                probe_images: int = 256, transform: Callable[[Tensor], Tensor] | None = None,
                round_: int = 0) -> dict:
    """Train a model (from scratch, or on from where it is) on fresh draws of the world, never the same batch
    twice; ``transform`` maps every image batch first (a shifted world, another latent scale); ``round_`` > 0
    draws other batches than an earlier round of training did."""
    device = next(model.net.parameters()).device
    warp = transform or (lambda x: x)

    def draw(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        x, labels = world.batch(n, style, g, device, size)
        return warp(x), labels

    probe = draw(probe_images, world.generator(model.spec.seed + 202, device))
    before = fixed_batch_loss(model, *probe, seed=model.spec.seed + 303, weighting=cfg.weighting)
    model.encoder.train().requires_grad_(True)
    model.net.train().requires_grad_(True)
    params = model.parameters()
    report = train(model, params, draw, cfg, seed=model.spec.seed + 101 + 7 * round_)
    model.encoder.eval().requires_grad_(False)
    model.net.eval().requires_grad_(False)
    after = fixed_batch_loss(model, *probe, seed=model.spec.seed + 303, weighting=cfg.weighting)
    report["fixed_batch_loss"] = {"before": before, "after": after}
    report["x0_mse_by_sigma"] = x0_error_by_sigma(model, *probe, seed=model.spec.seed + 404)
    report["params"] = model.n_params()
    report["spec"] = _spec_dict(model.spec)
    model.train_report = report
    return report


def _spec_dict(spec: ModelSpec) -> dict:
    out = {"name": spec.name, "prediction": spec.prediction, "seed": spec.seed, "description": spec.description}
    if spec.unet is not None:
        out["unet"] = {k: v for k, v in asdict(spec.unet).items() if v is not None}
    if spec.dit is not None:
        out["dit"] = asdict(spec.dit)
    return out


def _downsample(values: list[float], n: int) -> list[float]:
    if len(values) <= n:
        return [round(v, 5) for v in values]
    k = len(values) / n
    return [round(sum(values[int(i * k): int((i + 1) * k)]) / max(int((i + 1) * k) - int(i * k), 1), 5)
            for i in range(n)]


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# --- the study's model zoo --------------------------------------------------------------------------------------


def specs(toy: bool, eps_channels: int | None = None) -> dict[str, ModelSpec]:
    """source (eps UNet), and the targets: same family (eps UNet, other seed), v-UNet (other width, depth and
    projection layout), flow DiT. ``toy`` shrinks everything for the CPU smoke test; ``eps_channels`` sets the ε
    UNets' base width."""
    if toy:
        unet = UNetConfig(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(2,),
                          num_res_blocks=1, channel_mult=(1, 1), num_heads=2, transformer_depth=(1, 1),
                          context_dim=16)
        vnet = UNetConfig(in_channels=3, out_channels=3, model_channels=32, attention_resolutions=(1,),
                          num_res_blocks=1, channel_mult=(1,), num_head_channels=16, transformer_depth=(1,),
                          context_dim=16, use_linear_in_transformer=True)
        dit = DiTConfig(in_channels=3, patch_size=4, hidden_size=32, depth=1, num_heads=2, context_dim=16,
                        adm_in_channels=None)
    else:
        # 64 base channels: the layout's GroupNorm has 32 groups, and at 32 channels it would normalise each
        # channel on its own, taking away the image's mean colour (class fidelity alone 71 % there, 99 % here)
        unet = UNetConfig(in_channels=3, out_channels=3, model_channels=64, attention_resolutions=(2, 4),
                          num_res_blocks=2, channel_mult=(1, 2, 4), num_heads=4, transformer_depth=(1, 1, 1),
                          context_dim=64)
        vnet = UNetConfig(in_channels=3, out_channels=3, model_channels=64, attention_resolutions=(2,),
                          num_res_blocks=1, channel_mult=(1, 2), num_head_channels=32, transformer_depth=(1, 2),
                          context_dim=64, use_linear_in_transformer=True)
        dit = DiTConfig(in_channels=3, patch_size=2, hidden_size=256, depth=6, num_heads=4, context_dim=64,
                        adm_in_channels=None)
    if eps_channels:
        unet = replace(unet, model_channels=eps_channels)
    return {
        "source": ModelSpec("source", "eps", 1000, unet=unet, description="ε-prediction UNet (SD1-style layout)"),
        "same_family": ModelSpec("same_family", "eps", 2000, unet=unet,
                                 description="ε-prediction UNet, same architecture, another seed"),
        "v_unet": ModelSpec("v_unet", "v", 3000, unet=vnet,
                            description="v-prediction UNet, other width/depth, linear projections (SD2-style)"),
        "flow_dit": ModelSpec("flow_dit", "flow", 4000, dit=dit, description="rectified-flow DiT"),
    }
