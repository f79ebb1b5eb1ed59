"""Names a request gives, resolved exactly against what the WebUI lists: never a path, never a part of a name.

A near miss is refused with the closest listed names, so a typo never silently picks another model.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from ...errors import DeltaError


def closest(name: str, listed: Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` listed names nearest to ``name``: those containing it first, then the most similar."""
    names = sorted(set(listed), key=str.casefold)
    folded = name.strip().casefold()
    if not folded:
        return names[:n]
    containing = [c for c in names if folded in c.casefold()]
    by_fold = {c.casefold(): c for c in names}
    similar = [by_fold[c] for c in difflib.get_close_matches(folded, list(by_fold), n=n, cutoff=0.5)]
    return list(dict.fromkeys([*containing, *similar]))[:n]


def unknown(what: str, name: str, among: str, listed: Iterable[str], way_out: str) -> DeltaError:
    """The refusal of a name nothing is listed under, with the closest names that are."""
    listed = list(listed)
    near = closest(name, listed)
    if near:
        hint = f" Closest: {', '.join(repr(c) for c in near)}."
    elif listed:
        hint = f" There are {len(listed)}, none of them close."
    else:
        hint = " None is listed."
    return DeltaError(f"{what} '{name}' is not among {among}.{hint} {way_out}")


def checkpoint(name: str, what: str, webui: str) -> Any:
    """The listed checkpoint whose title, file name, model name, hash or alias is exactly ``name``."""
    from modules import sd_models

    key = name.strip()
    info = (sd_models.checkpoints_list.get(key) or sd_models.checkpoint_aliases.get(key)) if key else None
    if info is None:
        raise unknown(f"Delta Sampling {what}", key, f"{webui} checkpoints", sd_models.checkpoints_list,
                      "Use a name exactly as the checkpoint list shows it (after adding a file, refresh the list).")
    return info


def networks_module() -> Any:
    """The WebUI's built-in LoRA extension's ``networks`` module (A1111's Lora, Forge's sd_forge_lora), whose list
    the LoRA names resolve against."""
    import sys

    module = sys.modules.get("networks")
    if module is None:
        try:
            import networks as module  # on sys.path once the WebUI loaded the extension
        except ImportError:
            raise DeltaError("Delta Sampling needs the WebUI's built-in LoRA extension (Lora / sd_forge_lora) to find "
                             "LoRA files; it is disabled or missing: enable it in the Extensions tab.") from None
    return module


def lora(name: str, webui: str) -> Any:
    """The WebUI's entry (``NetworkOnDisk``) listed under exactly this name or alias, the list refreshed once for a
    file added since it was built; never a path from the request."""
    networks = networks_module()
    for attempt in range(2):
        entry = networks.available_network_aliases.get(name) or networks.available_networks.get(name)
        if entry is not None:
            return entry
        if attempt == 0:
            networks.list_available_networks()
    listed = {*networks.available_networks, *networks.available_network_aliases}
    raise unknown("LoRA", name, f"{webui} LoRAs", listed, "Use a name exactly as the LoRA list (or /sdapi/v1/loras) "
                  "shows it; after adding a file, refresh the list.")
