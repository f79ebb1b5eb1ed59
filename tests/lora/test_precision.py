"""Half precision: the functional path is as accurate as merging the LoRA into half-precision weights.

Measured here (CPU, tiny SD1 UNet, rank-8 LoRA on every Linear and Conv, which moves the output by ~48%), relative
L2 error of the adapted rows against the float32 merged model:

    dtype      functional   merged in dtype   functional vs merged
    float16    2.4e-3       2.2e-3            3.2e-3
    bfloat16   2.0e-2       1.8e-2            2.4e-2

The base rows carry the dtype's own noise (1.8e-2 bfloat16, 2.1e-3 float16 against float32) and stay bit-equal to
the plain half-precision model. GPU kernels (tensor cores, fused attention) are measured separately.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lorakit import (
    Change,
    family,
    layer_weight,
    lora_parts,
    merge_reference,
    rel_err,
    run_unet,
    unet_inputs,
    write_file,
)
from torch import nn

from lib_delta.lora import LoraUse, build_patch, read_lora


def _in_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    model = copy.deepcopy(model).to(dtype)
    for m in model.modules():
        if type(m).__name__ == "GroupNorm32":
            m.float()  # ldm's GroupNorm32 normalises in float32; the CPU kernel then wants float32 parameters
    return model


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_merged_accuracy(tmp_path, dtype):
    fam = family("sd1")
    g = torch.Generator().manual_seed(0)
    names = [n for n, m in fam.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    changes = [Change("unet", n, "lora_unet_" + n.replace(".", "_"), lora_parts(g, layer_weight(fam.unet, n), rank=8))
               for n in names]
    path = write_file(tmp_path, "everywhere.safetensors", changes)
    truth_model = merge_reference({"unet": fam.unet}, changes)["unet"]
    inputs = unet_inputs(fam, 2)
    truth = run_unet(truth_model, inputs)

    model = _in_dtype(fam.unet, dtype)
    merged = _in_dtype(truth_model, dtype)
    half_inputs = tuple(None if t is None else t.to(dtype) for t in inputs)
    both = tuple(None if t is None else torch.cat([t, t]) for t in half_inputs)
    patch = build_patch({"unet": model}, "sd1", [[LoraUse(read_lora(path))]])
    plain = run_unet(model, both)
    with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
        dual = run_unet(model, both)

    functional_err = rel_err(dual[2:], truth)
    merged_err = rel_err(run_unet(merged, half_inputs), truth)
    assert torch.equal(dual[:2], plain[:2])
    assert functional_err <= 1.5 * merged_err
    assert functional_err <= (5e-3 if dtype == torch.float16 else 4e-2)


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
def test_under_autocast(tmp_path, weights):
    """As the WebUI samples: float32 activations into half weights (input cast shared with the layer), or float32
    weights autocast to half (the LoRA terms follow the autocast dtype)."""
    fam = family("sd1")
    g = torch.Generator().manual_seed(1)
    names = [n for n, m in fam.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][::3]
    changes = [Change("unet", n, "lora_unet_" + n.replace(".", "_"), lora_parts(g, layer_weight(fam.unet, n)))
               for n in names]
    path = write_file(tmp_path, "some.safetensors", changes)
    truth_model = merge_reference({"unet": fam.unet}, changes)["unet"]
    inputs = unet_inputs(fam, 2)
    truth = run_unet(truth_model, inputs)
    model, merged = _in_dtype(fam.unet, weights), _in_dtype(truth_model, weights)
    both = tuple(None if t is None else torch.cat([t, t]) for t in inputs)
    patch = build_patch({"unet": model}, "sd1", [[LoraUse(read_lora(path))]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = run_unet(model, both)
        with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
            dual = run_unet(model, both)
        merged_out = run_unet(merged, inputs)
    assert torch.equal(dual[:2], plain[:2])
    assert rel_err(dual[2:], truth) <= 1.5 * rel_err(merged_out, truth)
