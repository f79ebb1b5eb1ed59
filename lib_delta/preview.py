"""A preview strip of what Delta Sampling did: per kept step, the target's, the source base's and the adapted
source's x0 predictions and a heat map of |Δ|, decoded with a cheap linear latent→RGB map (no VAE).

Columns are steps, rows are: target x0, base x0, adapted x0, |Δ|. Only the first image of a batch is shown. The
control maps of the run's ControlNet units (the preprocessed hint each unit was given) follow in one more column,
one per row, so the strip shows what the adapted pass was steered by.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from .guidance import StepRecord

# Linear latent → RGB factors (the widely used "cheap approximation" of each family's VAE), applied to the scaled
# latent a model sees; the result is roughly in [-1, 1].
RGB_FACTORS = {
    "SD1": ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473)),
    "SDXL": ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
             (-0.3730, -0.2499, -0.2088)),
}
RGB_FACTORS["SD2"] = RGB_FACTORS["SD1"]
MIN_TILE = 64


def compact(records: list[StepRecord], keep: int = 4) -> None:
    """Keep the first image of each record on the CPU, and at most one record per ``1/keep`` of progress (the
    latest), so that a long generation does not hold every step's latents."""
    last = records[-1]
    for name in ("target_x0", "base_x0", "adapted_x0", "delta"):
        t = getattr(last, name)
        if t is not None and (t.shape[0] > 1 or t.device.type != "cpu"):
            setattr(last, name, t[:1].detach().float().cpu())
    if len(records) > 1 and _bucket(records[-2].progress, keep) == _bucket(last.progress, keep):
        del records[-2]


def _bucket(progress: float, keep: int) -> int:
    return min(int(progress * keep), keep - 1)


def render(records: Sequence[StepRecord], source_format: str, target_format: str | None = None,
           hints: Sequence[np.ndarray] = ()) -> np.ndarray | None:
    """The strip as a uint8 ``H×W×3`` array, or None when nothing was recorded. ``hints``: the control units' maps
    (``H×W×3`` uint8, see :func:`hint_image`), shown after the steps."""
    kept = [r for r in records if r.target_x0 is not None and r.base_x0 is not None]
    if not kept:
        return None
    strip = _steps(kept, source_format, target_format)
    scale = max(1, MIN_TILE // max(1, kept[0].target_x0.shape[-1]))
    strip = np.repeat(np.repeat(strip, scale, axis=0), scale, axis=1)
    return np.concatenate([strip, *_hint_columns(hints, strip.shape[0] // ROWS)], axis=1) if hints else strip


ROWS = 4  # target, base, adapted, |Δ|


def _steps(kept: Sequence[StepRecord], source_format: str, target_format: str | None) -> np.ndarray:
    columns = []
    for r in kept:
        tiles = [to_rgb(r.target_x0[0], target_format or source_format), to_rgb(r.base_x0[0], source_format)]
        tiles.append(to_rgb(r.adapted_x0[0], source_format) if r.adapted_x0 is not None else _blank(tiles[0]))
        tiles.append(heat(r.delta[0]) if r.delta is not None else _blank(tiles[0]))
        h = max(t.shape[0] for t in tiles)
        columns.append(np.concatenate([_fit(t, h, tiles[0].shape[1]) for t in tiles], axis=0))
    return np.concatenate(columns, axis=1)


def _hint_columns(hints: Sequence[np.ndarray], tile: int) -> list[np.ndarray]:
    """The hints as square-ish tiles of the strip's row height, one per row, as many columns as they need."""
    sized = [_shrink(h, tile, max(1, round(tile * h.shape[1] / max(1, h.shape[0])))) for h in hints]
    width = max(h.shape[1] for h in sized)
    sized = [np.pad(h, ((0, 0), (0, width - h.shape[1]), (0, 0))) for h in sized]
    blank = np.zeros((tile, width, 3), dtype=np.uint8)
    sized += [blank] * (-len(sized) % ROWS)
    return [np.concatenate(sized[i:i + ROWS], axis=0) for i in range(0, len(sized), ROWS)]


def hint_image(hint: Tensor | np.ndarray) -> np.ndarray:
    """A control map as ``H×W×3`` uint8: a host's ``[1, C, H, W]`` float tensor in [0, 1] (what the ControlNet is
    given) or a preprocessor's ``H×W`` / ``H×W×C`` uint8 array."""
    if isinstance(hint, Tensor):
        t = hint.detach().float().cpu()
        t = t[0] if t.dim() == 4 else t
        array = (t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    else:
        array = np.asarray(hint)
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array[..., :3])


def _shrink(image: np.ndarray, h: int, w: int) -> np.ndarray:
    """Area-averaged resize (thin lines of an edge map survive it), nearest-neighbour without PIL."""
    try:
        from PIL import Image
    except ImportError:
        return _fit(image, h, w)
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BOX))


def to_rgb(latent: Tensor, latent_format: str) -> np.ndarray:
    """``[C, h, w]`` latent → ``h×w×3`` uint8 through the family's linear factors."""
    factors = torch.tensor(RGB_FACTORS.get(latent_format, RGB_FACTORS["SD1"]), dtype=torch.float32)
    lat = latent.detach().float().cpu()
    if lat.shape[0] != factors.shape[0]:  # another channel count: show the first three channels
        rgb = lat[:3] / (lat[:3].abs().amax() + 1e-8)
    else:
        rgb = torch.einsum("chw,cr->rhw", lat, factors)
    return ((rgb.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def heat(delta: Tensor) -> np.ndarray:
    """|Δ| averaged over channels, normalised to its maximum, black → red → yellow → white."""
    v = delta.detach().float().cpu().abs().mean(0)
    v = v / (v.max() + 1e-12)
    rgb = torch.stack([(3 * v).clamp(0, 1), (3 * v - 1).clamp(0, 1), (3 * v - 2).clamp(0, 1)])
    return (rgb * 255).round().byte().permute(1, 2, 0).numpy()


def _blank(like: np.ndarray) -> np.ndarray:
    return np.zeros_like(like)


def _fit(tile: np.ndarray, h: int, w: int) -> np.ndarray:
    """Nearest-neighbour resize (the source and target latents may differ in size)."""
    if tile.shape[:2] == (h, w):
        return tile
    ys = (np.arange(h) * tile.shape[0] // h).clip(0, tile.shape[0] - 1)
    xs = (np.arange(w) * tile.shape[1] // w).clip(0, tile.shape[1] - 1)
    return tile[ys][:, xs]


def append_to(processed: object, strip: np.ndarray) -> None:
    """Add the strip to a WebUI result as one more image (a PIL image in the WebUI), with the first infotext beside
    it so that the gallery's image and infotext lists stay aligned."""
    images = processed.images  # type: ignore[attr-defined]
    try:
        from PIL import Image
    except ImportError:  # outside the WebUI (tests): the array itself
        images.append(strip)
    else:
        images.append(Image.fromarray(strip))
    infotexts = getattr(processed, "infotexts", None)
    if isinstance(infotexts, list):
        infotexts.append(infotexts[0] if infotexts else "")
