"""Adaptive λ: rules that set the delta's strength per step and per image without tuning to the adaptation.

Each rule returns a gain per image, ``k``, applied on top of the constant λ: the source's adapted prediction
becomes ``base + k·(adapted − base)``, so the delta the target receives is ``λ·k·Δ``. The inputs are the
CFG-combined x0 predictions of one call, already in the target's latent format:

- ``x0_ratio``: ``k = ‖x0_target‖ / ‖x0_base‖``: the delta is carried as a share of the prediction it corrects,
  so a target whose predictions are larger (or smaller) than the source's gets a proportionally larger delta.
- ``flat_fraction``: ``k = r̄ / r_t`` with ``r_t = ‖Δ_t‖ / ‖x0_target,t‖`` and ``r̄`` its running mean over the steps
  so far: ‖Δ‖ stays the same fraction of ‖x0_target‖ at every step, the fraction set by the adaptation itself.
- ``guidance_ratio``: ``k = ‖g_target‖ / ‖g_source‖`` with ``g = x0_cond − x0_uncond``: the delta is carried in
  units of each model's own classifier-free guidance, so a more decisive target gets a larger delta.

Gains are clamped to ``[1/GAIN_LIMIT, GAIN_LIMIT]``: a ratio of norms near zero (the first steps' x0 are close to
the data mean) must not blow the delta up. The rules are written as functions of tensors, so the same code can
serve a product schedule later.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lib_delta.guidance import CfgLayout, DeltaGuidance, cfg_combine, cond_mean
from lib_delta.schedule import ProgressClock
from lib_delta.spaces import SpaceBridge

from .models import NULL_CLASS, DiffusionModel
from .study import PatchedSource, Variant, sample

GAIN_LIMIT = 4.0
EPS = 1e-8


def _norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1)


def x0_ratio_gain(target_x0: Tensor, base_x0: Tensor, delta: Tensor, guidance: tuple[Tensor, Tensor],
                  state: dict) -> Tensor:
    return _norm(target_x0) / _norm(base_x0).clamp_min(EPS)


def flat_fraction_gain(target_x0: Tensor, base_x0: Tensor, delta: Tensor, guidance: tuple[Tensor, Tensor],
                       state: dict) -> Tensor:
    r = _norm(delta) / _norm(target_x0).clamp_min(EPS)
    total, count = state.get("sum", torch.zeros_like(r)) + r, state.get("count", 0) + 1
    state["sum"], state["count"] = total, count
    return (total / count) / r.clamp_min(EPS)


def guidance_ratio_gain(target_x0: Tensor, base_x0: Tensor, delta: Tensor, guidance: tuple[Tensor, Tensor],
                        state: dict) -> Tensor:
    g_target, g_source = guidance
    return _norm(g_target) / _norm(g_source).clamp_min(EPS)


RULES: dict[str, Callable[..., Tensor]] = {
    "x0_ratio": x0_ratio_gain,
    "flat_fraction": flat_fraction_gain,
    "guidance_ratio": guidance_ratio_gain,
}


def clamp_gain(k: Tensor) -> Tensor:
    return k.clamp(1 / GAIN_LIMIT, GAIN_LIMIT)


def guidance_direction(rows: Tensor, layout: CfgLayout) -> Tensor:
    """Per image, the cond rows' mean minus the uncond row: the direction CFG scales."""
    return cond_mean(rows[: layout.n_cond], layout) - rows[layout.n_cond:]


class AdaptiveGuidance(DeltaGuidance):
    """``DeltaGuidance`` whose delta is scaled per image by ``rule`` before it is added (cfg mode, one group)."""

    def __init__(self, rule: str, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.settings.cfg_mode != "cfg" or len(self.settings.groups) != 1:
            raise ValueError("the adaptive rules are defined for cfg mode and one adaptation group")
        self.rule = RULES[rule]
        self.state: dict = {}
        self.gains: list[Tensor] = []  # per call, the gains applied (for the record)

    def _add_delta(self, out, sigma, pred, lams, layout, cond_only, record, *rest) -> None:
        if self.bridge.target.output != "x0":
            raise ValueError("the adaptive rules read the target's x0 prediction")
        scale = self._source_scale(layout)
        source_layout = layout if scale == layout.cond_scale else CfgLayout(layout.conds_list, scale)
        to_target = self.bridge.x0_to_target
        base = to_target(cfg_combine(pred[0], source_layout))
        delta = self.bridge.delta_to_target(cfg_combine(pred[1], source_layout) - cfg_combine(pred[0], source_layout))
        target_x0 = cfg_combine(out.float(), layout)
        guidance = (guidance_direction(out.float(), layout),
                    self.bridge.delta_to_target(guidance_direction(pred[0], layout)))
        k = clamp_gain(self.rule(target_x0, base, delta, guidance, self.state))
        self.gains.append(k.detach().cpu())
        per_row = k.index_select(0, self._row_index(layout, k.device)).view(-1, 1, 1, 1)
        scaled = torch.stack([pred[0], pred[0] + per_row * (pred[1] - pred[0])])
        super()._add_delta(out, sigma, scaled, lams, layout, cond_only, record, *rest)


@torch.no_grad()
def adaptive_sample(target: DiffusionModel, source: DiffusionModel, patch, lora: str, rule: str, strength: float,
                    clamp: bool, labels: Tensor, noise: Tensor, steps: int, cfg_scale: float) -> tuple[Tensor, dict]:
    """``study.delta_sample`` with an adaptive rule; returns the images and the gains' summary."""
    made: list[AdaptiveGuidance] = []
    variant = Variant(strength=strength, clamp=clamp)

    def guidance_for(sigmas: Tensor, labels: Tensor) -> AdaptiveGuidance:
        row_conds = torch.cat([source.encode(labels), source.encode(torch.full_like(labels, NULL_CLASS))])
        src = PatchedSource(source, patch, row_conds, clamp)
        g = AdaptiveGuidance(rule, variant.settings(lora), SpaceBridge(source.space, target.space), src,
                             ProgressClock(sigmas.tolist()))
        made.append(g)
        return g

    with patch:
        images = sample(target, labels, noise, steps, cfg_scale, guidance_for)
    gains = torch.stack(made[0].gains) if made[0].gains else torch.ones(1, 1)
    per_step = gains.mean(dim=1)
    return images, {"mean": gains.mean().item(), "first": per_step[0].item(), "last": per_step[-1].item(),
                    "min": gains.min().item(), "max": gains.max().item()}
