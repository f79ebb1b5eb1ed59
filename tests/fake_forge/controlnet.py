"""Forge's built-in ControlNet as far as the host adapter uses it, written from Forge 2 (dfdcbab) and Neo (5692d2d).

- ``backend.patcher.controlnet``: ``ControlBase``/``ControlNet`` with Forge's hint cache, sigma window (``pre_run`` maps
  the percentages through the model's predictor; a step outside gives the chain's previous result), the
  ``controlnet_model_function_wrapper`` hook of ``transformer_options``, ``control_merge`` (strength, then the
  positive/negative per-layer weights by ``cond_mark``, then the chain's sum) and ``apply_controlnet_advanced``
  (backend/patcher/controlnet.py:11-83, 86-144, 174-345). Neo passes ``control_type`` to the network and unloads
  the network's patcher at ``cleanup`` (Neo's controlnet.py:337-342, 359-363).
- ``modules_forge.shared.try_load_supported_control_model`` and ``supported_controlnet.ControlNetPatcher``: the file
  through ``load_torch_file(safe_load=True)``, an ldm-layout ControlNet (``control_model.`` prefix or none) built at
  the devkit size its keys tell; Neo keeps the module in a cache by path (supported_controlnet.py:25-45, 166-194).
- preprocessors (``modules_forge.supported_preprocessor``): "None", "canny" (edges by thresholded gradient: no OpenCV
  here), "depth_midas" (needs a download: calling it fails) and "tile_colorfix" (hooks the sampling);
- ``lib_controlnet``: ``global_state`` (names "<stem> [<hash>]" in Forge 2, the bare stem in Neo, from one folder),
  ``utils.crop_and_resize_image`` (the crop-to-fill geometry, nearest resampling), ``external_code.ResizeMode``;
- :class:`UserControlNet`, the user's own units as Forge's ControlNet script applies them (scripts/controlnet.py:
  process -> preprocessor and hint at the generation's size; process_before_every_sampling -> weights, soft hires
  weights, ``apply_controlnet_advanced`` on ``p.sd_model.forge_objects.unet``): the reference of the identity tests.
"""

from __future__ import annotations

import enum
import hashlib
import os
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F

from . import backend

NEO = False  # set by installed(neo=...)

# --- backend.patcher.controlnet -----------------------------------------------------------------------------------


def compute_controlnet_weighting(control, cnet):
    positive, negative = cnet.positive_advanced_weighting, cnet.negative_advanced_weighting
    frames = cnet.advanced_frame_weighting
    if positive is None and negative is None and frames is None:
        return control
    to = cnet.transformer_options
    cond_mark = to["cond_mark"]
    if frames is not None:
        frames = torch.Tensor(frames * len(to["cond_or_uncond"])).to(to["sigmas"])
    for k, v in control.items():
        for i in range(len(v)):
            if not isinstance(v[i], torch.Tensor):
                continue
            pw = positive.get(k, [])[i] if positive is not None and i < len(positive.get(k, [])) else 1.0
            nw = negative.get(k, [])[i] if negative is not None and i < len(negative.get(k, [])) else 1.0
            weight = pw * (1.0 - cond_mark) + nw * cond_mark
            weight = weight * (frames if frames is not None else 1.0)
            v[i] = v[i] * weight[:, None, None, None]
    return control


def broadcast_image_to(tensor, target_batch_size, batched_number):
    if tensor.shape[0] == 1:
        return tensor
    per_batch = target_batch_size // batched_number
    tensor = tensor[:per_batch]
    if per_batch > tensor.shape[0]:
        tensor = torch.cat([tensor] * (per_batch // tensor.shape[0]) + [tensor[:(per_batch % tensor.shape[0])]])
    return tensor if tensor.shape[0] == target_batch_size else torch.cat([tensor] * batched_number)


class ControlBase:
    def __init__(self, device=None):
        self.cond_hint_original = None
        self.cond_hint = None
        self.strength = 1.0
        self.timestep_percent_range = (0.0, 1.0)
        self.global_average_pooling = False
        self.timestep_range = None
        self.transformer_options = {}
        self.device = device or torch.device("cpu")
        self.previous_controlnet = None
        self.control_type = None

    def set_cond_hint(self, cond_hint, strength=1.0, timestep_percent_range=(0.0, 1.0)):
        self.cond_hint_original, self.strength, self.timestep_percent_range = cond_hint, strength, \
            timestep_percent_range
        return self

    def pre_run(self, model, percent_to_timestep_function):
        self.timestep_range = (percent_to_timestep_function(self.timestep_percent_range[0]),
                               percent_to_timestep_function(self.timestep_percent_range[1]))
        if self.previous_controlnet is not None:
            self.previous_controlnet.pre_run(model, percent_to_timestep_function)

    def set_previous_controlnet(self, controlnet):
        self.previous_controlnet = controlnet
        return self

    def cleanup(self):
        if self.previous_controlnet is not None:
            self.previous_controlnet.cleanup()
        self.cond_hint = None
        self.timestep_range = None

    def get_models(self):
        return self.previous_controlnet.get_models() if self.previous_controlnet is not None else []

    def copy_to(self, c):
        c.cond_hint_original, c.strength = self.cond_hint_original, self.strength
        c.timestep_percent_range, c.global_average_pooling = self.timestep_percent_range, self.global_average_pooling

    def inference_memory_requirements(self, dtype):
        return 0

    def control_merge(self, control_input, control_output, control_prev, output_dtype):
        out = {"input": [], "middle": [], "output": []}
        if control_output is not None:
            for i, x in enumerate(control_output):
                key = "middle" if i == len(control_output) - 1 else "output"
                if x is not None:
                    x *= self.strength
                    x = x.to(output_dtype)
                out[key].append(x)
        out = compute_controlnet_weighting(out, self)
        if control_prev is not None:
            for key in ("input", "middle", "output"):
                o = out[key]
                for i, prev in enumerate(control_prev[key]):
                    if i >= len(o):
                        o.append(prev)
                    elif prev is not None:
                        o[i] = prev if o[i] is None else o[i] + prev
        return out


class ControlNet(ControlBase):
    def __init__(self, control_model, global_average_pooling=False, device=None, load_device=None,
                 manual_cast_dtype=None):
        super().__init__(device)
        self.control_model = control_model
        self.load_device = load_device
        self.control_model_wrapped = backend.ModelPatcher(control_model, load_device=load_device,
                                                          offload_device=torch.device("cpu"))
        self.global_average_pooling = global_average_pooling
        self.model_sampling_current = None
        self.manual_cast_dtype = manual_cast_dtype

    def get_control(self, x_noisy, t, cond, batched_number):
        to = self.transformer_options
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number)
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return control_prev
        dtype = self.manual_cast_dtype or self.control_model.dtype
        output_dtype = x_noisy.dtype
        size = (x_noisy.shape[2] * 8, x_noisy.shape[3] * 8)
        if self.cond_hint is None or tuple(self.cond_hint.shape[2:]) != size:
            self.cond_hint = F.interpolate(self.cond_hint_original, size=size, mode="nearest-exact").to(dtype)
        if x_noisy.shape[0] != self.cond_hint.shape[0]:
            self.cond_hint = broadcast_image_to(self.cond_hint, x_noisy.shape[0], batched_number)
        context, y = cond["c_crossattn"], cond.get("y")
        y = None if y is None else y.to(dtype)
        timestep = self.model_sampling_current.timestep(t)
        x_noisy = self.model_sampling_current.calculate_input(t, x_noisy)
        extra = {"control_type": self.control_type} if NEO else {}
        args = dict(x=x_noisy.to(dtype), timesteps=timestep.float(), context=context.to(dtype), y=y, **extra)
        wrapper = to.get("controlnet_model_function_wrapper")
        if wrapper is not None:
            control = wrapper(hint=self.cond_hint, model=self, inner_model=self.control_model, **args)
        else:
            control = self.control_model(hint=self.cond_hint.to(self.device), **args)
        return self.control_merge(None, control, control_prev, output_dtype)

    def copy(self):
        c = ControlNet(self.control_model, global_average_pooling=self.global_average_pooling,
                       load_device=self.load_device, manual_cast_dtype=self.manual_cast_dtype)
        self.copy_to(c)
        return c

    def get_models(self):
        return [*super().get_models(), self.control_model_wrapped]

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.model_sampling_current = model.predictor

    def cleanup(self):
        self.model_sampling_current = None
        if NEO:  # Neo's cleanup unloads the network (its controlnet.py:359-363)
            loaded = backend.current_loaded_models
            for i in [i for i, e in enumerate(loaded) if e.model is self.control_model_wrapped][::-1]:
                loaded.pop(i)
        super().cleanup()


class ControlLora(ControlNet):
    """A Control-LoRA: loads as a ControlNet subclass (the host must refuse it)."""


def apply_controlnet_advanced(unet, controlnet, image_bchw, strength, start_percent, end_percent,
                              positive_advanced_weighting=None, negative_advanced_weighting=None,
                              advanced_frame_weighting=None, advanced_sigma_weighting=None,
                              advanced_mask_weighting=None, control_type=None):
    cnet = controlnet.copy().set_cond_hint(image_bchw, strength, (start_percent, end_percent))
    cnet.positive_advanced_weighting = positive_advanced_weighting
    cnet.negative_advanced_weighting = negative_advanced_weighting
    cnet.advanced_frame_weighting = advanced_frame_weighting
    cnet.control_type = control_type
    m = unet.clone()
    m.add_patched_controlnet(cnet)
    return m


# --- modules_forge.shared, supported_controlnet --------------------------------------------------------------------

supported_preprocessors: dict = {}
supported_control_models: list = []
loaded_files: list[str] = []  # what try_load_supported_control_model read (the tests' record)
_CONTROL_MODEL_CACHE = None  # Neo's module cache by path (a ModelCache), set by install()


class ModelCache:
    def __init__(self):
        self.cache = {}

    def get(self, key):
        return self.cache.get(key)

    def put(self, key, model):
        self.cache[key] = model


def try_load_supported_control_model(ckpt_path):
    loaded_files.append(ckpt_path)
    state_dict = backend.load_torch_file(ckpt_path, safe_load=True)
    for supported in supported_control_models:
        model = supported.try_build_from_state_dict(dict(state_dict), ckpt_path)
        if model is not None:
            return model
    return None


class ControlModelPatcher:
    def __init__(self, model_patcher=None):
        self.model_patcher = model_patcher


class ControlNetPatcher(ControlModelPatcher):
    @staticmethod
    def try_build_from_state_dict(state_dict, ckpt_path):
        from devkit.controlnet import build_controlnet

        if "lora_controlnet" in state_dict:
            return ControlNetPatcher(ControlLora(None))
        prefix = "control_model." if "control_model.zero_convs.0.0.weight" in state_dict else ""
        if f"{prefix}zero_convs.0.0.weight" not in state_dict:
            return None  # a T2I-Adapter in Forge: not modelled
        cache = _CONTROL_MODEL_CACHE
        net = cache.get(ckpt_path) if cache is not None else None
        if net is None:
            family = "sdxl" if f"{prefix}label_emb.0.0.bias" in state_dict else "sd1"
            net = build_controlnet(family)
            net.load_state_dict({k.removeprefix(prefix): v for k, v in state_dict.items()})
            if cache is not None:
                cache.put(ckpt_path, net)
        return ControlNetPatcher(ControlNet(net, load_device=torch.device("cpu")))


# --- modules_forge.supported_preprocessor, modules_forge.utils -------------------------------------------------------


class PreprocessorParameter:
    def __init__(self, minimum=0.0, maximum=1.0, step=0.01, label="Parameter 1", value=0.5, visible=False):
        self.gradio_update_kwargs = dict(minimum=minimum, maximum=maximum, step=step, label=label, value=value,
                                         visible=visible)


class Preprocessor:
    def __init__(self):
        self.name = "PreprocessorBase"
        self.slider_resolution = PreprocessorParameter(label="Resolution", minimum=128, maximum=2048, value=512)
        self.slider_1 = PreprocessorParameter()
        self.slider_2 = PreprocessorParameter()
        self.use_soft_projection_in_hr_fix = False
        self.calls = 0

    def process_after_running_preprocessors(self, process, params, *args, **kwargs):
        return

    def process_before_every_sampling(self, process, cond, mask, *args, **kwargs):
        return cond, mask

    def process_after_every_sampling(self, process, params, *args, **kwargs):
        return

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, slider_3=None, input_mask=None,
                 **kwargs):
        self.calls += 1
        return input_image


class PreprocessorNone(Preprocessor):
    def __init__(self):
        super().__init__()
        self.name = "None"


class PreprocessorCanny(Preprocessor):
    def __init__(self):
        super().__init__()
        self.name = "canny"
        self.slider_1 = PreprocessorParameter(minimum=0, maximum=256, value=100, label="Low Threshold")
        self.slider_2 = PreprocessorParameter(minimum=0, maximum=256, value=200, label="High Threshold")
        self.use_soft_projection_in_hr_fix = True

    def __call__(self, input_image, resolution, slider_1=None, slider_2=None, **kwargs):
        self.calls += 1
        gray = input_image.astype(np.float32).mean(axis=2)
        gy, gx = np.gradient(gray)
        edges = (np.hypot(gx, gy) >= float(slider_1) * 0.5).astype(np.uint8) * 255
        return np.repeat(edges[:, :, None], 3, axis=2)


class PreprocessorNeedingDownload(Preprocessor):
    def __init__(self):
        super().__init__()
        self.name = "depth_midas"

    def __call__(self, *args, **kwargs):
        raise RuntimeError("would download the annotator model from the internet")


class PreprocessorHookingSampling(Preprocessor):
    def __init__(self):
        super().__init__()
        self.name = "tile_colorfix"

    def process_before_every_sampling(self, process, cond, mask, *args, **kwargs):
        raise RuntimeError("hooks the sampling")


def HWC3(x):
    return x if x.ndim == 3 and x.shape[2] == 3 else np.repeat(x[:, :, :1], 3, axis=2)


def numpy_to_pytorch(x):
    return (torch.from_numpy(np.array(x, dtype=np.float32)) / 255.0)[None]


# --- lib_controlnet --------------------------------------------------------------------------------------------------


class ResizeMode(enum.Enum):
    RESIZE = "Just Resize"
    INNER_FIT = "Crop and Resize"
    OUTER_FIT = "Resize and Fill"


def resize_mode_from_value(value):
    if isinstance(value, str):
        return ResizeMode(value)
    if isinstance(value, int):
        return list(ResizeMode)[min(value, 2)] if value != 3 else ResizeMode.RESIZE
    return value


def align_dim_latent(x: int) -> int:
    return (x // 8) * 8


numpy_seeds: list[int] = []


def set_numpy_seed(p):
    seed = int(p.seed) & 0xFFFFFFFF
    numpy_seeds.append(seed)
    np.random.seed(seed)
    return seed


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None].float()
    return F.interpolate(t, size=(h, w), mode="nearest-exact")[0].permute(1, 2, 0).round().byte().numpy()


def crop_and_resize_image(detected_map, resize_mode, h, w, fill_border_with_255=False):
    """lib_controlnet/utils.py:321-360's geometry: stretch, or scale to cover and crop the centre, or scale to fit and
    pad with the median border colour (here: black)."""
    if resize_mode == ResizeMode.RESIZE:
        return _resize(detected_map, h, w)
    old_h, old_w = detected_map.shape[:2]
    k = max(h / old_h, w / old_w) if resize_mode == ResizeMode.INNER_FIT else min(h / old_h, w / old_w)
    nh, nw = round(old_h * k), round(old_w * k)
    scaled = _resize(detected_map, nh, nw)
    if resize_mode == ResizeMode.INNER_FIT:
        top, left = (nh - h) // 2, (nw - w) // 2
        return np.ascontiguousarray(scaled[top:top + h, left:left + w])
    out = np.zeros((h, w, 3), dtype=np.uint8)
    top, left = (h - nh) // 2, (w - nw) // 2
    out[top:top + nh, left:left + nw] = scaled
    return out


def judge_image_type(img):
    return isinstance(img, np.ndarray) and img.ndim == 3 and int(img.shape[2]) in (3, 4)


controlnet_dir = ""
controlnet_filename_dict: dict = {"None": "model.safetensors"}
controlnet_names: list = ["None"]


def update_controlnet_filenames():
    global controlnet_filename_dict, controlnet_names
    controlnet_filename_dict = {"None": None if NEO else "model.safetensors"}
    for name in sorted(os.listdir(controlnet_dir)) if controlnet_dir else []:
        stem, ext = os.path.splitext(name)
        if ext in (".pt", ".pth", ".ckpt", ".safetensors", ".bin"):
            path = os.path.join(controlnet_dir, name)
            short = hashlib.sha256(path.encode()).hexdigest()[:8]
            controlnet_filename_dict[stem if NEO else f"{stem} [{short}]"] = path
    controlnet_names = list(controlnet_filename_dict)
    _state.controlnet_filename_dict, _state.controlnet_names = controlnet_filename_dict, controlnet_names


def get_controlnet_filename(name):
    return controlnet_filename_dict[name]


def get_preprocessor(name):
    """Forge 2 answers None for an unknown name, Neo raises a KeyError (its global_state.py:83-84)."""
    return supported_preprocessors[name] if NEO else supported_preprocessors.get(name)


def listed(stem: str) -> str:
    """The name Forge lists a file under (the tests' helper)."""
    return next(k for k in controlnet_filename_dict if k == stem or k.startswith(stem + " ["))


# --- the user's own units: Forge's ControlNet script ---------------------------------------------------------------

_SOFT = [0.825 ** float(12 - i) for i in range(12)]


class UserControlNet:
    """scripts/controlnet.py's ``ControlNetForForgeOfficial`` for API units (dicts): the reference."""

    def process(self, p, *units):
        self.params = []
        for unit in units:
            pre = supported_preprocessors[unit.get("module", "None")]
            image = HWC3(unit["image"])
            set_numpy_seed(p)
            out = pre(input_image=image, input_mask=None,
                      resolution=int(pre.slider_resolution.gradio_update_kwargs["value"]),
                      slider_1=int(pre.slider_1.gradio_update_kwargs["value"]),
                      slider_2=int(pre.slider_2.gradio_update_kwargs["value"]))
            mode = resize_mode_from_value(unit.get("resize_mode", "Crop and Resize"))
            h, w = align_dim_latent(p.height), align_dim_latent(p.width)
            hr_h, hr_w = align_dim_latent(int(p.height * p.hr_scale)), align_dim_latent(int(p.width * p.hr_scale))
            rows = len(p.prompts)
            cond = numpy_to_pytorch(crop_and_resize_image(out, mode, h, w)).movedim(-1, 1).repeat(rows, 1, 1, 1)
            hr = numpy_to_pytorch(crop_and_resize_image(out, mode, hr_h, hr_w)).movedim(-1, 1).repeat(rows, 1, 1, 1)
            model = try_load_supported_control_model(get_controlnet_filename(unit["model"]))
            self.params.append((unit, pre, model, cond, hr))

    def process_before_every_sampling(self, p, *units, **kwargs):
        for unit, pre, model, cond, hr in self.params:
            weighting = None
            if p.is_hr_pass and pre.use_soft_projection_in_hr_fix:
                weighting = {"input": _SOFT, "middle": [0.561515625] if p.sd_model.is_sdxl else [1.0],
                             "output": _SOFT}
            p.sd_model.forge_objects.unet = apply_controlnet_advanced(
                p.sd_model.forge_objects.unet, model.model_patcher, hr if p.is_hr_pass else cond,
                float(unit.get("weight", 1.0)), float(unit.get("guidance_start", 0.0)),
                float(unit.get("guidance_end", 1.0)), positive_advanced_weighting=weighting,
                negative_advanced_weighting=weighting)


# --- installation -----------------------------------------------------------------------------------------------------

_state = ModuleType("lib_controlnet.global_state")


def modules(neo: bool) -> dict[str, ModuleType]:
    """The modules of Forge's ControlNet, fresh lists each installation."""
    global NEO, _CONTROL_MODEL_CACHE, controlnet_dir
    NEO = neo
    _CONTROL_MODEL_CACHE = ModelCache() if neo else None
    controlnet_dir = ""
    supported_preprocessors.clear()
    for pre in (PreprocessorNone(), PreprocessorCanny(), PreprocessorNeedingDownload(), PreprocessorHookingSampling()):
        supported_preprocessors[pre.name] = pre
    supported_control_models[:] = [ControlNetPatcher]
    loaded_files.clear()
    numpy_seeds.clear()
    _state.__dict__.update(update_controlnet_filenames=update_controlnet_filenames, get_preprocessor=get_preprocessor,
                           get_controlnet_filename=get_controlnet_filename)
    update_controlnet_filenames()
    g = globals()

    def module(name, *names, **attrs):
        m = ModuleType(name)
        m.__dict__.update({n: g[n] for n in names}, **attrs)
        return m

    return {
        "backend.patcher": module("backend.patcher"),
        "backend.patcher.controlnet": module("backend.patcher.controlnet", "ControlBase", "ControlNet", "ControlLora",
                                             "apply_controlnet_advanced", "compute_controlnet_weighting",
                                             "broadcast_image_to"),
        "modules_forge.shared": module("modules_forge.shared", "supported_preprocessors", "supported_control_models",
                                       "try_load_supported_control_model"),
        "modules_forge.supported_controlnet": module("modules_forge.supported_controlnet", "ControlNetPatcher",
                                                     "ControlModelPatcher", _CONTROL_MODEL_CACHE=_CONTROL_MODEL_CACHE),
        "modules_forge.supported_preprocessor": module("modules_forge.supported_preprocessor", "Preprocessor",
                                                       "PreprocessorParameter"),
        "modules_forge.utils": module("modules_forge.utils", "HWC3", "numpy_to_pytorch"),
        "lib_controlnet": module("lib_controlnet"),
        "lib_controlnet.global_state": _state,
        "lib_controlnet.utils": module("lib_controlnet.utils", "align_dim_latent", "set_numpy_seed",
                                       "crop_and_resize_image", "judge_image_type"),
        "lib_controlnet.external_code": module("lib_controlnet.external_code", "ResizeMode",
                                               "resize_mode_from_value"),
    }


def forget_cached() -> None:
    if _CONTROL_MODEL_CACHE is not None:
        _CONTROL_MODEL_CACHE.cache.clear()


def use_folder(path: str) -> None:
    """Forge's ControlNet folder (models/ControlNet) for the tests' files."""
    global controlnet_dir
    controlnet_dir = str(path)
    update_controlnet_filenames()


def write_controlnet(path, family: str = "sd1", seed: int = 0, scale: float = 1.0):
    """A tiny ControlNet file in the layout released ones have (``control_model.`` keys, float16) for the devkit
    UNet of ``family``, its zero convolutions refilled so that it moves the image."""
    import safetensors.torch

    from devkit.controlnet import build_controlnet, fill_zero_convs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_controlnet(family)
    fill_zero_convs(net, torch.Generator().manual_seed(seed + 31), scale)
    sd = {f"control_model.{k}": v.half().contiguous() for k, v in net.state_dict().items()}
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    return path
