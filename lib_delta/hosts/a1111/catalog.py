"""What the panel's unit dropdowns list in AUTOMATIC1111: sd-webui-controlnet's ControlNet models and the
preprocessors a unit on the source accepts; its IP-Adapter models and their image encoders. The extension lists
ControlNets and IP-Adapters together; each dropdown offers its own kind. Names only; nothing is loaded."""

from __future__ import annotations

from ...errors import DeltaError
from . import control, ipadapter

MISSING_CONTROLNET = (f"ControlNet units need the {control.EXTENSION} extension, which is not installed or not "
                      "enabled: install it from the Extensions tab and restart the WebUI.")
MISSING_IPADAPTER = (f"IP-Adapter units need the {control.EXTENSION} extension, which is not installed or not "
                     "enabled: install it from the Extensions tab and restart the WebUI.")


def _models() -> list[str]:
    gs = control.extension().global_state
    return [name for name, path in gs.cn_models.items() if path]  # "None" maps to no file


def _controlnets() -> list[str]:
    return [name for name in _models() if not ipadapter.is_ipadapter(name)]


def _ipadapters() -> list[str]:
    return [name for name in _models() if ipadapter.is_ipadapter(name)]


def _refresh_models() -> None:
    control.extension().global_state.update_cn_models()


def _preprocessors() -> list[str]:
    pre = control.extension().preprocessor
    return [m for m in control.SAFE_MODULES if pre.get_preprocessor(m) is not None]


def _encoders() -> list[str]:
    """The IP-Adapter preprocessors by the label the ControlNet tab shows (``ip-adapter_clip_h``)."""
    pre = control.extension().preprocessor
    return [getattr(p, "label", name) for name in ipadapter.ENCODERS if (p := pre.get_preprocessor(name)) is not None]


LISTS = {"controlnet": (_controlnets, _refresh_models), "controlnet_module": (_preprocessors, lambda: None),
         "ipadapter": (_ipadapters, _refresh_models), "ipadapter_module": (_encoders, lambda: None)}
NEEDS = {"controlnet": MISSING_CONTROLNET, "controlnet_module": MISSING_CONTROLNET,
         "ipadapter": MISSING_IPADAPTER, "ipadapter_module": MISSING_IPADAPTER}


def names(catalog: str) -> list[str]:
    """The names of list ``catalog``; empty when the extension that lists them is missing."""
    try:
        return LISTS[catalog][0]()
    except DeltaError:
        return []


def refresh(catalog: str) -> None:
    try:
        LISTS[catalog][1]()
    except DeltaError:
        pass


def missing(catalog: str) -> str | None:
    """Why list ``catalog`` cannot be offered (its extension is missing), or None."""
    try:
        control.extension()
    except DeltaError:
        return NEEDS[catalog]
    return None
