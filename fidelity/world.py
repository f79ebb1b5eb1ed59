"""The world: seeded 32×32 RGB images of one coloured shape on a softly textured, nearly grey background (other
sizes for smoke tests: shapes scale with the image).

Five shape classes; the class index plays the prompt. Styles restyle the shape only:
- ``plain``: any hue at least 60° away from red (so no plain image is ever red);
- ``red``: every shape red;
- ``striped``: horizontal stripes of period 4 px across the shape (the background holds only low frequencies).

Images are generated on any device in one vectorised pass, in [-1, 1], from a ``torch.Generator``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CLASSES = ("circle", "square", "triangle", "cross", "ring")
STYLES = ("plain", "red", "striped")
SIZE = 32
STRIPE_PERIOD = 4


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device: torch.device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def hsv_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """[n] hue (turns), saturation, value -> [n, 3] RGB in [0, 1]."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=-1)
    f = (torch.minimum(k, 4 - k)).clamp(0, 1)
    return v[:, None] * (1 - s[:, None] * f)


def _shape_sdf(cls: Tensor, dx: Tensor, dy: Tensor, r: Tensor) -> Tensor:
    """Signed distance (pixels, negative inside) of each image's shape; dx, dy are rotated pixel offsets."""
    dist = (dx**2 + dy**2).sqrt()
    circle = dist - r
    square = torch.maximum(dx.abs(), dy.abs()) - 0.8 * r
    # equilateral triangle, inradius 0.6 r
    n1 = dy - 0.6 * r
    n2 = -0.5 * dy + 0.866 * dx - 0.6 * r
    n3 = -0.5 * dy - 0.866 * dx - 0.6 * r
    triangle = torch.maximum(torch.maximum(n1, n2), n3)
    arm = 0.33 * r
    cross = torch.minimum(torch.maximum(dx.abs() - arm, dy.abs() - r), torch.maximum(dy.abs() - arm, dx.abs() - r))
    ring = (dist - 0.72 * r).abs() - 0.28 * r
    stack = torch.stack([circle, square, triangle, cross, ring])  # [5, n, H, W]
    return stack.gather(0, cls[None, :, None, None].expand(1, *dx.shape)).squeeze(0)


def render(
    labels: Tensor, style: str | Tensor, g: torch.Generator, device: torch.device | str = "cpu", size: int = SIZE,
    stripe_period: int = STRIPE_PERIOD,
) -> Tensor:
    """Images [n, 3, size, size] in [-1, 1] of the classes ``labels`` in ``style`` (a name, or per-image
    indices). ``stripe_period`` in pixels (the resolution study scales it with the image)."""
    return render_with_masks(labels, style, g, device, size, stripe_period)[0]


def render_with_masks(
    labels: Tensor, style: str | Tensor, g: torch.Generator, device: torch.device | str = "cpu", size: int = SIZE,
    stripe_period: int = STRIPE_PERIOD,
) -> tuple[Tensor, Tensor]:
    """:func:`render`'s images (the same draws) and each shape's coverage [n, 1, size, size] in [0, 1]: where the
    shape is, what a mask control gives."""
    device = torch.device(device)
    k = size / SIZE  # lengths below are for 32 px
    labels = labels.to(device)
    n = labels.shape[0]
    styles = torch.full((n,), STYLES.index(style), device=device) if isinstance(style, str) else style.to(device)
    yy, xx = torch.meshgrid(torch.arange(size, device=device, dtype=torch.float32),
                            torch.arange(size, device=device, dtype=torch.float32), indexing="ij")

    # background: a desaturated tint, a gradient and a few low-frequency waves (at most 2 cycles per image)
    bg_v = _uniform(n, 0.25, 0.6, g, device)
    bg_rgb = hsv_to_rgb(torch.rand(n, generator=g, device=device), _uniform(n, 0.0, 0.15, g, device), bg_v)
    ang = _uniform(n, 0, 2 * math.pi, g, device)
    grad = (torch.cos(ang)[:, None, None] * xx + torch.sin(ang)[:, None, None] * yy) / size - 0.5
    tex = 0.15 * grad
    for _ in range(3):
        fx = torch.randint(-2, 3, (n,), generator=g, device=device).float()[:, None, None]
        fy = torch.randint(-2, 3, (n,), generator=g, device=device).float()[:, None, None]
        ph = _uniform(n, 0, 2 * math.pi, g, device)[:, None, None]
        tex = tex + 0.04 * torch.sin(2 * math.pi * (fx * xx + fy * yy) / size + ph)
    img = (bg_rgb[:, :, None, None] * (1 + tex[:, None])).clamp(0, 1)

    # the shape
    r = _uniform(n, 6.0 * k, 10.5 * k, g, device)
    cx = 6 * k + r * 0.5 + torch.rand(n, generator=g, device=device) * (size - 12 * k - r)
    cy = 6 * k + r * 0.5 + torch.rand(n, generator=g, device=device) * (size - 12 * k - r)
    rot = _uniform(n, 0, 2 * math.pi, g, device)
    ox, oy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    c, s = torch.cos(rot)[:, None, None], torch.sin(rot)[:, None, None]
    dx, dy = c * ox + s * oy, -s * ox + c * oy
    mask = (0.5 - _shape_sdf(labels, dx, dy, r[:, None, None])).clamp(0, 1)  # 1-px anti-aliased edge

    hue = _uniform(n, 1 / 6, 5 / 6, g, device)  # 60°..300°: never red
    sat = _uniform(n, 0.55, 1.0, g, device)
    val = _uniform(n, 0.65, 1.0, g, device)
    red = styles == STYLES.index("red")
    hue = torch.where(red, _uniform(n, -0.025, 0.025, g, device) % 1.0, hue)
    sat = torch.where(red, _uniform(n, 0.8, 1.0, g, device), sat)
    fg = hsv_to_rgb(hue, sat, val)[:, :, None, None].expand(n, 3, size, size)
    phase = torch.randint(0, stripe_period, (n,), generator=g, device=device)[:, None, None]
    dark = ((yy[None].long() + phase) % stripe_period) >= stripe_period // 2
    striped = (styles == STYLES.index("striped"))[:, None, None] & dark
    fg = fg * torch.where(striped, 0.3, 1.0)[:, None]
    img = img * (1 - mask[:, None]) + fg * mask[:, None]
    return img * 2 - 1, mask[:, None]


def batch(n: int, style: str, g: torch.Generator, device: torch.device | str = "cpu",
          size: int = SIZE, stripe_period: int = STRIPE_PERIOD) -> tuple[Tensor, Tensor]:
    """``n`` images with uniformly drawn classes: (images, labels)."""
    labels = torch.randint(0, len(CLASSES), (n,), generator=g, device=torch.device(device))
    return render(labels, style, g, device, size, stripe_period), labels


def batch_with_masks(n: int, style: str, g: torch.Generator, device: torch.device | str = "cpu",
                     size: int = SIZE) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batch` with the shapes' masks: (images, labels, masks)."""
    labels = torch.randint(0, len(CLASSES), (n,), generator=g, device=torch.device(device))
    images, masks = render_with_masks(labels, style, g, device, size)
    return images, labels, masks


def generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=torch.device(device)).manual_seed(seed)
