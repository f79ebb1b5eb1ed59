"""Forge's global state that building or using a private engine would change, kept as the active model left it.

- Forge Neo's ``forge_loader`` resets the global model-type flags of ``backend.args.dynamic_args`` (Kontext, Qwen
  edit, Nunchaku, Klein, Wan, PiD, Krea 2, the reference and concat latents, PiD's context handler) and infers them
  anew from the file it loads (backend/loader.py:885-892, backend/args.py:188-196): loading a private source would
  turn off the active model's. :func:`model_flags_kept` restores every one of them, lists and dicts in place (``reset``
  empties the very ``ref_latents`` list other code holds).
- Encoding a prompt records "Emphasis" and "TI" for the infotext in a global dict that the next conditioning of the
  target reads into the target's parameters (Neo: ``dynamic_args.last_extra_generation_params``, classic_engine.py
  :230, 259-262 and processing.py:459-466; Forge 2: ``classic_engine.last_extra_generation_params``).
  :func:`infotext_params_kept` gives the source's encoding a dict of its own.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any


@contextlib.contextmanager
def model_flags_kept() -> Iterator[None]:
    """Whatever runs inside leaves Neo's ``dynamic_args`` as it found them (Forge 2 has no such flags to keep)."""
    holder = _dynamic_args()
    if holder is None:
        yield
        return
    saved = {name: (value, _contents(value)) for name, value in _fields(holder)}
    try:
        yield
    finally:
        for name, (value, contents) in saved.items():
            if isinstance(value, list):
                value[:] = contents
            elif isinstance(value, dict):
                value.clear()
                value.update(contents)
            setattr(holder, name, value)


@contextlib.contextmanager
def infotext_params_kept() -> Iterator[None]:
    """Infotext parameters recorded inside go to a dict of their own; the host's dict is left as it was."""
    holder = _infotext_holder()
    if holder is None:
        yield
        return
    name = "last_extra_generation_params"
    original = getattr(holder, name)
    setattr(holder, name, {})
    try:
        yield
    finally:
        setattr(holder, name, original)


def _dynamic_args() -> Any:
    """Neo's ``dynamic_args``, a class whose attributes are the flags; None for Forge 2's (a dict its loader never
    writes) or outside Forge."""
    module = sys.modules.get("backend.args")
    holder = getattr(module, "dynamic_args", None)
    return holder if isinstance(holder, type) else None


def _infotext_holder() -> Any:
    holder = _dynamic_args()
    if holder is not None and hasattr(holder, "last_extra_generation_params"):
        return holder
    module = sys.modules.get("backend.text_processing.classic_engine")  # Forge 2
    return module if module is not None and hasattr(module, "last_extra_generation_params") else None


def _fields(holder: type) -> list[tuple[str, Any]]:
    """The flags: the public data attributes of the class and its bases (not methods, classmethods or properties)."""
    names = {n for klass in holder.__mro__[:-1] for n in vars(klass) if not n.startswith("_")}
    fields = []
    for name in sorted(names):
        raw = next(vars(k)[name] for k in holder.__mro__ if name in vars(k))
        if isinstance(raw, (classmethod, staticmethod, property)) or inspect.isfunction(raw):
            continue
        fields.append((name, getattr(holder, name)))
    return fields


def _contents(value: Any) -> Any:
    if isinstance(value, list):
        return list(value)
    if isinstance(value, dict):
        return dict(value)
    return None
