"""sd-webui-controlnet ``scripts/controlnet_model_guess.py``: ``build_model_by_guess(state_dict, unet, path)``.

The real builder instantiates ``cldm.ControlNet`` from fixed full-size configs; this one builds the devkit's tiny
ControlNet of the family its keys say (the same rules: ``label_emb`` ⇒ SDXL, otherwise the context width), and
refuses what the real one would build as another model type."""

from enum import Enum
from typing import NamedTuple

import torch
from modules import devices

from devkit.controlnet import ControlNet
from devkit.ldm_unet import PRESETS


class ControlModelType(Enum):
    ControlNet = "ControlNet, Lvmin Zhang"
    T2I_Adapter = "T2I_Adapter, Chong Mou"
    ControlLoRA = "ControlLoRA, Wu Hecong"
    IPAdapter = "IPAdapter, Hu Ye"


class ControlModel(NamedTuple):
    model: torch.nn.Module
    type: ControlModelType


class PlugableControlModel(torch.nn.Module):
    def __init__(self, control_model):
        super().__init__()
        self.control_model = control_model

    def forward(self, *args, **kwargs):
        return self.control_model(*args, **kwargs)


def build_model_by_guess(state_dict, unet, model_path: str) -> ControlModel:
    if "lora_controlnet" in state_dict:
        raise NotImplementedError("the stand-in builds no Control-LoRA")
    if any(k.startswith("image_proj.") for k in state_dict) and any(k.startswith("ip_adapter.") for k in state_dict):
        nested = {"image_proj": {}, "ip_adapter": {}}
        for key, value in state_dict.items():
            part, _, rest = key.partition(".")
            nested[part][rest] = value
        state_dict = nested
    if "ip_adapter" in state_dict:
        import sys

        ip = sys.modules["scripts.ipadapter.plugable_ipadapter"]
        model = sys.modules["scripts.ipadapter.ipadapter_model"].IPAdapterModel.load(state_dict, model_path)
        return ControlModel(ip.PlugableIPAdapter(model), ControlModelType.IPAdapter)
    state_dict = {k.replace("control_model.", ""): v for k, v in state_dict.items()}
    if "input_hint_block.0.weight" not in state_dict:
        raise Exception("[ControlNet Error] Cannot recognize the ControlModel!")
    config = PRESETS["sdxl" if "label_emb.0.0.bias" in state_dict else "sd1"]["tiny"]
    context = int(state_dict["input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"].shape[1])
    from dataclasses import replace

    net = ControlNet(replace(config, context_dim=context),
                     hint_channels=int(state_dict["input_hint_block.0.weight"].shape[1]))
    net.load_state_dict(state_dict, strict=True)
    network = PlugableControlModel(net)
    network.to(devices.dtype_unet)
    return ControlModel(network, ControlModelType.ControlNet)
