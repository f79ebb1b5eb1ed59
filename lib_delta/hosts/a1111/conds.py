"""Text conditioning for the source model, computed once per sampling pass with the WebUI's own prompt parser.

The source encodes the very prompts the target encodes (already stripped of ``<lora:…>`` tags) with the same step
count, so prompt editing ``[a:b:N]`` and ``AND`` produce the same schedule and the same rows; per model call the
rows are rebuilt with ``reconstruct_*`` at the denoiser's own call counter, exactly as ``CFGDenoiser`` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...resolution import source_pixels
from ..common.prompts import append_to_prompt


@dataclass(frozen=True)
class PromptSet:
    """What the target encoded for one sampling pass."""

    prompts: tuple[str, ...]
    negatives: tuple[str, ...]
    width: int
    height: int
    steps: int
    hires_steps: int | None = None

    def with_extra(self, extra: str) -> PromptSet:
        """The adapted prompt of a group: its text appended to every prompt (see :func:`append_to_prompt`)."""
        if not extra.strip():
            return self
        prompts = tuple(append_to_prompt(t, extra) for t in self.prompts)
        return PromptSet(prompts, self.negatives, self.width, self.height, self.steps, self.hires_steps)


@dataclass
class SourceConds:
    """A model's conditioning for one pass: the multicond prompts and the negative prompts' schedules."""

    c: Any  # prompt_parser.MulticondLearnedConditioning
    uc: Any  # list of ScheduledPromptConditioning lists

    def at(self, step: int) -> tuple[list, Any, Any]:
        """``(conds_list, cond_rows, uncond_rows)`` at the denoiser's call counter ``step``."""
        from modules import prompt_parser

        conds_list, cond = prompt_parser.reconstruct_multicond_batch(self.c, step)
        uncond = prompt_parser.reconstruct_cond_batch(self.uc, step)
        return conds_list, cond, uncond


def at_source_size(ps: PromptSet, resolution: str, native_px: int | None) -> PromptSet:
    """The pass's prompts at the size the source runs at (``source_resolution: native`` behind a larger image):
    an SDXL source's size conditioning then says its own size, not the image's."""
    width, height = source_pixels(resolution, (ps.width, ps.height), native_px)
    return ps if (width, height) == (ps.width, ps.height) else dataclasses.replace(ps, width=width, height=height)


def prompts_for_pass(p: Any) -> PromptSet:
    """The prompts, size and steps of the pass that is about to sample (hires fix: its second pass)."""
    if getattr(p, "is_hr_pass", False):
        from modules import sd_samplers

        config = sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
        steps = getattr(p, "hr_second_pass_steps", 0) or p.steps
        total = config.total_steps(steps) if config else steps
        return PromptSet(tuple(p.hr_prompts), tuple(p.hr_negative_prompts), int(p.hr_upscale_to_x),
                         int(p.hr_upscale_to_y), int(p.firstpass_steps), int(total))
    return PromptSet(tuple(p.prompts), tuple(p.negative_prompts), int(p.width), int(p.height), int(p.firstpass_steps))


def encode(model: Any, ps: PromptSet) -> SourceConds:
    """Encode a pass's prompts with ``model``'s own (WebUI-wrapped) text encoders."""
    from modules import devices, prompt_parser, shared

    old = bool(getattr(shared.opts, "use_old_scheduling", False))
    prompts = prompt_parser.SdConditioning(list(ps.prompts), width=ps.width, height=ps.height)
    negatives = prompt_parser.SdConditioning(list(ps.negatives), width=ps.width, height=ps.height,
                                             is_negative_prompt=True)
    with torch.no_grad(), devices.autocast(), _hijack_notes_kept():
        c = prompt_parser.get_multicond_learned_conditioning(model, prompts, ps.steps, ps.hires_steps, old)
        uc = prompt_parser.get_learned_conditioning(model, negatives, ps.steps, ps.hires_steps, old)
    return SourceConds(c, uc)


@contextlib.contextmanager
def _hijack_notes_kept() -> Iterator[None]:
    """The text-encoder wrappers note warnings and infotext ("TI hashes", "Emphasis") on the shared hijack
    object; the source's encoding must not add to the target generation's notes."""
    from modules import sd_hijack

    h = sd_hijack.model_hijack
    comments = list(getattr(h, "comments", []))
    extra = dict(getattr(h, "extra_generation_params", {}))
    fixes = getattr(h, "fixes", None)
    try:
        yield
    finally:
        if hasattr(h, "comments"):
            h.comments[:] = comments
        if hasattr(h, "extra_generation_params"):
            h.extra_generation_params.clear()
            h.extra_generation_params.update(extra)
        h.fixes = fixes


def conds_list_of(c: Any) -> list[list[tuple[int, float]]]:
    """The ``conds_list`` that ``reconstruct_multicond_batch`` gives for ``c``, without stacking any tensor."""
    out, n = [], 0
    for composable in c.batch:
        row = []
        for prompt in composable:
            row.append((n, float(prompt.weight)))
            n += 1
        out.append(row)
    return out


def token_length(cond: Any) -> int:
    t = cond["crossattn"] if isinstance(cond, dict) else cond
    return int(t.shape[1])


def take_rows(cond: Any, index: list[int]) -> Any:
    if isinstance(cond, dict):
        return {k: v[index] for k, v in cond.items()}
    return cond[index]


def cat_rows(parts: list[Any]) -> Any:
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def move(cond: Any, device: torch.device) -> Any:
    if isinstance(cond, dict):
        return {k: v.to(device) for k, v in cond.items()}
    return cond.to(device)
