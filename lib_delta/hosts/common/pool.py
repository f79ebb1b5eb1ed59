"""The private models a host keeps: bounded, freed explicitly, and never more than a request needs.

A model dropped from a cache is not freed while anything still refers to it, and the WebUIs rarely run a full
garbage collection (AUTOMATIC1111's text-encoder hijack leaves a bound method on the model, a reference cycle). So
every model leaves through the host's ``release``, which frees its weights whatever still refers to the object.

Per generation: the models the request does not name are released before anything new loads (the old and the new
source are never resident together), and a start that fails releases what it loaded. Between generations at most
``kept`` models stay (the source first), where the ``cache`` policy says: "gpu" as they are, "ram" moved to system
memory, "free" none at all.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from ...errors import DeltaError

M = TypeVar("M")

SETTING_CACHE = "delta_sampling_cache"
SETTING_KEPT = "delta_sampling_kept_models"
SETTING_MAX_CHECKPOINTS = "delta_sampling_max_checkpoints"
SETTING_MAX_LORAS = "delta_sampling_max_loras"
CACHE_POLICIES = ("gpu", "ram", "free")


@dataclass(frozen=True)
class Limits:
    """What one request may load, and what stays loaded between generations (Settings > Delta Sampling)."""

    checkpoints: int = 3  # distinct checkpoints per request: the source and its fine-tunes
    loras: int = 16  # LoRA entries per request, all groups together
    kept: int = 1  # models kept between generations besides the active one
    cache: str = "ram"

    @classmethod
    def from_options(cls, opts: Any) -> Limits:
        d = cls()

        def number(key: str, default: int) -> int:
            try:
                return max(0, int(getattr(opts, key, default)))
            except (TypeError, ValueError, OverflowError):
                return default

        cache = str(getattr(opts, SETTING_CACHE, d.cache) or d.cache)
        return cls(number(SETTING_MAX_CHECKPOINTS, d.checkpoints), number(SETTING_MAX_LORAS, d.loras),
                   number(SETTING_KEPT, d.kept), cache if cache in CACHE_POLICIES else d.cache)

    def check_request(self, checkpoints: int, loras: int) -> None:
        if checkpoints > max(self.checkpoints, 1):
            raise DeltaError(f"This Delta Sampling request names {checkpoints} different checkpoints (the source and "
                             f"fine-tuned ones); at most {max(self.checkpoints, 1)} may load for one generation. "
                             "Use fewer, or raise 'Checkpoints per generation' in Settings > Delta Sampling.")
        if loras > self.loras:
            raise DeltaError(f"This Delta Sampling request lists {loras} LoRAs; at most {self.loras} are allowed for "
                             "one generation. Use fewer, or raise 'LoRAs per generation' in Settings > Delta "
                             "Sampling.")


class ModelPool(Generic[M]):
    """Loaded private models by key (file and hash)."""

    def __init__(self, release: Callable[[M], None], stash: Callable[[M], None]) -> None:
        self._release = release  # free the model's memory, whatever still refers to it
        self._stash = stash  # move it out of the way between generations ("ram")
        self._models: dict[Hashable, M] = {}
        self._fresh: list[Hashable] = []  # loaded by the generation being prepared

    def models(self) -> list[M]:
        return list(self._models.values())

    def keys(self) -> list[Hashable]:
        return list(self._models)

    def prepare(self, wanted: Sequence[Hashable]) -> None:
        """A generation starts: release every model it does not name, before anything new loads."""
        self._fresh = []
        for key in [k for k in self._models if k not in wanted]:
            self._drop(key)

    def get(self, key: Hashable, load: Callable[[], M]) -> M:
        model = self._models.get(key)
        if model is None:
            model = self._models[key] = load()
            self._fresh.append(key)
        return model

    def discard_fresh(self) -> None:
        """A start failed: release what it loaded."""
        for key in self._fresh:
            if key in self._models:
                self._drop(key)
        self._fresh = []

    def settle(self, in_use: Sequence[Hashable], limits: Limits) -> None:
        """A generation ended: keep at most ``limits.kept`` of the models it used (in its order), as the cache
        policy says, and release the rest."""
        self._fresh = []
        kept = [] if limits.cache == "free" else [k for k in dict.fromkeys(in_use) if k in self._models]
        kept = kept[:limits.kept]
        for key in [k for k in self._models if k not in kept]:
            self._drop(key)
        if limits.cache == "ram":
            for key in kept:
                self._stash(self._models[key])

    def clear(self) -> None:
        for key in list(self._models):
            self._drop(key)

    def _drop(self, key: Hashable) -> None:
        self._release(self._models.pop(key))


def free_weights(module: torch.nn.Module) -> None:
    """Give the memory of every parameter and buffer back now, whatever else still refers to these tensors.

    Each tensor keeps its identity and dtype but holds nothing (``Module.to("meta")`` would make new parameters
    and leave the old ones, with their memory, to whoever still holds them)."""
    with torch.no_grad():
        for t in (*module.parameters(), *module.buffers()):
            t.data = torch.empty(0, dtype=t.dtype, device=t.device)
