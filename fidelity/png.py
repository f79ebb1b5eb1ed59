"""A dependency-free PNG writer and image grids (numpy + zlib only), so no plotting library is ever required."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch


def encode_png(rgb: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (8-bit RGB, no filtering)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError("expected a uint8 [H, W, 3] array")
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[n, 3, H, W] in [-1, 1] -> uint8 [n, H, W, 3]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def grid(rows: list[torch.Tensor], scale: int = 2, pad: int = 2) -> np.ndarray:
    """Rows of [n, 3, H, W] images (equal n) tiled on a white canvas, each pixel repeated ``scale`` times."""
    tiles = [to_uint8(r) for r in rows]
    n, h, w, _ = tiles[0].shape
    hs, ws = h * scale, w * scale
    out = np.full((len(rows) * (hs + pad) + pad, n * (ws + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(tiles):
        for j, img in enumerate(row):
            y, x = pad + i * (hs + pad), pad + j * (ws + pad)
            out[y:y + hs, x:x + ws] = img.repeat(scale, 0).repeat(scale, 1)
    return out


def save_png(path: str | Path, rgb: np.ndarray) -> None:
    Path(path).write_bytes(encode_png(rgb))
