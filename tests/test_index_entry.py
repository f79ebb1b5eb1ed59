"""The entry for the WebUI's extension index (AUTOMATIC1111/stable-diffusion-webui-extensions), kept ready to
submit as ``extensions/sd-webui-delta-sampling.json`` there."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENTRY = ROOT / "docs" / "extension-index" / "sd-webui-delta-sampling.json"

# The index's extension_template.json keys and its tags.json names, at commit
# 956826ecf5474938f988f4b9fd128eedf67f9067 of AUTOMATIC1111/stable-diffusion-webui-extensions ("installed" is the
# WebUI's own; "localization" is for language packs only; "online" and "ads" would be required if they applied).
TEMPLATE_KEYS = ["name", "url", "description", "tags"]
TAGS = {"script", "localization", "tab", "dropdown", "ads", "installed", "training", "models", "UI related",
        "prompting", "editing", "manipulations", "online", "animation", "query", "science", "extras"}


def test_entry_has_the_templates_keys_and_known_tags():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert list(entry) == TEMPLATE_KEYS
    assert entry["tags"] and set(entry["tags"]) <= TAGS - {"installed", "localization", "online", "ads"}
    assert len(set(entry["tags"])) == len(entry["tags"])


def test_entry_names_both_hosts_and_points_at_a_git_url():
    entry = json.loads(ENTRY.read_text(encoding="utf-8"))
    assert "AUTOMATIC1111" in entry["description"] and "Forge" in entry["description"]
    assert entry["description"].isascii()  # the index asks for English
    assert re.fullmatch(r"https://github\.com/[\w.-]+/sd-webui-delta-sampling\.git", entry["url"])
    assert entry["name"] == "Delta Sampling"  # the panel's title, what users find it by


def test_readme_install_section_points_to_the_index():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    install = readme[readme.index("## Install"):readme.index("\n## ", readme.index("## Install") + 1)]
    assert "Extensions → Available" in install and "Install from URL" in install
