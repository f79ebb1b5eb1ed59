"""A small Flux transformer and T5 encoder, with the module names Forge's (and BFL's) classes use.

The layer tree and data flow of Flux.1-dev (``backend/nn/flux.py``): ``img_in``/``txt_in`` projections,
``time_in``/``vector_in``/``guidance_in`` MLP embedders, double-stream blocks (``img_attn.qkv`` and ``txt_attn.qkv``
fused, joint attention, ``img_mlp``/``txt_mlp``, adaLN ``img_mod.lin``/``txt_mod.lin``), single-stream blocks
(``linear1`` fusing q, k, v and the MLP input, ``linear2``) and ``final_layer``. The rotary positions are left out:
they hold no weight, and what is under test here is which layer each LoRA key changes. The T5 encoder keeps the
names under Forge's ``t5xxl.transformer.`` (``encoder.block.N.layer.0.SelfAttention.q``,
``layer.1.DenseReluDense.wi_0``) with a plain attention in place of T5's relative position buckets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from devkit.ldm_unet import timestep_embedding


@dataclass(frozen=True)
class FluxConfig:
    in_channels: int = 16  # packed 2×2 patches of a 4-channel latent
    hidden_size: int = 32
    num_heads: int = 2
    depth: int = 2
    depth_single_blocks: int = 2
    context_in_dim: int = 24  # T5's width
    vec_in_dim: int = 16  # CLIP-L's pooled width
    mlp_ratio: float = 4.0


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden)
        self.out_layer = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.norm = QKNorm(dim // heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None].chunk(self.multiplier, dim=-1)


def _heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.heads = heads
        for side in ("img", "txt"):
            setattr(self, f"{side}_mod", Modulation(dim, double=True))
            setattr(self, f"{side}_norm1", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_attn", SelfAttention(dim, heads))
            setattr(self, f"{side}_norm2", nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{side}_mlp", nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"),
                                                       nn.Linear(hidden, dim)))

    def _qkv(self, side: str, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
        attn: SelfAttention = getattr(self, f"{side}_attn")
        q, k, v = _heads(attn.qkv((1 + scale) * getattr(self, f"{side}_norm1")(x) + shift), self.heads)
        return attn.norm.query_norm(q), attn.norm.key_norm(k), v

    def _rest(self, side: str, x: torch.Tensor, attn: torch.Tensor, mod: tuple) -> torch.Tensor:
        _, _, gate1, shift2, scale2, gate2 = mod
        x = x + gate1 * getattr(self, f"{side}_attn").proj(attn)
        return x + gate2 * getattr(self, f"{side}_mlp")((1 + scale2) * getattr(self, f"{side}_norm2")(x) + shift2)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod, txt_mod = self.img_mod(vec), self.txt_mod(vec)
        iq, ik, iv = self._qkv("img", img, img_mod[0], img_mod[1])
        tq, tk, tv = self._qkv("txt", txt, txt_mod[0], txt_mod[1])
        attn = _attention(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2))
        n = txt.shape[1]
        return self._rest("img", img, attn[:, n:], img_mod), self._rest("txt", txt, attn[:, :n], txt_mod)


class SingleStreamBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads, self.dim, self.mlp_hidden = heads, dim, int(dim * mlp_ratio)
        self.linear1 = nn.Linear(dim, 3 * dim + self.mlp_hidden)
        self.linear2 = nn.Linear(dim + self.mlp_hidden, dim)
        self.norm = QKNorm(dim // heads)
        self.pre_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(dim, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift),
                               [3 * self.dim, self.mlp_hidden], dim=-1)
        q, k, v = _heads(qkv, self.heads)
        attn = _attention(self.norm.query_norm(q), self.norm.key_norm(k), v)
        return x + gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2))


class LastLayer(nn.Module):
    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear((1 + scale) * self.norm_final(x) + shift)


class Flux(nn.Module):
    """``forward(img, txt, timesteps, y, guidance)`` on packed image tokens ``(B, N, in_channels)``."""

    def __init__(self, config: FluxConfig = FluxConfig()):
        super().__init__()
        c = config
        self.config = c
        self.img_in = nn.Linear(c.in_channels, c.hidden_size)
        self.time_in = MLPEmbedder(256, c.hidden_size)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = MLPEmbedder(256, c.hidden_size)
        self.txt_in = nn.Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio)
                                           for _ in range(c.depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio)
                                           for _ in range(c.depth_single_blocks))
        self.final_layer = LastLayer(c.hidden_size, c.in_channels)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, timesteps: torch.Tensor, y: torch.Tensor,
                guidance: torch.Tensor) -> torch.Tensor:
        vec = self.time_in(timestep_embedding(timesteps, 256)) + self.guidance_in(timestep_embedding(guidance, 256))
        vec = vec + self.vector_in(y)
        img, txt = self.img_in(img), self.txt_in(txt)
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        x = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            x = block(x, vec)
        return self.final_layer(x[:, txt.shape[1]:], vec)


class T5Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))
        self.o = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        return self.o(_attention(q, k, v))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.SelfAttention = T5Attention(dim, heads)
        self.layer_norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x))


class T5DenseGatedActDense(nn.Module):
    def __init__(self, dim: int, ff: int):
        super().__init__()
        self.wi_0, self.wi_1 = nn.Linear(dim, ff, bias=False), nn.Linear(dim, ff, bias=False)
        self.wo = nn.Linear(ff, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class T5LayerFF(nn.Module):
    def __init__(self, dim: int, ff: int):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(dim, ff)
        self.layer_norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(dim, heads), T5LayerFF(dim, ff)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class T5Stack(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, ff: int):
        super().__init__()
        self.block = nn.ModuleList(T5Block(dim, heads, ff) for _ in range(layers))
        self.final_layer_norm = RMSNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.block:
            x = block(x)
        return self.final_layer_norm(x)


class T5(nn.Module):
    def __init__(self, vocab: int = 64, dim: int = 24, heads: int = 2, ff: int = 48, layers: int = 2):
        super().__init__()
        self.encoder = T5Stack(layers, dim, heads, ff)
        self.shared = nn.Embedding(vocab, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.shared(ids))


class IntegratedT5(nn.Module):
    """Forge's wrapper: the model sits under ``transformer``."""

    def __init__(self, **kwargs):
        super().__init__()
        self.transformer = T5(**kwargs)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(ids)
