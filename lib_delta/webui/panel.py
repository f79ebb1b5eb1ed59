"""The Delta Sampling panel of txt2img and img2img, and how its controls are restored from infotext.

gradio and the WebUI's ``modules`` are imported inside :func:`build` only, so the rest of this module (tooltips,
infotext fields, LoRA tag editing) is importable and testable without a WebUI. The same code serves gradio 3
(AUTOMATIC1111) and gradio 4 (Forge): only constructor arguments and ``gr.update`` that both accept are used.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

from ..args import (
    CFG_MODES,
    MODES,
    POSITIONAL_FIELDS,
    SCHEDULES,
    TRAJECTORIES,
    DeltaSettings,
    LoraRef,
    format_lora_tags,
    parse_lora_tags,
    to_positional,
)
from ..errors import DeltaError

TITLE = "Delta Sampling"
# Settings that shape the panel (the others, for the generation path, live with the host adapters).
SETTING_DEFAULT_STRENGTH = "delta_sampling_default_strength"
SETTING_PREVIEW = "delta_sampling_preview"
PANEL_SETTING_DEFAULTS: dict[str, Any] = {SETTING_DEFAULT_STRENGTH: 1.0, SETTING_PREVIEW: False}
STRENGTH_SLIDER = (-2.0, 3.0, 0.05)  # minimum, maximum, step

_GROUP_TOOLTIPS = {
    "loras": "LoRA / LyCORIS files applied to the source for the adapted pass, written as <lora:name:weight> "
             "(or <lora:name:te_weight:unet_weight>). They must be made for the source base, not for the active "
             "model.",
    "checkpoint": "A checkpoint fine-tuned from the source base; its difference to the source base is "
                  "transferred. Leave empty when the adaptation is a LoRA or a prompt.",
    "prompt": "Extra prompt text for the adapted pass only (a 'prompt delta'): the style or subject it adds to the "
              "source's prediction is transferred to the active model.",
    "strength": "λ: how strongly the difference (adapted − source base) is added to the active model's "
                "prediction. 0 = off, 1 = full transfer, negative values push away from the adaptation.",
    "schedule": "How λ changes over the window: constant, or decaying from λ to 0 (linear, exponential, cosine, "
                "sigmoid).",
    "start": "Where the window starts, as a fraction of the sampling progress (0 = first step).",
    "end": "Where the window ends, as a fraction of the sampling progress (1 = last step). Outside the window the "
           "source model is not run.",
}

TOOLTIPS: dict[str, str] = {
    "enabled": "Delta Sampling: transfer a LoRA, fine-tune or prompt made for another base model (the source) to "
               "the active model, by adding λ·(adapted − base) to its prediction at every step.",
    "source": "The base model the adaptation was made for (e.g. an SD1.5 checkpoint for an SD1.5 LoRA). It runs "
              "beside the active model; it never replaces it. Its latent format must match the active model's.",
    **_GROUP_TOOLTIPS,
    "mode": "delta: add λ·(adapted − base) to the active model's prediction. base-first: the source (with its "
            "adaptation) predicts the steps inside the window instead of the active model, e.g. the first steps "
            "of a distilled (Turbo, Lightning, LCM) model.",
    "cfg_mode": "cfg: the source runs with classifier-free guidance like the active model (with the source as "
                "the target, λ 1 gives exactly the adapted model). cond: it runs on the positive prompt only "
                "(faster; try it when the image stops following the prompt).",
    "trajectory": "shared: the source sees the active model's own noisy latent. separate: the source follows its "
                  "own sampling trajectory, as the reference implementation does.",
    "preview": "Add a strip to the results showing the source base, the adapted source and the result side by side.",
    "group2_enabled": "Add a second adaptation, with its own λ and window; the two deltas add up.",
    **{f"group2_{k}": f"Second group: {v}" for k, v in _GROUP_TOOLTIPS.items()},
}

# Paste-field keys. Where a field has an infotext key of its own it is used; the others get a "Delta …" name of the
# same style. The names are what "Send to img2img" matches against the script's paste_field_names.
INFOTEXT_LABELS: dict[str, str] = {
    "enabled": "Delta enabled",
    "source": "Delta source",
    "loras": "Delta LoRAs",
    "strength": "Delta lambda",
    "schedule": "Delta schedule",
    "start": "Delta window start",
    "end": "Delta window end",
    "checkpoint": "Delta checkpoint",
    "prompt": "Delta prompt",
    "mode": "Delta mode",
    "cfg_mode": "Delta CFG mode",
    "trajectory": "Delta trajectory",
    "group2_enabled": "Delta group 2",
    **{f"group2_{k}": f"Delta group 2 {k}" for k in _GROUP_TOOLTIPS},
}
# The preview strip is a display choice, not part of how an image was made: infotext does not carry it.
NOT_IN_INFOTEXT = frozenset({"preview"})


class InfotextField(str):
    """A paste-field key that computes its value from parsed infotext.

    The WebUI's paste and the API's ``infotext`` field call it (it is callable); "Send to img2img" copies the
    fields whose key is among the script's ``paste_field_names`` (it is that string). One entry serves both.
    """

    read: Callable[[Mapping[str, str]], Any]

    def __new__(cls, label: str, read: Callable[[Mapping[str, str]], Any]) -> InfotextField:
        obj = super().__new__(cls, label)
        obj.read = read
        return obj

    def __call__(self, params: Mapping[str, str]) -> Any:
        return self.read(params)


def read_from_infotext(field: str, params: Mapping[str, str]) -> Any:
    """The value of one control for parsed infotext; ``None`` leaves the control as it is.

    Without Delta keys the infotext was made with the extension off: only the switch changes. A Delta infotext
    sets every control (defaults are left out of infotext, so a missing key means the default).
    """
    if "Delta source" not in params:
        return False if field == "enabled" else None
    try:
        values = to_positional(DeltaSettings.from_infotext(params))
    except DeltaError as e:
        if field == "enabled":  # reported once: logged by the UI's paste, answered by the API (which reads these)
            e.status_code, e.detail = 422, str(e)  # type: ignore[attr-defined]
            raise
        return None
    return values[POSITIONAL_FIELDS.index(field)]


def infotext_fields(components: Mapping[str, Any]) -> list[tuple[Any, InfotextField]]:
    """``Script.infotext_fields`` for the controls, keyed by positional field name."""
    return [
        (components[f], InfotextField(INFOTEXT_LABELS[f], lambda params, f=f: read_from_infotext(f, params)))
        for f in POSITIONAL_FIELDS
        if f not in NOT_IN_INFOTEXT
    ]


def paste_field_names() -> list[str]:
    return [INFOTEXT_LABELS[f] for f in POSITIONAL_FIELDS if f not in NOT_IN_INFOTEXT]


def append_lora(text: str, name: str | None, weight: float) -> str:
    """The LoRA field with ``<lora:name:weight>`` added, unless that LoRA is already in it."""
    if not name:
        return text
    text = text or ""
    try:
        if any(r.name == name for r in parse_lora_tags(text)):
            return text
    except DeltaError:
        pass  # the user is mid-edit; still add the tag
    tag = format_lora_tags([LoraRef(name, float(weight))])
    return f"{text.rstrip()} {tag}" if text.strip() else tag


def lora_names() -> list[str]:
    """The LoRA names the WebUI lists (as /sdapi/v1/loras ``name``); empty when its Lora extension is off."""
    networks = sys.modules.get("networks")
    available = getattr(networks, "available_networks", None) or {}
    return sorted(available, key=str.casefold)


def refresh_loras() -> None:
    networks = sys.modules.get("networks")
    if networks is not None and hasattr(networks, "list_available_networks"):
        networks.list_available_networks()


def _opt(opts: Any, key: str, default: Any = None) -> Any:
    # Options read before the settings page registered them fall back to their defaults.
    default = PANEL_SETTING_DEFAULTS.get(key, default)
    try:
        value = getattr(opts, key)
    except AttributeError:
        return default
    return default if value is None else value


def build(script: Any, is_img2img: bool) -> list[Any]:
    """Create the controls (inside the WebUI's script UI context) and return them in POSITIONAL_FIELDS order."""
    import gradio as gr
    from modules import sd_models, shared
    from modules.ui_common import create_refresh_button
    from modules.ui_components import FormHTML, InputAccordion

    opts = shared.opts
    strength = float(_opt(opts, SETTING_DEFAULT_STRENGTH))
    c: dict[str, Any] = {}

    def tip(field: str, component: Any) -> Any:
        # Shown as the element's title, by the WebUI's hints.js at load and by our script for late-built parts.
        component.webui_tooltip = TOOLTIPS[field]
        c[field] = component
        return component

    def checkpoint_choices() -> list[str]:
        return ["", *sd_models.checkpoint_tiles()]

    def checkpoint_dropdown(field: str, label: str) -> None:
        dropdown = tip(field, gr.Dropdown(label=label, choices=checkpoint_choices(), value="",
                                          allow_custom_value=True, elem_id=script.elem_id(field)))
        create_refresh_button(dropdown, sd_models.list_models, lambda: {"choices": checkpoint_choices()},
                              script.elem_id(f"{field}_refresh"))

    def add_picked_lora(name: str | None, text: str) -> tuple[Any, Any]:
        if not name:  # the picker's own reset
            return gr.update(), gr.update()
        weight = _opt(opts, "extra_networks_default_multiplier", 1.0)  # what the WebUI's LoRA cards use
        return append_lora(text, name, weight), gr.update(value=None)

    def group(prefix: str) -> None:
        with gr.Row():
            tip(f"{prefix}loras", gr.Textbox(label="LoRAs for the adapted pass", value="", lines=1, scale=3,
                                             placeholder="<lora:name:1>", elem_id=script.elem_id(f"{prefix}loras")))
            picker = gr.Dropdown(label="Add LoRA", choices=lora_names(), value=None, scale=1,
                                 elem_id=script.elem_id(f"{prefix}lora_picker"))
            picker.webui_tooltip = "Pick a LoRA to add its tag to the field beside, with the default extra " \
                                   "networks multiplier as weight."
            create_refresh_button(picker, refresh_loras, lambda: {"choices": lora_names()},
                                  script.elem_id(f"{prefix}lora_refresh"))
            picker.change(fn=add_picked_lora, inputs=[picker, c[f"{prefix}loras"]],
                          outputs=[c[f"{prefix}loras"], picker], show_progress="hidden")
        with gr.Row():
            checkpoint_dropdown(f"{prefix}checkpoint", "Fine-tuned checkpoint (optional)")
            tip(f"{prefix}prompt", gr.Textbox(label="Adapted prompt (optional)", value="", lines=1,
                                              placeholder="extra text for the adapted pass only",
                                              elem_id=script.elem_id(f"{prefix}prompt")))
        with gr.Row():
            lo, hi, step = STRENGTH_SLIDER
            tip(f"{prefix}strength", gr.Slider(label="λ (strength)", minimum=lo, maximum=hi, step=step,
                                               value=strength, elem_id=script.elem_id(f"{prefix}strength")))
            tip(f"{prefix}schedule", gr.Dropdown(label="Schedule", choices=list(SCHEDULES), value="constant",
                                                 elem_id=script.elem_id(f"{prefix}schedule")))
        with gr.Row():
            tip(f"{prefix}start", gr.Slider(label="Window start", minimum=0.0, maximum=1.0, step=0.01, value=0.0,
                                            elem_id=script.elem_id(f"{prefix}start")))
            tip(f"{prefix}end", gr.Slider(label="Window end", minimum=0.0, maximum=1.0, step=0.01, value=1.0,
                                          elem_id=script.elem_id(f"{prefix}end")))

    with InputAccordion(False, label=TITLE, elem_id=script.elem_id("enabled")) as enabled:
        enabled.accordion.webui_tooltip = TOOLTIPS["enabled"]
        c["enabled"] = enabled
        with enabled.extra():
            # Filled in, and kept in sync, by javascript/delta_sampling.js.
            FormHTML(value='<span class="delta-sampling-summary-text"></span>', elem_id=script.elem_id("summary"))
        with gr.Row():
            checkpoint_dropdown("source", "Source base checkpoint")
        group("")
        with gr.Accordion("Advanced", open=False, elem_id=script.elem_id("advanced")):
            with gr.Row():
                tip("mode", gr.Radio(label="Mode", choices=list(MODES), value="delta", elem_id=script.elem_id("mode")))
                tip("cfg_mode", gr.Radio(label="CFG mode", choices=list(CFG_MODES), value="cfg",
                                         elem_id=script.elem_id("cfg_mode")))
                tip("trajectory", gr.Radio(label="Trajectory", choices=list(TRAJECTORIES), value="shared",
                                           elem_id=script.elem_id("trajectory")))
            tip("preview", gr.Checkbox(label="Preview strip", value=bool(_opt(opts, SETTING_PREVIEW)),
                                       elem_id=script.elem_id("preview")))
            with gr.Accordion("Second adaptation group", open=False, elem_id=script.elem_id("group2")):
                tip("group2_enabled", gr.Checkbox(label="Use a second adaptation group", value=False,
                                                  elem_id=script.elem_id("group2_enabled")))
                group("group2_")

    script.infotext_fields = infotext_fields(c)
    script.paste_field_names = paste_field_names()
    # The WebUI passes the controls' values positionally: one control per field, in POSITIONAL_FIELDS order.
    assert set(c) == set(POSITIONAL_FIELDS), f"controls ≠ POSITIONAL_FIELDS: {sorted(set(c) ^ set(POSITIONAL_FIELDS))}"
    return [c[f] for f in POSITIONAL_FIELDS]


__all__ = [
    "INFOTEXT_LABELS",
    "TOOLTIPS",
    "InfotextField",
    "append_lora",
    "build",
    "infotext_fields",
    "lora_names",
    "paste_field_names",
    "read_from_infotext",
]
