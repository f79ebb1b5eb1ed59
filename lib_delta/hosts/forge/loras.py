"""LoRA files in Forge: found by the exact name its LoRA list shows, read without Forge's loaders.

Forge's ``load_torch_file(path, safe_load=True)`` asks ``torch.load`` whether it takes ``weights_only``, but Forge
replaces ``torch.load`` at start-up with a wrapper that takes ``*args, **kwargs`` only (modules_forge/patch_basic.py
:27-56, 92), so it prints "loading unsafely" and unpickles with the plain unpickler (backend/utils.py:33-40): a
pickled LoRA's code would run. The wrapper also renames any file it fails to read to ``<file>.corrupted``. So
safetensors files are read through safetensors, and pickles only through the original ``torch.load``
(``torch.serialization.load``, which the wrapper leaves alone) with ``weights_only=True``.
"""

from __future__ import annotations

import inspect
import os
import pickle
from typing import Any

from ...errors import DeltaError
from ...lora import LoraFile, read_lora
from ...lora.files import PICKLE_EXTENSIONS
from ..common import names


def find(name: str) -> Any:
    """The entry (``NetworkOnDisk``) Forge lists under exactly this name or alias; never a path from the request."""
    return names.lora(name, "Forge's")


def read(path: str) -> LoraFile:
    if not path.lower().endswith(PICKLE_EXTENSIONS):
        return read_lora(path)
    loaded = _restricted_load(path)
    return read_lora(path, lambda _: loaded)


def _restricted_load(path: str) -> Any:
    import torch

    name = os.path.basename(path)
    load = torch.serialization.load  # the original torch.load
    if "weights_only" not in inspect.signature(load).parameters:
        raise DeltaError(f"The LoRA file '{name}' is a pickle, and this PyTorch cannot open pickles safely: convert it "
                         "to .safetensors, or use another LoRA.")
    try:
        return load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DeltaError(f"The LoRA file '{name}' holds objects other than tensors, and Delta Sampling does not "
                         "unpickle those (a pickle can run code): convert it to .safetensors, or use another "
                         "LoRA.") from None
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DeltaError(f"The LoRA file '{name}' cannot be read ({type(e).__name__}: {reason}); it may be truncated "
                         "or damaged: download it again, or convert it to .safetensors.") from e
