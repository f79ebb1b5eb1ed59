"""Where the shape landed: the shape's pixels found by their colour, against the mask the control asked for.

The world's shapes are saturated (HSV saturation ≥ 0.55 at value ≥ 0.65, so max − min of RGB ≥ 0.36) and its
backgrounds nearly grey (≤ 0.15 · 0.6 · 1.3 ≈ 0.12 with the texture), so a pixel belongs to the shape when its
RGB spread, after a 3×3 blur that keeps single noisy pixels out, is above ``CHROMA_MIN``. Per image:

- **IoU** of the found pixels with the asked mask (mask > 0.5);
- **hit**: IoU ≥ ``HIT_IOU``;
- **centre distance** in pixels between the two centroids; an image with no shape pixel counts its centroid at the
  image's centre (the guess that knows nothing).

On the world's own images (the mask each was drawn with) these give the measure's ceiling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CHROMA_MIN = 0.22
HIT_IOU = 0.5


def shape_pixels(images: Tensor) -> Tensor:
    """[n, H, W] bool: the pixels of saturated colour in images in [-1, 1]."""
    x = F.avg_pool2d(F.pad(images.float(), (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    rgb = (x + 1) / 2
    return (rgb.amax(dim=1) - rgb.amin(dim=1)) > CHROMA_MIN


def centroids(masks: Tensor) -> Tensor:
    """[n, 2] (y, x) centroid of each [n, H, W] mask; the image centre for an empty one."""
    h, w = masks.shape[-2:]
    m = masks.float()
    yy = torch.arange(h, device=m.device, dtype=torch.float32)[:, None]
    xx = torch.arange(w, device=m.device, dtype=torch.float32)[None, :]
    total = m.sum(dim=(1, 2))
    centre = torch.tensor([(h - 1) / 2, (w - 1) / 2], device=m.device)
    got = torch.stack([(m * yy).sum(dim=(1, 2)), (m * xx).sum(dim=(1, 2))], dim=1) / total.clamp_min(1)[:, None]
    return torch.where(total[:, None] > 0, got, centre)


def placement(images: Tensor, asked: Tensor) -> dict:
    """Mean IoU, hit rate and mean centre distance (px) of the shapes in ``images`` against the ``asked`` masks
    ([n, 1, H, W] coverage in [0, 1])."""
    found, want = shape_pixels(images), asked[:, 0] > 0.5
    inter = (found & want).flatten(1).sum(1).float()
    union = (found | want).flatten(1).sum(1).float().clamp_min(1)
    iou = inter / union
    dist = (centroids(found) - centroids(want)).norm(dim=1)
    return {"iou": iou.mean().item(), "hit": (iou >= HIT_IOU).float().mean().item(), "centre_px": dist.mean().item()}
