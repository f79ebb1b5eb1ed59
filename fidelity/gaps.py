"""Growing the gap between source and target, one axis at a time, to see where transfer breaks.

- ``colour``: the source fine-tuned on a world whose colours are shifted towards a cold cast (``shift_colour``,
  strength k in [0, 1]): what a user's SD1.5 fine-tune is to SD1.5. k = 0 is the source itself (no fine-tune),
  where the adapter merged at ×1 is the adapted source. The red LoRA's delta has to push against what the target
  has learnt, and the naive route (the file loaded on the target) exists on every level, so both are compared as
  the gap grows.
- ``scale``: the source fine-tuned on images multiplied by s (another latent scale: the noise schedule meets a
  signal s times as strong), run twice: declared (the bridge maps the delta by s, as a host does for a known latent
  format) and undeclared (the host takes the target for the source's format).
- ``steps``: the target sampled with fewer steps, Delta Sampling at λ = 1 and base-first over the first half.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lib_delta.spaces import LatentFormat, ModelSpace

from . import models
from .models import PIXELS, DiffusionModel, TrainConfig

COLOUR_LEVELS = (0.33, 0.67, 1.0)
SCALE_LEVELS = (0.6, 0.35)
STEP_LEVELS = (10, 6, 4)
FINETUNE_S = 10.0  # GPU seconds of fine-tuning per gapped target (58 and 68 steps of batch 256 on one H100)
# the cast at k = 1, in [0, 1] RGB: red ×0.55, green +0.05, blue +0.25 (then clamped)
_GAIN = (0.55, 1.0, 1.0)
_OFFSET = (0.0, 0.05, 0.25)


def shift_colour(x: Tensor, k: float) -> Tensor:
    """World images in [-1, 1] with a cold cast of strength ``k`` (0: unchanged)."""
    gain = torch.tensor([1 + k * (g - 1) for g in _GAIN], device=x.device)[:, None, None]
    offset = torch.tensor([k * o for o in _OFFSET], device=x.device)[:, None, None]
    rgb = ((x + 1) / 2 * gain + offset).clamp(0, 1)
    return rgb * 2 - 1


@dataclass
class ScaledModel(DiffusionModel):
    """A model whose latent is the image times ``scale``; ``declared`` False hands the host the plain pixel format
    (the mistake of taking the target for the source's format)."""

    scale: float = 1.0
    declared: bool = True

    @property
    def space(self) -> ModelSpace:
        latent = LatentFormat(f"pixels×{self.scale:g}", 3, self.scale) if self.declared else PIXELS
        return ModelSpace(latent, "flow" if self.is_flow else "ve")

    def decode(self, x: Tensor) -> Tensor:
        return x / self.scale

    def declared_as(self, declared: bool) -> ScaledModel:
        return replace(self, declared=declared)


def finetune_config(base: TrainConfig, seconds: float, steps: int) -> TrainConfig:
    """A fine-tune of a trained model: a lower learning rate, a short warm-up, a short EMA."""
    return replace(base, steps=steps, seconds=seconds, lr=base.lr * 0.3, warmup=min(base.warmup, 20),
                   ema=0.99 if base.ema else 0.0)


def colour_target(source: DiffusionModel, k: float, cfg: TrainConfig, size: int, level: int,
                  probe_images: int) -> DiffusionModel:
    """``source`` fine-tuned on the world with a cast of strength ``k``; at k = 0 an untouched copy (no gap, no
    fine-tune: any drift a fine-tune on the plain world added would be read as the colour gap's)."""
    model = _copy(source)
    if k == 0:
        model.train_report = {"steps": 0, "seconds": 0.0, "note": "k = 0: the source itself, not fine-tuned"}
        return model
    model.train_report = models.train_model(model, cfg, size, probe_images=probe_images,
                                            transform=lambda x: shift_colour(x, k), round_=10 + level)
    return model


def scale_target(source: DiffusionModel, s: float, cfg: TrainConfig, size: int, level: int,
                 probe_images: int) -> ScaledModel:
    base = _copy(source)
    model = ScaledModel(base.spec, base.encoder, base.net, base.denoiser, scale=s)
    model.train_report = models.train_model(model, cfg, size, probe_images=probe_images,
                                            transform=lambda x: x * s, round_=20 + level)
    return model


def _copy(model: DiffusionModel) -> DiffusionModel:
    """An independent copy to fine-tune (a new denoiser wrapper around the copied network)."""
    device = next(model.net.parameters()).device
    net = copy.deepcopy(model.net)
    return DiffusionModel(model.spec, copy.deepcopy(model.encoder), net,
                          models.make_denoiser(net, model.spec.prediction).to(device))
