"""Forge's built-in IP-Adapter as far as the host adapter uses it, written from Forge 2 (dfdcbab) and Neo (5692d2d).

- ``lib_ipadapter.IPAdapterPlus`` (extensions-builtin/sd_forge_ipadapter): ``IPAdapter`` with the plain image
  projection (``ImageProjModel``: ``proj`` then ``norm``, tokens × context) and ``To_KV`` built from the
  ``ip_adapter`` tensors; ``CrossAttentionPatch`` (the plain attention of every row plus, per stacked unit inside its
  sigma window, ``weight · attention(q, to_k_ip(embeds), to_v_ip(embeds))`` with the cond or uncond embeddings picked
  per chunk by ``cond_or_uncond``, repeated ``b // chunks`` times), ``set_model_patch_replace`` and
  ``IPAdapterApply.apply_ipadapter`` (IPAdapterPlus.py:140-171, 380-470, 597-785): its flags from the state dict
  (Plus, Full, portrait, FaceID; SDXL when ``1.to_k_ip.weight.shape[1] == 2048``), the image through
  ``clip_vision.encode_image`` (``image_embeds``, and zeros for the uncond), the adapter moved to Forge's device,
  ``model.clone()``, the window from the given model's predictor, and one patch per cross-attention. Forge lists the
  keys of the full SD1.5/SDXL UNets; here they are derived from the tiny UNet in the same order and form (input
  blocks, output blocks, middle; ``(block, id)`` or, for SDXL, ``(block, id, index)``). Forge 2's method belongs to
  an instance and returns ``(patcher,)``; Neo's is a classmethod that keeps its state on the class and returns the
  patcher (Neo's IPAdapterPlus.py:557-733). The Plus resampler and FaceID's insightface are not modelled (an adapter
  of those kinds raises, as Forge does without insightface).
- ``IPAdapterPatcher`` (scripts/forge_ipadapter.py:111-161): built from a safetensors state dict split into
  ``image_proj``/``ip_adapter``; ``v2`` in the file name sets faceid_v2/weight_v2; ``process_before_every_sampling``
  applies it to ``p.sd_model.forge_objects.unet``.
- the preprocessors "CLIP-ViT-H (IPAdapter)", "CLIP-ViT-bigG (IPAdapter)", "InsightFace+CLIP-H (IPAdapter)"
  (``PreprocessorClipVision``: the encoder by file name from ``preprocessor_dir``, downloaded when missing — here
  recorded and refused —, cached host-wide in ``global_cache``; supported_preprocessor.py:103-137);
- ``backend.patcher.clipvision``: ``load`` (a CLIP-vision state dict in the transformers layout, sized from its
  shapes: Forge picks one of three fixed configurations by layer count), ``ClipVisionModel.encode_image`` (loaded by
  the memory manager, ``clip_preprocess`` to 224², outputs image_embeds and the penultimate hidden states);
- ``backend.attention.attention_function``: heads split, scaled dot-product attention, heads merged;
- :class:`UserIPAdapter`: the user's own unit as Forge's ControlNet script runs it (the reference).
"""

from __future__ import annotations

import os
import sys
from types import ModuleType
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import backend, controlnet

NEO = False
download_attempts: list[str] = []  # what a preprocessor would have downloaded (the tests' record)
encoder_loads: list[str] = []  # the files clipvision.load read
preprocessor_dir = ""
models_path = ""

# --- backend.attention --------------------------------------------------------------------------------------------


def attention_function(q, k, v, heads, mask=None):
    """backend/attention.py's PyTorch attention: the same operations as the stand-in UNet's own attention."""
    b, n, _ = q.shape
    q, k, v = (t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, -1)


# --- backend.patcher.clipvision -------------------------------------------------------------------------------------


class Output:
    def __getitem__(self, key):
        return getattr(self, key)

    def __setitem__(self, key, item):
        setattr(self, key, item)


def clip_preprocess(image, size=224):
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=image.device, dtype=image.dtype)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=image.device, dtype=image.dtype)
    image = image.movedim(-1, 1)
    if not (image.shape[2] == size and image.shape[3] == size):
        scale = size / min(image.shape[2], image.shape[3])
        image = F.interpolate(image, size=(round(scale * image.shape[2]), round(scale * image.shape[3])),
                              mode="bicubic", antialias=True)
        h, w = (image.shape[2] - size) // 2, (image.shape[3] - size) // 2
        image = image[:, :, h:h + size, w:w + size]
    image = torch.clip(255.0 * image, 0, 255).round() / 255.0
    return (image - mean.view([3, 1, 1])) / std.view([3, 1, 1])


class _Attention(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.k_proj, self.v_proj, self.q_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
        self.heads = max(d // 16, 1)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(attention_function(q, k, v, self.heads))


class _Layer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = _Attention(d)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x))))


class CLIPVisionModelWithProjection(nn.Module):
    """transformers' module tree and keys (vision_model.*, visual_projection), at any width."""

    def __init__(self, hidden: int, layers: int, projection: int, patch: int = 14, image: int = 224):
        super().__init__()
        vm = self.vision_model = nn.Module()
        vm.embeddings = nn.Module()
        vm.embeddings.class_embedding = nn.Parameter(torch.zeros(hidden))
        vm.embeddings.patch_embedding = nn.Conv2d(3, hidden, patch, patch, bias=False)
        vm.embeddings.position_embedding = nn.Embedding((image // patch) ** 2 + 1, hidden)
        vm.pre_layrnorm, vm.post_layernorm = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        vm.encoder = nn.Module()
        vm.encoder.layers = nn.ModuleList(_Layer(hidden) for _ in range(layers))
        self.visual_projection = nn.Linear(hidden, projection, bias=False)

    def forward(self, pixel_values, output_hidden_states=True):
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(pixel_values.to(self.visual_projection.weight.dtype)).flatten(2)
        x = torch.cat([vm.embeddings.class_embedding.expand(x.shape[0], 1, -1), x.transpose(1, 2)], dim=1)
        x = vm.pre_layrnorm(x + vm.embeddings.position_embedding.weight[None])
        states = [x]
        for layer in vm.encoder.layers:
            x = layer(x)
            states.append(x)
        pooled = vm.post_layernorm(x[:, 0])
        out = Output()
        out.last_hidden_state, out.hidden_states, out.image_embeds = x, tuple(states), self.visual_projection(pooled)
        return out


class ClipVisionModel:
    def __init__(self, hidden, layers, projection):
        self.load_device = self.offload_device = torch.device("cpu")
        self.model = CLIPVisionModelWithProjection(hidden, layers, projection).eval()
        self.patcher = backend.ModelPatcher(self.model, self.load_device, self.offload_device)

    def encode_image(self, image):
        backend.load_model_gpu(self.patcher)
        outputs = self.model(pixel_values=clip_preprocess(image.to(self.load_device)), output_hidden_states=True)
        o = Output()
        o["last_hidden_state"] = outputs.last_hidden_state
        o["penultimate_hidden_states"] = outputs.hidden_states[-2]
        o["image_embeds"] = outputs.image_embeds
        return o


def load(ckpt_path):
    encoder_loads.append(ckpt_path)
    sd = backend.load_torch_file(ckpt_path)
    if "vision_model.embeddings.class_embedding" not in sd:
        return None
    layers = 1 + max(int(k.split(".")[3]) for k in sd if k.startswith("vision_model.encoder.layers."))
    hidden, projection = sd["vision_model.embeddings.class_embedding"].shape[0], sd["visual_projection.weight"].shape[0]
    clip = ClipVisionModel(hidden, layers, projection)
    clip.model.load_state_dict(sd, strict=False)
    return clip


def write_encoder(path, hidden: int = 32, layers: int = 2, projection: int = 24, seed: int = 0):
    """A tiny CLIP-vision encoder file (random weights; LayerNorms and biases not zero, so the image matters)."""
    import safetensors.torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CLIPVisionModelWithProjection(hidden, layers, projection)
        for name, t in net.state_dict().items():
            if t.ndim == 1:
                t.copy_(torch.randn_like(t) * 0.1 + (1.0 if "norm" in name and "weight" in name else 0.0))
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


# --- lib_ipadapter.IPAdapterPlus -------------------------------------------------------------------------------------


class ImageProjModel(nn.Module):
    def __init__(self, cross_attention_dim=1024, clip_embeddings_dim=1024, clip_extra_context_tokens=4):
        super().__init__()
        self.cross_attention_dim = cross_attention_dim
        self.clip_extra_context_tokens = clip_extra_context_tokens
        self.proj = nn.Linear(clip_embeddings_dim, self.clip_extra_context_tokens * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds):
        tokens = self.proj(image_embeds).reshape(-1, self.clip_extra_context_tokens, self.cross_attention_dim)
        return self.norm(tokens)


class To_KV(nn.Module):
    def __init__(self, state_dict):
        super().__init__()
        self.to_kvs = nn.ModuleDict()
        for key, value in state_dict.items():
            name = key.replace(".weight", "").replace(".", "_")
            self.to_kvs[name] = nn.Linear(value.shape[1], value.shape[0], bias=False)
            self.to_kvs[name].weight.data = value


class IPAdapter(nn.Module):
    def __init__(self, ipadapter_model, cross_attention_dim=1024, output_cross_attention_dim=1024,
                 clip_embeddings_dim=1024, clip_extra_context_tokens=4, is_sdxl=False, is_plus=False, is_full=False,
                 is_faceid=False, is_instant_id=False):
        super().__init__()
        if is_plus or is_faceid or is_instant_id:
            raise NotImplementedError("the stand-in builds plain IP-Adapters only")
        self.image_proj_model = ImageProjModel(cross_attention_dim, clip_embeddings_dim, clip_extra_context_tokens)
        self.image_proj_model.load_state_dict(ipadapter_model["image_proj"])
        self.ip_layers = To_KV(ipadapter_model["ip_adapter"])

    def get_image_embeds(self, clip_embed, clip_embed_zeroed):
        return self.image_proj_model(clip_embed), self.image_proj_model(clip_embed_zeroed)


class CrossAttentionPatch:
    def __init__(self, weight, ipadapter, number, cond, uncond, weight_type, mask=None, sigma_start=0.0,
                 sigma_end=1.0, unfold_batch=False):
        self.weights, self.ipadapters, self.conds, self.unconds = [weight], [ipadapter], [cond], [uncond]
        self.number = number
        self.weight_type, self.masks = [weight_type], [mask]
        self.sigma_start, self.sigma_end, self.unfold_batch = [sigma_start], [sigma_end], [unfold_batch]
        self.k_key = str(self.number * 2 + 1) + "_to_k_ip"
        self.v_key = str(self.number * 2 + 1) + "_to_v_ip"

    def set_new_condition(self, weight, ipadapter, number, cond, uncond, weight_type, mask=None, sigma_start=0.0,
                          sigma_end=1.0, unfold_batch=False):
        self.weights.append(weight)
        self.ipadapters.append(ipadapter)
        self.conds.append(cond)
        self.unconds.append(uncond)
        self.masks.append(mask)
        self.weight_type.append(weight_type)
        self.sigma_start.append(sigma_start)
        self.sigma_end.append(sigma_end)
        self.unfold_batch.append(unfold_batch)

    def __call__(self, n, context_attn2, value_attn2, extra_options):
        org_dtype = n.dtype
        cond_or_uncond = extra_options["cond_or_uncond"]
        sigma = extra_options["sigmas"][0] if "sigmas" in extra_options else None
        sigma = sigma.item() if sigma is not None else 999999999.9
        q, k, v = n, context_attn2, value_attn2
        batch_prompt = q.shape[0] // len(cond_or_uncond)
        out = attention_function(q, k, v, extra_options["n_heads"])
        if any(m is not None for m in self.masks):
            raise NotImplementedError("attention masks are not modelled: no caller here passes one")
        for weight, cond, uncond, ipadapter, weight_type, sigma_start, sigma_end in zip(
                self.weights, self.conds, self.unconds, self.ipadapters, self.weight_type,
                self.sigma_start, self.sigma_end, strict=True):
            if sigma > sigma_start or sigma < sigma_end:
                continue
            k_cond = ipadapter.ip_layers.to_kvs[self.k_key](cond).repeat(batch_prompt, 1, 1)
            k_uncond = ipadapter.ip_layers.to_kvs[self.k_key](uncond).repeat(batch_prompt, 1, 1)
            v_cond = ipadapter.ip_layers.to_kvs[self.v_key](cond).repeat(batch_prompt, 1, 1)
            v_uncond = ipadapter.ip_layers.to_kvs[self.v_key](uncond).repeat(batch_prompt, 1, 1)
            ip_k = torch.cat([(k_cond, k_uncond)[i] for i in cond_or_uncond], dim=0)
            ip_v = torch.cat([(v_cond, v_uncond)[i] for i in cond_or_uncond], dim=0)
            if weight_type.startswith("linear"):
                ip_k, ip_v = ip_k * weight, ip_v * weight
            out_ip = attention_function(q, ip_k.to(org_dtype), ip_v.to(org_dtype), extra_options["n_heads"])
            if weight_type.startswith("original"):
                out_ip = out_ip * weight
            out = out + out_ip
        return out.to(dtype=org_dtype)


def set_model_patch_replace(model, patch_kwargs, key):
    to = model.model_options["transformer_options"]
    to.setdefault("patches_replace", {}).setdefault("attn2", {})
    if key not in to["patches_replace"]["attn2"]:
        to["patches_replace"]["attn2"][key] = CrossAttentionPatch(**patch_kwargs)
    else:
        to["patches_replace"]["attn2"][key].set_new_condition(**patch_kwargs)


def attn2_keys(unet, sdxl: bool) -> list[tuple]:
    """The keys Forge lists for the full UNets, for this UNet: its transformers' blocks in Forge's order."""
    keys = []
    for part, blocks in (("input", unet.input_blocks), ("output", unet.output_blocks)):
        for i, block in enumerate(blocks):
            depth = sum(len(m.transformer_blocks) for m in block if hasattr(m, "transformer_blocks"))
            keys += [(part, i, j) if sdxl else (part, i) for j in range(depth)] if depth else []
    depth = sum(len(m.transformer_blocks) for m in unet.middle_block if hasattr(m, "transformer_blocks"))
    keys += [("middle", 0, j) if sdxl else ("middle", 0) for j in range(depth)]
    return keys


class IPAdapterApply:
    def apply_ipadapter(self, ipadapter, model, weight, clip_vision=None, image=None, weight_type="original",
                        noise=None, embeds=None, attn_mask=None, start_at=0.0, end_at=1.0, unfold_batch=False,
                        insightface=None, faceid_v2=False, weight_v2=False, instant_id=False):
        self.dtype = torch.float32
        self.device = backend_device()
        self.weight = weight
        self.is_full = "proj.3.weight" in ipadapter["image_proj"]
        self.is_portrait = ("proj.2.weight" in ipadapter["image_proj"] and "proj.3.weight" not in
                            ipadapter["image_proj"] and "0.to_q_lora.down.weight" not in ipadapter["ip_adapter"])
        self.is_faceid = self.is_portrait or "0.to_q_lora.down.weight" in ipadapter["ip_adapter"]
        self.is_plus = self.is_full or "latents" in ipadapter["image_proj"] or \
            "perceiver_resampler.proj_in.weight" in ipadapter["image_proj"]
        self.is_instant_id = instant_id
        if self.is_faceid and not insightface:
            raise Exception("InsightFace must be provided for FaceID models.")
        output_cross_attention_dim = ipadapter["ip_adapter"]["1.to_k_ip.weight"].shape[1]
        self.is_sdxl = output_cross_attention_dim == 2048
        cross_attention_dim = output_cross_attention_dim
        clip_extra_context_tokens = 16 if self.is_plus or self.is_portrait else 4
        clip_embed = clip_vision.encode_image(image).image_embeds
        clip_embed_zeroed = torch.zeros_like(clip_embed)
        self.ipadapter = IPAdapter(ipadapter, cross_attention_dim=cross_attention_dim,
                                   output_cross_attention_dim=output_cross_attention_dim,
                                   clip_embeddings_dim=clip_embed.shape[-1],
                                   clip_extra_context_tokens=clip_extra_context_tokens, is_sdxl=self.is_sdxl,
                                   is_plus=self.is_plus, is_full=self.is_full, is_faceid=self.is_faceid,
                                   is_instant_id=self.is_instant_id)
        self.ipadapter.to(self.device, dtype=self.dtype)
        cond, uncond = self.ipadapter.get_image_embeds(clip_embed.to(self.device, dtype=self.dtype),
                                                       clip_embed_zeroed.to(self.device, dtype=self.dtype))
        work_model = model.clone()
        patch_kwargs = {"number": 0, "weight": self.weight, "ipadapter": self.ipadapter, "cond": cond,
                        "uncond": uncond, "weight_type": weight_type, "mask": attn_mask,
                        "sigma_start": model.model.predictor.percent_to_sigma(start_at),
                        "sigma_end": model.model.predictor.percent_to_sigma(end_at), "unfold_batch": unfold_batch}
        for key in attn2_keys(model.model.diffusion_model, self.is_sdxl):
            set_model_patch_replace(work_model, patch_kwargs, key)
            patch_kwargs["number"] += 1
        return (work_model,)


class NeoIPAdapterApply:
    """Neo's: the same work as a classmethod keeping its state on the class, returning the patcher."""

    @classmethod
    def apply_ipadapter(cls, ipadapter, model, weight, **kwargs):
        holder = IPAdapterApply()
        out = IPAdapterApply.apply_ipadapter(holder, ipadapter, model, weight, **kwargs)[0]
        for k, v in vars(holder).items():
            setattr(cls, k, v)
        return out


def backend_device():
    return torch.device("cpu")


# --- scripts/forge_ipadapter.py, modules_forge.supported_preprocessor ----------------------------------------------


class IPAdapterPatcher(controlnet.ControlModelPatcher):
    @staticmethod
    def try_build_from_state_dict(state_dict, ckpt_path):
        model = state_dict
        if ckpt_path.lower().endswith(".safetensors"):
            st_model = {"image_proj": {}, "ip_adapter": {}}
            for key in model:
                if key.startswith("image_proj."):
                    st_model["image_proj"][key.replace("image_proj.", "")] = model[key]
                elif key.startswith("ip_adapter."):
                    st_model["ip_adapter"][key.replace("ip_adapter.", "")] = model[key]
            model = st_model
        if "ip_adapter" not in model or len(model["ip_adapter"]) == 0:
            return None
        o = IPAdapterPatcher(model)
        if "v2" in os.path.basename(ckpt_path).lower():
            o.faceid_v2 = o.weight_v2 = True
        return o

    def __init__(self, state_dict):
        super().__init__()
        self.ip_adapter = state_dict
        self.faceid_v2 = self.weight_v2 = False
        self.strength, self.start_percent, self.end_percent = 1.0, 0.0, 1.0

    def process_before_every_sampling(self, process, cond, mask, *args, **kwargs):
        unet = process.sd_model.forge_objects.unet
        apply = NeoIPAdapterApply.apply_ipadapter if NEO else IPAdapterApply().apply_ipadapter
        unet = apply(ipadapter=self.ip_adapter, model=unet, weight=self.strength, start_at=self.start_percent,
                     end_at=self.end_percent, faceid_v2=self.faceid_v2, weight_v2=self.weight_v2,
                     attn_mask=mask.squeeze(1) if mask is not None else None, **cond)
        process.sd_model.forge_objects.unet = unet if NEO else unet[0]


class PreprocessorClipVision(controlnet.Preprocessor):
    global_cache: ClassVar[dict] = {}

    def __init__(self, name, url, filename):
        super().__init__()
        self.name, self.url, self.filename = name, url, filename
        self.clipvision = None

    def load_clipvision(self):
        if self.clipvision is not None:
            return self.clipvision
        ckpt_path = os.path.join(preprocessor_dir, self.filename)
        if not os.path.exists(ckpt_path):  # load_file_from_url
            download_attempts.append(self.url)
            raise RuntimeError(f"would download {self.url}")
        if ckpt_path in PreprocessorClipVision.global_cache:
            self.clipvision = PreprocessorClipVision.global_cache[ckpt_path]
        else:
            self.clipvision = PreprocessorClipVision.global_cache[ckpt_path] = load(ckpt_path)
        return self.clipvision

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, slider_3=None, **kwargs):
        self.calls += 1
        return self.load_clipvision().encode_image(controlnet.numpy_to_pytorch(input_image))


class PreprocessorClipVisionForIPAdapter(PreprocessorClipVision):
    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, slider_3=None, **kwargs):
        self.calls += 1
        return dict(clip_vision=self.load_clipvision(), image=controlnet.numpy_to_pytorch(input_image),
                    weight_type="original", noise=0.0, embeds=None, unfold_batch=False)


class PreprocessorClipVisionWithInsightFaceForIPAdapter(PreprocessorClipVisionForIPAdapter):
    def load_insightface(self):
        download_attempts.append("insightface buffalo_l")
        raise ImportError("No module named 'insightface'")


H_URL = "https://huggingface.co/h94/IP-Adapter/resolve/main/models/image_encoder/model.safetensors"
G_URL = "https://huggingface.co/h94/IP-Adapter/resolve/main/sdxl_models/image_encoder/model.safetensors"


def preprocessors() -> list:
    return [PreprocessorClipVisionForIPAdapter("CLIP-ViT-H (IPAdapter)", H_URL, "CLIP-ViT-H-14.safetensors"),
            PreprocessorClipVisionForIPAdapter("CLIP-ViT-bigG (IPAdapter)", G_URL, "CLIP-ViT-bigG.safetensors"),
            PreprocessorClipVisionWithInsightFaceForIPAdapter("InsightFace+CLIP-H (IPAdapter)", H_URL,
                                                              "CLIP-ViT-H-14.safetensors")]


def write_adapter(path, context: int = 32, widths=(), tokens: int = 4, clip_dim: int = 24, seed: int = 0,
                  scale: float = 1.0, extra: dict | None = None):
    """A plain IP-Adapter file: ``image_proj.proj``/``norm`` and ``ip_adapter.{2n+1}.to_{k,v}_ip`` for the
    cross-attentions of ``widths`` (fan-in scaled random weights; the LayerNorm's bias refilled)."""
    import safetensors.torch

    g = torch.Generator().manual_seed(seed)
    state = {"image_proj.proj.weight": torch.randn(tokens * context, clip_dim, generator=g) / clip_dim ** 0.5,
             "image_proj.proj.bias": torch.randn(tokens * context, generator=g) * 0.02,
             "image_proj.norm.weight": torch.ones(context),
             "image_proj.norm.bias": torch.randn(context, generator=g) * 0.02}
    for n, width in enumerate(widths):
        for kind in ("k", "v"):
            state[f"ip_adapter.{2 * n + 1}.to_{kind}_ip.weight"] = \
                torch.randn(width, context, generator=g) * scale / context ** 0.5
    state.update(extra or {})
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))
    return path


def attn2_widths(unet) -> list[int]:
    """The inner width of each cross-attention, in the adapter's order (input blocks, output blocks, middle)."""
    out = []
    for part in (unet.input_blocks, unet.output_blocks, unet.middle_block):
        out += [m.to_k.out_features for name, m in part.named_modules() if name.endswith("attn2")]
    return out


# --- the user's own unit: Forge's ControlNet script with an IP-Adapter model -----------------------------------------


class UserIPAdapter:
    """scripts/controlnet.py for API units whose model is an IP-Adapter: ``process`` runs the preprocessor on the
    unit's image (its dict is the conditioning), ``process_before_every_sampling`` sets strength and window and lets
    the ``IPAdapterPatcher`` patch ``p.sd_model.forge_objects.unet``."""

    def process(self, p, *units):
        self.params = []
        for unit in units:
            pre = controlnet.supported_preprocessors[unit.get("module", "CLIP-ViT-H (IPAdapter)")]
            controlnet.set_numpy_seed(p)
            cond = pre(input_image=controlnet.HWC3(unit["image"]), input_mask=None, resolution=512)
            model = controlnet.try_load_supported_control_model(controlnet.get_controlnet_filename(unit["model"]))
            self.params.append((unit, cond, model))

    @torch.no_grad()  # as process_unit_before_every_sampling
    def process_before_every_sampling(self, p, *units, **kwargs):
        for unit, cond, model in self.params:
            model.strength = float(unit.get("weight", 1.0))
            model.start_percent = float(unit.get("guidance_start", 0.0))
            model.end_percent = float(unit.get("guidance_end", 1.0))
            model.process_before_every_sampling(p, cond, None)


# --- installation -----------------------------------------------------------------------------------------------------


def modules(neo: bool) -> dict[str, ModuleType]:
    """The modules of Forge's IP-Adapter, fresh lists each installation (after the ControlNet's)."""
    global NEO, preprocessor_dir, models_path
    NEO = neo
    models_path = preprocessor_dir = ""
    PreprocessorClipVision.global_cache = {}
    download_attempts.clear()
    encoder_loads.clear()
    for pre in preprocessors():
        controlnet.supported_preprocessors[pre.name] = pre
    controlnet.supported_control_models.append(IPAdapterPatcher)
    g = globals()

    def module(name, *names, **attrs):
        m = ModuleType(name)
        m.__dict__.update({n: g[n] for n in names}, **attrs)
        return m

    plus = module("lib_ipadapter.IPAdapterPlus", "CrossAttentionPatch", "set_model_patch_replace", "IPAdapter",
                  "To_KV", "ImageProjModel", IPAdapterApply=NeoIPAdapterApply if neo else IPAdapterApply)
    return {
        "backend.attention": module("backend.attention", "attention_function"),
        "backend.patcher.clipvision": module("backend.patcher.clipvision", "load", "clip_preprocess",
                                             "ClipVisionModel"),
        "lib_ipadapter": module("lib_ipadapter"),
        "lib_ipadapter.IPAdapterPlus": plus,
    }


def extend(mods: dict[str, ModuleType]) -> None:
    """Forge's names that the IP-Adapter adds to modules the ControlNet stand-in provides."""
    mods["modules_forge.shared"].__dict__.update(preprocessor_dir=preprocessor_dir, models_path=models_path)
    mods["modules_forge.supported_preprocessor"].PreprocessorClipVision = PreprocessorClipVision


def use_models(path) -> None:
    """The data dir's models folder (models/ControlNetPreprocessor, models/insightface) for the tests' files."""
    global models_path, preprocessor_dir
    models_path = str(path)
    preprocessor_dir = os.path.join(models_path, "ControlNetPreprocessor")
    sys.modules["modules_forge.shared"].__dict__.update(preprocessor_dir=preprocessor_dir, models_path=models_path)
