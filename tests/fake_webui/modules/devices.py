"""modules.devices: the CPU, float32 configuration (autocast is a no-op there, as in the WebUI)."""

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32
dtype_vae = torch.float32
dtype_unet = torch.float32
dtype_inference = torch.float32
unet_needs_upcast = False
fp8 = False


def autocast(disable=False):
    return contextlib.nullcontext()


def without_autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass


def get_optimal_device_name():
    return "cpu"
