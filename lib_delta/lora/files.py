"""Reading LoRA files: safetensors always; pickled ``.pt``/``.ckpt`` only through the host's safe unpickler."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from safetensors import safe_open

from ..errors import DeltaError

PICKLE_EXTENSIONS = (".pt", ".pth", ".ckpt", ".bin")


@dataclass(eq=False)
class LoraFile:
    """The tensors of one LoRA/LyCORIS file, on the CPU, as stored."""

    name: str  # file name, for messages and reports
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None

    @classmethod
    def from_tensors(cls, name: str, tensors: Mapping[str, torch.Tensor],
                     metadata: Mapping[str, str] | None = None) -> LoraFile:
        """For a state dict the host has already read (and perhaps cached)."""
        return cls(name, _only_tensors(name, tensors), dict(metadata or {}))


def read_lora(path: str | os.PathLike, safe_load: Callable[[str], Mapping] | None = None) -> LoraFile:
    """Read a LoRA file. ``safe_load`` (the host's restricted unpickler) is required for pickled formats."""
    path = os.fspath(path)
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise DeltaError(f"LoRA file {name} was not found at {path}; check the name or refresh the LoRA list.")
    if path.lower().endswith(PICKLE_EXTENSIONS):
        if safe_load is None:
            raise DeltaError(
                f"{name} is a pickled PyTorch file, which Delta Sampling does not open on its own (pickles can run "
                f"code). Convert it to .safetensors (for example with kohya's or the WebUI's converters) and use "
                f"that file instead."
            )
        try:
            loaded = safe_load(path)
        except Exception as e:
            raise DeltaError(f"{name} could not be read ({type(e).__name__}: {e}); it may be truncated or "
                             f"corrupt: download it again, or convert it to .safetensors.") from e
        if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, Mapping):
            raise DeltaError(f"{name} holds a {type(loaded).__name__}, not a dictionary of LoRA tensors.")
        return LoraFile(name, _only_tensors(name, loaded), {}, path)
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:
        raise DeltaError(f"{name} is not a readable .safetensors file ({type(e).__name__}: {e}); it is probably "
                         f"truncated or corrupt: download it again.") from e
    return LoraFile(name, _only_tensors(name, tensors), metadata, path)


def _only_tensors(name: str, mapping: Mapping) -> dict[str, torch.Tensor]:
    tensors = {k: v for k, v in mapping.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    if not tensors:
        raise DeltaError(f"{name} holds no tensors; it is not a LoRA file.")
    return tensors
