"""Forge's WebUI side (``modules.*``, the LoRA extension's ``networks``) as far as the host adapter uses it.

The processing loop follows Forge's order: per batch the model's ``forge_objects`` are reset, conditioning is set
up, then ``p.sample`` creates the sampler and calls ``process_before_every_sampling``; the hires pass calls that hook
twice with a reset between (processing.py:1510-1522). Script hooks run inside ``try/except Exception`` that only
prints, like the WebUI's ScriptRunner (scripts.py:839-845), script by script. The denoiser reconstructs the prompt
schedules by its step counter, runs the conditioning modifiers and ``sampling_function_inner``. An interrupt is
Forge's: the denoiser raises ``InterruptedException`` at its next call (sd_samplers_cfg_denoiser.py:157-158), the
sampler returns its last latent (sd_samplers_common.py:279-290), the hires pass is skipped (processing.py:1431) and
the scripts' ``postprocess`` still runs. Prompts support AND with weights; no editing syntax.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import traceback
from collections import namedtuple
from types import SimpleNamespace

import torch

from devkit import sampling

from . import backend

# --- modules.shared, devices, script_callbacks, sd_samplers, sd_samplers_common --------------------------------------

opts = SimpleNamespace(CLIP_stop_at_last_layers=1, use_old_scheduling=False, delta_sampling_cache="ram",
                       img2img_fix_steps=False, skip_early_cond=0.0, s_min_uncond_all=False,
                       forge_additional_modules=[])  # full paths of the "VAE / Text Encoder" choice
state = SimpleNamespace(textinfo=None, interrupted=False)
unloaded_callbacks: list = []


def autocast():
    return contextlib.nullcontext()


def on_script_unloaded(fn):
    unloaded_callbacks.append(fn)


def find_sampler_config(name):
    return None


def setup_img2img_steps(p, steps=None):
    if opts.img2img_fix_steps or steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        return steps, requested - 1
    return p.steps, int(min(p.denoising_strength, 0.999) * p.steps)


# --- modules.sd_models ---------------------------------------------------------------------------------------------

checkpoints_list: dict[str, SimpleNamespace] = {}
checkpoint_aliases: dict[str, SimpleNamespace] = {}


def add_checkpoint(path: str) -> SimpleNamespace:
    """``CheckpointInfo(path).register()``: listed by title, aliased by each of its ids (no hash computed)."""
    name = os.path.basename(path)
    model_name = os.path.splitext(name)[0]
    info = SimpleNamespace(filename=path, name=name, name_for_extra=model_name, model_name=model_name, title=name,
                           sha256=None, shorthash=None)
    info.calculate_shorthash = lambda: _hash(info, 10)  # sets sha256, as Forge's CheckpointInfo does
    checkpoints_list[name] = info
    for alias in (model_name, name, model_name):
        checkpoint_aliases[alias] = info
    return info


def _hash(item, digits: int) -> str:
    with open(item.filename, "rb") as f:
        item.sha256 = hashlib.sha256(f.read()).hexdigest()
    item.shorthash = item.sha256[:digits]
    return item.shorthash


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    if search_string in checkpoints_list:
        return checkpoints_list[search_string]
    found = sorted((i for i in checkpoints_list.values() if search_string in i.title), key=lambda i: len(i.title))
    return found[0] if found else None


# --- networks (the built-in LoRA extension's listing) -------------------------------------------------------------

lora_dir = ""
available_networks: dict = {}
available_network_aliases: dict = {}


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    for name in sorted(os.listdir(lora_dir)) if lora_dir else []:
        stem, ext = os.path.splitext(name)
        if ext in (".safetensors", ".pt", ".ckpt"):
            entry = SimpleNamespace(name=stem, alias=stem, filename=os.path.join(lora_dir, name), shorthash=None)
            entry.read_hash = lambda entry=entry: _hash(entry, 12)
            available_networks[stem] = available_network_aliases[stem] = entry


# --- modules.prompt_parser ------------------------------------------------------------------------------------------

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None,
                 distilled_cfg_scale=None):
        super().__init__(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)
        self.distilled_cfg_scale = distilled_cfg_scale or getattr(copy_from, "distilled_cfg_scale", None)


def record_conds_params(p):
    """After each conditioning the WebUI moves the infotext its text encoder recorded ("Emphasis", "TI") into the
    target's parameters. Forge 2 keeps it in a module global of classic_engine, not modelled here (Neo's: neo.py)."""


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    cache = {}
    for prompt in dict.fromkeys(prompts):
        conds = model.get_learned_conditioning(SdConditioning([prompt], copy_from=prompts))
        cond = {k: v[0] for k, v in conds.items()} if isinstance(conds, dict) else conds[0]
        cache[prompt] = [ScheduledPromptConditioning(steps, cond)]
    return [cache[p] for p in prompts]


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules, self.weight = schedules, weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape, self.batch = shape, batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    flat, indexes = SdConditioning([], copy_from=prompts), []
    for prompt in prompts:
        row = []
        for sub in re_AND.split(prompt):
            text, weight = re_weight.search(sub).groups()
            if text not in flat:
                flat.append(text)
            row.append((flat.index(text), float(weight) if weight is not None else 1.0))
        indexes.append(row)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in row] for row in indexes]
    return MulticondLearnedConditioning((len(prompts),), batch)


class DictWithShape(dict):
    @property
    def shape(self):
        return self["crossattn"].shape

    def advanced_indexing(self, item):
        return DictWithShape({k: v[item] for k, v in self.items()})


def _pick(schedules, step):
    return next((e for e in schedules if step <= e.end_at_step), schedules[0]).cond


def _stack(conds):
    if isinstance(conds[0], dict):
        return DictWithShape({k: torch.stack([c[k] for c in conds]) for k in conds[0]})
    return torch.stack(conds)


def reconstruct_cond_batch(c, current_step):
    return _stack([_pick(s, current_step) for s in c])


def reconstruct_multicond_batch(c, current_step):
    tensors, conds_list = [], []
    for composable in c.batch:
        conds_list.append([])
        for part in composable:
            conds_list[-1].append((len(tensors), part.weight))
            tensors.append(_pick(part.schedules, current_step))
    return conds_list, _stack(tensors)


# --- modules.processing, the sampler and its CFG denoiser --------------------------------------------------------


class InterruptedException(BaseException):
    """modules/sd_samplers_common.py:150."""


class CFGDenoiser:
    def __init__(self, sampler, p):
        self.sampler, self.p, self.step, self.total_steps = sampler, p, 0, 0

    def __call__(self, x, sigma, cond, uncond, cond_scale):
        if state.interrupted:
            raise InterruptedException
        composition, cond = reconstruct_multicond_batch(cond, self.step)
        uncond = reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        if self._skips_cfg(sigma):
            cond_scale = 1.0
        unet = self.p.sd_model.forge_objects.unet
        model, options = unet.model, unet.model_options
        cond, uncond = backend.compile_weighted_conditions(cond, composition), backend.compile_conditions(uncond)
        if unet.controlnet_linked_list is not None:  # the user's ControlNets (sampling_function.py:352-357)
            for entry in [*cond, *(uncond or [])]:
                entry["control"] = unet.controlnet_linked_list
        seed = 0
        for modifier in options.get("conditioning_modifiers", []):
            model, x, sigma, uncond, cond, cond_scale, options, seed = modifier(model, x, sigma, uncond, cond,
                                                                                cond_scale, options, seed)
        denoised = backend.sampling_function_inner(model, x, sigma, uncond, cond, cond_scale, options, seed)
        self.step += 1
        self.p.sampler.last_latent = denoised
        return denoised

    def _skips_cfg(self, sigma) -> bool:
        """Skip-early-CFG and NGMS (sd_samplers_cfg_denoiser.py:190-197); Neo's checks are ``0 < step / total`` and
        ``0 < sigma[0] < s_min_uncond`` (its sd_samplers_cfg_denoiser.py:141-144)."""
        from lib_delta.hosts import is_neo

        neo, s_min = is_neo(), self.sampler.sampler_extra_args["s_min_uncond"]
        ratio = self.step / self.total_steps
        if opts.skip_early_cond > 0 and ratio <= opts.skip_early_cond and (ratio > 0 or not neo):
            return True
        return bool((self.step % 2 or opts.s_min_uncond_all) and s_min > 0 and sigma[0] < s_min
                    and (sigma[0] > 0 or not neo))


class KDiffusionSampler:
    def __init__(self, p):
        self.model_wrap_cfg = CFGDenoiser(self, p)
        self.sampler_extra_args = {"s_min_uncond": p.s_min_uncond}
        self.last_latent = None

    def get_sigmas(self, p, steps):
        predictor = p.sd_model.forge_objects.unet.model.predictor
        if predictor.flow:
            return sampling.get_sigmas_flow(steps)
        return predictor.denoiser.get_sigmas(steps)

    def _run(self, p, x, sigmas, c, uc, cfg):
        unet = p.sd_model.forge_objects.unet
        backend.sampling_prepare(unet, x)
        model = self.model_wrap_cfg
        model.total_steps = len(sigmas) - 1
        try:
            return sampling.sample_euler(lambda xx, s: model(xx, s, c, uc, cfg), x, sigmas)
        except InterruptedException:
            return self.last_latent
        finally:
            backend.sampling_cleanup(unet)

    def sample(self, p, x, c, uc, image_conditioning=None):
        sigmas = self.get_sigmas(p, p.steps)
        x = p.sd_model.forge_objects.unet.model.predictor.noise_scaling(sigmas[0], x, torch.zeros_like(x))
        return self._run(p, x, sigmas, c, uc, p.cfg_scale)

    def sample_img2img(self, p, x, noise, c, uc, steps=None, image_conditioning=None):
        steps, t_enc = setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)[steps - t_enc - 1:]
        xi = p.sd_model.forge_objects.unet.model.predictor.noise_scaling(sigmas[0], noise, x)
        return self._run(p, xi, sigmas, c, uc, p.cfg_scale)


class Processing:
    """txt2img with an optional hires pass at the same size (enough to call its hooks as Forge does)."""

    def __init__(self, sd_model, prompt, negative_prompt="", batch_size=2, steps=4, cfg_scale=5.0, width=64,
                 height=64, seed=3, enable_hr=False, hr_second_pass_steps=0, denoising_strength=0.6, hr_cfg=None,
                 distilled_cfg_scale=3.5, s_min_uncond=0.0):
        self.sd_model = sd_model
        self.s_min_uncond = s_min_uncond
        self.prompts = [prompt] * batch_size if isinstance(prompt, str) else list(prompt)
        self.negative_prompts = [negative_prompt] * len(self.prompts)
        self.hr_prompts, self.hr_negative_prompts = list(self.prompts), list(self.negative_prompts)
        self.steps, self.cfg_scale, self.width, self.height, self.seed = steps, cfg_scale, width, height, seed
        self.enable_hr, self.hr_second_pass_steps, self.denoising_strength = enable_hr, hr_second_pass_steps, \
            denoising_strength
        self.hr_cfg = cfg_scale if hr_cfg is None else hr_cfg
        self.hr_upscale_to_x, self.hr_upscale_to_y = width, height
        self.hr_scale, self.hr_resize_x, self.hr_resize_y = 1.0, 0, 0  # the hires pass runs at the same size
        self.distilled_cfg_scale = self.hr_distilled_cfg = distilled_cfg_scale
        self.sampler_name, self.hr_sampler_name = "Euler", None
        self.extra_generation_params: dict = {}
        self.is_hr_pass = False
        self.iteration = 0
        self.firstpass_steps = steps
        self.sampler = None
        self.scripts = None

    def setup_conds(self):
        negs = SdConditioning(self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True,
                              distilled_cfg_scale=self.distilled_cfg_scale)
        prompts = SdConditioning(self.prompts, width=self.width, height=self.height,
                                 distilled_cfg_scale=self.distilled_cfg_scale)
        self.uc = None if self.cfg_scale == 1 else get_learned_conditioning(self.sd_model, negs, self.steps)
        self.c = get_multicond_learned_conditioning(self.sd_model, prompts, self.steps)
        record_conds_params(self)

    def noise(self):
        channels = self.sd_model.forge_objects.vae.latent_channels
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(len(self.prompts), channels, self.height // 8, self.width // 8, generator=gen)

    def sample(self, conditioning, unconditional_conditioning):
        self.sampler = KDiffusionSampler(self)
        x = self.noise()
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr or state.interrupted:
            return samples
        self.is_hr_pass = True
        record_conds_params(self)  # the hires pass's own conditioning (calculate_hr_conds)
        self.sampler = KDiffusionSampler(self)
        noise = self.noise() * 0.5 + 0.1
        self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.c, uc=self.uc)
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.c, uc=self.uc)
        steps = self.hr_second_pass_steps or self.steps
        samples = self.sampler.sample_img2img(self, samples, noise, self.c, self.uc, steps=steps)
        self.is_hr_pass = False
        return samples


AlwaysVisible = object()


class Script:
    """modules.scripts.Script: hooks that do nothing unless a script overrides them."""


class ScriptRunner:
    """Calls scripts' hooks the way the WebUI does, ours first, then ``others`` (``(script, args)`` pairs): an
    ``Exception`` inside a hook is printed and swallowed, script by script; anything else goes through."""

    def __init__(self, script, args, others=()):
        self.scripts = [(script, args), *others]

    def _call(self, name, p, *extra, **kwargs):
        for script, args in self.scripts:
            hook = getattr(script, name, None)
            if hook is None:
                continue
            try:
                hook(p, *extra, *args, **kwargs)
            except Exception:
                traceback.print_exc()

    def process(self, p):
        self._call("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        self._call("process_before_every_sampling", p, **kwargs)

    def post_sample(self, p, ps):
        self._call("post_sample", p, ps)

    def postprocess(self, p, processed):
        self._call("postprocess", p, processed)


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    return batch  # no VAE here: images stay latents; a test makes the decode fail here


def process_images(p):
    state.interrupted = False  # shared.state.begin(), as the API and the UI call it before every job
    p.scripts.process(p)
    p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
    p.setup_conds()
    samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc)
    ps = SimpleNamespace(samples=samples)  # modules.scripts.PostSampleArgs
    p.scripts.post_sample(p, ps)
    samples = decode_latent_batch(p.sd_model, ps.samples)
    p.processed = SimpleNamespace(images=list(samples), infotexts=["infotext"] * len(samples))
    p.scripts.postprocess(p, p.processed)
    return samples

