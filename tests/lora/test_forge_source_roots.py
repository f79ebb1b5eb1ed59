"""Which parts of a Forge source engine a LoRA reaches: the diffusion model and the text encoders per family."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lorakit import Change, family, layer_weight, lora_parts, write_file

from devkit.flux import Flux, IntegratedT5
from lib_delta.errors import DeltaError
from lib_delta.hosts.forge import source
from lib_delta.lora import LoraUse, build_patch, read_lora


def _entry(family_name: str, diffusion_model: torch.nn.Module, **encoders: torch.nn.Module) -> SimpleNamespace:
    """What ``_roots`` reads of a pooled engine: Forge's ``forge_objects.clip.cond_stage_model`` (a JointTextEncoder
    whose attributes are the encoders) and the KModel's diffusion model."""
    clip = SimpleNamespace(cond_stage_model=SimpleNamespace(**encoders))
    return SimpleNamespace(family=family_name, title=f"{family_name}_source",
                           engine=SimpleNamespace(forge_objects=SimpleNamespace(clip=clip)),
                           unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=diffusion_model)))


def test_a_flux_source_hands_its_dit_clip_l_and_t5_to_the_lora(tmp_path):
    torch.manual_seed(0)
    dit, clip_l, t5 = Flux().eval(), family("sd1").text_encoders[0], IntegratedT5().eval()
    roots = source._roots(_entry("flux", dit, clip_l=clip_l, t5xxl=t5))
    assert roots == {"unet": dit, "te1": clip_l, "t5": t5}

    g = torch.Generator().manual_seed(1)
    layers = [("unet", dit, "double_blocks.0.img_attn.qkv", "lora_unet_double_blocks_0_img_attn_qkv"),
              ("te1", clip_l, "text_model.encoder.layers.0.self_attn.q_proj",
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
              ("t5", t5, "transformer.encoder.block.0.layer.0.SelfAttention.q",
               "lora_te3_encoder_block_0_layer_0_SelfAttention_q")]
    changes = [Change(part, path, key, lora_parts(g, layer_weight(root, path))) for part, root, path, key in layers]
    patch = build_patch(roots, "flux", [[LoraUse(read_lora(write_file(tmp_path, "flux.safetensors", changes)))]])
    report = patch.reports[0][0]
    assert (report.unet_modules, report.te_modules, report.unmatched) == (1, 2, ())


@pytest.mark.parametrize("family_name,label", [("sd3", "SD3"), ("chroma", "Chroma")])
def test_loras_on_other_families_are_refused_with_the_ones_that_work(family_name, label):
    with pytest.raises(DeltaError) as e:
        source._roots(_entry(family_name, torch.nn.Linear(2, 2)))
    assert f"LoRAs on a {label} source are not supported yet" in str(e.value)
    assert "SD1.x, SD2.x, SDXL or Flux source" in str(e.value)
