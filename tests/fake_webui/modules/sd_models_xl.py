"""modules.sd_models_xl: what ``extend_sdxl`` adds so an SDXL model looks like SD1 to the rest of the WebUI."""

import torch

from devkit.denoisers import scaled_linear_alphas_cumprod
from modules import devices, shared


def get_learned_conditioning(self, batch):
    width = getattr(batch, "width", 1024) or 1024
    height = getattr(batch, "height", 1024) or 1024
    is_negative_prompt = getattr(batch, "is_negative_prompt", False)
    args = dict(device=devices.device, dtype=devices.dtype)
    conds = {
        "txt": batch,
        "original_size_as_tuple": torch.tensor([height, width], **args).repeat(len(batch), 1),
        "crop_coords_top_left": torch.tensor([shared.opts.sdxl_crop_top, shared.opts.sdxl_crop_left],
                                             **args).repeat(len(batch), 1),
        "target_size_as_tuple": torch.tensor([height, width], **args).repeat(len(batch), 1),
    }
    force_zero = is_negative_prompt and all(x == "" for x in batch)
    return self.conditioner(conds, force_zero_embeddings=["txt"] if force_zero else [])


def apply_model(self, x, t, cond):
    if self.is_sdxl_inpaint:
        x = torch.cat([x, *cond["c_concat"]], dim=1)
    return self.model(x, t, cond)


def extend_sdxl(model):
    cls = type(model)
    cls.get_learned_conditioning = get_learned_conditioning
    cls.apply_model = apply_model
    model.model.conditioning_key = "crossattn"
    model.cond_stage_key = "txt"
    model.parameterization = "v" if getattr(model, "v_prediction", False) else "eps"
    model.alphas_cumprod = scaled_linear_alphas_cumprod().to(devices.device)
    model.conditioner.wrapped = torch.nn.Module()
