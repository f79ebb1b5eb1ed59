"""What the panel's unit dropdowns list in Forge 2 and Neo: the built-in ControlNet's models and the preprocessors
a unit on the source accepts (those that need no download and act on the image alone); the IP-Adapters of the same
model list and Forge's IP-Adapter encoders. Names only."""

from __future__ import annotations

import importlib
from typing import Any

from ..common.control import is_ipadapter

# Forge calls the pass-through preprocessor "None"; a unit's module is "none" everywhere.
SAFE_MODULES = ("None", "canny", "invert (from white bg & black line)", "blur_gaussian",
                "lineart_standard (from white bg & black line)", "scribble_xdog", "shuffle", "threshold",
                "tile_resample")
MISSING_CONTROLNET = ("ControlNet units need Forge's built-in ControlNet (extensions-builtin/sd_forge_controlnet), "
                      "which is not loaded: enable it in the Extensions tab and restart the WebUI.")
MISSING_IPADAPTER = ("IP-Adapter units need Forge's built-in ControlNet (extensions-builtin/sd_forge_controlnet), "
                     "which lists the IP-Adapters and is not loaded: enable it in the Extensions tab and restart the "
                     "WebUI.")


def _global_state() -> Any | None:
    try:
        return importlib.import_module("lib_controlnet.global_state")
    except ImportError:
        return None


def _controlnets() -> list[str]:
    gs = _global_state()
    if gs is None:
        return []
    if gs.get_all_controlnet_names() == ["None"]:
        gs.update_controlnet_filenames()  # the list is read when the ControlNet tab is built; not yet, perhaps
    return [n for n in gs.get_all_controlnet_names() if n != "None"]  # "None" names a dummy file


def _controlnets_only() -> list[str]:
    return [n for n in _controlnets() if not is_ipadapter(n)]


def _ipadapters() -> list[str]:
    return [n for n in _controlnets() if is_ipadapter(n)]


def _encoders() -> list[str]:
    """Forge's IP-Adapter preprocessors (``CLIP-ViT-H (IPAdapter)``); a unit also takes sd-webui-controlnet's names."""
    from .ipadapter import ENCODERS

    gs = _global_state()
    return [] if gs is None else [m for m in ENCODERS if _listed_preprocessor(gs, m)]


def _refresh_controlnets() -> None:
    gs = _global_state()
    if gs is not None:
        gs.update_controlnet_filenames()


def _preprocessors() -> list[str]:
    gs = _global_state()
    if gs is None:
        return []
    return ["none" if m == "None" else m for m in SAFE_MODULES if _listed_preprocessor(gs, m)]


def _listed_preprocessor(gs: Any, name: str) -> bool:
    try:  # Neo's get_preprocessor raises a KeyError for a name it does not list
        return gs.get_preprocessor(name) is not None
    except KeyError:
        return False


LISTS = {"controlnet": (_controlnets_only, _refresh_controlnets), "controlnet_module": (_preprocessors, lambda: None),
         "ipadapter": (_ipadapters, _refresh_controlnets), "ipadapter_module": (_encoders, lambda: None)}
NEEDS = {"controlnet": MISSING_CONTROLNET, "controlnet_module": MISSING_CONTROLNET,
         "ipadapter": MISSING_IPADAPTER, "ipadapter_module": MISSING_IPADAPTER}


def names(catalog: str) -> list[str]:
    return LISTS[catalog][0]()


def refresh(catalog: str) -> None:
    LISTS[catalog][1]()


def missing(catalog: str) -> str | None:
    return NEEDS[catalog] if _global_state() is None else None
