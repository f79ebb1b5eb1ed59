"""What a checkpoint file is, read from its safetensors header alone: a request is checked before anything loads.

Only the key names are read (the header, a few hundred kilobytes), never a tensor. Pickled files have no header to
read; they are checked once loaded.
"""

from __future__ import annotations

import json
import os
import struct

_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit

# (family, a key only that family's full checkpoints have), most specific first
_MARKERS = (
    ("sd3", "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"),
    ("flux", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"),
    ("flux", "double_blocks.0.img_attn.qkv.weight"),
    ("sdxl", "conditioner.embedders.1.model.ln_final.weight"),
    ("sdxl-refiner", "conditioner.embedders.0.model.ln_final.weight"),
    ("sd2", "cond_stage_model.model.ln_final.weight"),
    ("sd1", "cond_stage_model.transformer.text_model.final_layer_norm.weight"),
    ("sd1", "cond_stage_model.transformer.final_layer_norm.weight"),
)
FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl-refiner": "SDXL", "sd3": "SD3", "flux": "Flux"}


def safetensors_keys(path: str) -> set[str] | None:
    """The tensor names of a safetensors file; None when it is not one (or is damaged)."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        return None
    try:
        header, _ = _read_header(path)
    except (OSError, ValueError, struct.error):
        return None
    return {k for k in header if k != "__metadata__"}


def safetensors_shapes(path: str) -> dict[str, list[int]] | None:
    """Each tensor's shape in a safetensors file, from its header; None when it is not one (or is damaged)."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        return None
    try:
        header, _ = _read_header(path)
        return {k: [int(n) for n in v["shape"]] for k, v in header.items() if k != "__metadata__"}
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


def safetensors_damage(path: str) -> str | None:
    """Why a safetensors file cannot be read whole (a header that does not parse, tensors past its end, bytes left
    over: a truncated or damaged download), or None when its layout is sound. Reads the header alone."""
    try:
        header, data_start = _read_header(path)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        size = os.path.getsize(path)
    except OSError as e:
        return f"it cannot be opened ({e.strerror or e})"
    except (ValueError, KeyError, TypeError, IndexError, struct.error):
        return "its header is damaged"
    if data_start + end != size:
        return f"its header describes {data_start + end} bytes but the file has {size}"
    return None


def _read_header(path: str) -> tuple[dict, int]:
    """The parsed header and where the tensor data starts."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if not 0 < size <= _MAX_HEADER:
            raise ValueError("header size")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError("header")
    return header, 8 + size


def checkpoint_family(path: str) -> str | None:
    """``sd1``, ``sd2``, ``sdxl``, ``sdxl-refiner``, ``sd3`` or ``flux`` from the file's key names; None when the
    file cannot be read this way (a pickle, a damaged file, an unknown layout): the loaded model decides then."""
    keys = safetensors_keys(path)
    if not keys:
        return None
    return next((family for family, marker in _MARKERS if marker in keys), None)
