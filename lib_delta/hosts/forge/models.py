"""Private engines for Forge: the source base (and fine-tuned checkpoints), built beside the active model.

A private engine is found only among Forge's listed checkpoints and built by Forge's own loader
(``backend.loader.forge_loader``), which never touches the active model's weights; on Forge Neo it resets global
model-type flags, which are kept as they were around the call (:mod:`.isolation`). The engines live in a
:class:`~lib_delta.hosts.common.pool.ModelPool`: bounded, and each one leaves through :func:`_release`.

Why releasing takes more than dropping the object: every module a Forge 2 patcher wraps gets a ``lora_loader`` that
refers back to the module (backend/patcher/base.py:63-66), a reference cycle, and Forge collects cycles only after
dropping its own model (modules/sd_models.py:483-487). Encoding a prompt and sampling also put the engine's patchers
in Forge's global list of loaded models. So a release takes them out of that list, breaks the cycle and empties every
weight tensor in place: the memory returns at once, and the engine itself dies by reference counting alone. Neo's
ComfyUI-style patchers make no such cycle; the same release serves both.

Only safetensors (and GGUF) checkpoints are loaded: Forge 2 reads any other file with the plain unpickler
(backend/utils.py:33-40), which runs whatever code a pickle carries; Neo reads it with torch's weights-only
unpickler, but renames a file that fails to load to ``.corrupted`` (modules_forge/patch_basic.py:30-59).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...errors import DeltaError
from ...resolution import native_side
from ...spaces import FLUX, SD1, SD2, SD3, SDXL, LatentFormat, check_latent_compatible
from .. import is_neo
from ..common import names as listed
from ..common.devices import chosen_device
from ..common.files import checkpoint_family, safetensors_damage, safetensors_keys
from ..common.pool import Limits, ModelPool, free_weights
from . import isolation, memory

# Forge engine class names and flags -> family; the names match lib_delta.lora's families where it has them. Class
# names first: Neo's Mugen sets is_sdxl but is a 32-channel flow model (backend/diffusion_engine/mugen.py:61).
_CLASS_FAMILIES = {"Flux": "flux", "Chroma": "chroma", "Flux2": "flux2", "Mugen": "mugen", "Lumina2": "lumina2",
                   "ZImage": "zimage", "QwenImage": "qwen", "Wan": "wan", "Anima": "anima", "Krea2": "krea2",
                   "ErnieImage": "ernie", "PiD": "pid"}
_FLAG_FAMILIES = (("is_sdxl", "sdxl"), ("is_sd3", "sd3"), ("is_sd2", "sd2"), ("is_sd1", "sd1"))
FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sd3": "SD3", "flux": "Flux", "chroma": "Chroma",
                 "flux2": "Flux.2", "mugen": "Mugen", "lumina2": "Lumina 2", "zimage": "Z-Image", "qwen": "Qwen-Image",
                 "wan": "Wan", "anima": "Anima", "krea2": "Krea 2", "ernie": "ERNIE-Image", "pid": "PiD"}
# Families whose VAEs share one latent space (up to the scale): SD1/SD2/SDXL are converted by rescaling alone.
LATENT_SPACES = {"sd1": "sd", "sd2": "sd", "sdxl": "sd", "sd3": "sd3", "flux": "flux", "chroma": "flux",
                 "lumina2": "flux", "zimage": "flux", "flux2": "flux2", "mugen": "flux2", "ernie": "flux2",
                 "qwen": "wan", "wan": "wan", "anima": "wan", "krea2": "wan", "pid": "rgb"}
# Latent spaces scaled by one number and shift, so that another space's latent converts into them through the
# unscaled latent; the others normalise per channel (Wan, Flux.2: huggingface_guess/latent.py) or are pixels (PiD).
_SCALAR_SPACES = {"sd", "sd3", "flux"}
# Header families Forge Neo cannot load at all (huggingface_guess dropped SD2.x and SD3/3.5).
_NOT_IN_NEO = {"sd2": "SD2.x", "sd3": "SD3/3.5"}
# The families Forge 2's loader builds (backend/diffusion_engine of dfdcbab); Neo builds all of FAMILY_LABELS but these.
_IN_FORGE2 = ("sd1", "sd2", "sdxl", "sd3", "flux", "chroma")
# Latent channels of the spaces that convert into one another through the unscaled latent.
_SCALAR_CHANNELS = {"sd": 4, "sd3": 16, "flux": 16}
# A checkpoint file's family (read from its header) -> its latent format, for the checks before loading.
_FILE_FORMATS = {"sd1": SD1, "sd2": SD2, "sdxl": SDXL, "sdxl-refiner": SDXL, "sd3": SD3, "flux": FLUX}
_UNPICKLED = (".safetensors", ".gguf")  # the checkpoint formats Forge reads without unpickling
# Where a checkpoint keeps its text encoders (SD1/SD2, SDXL, SD3/Flux and Neo's families): a file with none of these
# holds the diffusion model alone, as Flux, Chroma and Neo's newer families ship; a GGUF file always does.
_TEXT_ENCODER_PREFIXES = ("cond_stage_model.", "conditioner.", "text_encoders.")


def family_of(engine: Any) -> str:
    name = type(engine).__name__
    if name in _CLASS_FAMILIES:
        return _CLASS_FAMILIES[name]
    for flag, family in _FLAG_FAMILIES:
        if getattr(engine, flag, False):
            return family
    raise DeltaError(f"Delta Sampling does not know the model type {name}: use an SD1.x, SD2.x, SDXL, SD3/3.5 or "
                     "Flux checkpoint.")


def latent_format(engine: Any) -> LatentFormat:
    """The engine's latent format: Forge 2's VAE carries its scale; Neo's keeps none (backend/nn/vae.py:286-301),
    and the model's guess holds it instead (``model_config.latent_format``, huggingface_guess/latent.py)."""
    vae = engine.forge_objects.vae
    first = getattr(vae, "first_stage_model", None)
    scale = getattr(first, "scaling_factor", None)
    if scale is not None:
        shift, channels = getattr(first, "shift_factor", 0.0), vae.latent_channels
    else:
        guessed = engine.model_config.latent_format
        scale, shift = guessed.scale_factor, getattr(guessed, "shift_factor", 0.0)
        channels = getattr(vae, "latent_channels", None) or guessed.latent_channels
    return LatentFormat(FAMILY_LABELS[family_of(engine)], int(channels), float(scale), float(shift or 0.0))


def convention(engine: Any) -> str:
    """How Forge's sampler addresses the model: flow time for rectified-flow ('const') predictors, else VE sigma."""
    return "flow" if engine.forge_objects.unet.model.predictor.prediction_type == "const" else "ve"


def v_prediction(engine: Any) -> bool:
    """Whether the engine predicts v (SD2.x at 768 px): its training size differs from the eps SD2 base's."""
    return engine.forge_objects.unet.model.predictor.prediction_type == "v_prediction"


def sigma_max(engine: Any) -> float | None:
    """A VE engine's largest trained noise level (its own predictor's: Forge rescales only the active model's for
    zero-terminal SNR), so that a target starting above it does not drive the source off its schedule."""
    if convention(engine) != "ve":
        return None
    sigmas = getattr(engine.forge_objects.unet.model.predictor, "sigmas", None)
    return None if sigmas is None or len(sigmas) == 0 else float(sigmas[-1])


def sources_for(target: Any) -> list[str]:
    """The families this Forge loads whose latents convert into the target's: what a refusal suggests."""
    space = LATENT_SPACES[family_of(target)]
    loadable = [f for f in FAMILY_LABELS if f not in _NOT_IN_NEO] if is_neo() else list(_IN_FORGE2)
    return [FAMILY_LABELS[f] for f in loadable if _convertible(LATENT_SPACES[f], space)]


def _convertible(a: str, b: str) -> bool:
    return a == b or (a in _SCALAR_CHANNELS and _SCALAR_CHANNELS[a] == _SCALAR_CHANNELS.get(b))


def same_latent_space(a: Any, b: Any) -> bool:
    """Whether two engines' VAEs share one latent space (then only the scale differs)."""
    return LATENT_SPACES[family_of(a)] == LATENT_SPACES[family_of(b)]


def check_convertible(source: Any, target: Any, source_name: str, target_name: str) -> None:
    """Refuse two latent spaces of equal channels that no scale and shift convert into each other (Neo's Wan and
    Flux.2 latents are normalised per channel)."""
    spaces = LATENT_SPACES[family_of(source)], LATENT_SPACES[family_of(target)]
    if spaces[0] != spaces[1] and not set(spaces) <= _SCALAR_SPACES:
        src, tgt = FAMILY_LABELS[family_of(source)], FAMILY_LABELS[family_of(target)]
        raise DeltaError(f"The source model '{source_name}' ({src}) and the target '{target_name}' ({tgt}) use "
                         "different VAEs whose latents Delta Sampling cannot convert into each other. Choose a source "
                         f"of the target's family ({tgt}).")


def model_label(engine: Any) -> str:
    info = getattr(engine, "sd_checkpoint_info", None)
    return str(getattr(info, "name_for_extra", None) or getattr(info, "name", None) or type(engine).__name__)


@dataclass(eq=False)
class PrivateEngine:
    """A Forge engine that only this extension uses."""

    info: Any  # Forge's CheckpointInfo
    engine: Any  # without its VAE: the delta lives in latent space
    key: tuple[str, ...]  # file, hash and the modules it was built with
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

    @property
    def native_px(self) -> int | None:
        """The side (px) of the area its family was trained at (``source_resolution: native``)."""
        return native_side(self.latent.name, v_prediction(self.engine))

    def patchers(self) -> list[Any]:
        objects = self.engine.forge_objects
        clip, vae = objects.clip, objects.vae
        return [p for p in (objects.unet, getattr(clip, "patcher", None), getattr(vae, "patcher", None)) if p]


# --- finding and checking, before anything loads -----------------------------------------------------------------


def resolve(name: str, what: str = "source checkpoint") -> Any:
    """The listed checkpoint a name refers to exactly; never a path from the request."""
    return listed.checkpoint(name, what, "Forge's")


def key_of(info: Any) -> tuple[str, ...]:
    """The pool key of a listed checkpoint: its file and hash (a file replaced under the same name is another), and
    the modules it is built with (other modules chosen, another model)."""
    return os.path.abspath(info.filename), _file_id(info), *modules_for(info)


def diffusion_only(path: str) -> bool:
    """Whether a checkpoint file holds the diffusion model alone, without text encoders (nor, then, a VAE)."""
    if path.lower().endswith(".gguf"):
        return True
    keys = safetensors_keys(path)
    return keys is not None and not any(k.startswith(_TEXT_ENCODER_PREFIXES) for k in keys)


def chosen_modules() -> tuple[str, ...]:
    """The files chosen in Forge's 'VAE / Text Encoder' box (full paths)."""
    from modules import shared

    return tuple(getattr(shared.opts, "forge_additional_modules", None) or ())


def modules_for(info: Any) -> tuple[str, ...]:
    """What Forge's loader takes beside a checkpoint: nothing for a file with its own text encoders; for a file of
    the diffusion model alone, the modules chosen in 'VAE / Text Encoder', as Forge builds the active model from
    (modules/sd_models.py, forge_model_reload)."""
    return chosen_modules() if diffusion_only(info.filename) else ()


def _file_id(info: Any) -> str:
    sha = getattr(info, "sha256", None)
    if sha:
        return str(sha)
    st = os.stat(info.filename)
    return f"{st.st_size:x}-{int(st.st_mtime):x}"


def check_file(info: Any, what: str = "source checkpoint") -> None:
    """Refuse a file Forge's loader must not read: a pickle (it would run the code in it), or a damaged safetensors
    file (Forge's loader would fail on it, and Forge's wrapper of the safetensors reader then renames the user's file
    to ``.corrupted``, modules_forge/patch_basic.py:41-52)."""
    filename = os.path.basename(info.filename)
    extension = os.path.splitext(filename)[1].lower()
    if not os.path.isfile(info.filename):
        raise DeltaError(f"The Delta Sampling {what} '{filename}' is listed but its file is gone: refresh the "
                         "checkpoint list, or choose another checkpoint.")
    if extension not in _UNPICKLED:
        why = ("Forge Neo would unpickle it (with torch's weights-only loader) and rename it to '.corrupted' if that "
               "failed" if is_neo() else "Forge reads such files with an unrestricted unpickler, which runs any code "
               "hidden in them")
        raise DeltaError(f"The Delta Sampling {what} '{filename}' is a pickled checkpoint. {why}, so Delta Sampling "
                         "loads no pickled checkpoint: convert it to .safetensors (and refresh the checkpoint list), "
                         "or choose another checkpoint.")
    damage = safetensors_damage(info.filename) if extension == ".safetensors" else None
    if damage:
        raise DeltaError(f"The Delta Sampling {what} '{filename}' is damaged or truncated ({damage}): download it "
                         "again, or choose another checkpoint.")
    if extension == ".safetensors" and is_neo():
        _check_neo_loads(info.filename, what)


def _check_neo_loads(path: str, what: str) -> None:
    """Refuse a checkpoint of a family Neo cannot load, rather than let its loader fail on it."""
    family = checkpoint_family(path)
    if family in _NOT_IN_NEO:
        raise DeltaError(f"The Delta Sampling {what} '{os.path.basename(path)}' is an {_NOT_IN_NEO[family]} "
                         "checkpoint, which Forge Neo cannot load (it dropped SD2.x and SD3): choose another "
                         "checkpoint.")


def file_format(info: Any) -> LatentFormat | None:
    """The latent format of a checkpoint file's family, read from its header; None when the header cannot tell."""
    return _FILE_FORMATS.get(checkpoint_family(info.filename) or "")


def check_pairing(source: Any, tuned: list[Any], target: Any) -> None:
    """What the files' headers already tell: a source of another latent space than the target, a fine-tuned
    checkpoint of another family than the source. Files whose header cannot tell are checked once loaded."""
    theirs = file_format(source)
    if theirs is not None:
        check_latent_compatible(theirs, latent_format(target), info_label(source), model_label(target),
                                sources_for(target))
    for info in tuned:
        fmt = file_format(info)
        if theirs is not None and fmt is not None and fmt != theirs:
            raise DeltaError(f"The fine-tuned checkpoint '{info_label(info)}' ({fmt.name}) is not of the source base "
                             f"'{info_label(source)}' ({theirs.name}): a fine-tune must come from the source base's "
                             "model family.")


def info_label(info: Any) -> str:
    """A listed checkpoint's name as messages show it."""
    return str(getattr(info, "name_for_extra", None) or info.name)


# --- loading -----------------------------------------------------------------------------------------------------


def acquire(info: Any, what: str = "source checkpoint") -> PrivateEngine:
    """The pooled private engine of a resolved, checked checkpoint, loading it on first use."""
    key = key_of(info)
    return POOL.get(key, lambda: _load(info, key, what))


def _load(info: Any, key: tuple[str, ...], what: str) -> PrivateEngine:
    from backend.loader import forge_loader
    from modules import shared

    label = getattr(info, "title", info.name)
    shared.state.textinfo = f"Delta Sampling: loading {what} {label}"
    filename = os.path.basename(info.filename)
    modules = list(key[2:])
    t0 = time.perf_counter()
    try:
        with isolation.model_flags_kept():  # Neo's loader resets the active model's global flags
            engine = forge_loader(info.filename, additional_state_dicts=modules or None)
    except Exception as e:
        raise DeltaError(_cannot_build(what, filename, modules, e)) from e
    if engine is None:  # Forge 2; Neo raises instead (backend/loader.py:950)
        raise DeltaError(f"Forge does not recognise the model type of the {what} '{filename}'.")
    engine.sd_checkpoint_info = info
    latent = latent_format(engine)
    vae = engine.forge_objects.vae
    for objects in (engine.forge_objects, engine.forge_objects_original, engine.forge_objects_after_applying_lora):
        objects.vae = None
    _free(getattr(vae, "patcher", None))  # never used, and its module is in a cycle of its own
    seconds = time.perf_counter() - t0
    print(f"Delta Sampling: loaded {what} {label} in {seconds:.1f}s")
    return PrivateEngine(info, engine, key, seconds, latent)


def _cannot_build(what: str, filename: str, modules: list[str], error: Exception) -> str:
    """Why Forge's loader failed on a file, and the way out: a file of the diffusion model alone is built with the
    text encoders and VAE chosen in 'VAE / Text Encoder' (Forge asserts 'You do not have CLIP state dict!' and the
    like without them)."""
    why = f"{type(error).__name__}: {error}"
    missing = isinstance(error, AssertionError) and "You do not have" in str(error)
    if missing and not modules:
        return (f"The Delta Sampling {what} '{filename}' holds the diffusion model alone ({why}). Forge builds such "
                "a model with the text encoders and VAE chosen in 'VAE / Text Encoder', and Delta Sampling builds "
                "the source with them too: choose its family's files there, or a checkpoint that includes them.")
    if modules:
        chosen = ", ".join(os.path.basename(m) for m in modules)
        return (f"Delta Sampling cannot build a model from the {what} '{filename}' with the files chosen in 'VAE / "
                f"Text Encoder' ({chosen}) ({why}). Choose the text encoders and VAE of its family there, or a "
                "checkpoint that includes them.")
    return (f"Delta Sampling cannot build a model from the {what} '{filename}' ({why}). Is it a checkpoint Forge "
            "itself can load?")


# --- releasing ---------------------------------------------------------------------------------------------------


def unload(entry: PrivateEngine) -> None:
    """Take the engine's parts out of Forge's list of loaded models, back to their offload device."""
    _forget_loaded(entry.patchers(), move_weights=True)


def _forget_loaded(patchers: list[Any], move_weights: bool) -> None:
    """Remove from Forge's loaded-model list every entry for these patchers' modules (clones included)."""
    modules = {id(p.model) for p in patchers}
    loaded = memory.entries()
    for i in range(len(loaded) - 1, -1, -1):
        if id(memory.module_of(loaded[i])) in modules:
            memory.unload(loaded.pop(i), move_weights)


def _release(entry: PrivateEngine) -> None:
    """Free an engine now, whatever still refers to it (see the module doc)."""
    try:
        patchers = entry.patchers()
        _forget_loaded(patchers, move_weights=False)  # its weights are emptied next: moving them is wasted work
        for patcher in patchers:
            _free(patcher)
    except Exception as e:  # the pool has let it go already; a release must not fail the generation that asked
        print(f"Delta Sampling: warning: {entry.title} was not fully freed ({type(e).__name__}: {e})")


def _free(patcher: Any) -> None:
    """Break the module's ``lora_loader`` cycle and empty its weights in place."""
    module = getattr(patcher, "model", None)
    if not isinstance(module, torch.nn.Module):
        return
    loader = vars(module).pop("lora_loader", None)
    if loader is not None:  # its backups are weights too (an offline LoRA merged into the module)
        for name in ("backup", "online_backup"):
            getattr(loader, name, {}).clear()
    free_weights(module)


def _stash(entry: PrivateEngine) -> None:
    unload(entry)


POOL: ModelPool[PrivateEngine] = ModelPool(release=_release, stash=_stash)


def limits() -> Limits:
    from modules import shared

    return Limits.from_options(shared.opts)


def prepare(wanted: Sequence[tuple[str, str]]) -> None:
    """A generation starts: release every engine it does not name before anything new loads."""
    _emptying_cache(lambda: POOL.prepare(wanted))


def settle(in_use: Sequence[tuple[str, str]]) -> None:
    """After a generation (or a failed start): keep what the pool's limits allow of the engines it used, in its
    order (the source first), as the ``delta_sampling_cache`` option says (see ``common.pool``)."""
    _emptying_cache(lambda: POOL.settle(in_use, limits()), moves=True)


def discard_fresh() -> None:
    """A start failed: release what it loaded."""
    _emptying_cache(POOL.discard_fresh)


def _emptying_cache(change: Callable[[], None], moves: bool = False) -> None:
    """Run a pool change; when it released (or, ``moves``, may have moved) an engine, give the device's cached
    memory back as Forge does after unloading."""
    had = set(POOL.keys())
    change()
    if had and (moves or had - set(POOL.keys())):
        from backend import memory_management

        memory_management.soft_empty_cache()


def place(entry: PrivateEngine) -> None:
    """Run the engine where the ``delta_sampling_device`` option says: "same" (Forge's device), "cpu" or "cuda:N".

    Forge's memory manager loads each patcher onto its own load device, so that is all that changes."""
    from modules import shared

    device = chosen_device(shared.opts) or entry.home_device
    if device != entry.unet.load_device:
        unload(entry)
        entry.unet.load_device = device


def cached() -> list[PrivateEngine]:
    return POOL.models()


def forget_all() -> None:
    """Release every pooled engine (the scripts are being reloaded)."""
    _emptying_cache(POOL.clear)
