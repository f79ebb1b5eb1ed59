"""modules.prompt_parser: prompt-editing schedules, AND composition and the per-step row reconstruction.

Scheduling understands un-nested ``[before:after:when]`` and ``[after:when]`` with the WebUI's step rules
(integers are steps, decimals fractions; the hires pass offsets both); the reconstruction functions follow the
WebUI's exactly, since the host adapter relies on their row order.
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

_EDIT = re.compile(r"\[([^\[\]:]*):(?:([^\[\]:]*):)?\s*([0-9]*\.?[0-9]+)\s*\]")


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0.0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps

    def when(s):
        v = float(s)
        if use_old_scheduling:
            v = v * steps if v < 1 else v
        elif "." in s:
            v = (v - flt_offset) * steps
        else:
            v = v - int_offset
        return min(steps, int(v))

    def get_schedule(prompt):
        edits = [(m, when(m.group(3))) for m in _EDIT.finditer(prompt)]
        points = sorted({steps, *(w for _, w in edits if w >= 1)})

        def at(step):
            out, last = [], 0
            for m, w in edits:
                before, after = (m.group(1), m.group(2)) if m.group(2) is not None else ("", m.group(1))
                out += [prompt[last:m.start()], before if step <= w else after]
                last = m.end()
            return "".join([*out, prompt[last:]])

        return [[t, at(t)] for t in points]

    cache = {p: get_schedule(p) for p in set(prompts)}
    return [cache[p] for p in prompts]


ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


class SdConditioning(list):
    """A list of prompts that also carries the image size (SDXL needs it) and whether they are negative."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res = []
    schedules = get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling)
    cache = {}
    for prompt, schedule in zip(prompts, schedules, strict=False):
        if prompt in cache:
            res.append(cache[prompt])
            continue
        texts = SdConditioning([x[1] for x in schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        cond_schedule = []
        for i, (end_at_step, _) in enumerate(schedule):
            cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
            cond_schedule.append(ScheduledPromptConditioning(end_at_step, cond))
        cache[prompt] = cond_schedule
        res.append(cond_schedule)
    return res


re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


def get_multicond_prompt_list(prompts):
    res_indexes = []
    prompt_indexes = {}
    prompt_flat_list = SdConditioning(prompts)
    prompt_flat_list.clear()
    for prompt in prompts:
        indexes = []
        for subprompt in re_AND.split(prompt):
            match = re_weight.search(subprompt)
            text, weight = match.groups() if match is not None else (subprompt, 1.0)
            weight = float(weight) if weight is not None else 1.0
            index = prompt_indexes.get(text)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, prompt_flat_list, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, prompt_flat_list, steps, hires_steps, use_old_scheduling)
    res = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes]
           for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=res)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def reconstruct_cond_batch(c, current_step):
    param = c[0][0].cond
    is_dict = isinstance(param, dict)
    if is_dict:
        res = {k: torch.zeros((len(c), *v.shape), device=v.device, dtype=v.dtype) for k, v in param.items()}
        res = DictWithShape(res, (len(c), *param["crossattn"].shape))
    else:
        res = torch.zeros((len(c), *param.shape), device=param.device, dtype=param.dtype)
    for i, cond_schedule in enumerate(c):
        target_index = 0
        for current, entry in enumerate(cond_schedule):
            if current_step <= entry.end_at_step:
                target_index = current
                break
        if is_dict:
            for k, v in cond_schedule[target_index].cond.items():
                res[k][i] = v
        else:
            res[i] = cond_schedule[target_index].cond
    return res


def stack_conds(tensors):
    token_count = max(x.shape[0] for x in tensors)
    for i in range(len(tensors)):
        if tensors[i].shape[0] != token_count:
            last_vector = tensors[i][-1:]
            tensors[i] = torch.vstack([tensors[i], last_vector.repeat([token_count - tensors[i].shape[0], 1])])
    return torch.stack(tensors)


def reconstruct_multicond_batch(c, current_step):
    param = c.batch[0][0].schedules[0].cond
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable_prompt in composable_prompts:
            target_index = 0
            for current, entry in enumerate(composable_prompt.schedules):
                if current_step <= entry.end_at_step:
                    target_index = current
                    break
            conds_for_batch.append((len(tensors), composable_prompt.weight))
            tensors.append(composable_prompt.schedules[target_index].cond)
        conds_list.append(conds_for_batch)
    if isinstance(tensors[0], dict):
        keys = list(tensors[0].keys())
        stacked = {k: stack_conds([x[k] for x in tensors]) for k in keys}
        stacked = DictWithShape(stacked, stacked["crossattn"].shape)
    else:
        stacked = stack_conds(tensors).to(device=param.device, dtype=param.dtype)
    return conds_list, stacked
