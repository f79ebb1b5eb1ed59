"""What both hosts share about the WebUI's lists: a name is looked up there, never taken as a path."""

from __future__ import annotations

from typing import Any

from ...errors import DeltaError


def checkpoint(name: str, what: str, webui: str) -> Any:
    """The listed checkpoint a name refers to (title, name, hash or a unique part of the title)."""
    from modules import sd_models

    info = sd_models.get_closet_checkpoint_match(name.strip()) if name.strip() else None
    if info is None:
        raise DeltaError(f"Delta Sampling {what} '{name}' is not among {webui} checkpoints: pick one from the "
                         "checkpoint list (after adding a file, refresh the list).")
    return info
