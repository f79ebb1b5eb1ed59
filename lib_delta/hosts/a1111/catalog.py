"""What the panel's unit dropdowns list in AUTOMATIC1111: sd-webui-controlnet's ControlNet models and the
preprocessors a unit on the source accepts. Names only; nothing is loaded."""

from __future__ import annotations

from ...errors import DeltaError
from . import control

MISSING_CONTROLNET = (f"ControlNet units need the {control.EXTENSION} extension, which is not installed or not "
                      "enabled: install it from the Extensions tab and restart the WebUI.")


def _controlnets() -> list[str]:
    gs = control.extension().global_state
    return [name for name, path in gs.cn_models.items() if path]  # "None" maps to no file


def _refresh_controlnets() -> None:
    control.extension().global_state.update_cn_models()


def _preprocessors() -> list[str]:
    pre = control.extension().preprocessor
    return [m for m in control.SAFE_MODULES if pre.get_preprocessor(m) is not None]


LISTS = {"controlnet": (_controlnets, _refresh_controlnets), "controlnet_module": (_preprocessors, lambda: None)}
NEEDS = {"controlnet": MISSING_CONTROLNET, "controlnet_module": MISSING_CONTROLNET}


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
