"""Files that cannot be used are refused with a message naming the file, the problem and the way out, and leave
the source model untouched."""

from __future__ import annotations

import pytest
import torch
from lorakit import Change, family, layer_weight, lora_parts, roots, run_unet, unet_inputs, write_file

from lib_delta.errors import DeltaError
from lib_delta.lora import LoraFile, LoraUse, build_patch, read_lora

LAYER = "input_blocks.4.1.transformer_blocks.0.attn1.to_q"


def _good(tmp_path, fam, name="good.safetensors"):
    g = torch.Generator().manual_seed(0)
    change = Change("unet", LAYER, "lora_unet_" + LAYER.replace(".", "_"), lora_parts(g, layer_weight(fam.unet, LAYER)))
    return write_file(tmp_path, name, [change])


def _snapshot(fam):
    return ({k: v.clone() for k, v in fam.unet.state_dict().items()},
            [sorted(m.__dict__) for m in fam.unet.modules()])


def _assert_untouched(fam, snapshot, inputs, plain):
    state, attrs = snapshot
    assert all(torch.equal(v, state[k]) for k, v in fam.unet.state_dict().items())
    assert [sorted(m.__dict__) for m in fam.unet.modules()] == attrs
    assert torch.equal(run_unet(fam.unet, inputs), plain)


def _refused(fam, good_path, bad: LoraFile, family_name="sd1") -> str:
    """Build a group of a good file then the bad one; the model must come out untouched."""
    snapshot = _snapshot(fam)
    inputs = unet_inputs(fam, 2)
    plain = run_unet(fam.unet, inputs)
    with pytest.raises(DeltaError) as info:
        build_patch(roots(fam), family_name, [[LoraUse(read_lora(good_path)), LoraUse(bad)]])
    _assert_untouched(fam, snapshot, inputs, plain)
    assert bad.name in str(info.value)
    return str(info.value)


def test_no_matching_key(tmp_path):
    fam = family("sd1")
    bad = LoraFile.from_tensors("nothing.safetensors", {
        "lora_unet_no_such_block.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_no_such_block.lora_down.weight": torch.zeros(2, 4),
        "random_tensor": torch.zeros(3),
    })
    msg = _refused(fam, _good(tmp_path, fam), bad)
    assert "None of the 3 keys" in msg and "SD1.x" in msg


def test_glora_only_file_says_so(tmp_path):
    fam = family("sd1")
    w = layer_weight(fam.unet, LAYER)
    stem = "lora_unet_" + LAYER.replace(".", "_")
    bad = LoraFile.from_tensors("glora.safetensors", {
        f"{stem}.a1.weight": torch.zeros(4, w.shape[1]), f"{stem}.a2.weight": torch.zeros(w.shape[1], 4),
        f"{stem}.b1.weight": torch.zeros(4, w.shape[1]), f"{stem}.b2.weight": torch.zeros(w.shape[0], 4),
    })
    assert "GLoRA modules are not supported" in _refused(fam, _good(tmp_path, fam), bad)


def test_sdxl_file_on_sd1_source(tmp_path):
    fam = family("sd1")
    xl = family("sdxl")
    g = torch.Generator().manual_seed(1)
    te2 = "transformer.resblocks.0.mlp.c_fc"
    changes = [
        Change("unet", LAYER, "lora_unet_" + LAYER.replace(".", "_"), lora_parts(g, layer_weight(xl.unet, LAYER))),
        Change("te2", te2, "lora_te2_text_model_encoder_layers_0_mlp_fc1",
               lora_parts(g, layer_weight(xl.text_encoders[1], te2))),
    ]
    bad = read_lora(write_file(tmp_path, "xl_style.safetensors", changes))
    msg = _refused(fam, _good(tmp_path, fam), bad)
    assert "looks made for SDXL" in msg and "source model is SD1.x" in msg


def test_sd1_file_on_sdxl_source(tmp_path):
    xl = family("sdxl")
    sd1 = family("sd1")
    g = torch.Generator().manual_seed(2)
    layer = "input_blocks.1.1.transformer_blocks.0.attn1.to_k"  # attention on the first level: SD1/SD2 only
    changes = [Change("unet", layer, "lora_unet_" + layer.replace(".", "_"),
                      lora_parts(g, layer_weight(sd1.unet, layer)))]
    bad = read_lora(write_file(tmp_path, "sd1_style.safetensors", changes))
    msg = _refused(xl, _good(tmp_path, xl), bad, "sdxl")
    assert "SD1.x or SD2.x" in msg and "source model is SDXL" in msg


def test_flux_file(tmp_path):
    fam = family("sd1")
    bad = LoraFile.from_tensors("flux_style.safetensors", {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(8, 2),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(2, 8),
    })
    assert "looks made for Flux" in _refused(fam, _good(tmp_path, fam), bad)


def test_shape_mismatch(tmp_path):
    fam = family("sd1")
    w = layer_weight(fam.unet, LAYER)
    stem = "lora_unet_" + LAYER.replace(".", "_")
    bad = LoraFile.from_tensors("wide.safetensors", {
        f"{stem}.lora_up.weight": torch.zeros(w.shape[0], 4),
        f"{stem}.lora_down.weight": torch.zeros(4, w.shape[1] * 2),
    })
    msg = _refused(fam, _good(tmp_path, fam), bad)
    assert "does not fit the SD1.x source model" in msg and stem in msg and f"{tuple(w.shape)}" in msg


def test_corrupt_and_truncated_files(tmp_path):
    fam = family("sd1")
    good = _good(tmp_path, fam)
    data = open(good, "rb").read()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all")
    for path in (truncated, garbage):
        with pytest.raises(DeltaError, match=rf"{path.name} is not a readable \.safetensors file.*download it again"):
            read_lora(path)
    with pytest.raises(DeltaError, match=r"missing\.safetensors was not found"):
        read_lora(tmp_path / "missing.safetensors")


def test_pickled_file_needs_the_hosts_safe_loader(tmp_path):
    fam = family("sd1")
    tensors = read_lora(_good(tmp_path, fam)).tensors
    pt = tmp_path / "old.pt"
    torch.save(tensors, pt)
    with pytest.raises(DeltaError, match=r"old.pt is a pickled PyTorch file.*Convert it to \.safetensors"):
        read_lora(pt)
    lora = read_lora(pt, safe_load=lambda p: torch.load(p, map_location="cpu", weights_only=True))
    assert lora.tensors.keys() == tensors.keys()

    def broken(path):
        raise RuntimeError("unpickling refused")

    with pytest.raises(DeltaError, match=r"old\.pt could not be read.*unpickling refused"):
        read_lora(pt, safe_load=broken)
