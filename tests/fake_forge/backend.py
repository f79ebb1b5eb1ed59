"""Forge's ``backend`` as far as the host adapter uses it, written from Forge's behaviour (host-notes/forge.md).

- conditions: ``Condition`` classes with ``process_cond``/``can_concat``/``concat`` (cross-attention contexts of
  different lengths concatenate by repetition to their least common multiple), ``compile_conditions`` and
  ``compile_weighted_conditions`` (one entry per AND position, its weight as ``strength``);
- ``calc_cond_uncond_batch``: every concatenable entry in one forward, in Forge's order (the last one first), the
  model function wrapper, and the strength-weighted average of the cond entries;
- ``sampling_function_inner``: the CFG-1 optimisation, the edit strength and post-CFG functions;
- patchers: ``clone`` deep-copies ``model_options`` and copies the extra-model list, as Forge's do; every module a
  patcher wraps gets a ``lora_loader`` that refers back to it (backend/patcher/base.py:63-66), a reference cycle;
- memory management: a list of loaded models that ``load_models_gpu`` fills, moving each module onto its patcher's
  load device (loading one clone unloads the others of the same module, memory_management.py:552-559), and
  ``model_unload`` leaves, back to the offload device;
- files: ``load_torch_file`` as unsafe as Forge's (backend/utils.py:22-47), and ``build_loaded``, Forge's wrapper of
  ``torch.load`` and ``safetensors.torch.load_file`` (modules_forge/patch_basic.py:27-56, 91-92), which ``installed()``
  puts in place: it has no ``weights_only``, and it renames a file it fails to read to ``<file>.corrupted``;
- engines: the tiny devkit families behind Forge's engine interface, with Forge's ``Linear``, which is a plain
  ``nn.Module`` and not an ``nn.Linear`` subclass. A checkpoint file is a safetensors file holding the engine's spec
  (``write_checkpoint``), read by ``forge_loader`` through ``load_torch_file`` as Forge reads any checkpoint.
- ControlNet: entries batch only with the same ``control`` object; the batch's ``transformer_options`` (with
  ``cond_or_uncond``, ``sigmas`` and ``cond_mark``) go to every ControlNet of the chain before ``get_control``
  (sampling_function.py:238-268), and the UNet adds ``control['middle']`` after its middle block and
  ``control['output']`` (popped from the end) to each skip before the concatenation (backend/nn/unet.py:44-52,
  730-736); ``sampling_prepare`` loads the chain's networks and calls ``pre_run``, ``sampling_cleanup`` ``cleanup``
  (:366-408). The ControlNet objects themselves: ``controlnet``.
Areas, masks and memory estimates beyond a rough figure are left out.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import weakref
from types import ModuleType, SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from devkit.families import FAMILIES, LATENT_FORMATS

# --- backend.sampling.condition ---------------------------------------------------------------------------------


def repeat_to_batch_size(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.shape[0] > batch:
        return t[:batch]
    if t.shape[0] < batch:
        return t.repeat([math.ceil(batch / t.shape[0])] + [1] * (t.ndim - 1))[:batch]
    return t


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def process_cond(self, batch_size, device, **kwargs):
        return type(self)(repeat_to_batch_size(self.cond, batch_size).to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond, *(o.cond for o in others)])


class ConditionCrossAttn(Condition):
    def can_concat(self, other):
        a, b = self.cond.shape, other.cond.shape
        if a == b:
            return True
        if a[0] != b[0] or a[2] != b[2]:
            return False
        return math.lcm(a[1], b[1]) // min(a[1], b[1]) <= 4

    def concat(self, others):
        conds = [self.cond, *(o.cond for o in others)]
        length = math.lcm(*(c.shape[1] for c in conds))
        return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


class ConditionConstant(Condition):
    def process_cond(self, batch_size, device, **kwargs):
        return type(self)(self.cond)

    def can_concat(self, other):
        return self.cond == other.cond

    def concat(self, others):
        return self.cond


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [{"cross_attn": cond, "model_conds": {"c_crossattn": ConditionCrossAttn(cond)}}]
    model_conds = {"c_crossattn": ConditionCrossAttn(cond["crossattn"]), "y": Condition(cond["vector"])}
    if "guidance" in cond:
        model_conds["guidance"] = Condition(cond["guidance"])
    return [{"cross_attn": cond["crossattn"], "pooled_output": cond["vector"], "model_conds": model_conds}]


def compile_weighted_conditions(cond, weights):
    results = []
    for position in map(list, zip(*weights, strict=False)):
        indices = [i for i, _ in position]
        feed = cond.advanced_indexing(indices) if hasattr(cond, "advanced_indexing") else cond[indices]
        entry = compile_conditions(feed)
        entry[0]["strength"] = position[-1][1]
        results += entry
    return results


# --- backend.sampling.sampling_function --------------------------------------------------------------------------


def _concatenable(a: dict, b: dict) -> bool:
    ca, cb = a["model_conds"], b["model_conds"]
    if a.get("control") is not b.get("control"):  # can_concat_cond: the same control object or none
        return False
    return ca.keys() == cb.keys() and all(ca[k].can_concat(cb[k]) for k in ca)


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out = [torch.zeros_like(x_in), torch.zeros_like(x_in)]
    count = [torch.ones_like(x_in) * 1e-37, torch.ones_like(x_in) * 1e-37]
    to_run = [(e, 0) for e in cond] + [(e, 1) for e in (uncond or [])]
    while to_run:
        first = to_run[0][0]
        picked = [i for i, (e, _) in enumerate(to_run) if _concatenable(e, first)]
        items = [to_run.pop(i) for i in reversed(picked)]
        processed = [{k: c.process_cond(batch_size=x_in.shape[0], device=x_in.device)
                      for k, c in e["model_conds"].items()} for e, _ in items]
        c = {k: processed[0][k].concat([p[k] for p in processed[1:]]) for k in processed[0]}
        cond_or_uncond = [u for _, u in items]
        n = len(items)
        cond_mark = torch.Tensor([u for u in cond_or_uncond for _ in range(timestep.shape[0])]).to(timestep)
        to = {**model_options.get("transformer_options", {}), "cond_or_uncond": cond_or_uncond, "sigmas": timestep,
              "cond_mark": cond_mark}
        c["transformer_options"] = to
        inputs, ts = torch.cat([x_in] * n), torch.cat([timestep] * n)
        control = items[0][0].get("control")
        if control is not None:
            chained = control
            while chained is not None:
                chained.transformer_options = to
                chained = chained.previous_controlnet
            c["control"] = control.get_control(inputs, ts, c.copy(), n)
        if "model_function_wrapper" in model_options:
            args = {"input": inputs, "timestep": ts, "c": c, "cond_or_uncond": cond_or_uncond}
            output = model_options["model_function_wrapper"](model.apply_model, args).chunk(n)
        else:
            output = model.apply_model(inputs, ts, **c).chunk(n)
        for o, (entry, which) in zip(output, items, strict=True):
            mult = torch.ones_like(x_in) * entry.get("strength", 1.0)
            out[which] += o * mult
            count[which] += mult
    return out[0] / count[0], out[1] / count[1]


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, seed=None):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, None if skip else uncond, x, timestep, model_options)
    if not math.isclose(edit_strength, 1.0):
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "model": model, "uncond_denoised": uncond_pred,
                     "cond_denoised": cond_pred, "sigma": timestep, "model_options": model_options, "input": x})
    return result


def sampling_prepare(unet, x) -> None:
    b, c, h, w = x.shape
    extra = list(unet.extra_model_patchers_during_sampling)
    if unet.controlnet_linked_list is not None:
        extra += unet.controlnet_linked_list.get_models()
    load_models_gpu([unet, *extra], unet.memory_required([2 * b, c, h, w]),
                    unet.extra_preserved_memory_during_sampling)
    for cnet in unet.list_controlnets():
        cnet.pre_run(unet.model, lambda p: unet.model.predictor.percent_to_sigma(p))


def sampling_cleanup(unet) -> None:
    for cnet in unet.list_controlnets():
        cnet.cleanup()


# --- backend.memory_management ------------------------------------------------------------------------------------

current_loaded_models: list = []
load_calls: list[dict] = []  # what each load_models_gpu call asked for (weakly: a record keeps nothing alive)
empty_cache_calls: list[int] = []


class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    def model_unload(self, avoid_model_moving=False):
        self.model.unloads += 1
        self.model.forge_unpatch_model(None if avoid_model_moving else self.model.offload_device)

    def __eq__(self, other):
        return self.model is other.model


def unload_model_clones(model):
    for i in range(len(current_loaded_models) - 1, -1, -1):
        if model.is_clone(current_loaded_models[i].model):
            current_loaded_models.pop(i).model_unload(avoid_model_moving=True)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    load_calls.append({"models": [weakref.ref(m) for m in models], "memory_required": memory_required,
                       "hard_memory_preservation": hard_memory_preservation})
    for m in models:
        entry = LoadedModel(m)
        if entry in current_loaded_models:
            current_loaded_models.insert(0, current_loaded_models.pop(current_loaded_models.index(entry)))
            continue
        unload_model_clones(m)
        m.model.to(m.load_device)  # LoadedModel.model_load: onto the patcher's own load device
        current_loaded_models.insert(0, entry)


def load_model_gpu(model):
    load_models_gpu([model])


def soft_empty_cache(force=False):
    empty_cache_calls.append(1)


# --- backend.patcher ------------------------------------------------------------------------------------------------


class LoraLoader:
    """backend/patcher/lora.py:344-349: one per module, shared by all its patchers' clones, and referring back."""

    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.online_backup = []
        self.loaded_hash = str([])


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None):
        self.model = model
        self.load_device = load_device or torch.device("cpu")
        self.offload_device = offload_device or torch.device("cpu")
        self.model_options = {"transformer_options": {}}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.unloads = 0
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = type(self)(self.model, self.load_device, self.offload_device)
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def forge_unpatch_model(self, target_device=None):
        if target_device is not None:
            self.model.to(target_device)
        self.object_patches_backup.clear()

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape)


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.controlnet_linked_list = None

    def clone(self):
        n = super().clone()
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.controlnet_linked_list = self.controlnet_linked_list
        return n

    def add_patched_controlnet(self, cnet):
        cnet.set_previous_controlnet(self.controlnet_linked_list)
        self.controlnet_linked_list = cnet

    def list_controlnets(self):
        out, pointer = [], self.controlnet_linked_list
        while pointer is not None:
            out.append(pointer)
            pointer = pointer.previous_controlnet
        return out

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes):
        self.extra_preserved_memory_during_sampling += memory_in_bytes

    def add_extra_model_patcher_during_sampling(self, model_patcher):
        self.extra_model_patchers_during_sampling.append(model_patcher)

    def add_conditioning_modifier(self, modifier):
        self.model_options.setdefault("conditioning_modifiers", []).append(modifier)

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = [*self.model_options.get("sampler_post_cfg_function", []),
                                                           fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True


# --- backend.operations (Forge's Linear is not an nn.Linear) and the models ----------------------------------------


class ForgeLinear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def forge_operations(module: nn.Module) -> nn.Module:
    """Swap every ``nn.Linear`` for Forge's, keeping the parameters (attention modules keep their own)."""
    for name, child in module.named_children():
        if isinstance(child, nn.MultiheadAttention):
            continue
        if type(child) is nn.Linear:
            setattr(module, name, ForgeLinear(child))
        else:
            forge_operations(child)
    return module


class Predictor:
    def __init__(self, denoiser, flow: bool):
        self.prediction_type = "const" if flow else getattr(denoiser, "prediction", "epsilon")
        self.sigmas = denoiser.sigmas
        self.denoiser = denoiser
        self.flow = flow

    def noise_scaling(self, sigma, noise, latent, max_denoise=False):
        return sigma * noise + (1 - sigma) * latent if self.flow else latent + noise * sigma

    def percent_to_sigma(self, percent):
        """k_prediction.py:142-148 (and the flow predictors' 1 - percent)."""
        if percent <= 0.0:
            return 1.0 if self.flow else 999999999.9
        if percent >= 1.0:
            return 0.0
        if self.flow:
            return 1.0 - percent
        return float(self.denoiser.t_to_sigma(torch.tensor((1.0 - percent) * 999.0)))

    def timestep(self, sigma):
        return self.denoiser.sigma_to_t(sigma)

    def calculate_input(self, sigma, noise):
        if self.flow:
            return noise
        return noise * (1.0 / (sigma.reshape(-1, *[1] * (noise.ndim - 1)) ** 2 + 1.0) ** 0.5)


class KModel(nn.Module):
    def __init__(self, family):
        super().__init__()
        self.diffusion_model = family.model
        self.denoiser = family.denoiser
        self.predictor = Predictor(family.denoiser, family.is_flow)
        self.computation_dtype = torch.float32

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kw):
        y = kw.get("y")
        with _control_added(self.diffusion_model, control), \
                _attn2_replaced(self.diffusion_model, transformer_options or {}, list(x.shape)):
            return self.denoiser(x, t, c_crossattn if y is None else {"crossattn": c_crossattn, "vector": y})

    def memory_required(self, input_shape):
        return input_shape[0] * input_shape[2] * input_shape[3] * 4 * 1000


@contextlib.contextmanager
def _control_added(unet, control):
    """backend/nn/unet.py's ``apply_control``: the middle residual after the middle block, each output residual
    (from the end of the list) on the skip the next output block concatenates (the last channels of its input)."""
    if not control:
        yield
        return

    def middle(module, args, out):
        ctrl = control["middle"].pop() if control.get("middle") else None
        if ctrl is not None:
            out += ctrl
        return out

    def skip(module, args):
        ctrl = control["output"].pop() if control.get("output") else None
        if ctrl is not None:
            args[0][:, args[0].shape[1] - ctrl.shape[1]:] += ctrl

    handles = [unet.middle_block.register_forward_hook(middle)]
    handles += [block.register_forward_pre_hook(skip) for block in unet.output_blocks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _attn2_replaced(unet, transformer_options, original_shape):
    """backend/nn/unet.py:183-265: a cross-attention whose block key (``(block, id, index)``, else ``(block, id)``) is
    in ``patches_replace["attn2"]`` runs ``to_q``/``to_k``/``to_v``, the replacement with ``extra_options`` (the
    transformer options but the patches, ``n_heads``, ``dim_head``, ``block``, ``block_index``,
    ``original_shape``), then ``to_out``."""
    replace = transformer_options.get("patches_replace", {}).get("attn2", {})
    if not replace:
        yield
        return
    extra = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
    extra["original_shape"] = original_shape
    patched = []
    for part, blocks in (("input", unet.input_blocks), ("middle", [unet.middle_block]), ("output", unet.output_blocks)):
        for i, block in enumerate(blocks):
            inner = [b for m in block if hasattr(m, "transformer_blocks") for b in m.transformer_blocks]
            for j, tb in enumerate(inner):
                key = (part, i, j) if (part, i, j) in replace else (part, i)
                if key not in replace:
                    continue
                attn = tb.attn2
                options = {**extra, "block": (part, i), "block_index": j, "n_heads": attn.heads,
                           "dim_head": attn.to_q.out_features // attn.heads}

                def forward(x, context=None, attn=attn, patch=replace[key], options=options):
                    n = patch(attn.to_q(x), attn.to_k(context), attn.to_v(context), options)
                    return attn.to_out(n)

                attn.forward = forward
                patched.append(attn)
    try:
        yield
    finally:
        for attn in patched:
            del attn.forward


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


_TEXT_NAMES = {"sd1": ["clip_l"], "sd2v": ["clip_h"], "sdxl": ["clip_l", "clip_g"], "flow": ["clip_l"]}
_FLAGS = {"sd1": "is_sd1", "sd2v": "is_sd2", "sdxl": "is_sdxl"}


class Engine:
    def __init__(self, spec: dict):
        kind = spec["family"]
        kwargs = {"text_seed": spec.get("text_seed")}
        if kind == "flow":
            kwargs["latent_format"] = spec.get("latent_format", "sd3")
        fam = FAMILIES[kind](spec.get("seed", 0), **kwargs)
        for m in fam.modules():
            forge_operations(m)
        self.family, self.spec = fam, spec
        encoders = nn.ModuleDict(dict(zip(_TEXT_NAMES[kind], fam.text_encoders, strict=True)))
        fmt = LATENT_FORMATS[fam.latent_format]
        clip = SimpleNamespace(cond_stage_model=encoders, patcher=ModelPatcher(encoders))
        vae = SimpleNamespace(latent_channels=fmt.channels, patcher=ModelPatcher(nn.Identity()),
                              first_stage_model=SimpleNamespace(scaling_factor=fmt.scale, shift_factor=fmt.shift))
        self.forge_objects = ForgeObjects(UnetPatcher(KModel(fam)), clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_sd3 = False
        self.is_inpaint = False
        if kind in _FLAGS:
            setattr(self, _FLAGS[kind], True)
        elif fam.latent_format == "sd3":
            self.is_sd3 = True
        self.clip_skip = 1
        self.encodes = 0
        self.distilled_seen: list = []  # Flux dev reads the distilled guidance from the prompts (flux.py:83-97)

    def set_clip_skip(self, clip_skip):
        self.clip_skip = clip_skip

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        load_model_gpu(self.forge_objects.clip.patcher)
        self.encodes += 1
        self.distilled_seen.append(getattr(prompts, "distilled_cfg_scale", None))
        if self.is_sdxl:
            return self.family.encode(list(prompts), width=prompts.width, height=prompts.height)
        return self.family.encode(list(prompts))


# --- backend.loader, backend.utils, modules_forge.patch_basic --------------------------------------------------------

SPEC_KEY = "fake_forge.spec"  # the engine's spec, as JSON bytes
# a key only full checkpoints of that family have (what lib_delta.hosts.common.files reads from the header)
_FAMILY_MARKERS = {"sd1": "cond_stage_model.transformer.text_model.final_layer_norm.weight",
                   "sd2v": "cond_stage_model.model.ln_final.weight",
                   "sdxl": "conditioner.embedders.1.model.ln_final.weight",
                   "sd3": "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
                   "flux": "double_blocks.0.img_attn.qkv.weight"}


# a flow checkpoint's own text encoder (SD3 and Flux files that include them); a bare one, as models/text_encoder
# holds it
_FLOW_TEXT_KEY = "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight"
MODULE_TEXT_KEY = "text_model.final_layer_norm.weight"
TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")
loads: list[tuple[str, tuple[str, ...]]] = []  # each forge_loader call: the file and the modules given beside it


def write_checkpoint(path, spec: dict, diffusion_only: bool = False) -> None:
    """A checkpoint file for ``forge_loader``: its spec, and the keys that tell its family from the header; with
    ``diffusion_only``, the diffusion model alone (no text encoder key), as Flux files often ship."""
    from safetensors.torch import save_file

    family = spec.get("latent_format", "sd3") if spec["family"] == "flow" else spec["family"]
    tensors = {SPEC_KEY: torch.tensor(list(json.dumps(spec).encode()), dtype=torch.uint8),
               _FAMILY_MARKERS[family]: torch.zeros(1), "model.diffusion_model.out.0.weight": torch.zeros(1)}
    if spec["family"] == "flow":
        tensors[_FLOW_TEXT_KEY] = torch.zeros(1)
    if diffusion_only:
        tensors = {k: v for k, v in tensors.items() if not k.startswith(TEXT_ENCODER_PREFIXES)}
    save_file(tensors, str(path))


def write_text_encoder(path) -> None:
    """A text encoder file of Forge's 'VAE / Text Encoder' box (a bare CLIP-L)."""
    from safetensors.torch import save_file

    save_file({MODULE_TEXT_KEY: torch.zeros(1)}, str(path))


def check_components(state_dict: dict, additional_state_dicts) -> None:
    """backend/loader.py:62-63: a file without its text encoders takes them from the modules given beside it, or
    the load fails."""
    if any(k.startswith(TEXT_ENCODER_PREFIXES) for k in state_dict):
        return
    if any(MODULE_TEXT_KEY in load_torch_file(m) for m in additional_state_dicts or ()):
        return
    raise AssertionError("You do not have CLIP state dict!")


def forge_loader(sd, additional_state_dicts=None):
    """backend/loader.py:498-502: anything wrong with the file is 'Failed to recognize model type!'."""
    loads.append((sd, tuple(additional_state_dicts or ())))
    try:
        state_dict = load_torch_file(sd)
        spec = json.loads(bytes(state_dict[SPEC_KEY].tolist()))
    except Exception:
        raise ValueError("Failed to recognize model type!") from None
    check_components(state_dict, additional_state_dicts)
    engine = Engine(spec)
    if spec["family"] == "flow" and spec.get("latent_format") == "flux":
        engine.__class__ = type("Flux", (Engine,), {})
    return engine


# backend/misc/checkpoint_pickle.py: the "TODO: safe unpickle" module Forge hands torch.load
checkpoint_pickle = ModuleType("checkpoint_pickle")
checkpoint_pickle.load = pickle.load
checkpoint_pickle.Unpickler = type("Unpickler", (pickle.Unpickler,), {})


def load_torch_file(ckpt, safe_load=False, device=None):
    """backend/utils.py:22-47, unsafe where it is: its ``safe_load`` tests ``torch.load`` for ``weights_only``,
    which Forge's wrapper of ``torch.load`` does not have, so it unpickles with the plain unpickler."""
    import safetensors.torch

    if device is None:
        device = torch.device("cpu")
    if ckpt.lower().endswith(".safetensors"):
        return safetensors.torch.load_file(ckpt, device=device.type)
    if safe_load and "weights_only" not in torch.load.__code__.co_varnames:
        print("Warning torch.load doesn't support weights_only on this pytorch version, loading unsafely.")
        safe_load = False
    if safe_load:
        pl_sd = torch.load(ckpt, map_location=device, weights_only=True)
    else:
        pl_sd = torch.load(ckpt, map_location=device, pickle_module=checkpoint_pickle)
    if "global_step" in pl_sd:
        print(f"Global Step: {pl_sd['global_step']}")
    return pl_sd["state_dict"] if "state_dict" in pl_sd else pl_sd


wrapped_calls: list[str] = []  # the files Forge's wrappers were asked to read


def build_loaded(module, loader_name):
    """modules_forge/patch_basic.py:27-56: the original is kept as ``<name>_origin``."""
    original_name = loader_name + "_origin"
    if not hasattr(module, original_name):
        setattr(module, original_name, getattr(module, loader_name))
    original = getattr(module, original_name)

    def loader(*args, **kwargs):
        wrapped_calls.extend(a for a in args if isinstance(a, str))
        try:
            return original(*args, **kwargs)
        except Exception as e:
            message = str(e) + "\n"
            for path in list(args) + list(kwargs.values()):
                if isinstance(path, str) and os.path.exists(path):
                    message += f"File corrupted: {path} \n"
                    os.replace(path, path + ".corrupted")
            raise ValueError(message) from None

    setattr(module, loader_name, loader)


def patch_loaders():
    """What Forge does at start-up; returns the undo."""
    import safetensors.torch

    saved = [(torch, "load", torch.load), (safetensors.torch, "load_file", safetensors.torch.load_file)]
    for module, name, _ in saved:
        build_loaded(module, name)

    def undo():
        for module, name, original in saved:
            setattr(module, name, original)
            vars(module).pop(name + "_origin", None)

    return undo
