"""LoRAs on a Flux source: kohya and BFL keys on the fused layers, CLIP-L and T5 parts, and what is refused (the
diffusers layout: test_flux_diffusers_lora.py)."""

from __future__ import annotations

import pytest
import torch
from lorakit import (
    Change,
    family,
    flux_inputs,
    flux_roots,
    layer_weight,
    lokr_parts,
    lora_parts,
    merge_reference,
    rel_err,
    run_flux,
    write_file,
)

from lib_delta.errors import DeltaError
from lib_delta.lora import LoraUse, build_patch, read_lora

# the layers Flux LoRAs train: both streams' fused q/k/v and MLPs, the single blocks' fused linear1 and linear2
DIT_LAYERS = ("double_blocks.0.img_attn.qkv", "double_blocks.1.txt_attn.qkv", "double_blocks.0.img_mlp.0",
              "double_blocks.1.txt_attn.proj", "single_blocks.0.linear1", "single_blocks.1.linear2")


def _changes(unet: torch.nn.Module, key_of, seed: int = 1, make=lora_parts) -> list[Change]:
    g = torch.Generator().manual_seed(seed)
    return [Change("unet", p, key_of(p), make(g, layer_weight(unet, p))) for p in DIT_LAYERS]


@pytest.mark.parametrize("style", ["kohya", "bfl"])
def test_a_flux_lora_on_the_fused_layers_equals_the_merged_model(tmp_path, style):
    roots = flux_roots()
    flux = roots["unet"]
    if style == "kohya":  # lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight (kohya, Forge, OneTrainer)
        changes = _changes(flux, lambda p: "lora_unet_" + p.replace(".", "_"))
    else:  # diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight (BFL's and ComfyUI's own layout)
        changes = _changes(flux, lambda p: "diffusion_model." + p)
        for c in changes:
            c.parts = {{"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"}.get(k, k): v
                       for k, v in c.parts.items()}
    use = LoraUse(read_lora(write_file(tmp_path, f"{style}.safetensors", changes)), 1.0, 0.8)
    patch = build_patch(roots, "flux", [[use]])
    assert patch.reports[0][0].unet_modules == len(DIT_LAYERS) and not patch.reports[0][0].unmatched

    inputs = flux_inputs(2)
    batch = tuple(torch.cat([t, t]) for t in inputs)
    plain = run_flux(flux, batch)
    with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
        dual = run_flux(flux, batch)
    merged = merge_reference({"unet": flux}, changes, unet=0.8)["unet"]
    assert torch.equal(dual[:2], plain[:2])
    assert rel_err(dual[2:], run_flux(merged, inputs)) <= 1e-5
    assert rel_err(dual[2:], plain[2:]) > 1e-2  # the LoRA moves the prediction


def test_lycoris_on_a_fused_layer(tmp_path):
    roots = flux_roots()
    flux = roots["unet"]
    changes = _changes(flux, lambda p: "lora_unet_" + p.replace(".", "_"), make=lokr_parts)
    patch = build_patch(roots, "flux", [[LoraUse(read_lora(write_file(tmp_path, "lokr.safetensors", changes)))]])
    inputs = flux_inputs(1)
    with patch, patch.rows([(slice(0, 1), 0)]):
        adapted = run_flux(flux, inputs)
    assert rel_err(adapted, run_flux(merge_reference({"unet": flux}, changes)["unet"], inputs)) <= 1e-5


@pytest.mark.parametrize("t5_prefix", ["lora_te3_", "lora_te2_"])
def test_clip_l_and_t5_keys_reach_the_flux_text_encoders(tmp_path, t5_prefix):
    """kohya writes CLIP-L as ``lora_te1_`` and T5 as ``lora_te3_``; OneTrainer's Flux files put T5 under
    ``lora_te2_`` (Forge's key map takes both)."""
    roots = flux_roots()
    g = torch.Generator().manual_seed(2)
    clip_q = "text_model.encoder.layers.0.self_attn.q_proj"
    t5_q = "transformer.encoder.block.0.layer.0.SelfAttention.q"
    t5_wi = "transformer.encoder.block.1.layer.1.DenseReluDense.wi_0"
    changes = [Change("te1", clip_q, "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                      lora_parts(g, layer_weight(roots["te1"], clip_q))),
               Change("t5", t5_q, t5_prefix + "encoder_block_0_layer_0_SelfAttention_q",
                      lora_parts(g, layer_weight(roots["t5"], t5_q))),
               Change("t5", t5_wi, t5_prefix + "encoder_block_1_layer_1_DenseReluDense_wi_0",
                      lora_parts(g, layer_weight(roots["t5"], t5_wi))),
               *_changes(roots["unet"], lambda p: "lora_unet_" + p.replace(".", "_"))]
    use = LoraUse(read_lora(write_file(tmp_path, "te.safetensors", changes)), 0.6, 1.0)
    patch = build_patch(roots, "flux", [[use]])
    report = patch.reports[0][0]
    assert (report.te_modules, report.unet_modules, report.unmatched) == (3, len(DIT_LAYERS), ())

    ids = torch.randint(0, 64, (1, 7), generator=g)
    merged = merge_reference(roots, changes, te=0.6, unet=1.0)
    with torch.no_grad():
        plain = roots["t5"](ids)
        with patch, patch.rows([(slice(0, 1), 0)]):
            adapted = roots["t5"](ids)
        assert rel_err(adapted, merged["t5"](ids)) <= 1e-5 and rel_err(adapted, plain) > 1e-3


def test_an_sd_lora_on_a_flux_source_is_refused(tmp_path):
    fam = family("sdxl")
    g = torch.Generator().manual_seed(4)
    path_ = "input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    change = Change("unet", path_, "lora_unet_" + path_.replace(".", "_"), lora_parts(g, layer_weight(fam.unet, path_)))
    with pytest.raises(DeltaError, match=r"but the source model is Flux\. Choose a LoRA trained on Flux"):
        build_patch(flux_roots(), "flux", [[LoraUse(read_lora(write_file(tmp_path, "xl.safetensors", [change])))]])


class _QuantizedParameter(torch.nn.Parameter):
    pass


class Linear(torch.nn.Module):
    """What Forge's NF4 and GGUF operations put in place of a linear layer (backend/operations.py): a class named
    ``Linear`` with no sizes, holding its weight packed in a tensor subclass that no matmul takes as it is."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        packed = torch.zeros(linear.in_features * linear.out_features // 2, 1, dtype=torch.uint8)
        self.weight = _QuantizedParameter(packed, requires_grad=False)
        self.bias = None


def test_a_quantized_flux_source_is_refused_with_the_way_out(tmp_path):
    roots = flux_roots()
    flux = roots["unet"]
    changes = _changes(flux, lambda p: "lora_unet_" + p.replace(".", "_"))
    for block in (*flux.double_blocks, *flux.single_blocks):  # the DiT as an NF4/GGUF file loads it
        for child in list(block.modules()):
            for attr, sub in list(child.named_children()):
                if isinstance(sub, torch.nn.Linear):
                    setattr(child, attr, Linear(sub))
    with pytest.raises(DeltaError) as e:
        build_patch(roots, "flux", [[LoraUse(read_lora(write_file(tmp_path, "q.safetensors", changes)))]])
    assert "hold quantized weights" in str(e.value) and "Choose an unquantized file" in str(e.value)
