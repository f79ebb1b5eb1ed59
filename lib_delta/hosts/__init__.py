"""Host adapters: how the core meets AUTOMATIC1111 or Forge. Chosen at run time, imported lazily.

Forge 2 and Forge Neo share one adapter (``hosts.forge``): Neo keeps Forge 2's API on the surface and changes what
lies beneath it, so the adapter asks :func:`is_neo` where the two differ.

Each adapter module exposes the same functions, called by ``scripts/delta_sampling.py``:
- ``register()``: per-step callbacks, settings section, X/Y/Z axes (idempotent);
- ``begin(p)``: a generation starts: close the previous one, whatever ended it (the run slot of
  ``hosts.common.runs``);
- ``start(p, settings)``: check every name, limit and file, then load the source and adaptations for this
  generation, raising ``DeltaError`` for anything a user can fix; a failed start releases what it loaded;
- ``fail(p, error)``: make ``error`` stop this generation with its message, a 422 for a ``DeltaError`` and a 500
  for anything else (the WebUI only logs exceptions raised inside script hooks);
- ``before_sampling(p, **kwargs)``: arm the per-step correction for one sampling pass (hires fix has two);
- ``after_sampling(p)``: the last batch is sampled, before the VAE decodes it: close the run early (its memory goes
  to the decode, and a decode that fails leaves nothing behind);
- ``finish(p, processed=None)``: disarm, restore every patched object, add the preview, free per-generation state.

Each adapter package also has a ``catalog`` module: the names its unit dropdowns list (:func:`catalog`).
"""

from __future__ import annotations

from types import ModuleType


def is_forge() -> bool:
    try:
        import backend  # noqa: F401  (Forge's own package)
    except ImportError:
        return False
    return True


def is_neo() -> bool:
    """Whether this Forge is Forge Neo: its ``modules_forge/forge_version.py`` says ``version = "neo"`` (Forge 2's
    says ``"2.0.1v1.10.1"``). Asked each time, never cached: the answer is one module lookup."""
    try:
        from modules_forge import forge_version
    except ImportError:
        return False
    return getattr(forge_version, "version", None) == "neo"


def current() -> ModuleType:
    if is_forge():
        from . import forge

        return forge
    from . import a1111

    return a1111


def register() -> None:
    current().register()


def catalog() -> ModuleType:
    """The host's lists for the panel's unit dropdowns (``names``, ``refresh``, ``missing`` by list name)."""
    if is_forge():
        from .forge import catalog as forge_catalog

        return forge_catalog
    from .a1111 import catalog as a1111_catalog

    return a1111_catalog
