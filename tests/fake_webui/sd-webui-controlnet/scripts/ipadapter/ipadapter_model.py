"""sd-webui-controlnet ``scripts/ipadapter/ipadapter_model.py``: ``ImageEmbed``, ``To_KV`` and ``IPAdapterModel``
(the plain adapter: a linear image projection to ``tokens`` context tokens and a LayerNorm; its uncond embedding
is the projection of zeros), with the real one's ``load`` rules for the widths."""

from typing import NamedTuple

import torch
from torch import nn


class ImageEmbed(NamedTuple):
    cond_emb: torch.Tensor
    uncond_emb: torch.Tensor

    def eval(self, cond_mark):
        cond_mark = cond_mark[:, :, :, 0].to(self.cond_emb)
        device, dtype = cond_mark.device, cond_mark.dtype
        return (self.cond_emb.to(device=device, dtype=dtype) * cond_mark
                + self.uncond_emb.to(device=device, dtype=dtype) * (1 - cond_mark))


class To_KV(nn.Module):
    def __init__(self, state_dict):
        super().__init__()
        self.to_kvs = nn.ModuleDict()
        for key, value in state_dict.items():
            k = key.replace(".weight", "").replace(".", "_")
            self.to_kvs[k] = nn.Linear(value.shape[1], value.shape[0], bias=False)
            self.to_kvs[k].weight.data = value


class ImageProjModel(nn.Module):
    def __init__(self, cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.proj = nn.Linear(clip_embeddings_dim, clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds):
        tokens = self.proj(image_embeds).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class IPAdapterModel(nn.Module):
    def __init__(self, state_dict, clip_embeddings_dim, cross_attention_dim, is_sdxl):
        super().__init__()
        self.device = "cpu"
        self.is_sdxl = is_sdxl
        self.is_plus = self.is_faceid = self.is_instantid = self.is_pulid = False
        tokens = state_dict["image_proj"]["proj.weight"].shape[0] // cross_attention_dim
        self.image_proj_model = ImageProjModel(cross_attention_dim, clip_embeddings_dim, tokens)
        self.image_proj_model.load_state_dict(state_dict["image_proj"])
        self.ip_layers = To_KV(state_dict["ip_adapter"])

    @torch.inference_mode()
    def get_image_emb(self, clip_vision_output):
        self.image_proj_model.to(self.device)
        embeds = clip_vision_output["image_embeds"].to(device=self.device, dtype=torch.float32)
        return ImageEmbed(self.image_proj_model(embeds), self.image_proj_model(torch.zeros_like(embeds)))

    @staticmethod
    def load(state_dict, model_name):
        if "proj.weight" not in state_dict["image_proj"]:
            raise NotImplementedError("the stand-in builds plain IP-Adapters only")
        cross_attention_dim = state_dict["ip_adapter"]["1.to_k_ip.weight"].shape[1]
        return IPAdapterModel(state_dict, int(state_dict["image_proj"]["proj.weight"].shape[1]), cross_attention_dim,
                              cross_attention_dim == 2048)
