"""Run a real Forge Neo for the end-to-end tests, on the Forge 2 harness (``forge_harness.py``).

Neo starts, serves and stops as Forge 2 does; what differs is the install (Neo vendors huggingface_guess and clones
nothing at first start), the command line (``--cpu``; no ``--always-cpu`` or ``--no-download-sd-model``, and an
unknown flag is an error) and the SDXL fixture: Neo recognises an SDXL by the full depth of its input blocks' attention
(huggingface_guess/model_list.py, ``SDXL.unet_config``) and has no Segmind Vega entry, so the reduced SDXL is given
that depth (:func:`neo_sdxl`), and a v-prediction variant carries the ``v_pred`` key that NoobAI-XL's v-prediction
checkpoints carry and Neo reads (model_list.py:205-209).

Environment:
    DELTA_E2E_NEO           the Neo WebUI folder (launch.py, backend/, modules_forge/forge_version.py saying "neo");
                            the Neo tests are skipped without it
    DELTA_E2E_NEO_PYTHON    Neo's python (default: <install>/venv/bin/python, else the venv beside the folder)
    DELTA_E2E_NEO_ARGS      extra launch flags
    DELTA_E2E_CACHE, DELTA_E2E_HF_HOME, DELTA_E2E_A1111: as in harness.py (the fixtures are AUTOMATIC1111-built)
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forge_harness import ForgeInstall, ForgeServerPool, cached_fixtures, fixtures_dir, serve
from harness import ModelFixture, _read_fixture

# CPU only (Neo's switch), API on, loopback only; Neo downloads no model, and warns below Python 3.13.
NEO_ARGS = (
    "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
    "--skip-python-version-check", "--cpu", "--api", "--disable-console-progressbars",
)
# Neo's flags for what Forge 2 calls --unet-in-bf16 --clip-in-fp16 (backend/args.py:41, 57)
LOW_MEMORY = ("--bf16-unet", "--fp16-text-enc")

# Fixtures Neo reads in a form of their own, derived from the reduced SDXL (key -> v-prediction)
NEO_SDXL = {"sdxl": False, "sdxl_vpred": True}
# SDXL's attention depth per input block (huggingface_guess/model_list.py SDXL: [0, 0, 2, 2, 10, 10]); the reduced
# fixture has one block in each
_INPUT_DEPTHS = {4: 2, 5: 2, 7: 10, 8: 10}
# The residual branches of a transformer block: zero in the blocks added, so that each is the identity and the model
# computes what the reduced fixture computes
_BRANCH_OUTPUTS = re.compile(r"\.(attn1\.to_out\.0|attn2\.to_out\.0|ff\.net\.2)\.(weight|bias)$")


@dataclass(frozen=True)
class NeoInstall(ForgeInstall):
    launch_args: tuple[str, ...] = NEO_ARGS
    label: str = "neo"

    @classmethod
    def from_env(cls) -> NeoInstall | None:
        root = os.environ.get("DELTA_E2E_NEO")
        if not root:
            return None
        root_path = Path(root).expanduser().resolve()
        python = os.environ.get("DELTA_E2E_NEO_PYTHON")
        if python:
            python_path = Path(python).expanduser()
        else:
            inside = root_path / "venv" / "bin" / "python"
            python_path = inside if inside.exists() else root_path.parent / "venv" / "bin" / "python"
        cache = Path(os.environ.get("DELTA_E2E_CACHE") or "~/.cache/sd-webui-delta-sampling-e2e").expanduser()
        hf_home = os.environ.get("DELTA_E2E_HF_HOME") or os.environ.get("HF_HOME")
        extra = tuple(shlex.split(os.environ.get("DELTA_E2E_NEO_ARGS", "")))
        return cls(root_path, python_path, cache, Path(hf_home).expanduser() if hf_home else None, extra)

    def problems(self) -> list[str]:
        found = []
        if not (self.root / "launch.py").is_file() or not (self.root / "backend" / "loader.py").is_file():
            found.append(f"{self.root} is not a Forge WebUI folder (no launch.py / backend/loader.py)")
        elif self.version() != "neo":
            found.append(f"{self.root} is not Forge Neo (modules_forge/forge_version.py: version {self.version()!r})")
        if not self.python.exists():
            found.append(f"no Neo python at {self.python} (set DELTA_E2E_NEO_PYTHON)")
        return found

    def config_settings(self) -> dict[str, Any]:
        """Neo stops at start-up for a key press when config.json lacks its settings' version (``VERSION_UID``,
        modules/launch_utils.py:577-619: "You are updating from an old version...")."""
        uid = _assigned(self.root / "modules" / "launch_utils.py", "VERSION_UID")
        return {"VERSION_UID": uid} if uid else {}

    def version(self) -> str | None:
        """``version`` in modules_forge/forge_version.py ("neo" for Neo), read without importing it."""
        return _assigned(self.root / "modules_forge" / "forge_version.py", "version")

    def release(self) -> str | None:
        return _assigned(self.root / "modules_forge" / "forge_version.py", "release")


def _assigned(path: Path, name: str) -> str | None:
    """The string a module assigns to ``name`` at its top level (annotated or not), read without importing it."""
    try:
        match = re.search(rf"^{name}(?:\s*:[^=]*)?\s*=\s*['\"]([^'\"]*)['\"]", path.read_text(), re.MULTILINE)
    except OSError:
        return None
    return match.group(1) if match else None


def neo_fixtures(install: ForgeInstall, models: tuple[str, ...]) -> dict[str, ModelFixture]:
    """The fixtures as Neo reads them: the SDXL ones derived (see the module doc), the others as built."""
    built = cached_fixtures(install, tuple(dict.fromkeys("sdxl" if m in NEO_SDXL else m for m in models)))
    out = {}
    for key in models:
        if key in NEO_SDXL:
            out[key] = neo_sdxl(built["sdxl"], fixtures_dir(install) / f"neo-{key}", NEO_SDXL[key])
        else:
            out[key] = built[key]
    return out


def neo_sdxl(fixture: ModelFixture, directory: Path, v_prediction: bool) -> ModelFixture:
    """The reduced SDXL fixture with SDXL's input-block depth, the added blocks the identity (built once, beside the
    other fixtures); with ``v_prediction``, also the ``v_pred`` key."""
    name = "delta_e2e_sdxl_neo" + ("_vpred" if v_prediction else "")
    manifest = {**fixture.manifest, "files": {"checkpoint": f"{name}.safetensors"}, "loras": {},
                "derived_from": fixture.manifest["files"]["checkpoint"], "v_prediction": v_prediction}
    cached = _read_fixture(directory, fixture.key, fixture.manifest["fixture_version"])
    if cached is not None and cached.manifest.get("derived_from") == manifest["derived_from"]:
        return cached
    import torch
    from safetensors.torch import load_file, save_file

    state = load_file(str(fixture.checkpoint))
    for block, depth in _INPUT_DEPTHS.items():
        prefix = f"model.diffusion_model.input_blocks.{block}.1.transformer_blocks."
        first = [k for k in state if k.startswith(prefix + "0.")]
        for i in range(1, depth):
            for key in first:
                added = f"{prefix}{i}.{key[len(prefix) + 2:]}"
                state[added] = torch.zeros_like(state[key]) if _BRANCH_OUTPUTS.search(key) else state[key].clone()
    if v_prediction:
        state["v_pred"] = torch.zeros(0)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / manifest["files"]["checkpoint"]), metadata={"delta_e2e_model": name})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ModelFixture(fixture.key, directory, manifest)


class NeoServerPool(ForgeServerPool):
    """One Neo at a time, with the fixtures as Neo reads them."""

    def fixtures(self, models: tuple[str, ...] = ("sd15",)) -> dict[str, ModelFixture]:
        todo = tuple(m for m in models if m not in self._fixtures)
        if todo:
            self._fixtures.update(neo_fixtures(self.install, todo))  # type: ignore[arg-type]
        return {m: self._fixtures[m] for m in models}


def open_pool(models: tuple[str, ...]) -> Iterator[NeoServerPool]:
    """A test module's Neo servers (see :func:`forge_harness.open_pool`)."""
    yield from serve(NeoInstall.from_env(), NeoServerPool, models, "DELTA_E2E_NEO", "a Forge Neo WebUI folder")
