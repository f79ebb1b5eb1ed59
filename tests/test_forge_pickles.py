"""Pickled files in Forge: never unpickled outside a restricted loader.

Forge loads a checkpoint through ``load_torch_file``, which unpickles ``.ckpt``/``.pt`` files with the plain
unpickler, and its ``safe_load=True`` asks ``torch.load`` for ``weights_only``, which Forge's own wrapper of
``torch.load`` hides (modules_forge/patch_basic.py:27-56, 92; backend/utils.py:33-40): "loading unsafely". The
stand-in does the same; the first test proves it, or the others would prove nothing. Each payload makes a directory
when unpickled.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.fake_forge import backend, harness, webui
from tests.fake_forge.harness import ADAPTED, Loads, failure, lora_tensors

pytestmark = pytest.mark.usefixtures("one_thread")
forge = harness.forge  # the fixture


class Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def plant(path: Path, marker: Path, how: str) -> Path:
    """A file whose unpickling runs the payload: a bare pickle, or one made by ``torch.save``."""
    if how == "pickle":
        path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    else:
        torch.save({"state_dict": Payload(marker)}, path)
    return path


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_the_stand_in_unpickles_as_unsafely_as_forge(forge, tmp_path, how):
    for i, call in enumerate([lambda path: backend.load_torch_file(path, safe_load=True), backend.forge_loader]):
        marker = tmp_path / f"ran-{i}"
        path = plant(tmp_path / f"evil-{i}.ckpt", marker, how)
        try:
            call(str(path))
        except Exception:
            pass
        assert marker.exists(), "the stand-in must be as unsafe as Forge for these tests to mean anything"


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickled_source_checkpoint_is_refused_without_being_unpickled(forge, tmp_path, monkeypatch, how):
    marker = tmp_path / "payload-ran"
    path = plant(tmp_path / "evil.ckpt", marker, how)
    webui.add_checkpoint(str(path))
    target = forge.load(forge.checkpoint("base", family="sd1", seed=0))
    fresh = forge.generate(target)
    loads = Loads(monkeypatch)
    status, message, _ = failure(lambda: forge.run(target, "evil", {"adapted_prompt": ADAPTED}))
    assert not marker.exists() and path.exists()
    assert status == 422
    assert "evil.ckpt" in message and "convert it to .safetensors" in message
    assert loads.engines == []
    assert torch.equal(forge.generate(target), fresh)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickled_lora_payload_never_runs(forge, tmp_path, how):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    marker = tmp_path / "payload-ran"
    path = plant(Path(webui.lora_dir) / "evil.pt", marker, how)
    webui.list_available_networks()
    fresh = forge.generate(target)
    status, message, _ = failure(lambda: forge.run(target, base, {"loras": "<lora:evil:1>"}))
    assert not marker.exists() and path.exists()
    assert status == 422
    assert "evil.pt" in message and "convert it to .safetensors" in message
    assert torch.equal(forge.generate(target), fresh)


def test_a_plain_pickled_lora_loads_with_the_original_restricted_torch_load(forge):
    base = forge.checkpoint("base", family="sd1", seed=0)
    target = forge.load(base)
    tensors = lora_tensors(target)
    save_file(tensors, str(Path(webui.lora_dir) / "style.safetensors"))
    torch.save(tensors, Path(webui.lora_dir) / "style_pickled.pt")
    webui.list_available_networks()
    want = forge.run(target, base, {"loras": "<lora:style:1>"})
    backend.wrapped_calls.clear()
    got = forge.run(target, base, {"loras": "<lora:style_pickled:1>"})
    assert torch.equal(got, want)
    assert not any(call.endswith(".pt") for call in backend.wrapped_calls), "Forge's torch.load wrapper was used"
