"""Down factors stacked under the layer's weight: one GEMM for the layer and every group's down-projection.

The folded forward must give what the unfolded one gives (adapted rows equal to the merged model, base rows the
plain model's), follow the model when its parameters move, and leave it compact and unchanged on release.
"""

from __future__ import annotations

import pytest
import torch
from lorakit import (
    Change,
    family,
    full_parts,
    layer_weight,
    loha_parts,
    lora_parts,
    merge_reference,
    rel_err,
    roots,
    run_unet,
    unet_inputs,
    write_file,
)

from lib_delta.lora import LoraUse, build_patch, read_lora

LIN = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # Linear, no bias
LIN_B = "input_blocks.1.1.transformer_blocks.0.ff.net.2"  # Linear with bias
CROSS = "input_blocks.1.1.transformer_blocks.0.attn2.to_k"  # Linear on the text conditioning
CONV1 = "input_blocks.1.1.proj_in"  # 1×1 conv with bias
CONV3 = "input_blocks.1.0.in_layers.2"  # 3×3 conv
DOWN = "input_blocks.3.0.op"  # 3×3 conv, stride 2
LOW_RANK = [LIN, LIN_B, CROSS, CONV1, CONV3, DOWN]
FOLDABLE = [LIN, LIN_B, CROSS, CONV1]  # 3×3 convolutions keep their own down-projection: see lib_delta.lora.fold


def _file(tmp_path, unet, name, specs, seed):
    g = torch.Generator().manual_seed(seed)
    changes = [Change("unet", p, "lora_unet_" + p.replace(".", "_"), f(g, layer_weight(unet, p))) for p, f in specs]
    return read_lora(write_file(tmp_path, name, changes)), changes


def _module(root, path):
    return root.get_submodule(path)


def _stacked(module) -> bool:
    w = module.weight
    return w.untyped_storage().nbytes() > w.numel() * w.element_size()


def _batch(fam, copies):
    return tuple(None if t is None else torch.cat([t] * copies) for t in unet_inputs(fam, 2))


def test_folded_rows_equal_merged_and_plain(tmp_path):
    fam = family("sd1")
    unet = fam.unet
    lora, changes = _file(tmp_path, unet, "a.safetensors",
                          [(p, lora_parts) for p in LOW_RANK[:-1]] + [(DOWN, lambda g, w: lora_parts(g, w, rank=6))], 1)
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    reference = merge_reference({"unet": unet}, changes, unet=0.8)["unet"]
    patch = build_patch(roots(fam), "sd1", [[LoraUse(lora, 1.0, 0.8)]], fold=True)
    both = _batch(fam, 2)
    plain = run_unet(unet, both)
    with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
        assert all(_stacked(_module(unet, p)) for p in FOLDABLE)  # every linear and 1×1 low-rank layer is folded
        assert not _stacked(_module(unet, CONV3)) and not _stacked(_module(unet, DOWN))
        assert patch.folded_layers == len(FOLDABLE)
        for p in FOLDABLE:  # rank 4 stacks padded: the output rows stay 16-element aligned
            module = _module(unet, p)
            assert module.weight.untyped_storage().nbytes() // module.weight[0].nbytes % 16 == 0
        dual = run_unet(unet, both)
    assert rel_err(dual[:2], plain[:2]) <= 1e-6  # the plain columns of a wider GEMM
    assert rel_err(dual[2:], run_unet(reference, unet_inputs(fam, 2))) <= 1e-5
    assert rel_err(dual[2:], plain[2:]) > 1e-3

    assert all(_stacked(_module(unet, p)) for p in FOLDABLE)  # kept between calls: no copy per step
    patch.release()
    assert not any(_stacked(_module(unet, p)) for p in LOW_RANK) and patch.folded_layers == 0
    assert all(torch.equal(v, before[k]) for k, v in unet.state_dict().items())
    assert torch.equal(run_unet(unet, both), plain)


def test_two_groups_and_a_dense_change_on_one_layer(tmp_path):
    fam = family("sd1")
    unet = fam.unet
    a, _ = _file(tmp_path, unet, "a.safetensors", [(LIN, lora_parts), (CONV1, lora_parts)], 2)
    b, _ = _file(tmp_path, unet, "b.safetensors", [(LIN, lambda g, w: lora_parts(g, w, rank=3)),
                                                    (CONV1, full_parts), (LIN_B, loha_parts)], 3)
    groups = [[LoraUse(a, 1.0, 0.7)], [LoraUse(b, 1.0, -1.2)]]
    batch = _batch(fam, 3)
    plan = [(slice(0, 2), None), (slice(2, 4), 0), (slice(4, 6), 1)]
    results = {}
    for fold in (False, True):
        patch = build_patch(roots(fam), "sd1", groups, fold=fold)
        with patch, patch.rows(plan):
            assert _stacked(_module(unet, LIN)) == fold and _stacked(_module(unet, CONV1)) == fold
            results[fold] = run_unet(unet, batch)
        patch.release()
    assert rel_err(results[True], results[False]) <= 1e-6
    assert rel_err(results[True][2:4], results[True][4:6]) > 1e-3


def test_moved_parameters_fall_back_then_fold_again(tmp_path):
    fam = family("sd1")
    unet = fam.unet
    lora, _ = _file(tmp_path, unet, "a.safetensors", [(LIN, lora_parts), (CONV1, lora_parts)], 4)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(lora)]], fold=True)
    unfolded = build_patch(roots(fam), "sd1", [[LoraUse(lora)]], fold=False)
    both = _batch(fam, 2)
    plan = [(slice(0, 2), None), (slice(2, 4), 0)]
    with unfolded, unfolded.rows(plan):
        want = run_unet(unet, both)
    with patch, patch.rows(plan):
        folded = run_unet(unet, both)
        for p in (LIN, CONV1):  # what .to() or an offload does: new, compact storage
            module = _module(unet, p)
            module.weight.data = module.weight.data.clone()
        moved = run_unet(unet, both)  # the stack no longer holds the weights: the unfolded path
        assert not _stacked(_module(unet, LIN))
    assert torch.equal(moved, want)
    assert rel_err(folded, want) <= 1e-6
    with patch, patch.rows(plan):
        assert _stacked(_module(unet, LIN)) and _stacked(_module(unet, CONV1))  # attach stacked them again
        assert rel_err(run_unet(unet, both), want) <= 1e-6
    patch.release()


def test_stacked_inside_inference_mode_stays_an_ordinary_tensor(tmp_path):
    """The WebUIs sample in inference mode; parameters made there could not be updated in place afterwards."""
    fam = family("sd1")
    unet = fam.unet
    lora, _ = _file(tmp_path, unet, "a.safetensors", [(LIN, lora_parts)], 8)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(lora)]], fold=True)
    with torch.inference_mode():
        patch.attach()
        assert _stacked(_module(unet, LIN)) and not _module(unet, LIN).weight.is_inference()
        patch.release()
    assert not _stacked(_module(unet, LIN)) and not _module(unet, LIN).weight.is_inference()
    with torch.no_grad():
        _module(unet, LIN).weight.add_(0)  # in place outside inference mode, as a weight reload does


def test_parameters_made_in_inference_mode_keep_working_unfolded_and_released(tmp_path):
    """A model loaded inside inference mode has inference-tensor parameters; an ordinary stack under them made the
    layer's own forward fail ("Inference tensors do not track version counter") once the unfolded path ran."""
    with torch.inference_mode():
        fam = family("sd1")
        unet = fam.unet
        both = _batch(fam, 2)
        plain = run_unet(unet, both)
    assert _module(unet, LIN).weight.is_inference()
    lora, _ = _file(tmp_path, unet, "a.safetensors", [(LIN, lora_parts), (CONV1, lora_parts)], 8)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(lora)]], fold=True)
    rows = [(slice(0, 2), None), (slice(2, 4), 0)]
    with torch.inference_mode():
        patch.attach()
        assert _stacked(_module(unet, LIN)) and _stacked(_module(unet, CONV1))
        with patch.rows(rows):
            folded = run_unet(unet, both)
        patch.folding = False
        with patch.rows(rows):
            unfolded = run_unet(unet, both)
        patch.folding = True
        patch.release()
        assert not _stacked(_module(unet, LIN)) and _module(unet, LIN).weight.is_inference()
        assert torch.equal(run_unet(unet, both), plain)
    assert rel_err(folded, unfolded) <= 1e-6 and rel_err(folded[2:], plain[2:]) > 1e-3


@pytest.mark.parametrize("fold", [False, True])
def test_channels_last_model_adds_convolution_terms_in_place(tmp_path, monkeypatch, fold):
    """A channels-last model (a converted model, or a 1×1 conv fed a permuted tensor) gives channels-last conv
    outputs: the up-projection goes into their pixel rows with one in-place GEMM, not a product and an add."""
    fam = family("sd1")
    unet = fam.unet
    specs = [(CONV1, lora_parts), (CONV3, lora_parts), (LIN, lora_parts)]
    lora, changes = _file(tmp_path, unet, "a.safetensors", specs, 9)
    reference = merge_reference({"unet": unet}, changes, unet=1.0)["unet"]
    unet.to(memory_format=torch.channels_last)
    both = tuple(t.contiguous(memory_format=torch.channels_last) if t is not None and t.dim() == 4 else t
                 for t in _batch(fam, 2))
    plain = run_unet(unet, both)
    patch = build_patch(roots(fam), "sd1", [[LoraUse(lora)]], fold=fold)
    real_matmul = torch.matmul

    def matmul(a, b, *args, **kwargs):  # the fallback's product of up and h: 3-D h of rank 4
        assert not (b.dim() == 3 and b.shape[1] == 4), "the conv up-projection took the copying fallback"
        return real_matmul(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "matmul", matmul)
    with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
        assert _stacked(_module(unet, CONV1)) == fold
        dual = run_unet(unet, both)
    patch.release()
    monkeypatch.undo()
    assert rel_err(dual[:2], plain[:2]) <= 1e-6
    assert rel_err(dual[2:], run_unet(reference, unet_inputs(fam, 2))) <= 1e-5
    assert rel_err(dual[2:], plain[2:]) > 1e-3


def test_folding_switch_and_cpu_default(tmp_path):
    fam = family("sd1")
    unet = fam.unet
    lora, _ = _file(tmp_path, unet, "a.safetensors", [(LIN, lora_parts), (CONV3, lora_parts)], 5)
    both = _batch(fam, 2)
    plan = [(slice(0, 2), None), (slice(2, 4), 0)]
    unfolded = build_patch(roots(fam), "sd1", [[LoraUse(lora)]], fold=False)
    with unfolded, unfolded.rows(plan):
        want = run_unet(unet, both)

    default = build_patch(roots(fam), "sd1", [[LoraUse(lora)]])  # fold=None: CUDA only
    with default, default.rows(plan):
        assert not _stacked(_module(unet, LIN))
        assert torch.equal(run_unet(unet, both), want)
    default.release()

    patch = build_patch(roots(fam), "sd1", [[LoraUse(lora)]], fold=True)
    with patch, patch.rows(plan):
        patch.folding = False  # the stack stays; the forwards take the unfolded path
        assert _stacked(_module(unet, LIN))
        assert torch.equal(run_unet(unet, both), want)
        patch.folding = True
        assert not torch.equal(run_unet(unet, both)[2:], run_unet(unet, both)[:2])
    patch.release()


def test_instance_forwards_and_merge_keep_the_unfolded_path(tmp_path):
    """A layer with its own instance forward (another tool's hook) is not folded: the hook must run."""
    fam = family("sd1")
    unet = fam.unet
    lora, changes = _file(tmp_path, unet, "a.safetensors", [(LIN, lora_parts), (LIN_B, lora_parts)], 6)
    module = _module(unet, LIN)
    calls = []
    module.forward = lambda x, _m=module: (calls.append(1), type(_m).forward(_m, x))[1]
    try:
        patch = build_patch(roots(fam), "sd1", [[LoraUse(lora)]], fold=True)
        with patch, patch.rows([(slice(None), 0)]):
            adapted = run_unet(unet, unet_inputs(fam, 2))
            assert not _stacked(module) and _stacked(_module(unet, LIN_B)) and calls
        patch.release()
    finally:
        del module.forward
    reference = merge_reference({"unet": unet}, changes)["unet"]
    assert rel_err(adapted, run_unet(reference, unet_inputs(fam, 2))) <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_fold_default_base_rows_exact_and_fewer_kernels(tmp_path):
    """Rank 4 on 32-wide layers: unpadded, q/k/v rows 36 elements apart made fused attention return wrong values."""
    from torch.profiler import ProfilerActivity, profile

    fam = family("sd1")
    unet = fam.unet.cuda().half()
    lora, _ = _file(tmp_path, fam.unet, "a.safetensors", [(p, lora_parts) for p in LOW_RANK], 7)
    both = tuple(None if t is None else t.cuda() for t in _batch(fam, 2))
    plan = [(slice(0, 2), None), (slice(2, 4), 0)]
    counts, outs = {}, {}
    with torch.autocast("cuda", torch.float16):  # as the WebUI samples: the timestep embedding comes in float32
        plain = run_unet(unet, both)
        for fold in (False, None):
            patch = build_patch({"unet": unet}, "sd1", [[LoraUse(lora)]], fold=fold)
            with patch, patch.rows(plan):
                run_unet(unet, both)  # lay out, warm up
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    outs[fold] = run_unet(unet, both)
                    torch.cuda.synchronize()
            counts[fold] = sum(1 for e in prof.events() if e.device_type.name == "CUDA")
            patch.release()
    assert torch.equal(outs[None][:2], plain[:2])
    assert rel_err(outs[None], outs[False]) <= 2e-3
    assert counts[None] <= counts[False] - len(FOLDABLE)  # at least each folded layer's down GEMM


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gpu_locon_on_every_layer_keeps_base_rows_exact(tmp_path, memory_format):
    """A LoRA on every linear and convolution (LoCon): the 3×3 convolutions are left unfolded, as a wider cuDNN
    convolution moved their base rows by float16 rounding; the folded linear and 1×1 layers stay exact."""
    fam = family("sd1")
    paths = [n for n, m in fam.unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    lora, _ = _file(tmp_path, fam.unet, "a.safetensors", [(p, lora_parts) for p in paths], 11)
    unet = fam.unet.cuda().half().to(memory_format=memory_format)
    both = tuple(None if t is None else (t.cuda().contiguous(memory_format=memory_format) if t.dim() == 4 else t.cuda())
                 for t in _batch(fam, 2))
    with torch.autocast("cuda", torch.float16):
        plain = run_unet(unet, both)
        patch = build_patch({"unet": unet}, "sd1", [[LoraUse(lora)]])
        with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
            folded = patch.folded_layers
            dual = run_unet(unet, both)
        patch.release()
    wide_kernels = [p for p in paths if getattr(_module(unet, p), "kernel_size", (1, 1)) != (1, 1)]
    assert wide_kernels and 0 < folded <= len(paths) - len(wide_kernels)
    assert torch.equal(dual[:2], plain[:2])
    assert rel_err(dual[2:], plain[2:]) > 1e-2
