"""Private models for AUTOMATIC1111: the source base (and fine-tuned checkpoints), built beside the active model.

A private model is found only among the WebUI's listed checkpoints, read on the CPU through the WebUI's own reader
(so a pickled ``.ckpt`` goes through its safe unpickler), constructed the way ``sd_models.load_model`` constructs a
model but without any of its global effects: it is never made active, fires no ``model_loaded_callback`` and
carries no Lora ``network_layer_name`` labels. Its VAE is dropped (the delta lives in latent space). Models are
kept in a bounded pool (:mod:`lib_delta.hosts.common.pool`), keyed by file and hash; a model leaves it through
:func:`_release`, which frees its weights as the WebUI frees a replaced checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import DeltaError
from ...spaces import SD1, SD2, SD3, SDXL, LatentFormat
from ...webui.interfaces import SETTING_CUDA_GRAPH
from ..common import names as listed
from ..common.devices import chosen_device
from ..common.pool import Limits, ModelPool, free_weights

_VAE_PREFIX = "first_stage_model."


@dataclass(eq=False)
class PrivateModel:
    """A loaded checkpoint that only this extension uses."""

    info: Any  # the WebUI's CheckpointInfo
    model: torch.nn.Module
    key: tuple[str, str]
    shorthash: str
    load_seconds: float
    sigma_max: float | None = None  # its own schedule's largest noise level (SD3: None), before any sharing

    def __post_init__(self) -> None:
        if self.sigma_max is None:
            self.sigma_max = own_sigma_max(self.model)

    @property
    def latent(self) -> LatentFormat:
        return latent_format(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.model.parameters()).device


# --- the model's kind ----------------------------------------------------------------------------------------


def own_sigma_max(model: Any) -> float | None:
    """The largest noise level of a discrete (ldm/sgm) model's own schedule; None for a flow model (SD3).

    Read once at load, from the model's own schedule: a target on a zero-terminal-SNR schedule reaches levels the
    source was never trained at."""
    alphas = getattr(model, "alphas_cumprod", None)
    if alphas is None or getattr(model, "is_sd3", False):
        return None
    last = float(alphas[-1])
    return ((1.0 - last) / last) ** 0.5 if last > 0 else None


def latent_format(model: Any) -> LatentFormat:
    if getattr(model, "is_sd3", False):
        return SD3
    if getattr(model, "is_sdxl", False):
        return SDXL
    if getattr(model, "is_sd2", False):
        return SD2
    return SD1


def unet_in_channels(model: Any) -> int:
    diffusion_model = model.model.diffusion_model
    if getattr(model, "is_sd3", False):  # an MMDiT: its patch embedding takes the latent
        return int(diffusion_model.x_embedder.proj.weight.shape[1])
    return int(diffusion_model.input_blocks[0][0].weight.shape[1])


def is_inpainting(model: Any) -> bool:
    return unet_in_channels(model) > int(getattr(model, "latent_channels", 4))


def unsupported_kind(model: Any) -> str | None:
    """Why a model cannot take part in Delta Sampling, or None."""
    if getattr(model, "cond_stage_key", None) == "edit":
        return "an instruct-pix2pix (edit) model"
    key = getattr(getattr(model, "model", None), "conditioning_key", None)
    if key == "crossattn-adm":
        return "an unCLIP model"
    if getattr(model, "depth_model", None) is not None:
        return "a depth-to-image model"
    return None


def info_label(info: Any) -> str:
    """A listed checkpoint's name as messages show it."""
    return str(getattr(info, "name_for_extra", None) or getattr(info, "name", None) or info)


def model_label(model: Any) -> str:
    info = getattr(model, "sd_checkpoint_info", None)
    return str(getattr(info, "name_for_extra", None) or getattr(info, "name", None) or type(model).__name__)


# --- finding and loading ----------------------------------------------------------------------------------------


def resolve(name: str, what: str = "source checkpoint") -> Any:
    """The listed checkpoint whose title, name, hash or alias is exactly ``name``."""
    return listed.checkpoint(name, what, "the WebUI's")


def key_of(info: Any) -> tuple[str, str]:
    """The pool key of a listed checkpoint: its file and hash (a file replaced under the same name is another)."""
    return os.path.abspath(info.filename), _shorthash(info)


def acquire(info: Any, what: str = "source checkpoint") -> PrivateModel:
    """The pooled private model of a resolved checkpoint, loading it on first use."""
    key = key_of(info)
    return POOL.get(key, lambda: _load(info, key, key[1], what))


def cached() -> list[PrivateModel]:
    return POOL.models()


def _shorthash(info: Any) -> str:
    try:
        value = info.calculate_shorthash()
    except Exception:  # hashing switched off or the file moved: fall back on its size and time
        value = None
    if value:
        return str(value)
    st = os.stat(info.filename)
    return f"{st.st_size:x}-{int(st.st_mtime):x}"


def _load(info: Any, key: tuple[str, str], shorthash: str, what: str) -> PrivateModel:
    from modules import shared

    label = getattr(info, "title", info.name)
    shared.state.textinfo = f"Delta Sampling: loading {what} {label}"
    t0 = time.perf_counter()
    model = _build(info, what)
    seconds = time.perf_counter() - t0
    print(f"Delta Sampling: loaded {what} {label} in {seconds:.1f}s")
    return PrivateModel(info, model, key, shorthash, seconds)


def _build(info: Any, what: str) -> torch.nn.Module:
    """``sd_models.load_model`` without its global effects (see the module doc)."""
    from modules import devices, sd_disable_initialization, sd_models, sd_models_config
    from omegaconf import OmegaConf

    filename = os.path.basename(info.filename)
    try:
        state_dict = sd_models.read_state_dict(info.filename, map_location="cpu")
    except Exception as e:
        if _is_pickle(info.filename) and isinstance(e, (AttributeError, TypeError)) and "NoneType" in str(e):
            # the WebUI's safe unpickler printed why and returned None, which its reader then failed on
            raise DeltaError(f"The WebUI's safe loader refused the {what} '{filename}' as an unsafe pickle (it holds "
                             "objects other than tensors). Convert it to .safetensors, or choose another "
                             "checkpoint.") from e
        raise DeltaError(f"Delta Sampling cannot read the {what} file '{filename}' ({type(e).__name__}: {e}). "
                         "A damaged or truncated file cannot be used: choose another checkpoint or convert it to "
                         ".safetensors.") from e
    if not isinstance(state_dict, dict) or not state_dict:
        raise DeltaError(f"Delta Sampling found no weights in the {what} file '{filename}': the WebUI's safe loader "
                         "refused it or it is empty. Choose another checkpoint or convert it to .safetensors.")
    for k in [k for k in state_dict if k.startswith(_VAE_PREFIX)]:
        del state_dict[k]  # the VAE is never used: don't spend memory on it

    try:
        config = sd_models_config.find_checkpoint_config(state_dict, info)
        sd_config = OmegaConf.load(config)
        sd_models.repair_config(sd_config, state_dict)
        clip_included = any(k in state_dict for k in (sd_models.sd1_clip_weight, sd_models.sd2_clip_weight,
                                                       sd_models.sdxl_clip_weight, sd_models.sdxl_refiner_clip_weight))
        with sd_disable_initialization.DisableInitialization(disable_clip=clip_included), \
                sd_disable_initialization.InitializeOnMeta():
            model = sd_models.instantiate_from_config(sd_config.model, state_dict)
        model.used_config = config
        model.first_stage_model = None
        _load_weights(model, state_dict)
    except DeltaError:
        raise
    except Exception as e:
        raise DeltaError(f"Delta Sampling cannot build a model from the {what} '{filename}' ({type(e).__name__}: "
                         f"{e}). Is it a Stable Diffusion checkpoint the WebUI itself can load?") from e

    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise DeltaError(f"The {what} '{filename}' lacks {len(missing)} weight(s) its architecture needs (e.g. "
                         f"{missing[0]}); choose a complete checkpoint.")
    model.sd_checkpoint_info = info
    model.sd_model_checkpoint = info.filename
    model.lowvram = False
    model.eval().requires_grad_(False)
    _wrap_text_encoders(model)
    devices.torch_gc()
    return model


def _is_pickle(filename: str) -> bool:
    return os.path.splitext(filename)[1].lower() not in (".safetensors", ".gguf")


def _load_weights(model: torch.nn.Module, state_dict: dict) -> None:
    """The model-local part of ``sd_models.load_model_weights``: type flags, SDXL extras, dtype, alphas."""
    from modules import devices, sd_disable_initialization, sd_hijack, sd_models, sd_models_xl

    sd_models.set_model_type(model, state_dict)
    sd_models.set_model_fields(model)
    if model.is_sdxl:
        sd_models_xl.extend_sdxl(model)
    if getattr(model, "is_ssd", False):
        sd_hijack.model_hijack.convert_sdxl_to_ssd(model)
    if hasattr(model, "before_load_weights"):
        model.before_load_weights(state_dict)
    dtype = devices.dtype_unet
    conversion = None if dtype == torch.float32 else {"first_stage_model": None, "alphas_cumprod": None, "": dtype}
    with sd_disable_initialization.LoadStateDictOnMeta(state_dict, device=torch.device("cpu"),
                                                       weight_dtype_conversion=conversion):
        model.load_state_dict(state_dict, strict=False)
    if hasattr(model, "after_load_weights"):
        model.after_load_weights(state_dict)
    state_dict.clear()
    model.is_sdxl_inpaint = bool(model.is_sdxl and unet_in_channels(model) == 9)
    # Layers built on meta take the file's dtype: cast everything as the WebUI does (float() with --no-half, else
    # half()), with alphas_cumprod kept in float32.
    alphas = getattr(model, "alphas_cumprod", None)
    if alphas is not None:
        model.alphas_cumprod = None
    model.to(dtype)
    if alphas is not None:
        model.alphas_cumprod = alphas.float()
        model.alphas_cumprod_original = model.alphas_cumprod


def _wrap_text_encoders(model: torch.nn.Module) -> None:
    """Wrap the text encoders like the WebUI does (emphasis, long prompts, embeddings), keeping its globals.

    ``model_hijack.hijack`` also retargets the token counter and the layer list at this model: both are put back.
    """
    from modules import sd_hijack, sd_unet

    hijack = sd_hijack.model_hijack
    saved = (hijack.clip, hijack.layers, getattr(hijack, "optimization_method", None),
             getattr(sd_unet, "original_forward", None))
    try:
        hijack.hijack(model)
    finally:
        hijack.clip, hijack.layers = saved[0], saved[1]
        if saved[2] is not None:
            hijack.optimization_method = saved[2]
        if hasattr(sd_unet, "original_forward"):
            sd_unet.original_forward = saved[3]


# --- where the models live ----------------------------------------------------------------------------------------


def source_device() -> torch.device:
    """The device the ``delta_sampling_device`` option names: "same" (the WebUI's), "cpu" or "cuda:N"."""
    from modules import devices, shared

    device = chosen_device(shared.opts)
    return torch.device(devices.device) if device is None else device


def runs_beside(device: torch.device) -> bool:
    """Whether the source runs on a GPU the target does not use. Its call is then started before the target's
    forward of the same step (``DeltaGuidance.prefetch``), and the two devices compute at the same time."""
    from modules import devices

    return device.type == "cuda" and _resolved(device) != _resolved(torch.device(devices.device))


def _resolved(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def target_uses_lowvram() -> bool:
    from modules import lowvram, shared

    return bool(lowvram.is_enabled(shared.sd_model))


MIN_GRAPH_STEPS = 6  # recording costs about three forwards: a shorter pass gains nothing from the graph


def graphs_allowed(device: torch.device) -> bool:
    """Whether the source's forward may be replayed as a CUDA graph: on a GPU, with the model resident for the
    whole generation (not under --lowvram/--medvram, which move modules inside the forward), unless switched off."""
    from modules import shared

    if device.type != "cuda" or not bool(getattr(shared.opts, SETTING_CUDA_GRAPH, True)):
        return False
    return not target_uses_lowvram()


def placement(device: torch.device) -> torch.device:
    """Where a generation keeps its private modules: on its device, or on the CPU under --lowvram/--medvram."""
    return torch.device("cpu") if target_uses_lowvram() and device.type != "cpu" else device


def place_for_generation(entry: PrivateModel, device: torch.device) -> None:
    """Put a model where the generation runs it: on its device, or on the CPU under --lowvram/--medvram."""
    wanted = placement(device)
    if entry.device != wanted:
        entry.model.to(wanted)


# What a source call needs beside its weights when it stays on the GPU under --medvram: the activations of its
# batched call (an SD1.5 UNet on 4 rows at 1024 px with SDP attention) and the target's, with some slack.
RESIDENT_HEADROOM = 2 << 30


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def shared_flag(name: str) -> bool:
    from modules import shared

    return bool(getattr(shared.cmd_opts, name, False))


def stays_resident(module: torch.nn.Module, device: torch.device) -> bool:
    """Under --medvram (not --lowvram) a module stays on the GPU for the rest of the generation once the free memory
    holds it beside the target's UNet: one move per generation instead of two per step, which on a card with room
    is most of what --medvram costs Delta Sampling. Without room it visits per call, as under --lowvram."""
    if shared_flag("lowvram"):
        return False
    if all(t.device == device for t in module.parameters()):
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return free >= module_bytes(module) + RESIDENT_HEADROOM


@contextlib.contextmanager
def on_device(entry: PrivateModel, module: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """Run ``module`` on ``device``. Under --lowvram/--medvram it either stays there once it fits beside the target
    (:func:`stays_resident`; the run's close sends it back), or the target's modules step aside first (the
    WebUI's own hooks bring them back) and the module returns to the CPU afterwards."""
    if device.type == "cpu" or not target_uses_lowvram():
        yield
        return
    device = _resolved(device)
    if stays_resident(module, device):
        module.to(device)
        yield
        return
    from modules import lowvram

    lowvram.send_everything_to_cpu()
    module.to(device)
    try:
        yield
    finally:
        module.to("cpu")


def _release(entry: PrivateModel) -> None:
    """Free a model at once, as the WebUI frees a replaced checkpoint: its weights' memory returns now, whatever
    still refers to the object, and the bound method the text-encoder hijack left on it (a reference cycle) goes,
    so the object itself dies with its last user."""
    from modules import sd_hijack

    undo = getattr(sd_hijack, "undo_weighted_forward", None)
    if undo is not None:
        undo(entry.model)
    free_weights(entry.model)


def _stash(entry: PrivateModel) -> None:
    if entry.device.type != "cpu":
        entry.model.to("cpu")


POOL: ModelPool[PrivateModel] = ModelPool(release=_release, stash=_stash)


def limits() -> Limits:
    from modules import shared

    return Limits.from_options(shared.opts)


def settle(in_use: list[tuple[str, str]] | None = None) -> None:
    """After a generation: keep what the pool's limits allow of the models it used (see ``common.pool``)."""
    from modules import devices

    had = POOL.keys()
    POOL.settle(in_use or [], limits())
    if had:
        devices.torch_gc()


def forget_all() -> None:
    """Release every pooled model."""
    POOL.clear()
