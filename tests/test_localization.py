"""The localization template lists every user-visible string, and every translation covers it."""

from __future__ import annotations

import json
import re

import pytest

from lib_delta.webui import strings

LOCALIZATIONS = sorted(strings.ROOT.glob("localizations/*.json"))


def test_the_template_is_up_to_date():
    saved = json.loads(strings.TEMPLATE.read_text(encoding="utf-8"))
    assert saved == strings.template(), "the panel's strings changed: run `python -m lib_delta.webui.strings`"


def test_the_template_is_not_offered_as_a_language():
    # the WebUI lists <extension>/localizations/*.json (modules/localization.py), not its subfolders
    assert strings.TEMPLATE.parent.parent.name == "localizations" and strings.TEMPLATE.parent.name != "localizations"


def test_settings_axes_and_script_texts_are_listed():
    template = strings.template()
    assert "Default λ (strength)" in template and "[Delta] Lambda" in template and "no source" in template
    # the script translates what it writes through t(); a bare literal in the summary would escape the template
    js = strings.SCRIPT.read_text(encoding="utf-8")
    summary = re.sub(r't\("[^"]*"\)', "", js[js.index("function summaryText"):js.index("function applyTooltips")])
    bare = set(re.findall(r'"([A-Za-z][A-Za-z ]+)"', summary)) - {"input", "input:checked", "input[type=number]",
                                                                   "source", "mode", "strength", "group2_enabled"}
    assert bare == {"delta"}, bare  # the mode's value, compared, never shown


@pytest.mark.parametrize("path", LOCALIZATIONS, ids=lambda p: p.name)
def test_each_translation_covers_every_string(path):
    translation = json.loads(path.read_text(encoding="utf-8"))
    template = strings.template()
    assert set(template) - set(translation) == set(), f"{path.name} lacks {sorted(set(template) - set(translation))}"
    assert set(translation) - set(template) == set(), f"{path.name} has strings the panel no longer shows"
    assert all(isinstance(v, str) and v.strip() for v in translation.values())  # an empty one blanks the text


def test_chinese_is_one_of_them():
    zh = json.loads((strings.ROOT / "localizations" / "zh_CN.json").read_text(encoding="utf-8"))
    assert zh["λ (strength)"] == "λ（强度）" and zh["Advanced"] == "高级"
    assert sum(v != k for k, v in zh.items()) > len(zh) * 0.8  # translated, not copied
