"""The built-in Lora extension's ``networks`` module: the LoRA list, and ``<lora:name:te:unet>`` merged into the
*active* model's weights for a batch (backed up and restored afterwards), like the WebUI's default path.

Files hold kohya-style low-rank pairs (``lora_up.weight``, ``lora_down.weight``, ``alpha``) keyed
``lora_unet_<ldm layer>`` and ``lora_te_<Hugging Face CLIP layer>``.
"""

from __future__ import annotations

import hashlib
import os

import torch

available_networks: dict = {}
available_network_aliases: dict = {}
available_network_hash_lookup: dict = {}
forbidden_network_aliases: dict = {}
loaded_networks: list = []
_backups: list = []


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = name
        self.filename = filename
        self.alias = name
        self.hash = None
        self.shorthash = None

    def read_hash(self):
        with open(self.filename, "rb") as f:
            self.hash = hashlib.sha256(f.read()).hexdigest()
        self.shorthash = self.hash[:12]
        available_network_hash_lookup[self.shorthash] = self


_directory: list = []


def list_available_networks(directory=None):
    """The real one takes no argument (it reads the WebUI's folder); the tests name theirs once."""
    if directory is not None:
        _directory[:] = [directory]
    directory = _directory[0]
    available_networks.clear()
    available_network_aliases.clear()
    for f in sorted(os.listdir(directory)):
        name, ext = os.path.splitext(f)
        if ext in (".safetensors", ".pt", ".ckpt"):
            entry = NetworkOnDisk(name, os.path.join(directory, f))
            available_networks[name] = entry
            available_network_aliases[name] = entry


def _layers(model):
    layers = {"lora_unet_" + n.replace(".", "_"): m for n, m in model.model.diffusion_model.named_modules() if n}
    te = model.cond_stage_model.wrapped.transformer
    layers.update({"lora_te_" + n.replace(".", "_"): m for n, m in te.named_modules() if n})
    return layers


def _merge(model, filename, te_mult, unet_mult):
    import safetensors.torch

    sd = safetensors.torch.load_file(filename)
    layers = _layers(model)
    for key in {k.split(".", 1)[0] for k in sd}:
        module = layers[key]
        up, down = sd[f"{key}.lora_up.weight"].float(), sd[f"{key}.lora_down.weight"].float()
        alpha = float(sd.get(f"{key}.alpha", torch.tensor(down.shape[0])))
        mult = te_mult if key.startswith("lora_te_") else unet_mult
        change = (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape) * (alpha / down.shape[0]) * mult
        _backups.append((module.weight, module.weight.detach().clone()))
        module.weight.data += change.to(module.weight)


def activate(p, params_list):
    from modules import shared

    deactivate()
    for args in params_list:
        entry = available_network_aliases[args[0]]
        if not entry.shorthash:  # the real list reads it from the WebUI's hash cache
            entry.read_hash()
        te = float(args[1]) if len(args) > 1 else 1.0
        unet = float(args[2]) if len(args) > 2 else te
        _merge(shared.sd_model, entry.filename, te, unet)
        loaded_networks.append(entry)
    if loaded_networks:
        p.extra_generation_params["Lora hashes"] = ", ".join(f"{e.name}: {e.shorthash}" for e in loaded_networks)


def deactivate():
    while _backups:
        weight, saved = _backups.pop()
        weight.data.copy_(saved)
    loaded_networks.clear()


def write_lora(path, model, seed, rank=4, strength=0.5, te=True):
    """A random kohya LoRA for ``model``'s layout: every attention projection and the transformer's proj_in/out
    (and, with ``te``, the text encoder's attention), scaled to move the output clearly."""
    import safetensors.torch

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, module in _layers(model).items():
        wanted = key.endswith(("to_q", "to_k", "to_v", "to_out_0", "proj_in", "proj_out")) or \
            (te and key.endswith(("q_proj", "v_proj")))
        if not wanted or not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        w = module.weight
        out_f, in_f = w.shape[0], w[0].numel()
        down = torch.randn(rank, *w.shape[1:2], *([1, 1] if w.ndim == 4 else []), generator=gen) / in_f ** 0.5
        up = torch.randn(out_f, rank, *([1, 1] if w.ndim == 4 else []), generator=gen)
        scale = strength * w.float().norm() / (up.flatten(1) @ down.flatten(1)).norm()
        tensors[f"{key}.lora_down.weight"] = down.contiguous()
        tensors[f"{key}.lora_up.weight"] = (up * scale).contiguous()
        tensors[f"{key}.alpha"] = torch.tensor(float(rank))
    safetensors.torch.save_file(tensors, str(path))
    return path
