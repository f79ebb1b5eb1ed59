"""Measures that need no pretrained weights: attribute detectors, a classifier trained on the world's own labels,
and diversity.

- **red**: an image is red when at least ``RED_MIN_FRACTION`` of its pixels (20 of a 32×32 image) are clearly red
  (R well above G and B) after a 3×3 blur. The
  world's plain hues keep R ≤ max(G, B) and its backgrounds are nearly grey, so a plain image never fires.
- **striped**: the share of the luminance spectrum's non-DC energy at the stripes' vertical frequency (period
  4 px). The threshold is calibrated on the world's own plain and striped images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import world

RED_MIN_FRACTION = 20 / 1024


def red_fraction(images: Tensor) -> Tensor:
    """Per image, the share of clearly red pixels after a 3×3 box blur (so residual sampling noise, whose single
    pixels can be red, does not count); images in [-1, 1]."""
    x = F.avg_pool2d(F.pad(images.float(), (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    rgb = (x + 1) / 2
    r, gb = rgb[:, 0], rgb[:, 1:].amax(dim=1)
    return ((r > 0.45) & (r - gb > 0.3)).flatten(1).float().mean(dim=1)


def is_red(images: Tensor) -> Tensor:
    return red_fraction(images) >= RED_MIN_FRACTION


def stripe_score(images: Tensor, period: int = world.STRIPE_PERIOD) -> Tensor:
    """Per image, the share of non-DC luminance energy in the horizontal-stripe band (period 4 px, |fx| ≤ 2)."""
    lum = (images.float() * torch.tensor([0.299, 0.587, 0.114], device=images.device)[:, None, None]).sum(1)
    spec = torch.fft.fft2(lum - lum.mean(dim=(1, 2), keepdim=True)).abs() ** 2
    size = images.shape[-1]
    fy = size // period
    cols = torch.tensor([0, 1, 2, -2, -1], device=images.device) % size
    band = spec[:, [fy, -fy]][:, :, cols].flatten(1).sum(1)
    return band / spec.flatten(1).sum(1).clamp_min(1e-12)


@dataclass(frozen=True)
class Detectors:
    """Attribute detectors with the stripe threshold calibrated on the world; ``accuracy`` on held-out images."""

    stripe_threshold: float
    accuracy: dict[str, float]
    stripe_period: int = world.STRIPE_PERIOD

    def rate(self, attribute: str, images: Tensor) -> float:
        hit = is_red(images) if attribute == "red" else \
            stripe_score(images, self.stripe_period) > self.stripe_threshold
        return hit.float().mean().item()


def calibrate(n: int, seed: int, device: torch.device | str = "cpu", size: int = world.SIZE,
              stripe_period: int = world.STRIPE_PERIOD) -> Detectors:
    """Pick the stripe threshold that best separates striped from other images, noisy copies included (residual
    sampling noise spreads energy into every band), and report both detectors' accuracy on a fresh draw."""
    g = world.generator(seed, device)

    def noisy(x: Tensor, std: float) -> Tensor:
        return x + std * torch.randn(x.shape, generator=g, device=x.device)

    plain = torch.cat([world.batch(n, style, g, device, size, stripe_period)[0] for style in ("plain", "red")])
    striped = world.batch(n, "striped", g, device, size, stripe_period)[0]
    neg = stripe_score(torch.cat([plain, noisy(plain, 0.1), noisy(plain, 0.2)]), stripe_period)
    pos = stripe_score(torch.cat([striped, noisy(striped, 0.1), noisy(striped, 0.2)]), stripe_period)
    candidates = torch.cat([neg, pos]).sort().values
    neg_below = torch.searchsorted(neg.sort().values, candidates, right=True) / len(neg)
    pos_above = 1 - torch.searchsorted(pos.sort().values, candidates, right=True) / len(pos)
    acc = neg_below + pos_above
    threshold = candidates[int(acc.argmax())].item()
    det = Detectors(threshold, {}, stripe_period)
    images = {style: world.batch(n, style, g, device, size, stripe_period)[0] for style in world.STYLES}
    accuracy = {
        "red": ((1 - det.rate("red", images["plain"])) + det.rate("red", images["red"])) / 2,
        "striped": ((1 - det.rate("striped", images["plain"])) + det.rate("striped", images["striped"])) / 2,
    }
    return Detectors(threshold, accuracy, stripe_period)


# --- class fidelity -------------------------------------------------------------------------------------------------


class ShapeClassifier(nn.Module):
    """A small CNN over the world's classes, trained on all three styles so it judges shape, not colour."""

    def __init__(self, width: int = 32, classes: int = len(world.CLASSES)):
        super().__init__()
        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]

        w = width
        self.net = nn.Sequential(
            *block(3, w), *block(w, w), nn.MaxPool2d(2),
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
            *block(2 * w, 4 * w), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mixed_batch(n: int, g: torch.Generator, device: torch.device | str,
                size: int = world.SIZE, stripe_period: int = world.STRIPE_PERIOD) -> tuple[Tensor, Tensor]:
    styles = torch.randint(0, len(world.STYLES), (n,), generator=g, device=torch.device(device))
    labels = torch.randint(0, len(world.CLASSES), (n,), generator=g, device=torch.device(device))
    return world.render(labels, styles, g, device, size, stripe_period), labels


def train_classifier(steps: int, batch: int, seed: int, device: torch.device | str, width: int = 32,
                     noise: float = 0.15, size: int = world.SIZE,
                     held_out: int = 2048, stripe_period: int = world.STRIPE_PERIOD) -> tuple[ShapeClassifier, dict]:
    """Train on fresh world draws, with pixel noise (up to ``noise``) and blur on half of them so that imperfect
    samples are judged by their shape; returns the model and a report with its held-out accuracy."""
    torch.manual_seed(seed)
    clf = ShapeClassifier(width).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    warm = max(steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / max(steps, 1), 1.0)))))
    g = world.generator(seed, device)
    losses = []
    for _ in range(steps):
        x, y = mixed_batch(batch, g, device, size, stripe_period)
        blur = torch.rand(batch, generator=g, device=x.device) < 0.5
        x = torch.where(blur[:, None, None, None], F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1), x)
        std = noise * torch.rand(batch, generator=g, device=x.device)
        x = x + std[:, None, None, None] * torch.randn(x.shape, generator=g, device=x.device)
        with _autocast(device):
            loss = F.cross_entropy(clf(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    clf.eval().requires_grad_(False)
    x, y = mixed_batch(held_out, world.generator(seed + 1, device), device, size, stripe_period)
    acc = (classify(clf, x) == y).float().mean().item()
    return clf, {"steps": steps, "batch": batch, "first_loss": losses[0] if losses else None,
                 "last_loss": sum(losses[-20:]) / max(len(losses[-20:]), 1) if losses else None,
                 "held_out_accuracy": acc}


@torch.no_grad()
def classify(clf: nn.Module, images: Tensor) -> Tensor:
    with _autocast(images.device):
        return clf(images.clamp(-1, 1)).argmax(dim=1)


def class_fidelity(clf: nn.Module, images: Tensor, labels: Tensor) -> float:
    return (classify(clf, images) == labels.to(images.device)).float().mean().item()


# --- diversity ------------------------------------------------------------------------------------------------------


def diversity(images: Tensor, labels: Tensor) -> float:
    """Mean pairwise RMS pixel distance between images of the same class (over seeds), averaged over classes."""
    x = images.float().clamp(-1, 1).flatten(1)
    per_class = []
    for c in labels.unique():
        xc = x[labels.to(x.device) == c]
        if len(xc) < 2:
            continue
        d = torch.cdist(xc, xc) / x.shape[1] ** 0.5
        n = len(xc)
        per_class.append((d.sum() / (n * (n - 1))).item())
    return sum(per_class) / max(len(per_class), 1)


def _autocast(device: torch.device | str):
    dev = torch.device(device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")
