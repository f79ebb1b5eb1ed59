"""Checkpoint files judged from their safetensors header alone, through the safetensors library's reader."""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from lib_delta.hosts.common import files


def write(path, extra: bytes = b"", cut: int = 0):
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8),
               "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.randn(4, 6)},
              str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) - cut] + extra)
    return str(path)


def test_a_sound_file_gives_its_keys_shapes_and_family(tmp_path):
    path = write(tmp_path / "sd1.safetensors")
    assert files.safetensors_damage(path) is None
    assert files.safetensors_shapes(path)["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k"
                                          ".weight"] == [4, 6]
    assert files.checkpoint_family(path) == "sd1"


def test_truncated_padded_and_garbage_files_are_damaged_and_unread(tmp_path):
    cases = {"truncated": write(tmp_path / "a.safetensors", cut=7),
             "padded": write(tmp_path / "b.safetensors", extra=b"\0" * 5)}
    garbage = tmp_path / "c.safetensors"
    garbage.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    cases["garbage"] = str(garbage)
    for case, path in cases.items():
        assert files.safetensors_damage(path), case
        assert files.safetensors_keys(path) is None and files.checkpoint_family(path) is None, case
    assert "cannot be opened" in files.safetensors_damage(str(tmp_path / "missing.safetensors"))


def test_other_extensions_are_not_read(tmp_path):
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"not a safetensors file")
    assert files.safetensors_keys(str(path)) is None and files.safetensors_shapes(str(path)) is None
