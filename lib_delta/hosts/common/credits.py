"""Credit for the source's resources where image sites and browsers read them, without the WebUI applying them.

An image made with Delta Sampling used more than its target: the source checkpoint, a group's fine-tuned
checkpoint and its LoRAs. Sites that list an image's resources read them from the infotext keys the WebUI and the
Civitai extension write, so those keys carry the source's resources too:

- ``Lora hashes`` (``name: hash, ...``, written by the WebUI's LoRA support for the prompt's LoRAs): the source's
  LoRAs are added to the WebUI's entries, never replacing one. Pasting the infotext back only renames the prompt's
  own ``<lora:...>`` tags by these hashes (the Lora extension's ``infotext_pasted``); it adds no LoRA.
- ``Hashes`` (a JSON object, the Civitai extension's, ``"lora:name"`` / ``"model"`` keys): the source and
  fine-tuned checkpoints as ``"model:name"``, the LoRAs as ``"lora:name"``. ``"model"`` itself stays the target's
  (sites fill it from ``Model hash``, which is the target's too). Readers match ``Hashes: {...}`` unquoted, which
  the WebUI's infotext writer only leaves alone for an entry whose key is its own text (``k if k == v``), so it is
  written as one such entry; an existing ``Hashes`` value is merged in, its keys kept.

Nothing the WebUI pastes maps these keys to a setting: the checkpoint stays the one ``Model hash`` names.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

LORA_HASHES = "Lora hashes"
HASHES = "Hashes"
_HASHES_ENTRY = f"{HASHES}: "
_LORA_NAME = str.maketrans("", "", ":,")  # what the WebUI strips from names in "Lora hashes"


@dataclass(frozen=True)
class Credits:
    """The source's resources by name, with the short hashes the WebUI lists them under."""

    checkpoints: tuple[tuple[str, str], ...] = ()
    loras: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.checkpoints or self.loras)

    def hashes(self) -> dict[str, str]:
        """The ``Hashes`` JSON keys of these resources."""
        return {**{f"model:{n}": h for n, h in self.checkpoints}, **{f"lora:{n}": h for n, h in self.loras}}

    def into(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of infotext ``params`` with these credits merged in; the WebUI's entries win over ours."""
        out = dict(params)
        if not self:
            return out
        if self.loras:
            listed = parse_lora_hashes(out.get(LORA_HASHES))
            for name, shorthash in self.loras:
                listed.setdefault(name, shorthash)
            out[LORA_HASHES] = ", ".join(f"{n}: {h}" for n, h in listed.items())
        merged = {**self.hashes(), **pop_hashes(out)}
        entry = _HASHES_ENTRY + json.dumps(merged, ensure_ascii=False)
        out[entry] = entry
        return out


def parse_lora_hashes(text: Any) -> dict[str, str]:
    """``name: hash, ...`` as the WebUI writes it (and its Lora extension reads it back)."""
    out: dict[str, str] = {}
    for item in str(text or "").split(","):
        name, sep, shorthash = item.partition(":")
        if sep and name.strip() and shorthash.strip():
            out[name.strip()] = shorthash.strip()
    return out


def pop_hashes(params: MutableMapping[str, Any]) -> dict[str, str]:
    """Remove every ``Hashes`` entry from ``params`` (a plain key's dict or JSON, or a verbatim ``Hashes: {...}``
    entry, ours from an earlier pass among them) and return their keys merged, the first writer's winning."""
    merged: dict[str, str] = {}
    for key in [k for k in params if k == HASHES or (isinstance(k, str) and k.startswith(_HASHES_ENTRY))]:
        value = params.pop(key)
        text = key[len(_HASHES_ENTRY):] if key != HASHES else value
        found: Any = text
        if isinstance(text, str):
            with contextlib.suppress(ValueError):
                found = json.loads(text)
        if isinstance(found, Mapping):
            for k, v in found.items():
                merged.setdefault(str(k), str(v))
    return merged


def lora_name(name: str) -> str:
    return name.translate(_LORA_NAME)


def checkpoint_hash(info: Any) -> str | None:
    """A listed checkpoint's short hash as the WebUI writes ``Model hash``; None with hashing switched off."""
    shorthash = getattr(info, "shorthash", None)
    if not shorthash and hasattr(info, "calculate_shorthash"):
        with contextlib.suppress(Exception):
            shorthash = info.calculate_shorthash()
    return str(shorthash) if shorthash else None


def lora_hash(entry: Any) -> str | None:
    """A listed LoRA's short hash as the WebUI writes it in ``Lora hashes``."""
    if not getattr(entry, "shorthash", None) and hasattr(entry, "read_hash"):
        with contextlib.suppress(Exception):
            entry.read_hash()
    shorthash = getattr(entry, "shorthash", None)
    return str(shorthash) if shorthash else None


def gather(checkpoints: Mapping[str, Any], loras: Mapping[str, Any]) -> Credits:
    """Credits for listed checkpoints (by the name infotext shows) and LoRA entries (by the name the request used);
    a resource without a hash (hashing off) is left out."""
    models = tuple((name, h) for name, info in checkpoints.items() if (h := checkpoint_hash(info)))
    networks = tuple((lora_name(name), h) for name, entry in loras.items() if (h := lora_hash(entry)))
    return Credits(models, networks)


def checkpoint_name(info: Any) -> str:
    """How ``Hashes`` names a checkpoint: the WebUI's model name (the file name without folder or extension)."""
    return str(getattr(info, "model_name", None) or getattr(info, "name", None) or info)


__all__ = ["HASHES", "LORA_HASHES", "Credits", "checkpoint_name", "gather", "parse_lora_hashes", "pop_hashes"]
