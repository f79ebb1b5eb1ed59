"""Private engines for Forge: the source base (and fine-tuned checkpoints), built beside the active model.

A private engine is found only among Forge's listed checkpoints and built by Forge's own loader
(``backend.loader.forge_loader``), which never touches the active model. It is kept referenced here: Forge unloads
any model that nothing else references. Encoding a prompt registers its text encoder in Forge's global list of
loaded models, and sampling registers its UNet, so dropping an engine also takes its parts out of that list.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from ...errors import DeltaError
from ...spaces import LatentFormat
from ..common import names as listed

# Models kept between generations, keyed by file and hash (the one piece of module state besides registration).
_cache: dict[tuple[str, str], PrivateEngine] = {}

# Forge engine flags and class names -> family; the names match lib_delta.lora's families where it has them.
_FLAG_FAMILIES = (("is_sdxl", "sdxl"), ("is_sd3", "sd3"), ("is_sd2", "sd2"), ("is_sd1", "sd1"))
_CLASS_FAMILIES = {"Flux": "flux", "Chroma": "chroma"}
FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "chroma": "Chroma"}
# Families whose VAEs share one latent space (up to the scale): SD1/SD2/SDXL are converted by rescaling alone.
LATENT_SPACES = {"sd1": "sd", "sd2": "sd", "sdxl": "sd", "sd3": "sd3", "flux": "flux", "chroma": "flux"}


def family_of(engine: Any) -> str:
    for flag, family in _FLAG_FAMILIES:
        if getattr(engine, flag, False):
            return family
    name = type(engine).__name__
    if name in _CLASS_FAMILIES:
        return _CLASS_FAMILIES[name]
    raise DeltaError(f"Delta Sampling does not know the model type {name}: use an SD1.x, SD2.x, SDXL, SD3/3.5 or "
                     "Flux checkpoint.")


def latent_format(engine: Any) -> LatentFormat:
    """The engine's latent format, read from its own VAE."""
    vae = engine.forge_objects.vae
    first = vae.first_stage_model
    return LatentFormat(FAMILY_LABELS[family_of(engine)], int(vae.latent_channels), float(first.scaling_factor),
                        float(getattr(first, "shift_factor", 0.0) or 0.0))


def convention(engine: Any) -> str:
    """How Forge's sampler addresses the model: flow time for rectified-flow ('const') predictors, else VE sigma."""
    return "flow" if engine.forge_objects.unet.model.predictor.prediction_type == "const" else "ve"


def sigma_max(engine: Any) -> float | None:
    """A VE engine's largest trained noise level (its own predictor's: Forge rescales only the active model's for
    zero-terminal SNR), so that a target starting above it does not drive the source off its schedule."""
    if convention(engine) != "ve":
        return None
    sigmas = getattr(engine.forge_objects.unet.model.predictor, "sigmas", None)
    return None if sigmas is None or len(sigmas) == 0 else float(sigmas[-1])


def same_latent_space(a: Any, b: Any) -> bool:
    """Whether two engines' VAEs share one latent space (then only the scale differs)."""
    return LATENT_SPACES[family_of(a)] == LATENT_SPACES[family_of(b)]


def model_label(engine: Any) -> str:
    info = getattr(engine, "sd_checkpoint_info", None)
    return str(getattr(info, "name_for_extra", None) or getattr(info, "name", None) or type(engine).__name__)


@dataclass(eq=False)
class PrivateEngine:
    """A Forge engine that only this extension uses."""

    info: Any  # Forge's CheckpointInfo
    engine: Any  # without its VAE: the delta lives in latent space
    key: tuple[str, str]
    load_seconds: float
    latent: LatentFormat
    home_device: Any = None  # where Forge would run it (its UNet patcher's load device)

    def __post_init__(self) -> None:
        if self.home_device is None:
            self.home_device = self.unet.load_device

    @property
    def title(self) -> str:
        return str(getattr(self.info, "name_for_extra", None) or self.info.name)

    @property
    def family(self) -> str:
        return family_of(self.engine)

    @property
    def unet(self) -> Any:
        return self.engine.forge_objects.unet

    def patchers(self) -> list[Any]:
        objects = self.engine.forge_objects
        clip, vae = objects.clip, objects.vae
        return [p for p in (objects.unet, getattr(clip, "patcher", None), getattr(vae, "patcher", None)) if p]


def resolve(name: str, what: str = "source checkpoint") -> Any:
    """The listed checkpoint a name refers to; never a path from the request."""
    return listed.checkpoint(name, what, "Forge's")


def acquire(name: str, what: str = "source checkpoint") -> PrivateEngine:
    """The cached private engine of a listed checkpoint, loading it on first use."""
    info = resolve(name, what)
    key = (os.path.abspath(info.filename), _file_id(info))
    entry = _cache.get(key)
    if entry is None:
        entry = _load(info, key, what)
        _cache[key] = entry
    return entry


def _file_id(info: Any) -> str:
    sha = getattr(info, "sha256", None)
    if sha:
        return str(sha)
    st = os.stat(info.filename)
    return f"{st.st_size:x}-{int(st.st_mtime):x}"


def _load(info: Any, key: tuple[str, str], what: str) -> PrivateEngine:
    from backend.loader import forge_loader
    from modules import shared

    label = getattr(info, "title", info.name)
    shared.state.textinfo = f"Delta Sampling: loading {what} {label}"
    filename = os.path.basename(info.filename)
    t0 = time.perf_counter()
    try:
        engine = forge_loader(info.filename)
    except Exception as e:
        raise DeltaError(f"Delta Sampling cannot build a model from the {what} '{filename}' ({type(e).__name__}: "
                         f"{e}). Is it a checkpoint Forge itself can load?") from e
    if engine is None:
        raise DeltaError(f"Forge does not recognise the model type of the {what} '{filename}'.")
    engine.sd_checkpoint_info = info
    latent = latent_format(engine)
    for objects in (engine.forge_objects, engine.forge_objects_original, engine.forge_objects_after_applying_lora):
        objects.vae = None
    seconds = time.perf_counter() - t0
    print(f"Delta Sampling: loaded {what} {label} in {seconds:.1f}s")
    return PrivateEngine(info, engine, key, seconds, latent)


def unload(entry: PrivateEngine) -> None:
    """Take the engine's parts out of Forge's list of loaded models (back to their offload device)."""
    from backend import memory_management

    mine = {id(p) for p in entry.patchers()}
    loaded = memory_management.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        if id(loaded[i].model) in mine:
            loaded.pop(i).model_unload()


def settle(in_use: set[tuple[str, str]]) -> None:
    """After a generation, apply the ``delta_sampling_cache`` option: "gpu" leaves the engines where Forge put them,
    "ram" unloads them to the CPU, "free" drops them. Engines the last generation did not use are always dropped."""
    from modules import shared

    policy = str(getattr(shared.opts, "delta_sampling_cache", "ram") or "ram")
    for key, entry in list(_cache.items()):
        if policy == "free" or key not in in_use:
            unload(entry)
            del _cache[key]
        elif policy == "ram":
            unload(entry)


def place(entry: PrivateEngine) -> None:
    """Run the engine where the ``delta_sampling_device`` option says: "same" (Forge's device), "cpu" or "cuda:N".

    Forge's memory manager loads each patcher onto its own load device, so that is all that changes."""
    import torch
    from modules import shared

    choice = str(getattr(shared.opts, "delta_sampling_device", "same") or "same").strip()
    if choice == "same":
        device = entry.home_device
    else:
        try:
            device = torch.device(choice)
        except (RuntimeError, ValueError):
            raise DeltaError(f"Delta Sampling device '{choice}' is not a device name: use 'same', 'cpu' or 'cuda:N' "
                             "(Settings > Delta Sampling).") from None
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device.type == "cuda" and (device.index or 0) >= count:
            raise DeltaError(f"Delta Sampling device '{choice}' does not exist on this machine; use 'same' or 'cpu'.")
    if device != entry.unet.load_device:
        unload(entry)
        entry.unet.load_device = device


def cached() -> list[PrivateEngine]:
    return list(_cache.values())


def forget_all() -> None:
    for entry in _cache.values():
        unload(entry)
    _cache.clear()
