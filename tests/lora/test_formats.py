"""Every format, applied functionally, equals the same file merged into the weights; base rows stay plain."""

from __future__ import annotations

import functools

import pytest
import torch
from lorakit import (
    Change,
    family,
    full_parts,
    ia3_parts,
    layer_weight,
    loha_parts,
    lokr_parts,
    lora_parts,
    merge_reference,
    norm_parts,
    oft_parts,
    rel_err,
    roots,
    run_unet,
    unet_inputs,
    with_dora,
    write_file,
)

from lib_delta.lora import LoraUse, build_patch, read_lora

LIN = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear, no bias
LIN_B = "input_blocks.1.1.transformer_blocks.0.ff.net.2"  # Linear 128 → 32 with bias
CONV3 = "input_blocks.1.0.in_layers.2"  # 3×3 conv
CONV1 = "input_blocks.1.1.proj_in"  # SD1: 1×1 conv
DOWN = "input_blocks.3.0.op"  # 3×3 conv, stride 2
GN = "input_blocks.1.0.in_layers.0"  # GroupNorm32 (computes in float32)
LN = "input_blocks.1.1.transformer_blocks.0.norm1"

P = functools.partial
UNET_CASES = {
    "lora": [(LIN, lora_parts), (CONV1, lora_parts), (LIN_B, P(lora_parts, alpha=None))],
    "lora_1x1_down_on_conv1": [(CONV1, P(lora_parts, conv_full=False, rank=8))],
    "locon": [(CONV3, lora_parts), (DOWN, P(lora_parts, rank=6))],
    "locon_tucker": [(CONV3, P(lora_parts, tucker=True)), (DOWN, P(lora_parts, tucker=True))],
    "loha": [(LIN, loha_parts), (CONV3, loha_parts), (DOWN, P(loha_parts, rank=2))],
    "loha_tucker": [(CONV3, P(loha_parts, tucker=True))],
    "lokr": [
        (LIN, lokr_parts),
        (LIN_B, P(lokr_parts, w1_low=True, w2_low=False)),
        (CONV3, lokr_parts),
        (CONV1, P(lokr_parts, w2_low=False)),
        (DOWN, P(lokr_parts, t2=True)),
    ],
    "ia3": [(LIN, ia3_parts), (LIN_B, P(ia3_parts, on_input=True)), (CONV3, ia3_parts)],
    "dora": [
        (LIN, lambda g, w: with_dora(lora_parts(g, w), w, g)),
        (CONV3, lambda g, w: with_dora(lora_parts(g, w), w, g, on_out=True)),
        (LIN_B, lambda g, w: with_dora(loha_parts(g, w), w, g)),
        (CONV1, lambda g, w: with_dora(lokr_parts(g, w), w, g, on_out=True)),
    ],
    "oft": [
        (LIN, oft_parts),
        (LIN_B, P(oft_parts, alpha=1e-3)),  # constraint = α·out clamps the rotation
        (CONV3, P(oft_parts, diag=True)),
        (CONV1, P(oft_parts, rescale=True, blocks=8)),
    ],
    "boft": [(LIN, P(oft_parts, boft=2)), (CONV3, P(oft_parts, boft=2, rescale=True))],
    # LIN has no bias: diff_b adds one; CONV1 is the 1×1 path with a bias
    "full": [(LIN_B, full_parts), (CONV3, full_parts), (LIN, full_parts), (CONV1, full_parts)],
    "norm": [(GN, norm_parts), (LN, norm_parts)],
}


def _changes(unet, specs, seed: int) -> list[Change]:
    g = torch.Generator().manual_seed(seed)
    return [Change("unet", path, "lora_unet_" + path.replace(".", "_"), factory(g, layer_weight(unet, path)))
            for path, factory in specs]


@pytest.mark.parametrize("case", sorted(UNET_CASES))
def test_unet_format_equals_merged(tmp_path, case):
    fam = family("sd1")
    changes = _changes(fam.unet, UNET_CASES[case], seed=len(case))
    path = write_file(tmp_path, f"{case}.safetensors", changes)
    mult = 0.8
    reference = merge_reference({"unet": fam.unet}, changes, te=1.0, unet=mult)["unet"]
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path), te=1.0, unet=mult)]])
    assert patch.reports[0][0].keys_matched == patch.reports[0][0].keys_total

    inputs = unet_inputs(fam, 2)
    both = tuple(None if t is None else torch.cat([t, t]) for t in inputs)
    plain = run_unet(fam.unet, both)
    with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
        dual = run_unet(fam.unet, both)
    merged = run_unet(reference, inputs)

    assert torch.equal(dual[:2], plain[:2])  # base rows: bit-identical to the plain model
    assert rel_err(dual[2:], merged) <= 1e-5
    assert rel_err(merged, plain[2:]) > 1e-3  # the change is real, so equality proves something
    assert torch.equal(run_unet(fam.unet, both), plain)  # detached: plain again


def test_merge_into_matches_reference(tmp_path):
    fam = family("sd1")
    specs = [*UNET_CASES["lora"], (CONV3, oft_parts), (DOWN, full_parts), *UNET_CASES["norm"]]
    changes = _changes(fam.unet, specs, seed=5)
    path = write_file(tmp_path, "mix.safetensors", changes)
    reference = merge_reference({"unet": fam.unet}, changes, unet=0.5)["unet"]
    before = {k: v.clone() for k, v in fam.unet.state_dict().items()}
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path), 1.0, 0.5)]])
    inputs = unet_inputs(fam, 2)
    patch.merge_into(0)
    assert rel_err(run_unet(fam.unet, inputs), run_unet(reference, inputs)) <= 1e-5
    patch.merge_into(0, sign=-1)
    for k, v in fam.unet.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6)


def test_weight_reading_formats_see_earlier_files_of_the_group(tmp_path):
    """As the WebUI merges files one after another, OFT/IA3/DoRA transform the weight earlier files changed."""
    fam = family("sd1")
    g = torch.Generator().manual_seed(9)
    w = layer_weight(fam.unet, LIN)
    first = [Change("unet", LIN, "lora_unet_" + LIN.replace(".", "_"), lora_parts(g, w))]
    path_a = write_file(tmp_path, "a.safetensors", first)
    reference = merge_reference({"unet": fam.unet}, first)["unet"]
    w_b = layer_weight(fam.unet, LIN_B)
    second = [Change("unet", LIN, "lora_unet_" + LIN.replace(".", "_"), oft_parts(g, w)),
              Change("unet", LIN_B, "lora_unet_" + LIN_B.replace(".", "_"), ia3_parts(g, w_b))]
    path_b = write_file(tmp_path, "b.safetensors", second)
    reference = merge_reference({"unet": reference}, second)["unet"]
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path_a)), LoraUse(read_lora(path_b))]])
    inputs = unet_inputs(fam, 2)
    with patch, patch.rows([(slice(None), 0)]):
        adapted = run_unet(fam.unet, inputs)
    assert rel_err(adapted, run_unet(reference, inputs)) <= 1e-5


# --- text encoders: open_clip MultiheadAttention and Hugging Face CLIP ----------------------------------------

HF_LAYER = "text_model_encoder_layers_0_"
MHA_SLOTS = {"self_attn_q_proj": 0, "self_attn_k_proj": 1, "self_attn_v_proj": 2, "self_attn_out_proj": "out"}
TE_CASES = {
    "lora": lora_parts,
    "loha": loha_parts,
    "lokr": lokr_parts,
    "ia3": ia3_parts,
    "full": full_parts,
    "dora": lambda g, w: with_dora(lora_parts(g, w), w, g),
    "oft": oft_parts,
}


def _openclip_changes(te, factory, seed: int, prefix: str = "lora_te_", root: str = "te") -> list[Change]:
    g = torch.Generator().manual_seed(seed)
    changes = []
    for hf, slot in MHA_SLOTS.items():
        w = layer_weight(te, "transformer.resblocks.0.attn", slot)
        changes.append(Change(root, "transformer.resblocks.0.attn", prefix + HF_LAYER + hf, factory(g, w), slot))
    mlp = (("0_mlp_fc1", "transformer.resblocks.0.mlp.c_fc"), ("1_mlp_fc2", "transformer.resblocks.1.mlp.c_proj"))
    for hf, oc in mlp:
        changes.append(Change(root, oc, f"{prefix}text_model_encoder_layers_{hf}", lora_parts(g, layer_weight(te, oc))))
    changes.append(Change(root, "transformer.resblocks.1.ln_1", prefix + "text_model_encoder_layers_1_layer_norm1",
                          norm_parts(g, layer_weight(te, "transformer.resblocks.1.ln_1"))))
    return changes


def _tokens(batch: int) -> torch.Tensor:
    return torch.randint(1, 900, (batch, 12), generator=torch.Generator().manual_seed(batch))


@pytest.mark.parametrize("case", sorted(TE_CASES))
def test_openclip_text_encoder_equals_merged(tmp_path, case):
    fam = family("sd2")
    te = fam.text_encoders[0]
    changes = _openclip_changes(te, TE_CASES[case], seed=len(case))
    path = write_file(tmp_path, f"te_{case}.safetensors", changes)
    reference = merge_reference({"te": te}, changes, te=0.7)["te"]
    patch = build_patch(roots(fam), "sd2", [[LoraUse(read_lora(path), te=0.7, unet=1.0)]])
    report = patch.reports[0][0]
    assert (report.keys_matched, report.te_modules, report.unet_modules) == (report.keys_total, 7, 0)

    ids = _tokens(2)
    with torch.no_grad():
        plain = te(ids).last_hidden_state
        plain_both = te(torch.cat([ids, ids])).last_hidden_state
        merged = reference(ids).last_hidden_state
        with patch:
            assert torch.equal(te(ids).last_hidden_state, plain)  # outside a plan: plain
            with patch.rows([(slice(None), 0)]):
                adapted = te(ids).last_hidden_state
            with patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):  # base and adapted rows of one batch
                dual = te(torch.cat([ids, ids])).last_hidden_state
    assert rel_err(adapted, merged) <= 1e-5
    assert rel_err(dual[2:], merged) <= 1e-5
    assert torch.equal(dual[:2], plain_both[:2])
    assert rel_err(merged, plain) > 1e-3


def test_sequence_first_multihead_attention_rows():
    """open_clip in the WebUI runs (L, N, E): a partial plan slices the batch on dim 1."""
    from lib_delta.lora.formats import Delta
    from lib_delta.lora.ops import MhaReplace
    from lib_delta.lora.patch import DeltaPatch, _Site

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=False).eval()
    change = Delta(up=torch.randn(16, 2) * 0.3, down=torch.randn(2, 16) * 0.3)
    op = MhaReplace(mha, {1: change}, torch.float32, torch.device("cpu"))
    patch = DeltaPatch([_Site(mha, "mha", (op,))], [[]])
    x = torch.randn(5, 4, 16)
    mask = torch.full((5, 5), float("-inf")).triu(1)
    with torch.no_grad():
        plain = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        merged_mha = torch.nn.MultiheadAttention(16, 2, batch_first=False).eval()
        merged_mha.load_state_dict(mha.state_dict())
        merged_mha.in_proj_weight[16:32] += change.up @ change.down
        merged = merged_mha(x, x, x, need_weights=False, attn_mask=mask)[0]
        with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
            dual = mha(x, x, x, need_weights=False, attn_mask=mask)[0]
    assert torch.equal(dual[:, :2], plain[:, :2])
    assert rel_err(dual[:, 2:], merged[:, 2:]) <= 1e-5
    assert rel_err(merged[:, 2:], plain[:, 2:]) > 1e-3
