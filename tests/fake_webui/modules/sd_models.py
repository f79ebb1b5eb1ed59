"""modules.sd_models: the checkpoint list and lookup, reading weights, and loading the *active* model."""

from __future__ import annotations

import hashlib
import importlib
import os
import re

import torch

from modules import (
    devices,
    script_callbacks,
    sd_disable_initialization,
    sd_hijack,
    sd_models_config,
    sd_models_xl,
    shared,
)

model_path = os.path.abspath("models/Stable-diffusion")
checkpoints_list: dict = {}
checkpoint_aliases: dict = {}
checkpoints_loaded: dict = {}

sd1_clip_weight = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
sd2_clip_weight = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
sdxl_clip_weight = "conditioner.embedders.1.model.ln_final.weight"
sdxl_refiner_clip_weight = "conditioner.embedders.0.model.ln_final.weight"


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        abspath = os.path.abspath(filename)
        name = abspath[len(model_path):].lstrip("/\\") if abspath.startswith(model_path) else os.path.basename(filename)
        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = None
        self.sha256 = None
        self.shorthash = None
        self.title = name
        self.short_title = self.name_for_extra
        self.ids = [self.model_name, self.title, name, self.name_for_extra]

    def register(self):
        checkpoints_list[self.title] = self
        for i in self.ids:
            checkpoint_aliases[i] = self

    def calculate_shorthash(self):
        if shared.cmd_opts.no_hashing:
            return None
        with open(self.filename, "rb") as f:
            self.sha256 = hashlib.sha256(f.read()).hexdigest()
        if self.shorthash != self.sha256[:10]:
            self.shorthash = self.sha256[:10]
            old = self.title
            self.title = f"{self.name} [{self.shorthash}]"
            self.short_title = f"{self.name_for_extra} [{self.shorthash}]"
            self.ids += [self.shorthash, self.sha256, self.title, self.short_title]
            checkpoints_list.pop(old, None)
            self.register()
        return self.shorthash


def list_models(path=None):
    global model_path
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    if path is not None:
        model_path = os.path.abspath(path)
    for root, _, files in os.walk(model_path):
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in (".safetensors", ".ckpt"):
                CheckpointInfo(os.path.join(root, f)).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string):
    if not search_string:
        return None
    info = checkpoint_aliases.get(search_string)
    if info is not None:
        return info
    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]
    stripped = re.sub(re_strip_checksum, "", search_string)
    found = sorted([i for i in checkpoints_list.values() if stripped in i.title], key=lambda x: len(x.title))
    return found[0] if found else None


def _safe_torch_load(filename, map_location=None):
    """The WebUI's safe unpickler: a file it refuses is reported and read as None."""
    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except Exception as e:
        print(f"Error verifying pickled file from {filename}: {e}")
        return None


def get_state_dict_from_checkpoint(pl_sd):
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)
    return pl_sd


def read_state_dict(checkpoint_file, print_global_state=False, map_location=None):
    import safetensors.torch

    if os.path.splitext(checkpoint_file)[1].lower() == ".safetensors":
        pl_sd = safetensors.torch.load_file(checkpoint_file, device=map_location or "cpu")
    else:
        pl_sd = _safe_torch_load(checkpoint_file, map_location=map_location)
    return get_state_dict_from_checkpoint(pl_sd)


def get_obj_from_str(string):
    module, cls = string.rsplit(".", 1)
    return getattr(importlib.import_module(module), cls)


def instantiate_from_config(config, state_dict=None):
    params = {**config.get("params", {})}
    if state_dict and "state_dict" in params and params["state_dict"] is None:
        params["state_dict"] = state_dict
    return get_obj_from_str(config["target"])(**params)


def repair_config(sd_config, state_dict=None):
    sd_config.model.setdefault("params", {}).setdefault("use_ema", False)


def set_model_type(model, state_dict):
    model.is_sd1 = model.is_sd2 = model.is_sdxl = model.is_ssd = model.is_sd3 = False
    if hasattr(model, "conditioner"):
        model.is_sdxl = True
    elif hasattr(model.cond_stage_model, "model"):
        model.is_sd2 = True
    else:
        model.is_sd1 = True


def set_model_fields(model):
    if not hasattr(model, "latent_channels"):
        model.latent_channels = 4


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []


model_data = SdModelData()


def load_model(checkpoint_info):
    """Load a checkpoint as the active model (weights on meta first, like the WebUI), hijack it, activate it."""
    from omegaconf import OmegaConf

    state_dict = read_state_dict(checkpoint_info.filename)
    config = sd_models_config.find_checkpoint_config(state_dict, checkpoint_info)
    sd_config = OmegaConf.load(config)
    with sd_disable_initialization.DisableInitialization(), sd_disable_initialization.InitializeOnMeta():
        model = instantiate_from_config(sd_config.model, state_dict)
    set_model_type(model, state_dict)
    set_model_fields(model)
    if model.is_sdxl:
        sd_models_xl.extend_sdxl(model)
    with sd_disable_initialization.LoadStateDictOnMeta(state_dict, device=devices.cpu):
        model.load_state_dict(state_dict, strict=False)
    model.is_sdxl_inpaint = model.is_sdxl and model.model.diffusion_model.input_blocks[0][0].weight.shape[1] == 9
    model.float()  # --no-half
    model.alphas_cumprod_original = model.alphas_cumprod
    model.sd_checkpoint_info = checkpoint_info
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_model_hash = checkpoint_info.calculate_shorthash()
    model.lowvram = False
    model.eval().requires_grad_(False)
    sd_hijack.model_hijack.hijack(model)
    model_data.sd_model = model
    shared.sd_model = model
    script_callbacks.model_loaded_callback(model)
    return model


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    info = info or shared.sd_model.sd_checkpoint_info
    if shared.sd_model is not None and shared.sd_model.sd_checkpoint_info is info and not forced_reload:
        return shared.sd_model
    return load_model(info)


class SkipWritingToConfig:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False
