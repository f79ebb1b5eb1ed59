"""The panel built with each WebUI's own gradio (3.41 in AUTOMATIC1111, 4.40 in Forge 2 and Neo): every positional
control is in the page's config with its elem_id and kind, the ControlNet units' "Use the init image" only in
img2img, the IP-Adapter units' model and encoder lists, and gradio accepts every event. A fast check (no WebUI is
started); see panel_build.py.

Each WebUI is opt-in by its variable: DELTA_E2E_A1111 (its venv's python, or DELTA_E2E_PYTHON), DELTA_E2E_FORGE_PYTHON,
DELTA_E2E_NEO_PYTHON.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from harness import REPO_ROOT, A1111Install

from lib_delta.args import POSITIONAL_FIELDS


def _pythons() -> dict[str, Path | None]:
    a1111 = A1111Install.from_env()
    forge, neo = os.environ.get("DELTA_E2E_FORGE_PYTHON"), os.environ.get("DELTA_E2E_NEO_PYTHON")
    return {"a1111": a1111.python if a1111 else None, "forge": Path(forge) if forge else None,
            "neo": Path(neo) if neo else None}


def _roots() -> dict[str, Path | None]:
    """Each WebUI's folder, for its own ui_loadsave.py (the panel's saved defaults are read by it)."""
    a1111 = A1111Install.from_env()
    forge, neo = os.environ.get("DELTA_E2E_FORGE"), os.environ.get("DELTA_E2E_NEO")
    return {"a1111": a1111.root if a1111 else None, "forge": Path(forge) if forge else None,
            "neo": Path(neo) if neo else None}


@pytest.mark.parametrize(("webui", "major"), [("a1111", "3"), ("forge", "4"), ("neo", "4")])
def test_the_panel_builds_with_the_webuis_gradio(webui: str, major: str, record_property) -> None:
    python = _pythons()[webui]
    if python is None or not python.exists():
        pytest.skip(f"no {webui} python configured")
    root = _roots()[webui]
    run = subprocess.run([str(python), str(REPO_ROOT / "tests" / "e2e" / "panel_build.py"),
                          *([str(root)] if root is not None else [])], cwd=REPO_ROOT,
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    built = json.loads(run.stdout.strip().splitlines()[-1])
    record_property("gradio", built["gradio"])
    assert built["gradio"].startswith(f"{major}.")
    init_boxes = [f for f in POSITIONAL_FIELDS if f.endswith("_use_init_image")]
    for tab, seen in built["tabs"].items():
        assert seen["controls"] == seen["fields"] == len(POSITIONAL_FIELDS), tab
        assert seen["missing"] == [], (tab, seen["missing"])
        assert seen["hidden"] == (sorted(init_boxes) if tab == "txt2img" else []), tab
        kinds = seen["types"]
        assert kinds["controlnet1_image"] == "image" and kinds["group2_controlnet2_model"] == "dropdown", kinds
        choices = [c[0] if isinstance(c, list) else c for c in seen["model_choices"]]  # gradio 4: (value, label)
        assert choices == ["None", "control_v11p_sd15_canny [d14c016b]", "diffusers_xl_canny_mid [112a778d]"]
        assert kinds["ipadapter1_image"] == "image" and kinds["group2_ipadapter2_model"] == "dropdown", kinds
        ip_choices = [c[0] if isinstance(c, list) else c for c in seen["ip_model_choices"]]
        assert ip_choices == ["None", "ip-adapter_sd15 [6a3f6166]", "ip-adapter_xl [b7ef3f1a]"]
        value, encoders = seen["ip_module"]
        assert value == "ip-adapter_clip_h" and [c[0] if isinstance(c, list) else c for c in encoders] == [
            "ip-adapter_clip_h", "ip-adapter_clip_g"]
    assert built["events"] > 0
    if root is None:
        return
    # The WebUI's own ui_loadsave keys a saved default by the control's label; every group and unit repeats its
    # labels, and a control sharing a key is neither saved by Defaults → Apply nor given its own default.
    saved = built["saved_defaults"]
    for tab in ("txt2img", "img2img"):
        assert saved[tab]["saveable"] > 40 and saved[tab]["untracked"] == [], saved[tab]
        assert len(set(saved[tab]["labels"].values())) == 2, saved[tab]["labels"]  # λ and Control weight, repeated
    assert saved["txt2img"]["values"] == {"strength": 0.6, "group2_strength": 1.5, "controlnet1_weight": 1.0,
                                          "controlnet2_weight": 1.0, "group2_controlnet1_weight": 1.0}
    assert saved["img2img"]["values"]["strength"] == saved["img2img"]["values"]["group2_strength"] == 1.0
    assert "customscript/delta_sampling.py/Second adaptation group/ControlNet unit 1/txt2img/Control weight/value" \
        in saved["keys"]
