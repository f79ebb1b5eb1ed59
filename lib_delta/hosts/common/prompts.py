"""Prompt text both hosts build the same way."""

from __future__ import annotations

from ...errors import DeltaError


def append_to_prompt(prompt: str, extra: str) -> str:
    """``prompt, extra``; with ``AND``, appended to every sub-prompt before its weight, so that the adapted
    prompt keeps the rows and weights of the target's (the delta is taken row by row)."""
    from modules import prompt_parser

    if prompt_parser.re_AND.search(extra):
        raise DeltaError(f"The adapted prompt {extra!r} contains AND; Delta Sampling appends it to each part of the "
                         "prompt, so it cannot add parts of its own. Remove the AND.")
    parts = []
    for sub in prompt_parser.re_AND.split(prompt):
        match = prompt_parser.re_weight.search(sub)
        text, weight = match.groups() if match is not None else (sub, None)
        text = f"{text.rstrip()}, {extra}" if text.strip() else extra
        parts.append(text if weight is None else f"{text} :{weight}")
    return " AND ".join(parts)
