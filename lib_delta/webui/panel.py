"""The Delta Sampling panel of txt2img and img2img, and how its controls are restored from infotext.

gradio and the WebUI's ``modules`` are imported inside :func:`build` only, so the rest of this module (tooltips,
infotext fields, LoRA tag editing) is importable and testable without a WebUI. The same code serves gradio 3
(AUTOMATIC1111) and gradio 4 (Forge): only constructor arguments and ``gr.update`` that both accept are used.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ..args import (
    POSITIONAL_FIELDS,
    AdaptationGroup,
    DeltaSettings,
    LoraRef,
    format_lora_tags,
    infotext_marker,
    parse_lora_tags,
    to_positional,
)
from ..errors import DeltaError
from ..fields import ORDINALS, Control, Listed, Number, Objects, Setting, Slot, positional_slots, settings_of
from . import lists

TITLE = "Delta Sampling"
REFRESH_SYMBOL = "\U0001f504"  # the WebUI's refresh buttons' symbol (modules/ui_common.py)
# The frame's own texts (the controls' come from their declarations); the localization template lists them all.
ADVANCED = "Advanced"
GROUP_ACCORDION = "{ordinal} adaptation group"
PICKER_LABEL = "Add LoRA"
PICKER_TOOLTIP = "Pick a LoRA to add its tag to the field beside, with the default extra networks multiplier as weight."
UNITS_ACCORDION = "{item}s"  # a group's units of one kind ("ControlNet units")
UNIT_ACCORDION = "{item} {k}"
LIST_REFRESH_TOOLTIP = "Read the list again (after adding model files)."
# Settings that shape the panel (the others, for the generation path, live with the host adapters).
SETTING_DEFAULT_STRENGTH = "delta_sampling_default_strength"
SETTING_PREVIEW = "delta_sampling_preview"
PANEL_SETTING_DEFAULTS: dict[str, Any] = {SETTING_DEFAULT_STRENGTH: 1.0, SETTING_PREVIEW: False}
# Controls whose starting value is a WebUI option rather than the setting's default, by setting name.
STARTING_VALUE_OPTIONS = {"strength": SETTING_DEFAULT_STRENGTH, "preview": SETTING_PREVIEW}
# The WebUI keeps a control's saved default (Settings → Defaults, ui-config.json) under
# "customscript/<script file>/<tab>/<label>/value". Every group and unit repeats its labels, so each of their
# controls adds a scope to the file's name; the WebUI writes that name onto the controls after ui() returns, so the
# scope is added later, by :func:`scope_saved_defaults`. Filled by :func:`build`, emptied there.
_UNSCOPED: list[tuple[Any, str]] = []

SLOTS: tuple[Slot, ...] = positional_slots(DeltaSettings)
TOOLTIPS: dict[str, str] = {slot.name: slot.tooltip for slot in SLOTS}
# Paste-field keys. Where a field has an infotext key of its own it is used; the others get a "Delta …" name of the
# same style. The names are what "Send to img2img" matches against the script's paste_field_names.
INFOTEXT_LABELS: dict[str, str] = {slot.name: slot.paste for slot in SLOTS if slot.paste is not None}
NOT_IN_INFOTEXT = frozenset(slot.name for slot in SLOTS if slot.paste is None)
# The λ slider's minimum, maximum and step, which the settings page's "Default λ" slider shares.
_STRENGTH = next(s for s in settings_of(AdaptationGroup) if s.name == "strength")
assert isinstance(_STRENGTH.kind, Number) and _STRENGTH.control is not None
STRENGTH_SLIDER = (_STRENGTH.kind.lo, _STRENGTH.kind.hi, _STRENGTH.control.step)


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
    if infotext_marker() not in params:
        return False if field == "enabled" else None
    try:
        values = to_positional(DeltaSettings.from_infotext(params))
    except DeltaError as e:
        if field == "enabled":  # reported once: logged by the UI's paste, answered by the API (which reads these)
            e.status_code, e.detail = 422, str(e)  # type: ignore[attr-defined]
            raise
        return None
    return values[POSITIONAL_FIELDS.index(field)]


def infotext_fields(components: Mapping[str, Any], notes: Mapping[UnitKey, Any] | None = None,
                    is_img2img: bool = False) -> list[tuple[Any, InfotextField]]:
    """``Script.infotext_fields`` for the controls, keyed by positional field name, and for each unit's note
    (keyed by :data:`UnitKey`), which says after a paste that the unit's image must be given again."""
    fields = [
        (components[f], InfotextField(INFOTEXT_LABELS[f], lambda params, f=f: read_from_infotext(f, params)))
        for f in POSITIONAL_FIELDS
        if f not in NOT_IN_INFOTEXT
    ]
    if not is_img2img:  # a control txt2img hides keeps its default, whatever an img2img infotext says
        hidden = {slot.name for slot in SLOTS if slot.setting.control is not None and slot.setting.control.img2img}
        fields = [(c, InfotextField(key, _kept_default)) if f in hidden else (c, key)
                  for f, (c, key) in zip([f for f in POSITIONAL_FIELDS if f not in NOT_IN_INFOTEXT], fields,
                                         strict=True)]
    for key, note in (notes or {}).items():
        label = f"{_unit_label(key)} image note"  # never in infotext: the note reads the units' own keys
        fields.append((note, InfotextField(label, lambda params, key=key: pasted_unit_note(key, params, is_img2img))))
    return fields


UnitKey = tuple[int, str, int]  # panel group, object list (its setting's name), unit: all from 0


def _kept_default(params: Mapping[str, str]) -> Any:
    """A hidden control's value for pasted infotext: its default (False: "Use the init image" in txt2img); None
    (left as it is) where the infotext has no Delta keys or bad ones, as for every other control."""
    if infotext_marker() not in params:
        return None
    try:
        DeltaSettings.from_infotext(params)
    except DeltaError:
        return None
    return False


def _unit_label(key: UnitKey) -> str:
    g, name, k = key
    owner = next(s for s in settings_of(AdaptationGroup) if s.name == name)
    return f"{'Delta' if g == 0 else f'Delta group {g + 1}'} {owner.kind.item} {k + 1}"


def pasted_unit_note(key: UnitKey, params: Mapping[str, str], is_img2img: bool) -> str:
    """After a paste: the note of a unit whose image infotext could not carry, else an empty note."""
    g, name, k = key
    if infotext_marker() not in params:
        return ""
    try:
        groups = DeltaSettings.from_infotext(params).groups
    except DeltaError:
        return ""  # the paste reports it (read_from_infotext)
    units = getattr(groups[g], name) if g < len(groups) else ()
    if k >= len(units) or getattr(units[k], "use_init_image", False):
        return ""
    owner = next(s for s in settings_of(AdaptationGroup) if s.name == name)
    init = " (or tick “Use the init image”)" if is_img2img and any(
        s.name == "use_init_image" for s in settings_of(owner.kind.cls)) else ""
    return (f'<p class="delta-sampling-note">{owner.kind.item} {k + 1} was pasted without its image: infotext '
            f"never holds images, so give the image again{init}.</p>")


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


def saved_default_scope(slot: Slot) -> str:
    """What tells this control's ui-config.json key from its namesakes' in other groups and units: the accordions
    it sits in ("Second adaptation group/ControlNet unit 1"); empty for the first group's own controls, whose
    keys stay those of the label alone."""
    parts = []
    if slot.group:
        parts.append(GROUP_ACCORDION.format(ordinal=ORDINALS[slot.group + 1]))
    if slot.owner is not None and slot.unit is not None:
        parts.append(UNIT_ACCORDION.format(item=slot.owner.kind.item, k=slot.unit + 1))
    return "/".join(parts)


def scope_saved_defaults() -> list[Any]:
    """``on_ui_tabs``: both tabs' scripts are built and the WebUI has named the script file on each control; it
    reads and writes ui-config.json only after this. Returns no tab."""
    while _UNSCOPED:
        component, scope = _UNSCOPED.pop()
        source = getattr(component, "custom_script_source", None)
        if source is not None:
            component.custom_script_source = f"{source}/{scope}"
    return []


def build(script: Any, is_img2img: bool) -> list[Any]:
    """Create the controls (inside the WebUI's script UI context) and return them in POSITIONAL_FIELDS order.

    Each control comes from its setting's declaration; only the frame (the switch's accordion, the Advanced
    accordion and one accordion per further group) is laid out here.
    """
    import gradio as gr
    from modules import sd_models, shared
    from modules.ui_common import create_refresh_button
    from modules.ui_components import FormHTML, InputAccordion, ToolButton

    opts = shared.opts
    start = to_positional(DeltaSettings())
    for slot in SLOTS:
        if slot.setting.name in STARTING_VALUE_OPTIONS:
            start[slot.index] = type(start[slot.index])(_opt(opts, STARTING_VALUE_OPTIONS[slot.setting.name]))
    c: dict[str, Any] = {}
    notes: dict[UnitKey, Any] = {}
    by_family: list[tuple[Setting, Any]] = []  # dropdowns whose list follows the source's family

    def tip(slot: Slot, component: Any) -> Any:
        # Shown as the element's title, by the WebUI's hints.js at load and by our script for late-built parts.
        component.webui_tooltip = slot.tooltip
        c[slot.name] = component
        if scope := saved_default_scope(slot):
            _UNSCOPED.append((component, scope))
        return component

    def checkpoint_choices() -> list[str]:
        return ["", *sd_models.checkpoint_tiles()]

    def add_picked_lora(name: str | None, text: str) -> tuple[Any, Any]:
        if not name:  # the picker's own reset
            return gr.update(), gr.update()
        weight = _opt(opts, "extra_networks_default_multiplier", 1.0)  # what the WebUI's LoRA cards use
        return append_lora(text, name, weight), gr.update(value=None)

    def lora_controls(slot: Slot, control: Control, **common: Any) -> None:
        prefix = slot.name[: len(slot.name) - len(slot.setting.name)]
        field = tip(slot, gr.Textbox(lines=1, scale=3, placeholder=control.placeholder, **common))
        picker = gr.Dropdown(label=PICKER_LABEL, choices=lora_names(), value=None, scale=1,
                             elem_id=script.elem_id(f"{prefix}lora_picker"))
        picker.webui_tooltip = PICKER_TOOLTIP
        picker.do_not_save_to_config = True  # it empties itself after each pick: no default to keep
        create_refresh_button(picker, refresh_loras, lambda: {"choices": lora_names()},
                              script.elem_id(f"{prefix}lora_refresh"))
        picker.change(fn=add_picked_lora, inputs=[picker, field], outputs=[field, picker], show_progress="hidden")

    def listed_controls(slot: Slot, **common: Any) -> None:
        s = slot.setting
        dropdown = tip(slot, gr.Dropdown(choices=lists.choices(s), allow_custom_value=True, scale=3, **common))
        button = ToolButton(value=REFRESH_SYMBOL, elem_id=script.elem_id(f"{slot.name}_refresh"))
        button.webui_tooltip = LIST_REFRESH_TOOLTIP
        if s.kind.family:
            by_family.append((s, dropdown))
            source = [c["source"]]
        else:
            source = []

        def refreshed(source_title: str | None = None) -> Any:
            lists.refresh(s)
            return gr.update(choices=lists.choices(s, source_title))

        button.click(fn=refreshed, inputs=source, outputs=[dropdown], show_progress="hidden")

    def control(slot: Slot) -> None:
        s, ctl = slot.setting, slot.setting.control
        assert ctl is not None, f"{slot.name} declares no control"
        widget = ctl.widget or s.kind.widget
        common = {"label": ctl.label, "value": start[slot.index], "elem_id": script.elem_id(slot.name)}
        if ctl.img2img and not is_img2img:
            common["visible"] = False  # hidden, not left out: both tabs pass the same positional values
        kind: Any = s.kind
        if widget == "checkpoint":
            dropdown = tip(slot, gr.Dropdown(choices=checkpoint_choices(), allow_custom_value=True, **common))
            create_refresh_button(dropdown, sd_models.list_models, lambda: {"choices": checkpoint_choices()},
                                  script.elem_id(f"{slot.name}_refresh"))
        elif widget == "loras":
            lora_controls(slot, ctl, **common)
        elif widget == "listed":
            listed_controls(slot, **common)
        elif widget == "image":
            tip(slot, gr.Image(type="numpy", image_mode="RGB", **common))
        elif widget == "textbox":
            tip(slot, gr.Textbox(lines=1, placeholder=ctl.placeholder, **common))
        elif widget == "slider":
            tip(slot, gr.Slider(minimum=kind.lo, maximum=kind.hi, step=ctl.step, **common))
        elif widget in ("dropdown", "radio"):
            tip(slot, (gr.Dropdown if widget == "dropdown" else gr.Radio)(choices=list(kind.options), **common))
        elif widget == "checkbox":
            tip(slot, gr.Checkbox(**common))
        else:
            raise ValueError(f"{slot.name}: no control of kind {widget!r}")

    def controls(slots: list[Slot]) -> None:
        # Consecutive controls declaring the same row share it.
        for row, members in itertools.groupby(slots, key=lambda slot: slot.setting.control.row):
            with gr.Row() if row is not None else contextlib.nullcontext():
                for slot in members:
                    control(slot)

    def unit_blocks(g: int) -> None:
        # Each object list the panel shows (ControlNet units): one accordion, one block per unit.
        for owner in _unit_lists():
            kind: Any = owner.kind
            first = next(s for s in settings_of(kind.cls) if isinstance(s.kind, Listed))
            why = lists.missing(first)
            prefix = "" if g == 0 else f"group{g + 1}_"
            with gr.Accordion(UNITS_ACCORDION.format(item=kind.item), open=False,
                              elem_id=script.elem_id(f"{prefix}{owner.name}")):
                if why:  # the extension that lists and runs them is missing: say so instead of empty controls
                    gr.HTML(f'<p class="delta-sampling-note">{why}</p>',
                            elem_id=script.elem_id(f"{prefix}{owner.name}_missing"))
                with gr.Column(visible=not why):
                    for k in range(kind.panel):
                        with gr.Accordion(UNIT_ACCORDION.format(item=kind.item, k=k + 1), open=k == 0,
                                          elem_id=script.elem_id(f"{prefix}{kind.prefix}{k + 1}")):
                            note = gr.HTML("", elem_id=script.elem_id(f"{prefix}{kind.prefix}{k + 1}_note"))
                            notes[(g, owner.name, k)] = note
                            unit = _unit(g, owner, k)
                            controls(unit)
                            for slot in unit:  # a new image answers the note
                                if (slot.setting.control.widget or slot.setting.kind.widget) == "image":
                                    c[slot.name].change(fn=_clear_note, inputs=[c[slot.name]], outputs=[note],
                                                        show_progress="hidden")

    def follow_source(source_title: str | None) -> list[Any]:
        return [gr.update(choices=lists.choices(s, source_title)) for s, _ in by_family]

    with InputAccordion(start[0], label=TITLE, elem_id=script.elem_id("enabled")) as enabled:
        enabled.accordion.webui_tooltip = TOOLTIPS["enabled"]
        c["enabled"] = enabled
        with enabled.extra():
            # Filled in, and kept in sync, by javascript/delta_sampling.js.
            FormHTML(value='<span class="delta-sampling-summary-text"></span>', elem_id=script.elem_id("summary"))
        controls(_section("main"))
        controls(_group(0))
        unit_blocks(0)
        with gr.Accordion(ADVANCED, open=False, elem_id=script.elem_id("advanced")):
            controls(_section("advanced"))
            for g, switch in enumerate((slot for slot in SLOTS if slot.switch), 1):
                with gr.Accordion(GROUP_ACCORDION.format(ordinal=ORDINALS[g + 1]), open=False,
                                  elem_id=script.elem_id(f"group{g + 1}")):
                    controls([switch])
                    controls(_group(g))
                    unit_blocks(g)
    if by_family:  # a model list shows what fits the chosen source
        c["source"].change(fn=follow_source, inputs=[c["source"]], outputs=[d for _, d in by_family],
                           show_progress="hidden")

    script.infotext_fields = infotext_fields(c, notes, is_img2img)
    script.paste_field_names = paste_field_names()
    # The WebUI passes the controls' values positionally: one control per field, in POSITIONAL_FIELDS order.
    assert set(c) == set(POSITIONAL_FIELDS), f"controls ≠ POSITIONAL_FIELDS: {sorted(set(c) ^ set(POSITIONAL_FIELDS))}"
    return [c[f] for f in POSITIONAL_FIELDS]



def _section(section: str) -> list[Slot]:
    """The generation's controls of one part of the panel, in declaration order (the switch is the accordion)."""
    slots = {slot.setting.name: slot for slot in SLOTS if slot.group is None}
    return [slots[s.name] for s in settings_of(DeltaSettings)
            if s.name in slots and s.control is not None and s.control.section == section]


def _group(g: int) -> list[Slot]:
    """Panel group ``g``'s own controls (not its units'), in declaration order."""
    slots = {slot.setting.name: slot for slot in SLOTS if slot.group == g and not slot.switch and slot.owner is None}
    return [slots[s.name] for s in settings_of(AdaptationGroup) if s.name in slots]


def _unit_lists() -> list[Setting]:
    """The group's object lists the panel shows unit by unit."""
    return [s for s in settings_of(AdaptationGroup) if isinstance(s.kind, Objects) and s.kind.panel]


def _unit(g: int, owner: Setting, k: int) -> list[Slot]:
    """Unit ``k`` of list ``owner`` in panel group ``g``: its controls, in declaration order."""
    slots = {slot.setting.name: slot for slot in SLOTS if slot.group == g and slot.owner is owner and slot.unit == k}
    return [slots[s.name] for s in settings_of(owner.kind.cls) if s.name in slots]


def _clear_note(image: Any) -> Any:
    import gradio as gr

    return "" if image is not None else gr.update()


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
    "saved_default_scope",
    "scope_saved_defaults",
]
