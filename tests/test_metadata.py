"""metadata.ini: the load order the WebUIs read (AUTOMATIC1111 1.10 modules/scripts.py list_scripts, Forge alike).

``After`` names extensions by canonical name, the folder name lower-cased (modules/extensions.py: the ini's
``Name`` is read, then replaced by the folder name); a named extension that is not installed is skipped (its name
is never in the dependency map, and topological_sort ignores such names). ``Requires`` would report an error on a
host without the extension, so the file has none.
"""

from __future__ import annotations

import configparser
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def ini() -> configparser.ConfigParser:
    config = configparser.ConfigParser()
    assert config.read(ROOT / "metadata.ini")
    return config


def listed(config: configparser.ConfigParser, field: str, section: str, extra: str) -> list[str]:
    """modules/extensions.py ExtensionMetadata.get_script_requirements, as the WebUI reads a script's list."""
    text = config.get(section, field, fallback="") + ", " + config.get(extra, field, fallback="")
    return [x.strip() for x in text.lower().split(",") if x.strip()]


def test_the_script_loads_after_both_hosts_lora_and_controlnet():
    config = ini()
    section = "scripts/delta_sampling.py"
    assert (ROOT / section).is_file()  # the section names the real script
    after = listed(config, "After", section, "scripts")
    # AUTOMATIC1111's extensions-builtin/Lora, Forge's sd_forge_lora, sd-webui-controlnet, Forge's built-in one
    assert {"lora", "sd_forge_lora", "sd-webui-controlnet", "sd_forge_controlnet"} <= set(after)


def test_nothing_is_required():
    config = ini()
    assert not listed(config, "Requires", "Extension", "Extension")
    assert not listed(config, "Requires", "scripts/delta_sampling.py", "scripts")
