"""A horizontal bar chart as a PNG, with numpy and zlib only (the GPU machines need not have a plotting library).

Text is drawn with a built-in 5×7 pixel font (upper case, digits, a little punctuation), scaled up.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

_GLYPHS = {
    "A": "01110 10001 10001 11111 10001 10001 10001", "B": "11110 10001 10001 11110 10001 10001 11110",
    "C": "01110 10001 10000 10000 10000 10001 01110", "D": "11100 10010 10001 10001 10001 10010 11100",
    "E": "11111 10000 10000 11110 10000 10000 11111", "F": "11111 10000 10000 11110 10000 10000 10000",
    "G": "01110 10001 10000 10111 10001 10001 01111", "H": "10001 10001 10001 11111 10001 10001 10001",
    "I": "01110 00100 00100 00100 00100 00100 01110", "J": "00111 00010 00010 00010 00010 10010 01100",
    "K": "10001 10010 10100 11000 10100 10010 10001", "L": "10000 10000 10000 10000 10000 10000 11111",
    "M": "10001 11011 10101 10101 10001 10001 10001", "N": "10001 10001 11001 10101 10011 10001 10001",
    "O": "01110 10001 10001 10001 10001 10001 01110", "P": "11110 10001 10001 11110 10000 10000 10000",
    "Q": "01110 10001 10001 10001 10101 10010 01101", "R": "11110 10001 10001 11110 10100 10010 10001",
    "S": "01111 10000 10000 01110 00001 00001 11110", "T": "11111 00100 00100 00100 00100 00100 00100",
    "U": "10001 10001 10001 10001 10001 10001 01110", "V": "10001 10001 10001 10001 10001 01010 00100",
    "W": "10001 10001 10001 10101 10101 10101 01010", "X": "10001 10001 01010 00100 01010 10001 10001",
    "Y": "10001 10001 10001 01010 00100 00100 00100", "Z": "11111 00001 00010 00100 01000 10000 11111",
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11111 00010 00100 00010 00001 10001 01110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    " ": "00000 00000 00000 00000 00000 00000 00000", ".": "00000 00000 00000 00000 00000 01100 01100",
    ",": "00000 00000 00000 00000 01100 00100 01000", "-": "00000 00000 00000 11111 00000 00000 00000",
    "+": "00000 00100 00100 11111 00100 00100 00000", "(": "00010 00100 01000 01000 01000 00100 00010",
    ")": "01000 00100 00010 00010 00010 00100 01000", "/": "00000 00001 00010 00100 01000 10000 00000",
    ":": "00000 01100 01100 00000 01100 01100 00000", "%": "11000 11001 00010 00100 01000 10011 00011",
    "=": "00000 00000 11111 00000 11111 00000 00000", ">": "01000 00100 00010 00001 00010 00100 01000",
    "'": "00100 00100 01000 00000 00000 00000 00000", "?": "01110 10001 00001 00010 00100 00000 00100",
}
_FONT = {c: np.array([[ch == "1" for ch in row] for row in rows.split()], dtype=bool) for c, rows in _GLYPHS.items()}
_ALIASES = {"×": "X", "→": ">", "λ": "L", "½": "1/2", "_": "-"}

SCALE = 2
CHAR_W, CHAR_H = 6 * SCALE, 8 * SCALE
COLOURS = {"target": (120, 120, 120), "reference": (200, 80, 60), "floor": (90, 90, 160),
           "default": (40, 140, 90), "other": (70, 160, 200)}


@dataclass
class Bar:
    label: str
    value: float
    text: str
    colour: str = "other"


def _text(img: np.ndarray, x: int, y: int, s: str, colour=(20, 20, 20)) -> None:
    for c in "".join(_ALIASES.get(c, c) for c in s).upper():
        glyph = _FONT.get(c, _FONT["?"])
        block = np.kron(glyph, np.ones((SCALE, SCALE), dtype=bool))
        h, w = block.shape
        if x + w > img.shape[1] or y + h > img.shape[0]:
            return
        img[y:y + h, x:x + w][block] = colour
        x += CHAR_W


def bar_chart(groups: list[tuple[str, list[Bar]]], width: int = 1100) -> np.ndarray:
    """Groups of horizontal bars (a title, then one bar per row), each group scaled to its own largest value."""
    label_w = max((len(b.label) for _, bars in groups for b in bars), default=10) * CHAR_W + 16
    text_w = max((len(b.text) for _, bars in groups for b in bars), default=10) * CHAR_W + 16
    row_h = CHAR_H + 8
    height = sum(row_h * (len(bars) + 2) for _, bars in groups) + 10
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    y = 8
    bar_room = max(width - label_w - text_w, 50)
    for title, bars in groups:
        _text(img, 8, y, title, (0, 0, 0))
        y += row_h
        top = max((b.value for b in bars), default=1.0) or 1.0
        for b in bars:
            _text(img, 8, y + 4, b.label)
            w = max(int(bar_room * b.value / top), 1)
            img[y + 3:y + row_h - 3, label_w:label_w + w] = COLOURS.get(b.colour, COLOURS["other"])
            _text(img, label_w + w + 8, y + 4, b.text)
            y += row_h
        y += row_h
    return img


def write_png(path: str, img: np.ndarray) -> None:
    """An 8-bit RGB PNG."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw, 9)))
        f.write(chunk(b"IEND", b""))
