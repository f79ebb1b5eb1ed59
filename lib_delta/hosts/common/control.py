"""What every host checks of a ControlNet unit before anything loads: the control model's family and kind, read
from its safetensors header alone, and the control image, decoded only after its size is known.

The family follows the rules of sd-webui-controlnet's ``build_model_by_guess`` (AUTOMATIC1111) which Forge's loader
shares in effect (it guesses the configuration from the same keys); the hosts' own checks go by file name only.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re

import numpy as np

from ...args import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE
from ...errors import DeltaError
from .files import safetensors_shapes

MAX_SIDE = MAX_IMAGE_SIDE  # the panel's uploads are checked against the same bounds
MAX_PIXELS = MAX_IMAGE_PIXELS
FACE_MODEL = "buffalo_l"  # the insightface model both hosts' FaceID preprocessors load
FAMILIES = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL", "sdxl-refiner": "SDXL", "sd3": "SD3", "flux": "Flux"}


def check_face_model(models_root: str, label: str, where: str, installer: str) -> None:
    """A FaceID encoder needs insightface and its face model installed already: the hosts' loaders would download
    the model in the middle of a request."""
    folder = os.path.join(models_root, "insightface", "models")
    face = os.path.join(folder, FACE_MODEL)
    try:
        import insightface  # noqa: F401
    except ImportError:
        face = ""
    if not face or not os.path.isdir(face) or not any(f.endswith(".onnx") for f in os.listdir(face)):
        raise DeltaError(f"The FaceID encoder '{label}'{where} needs its face model (the insightface package and "
                         f"'{FACE_MODEL}' under {folder}), which is not installed: Delta Sampling does not download "
                         f"models during a request. Run a FaceID unit of {installer} once (it installs them), or use "
                         "a CLIP-vision IP-Adapter.")


def is_ipadapter(name: str) -> bool:
    """Whether a name of a host's ControlNet model list (ControlNets and IP-Adapters share it) names an IP-Adapter,
    as every published one's does (``ip-adapter_sd15``, ``ip-adapter-plus_sdxl_vit-h``, ``ip_adapter_faceid``): the
    panel's lists are split by name; the file's tensors decide when a unit runs."""
    return "ipadapter" in re.sub(r"[\s_-]", "", name.lower())


def control_family(path: str) -> tuple[str | None, int | None]:
    """A ControlNet's family (``sd1``, ``sd2``, ``sdxl``) and cross-attention width, from its safetensors header
    (the rules of the extension's ``build_model_by_guess``); ``(None, None)`` when no header tells (a pickle)."""
    shapes = safetensors_shapes(path)
    if not shapes:
        return None, None
    shapes = {k.removeprefix("control_model."): v for k, v in shapes.items()}
    if "input_hint_block.0.weight" in shapes:  # ldm layout
        xl, ctx_key = "label_emb.0.0.bias" in shapes, "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"
    elif "controlnet_cond_embedding.conv_in.weight" in shapes:  # diffusers layout
        xl = "add_embedding.linear_1.weight" in shapes
        ctx_key = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    else:
        return None, None
    context = shapes.get(ctx_key, [None, None])[1]
    if xl:
        return "sdxl", context
    return {768: "sd1", 1024: "sd2"}.get(context or 0), context


def not_a_controlnet(path: str) -> str | None:
    """What a listed control model is when its header says it is no plain ControlNet (None: it is one, or a pickle
    whose kind the builder tells)."""
    shapes = safetensors_shapes(path)
    if not shapes:
        return None
    keys = {k.removeprefix("control_model.") for k in shapes}
    if "lora_controlnet" in keys:
        return "a Control-LoRA"
    if any(k.startswith("ip_adapter.") for k in keys):
        return "an IP-Adapter"
    if "input_hint_block.0.weight" not in keys and "controlnet_cond_embedding.conv_in.weight" not in keys:
        return "not a ControlNet (a T2I-Adapter or another control model)"
    return None


def check_family(path: str, name: str, source_family: str | None, source_context: int | None,
                 source_label: str) -> None:
    """Refuse a control model that is no plain ControlNet, or one of another family (or cross-attention width) than
    the source, from the file's header alone."""
    kind = not_a_controlnet(path)
    if kind:
        raise DeltaError(f"'{name}' is {kind}: only ControlNets run on the Delta Sampling source.")
    family, context = control_family(path)
    mine = FAMILIES.get(source_family or "")
    theirs = FAMILIES.get(family or "")
    if (mine and theirs and mine != theirs) or (None not in (context, source_context) and context != source_context):
        raise DeltaError(f"The ControlNet '{name}' ({theirs or f'{context}-wide context'}) is not made for the "
                         f"source '{source_label}' ({mine or f'{source_context}-wide context'}): a ControlNet runs on "
                         "the source, so choose one of the source's family (e.g. an SD1.5 ControlNet on an SD1.5 "
                         "source, whatever the active model).")


def decode_image(text: str, where: str, what: str = "control image") -> np.ndarray:
    """A base64 PNG/JPEG (or ``data:`` URL) as HWC uint8 RGB; its size is checked before its pixels are read."""
    from PIL import Image, UnidentifiedImageError

    data = "".join((text.split(",", 1)[1] if text.startswith("data:") else text).split())  # wrapped base64 too
    try:
        raw = base64.b64decode(data, validate=True)
        with Image.open(io.BytesIO(raw)) as im:
            w, h = im.size
            if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
                raise DeltaError(f"The {what}{where} is {w}×{h}; at most {MAX_SIDE} pixels a side and "
                                 f"{MAX_PIXELS // 2**20} megapixels are allowed: send a smaller image (it is resized "
                                 "anyway).")
            return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except DeltaError:
        raise
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise DeltaError(f"The {what}{where} is not a readable image ({type(e).__name__}): send a base64 PNG "
                         "or JPEG.") from None
