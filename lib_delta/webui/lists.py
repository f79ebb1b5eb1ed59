"""The names the panel's unit dropdowns offer: the host's lists (:func:`lib_delta.hosts.catalog`), those made for
the source's family only where the setting asks for it.

A model's family is guessed from its name, by sd-webui-controlnet's rule (``sd15`` → SD1, ``sd21``/``2.1`` → SD2,
``xl`` → SDXL); a name that says nothing is always offered. The host checks the file itself when a unit runs, so
the filter only keeps the list short. The source's family comes from its file's header where it has one.
"""

from __future__ import annotations

import contextlib

from ..errors import DeltaError
from ..fields import NO_OBJECT, Listed, Setting


def name_family(name: str) -> str | None:
    """``SD1``, ``SD2``, ``SDXL`` or None, from a model's name (``StableDiffusionVersion.detect_from_model_name``)."""
    low = name.lower()
    if any(f"sd{v}" in low for v in ("14", "15", "16")):
        return "SD1"
    if "sd21" in low or "2.1" in low:
        return "SD2"
    if "xl" in low:
        return "SDXL"
    return None


def source_family(title: str | None) -> str | None:
    """The family of the listed checkpoint ``title``, from its header, else from its name; None when unknown."""
    from ..hosts.common import names
    from ..hosts.common.files import FAMILY_LABELS, checkpoint_family

    if not title or not str(title).strip():
        return None
    try:
        info = names.checkpoint(str(title), "source checkpoint", "the WebUI's")
    except (DeltaError, ImportError, AttributeError):
        return name_family(str(title))
    return FAMILY_LABELS.get(checkpoint_family(info.filename) or "") or name_family(str(title))


def of_family(listed: list[str], family: str | None) -> list[str]:
    """The names made for ``family``, and those whose name does not say (all of them for an unknown family)."""
    if family is None:
        return list(listed)
    return [n for n in listed if name_family(n) in (None, family)]


def choices(setting: Setting, source: str | None = None) -> list[str]:
    """What a listed setting's dropdown offers; "None" first where choosing nothing means no unit."""
    kind = setting.kind
    assert isinstance(kind, Listed)
    listed = _names(kind.catalog)
    if kind.family:
        listed = of_family(listed, source_family(source))
    return [NO_OBJECT, *listed] if setting.required else listed


def _names(name: str) -> list[str]:
    """The host's list ``name``; empty where the host's catalog has no such list (yet)."""
    from ..hosts import catalog

    try:
        return catalog().names(name)
    except KeyError:
        return []


def refresh(setting: Setting) -> None:
    from ..hosts import catalog

    assert isinstance(setting.kind, Listed)
    with contextlib.suppress(KeyError):  # a list the host's catalog does not have has nothing to read again
        catalog().refresh(setting.kind.catalog)


def missing(setting: Setting) -> str | None:
    """Why the host cannot offer this setting's list (a missing extension), or None."""
    from ..hosts import catalog

    assert isinstance(setting.kind, Listed)
    try:
        return catalog().missing(setting.kind.catalog)
    except KeyError:  # not a list this host names a requirement for: its dropdowns are empty, not explained
        return None
