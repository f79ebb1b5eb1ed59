"""Key layouts of SD1, SD2 and SDXL files (kohya and diffusers/peft) land on the right layers, through wrappers."""

from __future__ import annotations

import torch
from lorakit import (
    Change,
    family,
    layer_weight,
    lora_parts,
    merge_reference,
    norm_parts,
    rel_err,
    run_unet,
    unet_inputs,
    write_file,
)
from torch import nn

from lib_delta.lora import LoraUse, build_patch, read_lora
from lib_delta.lora.keys import parse_key, unet_candidates

# ldm path of the tiny SD1 UNet ↔ diffusers path (the layout of kohya's SD1/SD2 files)
SD1_DIFFUSERS = [
    ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"),
    ("input_blocks.2.1.proj_in", "down_blocks.0.attentions.1.proj_in"),
    ("input_blocks.1.0.in_layers.2", "down_blocks.0.resnets.0.conv1"),
    ("input_blocks.4.0.skip_connection", "down_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.4.0.emb_layers.1", "down_blocks.1.resnets.0.time_emb_proj"),
    ("input_blocks.5.0.out_layers.3", "down_blocks.1.resnets.1.conv2"),
    ("input_blocks.3.0.op", "down_blocks.0.downsamplers.0.conv"),
    ("middle_block.1.transformer_blocks.0.attn2.to_k", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"),
    ("middle_block.2.in_layers.2", "mid_block.resnets.1.conv1"),
    ("output_blocks.2.2.conv", "up_blocks.0.upsamplers.0.conv"),
    ("output_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
     "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.0.proj"),
    ("output_blocks.3.0.skip_connection", "up_blocks.1.resnets.0.conv_shortcut"),
    ("input_blocks.0.0", "conv_in"),
    ("out.2", "conv_out"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
]
SD1_DIFFUSERS_NORMS = [("out.0", "conv_norm_out"), ("input_blocks.1.0.in_layers.0", "down_blocks.0.resnets.0.norm1")]


def _peft(parts: dict) -> dict:
    renamed = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}
    return {renamed.get(k, k): v for k, v in parts.items()}


def _check(fam, roots_, family_name, changes, path, te=1.0, unet=1.0, inputs_batch=2):
    reference = merge_reference(roots_, changes, te=te, unet=unet)
    patch = build_patch(roots_, family_name, [[LoraUse(read_lora(path), te=te, unet=unet)]])
    report = patch.reports[0][0]
    inputs = unet_inputs(fam, inputs_batch)
    ids = torch.randint(1, 900, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), patch, patch.rows([(slice(None), 0)]):
        got = {"unet": run_unet(roots_["unet"], inputs)}
        got.update({k: v(ids).last_hidden_state for k, v in roots_.items() if k != "unet"})
    with torch.no_grad():
        want = {"unet": run_unet(reference["unet"], inputs)}
        want.update({k: v(ids).last_hidden_state for k, v in reference.items() if k != "unet"})
        plain = {"unet": run_unet(roots_["unet"], inputs)}
        plain.update({k: v(ids).last_hidden_state for k, v in roots_.items() if k != "unet"})
    for k in got:
        assert rel_err(got[k], want[k]) <= 1e-5, k
    return report, {k: rel_err(want[k], plain[k]) for k in want}


def test_sd1_kohya_diffusers_layout(tmp_path):
    fam = family("sd1")
    unet, te = fam.unet, fam.text_encoders[0]
    g = torch.Generator().manual_seed(0)
    changes = [Change("unet", ldm, "lora_unet_" + dif.replace(".", "_"), lora_parts(g, layer_weight(unet, ldm)))
               for ldm, dif in SD1_DIFFUSERS]
    changes += [Change("unet", ldm, "lora_unet_" + dif.replace(".", "_"), norm_parts(g, layer_weight(unet, ldm)))
                for ldm, dif in SD1_DIFFUSERS_NORMS]
    for hf in ("text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.1.mlp.fc2"):
        path = hf.removeprefix("text_model.")
        changes.append(Change("te", "text_model." + path, "lora_te_" + hf.replace(".", "_"),
                              lora_parts(g, layer_weight(te, hf))))
    path = write_file(tmp_path, "sd1_kohya.safetensors", changes)
    report, moved = _check(fam, {"unet": unet, "te": te}, "sd1", changes, path, te=0.6, unet=0.9)
    n_keys = 3 * (len(changes) - 2) + 2 * 2  # LoRA: up, down, alpha; norm: w_norm, b_norm
    assert report.keys_matched == report.keys_total == n_keys
    assert (report.unet_modules, report.te_modules) == (len(SD1_DIFFUSERS) + 2, 2)
    assert report.looks_like == "SD1.x"  # 1×1-conv proj_in and attention on the first level
    assert report.key_style == "kohya"
    assert set(report.formats) == {"LoRA", "LoCon", "norm"}
    assert min(moved.values()) > 1e-3


def test_sd1_peft_dotted_keys(tmp_path):
    fam = family("sd1")
    unet, te = fam.unet, fam.text_encoders[0]
    g = torch.Generator().manual_seed(1)
    changes = [Change("unet", ldm, "unet." + dif, _peft(lora_parts(g, layer_weight(unet, ldm))))
               for ldm, dif in SD1_DIFFUSERS[:8]]
    changes.append(Change("te", "text_model.encoder.layers.1.self_attn.v_proj",
                          "text_encoder.text_model.encoder.layers.1.self_attn.v_proj",
                          _peft(lora_parts(g, layer_weight(te, "text_model.encoder.layers.1.self_attn.v_proj")))))
    path = write_file(tmp_path, "sd1_peft.safetensors", changes)
    report, _ = _check(fam, {"unet": unet, "te": te}, "sd1", changes, path)
    assert report.keys_matched == report.keys_total == 3 * len(changes)
    assert report.key_style == "diffusers"


def test_sd2_openclip_and_linear_proj(tmp_path):
    fam = family("sd2")
    unet, te = fam.unet, fam.text_encoders[0]
    g = torch.Generator().manual_seed(2)
    changes = [
        Change("unet", "input_blocks.1.1.proj_in", "lora_unet_down_blocks_0_attentions_0_proj_in",
               lora_parts(g, layer_weight(unet, "input_blocks.1.1.proj_in"))),
        Change("unet", "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0",
               "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_out_0",
               lora_parts(g, layer_weight(unet, "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0"))),
        Change("te", "transformer.resblocks.1.attn", "lora_te_text_model_encoder_layers_1_self_attn_v_proj",
               lora_parts(g, layer_weight(te, "transformer.resblocks.1.attn", 2)), slot=2),
        Change("te", "transformer.resblocks.0.mlp.c_proj", "lora_te_text_model_encoder_layers_0_mlp_fc2",
               lora_parts(g, layer_weight(te, "transformer.resblocks.0.mlp.c_proj"))),
    ]
    path = write_file(tmp_path, "sd2.safetensors", changes, metadata={"ss_v2": "True"})
    report, moved = _check(fam, {"unet": unet, "te": te}, "sd2", changes, path)
    assert report.looks_like == "SD2.x"
    assert (report.unet_modules, report.te_modules) == (2, 2)
    assert min(moved.values()) > 1e-3


class _Wrapper(nn.Module):
    """Stands for the WebUI wrappers: ``sd_model.model.diffusion_model``, ``cond_stage_model.wrapped.transformer``."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)


def test_sdxl_kohya_and_diffusers_through_wrappers(tmp_path):
    fam = family("sdxl")
    unet, clip_l, clip_g = fam.unet, *fam.text_encoders
    g = torch.Generator().manual_seed(3)

    def ch(root, module_root, layer, key, slot=None, peft=False):
        parts = lora_parts(g, layer_weight(module_root, layer, slot))
        return Change(root, layer, key, _peft(parts) if peft else parts, slot)

    changes = [
        ch("unet", unet, "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
           "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        ch("unet", unet, "label_emb.0.0", "lora_unet_label_emb_0_0"),
        ch("unet", unet, "input_blocks.5.1.transformer_blocks.0.attn2.to_v",
           "unet.down_blocks.1.attentions.1.transformer_blocks.0.attn2.to_v", peft=True),
        ch("unet", unet, "output_blocks.2.2.conv", "unet.up_blocks.0.upsamplers.0.conv", peft=True),
        ch("unet", unet, "label_emb.0.2", "unet.add_embedding.linear_2", peft=True),
        ch("te1", clip_l, "text_model.encoder.layers.0.self_attn.q_proj",
           "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
        ch("te2", clip_g, "transformer.resblocks.0.attn", "lora_te2_text_model_encoder_layers_0_self_attn_k_proj", 1),
        ch("te2", clip_g, "transformer.resblocks.1.mlp.c_fc", "lora_te2_text_model_encoder_layers_1_mlp_fc1"),
        ch("te2", clip_g, "transformer.resblocks.1.attn",
           "text_encoder_2.text_model.encoder.layers.1.self_attn.out_proj", "out", peft=True),
    ]
    path = write_file(tmp_path, "sdxl.safetensors", changes)
    roots_ = {"unet": _Wrapper(diffusion_model=unet), "te1": _Wrapper(wrapped=_Wrapper(transformer=clip_l)),
              "te2": _Wrapper(model=clip_g)}
    reference = merge_reference({"unet": unet, "te1": clip_l, "te2": clip_g}, changes)
    patch = build_patch(roots_, "sdxl", [[LoraUse(read_lora(path))]])
    report = patch.reports[0][0]
    assert report.keys_matched == report.keys_total == 3 * len(changes)
    assert (report.unet_modules, report.te_modules, report.looks_like) == (5, 4, "SDXL")
    assert report.key_style == "diffusers+kohya"

    inputs = unet_inputs(fam, 2)
    ids = torch.randint(1, 900, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), patch, patch.rows([(slice(None), 0)]):
        got = [run_unet(unet, inputs), clip_l(ids).last_hidden_state, clip_g(ids).last_hidden_state]
    with torch.no_grad():
        want = [run_unet(reference["unet"], inputs), reference["te1"](ids).last_hidden_state,
                reference["te2"](ids).last_hidden_state]
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-5


def test_sdxl_second_encoder_in_hugging_face_naming(tmp_path):
    """Forge builds both SDXL text encoders as Hugging Face CLIP models: te2 keys map by their own names."""
    from devkit.text_encoders import CLIPTextModel, TextConfig

    fam = family("sdxl")
    torch.manual_seed(0)
    clip_g_hf = CLIPTextModel(TextConfig(width=32)).eval()
    g = torch.Generator().manual_seed(4)
    layer = "text_model.encoder.layers.1.self_attn.k_proj"
    changes = [Change("te2", layer, "lora_te2_" + layer.replace(".", "_"),
                      lora_parts(g, layer_weight(clip_g_hf, layer))),
               Change("unet", "input_blocks.4.1.proj_out", "lora_unet_input_blocks_4_1_proj_out",
                      lora_parts(g, layer_weight(fam.unet, "input_blocks.4.1.proj_out")))]
    path = write_file(tmp_path, "sdxl_forge.safetensors", changes)
    report, _ = _check(fam, {"unet": fam.unet, "te1": fam.text_encoders[0], "te2": clip_g_hf}, "sdxl", changes, path)
    assert (report.unet_modules, report.te_modules) == (1, 1)


def test_report_counts_unmatched_and_skips_bundled_embeddings(tmp_path):
    fam = family("sd1")
    g = torch.Generator().manual_seed(5)
    layer = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"
    changes = [Change("unet", layer, "lora_unet_" + layer.replace(".", "_"),
                      lora_parts(g, layer_weight(fam.unet, layer)))]
    extra = {
        "lora_unet_no_such_layer.lora_up.weight": torch.zeros(4, 2),
        "lora_unet_no_such_layer.lora_down.weight": torch.zeros(2, 4),
        "something.else": torch.zeros(1),
        "bundle_emb.mystyle.string_to_param.*": torch.zeros(2, 32),
    }
    path = write_file(tmp_path, "partial.safetensors", changes, extra=extra)
    patch = build_patch({"unet": fam.unet, "te": fam.text_encoders[0]}, "sd1", [[LoraUse(read_lora(path))]])
    report = patch.reports[0][0]
    assert (report.keys_matched, report.keys_total) == (3, 6)
    assert set(report.unmatched) == {"lora_unet_no_such_layer.lora_up.weight",
                                     "lora_unet_no_such_layer.lora_down.weight", "something.else"}
    assert (report.unet_modules, report.te_modules, report.formats) == (1, 0, ("LoRA",))
    assert "3/6 keys matched" in report.summary()


def test_key_parsing_and_unet_candidates():
    k = parse_key("lora_unet_down_blocks_1_attentions_0_proj_in.lora_down.weight")
    assert (k.part, k.flat, k.weight_part, k.style) == ("unet", "down_blocks_1_attentions_0_proj_in",
                                                        "lora_down.weight", "kohya")
    k = parse_key("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight")
    assert (k.part, k.flat, k.weight_part) == ("unet", "up_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
                                               "lora_up.weight")
    k = parse_key("text_encoder_2.text_model.encoder.layers.3.mlp.fc1.alpha")
    assert (k.part, k.flat, k.weight_part) == ("te2", "text_model_encoder_layers_3_mlp_fc1", "alpha")
    assert parse_key("unet.conv_in.weight") is None  # a plain weight, not a LoRA part
    # real SD1: the first up block has no attention, so its upsampler sits at index 1
    assert unet_candidates("up_blocks_0_upsamplers_0_conv") == ["output_blocks_2_2_conv", "output_blocks_2_1_conv"]
    assert unet_candidates("up_blocks_2_resnets_1_norm2") == ["output_blocks_7_0_out_layers_0"]
    assert unet_candidates("mid_block_resnets_1_time_emb_proj") == ["middle_block_2_emb_layers_1"]
