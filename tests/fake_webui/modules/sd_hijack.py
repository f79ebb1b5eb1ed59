"""modules.sd_hijack: the text-encoder wrappers (prompts of any length in 75-token chunks) and the globals that
``hijack`` retargets (``clip``, ``layers``)."""

from __future__ import annotations

from types import MethodType

import torch
from torch import nn

from modules import sd_unet

CHUNK = 75


class EmbedderWithCustomWords(nn.Module):
    """``FrozenCLIPEmbedderWithCustomWords`` and kin: every prompt of a batch is cut into the same number of
    75-token chunks (BOS/EOS/padding added per chunk) and the chunks' outputs are concatenated; the pooled
    output comes from the first chunk."""

    def __init__(self, wrapped, hijack):
        super().__init__()
        self.wrapped = wrapped
        self.hijack = hijack

    def forward(self, texts):
        tok = self.wrapped.tokenizer
        ids = [tok.encode(t) for t in texts]
        n_chunks = max(1, max((len(i) + CHUNK - 1) // CHUNK for i in ids))
        if any(len(i) > CHUNK for i in ids):
            self.hijack.comments.append("long prompt")
        zs, pooled = [], None
        device = next(self.wrapped.parameters()).device
        for c in range(n_chunks):
            rows = []
            for i in ids:
                part = [tok.bos, *i[c * CHUNK:(c + 1) * CHUNK], tok.eos]
                rows.append(part + [tok.pad] * (tok.max_length - len(part)))
            z, p = self.wrapped.encode_ids(torch.tensor(rows, device=device))
            zs.append(z)
            pooled = p if pooled is None else pooled
        z = torch.cat(zs, dim=1)
        z.pooled = pooled
        return z


def weighted_forward(sd_model, x, c, w, *args, **kwargs):
    raise NotImplementedError  # the training loss the WebUI adds; never called here


def apply_weighted_forward(sd_model):
    # as the WebUI does: a method bound to the model, stored on it (a reference cycle)
    sd_model.weighted_forward = MethodType(weighted_forward, sd_model)


def undo_weighted_forward(sd_model):
    try:
        del sd_model.weighted_forward
    except AttributeError:
        pass


class StableDiffusionModelHijack:
    def __init__(self):
        self.clip = None
        self.layers = None
        self.optimization_method = None
        self.comments = []
        self.extra_generation_params = {}
        self.fixes = None
        self.embedding_db = None

    def hijack(self, m):
        apply_weighted_forward(m)
        conditioner = getattr(m, "conditioner", None)
        if conditioner is not None:
            for i, e in enumerate(conditioner.embedders):
                if not isinstance(e, EmbedderWithCustomWords):
                    conditioner.embedders[i] = EmbedderWithCustomWords(e, self)
            m.cond_stage_model = conditioner
        elif not isinstance(m.cond_stage_model, EmbedderWithCustomWords):
            m.cond_stage_model = EmbedderWithCustomWords(m.cond_stage_model, self)
        self.apply_optimizations()
        self.clip = m.cond_stage_model
        self.layers = list(m.modules())
        sd_unet.original_forward = type(m).__name__

    def apply_optimizations(self, option=None):
        self.optimization_method = "none"

    def convert_sdxl_to_ssd(self, m):
        raise NotImplementedError

    def clear_comments(self):
        self.comments = []
        self.extra_generation_params = {}


model_hijack = StableDiffusionModelHijack()
