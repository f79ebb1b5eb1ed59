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
