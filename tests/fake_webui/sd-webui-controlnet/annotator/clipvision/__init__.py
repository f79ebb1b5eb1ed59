"""sd-webui-controlnet ``annotator/clipvision``: ``ClipVisionDetector`` loads
``<models_path>/clip_vision/<config>.pth`` into a ``CLIPVisionModelWithProjection`` of a fixed configuration
(``strict=False``, as the real one) and returns its output with the hidden states. The model is a small stand-in for
transformers' class with its key names. The real one downloads a missing file; the stand-in fails instead (a test
that reaches it is wrong). The configurations are reduced (the real ones are ViT-H and ViT-bigG) but keep the
projection widths the adapters' shapes name them by (1024 and 1280)."""

import os
import sys

import numpy as np
import torch

configs = {
    "clip_h": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8, projection_dim=1024),
    "clip_g": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                   patch_size=8, projection_dim=1280),
}
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


class _Layer(torch.nn.Module):
    """A pre-norm ViT layer with Hugging Face CLIP's key names (``self_attn.q_proj``, ``mlp.fc1``, ...)."""

    def __init__(self, width, heads, hidden):
        super().__init__()
        self.heads = heads
        self.self_attn = torch.nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, torch.nn.Linear(width, width))
        self.layer_norm1, self.layer_norm2 = torch.nn.LayerNorm(width), torch.nn.LayerNorm(width)
        self.mlp = torch.nn.Module()
        self.mlp.fc1, self.mlp.fc2 = torch.nn.Linear(width, hidden), torch.nn.Linear(hidden, width)

    def forward(self, x):
        b, n, c = x.shape
        a = self.self_attn
        y = self.layer_norm1(x)
        q, k, v = (p(y).view(b, n, self.heads, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        x = x + a.out_proj(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.layer_norm2(x))))


class CLIPVisionModelWithProjection(torch.nn.Module):
    """transformers' class of that name (keys ``vision_model.*`` and ``visual_projection``), its output a dict with
    ``image_embeds`` (the projected pooled token), ``last_hidden_state`` and every layer's ``hidden_states``."""

    def __init__(self, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, image_size,
                 patch_size, projection_dim):
        super().__init__()
        w, patches = hidden_size, (image_size // patch_size) ** 2
        self.vision_model = torch.nn.Module()
        vm = self.vision_model
        vm.embeddings = torch.nn.Module()
        vm.embeddings.class_embedding = torch.nn.Parameter(torch.randn(w))
        vm.embeddings.patch_embedding = torch.nn.Conv2d(3, w, patch_size, patch_size, bias=False)
        vm.embeddings.position_embedding = torch.nn.Embedding(patches + 1, w)
        vm.pre_layrnorm, vm.post_layernorm = torch.nn.LayerNorm(w), torch.nn.LayerNorm(w)
        vm.encoder = torch.nn.Module()
        vm.encoder.layers = torch.nn.ModuleList(_Layer(w, num_attention_heads, intermediate_size)
                                                for _ in range(num_hidden_layers))
        self.visual_projection = torch.nn.Linear(w, projection_dim, bias=False)

    def forward(self, pixel_values):
        vm = self.vision_model
        e = vm.embeddings
        x = e.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        x = torch.cat([e.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + e.position_embedding.weight
        hidden = [vm.pre_layrnorm(x)]
        for layer in vm.encoder.layers:
            hidden.append(layer(hidden[-1]))
        return {"image_embeds": self.visual_projection(vm.post_layernorm(hidden[-1][:, 0])),
                "last_hidden_state": hidden[-1], "hidden_states": hidden}


def build(config):
    return CLIPVisionModelWithProjection(**configs[config])


class ClipVisionDetector:
    def __init__(self, config, low_vram=False):
        models_path = sys.modules["annotator.annotator_path"].models_path
        path = os.path.join(models_path, "clip_vision", f"{config}.pth")
        if not os.path.exists(path):
            raise RuntimeError(f"would download {path}")
        self.size = configs[config]["image_size"]
        self.model = build(config)
        self.model.load_state_dict(torch.load(path, map_location="cpu"), strict=False)
        self.model.eval()

    def unload_model(self):
        if self.model is not None:
            self.model.to("meta")

    def __call__(self, input_image):
        from PIL import Image

        img = np.asarray(Image.fromarray(input_image[:, :, :3]).resize((self.size, self.size), Image.BICUBIC))
        pixels = torch.from_numpy(((img.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)[None].copy())
        with torch.no_grad():
            return self.model(pixel_values=pixels)
