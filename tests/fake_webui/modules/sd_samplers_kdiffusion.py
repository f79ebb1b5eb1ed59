"""modules.sd_samplers_kdiffusion: KDiffusionSampler (schedule from the model wrapper, or Karras)."""

import k_diffusion.external
import k_diffusion.sampling
import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.shared import opts

samplers_k_diffusion = [
    ("DPM++ 2M", "sample_dpmpp_2m", ["k_dpmpp_2m"], {"scheduler": "karras"}),
    ("Euler a", "sample_euler_ancestral", ["k_euler_a"], {"uses_ensd": True}),
    ("Euler", "sample_euler", ["k_euler"], {}),
    ("Heun", "sample_heun", ["k_heun"], {"second_order": True}),
]

samplers_data_k_diffusion = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: KDiffusionSampler(funcname, model),
                                   aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
]


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            denoiser_constructor = getattr(shared.sd_model, "create_denoiser", None)
            if denoiser_constructor is not None:
                self.model_wrap = denoiser_constructor()
            else:
                denoiser = k_diffusion.external.CompVisVDenoiser if shared.sd_model.parameterization == "v" \
                    else k_diffusion.external.CompVisDenoiser
                self.model_wrap = denoiser(shared.sd_model, quantize=shared.opts.enable_quantization)
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.options = options or {}
        self.func = getattr(k_diffusion.sampling, funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps):
        if self.config.options.get("scheduler") == "karras":
            m_min, m_max = self.model_wrap.sigmas[0].item(), self.model_wrap.sigmas[-1].item()
            sigmas = k_diffusion.sampling.get_sigmas_karras(n=steps, sigma_min=m_min, sigma_max=m_max)
        else:
            sigmas = self.model_wrap.get_sigmas(steps)
        return sigmas.cpu()

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        sigmas = self.get_sigmas(p, steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning,
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": self.s_min_uncond}
        return self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, sigma_sched,
                                                                 extra_args=self.sampler_extra_args, disable=False,
                                                                 callback=self.callback_state))

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        x = x * sigmas[0]
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning,
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": self.s_min_uncond}
        samples = self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, sigmas,
                                                                extra_args=self.sampler_extra_args, disable=False,
                                                                callback=self.callback_state))
        self.add_infotext(p)
        return samples


__all__ = ["KDiffusionSampler", "opts", "torch"]
