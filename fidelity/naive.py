"""The naive route: load the source's adapter file on the target itself, as a user does with an SD1.5 LoRA on an
SD1.5 fine-tune.

It exists only where the target shares the source's architecture (the same layer names and shapes); anywhere else
the file does not load, which ``naive_patch`` reports instead of a patch.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from lib_delta.lora import DeltaPatch, LoraUse, build_patch, read_lora

from .models import DiffusionModel
from .study import sample

NOT_LOADED = "n/a: the adapter does not load"


def naive_patch(target: DiffusionModel, path: Path, weight: float) -> DeltaPatch | str:
    """The adapter file merged into ``target`` at ``weight`` (a host's LoRA multiplier), or why it cannot be."""
    if target.spec.unet is None:
        return f"{NOT_LOADED} (a DiT has no UNet layers)"
    try:
        patch = build_patch({"unet": target.net}, "sd1", [[LoraUse(read_lora(path), te=weight)]])
    except Exception as e:  # a layer missing or of another shape: the route does not exist for this target
        return f"{NOT_LOADED} ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    rep = patch.reports[0][0]
    if rep.keys_matched < rep.keys_total:  # a host would apply the rest silently: not the adapter as trained
        return f"{NOT_LOADED} (only {rep.keys_matched} of its {rep.keys_total} keys match this architecture)"
    return patch


def naive_sample(target: DiffusionModel, patch: DeltaPatch, labels: Tensor, noise: Tensor, steps: int,
                 cfg_scale: float) -> Tensor:
    """The target with the adapter applied to every row: no source, no delta."""
    return sample(target, labels, noise, steps, cfg_scale, adapted=patch)
