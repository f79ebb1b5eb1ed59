"""Tiny text encoders with the real parameter names, and a deterministic word-hash tokenizer.

``CLIPTextModel`` follows Hugging Face ``transformers`` (SD1, SDXL's first encoder); ``OpenCLIPTextModel`` follows
open_clip's text tower (SD2, SDXL's second encoder). Both take token ids ``[B, T]``.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class WordHashTokenizer:
    """Maps words to ids by CRC32, wraps them in BOS/EOS and pads to ``max_length``.

    EOS is the largest id, as in CLIP, so ``ids.argmax(-1)`` finds the first EOS for pooling.
    """

    def __init__(self, vocab_size: int = 1000, max_length: int = 77, pad_with_eos: bool = True):
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1
        self.pad = self.eos if pad_with_eos else 0

    def encode(self, text: str) -> list[int]:
        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [1 + zlib.crc32(w.encode()) % (self.vocab_size - 3) for w in words]

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for text in prompts:
            ids = [self.bos, *self.encode(text)[: self.max_length - 2], self.eos]
            rows.append(ids + [self.pad] * (self.max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 1000
    max_length: int = 77
    width: int = 32
    layers: int = 2
    heads: int = 2
    projection_dim: int | None = None  # OpenCLIP text_projection / HF CLIPTextModelWithProjection


@dataclass
class TextOutput:
    last_hidden_state: torch.Tensor  # after the final layer norm
    hidden_states: list[torch.Tensor]  # embeddings, then each layer's output (before the final norm)
    pooled: torch.Tensor  # final-normed EOS token, projected when the model has a projection


def _causal_mask(n: int, device: torch.device) -> torch.Tensor:
    return torch.full((n, n), float("-inf"), device=device).triu(1)


def _eos_pool(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]


# --- Hugging Face CLIP ------------------------------------------------------------------------------------------


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class CLIPMLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(width, width * 4)
        self.fc2 = nn.Linear(width * 4, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        return self.fc2(x * torch.sigmoid(1.702 * x))  # quick_gelu, as in OpenAI CLIP


class CLIPEncoderLayer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width)
        self.mlp = CLIPMLP(width)
        self.layer_norm2 = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)
        self.register_buffer("position_ids", torch.arange(cfg.max_length)[None], persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding(self.position_ids[:, : ids.shape[1]])


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg.width, cfg.heads) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """HF ``CLIPTextModel`` (``text_projection`` present only with ``projection_dim``, as WithProjection)."""

    def __init__(self, cfg: TextConfig = TextConfig()):
        super().__init__()
        self.config = cfg
        self.text_model = CLIPTextTransformer(cfg)
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, ids: torch.Tensor) -> TextOutput:
        tm = self.text_model
        x = tm.embeddings(ids)
        hidden = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden.append(x)
        last = tm.final_layer_norm(x)
        pooled = _eos_pool(last, ids)
        if self.config.projection_dim:
            pooled = self.text_projection(pooled)
        return TextOutput(last, hidden, pooled)


# --- OpenCLIP ---------------------------------------------------------------------------------------------------


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, width * 4))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(width * 4, width))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(cfg.width, cfg.heads) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """open_clip's text tower: what SD2 (``cond_stage_model.model``) and SDXL (``conditioner.embedders.1.model``)
    store. The visual tower is omitted."""

    def __init__(self, cfg: TextConfig = TextConfig(projection_dim=32)):
        super().__init__()
        self.config = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_length, cfg.width))
        self.transformer = Transformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim or cfg.width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.width**-0.5)

    def forward(self, ids: torch.Tensor) -> TextOutput:
        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        mask = _causal_mask(n, x.device).to(x.dtype)
        hidden = [x]
        for block in self.transformer.resblocks:
            x = block(x, mask)
            hidden.append(x)
        last = self.ln_final(x)
        return TextOutput(last, hidden, _eos_pool(last, ids) @ self.text_projection)
