"""The settings of one Delta Sampling generation, each declared once: the single source of truth for UI, API,
infotext and X/Y/Z.

Every field of :class:`DeltaSettings`, :class:`AdaptationGroup` and :class:`LoraRef` is a :func:`~.fields.setting`
that names its value kind, API key, positional slot, infotext key, tooltip, control and X/Y/Z axis (see
:mod:`lib_delta.fields`). Three outside forms convert to and from :class:`DeltaSettings` losslessly:
- the API dict (``alwayson_scripts: {"Delta Sampling": {"args": [{...}]}}``): :meth:`DeltaSettings.from_dict`;
- the positional values the UI produces, in :data:`POSITIONAL_FIELDS` order (append-only): :func:`from_positional`;
- infotext key/values: :meth:`DeltaSettings.to_infotext` / :meth:`DeltaSettings.from_infotext`.
Every bad value raises a :class:`DeltaError` that names the setting, what was given and what is allowed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, replace
from typing import Any, ClassVar

from .errors import DeltaError
from .fields import (
    MAX_TEXT,
    NO_OBJECT,
    XYZ,
    Bool,
    Checkpoint,
    Choice,
    Control,
    Groups,
    Infotext,
    Listed,
    Number,
    Objects,
    Setting,
    Text,
    api_subject,
    check_object,
    dump_object,
    group_where,
    num,
    parse_fields,
    parse_object,
    positional_slots,
    read_infotext,
    setting,
    settings_of,
    shown,
    typename,
    write_infotext,
)
from .schedule import SCHEDULES

MODES = ("delta", "base-first")
CFG_MODES = ("cfg", "cond")
TRAJECTORIES = ("shared", "separate")
RESOLUTIONS = ("target", "native")  # where the source runs: the image's size, or its own training area
STRENGTH_RANGE = (-5.0, 5.0)
LORA_WEIGHT_RANGE = (-10.0, 10.0)
SOURCE_CFG_RANGE = (0.0, 30.0)
BASE_FIRST_CFG = 7.0  # the source's scale in base-first mode when none is set: what SD1.5/SDXL bases are made for
MAX_GROUPS = 4
CONTROLNET_WEIGHT_RANGE = (0.0, 2.0)
CONTROLNET_RESIZE_MODES = ("Just Resize", "Crop and Resize", "Resize and Fill")  # sd-webui-controlnet's ResizeMode
MAX_CONTROLNETS = 2  # per group
IPADAPTER_WEIGHT_RANGE = (0.0, 2.0)  # sd-webui-controlnet's unit weight slider
MAX_IPADAPTERS = 2  # per group
MAX_IMAGE_TEXT = 32 * 2**20  # characters of base64: an image of the largest allowed size, compressed
MAX_IMAGE_SIDE = 4096  # pixels a side of a control image: far beyond a generation's control map
MAX_IMAGE_PIXELS = 16 * 2**20

_LORA_TAG = re.compile(r"<lora:([^<>]+)>")


@dataclass(frozen=True)
class LoraRef:
    """A LoRA/LyCORIS file by the name the WebUI lists, with its weights (as ``<lora:name:te:unet>``)."""

    name: str = setting(MISSING, Text(), tooltip="the LoRA's name as /sdapi/v1/loras lists it")
    weight: float = setting(1.0, Number(*LORA_WEIGHT_RANGE), tooltip="its weight (the UNet's, when split)")
    unet_weight: float | None = setting(None, Number(*LORA_WEIGHT_RANGE), tooltip="its UNet weight")
    te_weight: float | None = setting(None, Number(*LORA_WEIGHT_RANGE), tooltip="its text encoder weight")

    def __post_init__(self) -> None:
        # One canonical form, so every outside form round-trips: split weights are both explicit, and `weight`
        # then equals the UNet weight.
        if self.unet_weight is not None or self.te_weight is not None:
            unet = self.weight if self.unet_weight is None else self.unet_weight
            te = self.weight if self.te_weight is None else self.te_weight
            object.__setattr__(self, "unet_weight", unet)
            object.__setattr__(self, "te_weight", te)
            object.__setattr__(self, "weight", unet)

    @property
    def unet(self) -> float:
        return self.weight if self.unet_weight is None else self.unet_weight

    @property
    def te(self) -> float:
        return self.weight if self.te_weight is None else self.te_weight

    def tag(self) -> str:
        if self.unet_weight is None and self.te_weight is None:
            return f"<lora:{self.name}:{num(self.weight)}>"
        return f"<lora:{self.name}:{num(self.te)}:{num(self.unet)}>"


@dataclass(frozen=True)
class Loras(Objects):
    """A group's LoRAs: objects in the API (or tag text), ``<lora:name:weight>`` tags in the panel and infotext."""

    cls: type = LoraRef
    item: str = "LoRA"
    most: int = MAX_TEXT // len("<lora:a:1>")  # more tags than that cannot fit the text
    widget = "loras"

    def parse(self, value: Any, key: str, where: str) -> tuple[LoraRef, ...]:
        if isinstance(value, str):
            return parse_lora_tags(Text().fits(value, api_subject(key, where)))
        if not isinstance(value, (list, tuple)):
            raise DeltaError(f"'{key}'{where} must be a list of {{\"name\": ..., \"weight\": ...}} objects or "
                             f"'<lora:name:weight>' text, not {typename(value)}.")
        if len(value) > self.most:
            raise DeltaError(f"'{key}'{where} lists {len(value)} LoRAs; at most {self.most} are allowed.")
        refs = []
        for i, item in enumerate(value):
            if isinstance(item, str):
                refs.append(LoraRef(Text().parse(item, f"{key}[{i}]", where)))
            elif isinstance(item, Mapping):
                refs.append(parse_object(LoraRef, item, f"'{key}[{i}]'", where, inside=f" ({key}[{i}]){where}"))
            else:
                raise DeltaError(f"'{key}[{i}]'{where} must be an object with 'name' and 'weight', not "
                                 f"{typename(item)}.")
        Text().fits(format_lora_tags(refs), f"{api_subject(key, where)}, written as tags,")
        return tuple(refs)

    def check(self, value: tuple[LoraRef, ...], name: str, where: str) -> None:
        for r in value:
            if not r.name.strip():
                raise DeltaError(f"A LoRA without a name{where}: give the name as /sdapi/v1/loras lists it.")
            for s in settings_of(LoraRef):
                s.kind.check(getattr(r, s.name), f"{s.name} of LoRA '{r.name}'", where)
        Text().fits(format_lora_tags(value), f"Delta Sampling {name}{where}, written as tags,")

    def ui(self, value: tuple[LoraRef, ...]) -> str:
        return format_lora_tags(value)

    def text(self, value: tuple[LoraRef, ...]) -> str:
        return format_lora_tags(value)

    def read(self, text: str, key: str) -> tuple[LoraRef, ...]:
        return parse_lora_tags(Text().read(text, key))


def _every_weight(loras: tuple[LoraRef, ...], weight: float) -> tuple[LoraRef, ...]:
    return tuple(replace(r, weight=weight, unet_weight=None, te_weight=None) for r in loras)


class ImageData(Text):
    """A base64 PNG/JPEG (a ``data:`` URL prefix allowed): far longer than other text; decoded by the host. The
    panel's image upload gives an array or a PIL image (or gradio's ``{"image": ...}``), kept as base64 PNG; its
    control starts empty and is never filled back (infotext does not hold images)."""

    most: ClassVar[int] = MAX_IMAGE_TEXT
    widget = "image"

    def parse(self, value: Any, key: str, where: str) -> str:
        if isinstance(value, Mapping) and "image" in value:  # gradio's sketch/mask form: the image alone
            value = value["image"]
        if value is not None and not isinstance(value, str):
            value = png_base64(value, api_subject(key, where))
        return super().parse(value, key, where)

    def ui(self, value: str) -> str | None:
        return value or None  # an empty upload, not an image named ""


def png_base64(image: Any, subject: str) -> str:
    """An uploaded image (HWC array or PIL image) as base64 PNG; its size is checked before it is encoded."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype == object or array.ndim not in (2, 3):
            raise DeltaError(f"{subject} must be an image, not {typename(image)}.")
        h, w = array.shape[:2]
    else:
        w, h = image.size
    if w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
        raise DeltaError(f"{subject} is {w}×{h}; at most {MAX_IMAGE_SIDE} pixels a side and "
                         f"{MAX_IMAGE_PIXELS // 2**20} megapixels are allowed: upload a smaller image (the control map "
                         "is resized to the generation anyway).")
    if not isinstance(image, Image.Image):
        if array.dtype != np.uint8:
            array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array)
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet for a group's adapted pass, by the name the host's ControlNet list shows.

    The panel shows two units per group, each setting's slots numbered group 1 unit 1, unit 2, group 2 unit 1,
    unit 2. The image is never recorded (infotext cannot hold it), so a pasted unit needs its image given again."""

    model: str = setting(
        MISSING, Listed("controlnet", family=True), slot=(23, 24, 25, 26),
        control=Control("ControlNet model", row="cn_model"),
        tooltip="the ControlNet model as the host lists it, e.g. 'control_v11p_sd15_canny [d14c016b]'; it must be "
                "made for the source's family (the list shows those whose name says so)")
    image: str = setting(
        "", ImageData(), recorded=False, slot=(27, 28, 29, 30), control=Control("Control image"),
        tooltip="the control image, base64 PNG or JPEG (in img2img the init image when empty); not kept in "
                "infotext: give it again when pasting")
    use_init_image: bool = setting(
        False, Bool(), slot=(31, 32, 33, 34), control=Control("Use the init image", img2img=True),
        tooltip="in img2img, use the init image as the control image (any image given is ignored)")
    module: str = setting(
        "none", Listed("controlnet_module"), slot=(35, 36, 37, 38), control=Control("Preprocessor", row="cn_model"),
        tooltip="the preprocessor run on the image first ('none': the image is already a control map)")
    weight: float = setting(
        1.0, Number(*CONTROLNET_WEIGHT_RANGE), slot=(39, 40, 41, 42),
        control=Control("Control weight", row="cn_weights", step=0.05),
        xyz=XYZ("[Delta] ControlNet weight", at=8, key="controlnet_weight"),
        tooltip="how strongly its residuals are added")
    guidance_start: float = setting(
        0.0, Number(0.0, 1.0), slot=(43, 44, 45, 46), control=Control("Guidance start", row="cn_weights"),
        tooltip="the fraction of the steps where it starts")
    guidance_end: float = setting(
        1.0, Number(0.0, 1.0), slot=(47, 48, 49, 50), control=Control("Guidance end", row="cn_weights"),
        xyz=XYZ("[Delta] ControlNet guidance end", at=9, key="controlnet_guidance_end"),
        tooltip="the fraction of the steps where it stops")
    resize_mode: str = setting(
        "Crop and Resize", Choice(CONTROLNET_RESIZE_MODES), slot=(51, 52, 53, 54),
        control=Control("Resize mode", widget="radio"),
        tooltip="how the image is fitted to the generation's size")

    def __post_init__(self) -> None:
        if self.use_init_image and self.image:  # the init image wins: no image is carried that is not used
            object.__setattr__(self, "image", "")


@dataclass(frozen=True)
class IPAdapterUnit:
    """One IP-Adapter (an image prompt) for a group's adapted pass, by the name the host's model list shows, with
    the image encoder that host pairs with it.

    The panel shows two units per group, as for ControlNet, their slots after the ControlNet units'. The image is
    never recorded, so a pasted unit needs its image given again."""

    model: str = setting(
        MISSING, Listed("ipadapter", family=True), slot=(55, 56, 57, 58),
        control=Control("IP-Adapter model", row="ip_model"),
        tooltip="the IP-Adapter model as the host lists it, e.g. 'ip-adapter_sd15 [6a3f6166]'; it must be made for "
                "the source's family (the list shows those whose name says so)")
    image: str = setting(
        "", ImageData(), recorded=False, slot=(59, 60, 61, 62), control=Control("Reference image"),
        tooltip="the reference image, base64 PNG or JPEG (in img2img the init image when empty); not kept in "
                "infotext: give it again when pasting")
    module: str = setting(
        "ip-adapter_clip_h", Listed("ipadapter_module"), slot=(63, 64, 65, 66),
        control=Control("Image encoder", row="ip_model"),
        tooltip="the image encoder (the host's IP-Adapter preprocessor) that embeds the image; it must be the one "
                "the adapter was trained with (ViT-H for most SD1.5 adapters)")
    weight: float = setting(
        1.0, Number(*IPADAPTER_WEIGHT_RANGE), slot=(67, 68, 69, 70),
        control=Control("IP-Adapter weight", row="ip_weights", step=0.05),
        xyz=XYZ("[Delta] IP-Adapter weight", at=11, key="ipadapter_weight"),
        tooltip="how strongly the image prompt's attention is added")
    guidance_start: float = setting(
        0.0, Number(0.0, 1.0), slot=(71, 72, 73, 74), control=Control("Guidance start", row="ip_weights"),
        tooltip="the fraction of the steps where it starts")
    guidance_end: float = setting(
        1.0, Number(0.0, 1.0), slot=(75, 76, 77, 78), control=Control("Guidance end", row="ip_weights"),
        tooltip="the fraction of the steps where it stops")


# Positional slots are append-only: a new group setting takes the next two free numbers (one per panel group), a
# new generation setting the next one. A tooltip is the control's hover text and explains the setting everywhere.


@dataclass(frozen=True)
class AdaptationGroup:
    """One adaptation of the source and how strongly, and when, its delta applies."""

    loras: tuple[LoraRef, ...] = setting(
        (), Loras(), slot=(2, 14), infotext=Infotext("Delta LoRAs"),
        control=Control("LoRAs for the adapted pass", row="loras", placeholder="<lora:name:1>"),
        xyz=XYZ("[Delta] LoRA weight", at=4, key="lora_weight", kind=Number(*LORA_WEIGHT_RANGE), apply=_every_weight),
        tooltip="LoRA / LyCORIS files applied to the source for the adapted pass, written as <lora:name:weight> "
                "(or <lora:name:te_weight:unet_weight>). They must be made for the source base, not for the active "
                "model.")
    checkpoint: str = setting(
        "", Checkpoint(), slot=(7, 19), infotext=Infotext("Delta checkpoint"),
        control=Control("Fine-tuned checkpoint (optional)", row="adaptation"),
        tooltip="A checkpoint fine-tuned from the source base; its difference to the source base is transferred. "
                "Leave empty when the adaptation is a LoRA or a prompt.")
    prompt: str = setting(
        "", Text(), api="adapted_prompt", slot=(8, 20), infotext=Infotext("Delta prompt"),
        control=Control("Adapted prompt (optional)", row="adaptation",
                        placeholder="extra text for the adapted pass only"),
        tooltip="Extra prompt text for the adapted pass only (a 'prompt delta'): the style or subject it adds to "
                "the source's prediction is transferred to the active model.")
    strength: float = setting(
        1.0, Number(*STRENGTH_RANGE), slot=(3, 15), infotext=Infotext("Delta lambda", always=True),
        control=Control("λ (strength)", row="strength", step=0.05), xyz=XYZ("[Delta] Lambda", at=0),
        tooltip="λ: how strongly the difference (adapted − source base) is added to the active model's "
                "prediction. 0 = off, 1 = full transfer, negative values push away from the adaptation.")
    schedule: str = setting(
        "constant", Choice(SCHEDULES), slot=(4, 16), infotext=Infotext("Delta schedule"),
        control=Control("Schedule", row="strength"), xyz=XYZ("[Delta] Schedule", at=5),
        tooltip="How λ changes over the window: constant, or decaying from λ to 0 (linear, exponential, cosine, "
                "sigmoid).")
    start: float = setting(
        0.0, Number(0.0, 1.0), slot=(5, 17), infotext=Infotext("Delta window", part=0),
        control=Control("Window start", row="window"), xyz=XYZ("[Delta] Window start", at=1),
        tooltip="Where the window starts, as a fraction of the sampling progress (0 = first step).")
    end: float = setting(
        1.0, Number(0.0, 1.0), slot=(6, 18), infotext=Infotext("Delta window", part=1),
        control=Control("Window end", row="window"), xyz=XYZ("[Delta] Window end", at=2),
        tooltip="Where the window ends, as a fraction of the sampling progress (1 = last step). Outside the "
                "window the source model is not run.")

    controlnets: tuple[ControlNetUnit, ...] = setting(
        # The panel shows each unit's controls (their slots are ControlNetUnit's).
        (), Objects(ControlNetUnit, "ControlNet unit", most=MAX_CONTROLNETS, panel=MAX_CONTROLNETS,
                    prefix="controlnet"), infotext=Infotext("Delta ControlNets"),
        tooltip="ControlNet units applied to the source's adapted pass only (the source base stays plain), so "
                "the delta carries what the control changes. They must be made for the source's family.")
    ipadapters: tuple[IPAdapterUnit, ...] = setting(
        # The panel shows each unit's controls (their slots are IPAdapterUnit's).
        (), Objects(IPAdapterUnit, "IP-Adapter unit", most=MAX_IPADAPTERS, panel=MAX_IPADAPTERS, prefix="ipadapter"),
        infotext=Infotext("Delta IP Adapters"),
        tooltip="IP-Adapter units (image prompts) applied to the source's adapted pass only, so the delta carries "
                "what the image prompt changes. They must be made for the source's family.")

    @property
    def has_adaptation(self) -> bool:
        return bool(self.loras or self.checkpoint or self.prompt or self.controlnets or self.ipadapters)


@dataclass(frozen=True)
class DeltaSettings:
    """Everything that decides what Delta Sampling does to one generation."""

    enabled: bool = setting(
        # No control: the panel's accordion is the switch. No infotext key: "Delta source" there means on.
        False, Bool(), slot=0, xyz=XYZ("[Delta] Enabled", at=6),
        tooltip="Delta Sampling: transfer a LoRA, fine-tune or prompt made for another base model (the source) to "
                "the active model, by adding λ·(adapted − base) to its prediction at every step.")
    source: str = setting(
        "", Checkpoint(), slot=1, infotext=Infotext("Delta source", always=True),
        control=Control("Source base checkpoint", row="source"), xyz=XYZ("[Delta] Source checkpoint", at=3),
        tooltip="The base model the adaptation was made for (e.g. an SD1.5 checkpoint for an SD1.5 LoRA). It runs "
                "beside the active model; it never replaces it. Its latent format must match the active model's.")
    groups: tuple[AdaptationGroup, ...] = setting(
        (AdaptationGroup(),), Groups(AdaptationGroup, "Delta Sampling group", least=1, most=MAX_GROUPS),
        slot=(13,), infotext=Infotext("Delta group {i}", always=True),
        control=Control("Use a second adaptation group", section="advanced"),
        tooltip="Add a second adaptation, with its own λ and window; the two deltas add up.")
    mode: str = setting(
        "delta", Choice(MODES), slot=9, infotext=Infotext("Delta mode"),
        control=Control("Mode", widget="radio", row="modes", section="advanced"),
        tooltip="delta: add λ·(adapted − base) to the active model's prediction. base-first: the source (with its "
                "adaptation) predicts the steps inside the window instead of the active model, e.g. the first "
                "steps of a distilled (Turbo, Lightning, LCM) model.")
    cfg_mode: str = setting(
        "cfg", Choice(CFG_MODES), slot=10, infotext=Infotext("Delta CFG mode"),
        control=Control("CFG mode", widget="radio", row="modes", section="advanced"),
        tooltip="cfg: the source runs with classifier-free guidance like the active model (with the source as "
                "the target, λ 1 gives exactly the adapted model). cond: it runs on the positive prompt only "
                "(faster; try it when the image stops following the prompt).")
    trajectory: str = setting(
        "shared", Choice(TRAJECTORIES), slot=11, infotext=Infotext("Delta trajectory"),
        control=Control("Trajectory", widget="radio", row="modes", section="advanced"),
        tooltip="shared: the source sees the active model's own noisy latent. separate: the source follows its "
                "own sampling trajectory, as the reference implementation does.")
    preview: bool = setting(
        False, Bool(), slot=12, recorded=False,  # a display choice, not part of how an image was made
        control=Control("Preview strip", section="advanced"),
        tooltip="Add a strip to the results showing the source base, the adapted source and the result side by "
                "side.")
    source_cfg: float = setting(
        0.0, Number(*SOURCE_CFG_RANGE), slot=21, infotext=Infotext("Delta source CFG"),
        control=Control("Source CFG scale (0 = auto)", step=0.5, section="advanced"),
        xyz=XYZ("[Delta] Source CFG scale", at=7),
        tooltip="The CFG scale the source's predictions are combined with. 0 = auto: the active model's own scale "
                f"in delta mode, {num(BASE_FIRST_CFG)} in base-first mode, where a distilled (Turbo, Lightning) "
                "active model runs at CFG 1-2 and following it would leave the source's layout steps nearly "
                "unguided.")
    source_resolution: str = setting(
        "target", Choice(RESOLUTIONS), slot=22, infotext=Infotext("Delta source resolution"),
        control=Control("Source resolution", widget="radio", section="advanced"),
        xyz=XYZ("[Delta] Source resolution", at=10),
        tooltip="target: the source runs at the image's size. native: above the source's training size (512² "
                "for SD1.x, 768² for SD2.x-v, 1024² for SDXL) it runs at that size instead, the image's aspect "
                "ratio kept, and its delta is upsampled back: an SD1.5 source at 1024 px then costs about a quarter "
                "and composes as it was trained to, but the delta carries no detail finer than the source's grid. "
                "No change at or below the source's size.")

    # -- validation -------------------------------------------------------------------------------------------

    def validated(self) -> DeltaSettings:
        """Return self if every value is usable, else raise one DeltaError describing the first problem."""
        if not self.enabled:
            return self
        if isinstance(self.source, str) and not self.source.strip():
            raise DeltaError("Delta Sampling is enabled but no source checkpoint is chosen: pick the base model the "
                             "adaptation was made for (e.g. an SD1.5 checkpoint for an SD1.5 LoRA).")
        check_object(self, "")
        if self.mode == "base-first" and len(self.groups) > 1:
            raise DeltaError("base-first mode uses one group (its window says which steps the source predicts); "
                             f"{len(self.groups)} given. Remove the extra groups or use mode 'delta'.")
        for i, g in enumerate(self.groups, 1):
            where = group_where(i, len(self.groups))
            if g.start > g.end:
                raise DeltaError(f"The window start ({num(g.start)}) is after its end ({num(g.end)}){where}: "
                                 "start and end are fractions of the sampling progress with start <= end.")
            if self.mode == "delta" and not g.has_adaptation:
                raise DeltaError(f"Delta Sampling has nothing to transfer{where}: add a LoRA, a fine-tuned "
                                 "checkpoint, an adapted prompt, a ControlNet or an IP-Adapter, or switch mode to "
                                 "'base-first'.")
        return self

    def source_cfg_for(self, target_scale: float) -> float:
        """The CFG scale the source's predictions are combined with, given the active model's."""
        if self.source_cfg:
            return self.source_cfg
        return float(target_scale) if self.mode == "delta" else BASE_FIRST_CFG

    # -- API dict ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The API form; one group is written flat, several under ``groups``."""
        out: dict[str, Any] = {}
        for s in settings_of(type(self)):
            value = getattr(self, s.name)
            if isinstance(s.kind, Groups) and len(value) == 1:
                out.update(dump_object(value[0]))
            else:
                out[s.api] = s.kind.dump(value)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DeltaSettings:
        """Parse the API form. Unknown keys and wrongly typed values are errors; missing keys take defaults."""
        if not isinstance(data, Mapping):
            raise DeltaError(f"Delta Sampling settings must be a JSON object, not {typename(data)}.")
        groups = _groups_setting(cls)
        top = [s.api for s in settings_of(cls)]
        flat = [s.api for s in settings_of(groups.kind.cls)]
        unknown = sorted((k for k in data if k not in top and k not in flat), key=str)
        if unknown:
            raise DeltaError(f"Unknown Delta Sampling setting(s) {', '.join(shown(k) for k in unknown)}; allowed "
                             f"keys: {', '.join(sorted({*top, *flat}))}.")
        given_flat = sorted(k for k in data if k in flat)
        if data.get(groups.api) is not None and given_flat:
            raise DeltaError(f"Give either '{groups.api}' or the single-group keys ({', '.join(given_flat)}), not "
                             "both.")
        values = parse_fields(cls, data, "Delta Sampling settings", "")
        if groups.name not in values:
            values[groups.name] = (parse_object(groups.kind.cls, {k: data[k] for k in given_flat}, groups.kind.item,
                                                ""),)
        return cls(**values)

    # -- infotext ----------------------------------------------------------------------------------------------

    def to_infotext(self) -> dict[str, str]:
        """Key/values for the generation parameters line; empty when disabled. Defaults are left out."""
        out: dict[str, str] = {}
        if self.enabled:
            write_infotext(self, out)
        return out

    @classmethod
    def from_infotext(cls, params: Mapping[str, str]) -> DeltaSettings:
        """Settings from parsed infotext; without a ``Delta source`` key the extension is off."""
        if infotext_marker(cls) not in params:
            return cls()
        return cls(**{**read_infotext(cls, params), "enabled": True})

    # -- X/Y/Z and other per-generation overrides ---------------------------------------------------------------

    def with_overrides(self, overrides: Mapping[str, Any]) -> DeltaSettings:
        """Apply X/Y/Z axis values (keys of :data:`OVERRIDES`) to a copy. An axis that sets every LoRA or unit of
        the first group, which has none, is refused when the extension is on (its grid would repeat one image)."""
        known = overrides_of(type(self))
        s, missing = self, None
        for key, value in overrides.items():
            if key not in known:
                raise DeltaError(f"Unknown Delta Sampling override {shown(key)}; known: {', '.join(known)}.")
            missing = missing or s.missing_entries(key)
            s = known[key](s, value)
        if missing is not None and s.enabled:
            raise DeltaError(missing)
        return s

    def missing_entries(self, key: str) -> str | None:
        """Why the override ``key`` would set nothing here (it sets every entry of a list of the first group, which
        is empty), or None."""
        entry = entry_axes(type(self)).get(key)
        if entry is None or getattr(self.groups[0], entry[0]):
            return None
        return entry[1]

    def summary(self) -> str:
        """One concise line for the console log."""
        if not self.enabled:
            return "Delta Sampling: off"
        parts = [f"Delta Sampling: source={self.source}", f"mode={self.mode}"]
        for i, g in enumerate(self.groups, 1):
            what = [r.tag() for r in g.loras]
            if g.checkpoint:
                what.append(f"checkpoint={g.checkpoint}")
            if g.prompt:
                what.append(f"prompt={g.prompt!r}")
            what += [f"controlnet={u.model} ({u.module}, {num(u.weight)}, {num(u.guidance_start)}-"
                     f"{num(u.guidance_end)})" for u in g.controlnets]
            what += [f"ipadapter={u.model} ({u.module}, {num(u.weight)}, {num(u.guidance_start)}-"
                     f"{num(u.guidance_end)})" for u in g.ipadapters]
            window = f"{num(g.start)}-{num(g.end)}"
            label = "" if len(self.groups) == 1 else f"group{i}: "
            parts.append(f"{label}{' '.join(what) or 'base'} λ={num(g.strength)} {g.schedule} {window}")
        parts.append(f"cfg={self.cfg_mode}")
        if self.source_cfg:
            parts.append(f"source_cfg={num(self.source_cfg)}")
        if self.trajectory != "shared":
            parts.append(f"trajectory={self.trajectory}")
        if self.source_resolution != "target":
            parts.append(f"source_resolution={self.source_resolution}")
        return ", ".join(parts)


def _groups_setting(cls: type) -> Setting:
    return next(s for s in settings_of(cls) if isinstance(s.kind, Groups))


def infotext_marker(cls: type = DeltaSettings) -> str:
    """The infotext key whose presence means the image was made with the extension on: the source's."""
    source = next(s for s in settings_of(cls) if s.name == "source")
    assert source.infotext is not None and source.infotext.always
    return source.infotext.key


# --- overrides: X/Y/Z axes and any other per-generation change ---------------------------------------------------

Override = Callable[[DeltaSettings, Any], DeltaSettings]


@functools.cache
def overrides_of(cls: type[DeltaSettings]) -> dict[str, Override]:
    """One override per single-valued setting, by its name, and one per axis that sets something derived from its
    setting (``lora_weight``). A group's settings are overridden in the first group."""
    groups = _groups_setting(cls)
    out: dict[str, Override] = {}
    for in_group, s in [(False, s) for s in settings_of(cls)] + [(True, s) for s in settings_of(groups.kind.cls)]:
        if s.xyz is not None and s.xyz.key is not None:
            out[s.xyz.key] = _override(s.name, s.xyz.key, s.xyz.kind or s.kind, s.xyz.apply, in_group)
        elif not isinstance(s.kind, Objects):
            out[s.name] = _override(s.name, s.name, s.kind, None, in_group)
        if in_group and isinstance(s.kind, Objects) and not isinstance(s.kind, Loras):
            for inner in settings_of(s.kind.cls):  # an axis of an object's setting sets it in every object
                if inner.xyz is not None and inner.xyz.key is not None:
                    out[inner.xyz.key] = _override(s.name, inner.xyz.key, inner.xyz.kind or inner.kind,
                                                   _every(inner.name), True)
    return out


@functools.cache
def entry_axes(cls: type[DeltaSettings]) -> dict[str, tuple[str, str]]:
    """The axes that set every entry of a list of the first group (every LoRA, every ControlNet unit...), by their
    override key: the list's setting name, and what to tell a user whose group has no entry."""
    out = {}
    for s in settings_of(_groups_setting(cls).kind.cls):
        if not isinstance(s.kind, Objects):
            continue
        declared = [s.xyz] if isinstance(s.kind, Loras) else [inner.xyz for inner in settings_of(s.kind.cls)]
        for xyz in declared:
            if xyz is not None and xyz.key is not None:
                out[xyz.key] = (s.name, f"The X/Y/Z axis '{xyz.label}' sets every {s.kind.item} of the first "
                                        f"adaptation group, which has none: add a {s.kind.item} to that group, or "
                                        "remove the axis.")
    return out


def _every(name: str) -> Callable[[tuple[Any, ...], Any], tuple[Any, ...]]:
    return lambda objects, value: tuple(replace(o, **{name: value}) for o in objects)


def _override(name: str, key: str, kind: Any, apply: Callable[[Any, Any], Any] | None, in_group: bool) -> Override:
    def override(s: DeltaSettings, value: Any) -> DeltaSettings:
        v = kind.parse(value, key, "")
        target = s.groups[0] if in_group else s
        changed = replace(target, **{name: v if apply is None else apply(getattr(target, name), v)})
        return replace(s, groups=(changed, *s.groups[1:])) if in_group else changed

    return override


OVERRIDES = overrides_of(DeltaSettings)


# --- the positional form the UI produces (append-only: never reorder, only add at the end) ----------------------

POSITIONAL_FIELDS: tuple[str, ...] = tuple(slot.name for slot in positional_slots(DeltaSettings))


def from_positional(values: Sequence[Any], cls: type[DeltaSettings] = DeltaSettings) -> DeltaSettings:
    """Settings from the script's argument slice: either one API dict, or the UI's positional values."""
    if len(values) >= 1 and isinstance(values[0], Mapping):
        # The WebUI's API fills every slot after the ones a request gives with the UI's defaults (or with values
        # read from the request's infotext), so the slots after a settings object carry nothing the caller said.
        return cls.from_dict(values[0])
    slots = positional_slots(cls)
    if len(values) > len(slots):
        raise DeltaError(f"Delta Sampling takes at most {len(slots)} positional values "
                         f"({', '.join(slot.name for slot in slots)}); {len(values)} given.")
    groups = _groups_setting(cls)
    top: dict[str, Any] = {}
    given: list[dict[str, Any]] = [{} for _ in range(len(groups.slot) + 1)]  # per panel group
    shown_groups = [True] + [False] * len(groups.slot)  # the first group has no switch
    units: dict[tuple[int, Setting], list[dict[str, Any]]] = {}  # per panel group and object list: its units
    for slot, value in zip(slots, values, strict=False):
        if slot.switch:
            shown_groups[slot.group] = value is not None and Bool().parse(value, slot.name, "")
        elif slot.owner is not None:
            shown = units.setdefault((slot.group, slot.owner), [{} for _ in range(slot.owner.kind.panel)])
            shown[slot.unit][slot.setting.api] = value
        elif slot.group is None:
            top[slot.setting.api] = value
        else:
            given[slot.group][slot.setting.api] = value
    for (g, owner), shown in units.items():
        given[g][owner.api] = [u for u in shown if _unit_chosen(owner.kind.cls, u)]
    settings = parse_fields(cls, top, "Delta Sampling settings", "")
    settings[groups.name] = tuple(
        parse_object(groups.kind.cls, given[g], groups.kind.item, "" if g == 0 else f" (group {g + 1})")
        for g in range(len(given)) if shown_groups[g])
    return cls(**settings)


def _unit_chosen(cls: type, values: Mapping[str, Any]) -> bool:
    """Whether the panel's controls of one unit hold a unit: its first required setting (the model) is chosen."""
    first = next(s for s in settings_of(cls) if s.required)
    return values.get(first.api) not in (None, "", NO_OBJECT)


def to_positional(s: DeltaSettings) -> list[Any]:
    """The UI's positional values for settings with at most as many groups (two) and units as the UI shows."""
    groups = _groups_setting(type(s))
    if len(s.groups) > len(groups.slot) + 1:
        raise DeltaError("The UI holds two adaptation groups; use the API's 'groups' for more.")
    empty = groups.kind.cls()
    out = []
    for slot in positional_slots(type(s)):
        if slot.switch:
            out.append(len(s.groups) > slot.group)
        elif slot.group is None:
            out.append(slot.setting.kind.ui(getattr(s, slot.setting.name)))
        else:
            g = s.groups[slot.group] if slot.group < len(s.groups) else empty
            if slot.owner is None:
                out.append(slot.setting.kind.ui(getattr(g, slot.setting.name)))
                continue
            objects = getattr(g, slot.owner.name)
            if len(objects) > slot.owner.kind.panel:
                raise DeltaError(f"The UI holds {slot.owner.kind.panel} {slot.owner.kind.item}s per group; use the "
                                 "API for more.")
            out.append(slot.setting.kind.ui(getattr(objects[slot.unit], slot.setting.name))
                       if slot.unit < len(objects) else slot.setting.blank)
    return out


# --- LoRA tags ---------------------------------------------------------------------------------------------------


def parse_lora_tags(text: str) -> tuple[LoraRef, ...]:
    """``<lora:name>``, ``<lora:name:w>`` or ``<lora:name:te:unet>`` tags; anything else in the text is an error."""
    if not isinstance(text, str):
        raise DeltaError(f"LoRAs must be given as '<lora:name:weight>' text, not {typename(text)}.")
    Text().fits(text, "The LoRA field")
    leftover = _LORA_TAG.sub("", text).strip(" ,\n\t")
    if leftover:
        raise DeltaError(f"Cannot read {shown(leftover)} in the LoRA field: write each LoRA as <lora:name:weight> "
                         "(or <lora:name:te_weight:unet_weight>).")
    weight = Number(*LORA_WEIGHT_RANGE)
    refs = []
    for body in _LORA_TAG.findall(text):
        name, *nums = body.split(":")
        if not name.strip() or len(nums) > 2:
            raise DeltaError(f"Cannot read '<lora:{body}>': write <lora:name:weight> or <lora:name:te:unet>.")
        try:
            ws = [float(n) for n in nums]
        except ValueError:
            raise DeltaError(f"Cannot read the weight in '<lora:{body}>': weights are numbers.") from None
        ws = [weight.finite(w, f"The weight in '<lora:{body}>'") for w in ws]
        if len(ws) == 2:
            refs.append(LoraRef(name.strip(), ws[1], unet_weight=ws[1], te_weight=ws[0]))
        else:
            refs.append(LoraRef(name.strip(), ws[0] if ws else 1.0))
    return tuple(refs)


def format_lora_tags(loras: Sequence[LoraRef]) -> str:
    return "".join(r.tag() for r in loras)


__all__ = [
    "CFG_MODES",
    "LORA_WEIGHT_RANGE",
    "MAX_GROUPS",
    "MODES",
    "OVERRIDES",
    "POSITIONAL_FIELDS",
    "RESOLUTIONS",
    "SCHEDULES",
    "SOURCE_CFG_RANGE",
    "STRENGTH_RANGE",
    "TRAJECTORIES",
    "AdaptationGroup",
    "ControlNetUnit",
    "DeltaSettings",
    "IPAdapterUnit",
    "LoraRef",
    "entry_axes",
    "format_lora_tags",
    "from_positional",
    "infotext_marker",
    "overrides_of",
    "parse_lora_tags",
    "to_positional",
]
