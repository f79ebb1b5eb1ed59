"""Pictures the unit tests send as control and reference images."""

from __future__ import annotations

import base64
import io

import numpy as np


def shape_image(size: int = 64) -> np.ndarray:
    """A white disc off-centre on a dark background: a map that says where the shape goes."""
    yy, xx = np.mgrid[:size, :size]
    img = np.full((size, size, 3), 20, dtype=np.uint8)
    img[(yy - size * 0.35) ** 2 + (xx - size * 0.6) ** 2 < (size * 0.22) ** 2] = 235
    return img


def b64png(img: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def huge_png(w: int, h: int) -> str:
    """A black PNG of that size, a few kB however large: for the image-size limits."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (w, h)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
