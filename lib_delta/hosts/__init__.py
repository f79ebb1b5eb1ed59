"""Host adapters: how the core meets AUTOMATIC1111 or Forge. Chosen at run time, imported lazily.

Each adapter module exposes the same functions, called by ``scripts/delta_sampling.py``:
- ``register()``: per-step callbacks, settings section, X/Y/Z axes (idempotent);
- ``start(p, settings)``: resolve and load the source, adaptations and conditioning for this generation, raising
  ``DeltaError`` for anything a user can fix;
- ``fail(p, error)``: make ``error`` stop this generation with its message (the WebUI only logs exceptions raised
  inside script hooks);
- ``before_sampling(p, **kwargs)``: arm the per-step correction for one sampling pass (hires fix has two);
- ``finish(p, processed=None)``: disarm, restore every patched object, add the preview, free per-generation state.
"""

from __future__ import annotations

from types import ModuleType


def is_forge() -> bool:
    try:
        import backend  # noqa: F401  (Forge's own package)
    except ImportError:
        return False
    return True


def current() -> ModuleType:
    if is_forge():
        from . import forge

        return forge
    from . import a1111

    return a1111


def register() -> None:
    current().register()
