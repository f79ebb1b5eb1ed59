"""The source model as Forge runs it: conditioning before sampling, and one batched evaluation per step.

Variants are the source base (variant 0) and, for each adaptation group g, the adapted source (variant g + 1): the
base engine or a fine-tuned checkpoint's engine, with or without that group's LoRAs, and with the generation's
prompts or the group's adapted prompt. Every variant that runs on one engine goes through Forge's own
``calc_cond_uncond_batch`` in a single call: their conditionings are concatenated along the batch and the
functional LoRA patch adds each group's terms to its own rows (Forge merges LoRA weights in place and shares them
between clones, so its patcher cannot give base and adapted rows from one copy of the weights).

A group's ControlNet units (:mod:`.control`) and IP-Adapter units (:mod:`.ipadapter`, :mod:`.ip_rows`) run on its
adapted rows only, inside that same call.

Rows are handed back to the core as ``[cond_i | uncond_i]`` per image, where ``cond_i`` already is Forge's
AND-weighted average; Forge's edit strength (the sum of AND weights) is folded into it so that the core's plain
combine ``uncond + scale · (cond − uncond)`` equals Forge's own.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...args import DeltaSettings
from ...errors import DeltaError
from ...lora import DeltaPatch, LoraUse, build_patch
from ...resolution import source_pixels
from ..common import credits as credits_mod
from ..common.prompts import append_to_prompt
from . import control as control_mod
from . import ip_rows, isolation, loras
from . import ipadapter as ip_mod
from . import models as forge_models
from .models import PrivateEngine

# The text encoders a LoRA's text-encoder part maps to, per family (keys of Forge's JointTextEncoder).
_TEXT_ENCODERS = {"sd1": {"te": "clip_l"}, "sd2": {"te": "clip_h"}, "sdxl": {"te1": "clip_l", "te2": "clip_g"},
                  "flux": {"te1": "clip_l", "t5": "t5xxl"}}


@dataclass(eq=False)
class Slot:
    """One private engine the source runs on, with the LoRA groups evaluated on it."""

    entry: PrivateEngine
    lora_groups: list[tuple[LoraUse, ...]] = field(default_factory=list)
    patch: DeltaPatch | None = None
    units: list[control_mod.LoadedUnit] = field(default_factory=list)  # ControlNet units of its variants
    control: Any = None  # the head of their chain (Forge's previous_controlnet links)
    images: list[ip_mod.GroupPatches] = field(default_factory=list)  # IP-Adapter patches of its variants' groups


@dataclass(frozen=True)
class Variant:
    slot: int
    group: int | None  # the LoRA group in that slot's patch
    prompt: str  # the adapted prompt, '' for the generation's own
    units: int | None = None  # the adaptation group whose ControlNet units run on its rows
    images: int | None = None  # the adaptation group whose IP-Adapter units run on its rows


@dataclass
class VariantConds:
    cond: Any  # prompt_parser.MulticondLearnedConditioning
    uncond: Any  # list[list[ScheduledPromptConditioning]]


class ForgeSource:
    """The core's ``SourceModel`` for Forge; ``encode`` before each sampling pass, then called per model call."""

    def __init__(self, slots: list[Slot], variants: list[Variant], fold_strength: bool) -> None:
        self.slots = slots
        self.variants = variants
        self.fold_strength = fold_strength  # cfg mode: fold Forge's edit strength into the cond row
        self.conds: dict[Variant, VariantConds] = {}
        self.batch = 0
        self.denoiser: Any = None  # the sampler's CFG denoiser: its step indexes the prompt schedules
        self.cond_scale = 1.0  # the target's effective scale for this call, captured by a conditioning modifier
        self.skip_uncond = False  # Forge skipped the target's uncond (CFG 1): skip the source's too
        self.calls = 0

    @property
    def base(self) -> PrivateEngine:
        return self.slots[0].entry

    def patchers(self) -> list[Any]:
        """What Forge's memory manager must load beside the target: the engines' UNets and the units' ControlNets."""
        nets = list({id(u.cnet.control_model_wrapped): u.cnet.control_model_wrapped for u in self.units()}.values())
        return [s.entry.unet for s in self.slots] + nets

    def units(self) -> list[control_mod.LoadedUnit]:
        return [u for s in self.slots for u in s.units]

    def begin_pass(self, p: Any) -> None:
        """Set the ControlNet units up for the pass about to run (hint size, hires weights, the source's sigmas)."""
        for s in self.slots:
            if s.units:
                control_mod.begin_pass(s.units, s.control, s.entry.unet.model, p, s.entry.family == "sdxl")

    def release_units(self) -> None:
        for s in self.slots:
            for u in s.units:
                u.release()
            for g in s.images:
                g.release()
            s.units, s.control, s.images = [], None, []

    def image_prompts(self) -> list[ip_mod.GroupPatches]:
        return [g for s in self.slots for g in s.images]

    def lora_summary(self) -> str:
        """Per LoRA file, how many of its keys found a layer (a low count means the wrong family or format)."""
        reports = [r for s in self.slots if s.patch is not None for group in s.patch.reports for r in group]
        return ", ".join(f"{r.file} {r.keys_matched}/{r.keys_total} keys" for r in reports)

    def attach(self) -> None:
        for s in self.slots:
            if s.patch is not None:
                s.patch.attach()

    def detach(self) -> None:
        for s in self.slots:
            if s.patch is not None:
                s.patch.detach()

    # -- before sampling -----------------------------------------------------------------------------------------

    def encode(self, p: Any, resolution: str) -> None:
        """Text conditioning of every variant for the pass about to run, as ``p.setup_conds`` builds the target's,
        at the size the source runs at (``resolution``: the setting ``source_resolution``)."""
        from modules import devices, prompt_parser, shared

        hr = bool(getattr(p, "is_hr_pass", False))
        prompts = list(p.hr_prompts if hr else p.prompts)
        negatives = list(p.hr_negative_prompts if hr else p.negative_prompts)
        size = (int(p.hr_upscale_to_x), int(p.hr_upscale_to_y)) if hr else (int(p.width), int(p.height))
        width, height = source_pixels(resolution, size, self.base.native_px)
        distilled = getattr(p, "hr_distilled_cfg" if hr else "distilled_cfg_scale", None)
        steps, hires_steps = _schedule_steps(p, hr)
        scheduling = _scheduling_args(prompt_parser, shared.opts)
        negs = prompt_parser.SdConditioning(negatives, width=width, height=height, is_negative_prompt=True,
                                            distilled_cfg_scale=distilled)
        self.conds = {}
        self.batch = len(prompts)
        for v in dict.fromkeys(self.variants):
            slot = self.slots[v.slot]
            engine = slot.entry.engine
            texts = prompt_parser.SdConditioning([append_to_prompt(t, v.prompt) for t in prompts] if v.prompt
                                                 else prompts, width=width, height=height,
                                                 distilled_cfg_scale=distilled)
            plan = contextlib.nullcontext() if v.group is None else slot.patch.rows([(slice(None), v.group)])
            # the source's "Emphasis"/"TI" must not reach the target's infotext through the host's global dict
            with torch.inference_mode(), devices.autocast(), plan, isolation.infotext_params_kept():
                engine.set_clip_skip(int(shared.opts.CLIP_stop_at_last_layers))
                cond = prompt_parser.get_multicond_learned_conditioning(engine, texts, steps, hires_steps,
                                                                        *scheduling)
                uncond = prompt_parser.get_learned_conditioning(engine, negs, steps, hires_steps, *scheduling)
            self.conds[v] = VariantConds(cond, uncond)

    def extra_memory(self, shape: Sequence[int], target_unet: Any) -> int:
        """Bytes to reserve beyond the target's own activations: the source runs after the target, on more rows."""
        b, c, h, w = shape
        target = target_unet.memory_required([2 * b, c, h, w])
        return int(max(self.activations(shape) - target, 0)) + self.patch_bytes()

    def activations(self, shape: Sequence[int]) -> int:
        """Bytes of the largest source forward: all the variants on one engine, cond and uncond rows, and its
        ControlNet, the UNet's encoder half run on its variants' rows (Forge counts only its weights)."""
        b, c, h, w = shape
        activations = max(s.entry.unet.memory_required([2 * b * sum(v.slot == i for v in self.variants), c, h, w])
                          for i, s in enumerate(self.slots))
        control = max((s.entry.unet.memory_required([2 * b * sum(v.slot == i and v.units is not None
                                                                 for v in self.variants), c, h, w]) // 2
                       for i, s in enumerate(self.slots) if s.units), default=0)
        return int(activations + control)

    def patch_bytes(self) -> int:
        """Tensors of ours on the source's device that Forge's memory manager does not know: the LoRA terms and
        the IP-Adapter modules and embeddings."""
        return sum(s.patch.nbytes() for s in self.slots if s.patch is not None) + \
            sum(g.nbytes() for g in self.image_prompts())

    # -- per model call -------------------------------------------------------------------------------------------

    @torch.inference_mode()  # as Forge samples; the conditionings are inference tensors
    def __call__(self, x: Tensor, level: Tensor, rows: Sequence[int], variants: Sequence[int]) -> Tensor:
        from modules import prompt_parser

        b = self.batch
        run_uncond = len(rows) > b and not self.skip_uncond
        step = int(getattr(self.denoiser, "step", 0))
        compiled = {}
        for k in dict.fromkeys(variants):
            compiled[k] = _compile(self.conds[self.variants[k]], step, run_uncond, prompt_parser)
        preds: dict[int, Tensor] = {}
        for slot_index in dict.fromkeys(self.variants[k].slot for k in variants):
            ks = [k for k in dict.fromkeys(variants) if self.variants[k].slot == slot_index]
            for batch in _mergeable_batches(ks, compiled):
                preds.update(self._run(self.slots[slot_index], batch, compiled, x[:b], level[:b], run_uncond))
        self.calls += 1
        out = torch.stack([preds[k] for k in variants])
        # a slice, not a list index: indexing a GPU tensor with a list copies the list there and waits for the GPU
        return out[:, : len(rows)] if list(rows) == list(range(len(rows))) else out[:, list(rows)]

    def _run(self, slot: Slot, ks: list[int], compiled: dict, x: Tensor, level: Tensor,
             run_uncond: bool) -> dict[int, Tensor]:
        from backend.sampling.sampling_function import calc_cond_uncond_batch

        b, n = x.shape[0], len(ks)
        unet = slot.entry.unet
        options = dict(unet.model_options)
        groups = [self.variants[k].group for k in ks]
        if slot.patch is not None and any(g is not None for g in groups):
            options["model_function_wrapper"] = _row_plan(slot.patch, groups, b)
        cond = _merge([compiled[k][0] for k in ks])
        uncond = _merge([compiled[k][1] for k in ks]) if run_uncond else None
        owners = _control_owners(slot, [self.variants[k].units for k in ks])
        images = _image_owners(slot, [self.variants[k].images for k in ks])
        if images:  # every attn2 replaced by a gate that gives each group's patch its own rows
            transformer_options = dict(options.get("transformer_options", {}))
            replace = dict(transformer_options.get("patches_replace", {}))
            replace["attn2"] = ip_rows.gated(images, b)
            transformer_options["patches_replace"] = replace
            options["transformer_options"] = transformer_options
        if owners:  # one control object on every entry keeps the call one batch; the wrapper picks the rows
            transformer_options = dict(options.get("transformer_options", {}))
            transformer_options["controlnet_model_function_wrapper"] = control_mod.adapted_rows(owners, b)
            options["transformer_options"] = transformer_options
            cond = [{**e, "control": slot.control} for e in cond]
            uncond = None if uncond is None else [{**e, "control": slot.control} for e in uncond]
        xin, sin = x.to(unet.load_device).repeat(n, 1, 1, 1), level.to(unet.load_device).repeat(n)
        c_all, u_all = calc_cond_uncond_batch(unet.model, cond, uncond, xin, sin, options)
        out = {}
        for i, k in enumerate(ks):  # left on the source's device: the guidance moves the delta once it is needed
            c, u = c_all[i * b:(i + 1) * b], u_all[i * b:(i + 1) * b]
            strength = sum(e.get("strength", 1) for e in compiled[k][0])
            if self.fold_strength and not math.isclose(strength, 1.0):
                c = u + (c - u) * strength
            out[k] = torch.cat([c, u])
        return out


# --- building ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a request needs, checked before anything loads: the listed source, each group's fine-tuned checkpoint
    (or None) and LoRA files (already read), and the pool keys of the checkpoints, the source's first."""

    source: Any
    tuned: tuple[Any, ...]
    loras: tuple[tuple[LoraUse, ...], ...]
    keys: tuple[tuple[str, str], ...]
    credits: credits_mod.Credits = field(default_factory=credits_mod.Credits)
    units: tuple[control_mod.UnitPlan, ...] = ()  # ControlNet units, checked, images decoded
    images: tuple[ip_mod.IPPlan, ...] = ()  # IP-Adapter units, checked, images decoded

    @property
    def control_keys(self) -> list[tuple[str, str]]:
        return control_mod.keys(self.units)

    @property
    def image_keys(self) -> list:
        return ip_mod.keys(self.images)


def plan(settings: DeltaSettings, p: Any) -> Plan:
    """Check every name, limit and file of a request, cheapest first; raises DeltaError. Nothing loads here but
    the LoRA files themselves, read whole, since only reading one proves it sound."""
    target = p.sd_model
    source = forge_models.resolve(settings.source)
    tuned = tuple(forge_models.resolve(g.checkpoint, "fine-tuned checkpoint") if g.checkpoint else None
                  for g in settings.groups)
    infos = {os.path.abspath(i.filename): i for i in (source, *tuned) if i is not None}
    forge_models.limits().check_request(len(infos), sum(len(g.loras) for g in settings.groups))
    entries = {r.name: loras.find(r.name) for g in settings.groups for r in g.loras}
    for info in infos.values():
        forge_models.check_file(info, "source checkpoint" if info is source else "fine-tuned checkpoint")
    forge_models.check_pairing(source, [i for i in infos.values() if i is not source], target)
    units = control_mod.plan_units(settings, p, source, forge_models.info_label(source))
    images = ip_mod.plan_units(settings, p, source, forge_models.info_label(source))
    read = {e.filename: loras.read(e.filename) for e in {id(e): e for e in entries.values()}.values()}
    files = tuple(tuple(LoraUse(read[entries[r.name].filename], r.te, r.unet) for r in g.loras)
                  for g in settings.groups)
    # hashed first (the WebUI's hash, cached by it): the pool keys a checkpoint by its hash once it is known
    checkpoints = {credits_mod.checkpoint_name(i): i for i in (source, *tuned) if i is not None}
    credits = credits_mod.gather(checkpoints, entries)
    keys = tuple(dict.fromkeys(forge_models.key_of(i) for i in (source, *tuned) if i is not None))
    return Plan(source, tuned, files, keys, credits, units, images)


def build(settings: DeltaSettings, request: Plan, p: Any) -> ForgeSource:
    """Load (or take from the pool) the engines and ControlNets of a checked plan, lay out the LoRA patches and
    preprocess the control images; raises DeltaError. The caller releases what a failed build loaded."""
    base = forge_models.acquire(request.source)
    _check_source(base, "source checkpoint")
    slots = [Slot(base)]
    variants = [Variant(0, None, "")]
    for g, info, uses in zip(settings.groups, request.tuned, request.loras, strict=True):
        index = 0
        if info is not None:
            entry = forge_models.acquire(info, "fine-tuned checkpoint")
            index = next((i for i, s in enumerate(slots) if s.entry is entry), len(slots))
            if index == len(slots):
                slots.append(Slot(entry))
            _check_source(entry, "fine-tuned checkpoint")
            _check_same_kind(entry, base)
        group = None
        if uses:
            slots[index].lora_groups.append(uses)
            group = len(slots[index].lora_groups) - 1
        this = len(variants) - 1
        has_units = any(u.group == this for u in request.units)
        has_images = any(u.group == this for u in request.images)
        variants.append(Variant(index, group, g.prompt, this if has_units else None, this if has_images else None))
    for slot in slots:
        forge_models.place(slot.entry)
        if slot.lora_groups:
            # Forge's operations are not plain Linear/Conv2d and its memory manager moves weights: no folding
            slot.patch = build_patch(_roots(slot.entry), slot.entry.family, slot.lora_groups, fold=False)
    fold = settings.cfg_mode == "cfg" or settings.mode == "base-first"
    source = ForgeSource(slots, variants, fold)
    try:
        if request.units:
            _load_units(source, request.units, p)
        if request.images:
            _load_images(source, request.images)
    except BaseException:
        source.release_units()  # now: the traceback keeps this frame, and with it the source, alive
        raise
    return source


def _load_units(source: ForgeSource, plans: tuple[control_mod.UnitPlan, ...], p: Any) -> None:
    """Each group's units onto the slot its adapted variant runs on, chained per slot."""
    for i, slot in enumerate(source.slots):
        mine = [u for u in plans if source.variants[u.group + 1].slot == i]
        if not mine:
            continue
        control_mod.check_built(mine, slot.entry.family, slot.entry.unet.model.diffusion_model, slot.entry.title)
        slot.units = control_mod.load_units(mine, p, slot.entry.unet.load_device)
        slot.control = control_mod.chain(slot.units)


def _load_images(source: ForgeSource, plans: tuple[ip_mod.IPPlan, ...]) -> None:
    """Each group's IP-Adapter units applied to the private UNet of the slot its adapted variant runs on."""
    for i, slot in enumerate(source.slots):
        mine = [u for u in plans if source.variants[u.group + 1].slot == i]
        if not mine:
            continue
        ip_mod.check_built(mine, slot.entry.unet.model.diffusion_model, slot.entry.title)
        for group in dict.fromkeys(u.group for u in mine):
            slot.images.append(ip_mod.load_group([u for u in mine if u.group == group], slot.entry.unet))


def _check_source(entry: PrivateEngine, what: str) -> None:
    if getattr(entry.engine, "is_inpaint", False):
        raise DeltaError(f"The {what} '{entry.title}' is an inpainting model; Delta Sampling needs a plain "
                         "text-to-image model as its source.")


def _check_same_kind(entry: PrivateEngine, base: PrivateEngine) -> None:
    a, b = entry.latent, base.latent
    if a != b or forge_models.convention(entry.engine) != forge_models.convention(base.engine):
        raise DeltaError(f"The fine-tuned checkpoint '{entry.title}' ({a.name}) is not of the source base "
                         f"'{base.title}' ({b.name}): a fine-tune must come from the source base's model family.")


def _roots(entry: PrivateEngine) -> dict[str, Any]:
    family = entry.family
    if family not in _TEXT_ENCODERS:
        raise DeltaError(f"LoRAs on a {forge_models.FAMILY_LABELS[family]} source are not supported yet; use an "
                         "SD1.x, SD2.x, SDXL or Flux source, or transfer a fine-tuned checkpoint or an adapted prompt.")
    encoders = entry.engine.forge_objects.clip.cond_stage_model
    roots = {part: getattr(encoders, name, None) for part, name in _TEXT_ENCODERS[family].items()}
    return {"unet": entry.unet.model.diffusion_model, **{k: v for k, v in roots.items() if v is not None}}


# --- per-call helpers ----------------------------------------------------------------------------------------------


def _schedule_steps(p: Any, hr: bool) -> tuple[int, int | None]:
    """The step counts the target's prompt schedules were built with (``setup_conds`` / ``calculate_hr_conds``)."""
    first = int(getattr(p, "firstpass_steps", 0) or p.steps)
    if not hr:
        return first, None
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
    steps = p.hr_second_pass_steps or p.steps
    return first, (config.total_steps(steps) if config else steps)


def _scheduling_args(prompt_parser: Any, opts: Any) -> tuple[bool, ...]:
    """``use_old_scheduling`` where the prompt parser takes it: Forge 2 and early Neo do, Neo 2.26 dropped the
    parameter and its option (modules/prompt_parser.py:163, 252)."""
    if "use_old_scheduling" not in inspect.signature(prompt_parser.get_learned_conditioning).parameters:
        return ()
    return (bool(getattr(opts, "use_old_scheduling", False)),)


def _compile(conds: VariantConds, step: int, with_uncond: bool, prompt_parser: Any) -> tuple[list, list | None]:
    from backend.sampling.condition import compile_conditions, compile_weighted_conditions

    composition, tensor = prompt_parser.reconstruct_multicond_batch(conds.cond, step)
    cond = compile_weighted_conditions(tensor, composition)
    uncond = compile_conditions(prompt_parser.reconstruct_cond_batch(conds.uncond, step)) if with_uncond else None
    return cond, uncond


def _mergeable_batches(ks: list[int], compiled: dict) -> list[list[int]]:
    """Variants whose conditionings concatenate (same AND layout and weights); the rest run on their own."""
    batches: list[list[int]] = []
    for k in ks:
        for batch in batches:
            if all(_lists_concat(compiled[batch[0]][i], compiled[k][i]) for i in (0, 1)):
                batch.append(k)
                break
        else:
            batches.append([k])
    return batches


def _lists_concat(a: list | None, b: list | None) -> bool:
    if a is None or b is None:
        return a is b
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.get("strength") != y.get("strength") or x["model_conds"].keys() != y["model_conds"].keys():
            return False
        if not all(c.can_concat(y["model_conds"][key]) for key, c in x["model_conds"].items()):
            return False
    return True


def _merge(lists: list[list | None]) -> list | None:
    """One conditioning list whose batch is the variants' batches one after another."""
    if lists[0] is None:
        return None
    if len(lists) == 1:
        return lists[0]
    merged = []
    for entries in zip(*lists, strict=True):
        first = entries[0]
        conds = {key: type(c)(c.concat([e["model_conds"][key] for e in entries[1:]]))
                 for key, c in first["model_conds"].items()}
        item = {"model_conds": conds}
        if "strength" in first:
            item["strength"] = first["strength"]
        merged.append(item)
    return merged


def _control_owners(slot: Slot, groups: list[int | None]) -> dict[int, list[int]]:
    """For each of the slot's ControlNets (by id), the positions of the call's variants whose rows it runs on."""
    owners: dict[int, list[int]] = {}
    for unit in slot.units:
        positions = [j for j, g in enumerate(groups) if g == unit.plan.group]
        if positions:
            owners[id(unit.cnet)] = positions
    return owners


def _image_owners(slot: Slot, groups: list[int | None]) -> list[tuple[dict, list[int]]]:
    """For each of the slot's image-prompt groups in the call, its ``attn2`` patches and its variants' positions."""
    owners = []
    for patches in slot.images:
        positions = [j for j, g in enumerate(groups) if g == patches.group]
        if positions:
            owners.append((patches.attn2, positions))
    return owners


def _row_plan(patch: DeltaPatch, groups: list[int | None], batch: int):
    """A model function wrapper giving each variant's rows its LoRA group, in every chunk Forge batches."""

    def wrapper(apply_model, args):
        inputs = args["input"]
        chunks = len(args["cond_or_uncond"])
        per = inputs.shape[0] // chunks
        plan = [(slice(c * per + k * batch, c * per + (k + 1) * batch), g)
                for c in range(chunks) for k, g in enumerate(groups) if g is not None]
        with patch.rows(plan):
            return apply_model(inputs, args["timestep"], **args["c"])

    return wrapper
