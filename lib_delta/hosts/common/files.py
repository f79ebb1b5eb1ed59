"""What a checkpoint file is, read from its safetensors header alone: a request is checked before anything loads.

Only the header is read, through the safetensors library's own reader (``safe_open`` maps the file and validates
the header against the file's size; no tensor is read). Forge wraps ``safetensors.torch.load_file`` to rename a
file it fails to read to ``.corrupted`` (modules_forge/patch_basic.py), never ``safe_open``, so checking a damaged
file here leaves it where it is. Pickled files have no header to read; they are checked once loaded.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from safetensors import safe_open

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
    with _header(path) as f:
        return None if f is None else set(f.keys())


def safetensors_shapes(path: str) -> dict[str, list[int]] | None:
    """Each tensor's shape in a safetensors file, from its header; None when it is not one (or is damaged)."""
    with _header(path) as f:
        return None if f is None else {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def safetensors_damage(path: str) -> str | None:
    """Why a safetensors file cannot be read whole (a header that does not parse, tensors past its end, bytes left
    over: a truncated or damaged download), or None when its layout is sound. Reads the header alone."""
    try:
        with safe_open(path, framework="pt", device="cpu"):
            return None
    except OSError as e:
        return f"it cannot be opened ({e.strerror or e})"
    except Exception as e:  # SafetensorError: its message names what does not fit
        return f"safetensors: {str(e).strip() or type(e).__name__}"


@contextlib.contextmanager
def _header(path: str) -> Iterator[Any]:
    """The opened file (its header), or None for another extension or a file safetensors refuses."""
    if os.path.splitext(path)[1].lower() != ".safetensors":
        yield None
        return
    try:
        f = safe_open(path, framework="pt", device="cpu")
    except Exception:
        yield None
        return
    with f:
        yield f


def checkpoint_family(path: str) -> str | None:
    """``sd1``, ``sd2``, ``sdxl``, ``sdxl-refiner``, ``sd3`` or ``flux`` from the file's key names; None when the
    file cannot be read this way (a pickle, a damaged file, an unknown layout): the loaded model decides then."""
    keys = safetensors_keys(path)
    if not keys:
        return None
    return next((family for family, marker in _MARKERS if marker in keys), None)
