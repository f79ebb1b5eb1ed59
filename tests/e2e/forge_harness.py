"""Run a real Stable Diffusion WebUI Forge 2 for the end-to-end tests, on the shared harness.

The fixture checkpoints, the throwaway data dir, the client and the image helpers are the A1111 harness's
(``harness.py``); only the install, the command line and the fixture source differ. Forge reads the same checkpoint
files. The fixtures are built with the A1111 install (they instantiate its ldm/sgm classes), so they come from the
cache, or are built when DELTA_E2E_A1111 names an install too.

Environment:
    DELTA_E2E_FORGE         the Forge install (its repo root, with repositories/huggingface_guess in place);
                            the Forge tests are skipped without it
    DELTA_E2E_FORGE_PYTHON  Forge's python (default: <install>/venv/bin/python)
    DELTA_E2E_FORGE_ARGS    extra launch flags, e.g. "--unet-in-bf16" on a machine short of memory
    DELTA_E2E_CACHE, DELTA_E2E_HF_HOME, DELTA_E2E_A1111: as in harness.py
    DELTA_E2E_CONTROLNET    only to build the ControlNet fixture when it is not cached (with DELTA_E2E_A1111): Forge
                            runs its own built-in ControlNet; ServerConfig.controlnets puts the fixture in the data
                            dir's models/ControlNet
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from harness import (
    A1111Install,
    ModelFixture,
    ServerConfig,
    ServerPool,
    WebUIClient,
    WebUIServer,
    _free_port,
    _read_fixture,
    _server_env,
    ensure_fixtures,
    fixture_version,
)

# CPU only (Forge's own switch: --use-cpu and --no-half are A1111's), API on, loopback only, nothing downloaded.
FORGE_ARGS = (
    "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--skip-version-check",
    "--always-cpu", "--api", "--no-download-sd-model", "--disable-console-progressbars",
)


@dataclass(frozen=True)
class ForgeInstall:
    root: Path
    python: Path
    cache: Path
    hf_home: Path | None
    extra_args: tuple[str, ...] = ()
    launch_args: tuple[str, ...] = FORGE_ARGS  # the flags every server gets
    label: str = "forge"  # names its logs

    def config_settings(self) -> dict[str, Any]:
        """What every server's config.json must hold besides the test's settings."""
        return {}

    @classmethod
    def from_env(cls) -> ForgeInstall | None:
        root = os.environ.get("DELTA_E2E_FORGE")
        if not root:
            return None
        root_path = Path(root).expanduser().resolve()
        python = Path(os.environ.get("DELTA_E2E_FORGE_PYTHON") or root_path / "venv" / "bin" / "python").expanduser()
        cache = Path(os.environ.get("DELTA_E2E_CACHE") or "~/.cache/sd-webui-delta-sampling-e2e").expanduser()
        hf_home = os.environ.get("DELTA_E2E_HF_HOME") or os.environ.get("HF_HOME")
        extra = tuple(shlex.split(os.environ.get("DELTA_E2E_FORGE_ARGS", "")))
        return cls(root_path, python, cache, Path(hf_home).expanduser() if hf_home else None, extra)

    def problems(self) -> list[str]:
        found = []
        if not (self.root / "launch.py").is_file() or not (self.root / "backend" / "loader.py").is_file():
            found.append(f"{self.root} is not a Forge 2 install (no launch.py / backend/loader.py)")
        if not self.python.exists():
            found.append(f"no Forge python at {self.python} (set DELTA_E2E_FORGE_PYTHON)")
        if not (self.root / "repositories" / "huggingface_guess" / "huggingface_guess").is_dir():
            found.append(f"{self.root}/repositories/huggingface_guess is missing (Forge clones it at first start; "
                         "offline it must be put there)")
        return found


def forge_fixtures(install: ForgeInstall, models: tuple[str, ...]) -> dict[str, ModelFixture]:
    """Cached fixture models; built with the A1111 install when DELTA_E2E_A1111 is set and some are missing.

    "sdxl" is the reduced SDXL made Forge-loadable (see :func:`forge_sdxl`)."""
    found = cached_fixtures(install, models)
    if "sdxl" in found:
        found["sdxl"] = forge_sdxl(found["sdxl"], fixtures_dir(install) / "forge-sdxl")
    return found


def fixtures_dir(install: ForgeInstall) -> Path:
    return install.cache / f"fixtures-v{fixture_version()}"


def cached_fixtures(install: ForgeInstall, models: tuple[str, ...]) -> dict[str, ModelFixture]:
    """The fixture models as built (see :func:`forge_fixtures`)."""
    base = fixtures_dir(install)
    found = {key: _read_fixture(base / key, key, fixture_version()) for key in models}
    missing = [key for key, f in found.items() if f is None]
    if missing:
        a1111 = A1111Install.from_env()
        if a1111 is None:
            raise LookupError(f"fixture models {missing} are not in {base}; build them once with DELTA_E2E_A1111 set "
                              "(or run tests/e2e/fixtures.py with the A1111 python)")
        found.update(ensure_fixtures(a1111, tuple(missing)))
    return {key: found[key] for key in models}


# Forge recognises a model by its exact block layout (huggingface_guess): the reduced SDXL fixture, one transformer
# block per attention layer, matches none. Giving the two attention layers of the deepest input level a second
# block makes it the layout of Segmind's Vega, a distilled SDXL that Forge loads as an SDXL engine.
_VEGA_LAYERS = ("model.diffusion_model.input_blocks.7.1.transformer_blocks.",
                "model.diffusion_model.input_blocks.8.1.transformer_blocks.")


def forge_sdxl(fixture: ModelFixture, directory: Path) -> ModelFixture:
    """The reduced SDXL fixture with the layout of Segmind Vega (built once, beside the other fixtures)."""
    manifest = {**fixture.manifest, "files": {"checkpoint": "delta_e2e_sdxl_vega.safetensors"}, "loras": {},
                "derived_from": fixture.manifest["files"]["checkpoint"]}
    cached = _read_fixture(directory, fixture.key, fixture.manifest["fixture_version"])
    if cached is not None and cached.manifest.get("derived_from") == manifest["derived_from"]:
        return cached
    from safetensors.torch import load_file, save_file

    state = load_file(str(fixture.checkpoint))
    for prefix in _VEGA_LAYERS:
        for key in [k for k in state if k.startswith(prefix + "0.")]:
            state[prefix + "1." + key[len(prefix) + 2:]] = state[key].clone()  # the second block starts as the first
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / manifest["files"]["checkpoint"]), metadata={"delta_e2e_model": "sdxl_vega"})
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ModelFixture(fixture.key, directory, manifest)


# An SD1.5 checkpoint's parts as Flux users keep a Flux's: (prefix in the whole file, prefix in the part's file,
# the models folder Forge lists it from). The UNet keeps its prefix; the VAE and the HF-named CLIP-L lose theirs.
SPLIT_PARTS = {"unet": ("model.diffusion_model.", "model.diffusion_model.", "Stable-diffusion"),
               "vae": ("first_stage_model.", "", "VAE"),
               "text_encoder": ("cond_stage_model.transformer.", "", "text_encoder")}


def forge_split(fixture: ModelFixture, directory: Path) -> ModelFixture:
    """The fixture's checkpoint as three files, each in the layout Forge reads from its folder, its LoRAs beside
    them (built once, beside the other fixtures): the diffusion model alone is the checkpoint, and the manifest's
    ``modules`` (file -> folder) are what to choose in 'VAE / Text Encoder'."""
    names = {part: f"{fixture.model_name}_{part}.safetensors" for part in SPLIT_PARTS}
    manifest = {**fixture.manifest, "files": {"checkpoint": names["unet"]},
                "modules": {names[part]: SPLIT_PARTS[part][2] for part in ("vae", "text_encoder")},
                "derived_from": f"{fixture.checkpoint.name} {fixture.checkpoint.stat().st_mtime_ns}"}
    cached = _read_fixture(directory, fixture.key, fixture.manifest["fixture_version"])
    if cached is not None and cached.manifest.get("derived_from") == manifest["derived_from"]:
        return cached
    from safetensors.torch import load_file, save_file

    state = load_file(str(fixture.checkpoint))
    directory.mkdir(parents=True, exist_ok=True)
    for part, (old, new, _) in SPLIT_PARTS.items():
        tensors = {new + k[len(old):]: v for k, v in state.items() if k.startswith(old)}
        assert len(tensors) > 16, f"the fixture has no {part} under {old}"
        save_file(tensors, str(directory / names[part]))
    for lora in fixture.lora_files:
        (directory / lora.name).unlink(missing_ok=True)
        (directory / lora.name).symlink_to(lora)
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return ModelFixture(fixture.key, directory, manifest)


# The file Forge's IP-Adapter preprocessor loads for each CLIP-vision fixture (forge_ipadapter.py: "CLIP-ViT-H
# (IPAdapter)" reads models/ControlNetPreprocessor/CLIP-ViT-H-14.safetensors, and downloads it when it is missing).
CLIP_VISION_FILES = {"clip_h": "CLIP-ViT-H-14.safetensors"}


def forge_clip_vision(fixture: ModelFixture, directory: Path) -> Path:
    """The CLIP-vision fixture (a torch.save state dict, as sd-webui-controlnet reads it) as the safetensors file
    Forge's preprocessor reads, with the same tensors (built once, beside the other fixtures)."""
    dest = directory / CLIP_VISION_FILES[fixture.key]
    source = fixture.clip_vision
    stamp, made = f"{source.stat().st_size}-{source.stat().st_mtime_ns}", directory / "derived_from"
    if dest.is_file() and made.is_file() and made.read_text() == stamp:
        return dest
    import torch
    from safetensors.torch import save_file

    state = torch.load(str(source), map_location="cpu", weights_only=True)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items() if isinstance(v, torch.Tensor)}, str(dest),
              metadata={"delta_e2e_model": fixture.key})
    made.write_text(stamp)
    return dest


class ForgeServer(WebUIServer):
    """A running Forge on 127.0.0.1 with its own data dir; see :class:`harness.WebUIServer`."""

    def start(self) -> None:
        if self.config.controlnet_extension:
            raise ValueError("Forge has its ControlNet built in: ServerConfig.controlnet_extension is for "
                             "AUTOMATIC1111 (ServerConfig.controlnets puts the ControlNet fixtures in place)")
        self._prepare_data_dir()
        assert self.data_dir is not None
        if self.config.clip_vision:  # where Forge's IP-Adapter preprocessors look, so that nothing downloads
            folder = self.data_dir / "models" / "ControlNetPreprocessor"
            folder.mkdir(parents=True, exist_ok=True)
            for key in self.config.clip_vision:
                made = forge_clip_vision(self.fixtures[key], self.install.cache / f"fixtures-v{fixture_version()}"
                                         / f"forge-{key}")
                (folder / made.name).symlink_to(made)
        required = self.install.config_settings()  # type: ignore[attr-defined]
        if required:
            config = self.data_dir / "config.json"
            config.write_text(json.dumps({**required, **json.loads(config.read_text())}, indent=2))
        self.port = _free_port()
        env = _server_env(self.install)  # type: ignore[arg-type]
        env["SD_WEBUI_CACHE_DIR"] = str(self.install.cache / "forge-webui-cache")
        # Forge serves its own JavaScript and CSS through gradio 4's file route, which answers 403 outside the
        # allowed paths; Forge allows only the data dir by default, and ours is elsewhere, so the UI would load
        # without its scripts (no hints, no input accordions).
        cmd = [str(self.install.python), "launch.py", *self.install.launch_args,  # type: ignore[attr-defined]
               *self.install.extra_args,  # type: ignore[attr-defined]
               "--port", str(self.port), "--data-dir", str(self.data_dir),
               "--gradio-allowed-path", str(self.install.root), *self.config.extra_args]
        self._log_handle = open(self.log_path, "w")  # closed in stop()
        self.process = subprocess.Popen(cmd, cwd=self.install.root, env=env, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.client = WebUIClient(f"http://127.0.0.1:{self.port}")
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        """The start-up summary line, then the API. Unlike A1111, Forge loads the model on the first generation."""
        assert self.process is not None and self.client is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Forge exited with {self.process.returncode} during start-up:\n{self.log_tail()}")
            if "Startup time:" in self.log_tail(chars=1 << 20):  # no request may come earlier (see harness.py)
                try:
                    if requests.get(self.client.base_url + "/sdapi/v1/sd-models", timeout=5).status_code == 200:
                        return
                except requests.RequestException:
                    pass
            time.sleep(1)
        raise TimeoutError(f"Forge did not answer within {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def _keep_log(self) -> None:
        logs = self.install.cache / "logs"
        try:
            logs.mkdir(parents=True, exist_ok=True)
            label = ("ext" if self.config.extension else "plain") + "".join(self.config.extra_args).replace("--", "-")
            name = f"{self.install.label}-{label}-{self.port}.log"  # type: ignore[attr-defined]
            shutil.copyfile(self.log_path, logs / name)  # one per server: post-mortems
        except OSError:
            pass


class ForgeServerPool(ServerPool):
    """One Forge at a time; asking for another configuration stops the current one."""

    def __init__(self, install: ForgeInstall):
        super().__init__(install)  # type: ignore[arg-type]

    def fixtures(self, models: tuple[str, ...] = ("sd15",)) -> dict[str, ModelFixture]:
        todo = tuple(m for m in models if m not in self._fixtures)
        if todo:
            self._fixtures.update(forge_fixtures(self.install, todo))  # type: ignore[arg-type]
        return {m: self._fixtures[m] for m in models}

    def get(self, config: ServerConfig) -> WebUIServer:
        if self.current is not None:
            if self.current.config == config and self.current.process and self.current.process.poll() is None:
                return self.current
            self.close()
        server = ForgeServer(self.install, config,  # type: ignore[arg-type]
                             self.fixtures(config.models + config.controlnets + config.clip_vision))
        server.__enter__()
        self.current = server
        return server


def open_pool(models: tuple[str, ...]) -> Iterator[ForgeServerPool]:
    """A test module's Forge servers, closed at the end; a skip when DELTA_E2E_FORGE is unset or a fixture is
    missing, a failure naming what is wrong when the install is unusable. The body of each module's ``pool``."""
    yield from serve(ForgeInstall.from_env(), ForgeServerPool, models, "DELTA_E2E_FORGE", "a Forge 2 install")


def serve(install: ForgeInstall | None, pool_class: type[ForgeServerPool], models: tuple[str, ...], variable: str,
          what: str) -> Iterator[ForgeServerPool]:
    """:func:`open_pool` for any Forge: ``variable`` names ``what`` the install must be."""
    if install is None:
        pytest.skip(f"set {variable} to {what} to run these end-to-end tests")
    problems = install.problems()
    if problems:
        pytest.fail(f"{variable} is set but unusable:\n" + "\n".join(problems), pytrace=False)
    try:
        pool = pool_class(install)
        pool.fixtures(models)
    except LookupError as e:
        pytest.skip(str(e))
    try:
        yield pool
    finally:
        pool.close()
