"""Every user-visible string of the panel, its settings and its X/Y/Z axes, read from their declarations, and the
localization template made from them.

The WebUI's localizations are JSON maps of UI text to its translation, one file per language in an extension's
``localizations/`` folder (``xx_YY.json``, chosen under Settings → User interface → Localization); its
``localization.js`` replaces text, titles (tooltips) and placeholders that equal a key. The template,
``localizations/template/strings.json`` (in a subfolder, so the WebUI does not offer it as a language), maps each
string to itself; ``python -m lib_delta.webui.strings`` writes it again after a string changed, and a test fails
while it is out of date or a translation lacks a string.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from ..args import DeltaSettings
from ..fields import ORDINALS, Choice, walk
from . import interfaces, panel

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "localizations" / "template" / "strings.json"
SCRIPT = ROOT / "javascript" / "delta_sampling.js"
_JS_TEXT = re.compile(r'\bt\("((?:[^"\\]|\\.)*)"\)')  # the strings delta_sampling.js translates: t("...")


def panel_strings() -> list[str]:
    """The panel's texts: frame, labels, tooltips, placeholders and the choices of its dropdowns and radios."""
    out = [panel.TITLE, panel.ADVANCED, panel.PICKER_LABEL, panel.PICKER_TOOLTIP]
    out += [panel.GROUP_ACCORDION.format(ordinal=ORDINALS[g + 1]) for g in range(1, len(panel.SLOTS))
            if any(slot.switch and slot.group == g for slot in panel.SLOTS)]
    for owner in {slot.owner.name: slot.owner for slot in panel.SLOTS if slot.owner is not None}.values():
        kind = owner.kind
        out.append(panel.UNITS_ACCORDION.format(item=kind.item))
        out += [panel.UNIT_ACCORDION.format(item=kind.item, k=k + 1) for k in range(kind.panel)]
        out.append(panel.LIST_REFRESH_TOOLTIP)
    for slot in panel.SLOTS:
        control = slot.setting.control
        if control is not None:
            out.append(control.label)
            if control.placeholder:
                out.append(control.placeholder)
            if isinstance(slot.setting.kind, Choice):
                out += slot.setting.kind.options
        out.append(slot.tooltip)
    return out


def settings_strings() -> list[str]:
    out = [interfaces.SECTION[1]]
    for label, info in interfaces.SETTING_TEXTS.values():
        out += [label, info]
    return out


def axis_strings() -> list[str]:
    return [s.xyz.label for s in walk(DeltaSettings) if s.xyz is not None]


def script_strings(script: Path = SCRIPT) -> list[str]:
    """What javascript/delta_sampling.js writes into the page through its ``t()``."""
    return [json.loads(f'"{m}"') for m in _JS_TEXT.findall(script.read_text(encoding="utf-8"))]


def all_strings() -> list[str]:
    """Every string, once, in panel order."""
    return list(dict.fromkeys(s for s in panel_strings() + settings_strings() + axis_strings() + script_strings()
                              if s.strip()))


def template() -> dict[str, str]:
    return {s: s for s in all_strings()}


def dump(mapping: dict[str, str]) -> str:
    return json.dumps(mapping, ensure_ascii=False, indent=2) + "\n"


def main() -> None:
    TEMPLATE.parent.mkdir(parents=True, exist_ok=True)
    TEMPLATE.write_text(dump(template()), encoding="utf-8")
    print(f"{len(template())} strings written to {TEMPLATE.relative_to(ROOT)}", file=sys.stderr)


if __name__ == "__main__":
    main()
