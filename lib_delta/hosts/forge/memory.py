"""Forge's list of loaded models, in the two dialects the host meets.

Forge 2 (backend/memory_management.py of dfdcbab): a ``LoadedModel`` holds its patcher in a plain attribute and
unloads with ``model_unload(avoid_model_moving=False)``. Forge Neo ports ComfyUI's manager (memory_management.py
:436-520): ``LoadedModel.model`` is a read-only property over a weak reference (None once the patcher is gone; when a
clone dies the entry turns to the clone's parent, ``_switch_parent``), and ``model_unload(memory_to_free=None,
unpatch_weights=True)`` detaches the patcher, moving its weights to the offload device only when it unpatches them.
"""

from __future__ import annotations

from typing import Any

from .. import is_neo


def entries() -> list[Any]:
    """Forge's own list (edited in place)."""
    from backend import memory_management

    return memory_management.current_loaded_models


def module_of(entry: Any) -> Any:
    """The module an entry keeps loaded (Neo: also when its patcher is gone)."""
    patcher = entry.model
    if patcher is not None:
        return getattr(patcher, "model", None)
    real = getattr(entry, "real_model", None)
    return real() if callable(real) else None


def unload(entry: Any, move_weights: bool) -> None:
    """Unload a popped entry: its weights go to the offload device when ``move_weights``, else they stay where they
    are (about to be emptied, or still the active model's)."""
    if entry.model is None:  # Neo: the patcher is gone already, nothing left to detach
        return
    if is_neo():
        entry.model_unload(unpatch_weights=move_weights)
    else:
        entry.model_unload(avoid_model_moving=not move_weights)


def forget_module(module: Any, move_weights: bool) -> None:
    """Take every entry that keeps ``module`` loaded (all our patchers' copies of it) out of Forge's list."""
    loaded = entries()
    for i in range(len(loaded) - 1, -1, -1):
        if module_of(loaded[i]) is module:
            unload(loaded.pop(i), move_weights)


def hand_over(entry: Any, own: Any) -> None:
    """Let an entry that holds a clone hold ``own``, a patcher of the same module, without moving a weight: what
    loading ``own`` would do (Forge 2: unload_model_clones, memory_management.py:552-559), or what Neo does itself
    when the clone dies (``LoadedModel._switch_parent``)."""
    if is_neo():
        # the clone's death must not move the entry again, to ``own``'s parent (the patcher without the target's
        # LoRAs, which Neo applies to a clone, networks.py:137-151)
        finalizer = getattr(entry, "_patcher_finalizer", None)
        if finalizer is not None:
            finalizer.detach()
        entry._set_model(own)
    else:
        entry.model.forge_unpatch_model()  # its object patches, if any, as Forge restores them unloading a clone
        entry.model = own


# --- a source on its own device -----------------------------------------------------------------------------------


def runs_beside(source_device: Any, target_device: Any) -> bool:
    """Whether the source computes on a GPU the target does not use (the ``cuda:N`` device setting). Its call of each
    step is then started before the target's forward (``DeltaGuidance.prefetch_combined``), and the two GPUs compute
    at the same time; on the target's device, or on the CPU, it runs after the target as before."""
    import torch

    source, target = torch.device(source_device), torch.device(target_device)
    return source.type == "cuda" and _resolved(source) != _resolved(target)


def _resolved(device: Any) -> Any:
    import torch

    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def load_beside(patchers: list[Any], activations: int) -> None:
    """Load a source that runs on its own device through Forge's memory manager, by itself: its weights and the
    memory its activations need are counted on that device alone (the manager frees memory per device, for the
    devices of the models it loads), and nothing of it against the target's GPU, where a source loaded as one of the
    target's extra models would reserve its activations too (sampling_function.py:366-386)."""
    from backend import memory_management

    memory_management.load_models_gpu(patchers, memory_required=activations)
