"""modules.sd_models_config: a yaml beside the checkpoint, else a guess from the state dict's keys."""

import os

from modules import sd_models

config_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def guess_model_config_from_state_dict(sd, filename):
    if sd.get(sd_models.sdxl_clip_weight) is not None:
        return os.path.join(config_dir, "sd_xl_base.yaml")
    if sd.get(sd_models.sd2_clip_weight) is not None:
        return os.path.join(config_dir, "v2-inference.yaml")
    unet_in = sd.get("model.diffusion_model.input_blocks.0.0.weight")
    if unet_in is not None and unet_in.shape[1] == 9:
        return os.path.join(config_dir, "v1-inpainting-inference.yaml")
    if unet_in is not None and unet_in.shape[1] == 8:
        return os.path.join(config_dir, "instruct-pix2pix.yaml")
    return os.path.join(config_dir, "v1-inference.yaml")


def find_checkpoint_config(state_dict, info):
    beside = os.path.splitext(info.filename)[0] + ".yaml"
    if os.path.exists(beside):
        return beside
    return guess_model_config_from_state_dict(state_dict, info.filename)
