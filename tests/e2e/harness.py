"""Run a real AUTOMATIC1111 WebUI for the end-to-end tests: fixtures, a throwaway data dir, the server, a client.

Nothing here writes into the WebUI install: every run gets its own `--data-dir` (models and the extension are
linked into it) and the install is only read. Generated fixture models are cached between runs, since building
them takes minutes.

Environment:
    DELTA_E2E_A1111     the AUTOMATIC1111 v1.10.1 install (its repo root); the tests are skipped without it
    DELTA_E2E_PYTHON    the WebUI's python (default: <install>/venv/bin/python)
    DELTA_E2E_CACHE     fixture cache (default: ~/.cache/sd-webui-delta-sampling-e2e)
    DELTA_E2E_HF_HOME   HF_HOME for the server (default: the inherited HF_HOME); it must hold the
                        openai/clip-vit-large-patch14 tokenizer, since the server runs with the Hub offline
    DELTA_E2E_CONTROLNET  a checkout of sd-webui-controlnet (Mikubill, v1.1.455), its Python packages installed in
                        the WebUI's environment: linked into the data dir of servers that ask for it
                        (ServerConfig.controlnet_extension), and the classes the ControlNet fixture is built from;
                        the ControlNet tests are skipped without it
"""

from __future__ import annotations

import ast
import base64
import contextlib
import fcntl
import io
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parent.parent
FIXTURES_SCRIPT = E2E_DIR / "fixtures.py"
EXTENSION_DIR_NAME = "sd-webui-delta-sampling"
EXTENSION_SCRIPT_TITLE = "Delta Sampling"  # scripts/delta_sampling.py's title(); the API lists it lower-cased
ALL_MODELS = ("sd15", "sd21v", "sdxl")
CONTROLNET_DIR_NAME = "sd-webui-controlnet"
# The API key of a ControlNet unit list: sd-webui-controlnet's and Forge's built-in script are both titled
# "ControlNet", and alwayson_scripts takes titles lower-cased.
CONTROLNET_SCRIPT = "controlnet"

# The flags every server gets: CPU only, fp32, API on, loopback only (no --listen), nothing downloaded.
BASE_ARGS = (
    "--skip-prepare-environment", "--skip-install", "--skip-torch-cuda-test", "--use-cpu", "all",
    "--no-half", "--precision", "full", "--api", "--no-download-sd-model", "--disable-console-progressbars",
)
# Settings written to the data dir's config.json. Live previews off: SDXL's tries to download a preview model.
BASE_CONFIG: dict[str, Any] = {"live_previews_enable": False}

# headless Chromium for the browser tests: offline, no first-run work
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


def apply_ui_defaults(page: Any) -> None:
    """Settings → Defaults → Apply, as a user does it: the page's current values become ui-config.json's defaults.
    The tabs are opened first (gradio 4 renders a tab's content only once it is shown), and the result is read
    from the Defaults tab: its review text has no id of its own (ui_loadsave.create_ui)."""
    from playwright.sync_api import expect

    def tab(name: str) -> Any:  # a tab button: a plain button in gradio 3, role "tab" in gradio 4
        return page.get_by_role("button", name=name, exact=True).or_(page.get_by_role("tab", name=name, exact=True))

    tab("Settings").first.click()
    tab("Defaults").first.click()
    page.locator("#ui_defaults_apply").click()
    expect(page.locator("#settings_tab_defaults")).to_contain_text("Wrote", timeout=60_000)


# ---------------------------------------------------------------------------------------------- locating things


@dataclass(frozen=True)
class A1111Install:
    root: Path
    python: Path
    cache: Path
    hf_home: Path | None
    controlnet: Path | None = None  # DELTA_E2E_CONTROLNET: the sd-webui-controlnet checkout

    @classmethod
    def from_env(cls) -> A1111Install | None:
        """The install named by DELTA_E2E_A1111, or None when the variable is unset."""
        root = os.environ.get("DELTA_E2E_A1111")
        if not root:
            return None
        root_path = Path(root).expanduser().resolve()
        python = Path(os.environ.get("DELTA_E2E_PYTHON") or root_path / "venv" / "bin" / "python").expanduser()
        cache = Path(os.environ.get("DELTA_E2E_CACHE") or "~/.cache/sd-webui-delta-sampling-e2e").expanduser()
        hf_home = os.environ.get("DELTA_E2E_HF_HOME") or os.environ.get("HF_HOME")
        return cls(root_path, python, cache, Path(hf_home).expanduser() if hf_home else None, controlnet_from_env())

    def problems(self) -> list[str]:
        """Why this install cannot run the suite (empty when it can)."""
        found = []
        if not (self.root / "launch.py").is_file() or not (self.root / "modules" / "processing.py").is_file():
            found.append(f"{self.root} is not an AUTOMATIC1111 install (no launch.py / modules/processing.py)")
        if not self.python.exists():
            found.append(f"no WebUI python at {self.python} (set DELTA_E2E_PYTHON)")
        if not (self.root / "repositories" / "stable-diffusion-stability-ai").is_dir():
            found.append(f"{self.root}/repositories is not populated (the WebUI's helper repositories are missing)")
        if self.controlnet is not None:
            found.extend(controlnet_problems(self.controlnet))
        return found


def controlnet_from_env() -> Path | None:
    """The sd-webui-controlnet checkout named by DELTA_E2E_CONTROLNET, or None when the variable is unset."""
    path = os.environ.get("DELTA_E2E_CONTROLNET")
    return Path(path).expanduser().resolve() if path else None


def controlnet_problems(path: Path) -> list[str]:
    """Why DELTA_E2E_CONTROLNET cannot be used (empty when it can)."""
    needed = ("scripts/controlnet.py", "scripts/cldm.py", "scripts/controlnet_model_guess.py")
    if not all((path / name).is_file() for name in needed):
        return [f"DELTA_E2E_CONTROLNET={path} is not an sd-webui-controlnet checkout (no {', '.join(needed)})"]
    return []


# ---------------------------------------------------------------------------------------------- fixtures


def _fixtures_constant(name: str) -> Any:
    """A constant of fixtures.py, as written there (read, not imported: that module needs the WebUI's python)."""
    for node in ast.parse(FIXTURES_SCRIPT.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{name} not found in {FIXTURES_SCRIPT}")


def fixture_version() -> int:
    """FIXTURE_VERSION of fixtures.py: the version of every fixture, the name of the cache folder."""
    return int(_fixtures_constant("FIXTURE_VERSION"))


def model_version(key: str) -> int:
    """One fixture's own version (MODEL_VERSIONS of fixtures.py; 0 when it has none): it is rebuilt alone when that
    changes, while a new FIXTURE_VERSION rebuilds them all."""
    return int(_fixtures_constant("MODEL_VERSIONS").get(key, 0))


def controlnet_models() -> tuple[str, ...]:
    """The fixture keys that are ControlNets (CONTROLNET_MODELS of fixtures.py)."""
    return tuple(_fixtures_constant("CONTROLNET_MODELS"))


@dataclass(frozen=True)
class ModelFixture:
    """One generated checkpoint and its LoRA files, or one ControlNet, as described by its manifest.json."""

    key: str
    directory: Path
    manifest: dict[str, Any]

    @property
    def is_controlnet(self) -> bool:
        """A file of the ControlNet models folder: a ControlNet, or an IP-Adapter (sd-webui-controlnet lists both)."""
        return self.manifest.get("kind") in ("controlnet", "ipadapter")

    @property
    def clip_vision(self) -> Path:
        """A CLIP-vision fixture's file (sd-webui-controlnet looks under <annotator models>/clip_vision)."""
        return self.directory / self.manifest["files"]["clip_vision"]

    @property
    def checkpoint(self) -> Path:
        return self.directory / self.manifest["files"]["checkpoint"]

    @property
    def controlnet(self) -> Path:
        """A ControlNet fixture's file (the hosts look for it under models/ControlNet)."""
        return self.directory / self.manifest["files"]["controlnet"]

    @property
    def model_name(self) -> str:
        """The file's stem: the checkpoint's name, or the ControlNet's (which the hosts list as "<stem> [<hash>]")."""
        return (self.controlnet if self.is_controlnet else self.checkpoint).stem

    @property
    def checkpoint_files(self) -> list[Path]:
        return [self.directory / name for name in self.manifest["files"].values()]

    def lora(self, kind: str = "lora") -> str:
        """The network name to use in a prompt, e.g. <lora:NAME:1>."""
        return self.manifest["loras"][kind]

    @property
    def lora_files(self) -> list[Path]:
        return [self.directory / f"{name}.safetensors" for name in self.manifest["loras"].values()]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialise fixture generation between concurrent test runs sharing one cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_fixture(directory: Path, key: str, version: int) -> ModelFixture | None:
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    fixture = ModelFixture(key, directory, manifest)
    if manifest.get("fixture_version") != version or manifest.get("model_version", 0) != model_version(key):
        return None
    if not all(p.is_file() for p in [*fixture.checkpoint_files, *fixture.lora_files]):
        return None
    return fixture


def ensure_fixtures(install: A1111Install, models: tuple[str, ...] = ALL_MODELS,
                    timeout: float = 3600) -> dict[str, ModelFixture]:
    """The fixture models, generated (once per FIXTURE_VERSION and model version, under a lock) into the cache when
    missing. A ControlNet fixture needs DELTA_E2E_CONTROLNET (a LookupError without it)."""
    version = fixture_version()
    base = install.cache / f"fixtures-v{version}"
    found: dict[str, ModelFixture] = {}
    missing = []
    for key in models:
        fixture = _read_fixture(base / key, key, version)
        if fixture is None:
            missing.append(key)
        else:
            found[key] = fixture
    if not missing:
        return found

    with _file_lock(install.cache / "fixtures.lock"):
        for key in missing:
            fixture = _read_fixture(base / key, key, version)  # another run may have built it meanwhile
            if fixture is None:
                extra = []
                if key in controlnet_models():
                    if install.controlnet is None:
                        raise LookupError(f"the {key} fixture is built from sd-webui-controlnet's own classes: set "
                                          "DELTA_E2E_CONTROLNET to its checkout")
                    extra = ["--controlnet", str(install.controlnet)]
                # build beside the cache and move into place, so an interrupted run leaves nothing half-written
                staging = Path(tempfile.mkdtemp(prefix=f".staging-{key}-", dir=install.cache))
                try:
                    subprocess.run(
                        [str(install.python), str(FIXTURES_SCRIPT), "--webui", str(install.root),
                         "--out", str(staging), "--models", key, *extra],
                        check=True, timeout=timeout, env=_server_env(install), cwd=install.root,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        preexec_fn=lambda: os.nice(10),  # minutes of CPU: yield to interactive work
                    )
                except subprocess.CalledProcessError as e:
                    raise RuntimeError(f"fixture generation for {key} failed:\n{e.stdout[-4000:]}") from e
                shutil.rmtree(base / key, ignore_errors=True)
                base.mkdir(parents=True, exist_ok=True)
                (staging / key).rename(base / key)
                shutil.rmtree(staging, ignore_errors=True)
                fixture = _read_fixture(base / key, key, version)
                if fixture is None:
                    raise RuntimeError(f"fixture generation for {key} wrote no usable manifest in {base / key}")
            found[key] = fixture
        # Older versions are GBs each. Keep the previous one: a run started from an older tree may still use it.
        for old in install.cache.glob("fixtures-v*"):
            suffix = old.name.removeprefix("fixtures-v")
            if old.is_dir() and suffix.isdigit() and int(suffix) < version - 1:
                shutil.rmtree(old, ignore_errors=True)
    return {key: found[key] for key in models}


# ---------------------------------------------------------------------------------------------- images


def decode_image(png: bytes):
    """An API image (PNG bytes) as an HxWx3 float64 array."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float64)


def same_pixels(a: bytes, b: bytes) -> bool:
    """Whether two API images have exactly the same pixels. The PNG bytes also hold the infotext (the WebUI writes
    it into a text chunk), so images made with different settings that draw the same pixels differ as files."""
    x, y = decode_image(a), decode_image(b)
    return x.shape == y.shape and bool((x == y).all())


def control_image(size: int = 64, border: int = 16) -> bytes:
    """The ControlNet tests' control image (PNG bytes): a white square on black, `border` pixels from each edge.
    Preprocessor "none" hands it to the ControlNet as it is; canny finds the square's four edges."""
    import numpy as np
    from PIL import Image

    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[border:size - border, border:size - border] = 255
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def controlnet_units(*units: dict[str, Any]) -> dict[str, Any]:
    """Request fields that run the host's own ControlNet with these units (sd-webui-controlnet's unit keys, which
    Forge's built-in ControlNet reads too: enabled, model, image, module, weight, guidance_start, guidance_end,
    resize_mode, processor_res, threshold_a, threshold_b, control_mode, pixel_perfect, ...)."""
    return {"alwayson_scripts": {CONTROLNET_SCRIPT: {"args": list(units)}}}


def psnr(a: bytes, b: bytes) -> float:
    """PSNR in dB between two 8-bit images; inf when identical."""
    x, y = decode_image(a), decode_image(b)
    if x.shape != y.shape:
        raise ValueError(f"image shapes differ: {x.shape} vs {y.shape}")
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---------------------------------------------------------------------------------------------- client


@dataclass
class Generation:
    images: list[bytes]
    info: dict[str, Any]
    seconds: float

    @property
    def image(self) -> bytes:
        return self.images[0]

    @property
    def infotext(self) -> str:
        return self.info["infotexts"][0]

    def params(self) -> dict[str, str]:
        """The infotext's last line as a dict, parsed the way the WebUI parses it (quoted values unquoted)."""
        out = {}
        for key, value in _RE_PARAM.findall(self.infotext.splitlines()[-1]):
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = json.loads(value)
            out[key] = value
        return out

    def param(self, key: str) -> str | None:
        """One infotext value, e.g. param("Model")."""
        return self.params().get(key)


# modules/infotext_utils.py's re_param
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


# the client's defaults: a small, fast generation (64x64, 4 Euler steps, seed 1); a test posting its own request
# (one that must fail, say) starts from these
SMALL_REQUEST: dict[str, Any] = {"negative_prompt": "", "seed": 1, "steps": 4, "width": 64, "height": 64,
                                 "cfg_scale": 7.0, "sampler_name": "Euler", "batch_size": 1, "n_iter": 1}


@dataclass
class WebUIClient:
    base_url: str
    timeout: float = 1800
    session: requests.Session = field(default_factory=requests.Session)

    def get(self, path: str, **kw: Any) -> Any:
        r = self.session.get(self.base_url + path, timeout=kw.pop("timeout", self.timeout), **kw)
        _raise_for_status(r)
        return r.json()

    def post(self, path: str, payload: dict[str, Any] | None = None, **kw: Any) -> Any:
        r = self.session.post(self.base_url + path, json=payload, timeout=kw.pop("timeout", self.timeout), **kw)
        _raise_for_status(r)
        return r.json() if r.content else None

    def options(self) -> dict[str, Any]:
        return self.get("/sdapi/v1/options")

    def set_options(self, **options: Any) -> None:
        self.post("/sdapi/v1/options", options)

    def set_model(self, model_name: str) -> None:
        """Make a checkpoint active. The WebUI ignores files added after start until refresh-checkpoints, and an
        unknown name leaves the old model active, so this checks the result."""
        self.post("/sdapi/v1/refresh-checkpoints")
        names = {m["model_name"]: m["title"] for m in self.get("/sdapi/v1/sd-models")}
        if model_name not in names:
            raise LookupError(f"the WebUI does not list checkpoint {model_name!r}; it has {sorted(names)}")
        self.set_options(sd_model_checkpoint=names[model_name])
        active = self.options()["sd_model_checkpoint"]
        if not active.startswith(model_name):
            raise RuntimeError(f"asked for checkpoint {model_name!r}, the WebUI reports {active!r}")

    def txt2img(self, prompt: str, **params: Any) -> Generation:
        """A small, fast txt2img by default: 64x64, 4 Euler steps, seed 1."""
        payload = {"prompt": prompt, **SMALL_REQUEST, **params}
        started = time.monotonic()
        data = self.post("/sdapi/v1/txt2img", payload)
        return Generation([base64.b64decode(i) for i in data["images"]], json.loads(data["info"]),
                          time.monotonic() - started)


    def img2img(self, prompt: str, init_image: bytes, **params: Any) -> Generation:
        """img2img from PNG bytes, with the same small defaults as txt2img and denoising strength 0.75."""
        payload = {"prompt": prompt, **SMALL_REQUEST, "denoising_strength": 0.75,
                   "init_images": [base64.b64encode(init_image).decode()], **params}
        started = time.monotonic()
        data = self.post("/sdapi/v1/img2img", payload)
        return Generation([base64.b64decode(i) for i in data["images"]], json.loads(data["info"]),
                          time.monotonic() - started)


def tensors_over_pairs(client: WebUIClient, ds: dict[str, Any], plain: dict[str, Any], pairs: int) -> list[dict]:
    """The live tensors the fault extension counts (``/delta-e2e/tensors``) after each request of `pairs` DS/plain
    pairs, once a warm-up pair has cached the source: what a generation leaves behind shows as a change."""
    client.txt2img(**plain)
    client.txt2img(**ds)
    client.txt2img(**plain)
    readings = [{"after": "warm-up", **client.get("/delta-e2e/tensors")}]
    for i in range(pairs):
        for name, params in (("DS", ds), ("plain", plain)):
            client.txt2img(**params)
            readings.append({"after": f"{name} {i + 1}", **client.get("/delta-e2e/tensors")})
    return readings


def readings_that_changed(readings: list[dict]) -> list[dict]:
    """The readings of tensors_over_pairs whose counts differ from the first's."""
    def counts(reading: dict) -> dict:
        return {k: v for k, v in reading.items() if k != "after"}
    return [r for r in readings[1:] if counts(r) != counts(readings[0])]


def _raise_for_status(r: requests.Response) -> None:
    if r.status_code >= 400:
        raise requests.HTTPError(f"{r.request.method} {r.url} -> {r.status_code}: {r.text[:2000]}", response=r)


# ---------------------------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(install: A1111Install) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", PYTHONDONTWRITEBYTECODE="1")  # no __pycache__ in the linked working tree
    if install.hf_home is not None:
        env["HF_HOME"] = str(install.hf_home)
    for var in ("COMMANDLINE_ARGS", "PYTHONPATH", "VIRTUAL_ENV"):  # the test env's settings are not the WebUI's
        env.pop(var, None)
    return env


FAULT_EXTENSION = E2E_DIR / "fault_extension"  # test-only: injects faults on request (see its script)


@dataclass(frozen=True)
class ServerConfig:
    extension: bool = True
    models: tuple[str, ...] = ALL_MODELS
    extra_args: tuple[str, ...] = ()
    settings: tuple[tuple[str, Any], ...] = ()
    # (name, fixture key): the fixture's checkpoint listed once more under another name, a second model to switch to
    twins: tuple[tuple[str, str], ...] = ()
    faults: bool = False  # link the fault-injection extension too
    # AUTOMATIC1111: link sd-webui-controlnet (DELTA_E2E_CONTROLNET) in as an extension. Forge has its ControlNet
    # built in and needs nothing linked.
    controlnet_extension: bool = False
    # ControlNet fixture keys, linked into models/ControlNet of the data dir, where both sd-webui-controlnet and
    # Forge's built-in ControlNet look by default
    controlnets: tuple[str, ...] = ()
    # ui-config.json entries (the WebUI's saved UI defaults, "<tab>/<label>/value" keys), written before start
    ui_config: tuple[tuple[str, Any], ...] = ()
    # CLIP-vision fixture keys, linked into the annotator folder's clip_vision/ (sd-webui-controlnet, A1111)
    clip_vision: tuple[str, ...] = ()
    # (file, models folder): files linked into <data dir>/models/<folder>, e.g. the text encoders and VAE that
    # Forge lists in 'VAE / Text Encoder' (models/text_encoder, models/VAE)
    modules: tuple[tuple[str, str], ...] = ()


class WebUIServer:
    """A running WebUI on 127.0.0.1 with its own data dir; use as a context manager (stops on every exit)."""

    def __init__(self, install: A1111Install, config: ServerConfig, fixtures: dict[str, ModelFixture],
                 startup_timeout: float = 600):
        self.install = install
        self.config = config
        self.fixtures = fixtures
        self.startup_timeout = startup_timeout
        self.data_dir: Path | None = None
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.client: WebUIClient | None = None
        self.extension_link: Path | None = None
        self.controlnet_link: Path | None = None
        self._log_handle: io.TextIOBase | None = None

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "webui.log"

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def __enter__(self) -> WebUIServer:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _prepare_data_dir(self) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="delta-e2e-a1111-"))
        ckpt_dir = self.data_dir / "models" / "Stable-diffusion"
        lora_dir = self.data_dir / "models" / "Lora"
        ext_dir = self.data_dir / "extensions"
        for d in (ckpt_dir, lora_dir, ext_dir):
            d.mkdir(parents=True)
        for key in self.config.models:
            fixture = self.fixtures[key]
            for f in fixture.checkpoint_files:  # the yaml must sit beside the checkpoint, under the same stem
                (ckpt_dir / f.name).symlink_to(f)
            for f in fixture.lora_files:
                (lora_dir / f.name).symlink_to(f)
        for name, key in self.config.twins:
            checkpoint = self.fixtures[key].checkpoint
            (ckpt_dir / f"{name}{checkpoint.suffix}").symlink_to(checkpoint)
            if checkpoint.with_suffix(".yaml").is_file():
                (ckpt_dir / f"{name}.yaml").symlink_to(checkpoint.with_suffix(".yaml"))
        for file, folder in self.config.modules:
            (self.data_dir / "models" / folder).mkdir(parents=True, exist_ok=True)
            (self.data_dir / "models" / folder / Path(file).name).symlink_to(file)
        if self.config.faults:
            (ext_dir / FAULT_EXTENSION.name).symlink_to(FAULT_EXTENSION, target_is_directory=True)
        if self.config.extension:
            self.extension_link = ext_dir / EXTENSION_DIR_NAME
            self.extension_link.symlink_to(REPO_ROOT, target_is_directory=True)
        settings = dict(BASE_CONFIG)
        if self.config.controlnets:
            cn_dir = self.data_dir / "models" / "ControlNet"
            cn_dir.mkdir(parents=True)
            for key in self.config.controlnets:
                fixture = self.fixtures[key]
                (cn_dir / fixture.controlnet.name).symlink_to(fixture.controlnet)
        if self.config.controlnet_extension:
            checkout = getattr(self.install, "controlnet", None)
            if checkout is None:
                raise LookupError("ServerConfig.controlnet_extension needs DELTA_E2E_CONTROLNET (an "
                                  "sd-webui-controlnet checkout)")
            self.controlnet_link = ext_dir / CONTROLNET_DIR_NAME
            self.controlnet_link.symlink_to(checkout, target_is_directory=True)
            # Its annotator folder (created at start, where preprocessors that need a model download it) defaults to
            # the checkout's annotator/downloads: keep it in the data dir.
            settings["control_net_modules_path"] = str(self.data_dir / "models" / "ControlNetAnnotator")
            if self.config.clip_vision:
                clip_dir = self.data_dir / "models" / "ControlNetAnnotator" / "clip_vision"
                clip_dir.mkdir(parents=True)
                for key in self.config.clip_vision:
                    (clip_dir / self.fixtures[key].clip_vision.name).symlink_to(self.fixtures[key].clip_vision)
        if self.config.models:  # load a model we have at start instead of searching for the default one
            settings["sd_model_checkpoint"] = self.fixtures[self.config.models[0]].checkpoint.name
        settings.update(self.config.settings)
        (self.data_dir / "config.json").write_text(json.dumps(settings, indent=2))
        if self.config.ui_config:
            (self.data_dir / "ui-config.json").write_text(json.dumps(dict(self.config.ui_config), indent=2,
                                                                     ensure_ascii=False), encoding="utf-8")

    def start(self) -> None:
        self._prepare_data_dir()
        assert self.data_dir is not None
        self.port = _free_port()
        env = _server_env(self.install)
        # Checkpoint hashes are cached outside the throwaway data dir: hashing GBs of fixtures each start is slow.
        env["SD_WEBUI_CACHE_DIR"] = str(self.install.cache / "webui-cache")
        cmd = [str(self.install.python), "launch.py", *BASE_ARGS, "--port", str(self.port),
               "--data-dir", str(self.data_dir), *self.config.extra_args]
        self._log_handle = open(self.log_path, "w")  # closed in stop()
        self.process = subprocess.Popen(cmd, cwd=self.install.root, env=env, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.client = WebUIClient(f"http://127.0.0.1:{self.port}")
        self._wait_until_up()

    def _wait_until_up(self) -> None:
        """Wait for the start-up summary line, then for the API, then for the start-up model load.

        No request may reach the port before the summary line: gradio serves the app before the WebUI adds the
        API's middleware, and a request in that window makes starlette build its middleware stack, after which
        the WebUI's start-up dies with "Cannot add middleware after an application has started".
        The model the WebUI loads at start (in a thread) must be in place before a test switches checkpoints:
        two loads at once share the WebUI's patched load_state_dict and fail with "Cannot copy out of meta tensor".
        """
        assert self.process is not None and self.client is not None
        deadline = time.monotonic() + self.startup_timeout
        started = api_up = False
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the WebUI exited with {self.process.returncode} during start-up:\n"
                                   f"{self.log_tail()}")
            log = self.log_tail(chars=1 << 20)
            started = started or "Startup time:" in log
            if started and not api_up:
                try:
                    api_up = requests.get(self.client.base_url + "/sdapi/v1/sd-models", timeout=5).status_code == 200
                except requests.RequestException:
                    pass
            if api_up and (not self.config.models or "Model loaded in" in log or "failed to load" in log):
                return
            time.sleep(1)
        raise TimeoutError(f"the WebUI did not answer within {self.startup_timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the server (its whole process group), unlink the extension, delete the data dir. Idempotent."""
        if self.process is not None:
            if self.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=30)
            self.process = None
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None
            self._keep_log()
        if self.extension_link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.extension_link.unlink()  # the link, never the working tree behind it
            self.extension_link = None
        if self.controlnet_link is not None:
            with contextlib.suppress(FileNotFoundError):
                self.controlnet_link.unlink()  # the link, never the checkout behind it
            self.controlnet_link = None
        if self.data_dir is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
            self.data_dir = None
        if self.client is not None:
            self.client.session.close()
            self.client = None

    def _keep_log(self) -> None:
        """Copy the server log to <cache>/logs/ (the data dir is about to go) for post-mortems."""
        logs = self.install.cache / "logs"
        with contextlib.suppress(OSError):
            logs.mkdir(parents=True, exist_ok=True)
            label = "ext" if self.config.extension else "plain"
            shutil.copyfile(self.log_path, logs / f"a1111-{label}-last.log")


class ServerPool:
    """At most one WebUI at a time (each holds GBs of RAM): asking for another configuration stops the current."""

    def __init__(self, install: A1111Install):
        self.install = install
        self.current: WebUIServer | None = None
        self._fixtures: dict[str, ModelFixture] = {}

    def fixtures(self, models: tuple[str, ...] = ALL_MODELS) -> dict[str, ModelFixture]:
        todo = tuple(m for m in models if m not in self._fixtures)
        if todo:
            self._fixtures.update(ensure_fixtures(self.install, todo))
        return {m: self._fixtures[m] for m in models}

    def get(self, config: ServerConfig) -> WebUIServer:
        if self.current is not None:
            if self.current.config == config and self.current.process and self.current.process.poll() is None:
                return self.current
            self.close()
        server = WebUIServer(self.install, config,
                             self.fixtures(config.models + config.controlnets + config.clip_vision))
        server.__enter__()
        self.current = server
        return server

    def close(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None
