"""Groups, multipliers, row plans, fusion and the reversible patch."""

from __future__ import annotations

import pytest
import torch
from lorakit import (
    Change,
    family,
    layer_weight,
    loha_parts,
    lokr_parts,
    lora_parts,
    merge_reference,
    rel_err,
    roots,
    run_unet,
    unet_inputs,
    write_file,
)

from lib_delta.lora import LoraUse, build_patch, read_lora
from lib_delta.lora.ops import ConvLowRank, LinearDense, LinearLowRank

ATTN = "input_blocks.4.1.transformer_blocks.0.attn2.to_v"
FF = "output_blocks.3.1.transformer_blocks.0.ff.net.0.proj"
CONV = "middle_block.0.in_layers.2"


def _file(tmp_path, unet, name, specs, seed):
    g = torch.Generator().manual_seed(seed)
    changes = [Change("unet", p, "lora_unet_" + p.replace(".", "_"), f(g, layer_weight(unet, p))) for p, f in specs]
    return write_file(tmp_path, name, changes), changes


def test_two_groups_in_one_call(tmp_path):
    fam = family("sd1")
    unet = fam.unet
    path_a, ch_a = _file(tmp_path, unet, "a.safetensors", [(ATTN, lora_parts), (CONV, lora_parts)], 1)
    path_b, ch_b = _file(tmp_path, unet, "b.safetensors", [(ATTN, loha_parts), (FF, lora_parts)], 2)
    path_c, ch_c = _file(tmp_path, unet, "c.safetensors", [(FF, lokr_parts), (CONV, loha_parts)], 3)
    a, b, c = (read_lora(p) for p in (path_a, path_b, path_c))
    groups = [[LoraUse(a, 1.0, 0.7), LoraUse(b, 1.0, 1.3)], [LoraUse(c, 1.0, -0.5)]]
    patch = build_patch(roots(fam), "sd1", groups)
    assert [[r.file for r in g] for g in patch.reports] == [["a.safetensors", "b.safetensors"], ["c.safetensors"]]

    ref0 = merge_reference({"unet": unet}, ch_a, unet=0.7)["unet"]
    ref0 = merge_reference({"unet": ref0}, ch_b, unet=1.3)["unet"]
    ref1 = merge_reference({"unet": unet}, ch_c, unet=-0.5)["unet"]
    inputs = unet_inputs(fam, 2)
    batch = tuple(None if t is None else torch.cat([t, t, t]) for t in inputs)
    plain = run_unet(unet, batch)
    with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0), (slice(4, 6), 1)]):
        dual = run_unet(unet, batch)
    assert torch.equal(dual[:2], plain[:2])
    assert rel_err(dual[2:4], run_unet(ref0, inputs)) <= 1e-5
    assert rel_err(dual[4:6], run_unet(ref1, inputs)) <= 1e-5
    assert rel_err(dual[4:6], dual[2:4]) > 1e-3


def test_files_of_a_group_fuse_into_one_op_per_layer(tmp_path):
    fam = family("sd1")
    unet = fam.unet
    path_a, _ = _file(tmp_path, unet, "a.safetensors", [(ATTN, lora_parts), (CONV, lora_parts)], 1)
    path_b, _ = _file(tmp_path, unet, "b.safetensors", [(ATTN, lora_parts), (CONV, lora_parts)], 2)
    path_big, _ = _file(tmp_path, unet, "big.safetensors", [(ATTN, lambda g, w: lora_parts(g, w, rank=40))], 3)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path_a)), LoraUse(read_lora(path_b))],
                                            [LoraUse(read_lora(path_big))]])
    ops = {id(s.module): s.ops for s in patch._sites}
    attn_ops = ops[id(unet.get_submodule(ATTN))]
    assert isinstance(attn_ops[0], LinearLowRank) and attn_ops[0].up.shape[1] == 8  # ranks concatenated
    assert isinstance(attn_ops[1], LinearDense)  # rank 40 on a 64×64 layer: dense is cheaper
    conv_ops = ops[id(unet.get_submodule(CONV))]
    assert isinstance(conv_ops[0], ConvLowRank) and conv_ops[1] is None
    assert patch.nbytes() > 0 and "layers patched" in patch.summary()


def test_dense_option(tmp_path):
    fam = family("sd1")
    unet = fam.unet
    path, changes = _file(tmp_path, unet, "a.safetensors", [(ATTN, lora_parts), (CONV, loha_parts)], 1)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path))]], dense=True)
    assert all(type(s.ops[0]).__name__ in ("LinearDense", "ConvDense") for s in patch._sites)
    ref = merge_reference({"unet": unet}, changes)["unet"]
    inputs = unet_inputs(fam, 2)
    with patch, patch.rows([(slice(None), 0)]):
        assert rel_err(run_unet(unet, inputs), run_unet(ref, inputs)) <= 1e-5


def test_te_and_unet_multipliers(tmp_path):
    fam = family("sd1")
    unet, te = fam.unet, fam.text_encoders[0]
    g = torch.Generator().manual_seed(4)
    te_layer = "text_model.encoder.layers.0.mlp.fc1"
    changes = [
        Change("unet", ATTN, "lora_unet_" + ATTN.replace(".", "_"), lora_parts(g, layer_weight(unet, ATTN))),
        Change("te", te_layer, "lora_te_" + te_layer.replace(".", "_"), lora_parts(g, layer_weight(te, te_layer))),
    ]
    lora = read_lora(write_file(tmp_path, "both.safetensors", changes))
    ids = torch.randint(1, 900, (2, 10), generator=torch.Generator().manual_seed(0))
    inputs = unet_inputs(fam, 2)

    for use, te_mult, unet_mult in ((LoraUse(lora, te=0.5, unet=1.5), 0.5, 1.5), (LoraUse(lora, 0.7), 0.7, 0.7)):
        ref = merge_reference({"unet": unet, "te": te}, changes, te=te_mult, unet=unet_mult)
        patch = build_patch(roots(fam), "sd1", [[use]])
        assert (patch.reports[0][0].te_multiplier, patch.reports[0][0].unet_multiplier) == (te_mult, unet_mult)
        with torch.no_grad(), patch, patch.rows([(slice(None), 0)]):
            assert rel_err(te(ids).last_hidden_state, ref["te"](ids).last_hidden_state) <= 1e-5
            assert rel_err(run_unet(unet, inputs), run_unet(ref["unet"], inputs)) <= 1e-5

    patch = build_patch(roots(fam), "sd1", [[LoraUse(lora, te=0.0, unet=1.0)]])
    assert te.get_submodule(te_layer) not in patch.modules  # a zero multiplier patches nothing
    assert patch.reports[0][0].te_modules == 1  # but the keys were matched and checked


def test_attaching_again_reuses_the_forwards_until_another_hook_appears(tmp_path):
    """Hosts attach around every source call: the layer forwards are made once, and anew only when the instance
    forward underneath changed."""
    fam = family("sd1")
    unet = fam.unet
    path, _ = _file(tmp_path, unet, "a.safetensors", [(ATTN, lora_parts)], 1)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path))]])
    attn = unet.get_submodule(ATTN)
    inputs = unet_inputs(fam, 2)
    with patch, patch.rows([(slice(None), 0)]):
        ours = attn.forward
        adapted = run_unet(unet, inputs)
    with patch, patch.rows([(slice(None), 0)]):
        assert attn.forward is ours
        assert torch.equal(run_unet(unet, inputs), adapted)
    calls = []
    attn.forward = lambda x: (calls.append(1), type(attn).forward(attn, x))[1]
    hook = attn.forward
    try:
        with patch, patch.rows([(slice(None), 0)]):
            assert attn.forward is not ours
            assert torch.equal(run_unet(unet, inputs), adapted) and calls  # the new hook runs underneath
        assert attn.forward is hook
    finally:
        del attn.forward


def test_outside_a_plan_and_detach_leave_the_model_as_it_was(tmp_path):
    fam = family("sd1")
    unet = fam.unet
    path, _ = _file(tmp_path, unet, "a.safetensors", [(ATTN, lora_parts), (CONV, lora_parts)], 1)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path))]])
    attn = unet.get_submodule(ATTN)
    calls = []

    def host_forward(x):  # an instance-level forward some other code installed before us
        calls.append(1)
        return type(attn).forward(attn, x)

    attn.forward = host_forward
    before = {id(m): dict(m.__dict__) for m in unet.modules()}
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    inputs = unet_inputs(fam, 2)
    plain = run_unet(unet, inputs)

    with patch:
        assert patch.attached and "forward" in unet.get_submodule(CONV).__dict__
        assert torch.equal(run_unet(unet, inputs), plain)
        with patch.rows([(slice(None), None)]):
            assert torch.equal(run_unet(unet, inputs), plain)
        with patch.rows([(slice(None), 0)]):
            with patch.rows([(slice(0, 1), None)]):  # nested plans restore the outer one
                pass
            adapted = run_unet(unet, inputs)
        assert calls  # the host's forward still runs underneath ours
        with pytest.raises(RuntimeError, match="another LoRA patch"):
            build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path))]]).attach()
    assert rel_err(adapted, plain) > 1e-3
    assert not patch.attached
    assert {id(m): dict(m.__dict__) for m in unet.modules()} == before
    assert attn.forward is host_forward
    assert all(torch.equal(v, state[k]) for k, v in unet.state_dict().items())
    assert torch.equal(run_unet(unet, inputs), plain)


def test_row_plan_errors(tmp_path):
    fam = family("sd1")
    path, _ = _file(tmp_path, fam.unet, "a.safetensors", [(ATTN, lora_parts)], 1)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path))]])
    with pytest.raises(RuntimeError, match="attach"), patch.rows([(slice(None), 0)]):
        pass
    with patch:
        with pytest.raises(ValueError, match="group 1"), patch.rows([(slice(None), 1)]):
            pass
        with pytest.raises(ValueError, match="step 1"), patch.rows([(slice(0, 4, 2), 0)]):
            pass
        with pytest.raises(RuntimeError, match="detach"):
            patch.merge_into(0)


def test_to_moves_and_casts(tmp_path):
    fam = family("sd1")
    path, _ = _file(tmp_path, fam.unet, "a.safetensors", [(ATTN, lora_parts), (CONV, lora_parts)], 1)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(read_lora(path))]])
    size = patch.nbytes()
    patch.to(dtype=torch.bfloat16)
    assert patch.nbytes() == size // 2
    assert all(op.up.dtype == torch.bfloat16 for s in patch._sites for op in s.ops)
