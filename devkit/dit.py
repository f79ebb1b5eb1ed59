"""A small DiT-style flow-matching transformer: a denoiser of a different kind from the ldm UNet.

Patchify, adaLN-Zero blocks (DiT naming: ``x_embedder``, ``t_embedder``, ``blocks.N.adaLN_modulation``,
``final_layer``) with cross-attention to the text (PixArt style: ``cross_attn.{q_linear,kv_linear,proj}``) and
an optional pooled vector added to the time embedding. Same call as the UNet: ``forward(x, timesteps, context, y)``;
as a flow model it predicts the velocity ``v = noise − x0`` and takes ``timesteps = 1000·σ``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from devkit.ldm_unet import timestep_embedding


@dataclass(frozen=True)
class DiTConfig:
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 64
    depth: int = 2
    num_heads: int = 2
    context_dim: int = 32
    adm_in_channels: int | None = 32  # pooled text vector; None to drop ``y_embedder``
    mlp_ratio: int = 4
    frequency_embedding_size: int = 256


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


def _sincos_2d(h: int, w: int, dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [h·w, dim], computed per grid so any latent size works."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32, device=device),
        torch.arange(w, dtype=torch.float32, device=device),
        indexing="ij",
    )
    parts = []
    for pos in (ys.flatten(), xs.flatten()):
        out = pos[:, None] * omega[None]
        parts += [out.sin(), out.cos()]
    return torch.cat(parts, dim=1)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q_linear(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv_linear(context).view(b, context.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, dim * mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        nn.init.zeros_(self.adaLN_modulation[1].weight)
        nn.init.zeros_(self.adaLN_modulation[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(self.norm2(x), context)
        return x + gate_mlp[:, None] * self.mlp(_modulate(self.norm3(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
        for p in (*self.linear.parameters(), *self.adaLN_modulation.parameters()):
            nn.init.zeros_(p)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(_modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, config: DiTConfig = DiTConfig()):
        super().__init__()
        cfg = self.config = config
        d = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = MLPEmbedder(cfg.frequency_embedding_size, d)
        if cfg.adm_in_channels:
            self.y_embedder = MLPEmbedder(cfg.adm_in_channels, d)
        self.context_embedder = nn.Linear(cfg.context_dim, d)
        self.blocks = nn.ModuleList(DiTBlock(d, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.in_channels)

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        cfg = self.config
        b, ch, h, w = x.shape
        p = cfg.patch_size
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not a multiple of the patch size {p}")
        tokens = self.x_embedder(x) + _sincos_2d(h // p, w // p, cfg.hidden_size, x.device).to(x.dtype)
        c = self.t_embedder(timestep_embedding(timesteps, cfg.frequency_embedding_size).to(x.dtype))
        if cfg.adm_in_channels:
            if y is None:
                raise ValueError("this DiT needs the pooled vector `y`")
            c = c + self.y_embedder(y)
        context = self.context_embedder(context)
        for block in self.blocks:
            tokens = block(tokens, c, context)
        out = self.final_layer(tokens, c)  # [b, (h/p)(w/p), p·p·ch]
        out = out.view(b, h // p, w // p, p, p, ch).permute(0, 5, 1, 3, 2, 4)
        return out.reshape(b, ch, h, w)
