"""sd-webui-controlnet ``scripts/hook.py``: ``ControlParams`` and ``UnetHook``, which replaces the active UNet's
``forward`` with one that runs each unit's ControlNet on the whole batch and adds its residuals (balanced mode:
every residual × weight; canny/mlsd softened in the hires pass) to the middle output and to every skip before the
concat, gated per step by the ``cfg_denoiser`` callback's ``sampling_step / total_sampling_steps``."""

import torch
from modules import script_callbacks

from devkit.ldm_unet import timestep_embedding


def cond_mark(context, uncond):
    """1 for a cond row of ``context``, 0 for a row equal to one of the uncond rows."""
    marks = torch.ones(context.shape[0], 1, 1, 1, dtype=context.dtype, device=context.device)
    if uncond is not None and uncond.shape[1:] == context.shape[1:]:
        for i, row in enumerate(context):
            if any(torch.equal(row, u.to(row)) for u in uncond):
                marks[i] = 0
    return marks


class ControlParams:
    def __init__(self, control_model, preprocessor, hint_cond, weight, guidance_stopped, start_guidance_percent,
                 stop_guidance_percent, advanced_weighting, control_model_type, hr_hint_cond, global_average_pooling,
                 soft_injection, cfg_injection, **kwargs):
        self.control_model = control_model
        self.preprocessor = preprocessor
        self.hint_cond = hint_cond
        self.weight = weight
        self.guidance_stopped = guidance_stopped
        self.start_guidance_percent = start_guidance_percent
        self.stop_guidance_percent = stop_guidance_percent
        self.advanced_weighting = advanced_weighting
        self.control_model_type = control_model_type
        self.hr_hint_cond = hr_hint_cond
        self.global_average_pooling = global_average_pooling
        self.soft_injection = soft_injection
        self.cfg_injection = cfg_injection
        self.used_hint_cond = None


class UnetHook:
    def __init__(self, lowvram=False):
        self.model = None
        self.control_params = None

    def guidance_schedule_handler(self, x):
        self.model.current_sampling_percent = x.sampling_step / x.total_sampling_steps
        uncond = x.text_uncond["crossattn"] if isinstance(x.text_uncond, dict) else x.text_uncond
        self.uncond_rows = uncond
        if not self.control_params:
            return
        for param in self.control_params:
            current_sampling_percent = x.sampling_step / x.total_sampling_steps
            param.guidance_stopped = (current_sampling_percent < param.start_guidance_percent
                                      or current_sampling_percent > param.stop_guidance_percent)

    def hook(self, model, sd_ldm, control_params, process):
        self.model = model
        self.control_params = control_params
        outer = self

        def forward(x, timesteps=None, context=None, y=None, **kwargs):
            # the real hook reads the cond/uncond marks from the context; the stand-in finds the uncond rows
            outer.model.cond_mark = cond_mark(context, getattr(outer, "uncond_rows", None))
            total = None
            for param in outer.control_params:
                if param.guidance_stopped:
                    continue
                param.used_hint_cond = param.hint_cond
                in_hires = False
                if param.hr_hint_cond is not None:
                    h = x.shape[2] * 8
                    if abs(h - param.hint_cond.shape[2]) >= abs(h - param.hr_hint_cond.shape[2]) and \
                            param.hr_hint_cond.shape != param.hint_cond.shape:
                        param.used_hint_cond, in_hires = param.hr_hint_cond, True
                control = param.control_model(x=x, hint=param.used_hint_cond, timesteps=timesteps, context=context,
                                              y=y)
                control_scales = [param.weight] * 13
                if param.soft_injection or (in_hires and ("canny" in param.preprocessor["name"]
                                                          or "mlsd" in param.preprocessor["name"])):
                    control_scales = [param.weight * (0.825 ** float(12 - i)) for i in range(13)]
                control = [c * scale for c, scale in zip(control, control_scales, strict=False)]
                total = control if total is None else [a + b for a, b in zip(total, control, strict=True)]
            self_ = outer.model
            emb = self_.time_embed(timestep_embedding(timesteps, self_.model_channels).to(x.dtype))
            if self_.config.adm_in_channels is not None:
                emb = emb + self_.label_emb(y)
            hs, h = [], x
            for module in self_.input_blocks:
                h = module(h, emb, context)
                hs.append(h)
            h = self_.middle_block(h, emb, context)
            if total is not None:
                h = h + total.pop()
            for module in self_.output_blocks:
                skip = hs.pop()
                if total is not None:
                    skip = skip + total.pop()
                h = module(torch.cat([h, skip], dim=1), emb, context)
            return self_.out(h)

        model._original_forward = model.forward
        model.forward = forward
        script_callbacks.on_cfg_denoiser(self.guidance_schedule_handler, name="controlnet_guidance")

    def restore(self, model):
        if hasattr(model, "_original_forward"):
            model.forward = model._original_forward
            del model._original_forward
        self.control_params = None
        callbacks = script_callbacks.callback_map["callbacks_cfg_denoiser"]
        callbacks[:] = [c for c in callbacks if c.callback != self.guidance_schedule_handler]
