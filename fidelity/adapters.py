"""Trainable LoRA (kohya LoRA/LoCon) and LoHa (LyCORIS) adapters for the source UNet, saved in the real formats.

Training uses forward hooks that add each layer's low-rank term; saving writes kohya / LyCORIS safetensors with
``lora_unet_<flat ldm name>`` keys, so sampling loads them back through ``lib_delta.lora`` as a host would.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from . import models, world


@dataclass(frozen=True)
class AdapterSpec:
    kind: str  # "lora" (kohya LoRA, LoCon for k×k convs) or "loha" (LyCORIS LoHa)
    rank: int
    alpha: float
    seed: int

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def target_layers(unet: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and Conv2d of the UNet's blocks and output head, by the flat name LoRA files use
    (the time embedding stays untouched, as kohya's trainers leave it)."""
    out = {}
    for name, module in unet.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)) or name.startswith("time_embed"):
            continue
        out[name.replace(".", "_")] = module
    return out


class Adapter(nn.Module):
    """The trainable factors of one adapter over ``target_layers(unet)``; ``attach()`` hooks them in."""

    def __init__(self, unet: nn.Module, spec: AdapterSpec):
        super().__init__()
        self.spec = spec
        self.layers = target_layers(unet)
        self.factors = nn.ParameterDict()
        g = torch.Generator().manual_seed(spec.seed)
        device = next(unet.parameters()).device
        for flat, m in self.layers.items():
            out_dim, fan_in = m.weight.shape[0], m.weight[0].numel()
            r = spec.rank  # one rank everywhere: the file's alpha / dim must match the trained scale
            if spec.kind == "lora":
                # kohya: down ~ kaiming-uniform(a=√5), up = 0, so training starts at the base model
                bound = 1 / math.sqrt(fan_in)
                self.factors[f"{flat}__down"] = _param((torch.rand(r, fan_in, generator=g) * 2 - 1) * bound, device)
                self.factors[f"{flat}__up"] = _param(torch.zeros(out_dim, r), device)
            elif spec.kind == "loha":
                # LyCORIS: w1_b, w2_b ~ N(0, 1), w1_a ~ N(0, 0.1), w2_a = 0
                self.factors[f"{flat}__w1a"] = _param(torch.randn(out_dim, r, generator=g) * 0.1, device)
                self.factors[f"{flat}__w1b"] = _param(torch.randn(r, fan_in, generator=g), device)
                self.factors[f"{flat}__w2a"] = _param(torch.zeros(out_dim, r), device)
                self.factors[f"{flat}__w2b"] = _param(torch.randn(r, fan_in, generator=g), device)
            else:
                raise ValueError(f"unknown adapter kind {spec.kind!r}")
        self._handles: list = []

    def weight_delta(self, flat: str) -> Tensor:
        f, m = self.factors, self.layers[flat]
        if self.spec.kind == "lora":
            dw = f[f"{flat}__up"] @ f[f"{flat}__down"]
        else:
            dw = (f[f"{flat}__w1a"] @ f[f"{flat}__w1b"]) * (f[f"{flat}__w2a"] @ f[f"{flat}__w2b"])
        return (dw * self.spec.scale).reshape(m.weight.shape)

    def _term(self, flat: str, x: Tensor) -> Tensor:
        m = self.layers[flat]
        f = self.factors
        if self.spec.kind == "lora" and isinstance(m, nn.Linear):
            return F.linear(F.linear(x, f[f"{flat}__down"]), f[f"{flat}__up"] * self.spec.scale)
        # convolutions (LoCon, LoHa) and LoHa linears: one dense ΔW; rank-8 convolutions are slow on GPUs
        dw = self.weight_delta(flat)
        if isinstance(m, nn.Linear):
            return F.linear(x, dw)
        return F.conv2d(x, dw, None, m.stride, m.padding, m.dilation)

    def attach(self) -> Adapter:
        self.detach()
        for flat, m in self.layers.items():
            self._handles.append(m.register_forward_hook(
                lambda _m, args, out, flat=flat: out + self._term(flat, args[0]).to(out.dtype)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def l2(self) -> Tensor:
        """Mean squared weight change, a light regulariser that keeps the adaptation small."""
        return torch.stack([self.weight_delta(flat).pow(2).mean() for flat in self.layers]).mean()

    # -- files --------------------------------------------------------------------------------------------------

    def file_tensors(self, dtype: torch.dtype = torch.float16) -> dict[str, Tensor]:
        """Keys and shapes as kohya's sd-scripts (LoRA/LoCon) or LyCORIS (LoHa) write them for an SD1 UNet."""
        out: dict[str, Tensor] = {}
        for flat, m in self.layers.items():
            key = f"lora_unet_{flat}"
            f = self.factors
            conv = isinstance(m, nn.Conv2d)
            if self.spec.kind == "lora":
                down, up = f[f"{flat}__down"].detach(), f[f"{flat}__up"].detach()
                if conv:
                    down = down.reshape(down.shape[0], *m.weight.shape[1:])
                    up = up[:, :, None, None]
                out[f"{key}.lora_down.weight"] = down
                out[f"{key}.lora_up.weight"] = up
            else:
                for part in ("w1a", "w1b", "w2a", "w2b"):
                    out[f"{key}.hada_{part[:2]}_{part[2]}"] = f[f"{flat}__{part}"].detach()
            out[f"{key}.alpha"] = torch.tensor(float(self.spec.alpha))
        return {k: v.to("cpu", dtype).contiguous() for k, v in out.items()}

    def save(self, path: str | Path, name: str) -> Path:
        path = Path(path)
        meta = {"ss_base_model_version": "sd_v1", "ss_output_name": name,
                "ss_network_dim": str(self.spec.rank), "ss_network_alpha": str(self.spec.alpha)}
        if self.spec.kind == "lora":
            meta["ss_network_module"] = "networks.lora"
            meta["ss_network_args"] = json.dumps({"conv_dim": str(self.spec.rank),
                                                  "conv_alpha": str(self.spec.alpha)})
        else:
            meta["ss_network_module"] = "lycoris.kohya"
            meta["ss_network_args"] = json.dumps({"algo": "loha", "conv_dim": str(self.spec.rank),
                                                  "conv_alpha": str(self.spec.alpha)})
        save_file(self.file_tensors(), str(path), metadata=meta)
        return path


def _param(t: Tensor, device: torch.device) -> nn.Parameter:
    return nn.Parameter(t.to(device))


def train_adapter(model: models.DiffusionModel, spec: AdapterSpec, style: str, n_images: int,
                  cfg: models.TrainConfig, data_seed: int, size: int = world.SIZE) -> tuple[Adapter, dict]:
    """Fine-tune an adapter of the (frozen) model on a fixed, restyled set of ``n_images`` world images
    (horizontal flips as the only augmentation). Returns the adapter, detached, and the training report."""
    device = next(model.net.parameters()).device
    images, labels = world.batch(n_images, style, world.generator(data_seed, device), device, size)

    def data(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        idx = torch.randint(0, n_images, (n,), generator=g, device=device)
        x = images[idx]
        flip = torch.rand(n, generator=g, device=device) < 0.5
        return torch.where(flip[:, None, None, None], x.flip(-1), x), labels[idx]

    adapter = Adapter(model.net, spec)
    adapter.attach()
    try:
        probe = min(256, n_images)
        before = models.fixed_batch_loss(model, images[:probe], labels[:probe], seed=spec.seed + 19)
        report = models.train(model, list(adapter.parameters()), data, cfg, seed=spec.seed + 17)
        after = models.fixed_batch_loss(model, images[:probe], labels[:probe], seed=spec.seed + 19)
    finally:
        adapter.detach()
    report["fixed_batch_loss"] = {"before": before, "after": after}
    adapter.requires_grad_(False)
    report.update(kind=spec.kind, rank=spec.rank, alpha=spec.alpha, style=style, images=n_images,
                  params=sum(p.numel() for p in adapter.parameters()))
    return adapter, report
