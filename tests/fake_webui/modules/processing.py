"""modules.processing: txt2img (with hires fix) and img2img (with a latent inpainting mask) in the WebUI's call
order: ``process`` → per batch (``before_process_batch``, tags stripped, ``process_batch``, conds, ``sample``,
``post_sample``, the VAE decode) → ``postprocess``. Images stay latents (``decode_latent_batch`` returns them as
they are, and is where a test makes the decode fail); an exception escapes ``process_images`` unhandled, so
``postprocess`` is not reached, as in the WebUI."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from modules import prompt_parser, sd_samplers, shared

opt_f = 8
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


def parse_prompts(prompts):
    """Strip ``<lora:name:w>`` tags; return the clean prompts and {network: [args, ...]}."""
    data: dict[str, list[list[str]]] = {}
    res = []
    for prompt in prompts:
        for m in _EXTRA_NETWORK.finditer(prompt):
            data.setdefault(m.group(1), []).append(m.group(2).split(":"))
        res.append(_EXTRA_NETWORK.sub("", prompt))
    return res, data


def latent_noise(seeds, shape):
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@dataclass(repr=False)
class StableDiffusionProcessing:
    prompt: str = ""
    negative_prompt: str = ""
    seed: int = 1
    steps: int = 4
    cfg_scale: float = 5.0
    width: int = 64
    height: int = 64
    sampler_name: str = "Euler"
    batch_size: int = 1
    n_iter: int = 1
    denoising_strength: float = 0.75
    s_min_uncond: float = 0.0
    refiner_checkpoint_info: Any = None
    refiner_switch_at: float | None = None
    scripts: Any = None
    script_args: tuple = ()
    is_api: bool = True
    extra_generation_params: dict = field(default_factory=dict)
    is_hr_pass: bool = field(default=False, init=False)
    sampler: Any = field(default=None, init=False)
    firstpass_steps: int = field(default=0, init=False)

    @property
    def sd_model(self):
        return shared.sd_model

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * n
        self.all_negative_prompts = list(self.negative_prompt) if isinstance(self.negative_prompt, list) \
            else [self.negative_prompt] * n
        self.all_seeds = [self.seed + i for i in range(n)]

    def init(self):
        pass

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negatives = prompt_parser.SdConditioning(self.negative_prompts, width=self.width, height=self.height,
                                                 is_negative_prompt=True)
        config = sd_samplers.find_sampler_config(self.sampler_name)
        total_steps = config.total_steps(self.steps)
        self.firstpass_steps = total_steps
        self.uc = prompt_parser.get_learned_conditioning(shared.sd_model, negatives, total_steps)
        self.c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, prompts, total_steps)

    def get_conds(self):
        return self.c, self.uc

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = parse_prompts(self.prompts)

    def image_conditioning(self, x):
        if getattr(shared.sd_model.model, "conditioning_key", None) in ("hybrid", "concat"):
            return torch.cat([torch.ones_like(x[:, :1]), torch.zeros_like(x)], dim=1)
        return x.new_zeros(x.shape[0], 5, 1, 1)


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_second_pass_steps: int = 0
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    hr_sampler_name: str | None = None

    def init(self):
        if self.enable_hr:
            self.hr_upscale_to_x = int(self.width * self.hr_scale)
            self.hr_upscale_to_y = int(self.height * self.hr_scale)

    def calculate_hr_conds(self):
        hr_prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x,
                                                  height=self.hr_upscale_to_y)
        hr_negatives = prompt_parser.SdConditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x,
                                                    height=self.hr_upscale_to_y, is_negative_prompt=True)
        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        total_steps = config.total_steps(self.hr_second_pass_steps or self.steps)
        self.hr_uc = prompt_parser.get_learned_conditioning(shared.sd_model, hr_negatives, self.firstpass_steps,
                                                            total_steps)
        self.hr_c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, hr_prompts,
                                                                     self.firstpass_steps, total_steps)

    def setup_conds(self):
        if self.is_hr_pass:
            self.calculate_hr_conds()
            return
        super().setup_conds()

    def get_conds(self):
        return (self.hr_c, self.hr_uc) if self.is_hr_pass else super().get_conds()

    def parse_extra_network_prompts(self):
        super().parse_extra_network_prompts()
        if self.enable_hr:
            i, b = self.iteration, self.batch_size
            hr = [self.hr_prompt or p for p in self.all_prompts[i * b:(i + 1) * b]]
            self.hr_prompts, _ = parse_prompts(hr)
            self.hr_negative_prompts = [self.hr_negative_prompt or n for n in self.negative_prompts]

    def sample(self, conditioning, unconditional_conditioning, seeds):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = latent_noise(seeds, (4, self.height // opt_f, self.width // opt_f))
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.image_conditioning(x))
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples, seeds)

    def sample_hr_pass(self, samples, seeds):
        self.is_hr_pass = True
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        samples = torch.nn.functional.interpolate(samples, size=(self.hr_upscale_to_y // opt_f,
                                                                 self.hr_upscale_to_x // opt_f), mode="nearest")
        noise = latent_noise([s + 1000 for s in seeds], samples.shape[1:])
        self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps,
                                              image_conditioning=self.image_conditioning(samples))
        self.sampler = None
        self.is_hr_pass = False
        return samples


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    init_latent_input: Any = None  # [C, h, w] or [B, C, h, w]: stands in for the VAE-encoded init image
    latent_mask: Any = None  # [1, h, w], 1 where the image is regenerated
    init_images: list = field(default_factory=list)  # PIL images (what the VAE would encode; here only read by
    # extensions that take the init image as their input, such as ControlNet)

    def init(self):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        lat = self.init_latent_input
        lat = lat[None] if lat.ndim == 3 else lat
        self.init_latent = lat.expand(self.batch_size, *lat.shape[1:]).clone()
        if self.latent_mask is not None:
            self.nmask = self.latent_mask.to(self.init_latent)
            self.mask = 1.0 - self.nmask
        if getattr(shared.sd_model.model, "conditioning_key", None) in ("hybrid", "concat"):
            keep = self.mask[None].expand(self.batch_size, 1, *lat.shape[2:]) if self.latent_mask is not None \
                else torch.zeros_like(self.init_latent[:, :1])
            self.image_cond = torch.cat([1.0 - keep, self.init_latent * keep], dim=1)
        else:
            self.image_cond = self.init_latent.new_zeros(self.batch_size, 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds):
        x = latent_noise(seeds, self.init_latent.shape[1:])
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=self.init_latent, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(self, self.init_latent, x, conditioning, unconditional_conditioning,
                                              image_conditioning=self.image_cond)
        if self.latent_mask is not None:
            samples = samples * self.nmask + self.init_latent * self.mask
        return samples


class Processed:
    def __init__(self, p, images, infotexts):
        self.images = images
        self.infotexts = infotexts
        self.extra_generation_params = p.extra_generation_params
        self.seed = p.all_seeds[0]


def quote(text):
    """infotext_utils.quote: JSON-quoted when it holds a separator."""
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def create_infotext(p, index):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.all_seeds[index],
              **p.extra_generation_params}
    # the WebUI's rule (processing.py create_infotext): an entry whose key is its value is written alone
    line = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    return f"{p.all_prompts[index]}\nNegative prompt: {p.all_negative_prompts[index]}\n{line}"


def decode_latent_batch(model, batch, target_device=None, check_for_nans=False):
    return batch  # no VAE here: images stay latents


def process_images(p):
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.before_process(p)
        p.scripts.process(p)
    p.init()
    images, infotexts = [], []
    with torch.no_grad():
        for n in range(p.n_iter):
            p.iteration = n
            sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts, p.seeds = p.all_prompts[sl], p.all_negative_prompts[sl], p.all_seeds[sl]
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
            p.parse_extra_network_prompts()
            _activate_extra_networks(p)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds)
            p.setup_conds()
            samples = p.sample(p.c, p.uc, p.seeds)
            if p.scripts is not None:
                from modules import scripts

                ps = scripts.PostSampleArgs(samples)
                p.scripts.post_sample(p, ps)
                samples = ps.samples
            samples = decode_latent_batch(p.sd_model, samples)
            for i in range(samples.shape[0]):
                images.append(samples[i].clone())
                infotexts.append(create_infotext(p, n * p.batch_size + i))
    processed = Processed(p, images, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    _deactivate_extra_networks(p)
    return processed


def _activate_extra_networks(p):
    networks = _lora_networks()
    if networks is not None:
        networks.activate(p, p.extra_network_data.get("lora", []))


def _deactivate_extra_networks(p):
    networks = _lora_networks()
    if networks is not None:
        networks.deactivate()


def _lora_networks():
    import sys

    return sys.modules.get("networks")
