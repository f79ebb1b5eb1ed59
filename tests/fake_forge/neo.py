"""The Forge Neo flavour of the stand-in: Neo's pieces where they differ from Forge 2's, at the size the tests need.

Written from Neo v3.5 (release 2.26) as repackaged by exo101/sd-webui-forge-neo-v3 at 5692d2d; the paths cited are
under its ``webui/``. ``installed(neo=True)`` puts these in place of the Forge 2 ones:

- ``modules_forge.forge_version.version == "neo"``, and ``backend.args.dynamic_args``, a class of global model-type
  flags that ``forge_loader`` resets and infers from the file it loads (backend/args.py:148-196, loader.py:885-892);
- ``forge_loader`` raises ``ModuleNotFoundError`` for a model it does not recognise, SD2.x and SD3 among them
  (loader.py:946-950); ``load_torch_file(ckpt, *, safe_load=True, ...)`` reads safetensors with ``safe_open`` and
  anything else with ``torch.load(weights_only=True)`` (utils.py:61-114), through the start-up wrapper of
  ``torch.load`` that renames a file it fails to read to ``.corrupted`` and raises ``BufferError``
  (modules_forge/patch_basic.py:30-59);
- engines keep no latent scale on the VAE (``model_config.latent_format`` holds it), set only ``is_sd1``,
  ``is_sdxl`` and ``is_wan`` (diffusion_engine/base.py:79-85), and are named as Neo's classes; encoding records
  "Emphasis" (and "TI" for a known embedding) in ``dynamic_args.last_extra_generation_params``
  (text_processing/classic_engine.py:230, 259-262), which the processing reads into the target's parameters and
  clears after each conditioning of its own (modules/processing.py:459-466);
- ComfyUI's model patcher (patcher/base.py:169-851): ``patches``, ``parent``, ``detach``, ``__del__``, no
  ``lora_loader``; ComfyUI's memory manager (memory_management.py:436-720): ``LoadedModel.model`` is a weak
  reference (a dead clone's entry turns to its parent), ``model_unload(memory_to_free=None, unpatch_weights=True)``,
  ``load_models_gpu(..., minimum_memory_required=None, ...)``, and a loaded module whose patcher died is reported as
  a "potential memory leak" and collected (``cleanup_models_gc``);
- post-CFG functions get ``cond_scale`` (sampling_function.py:316-318); the prompt parser takes no
  ``use_old_scheduling`` (prompt_parser.py:163, 252).
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
import uuid
import weakref
from types import ModuleType, SimpleNamespace
from typing import ClassVar

import torch
from torch import nn

from devkit.families import FAMILIES, LATENT_FORMATS

from . import backend, webui

CPU = torch.device("cpu")
VERSION, RELEASE = "neo", "2.26"

# --- backend.args -------------------------------------------------------------------------------------------------


class _DynamicArgsMeta(type):
    def __getitem__(cls, key):
        return getattr(cls, key)

    def get(cls, key, default=None):
        return getattr(cls, key, default)

    def __setitem__(cls, key, value):
        setattr(cls, key, value)

    def __contains__(cls, key):
        return hasattr(cls, key)


def make_dynamic_args() -> type:
    """A fresh ``dynamic_args`` class (its state is global in Neo; each installation starts from Neo's defaults)."""

    class dynamic_args(metaclass=_DynamicArgsMeta):  # Neo's name
        embedding_dir = None
        forge_unet_storage_dtype = None
        online_lora = False
        kontext = False
        edit = False
        nunchaku = False
        klein = False
        wan = False
        pid = False
        krea2 = False
        ref_latents: ClassVar[list] = []
        concat_latent = None
        lq_latent: ClassVar[list] = [None, None]
        context_handler = None
        is_referencing = False
        ops = None
        last_extra_generation_params: ClassVar[dict] = {}
        loading_refiner = False

        @classmethod
        def reset(cls):
            if cls.loading_refiner:
                return
            cls.ref_latents.clear()
            cls.concat_latent = None
            cls.lq_latent = [None, None]
            cls.context_handler = None

    return dynamic_args


dynamic_args: type = make_dynamic_args()  # replaced at each installation

# --- backend.memory_management --------------------------------------------------------------------------------------

leak_reports: list[str] = []  # cleanup_models_gc's "Potential memory leak detected with model ..."


class LoadedModel:
    def __init__(self, model):
        self._patcher_finalizer = None
        self._set_model(model)
        self.device = model.load_device
        self.real_model = None
        self.currently_used = True
        self.model_finalizer = None

    def _set_model(self, model):
        self._model = weakref.ref(model)
        if model.parent is not None:
            self._parent_model = weakref.ref(model.parent)
            self._patcher_finalizer = weakref.finalize(model, self._switch_parent)
            self._patcher_finalizer.atexit = False

    def _switch_parent(self):
        model = self._parent_model()
        if model is not None:
            self._set_model(model)

    @property
    def model(self):
        return self._model()

    def model_load(self):
        real_model = self.model.model
        real_model.to(self.device)  # onto the patcher's load device
        self.real_model = weakref.ref(real_model)
        self.model_finalizer = weakref.finalize(real_model, cleanup_models)
        self.model_finalizer.atexit = False
        return real_model

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        self.model.detach(unpatch_weights)
        self.model_finalizer.detach()
        self.model_finalizer = None
        self.real_model = None
        return True

    def __eq__(self, other):
        return self.model is other.model

    def __del__(self):
        if self._patcher_finalizer is not None:
            self._patcher_finalizer.detach()

    def is_dead(self):
        return self.real_model is not None and self.real_model() is not None and self.model is None


def cleanup_models_gc(*, target=()):
    collect, drop = False, []
    for i, entry in enumerate(backend.current_loaded_models):
        if not entry.is_dead():
            continue
        if any(m.model is entry.real_model() for m in target):
            drop.append(i)
            break
        leak_reports.append(type(entry.real_model()).__name__)
        collect = True
    if not collect and not drop:
        return
    for i in reversed(drop):
        backend.current_loaded_models.pop(i)
    gc.collect()


def cleanup_models():
    loaded = backend.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        if not isinstance(loaded[i], LoadedModel):  # a Forge 2 test's list, met by a late finalizer of a Neo test
            continue
        if loaded[i].real_model is None or loaded[i].real_model() is None:
            loaded.pop(i)


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                    force_full_load=False):
    cleanup_models_gc(target=models)
    backend.load_calls.append({"models": [weakref.ref(m) for m in models], "memory_required": memory_required,
                               "minimum_memory_required": minimum_memory_required})
    loaded = backend.current_loaded_models
    to_load = []
    for m in models:
        entry = LoadedModel(m)
        index = next((i for i, e in enumerate(loaded) if e == entry), None)
        if index is None:
            to_load.append(entry)
        else:
            loaded[index].currently_used = True
            to_load.append(loaded[index])
    for entry in to_load:  # every loaded clone of the same module goes, the entry itself included
        for i in [i for i, e in enumerate(loaded) if entry.model.is_clone(e.model)][::-1]:
            gone = loaded.pop(i)
            gone.model.detach(unpatch_all=False)
            gone.model_finalizer.detach()
    for entry in to_load:
        entry.model_load()
        loaded.insert(0, entry)


def load_model_gpu(model):
    return load_models_gpu([model])


# --- backend.patcher ------------------------------------------------------------------------------------------------


def deepcopy_(obj, memo=None):
    """backend/utils.py:349-364: dicts and lists copied, anything else shared."""
    memo = {} if memo is None else memo
    if id(obj) in memo:
        return memo[id(obj)]
    if isinstance(obj, dict):
        res = {deepcopy_(k, memo): deepcopy_(v, memo) for k, v in obj.items()}
    elif isinstance(obj, list):
        res = [deepcopy_(i, memo) for i in obj]
    else:
        res = obj
    memo[id(obj)] = res
    return res


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, *, current_device=None,
                 weight_inplace_update=False):
        self.size = size
        self.model = model
        self.model.device = current_device
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        self.pinned = set()
        self.detaches: list[bool] = []  # the stand-in's record: each detach, whether it unpatched the weights

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size,
                           current_device=self.model.device, weight_inplace_update=self.weight_inplace_update)
        n.patches = {k: v[:] for k, v in self.patches.items()}
        n.patches_uuid = self.patches_uuid
        n.object_patches = self.object_patches.copy()
        n.model_options = deepcopy_(self.model_options)
        n.parent = self
        n.backup, n.object_patches_backup, n.pinned = self.backup, self.object_patches_backup, self.pinned
        return n

    def is_clone(self, other):
        return self.model is getattr(other, "model", None)

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape)

    def set_model_sampler_post_cfg_function(self, post_cfg_function, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = [*self.model_options.get("sampler_post_cfg_function", []),
                                                           post_cfg_function]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def model_patches_to(self, device):
        pass

    def model_patches_models(self):
        return []

    def has_online_lora(self):
        return False

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            self.backup.clear()
            if device_to is not None:
                self.model.to(device_to)
                self.model.device = device_to
        for k in list(self.object_patches_backup):
            setattr(self.model, k, self.object_patches_backup.pop(k))

    def detach(self, unpatch_all=True):
        self.detaches.append(unpatch_all)
        self.model_patches_to(self.offload_device)
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=unpatch_all)
        return self.model

    def __del__(self):
        self.pinned.clear()  # unpin_all_weights
        self.detach(unpatch_all=False)


class UnetPatcher(ModelPatcher):
    @classmethod
    def from_model(cls, model, diffusers_scheduler, config, *, k_predictor=None):
        return cls(model, CPU, CPU)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        n = super().clone()
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes):
        self.extra_preserved_memory_during_sampling += memory_in_bytes

    def add_extra_model_patcher_during_sampling(self, model_patcher):
        self.extra_model_patchers_during_sampling.append(model_patcher)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        self.model_options.setdefault("conditioning_modifiers", []).append(modifier)

    add_patched_controlnet = backend.UnetPatcher.add_patched_controlnet
    list_controlnets = backend.UnetPatcher.list_controlnets


# --- backend.sampling.sampling_function -------------------------------------------------------------------------------


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None,  # noqa: B006
                            return_full=False):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    skip = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    cond_pred, uncond_pred = backend.calc_cond_uncond_batch(model, cond, None if skip else uncond, x, timestep,
                                                            model_options)
    if not math.isclose(edit_strength, 1.0):
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        result = fn({"denoised": result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
                     "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                     "model_options": model_options, "input": x})
    return (result, cond_pred, uncond_pred) if return_full else result


def sampling_prepare(unet, x):
    b, c, h, w = x.shape
    memory = unet.memory_required([2 * b, c, h, w])
    extra = unet.extra_preserved_memory_during_sampling
    models = [unet, *unet.extra_model_patchers_during_sampling]
    if unet.controlnet_linked_list is not None:
        models += unet.controlnet_linked_list.get_models()
    load_models_gpu(models=models, memory_required=memory + extra, minimum_memory_required=memory // 2 + extra)
    for cnet in unet.list_controlnets():
        cnet.pre_run(unet.model, lambda p: unet.model.predictor.percent_to_sigma(p))


# --- engines ----------------------------------------------------------------------------------------------------------


class GuessedLatent:
    """huggingface_guess/latent.py's formats as far as they are read: scale, shift (Flux), channels; Wan21's per-channel
    normalisation is marked by its ``latents_mean``."""

    def __init__(self, channels, scale, shift=None, per_channel=False):
        self.latent_channels, self.scale_factor = channels, scale
        if shift is not None:
            self.shift_factor = shift
        if per_channel:
            self.latents_mean = torch.zeros(1, channels, 1, 1, 1)
            self.latents_std = torch.ones(1, channels, 1, 1, 1)


# (stand-in family, latent format) -> Neo's engine class and its guess's repo and latent format
_ENGINES = {("sd1", "sd1"): ("StableDiffusion", "runwayml/stable-diffusion-v1-5", lambda: GuessedLatent(4, 0.18215)),
            ("sdxl", "sdxl"): ("StableDiffusionXL", "stabilityai/stable-diffusion-xl-base-1.0",
                               lambda: GuessedLatent(4, 0.13025)),
            ("flow", "flux"): ("Flux", "black-forest-labs/FLUX.1-dev", lambda: GuessedLatent(16, 0.3611, 0.1159))}
# a 16-channel flow model of Neo's Wan-latent families, by its spec's "neo_class"
_WAN_LATENT = {"Anima": "circlestone-labs/Anima", "QwenImage": "Qwen/Qwen-Image", "Wan": "Wan-AI/Wan2.1-T2V-14B"}
EMBEDDINGS = {"watercolor-emb"}  # the words the (shared) embedding folder knows, for "TI"


class IntegratedAutoencoderKL(nn.Module):
    """backend/nn/vae.py:286-301: no scaling_factor, no shift_factor."""


class Engine(backend.Engine):
    """A Neo engine over a devkit family (its class is renamed as Neo's: see :func:`_engine_class`)."""

    def __init__(self, spec: dict, repo: str, latent: GuessedLatent):
        kind = spec["family"]
        kwargs = {"text_seed": spec.get("text_seed")}
        if kind == "flow":
            kwargs["latent_format"] = spec.get("latent_format", "flux")
        fam = FAMILIES[kind](spec.get("seed", 0), **kwargs)
        for m in fam.modules():
            backend.forge_operations(m)
        self.family, self.spec = fam, spec
        encoders = nn.ModuleDict(dict(zip(backend._TEXT_NAMES[kind], fam.text_encoders, strict=True)))
        fmt = LATENT_FORMATS[fam.latent_format]
        clip = SimpleNamespace(cond_stage_model=encoders, patcher=ModelPatcher(encoders, CPU, CPU))
        vae = SimpleNamespace(latent_channels=fmt.channels, first_stage_model=IntegratedAutoencoderKL(),
                              patcher=ModelPatcher(nn.Identity(), CPU, CPU))
        unet = UnetPatcher(backend.KModel(fam), CPU, CPU)
        self.model_config = SimpleNamespace(latent_format=latent, huggingface_repo=repo, ztsnr=False)
        self.forge_objects = backend.ForgeObjects(unet, clip, vae)
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()
        self.is_inpaint = False
        self.tiling_enabled = self.use_distilled_cfg_scale = self.use_shift = False
        self.is_sd1, self.is_sdxl = kind == "sd1", kind == "sdxl"
        self.is_wan = type(self).__name__ in _WAN_LATENT
        self.ref_latents: list = []
        self.clip_skip = 1
        self.encodes = 0
        self.distilled_seen: list = []

    @torch.inference_mode()
    def get_learned_conditioning(self, prompts):
        load_model_gpu(self.forge_objects.clip.patcher)
        self.encodes += 1
        self.distilled_seen.append(getattr(prompts, "distilled_cfg_scale", None))
        recorded = dynamic_args.last_extra_generation_params
        recorded["Emphasis"] = "Original"
        used = sorted({w for p in prompts for w in p.replace(",", " ").split() if w in EMBEDDINGS})
        if used:
            recorded["TI"] = ", ".join(filter(None, [recorded.get("TI"), *used]))
        if self.is_sdxl:
            return self.family.encode(list(prompts), width=prompts.width, height=prompts.height)
        return self.family.encode(list(prompts))


@functools.cache
def _engine_class(name: str) -> type:
    return type(name, (Engine,), {})


def forge_loader(sd, additional_state_dicts=None):
    """backend/loader.py:880-950: the guess raises for what it does not know; the global flags are reset and
    inferred from the file and the guessed repo before the engine is built."""
    state_dict = load_torch_file(sd)
    if backend.SPEC_KEY not in state_dict:
        raise ModuleNotFoundError("Failed to recognize model...")
    backend.loads.append((sd, tuple(additional_state_dicts or ())))
    spec = json.loads(bytes(state_dict[backend.SPEC_KEY].tolist()))
    backend.check_components(state_dict, additional_state_dicts)
    latent = spec.get("latent_format", "flux") if spec["family"] == "flow" else spec["family"]
    if spec.get("neo_class") in _WAN_LATENT and latent == "flux":
        name, repo = spec["neo_class"], _WAN_LATENT[spec["neo_class"]]
        guessed = GuessedLatent(16, 1.0, per_channel=True)
    elif (spec["family"], latent) in _ENGINES:
        name, repo, make = _ENGINES[(spec["family"], latent)]
        guessed = make()
    else:  # SD2.x, SD3: huggingface_guess has no such models any more
        raise ModuleNotFoundError("Failed to recognize model...")
    dynamic_args.reset()
    dynamic_args.kontext = "kontext" in str(sd).lower()
    dynamic_args.edit = "qwen" in str(sd).lower() and "edit" in str(sd).lower()
    dynamic_args.nunchaku = False
    dynamic_args.klein = "klein" in repo
    dynamic_args.wan = "Wan" in repo
    dynamic_args.pid = "PiD" in repo
    dynamic_args.krea2 = "krea" in repo.lower()
    dynamic_args.ops = None
    engine = _engine_class(name)(spec, repo, guessed)
    dynamic_args.ops = "ForgeOperations"  # backend/operations.py:685-686, while the engine is built
    return engine


def load_torch_file(ckpt, *, safe_load=True, device=None, return_metadata=False):
    import safetensors

    device = device or CPU
    if ckpt.lower().endswith((".safetensors", ".sft")):
        try:
            with safetensors.safe_open(ckpt, framework="pt", device=device.type) as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception:
            raise ValueError(f'\nModel "{ckpt}" is corrupt or invalid...\nPlease download the model again\n') from None
    assert safe_load
    pl_sd = torch.load(ckpt, map_location=device, weights_only=True)
    return pl_sd["state_dict"] if "state_dict" in pl_sd else pl_sd


def build_loaded(module, loader_name):
    """modules_forge/patch_basic.py:30-59 (Neo): the wrapper keeps the signature (``functools.wraps``), renames a file
    it fails to read to ``<file>.corrupted`` and raises ``BufferError``."""
    original_name = loader_name + "_origin"
    if not hasattr(module, original_name):
        setattr(module, original_name, getattr(module, loader_name))
    original = getattr(module, original_name)

    @functools.wraps(original)
    def loader(*args, **kwargs):
        backend.wrapped_calls.extend(a for a in args if isinstance(a, str))
        try:
            return original(*args, **kwargs)
        except Exception:
            for path in list(args) + list(kwargs.values()):
                if isinstance(path, str) and os.path.isfile(path):
                    os.replace(path, path + ".corrupted")
            raise BufferError("Failed to load model...") from None

    setattr(module, loader_name, loader)


# --- modules.prompt_parser, modules.processing ------------------------------------------------------------------------


def get_learned_conditioning(model, prompts, steps, hires_steps=None):
    cache = {}
    for prompt in dict.fromkeys(prompts):
        conds = model.get_learned_conditioning(webui.SdConditioning([prompt], copy_from=prompts))
        cond = {k: v[0] for k, v in conds.items()} if isinstance(conds, dict) else conds[0]
        cache[prompt] = [webui.ScheduledPromptConditioning(steps, cond)]
    return [cache[p] for p in prompts]


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None):
    flat, indexes = webui.SdConditioning([], copy_from=prompts), []
    for prompt in prompts:
        row = []
        for sub in webui.re_AND.split(prompt):
            text, weight = webui.re_weight.search(sub).groups()
            if text not in flat:
                flat.append(text)
            row.append((flat.index(text), float(weight) if weight is not None else 1.0))
        indexes.append(row)
    learned = get_learned_conditioning(model, flat, steps, hires_steps)
    batch = [[webui.ComposableScheduledPromptConditioning(learned[i], w) for i, w in row] for row in indexes]
    return webui.MulticondLearnedConditioning((len(prompts),), batch)


def record_conds_params(p):
    """What ``get_conds_with_caching`` does after each conditioning of the target: the recorded infotext into the
    target's parameters, then cleared; the hires pass's conditioning does it again."""
    p.extra_generation_params.update(dynamic_args.last_extra_generation_params)
    dynamic_args.last_extra_generation_params.clear()


# --- installation -----------------------------------------------------------------------------------------------------

# the Forge 2 stand-in's names this flavour replaces while installed
_BACKEND = ("LoadedModel", "load_models_gpu", "load_model_gpu", "ModelPatcher", "UnetPatcher", "forge_loader",
            "load_torch_file", "sampling_function_inner", "sampling_prepare", "build_loaded")
_WEBUI = ("get_learned_conditioning", "get_multicond_learned_conditioning", "record_conds_params")


def modules() -> dict[str, ModuleType]:
    """Neo's modules beside Forge 2's stand-ins (``installed`` maps the rest)."""
    forge_version = ModuleType("modules_forge.forge_version")
    forge_version.version, forge_version.release = VERSION, RELEASE
    return {"modules_forge.forge_version": forge_version,
            "backend.args": _module("backend.args", dynamic_args=dynamic_args)}


def apply():
    """Put Neo's pieces in place of Forge 2's in the stand-in modules; returns the undo."""
    global dynamic_args
    dynamic_args = make_dynamic_args()
    leak_reports.clear()
    here = globals()
    saved = [(backend, name, getattr(backend, name)) for name in _BACKEND]
    saved += [(webui, name, getattr(webui, name)) for name in _WEBUI]
    for module, name, _ in saved:
        setattr(module, name, here[name])
    old_scheduling = vars(webui.opts).pop("use_old_scheduling", None)  # Neo has no such option

    def undo():
        for module, name, original in saved:
            setattr(module, name, original)
        if old_scheduling is not None:
            webui.opts.use_old_scheduling = old_scheduling

    return undo


def _module(name: str, **attrs) -> ModuleType:
    m = ModuleType(name)
    m.__dict__.update(attrs)
    return m
