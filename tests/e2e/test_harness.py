"""The harness itself: the extension (and sd-webui-controlnet, and the ControlNet fixture) is linked into a throwaway
data dir (or not), and all of it goes on stop."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from harness import (
    CONTROLNET_DIR_NAME,
    EXTENSION_SCRIPT_TITLE,
    REPO_ROOT,
    A1111Install,
    ModelFixture,
    ServerConfig,
    ServerPool,
    WebUIServer,
)


def _txt2img_scripts(server) -> list[str]:
    return server.client.get("/sdapi/v1/scripts")["txt2img"]


def test_plain_server_has_no_extension(server_pool: ServerPool) -> None:
    server = server_pool.get(ServerConfig(extension=False))
    assert server.extension_link is None
    assert EXTENSION_SCRIPT_TITLE.lower() not in _txt2img_scripts(server)


def test_extension_is_linked_then_cleaned_up(server_pool: ServerPool) -> None:
    server = server_pool.get(ServerConfig(extension=True))
    assert server.client is not None and server.extension_link is not None and server.data_dir is not None
    assert server.extension_link.resolve() == REPO_ROOT
    assert EXTENSION_SCRIPT_TITLE.lower() in _txt2img_scripts(server)  # the WebUI loaded the working tree's script
    link, data_dir = server.extension_link, server.data_dir

    server_pool.close()
    assert not link.is_symlink() and not data_dir.exists()
    assert (REPO_ROOT / "tests" / "e2e" / "harness.py").is_file()  # the working tree behind the link is untouched


def _fake_fixture(directory: Path, key: str, files: dict[str, str]) -> ModelFixture:
    directory.mkdir(parents=True)
    for name in files.values():
        (directory / name).write_bytes(b"")
    kind = {"kind": "controlnet"} if "controlnet" in files else {}
    return ModelFixture(key, directory, {"files": files, "loras": {}, **kind})


def test_controlnet_links_stay_in_the_data_dir(tmp_path: Path) -> None:
    """No server: sd-webui-controlnet and the ControlNet fixture are linked into the throwaway data dir (the checkout
    and the cache are only pointed at), and stop() removes the links and the dir, leaving both untouched."""
    checkout = tmp_path / "sd-webui-controlnet"
    (checkout / "scripts").mkdir(parents=True)
    (checkout / "scripts" / "cldm.py").write_text("# stand-in\n")
    install = A1111Install(tmp_path, tmp_path / "python", tmp_path / "cache", None, checkout)
    fixtures = {"sd15": _fake_fixture(tmp_path / "sd15", "sd15", {"checkpoint": "delta_e2e_sd15.safetensors"}),
                "cn_sd15": _fake_fixture(tmp_path / "cn", "cn_sd15", {"controlnet": "delta_e2e_cn_sd15.safetensors"})}
    config = ServerConfig(extension=False, models=("sd15",), controlnet_extension=True, controlnets=("cn_sd15",))
    server = WebUIServer(install, config, fixtures)
    server._prepare_data_dir()
    data_dir = server.data_dir
    assert data_dir is not None and fixtures["cn_sd15"].model_name == "delta_e2e_cn_sd15"
    link = data_dir / "extensions" / CONTROLNET_DIR_NAME
    assert link.is_symlink() and link.resolve() == checkout
    model = data_dir / "models" / "ControlNet" / "delta_e2e_cn_sd15.safetensors"
    assert model.is_symlink() and model.resolve() == fixtures["cn_sd15"].controlnet
    assert not (data_dir / "models" / "Stable-diffusion" / model.name).exists()  # not offered as a checkpoint
    settings = json.loads((data_dir / "config.json").read_text())
    assert settings["control_net_modules_path"].startswith(str(data_dir))  # its annotator folder, not the checkout's

    server.stop()
    assert not data_dir.exists()
    assert (checkout / "scripts" / "cldm.py").read_text() == "# stand-in\n"
    assert fixtures["cn_sd15"].controlnet.is_file()


def test_controlnet_extension_needs_a_checkout(tmp_path: Path) -> None:
    install = A1111Install(tmp_path, tmp_path / "python", tmp_path / "cache", None, None)
    server = WebUIServer(install, ServerConfig(extension=False, models=(), controlnet_extension=True), {})
    with pytest.raises(LookupError, match="DELTA_E2E_CONTROLNET"):
        server._prepare_data_dir()
    server.stop()
