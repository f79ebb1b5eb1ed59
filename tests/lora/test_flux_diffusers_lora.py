"""Flux LoRAs in the diffusers layout (ai-toolkit, diffusers' ``save_lora_weights``, SimpleTuner, OneTrainer).

Their modules are diffusers' (``transformer_blocks.N.attn.to_q``), where Flux's layers fuse several: each module's
change goes to its rows of the fused layer, as Forge's key map places it (the ``flux_to_diffusers`` table Forge
ships). The reference below writes that placement out on its own and merges ``W[rows] += m·scale·B@A`` by hand.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lorakit import (
    Change,
    family,
    flux_inputs,
    flux_roots,
    loha_parts,
    lokr_parts,
    lora_parts,
    ref_updown,
    rel_err,
    roots,
    run_flux,
    with_dora,
    write_file,
)
from torch import nn

from lib_delta.errors import DeltaError
from lib_delta.lora import LoraUse, build_patch, read_lora

D = 32  # the tiny Flux's width (devkit.flux.FluxConfig.hidden_size); its single blocks' MLP is 4·D wide

# diffusers module → (BFL layer, its rows there): q, k, v are thirds of a fused qkv, or the first three widths of
# a single block's linear1 before the MLP input; "swap" is the final adaLN, whose (scale, shift) halves BFL orders
# (shift, scale).
MODULES = {  # the text stream in the first joint block: the last one's reaches the image only through attention
    "transformer_blocks.1.attn.to_q": ("double_blocks.1.img_attn.qkv", slice(0, D)),
    "transformer_blocks.1.attn.to_k": ("double_blocks.1.img_attn.qkv", slice(D, 2 * D)),
    "transformer_blocks.1.attn.to_v": ("double_blocks.1.img_attn.qkv", slice(2 * D, 3 * D)),
    "transformer_blocks.0.attn.add_q_proj": ("double_blocks.0.txt_attn.qkv", slice(0, D)),
    "transformer_blocks.0.attn.add_k_proj": ("double_blocks.0.txt_attn.qkv", slice(D, 2 * D)),
    "transformer_blocks.0.attn.add_v_proj": ("double_blocks.0.txt_attn.qkv", slice(2 * D, 3 * D)),
    "transformer_blocks.1.attn.to_out.0": ("double_blocks.1.img_attn.proj", None),
    "transformer_blocks.0.attn.to_add_out": ("double_blocks.0.txt_attn.proj", None),
    "transformer_blocks.1.ff.net.0.proj": ("double_blocks.1.img_mlp.0", None),
    "transformer_blocks.1.ff.net.2": ("double_blocks.1.img_mlp.2", None),
    "transformer_blocks.0.ff_context.net.0.proj": ("double_blocks.0.txt_mlp.0", None),
    "transformer_blocks.0.ff_context.net.2": ("double_blocks.0.txt_mlp.2", None),
    "transformer_blocks.1.norm1.linear": ("double_blocks.1.img_mod.lin", None),
    "transformer_blocks.0.norm1_context.linear": ("double_blocks.0.txt_mod.lin", None),
    "single_transformer_blocks.0.attn.to_q": ("single_blocks.0.linear1", slice(0, D)),
    "single_transformer_blocks.0.attn.to_k": ("single_blocks.0.linear1", slice(D, 2 * D)),
    "single_transformer_blocks.0.attn.to_v": ("single_blocks.0.linear1", slice(2 * D, 3 * D)),
    "single_transformer_blocks.0.proj_mlp": ("single_blocks.0.linear1", slice(3 * D, 7 * D)),
    "single_transformer_blocks.1.proj_out": ("single_blocks.1.linear2", None),
    "single_transformer_blocks.1.norm.linear": ("single_blocks.1.modulation.lin", None),
    "x_embedder": ("img_in", None),
    "context_embedder": ("txt_in", None),
    "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", None),
    "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", None),
    "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", None),
    "norm_out.linear": ("final_layer.adaLN_modulation.1", "swap"),
    "proj_out": ("final_layer.linear", None),
}
SLICED = [m for m, (_, rows) in MODULES.items() if isinstance(rows, slice)]
NAMES = {  # how each trainer names the two factors
    "peft": {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"},
    "kohya-parts": {},
}


def _strong(parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ten times the change, so that each module alone moves the output well above the rounding."""
    return {k: v * 10 if k == "lora_up.weight" else v for k, v in parts.items()}


def _module_weight(flux: nn.Module, module: str) -> torch.Tensor:
    """The weight the diffusers module would have: its rows of the BFL layer, in diffusers' order."""
    layer, rows = MODULES[module]
    w = flux.get_submodule(layer).weight.detach()
    if rows == "swap":
        return torch.cat([w[w.shape[0] // 2:], w[: w.shape[0] // 2]])
    return w if rows is None else w[rows]


def _changes(flux: nn.Module, modules, make=lora_parts, names: str = "peft", prefix: str = "transformer.",
             seed: int = 1) -> list[Change]:
    g = torch.Generator().manual_seed(seed)
    changes = []
    for m in modules:
        parts = make(g, _module_weight(flux, m))
        parts = {NAMES[names].get(k, k): v for k, v in parts.items()}
        changes.append(Change("unet", m, prefix + m, parts))
    return changes


@torch.no_grad()
def _forge_merge(flux: nn.Module, changes: list[Change], multiplier: float = 1.0) -> nn.Module:
    """A copy of the transformer with every module's change added to its rows, by the reference math."""
    merged = copy.deepcopy(flux)
    for c in changes:
        layer, rows = MODULES[c.path]
        w = merged.get_submodule(layer).weight
        change, _ = ref_updown(c.parts, _module_weight(flux, c.path))
        change = (multiplier * change).to(w.dtype)
        if rows == "swap":
            half = w.shape[0] // 2
            w[:half] += change[half:]
            w[half:] += change[:half]
        else:
            w[slice(None) if rows is None else rows] += change
    return merged


def _patch(source, changes, tmp_path, name="aitk.safetensors", te: float = 1.0, unet: float | None = 0.8, **kw):
    use = LoraUse(read_lora(write_file(tmp_path, name, changes)), te, unet)
    return build_patch(source, "flux", [[use]], **kw)


def _dual(patch, flux, inputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(plain, base rows, adapted rows): the unpatched model's output and one patched call's, on the same batch of
    the inputs twice (a GEMM of another height may round differently)."""
    batch = tuple(torch.cat([t, t]) for t in inputs)
    n = inputs[0].shape[0]
    plain = run_flux(flux, batch)[:n]
    with patch, patch.rows([(slice(0, n), None), (slice(n, 2 * n), 0)]):
        out = run_flux(flux, batch)
    return plain, out[:n], out[n:]


def test_the_tiny_flux_has_no_zero_weights():
    """A zero layer would hide a wrong placement: every weight of the fixture is live."""
    flux = flux_roots()["unet"]
    assert all(p.abs().sum() > 0 for p in flux.parameters())


@pytest.mark.parametrize("names,alpha,prefix", [("peft", None, "transformer."), ("peft", 8.0, "transformer."),
                                                ("kohya-parts", 2.0, "transformer."),
                                                ("kohya-parts", None, "lora_transformer_")])
def test_a_diffusers_flux_lora_equals_forges_merge(tmp_path, names, alpha, prefix):
    """Every module Forge's table places, in one file: ai-toolkit and diffusers write PEFT names and alpha or not,
    older trainers ``lora_down``/``lora_up``; OneTrainer flattens the same names under ``lora_transformer_``."""
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, MODULES, lambda g, w: lora_parts(g, w, alpha=alpha), names, prefix)
    if prefix == "lora_transformer_":
        for c in changes:
            c.key = prefix + c.path.replace(".", "_")
    patch = _patch(source, changes, tmp_path)
    report = patch.reports[0][0]
    assert (report.keys_matched, report.unmatched) == (report.keys_total, ())
    assert report.unet_modules == len({layer for layer, _ in MODULES.values()})
    assert report.looks_like == "Flux"

    inputs = flux_inputs(2)
    plain, base, adapted = _dual(patch, flux, inputs)
    assert torch.equal(base, plain)
    assert rel_err(adapted, run_flux(_forge_merge(flux, changes, 0.8), inputs)) <= 1e-5
    assert rel_err(adapted, plain) > 1e-2


@pytest.mark.parametrize("module", list(MODULES))
def test_each_module_changes_its_own_rows(tmp_path, module):
    """One module at a time, so that a change put in the wrong rows (to_k in q's) cannot hide behind the others."""
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, [module], lambda g, w: _strong(lora_parts(g, w)), seed=3)
    inputs = flux_inputs(1)
    plain, _, adapted = _dual(_patch(source, changes, tmp_path, unet=1.0), flux, inputs)
    # a hundred times apart: the text stream's q is normalised per head, and moves the image least of all
    assert rel_err(adapted, run_flux(_forge_merge(flux, changes), inputs)) <= 2e-6
    assert rel_err(adapted, plain) > 2e-4


def test_the_final_adaln_halves_change_places(tmp_path):
    """diffusers' ``norm_out.linear`` gives (scale, shift), BFL's ``adaLN_modulation.1`` (shift, scale)."""
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, ["norm_out.linear"], seed=4)
    inputs = flux_inputs(1)
    _, _, adapted = _dual(_patch(source, changes, tmp_path, unet=1.0), flux, inputs)
    unswapped = copy.deepcopy(flux)  # the change added in diffusers' order
    with torch.no_grad():
        unswapped.final_layer.adaLN_modulation[1].weight += ref_updown(changes[0].parts,
                                                                       _module_weight(flux, "norm_out.linear"))[0]
    assert rel_err(adapted, run_flux(_forge_merge(flux, changes), inputs)) <= 1e-5
    assert rel_err(adapted, run_flux(unswapped, inputs)) > 1e-2


@pytest.mark.parametrize("make", [lokr_parts, loha_parts, lambda g, w: with_dora(lora_parts(g, w), w, g),
                                  lambda g, w: (with_dora(lora_parts(g, w), w, g) if w.shape[0] == 4 * D
                                                else lora_parts(g, w))], ids=["lokr", "loha", "dora", "lora+dora"])
def test_lycoris_and_dora_modules_change_their_rows(tmp_path, make):
    """LoKr and LoHa stay low-rank on their rows; DoRA normalises the module's own rows, as Forge's narrowed
    weight does, and makes its layer's change dense (with DoRA on the MLP input alone, linear1's q, k and v too)."""
    source = flux_roots()
    flux = source["unet"]
    modules = [*SLICED, "transformer_blocks.1.ff.net.0.proj"]
    changes = _changes(flux, modules, make, seed=5)
    inputs = flux_inputs(2)
    plain, base, adapted = _dual(_patch(source, changes, tmp_path), flux, inputs)
    assert torch.equal(base, plain)
    assert rel_err(adapted, run_flux(_forge_merge(flux, changes, 0.8), inputs)) <= 1e-5
    assert rel_err(adapted, plain) > 1e-3


@pytest.mark.parametrize("unet", [0.0, None])
def test_weight_zero_leaves_the_output_bit_identical(tmp_path, unet):
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, MODULES)
    patch = _patch(source, changes, tmp_path, te=0.0, unet=unet)
    plain, base, adapted = _dual(patch, flux, flux_inputs(2))
    assert torch.equal(base, plain) and torch.equal(adapted, plain)
    assert patch.reports[0][0].keys_matched == patch.reports[0][0].keys_total


@pytest.mark.parametrize("how", [{"fold": True}, {"fold": False}, {"dense": True}])
def test_folded_unfolded_and_dense_agree(tmp_path, how):
    """Folded, the sliced modules' down factors sit under the fused weight like any other; dense, their changes are
    one ΔW with zeros in the rows they do not touch."""
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, MODULES)
    inputs = flux_inputs(2)
    patch = _patch(source, changes, tmp_path, **how)
    plain, base, adapted = _dual(patch, flux, inputs)
    sites = len({layer for layer, _ in MODULES.values()})
    if how.get("fold"):  # every layer is an nn.Linear with a low-rank change: all fold, the fused ones too
        patch.attach()
        assert patch.folded_layers == sites
        for fused in (flux.double_blocks[1].img_attn.qkv, flux.single_blocks[0].linear1):  # [W; A_q; A_k; A_v …]
            assert fused.weight.untyped_storage().nbytes() > fused.weight.numel() * 4
        patch.release()
    assert rel_err(base, plain) <= 1e-6  # folded: the plain columns of a wider GEMM
    assert rel_err(adapted, run_flux(_forge_merge(flux, changes, 0.8), inputs)) <= 1e-5
    unfolded = _dual(_patch(source, changes, tmp_path, name="again.safetensors", fold=False), flux, inputs)[2]
    assert rel_err(adapted, unfolded) <= 1e-6


def test_sliced_modules_cost_what_the_file_costs(tmp_path):
    """q, k and v keep their own up factors: nothing is padded to the fused layer's height."""
    source = flux_roots()
    changes = _changes(source["unet"], SLICED, lambda g, w: lora_parts(g, w, alpha=None))
    patch = _patch(source, changes, tmp_path, fold=False)
    assert patch.nbytes() == sum(t.numel() * 4 for c in changes for t in c.parts.values())


def test_a_kohya_and_a_diffusers_file_in_one_group(tmp_path):
    """The same fused layer changed whole by one file and by rows by another, with a second group beside."""
    source = flux_roots()
    flux = source["unet"]
    g = torch.Generator().manual_seed(6)
    qkv = "double_blocks.0.img_attn.qkv"
    kohya = [Change("unet", qkv, "lora_unet_" + qkv.replace(".", "_"), lora_parts(g, flux.get_submodule(qkv).weight))]
    aitk = _changes(flux, SLICED, seed=7)
    files = [read_lora(write_file(tmp_path, "kohya.safetensors", kohya)),
             read_lora(write_file(tmp_path, "aitk.safetensors", aitk))]
    patch = build_patch(source, "flux", [[LoraUse(files[1])], [LoraUse(files[0]), LoraUse(files[1], 1.0, 0.5)]])
    inputs = flux_inputs(1)
    batch = tuple(torch.cat([t, t, t]) for t in inputs)
    plain = run_flux(flux, batch)
    with patch, patch.rows([(slice(0, 1), None), (slice(1, 2), 0), (slice(2, 3), 1)]):
        out = run_flux(flux, batch)
    both = _forge_merge(flux, aitk, 0.5)
    with torch.no_grad():
        both.get_submodule(qkv).weight += ref_updown(kohya[0].parts, flux.get_submodule(qkv).weight)[0]
    assert torch.equal(out[:1], plain[:1])
    assert rel_err(out[1:2], run_flux(_forge_merge(flux, aitk), inputs)) <= 1e-5
    assert rel_err(out[2:], run_flux(both, inputs)) <= 1e-5


def test_merging_into_the_weights_puts_each_module_in_its_rows(tmp_path):
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, MODULES)
    inputs = flux_inputs(1)
    plain = run_flux(flux, inputs)
    reference = run_flux(_forge_merge(flux, changes, 0.8), inputs)
    patch = _patch(source, changes, tmp_path, fold=False)
    patch.merge_into(0)
    assert rel_err(run_flux(flux, inputs), reference) <= 1e-5
    patch.merge_into(0, sign=-1.0)
    assert rel_err(run_flux(flux, inputs), plain) <= 1e-6


def test_under_autocast_the_rows_take_the_casting_path(tmp_path):
    """A float32 model sampled under bfloat16 autocast: the layer's output is bfloat16, the change float32."""
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, MODULES)
    inputs = flux_inputs(1)
    patch = _patch(source, changes, tmp_path, fold=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, _, adapted = _dual(patch, flux, inputs)
        merged = run_flux(_forge_merge(flux, changes, 0.8), inputs)
    assert adapted.dtype == torch.bfloat16
    assert rel_err(adapted, merged) <= 3e-2 and rel_err(adapted, run_flux(flux, inputs)) > 0.1


@pytest.mark.parametrize("stray", ["transformer_blocks.0.attn.norm_q", "transformer_blocks.0.attn.to_qkv",
                                   "single_transformer_blocks.7.attn.to_q"])
def test_a_key_that_maps_to_nothing_is_refused_with_the_way_out(tmp_path, stray):
    """A query norm's scale (which Forge's table names, and no LoRA here can change), a name Flux has no place for,
    a block past the model's depth: the rest of the file is not applied without them."""
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, SLICED)
    g = torch.Generator().manual_seed(8)
    changes.append(Change("unet", stray, "transformer." + stray, {"lora_A.weight": torch.randn(4, D, generator=g),
                                                                  "lora_B.weight": torch.randn(D, 4, generator=g)}))
    state = {k: v.clone() for k, v in flux.state_dict().items()}
    with pytest.raises(DeltaError) as e:
        _patch(source, changes, tmp_path)
    msg = str(e.value)
    assert "aitk.safetensors" in msg and "diffusers layout" in msg and f"transformer.{stray}." in msg
    assert "2 of its keys" in msg and "kohya layout" in msg  # its A and B
    assert all(torch.equal(v, state[k]) for k, v in flux.state_dict().items())


def test_double_blocks_alone_are_not_taken_for_sd3(tmp_path):
    """Without single blocks, diffusers names of joint blocks are SD3's as much as Flux's: the shapes decide."""
    source = flux_roots()
    flux = source["unet"]
    changes = _changes(flux, [m for m in SLICED if not m.startswith("single")])
    patch = _patch(source, changes, tmp_path)
    assert patch.reports[0][0].looks_like == "SD3 or Flux"
    inputs = flux_inputs(1)
    assert rel_err(_dual(patch, flux, inputs)[2], run_flux(_forge_merge(flux, changes, 0.8), inputs)) <= 1e-5


def test_a_diffusers_flux_lora_on_an_sd_source_is_refused(tmp_path):
    changes = _changes(flux_roots()["unet"], MODULES)
    use = LoraUse(read_lora(write_file(tmp_path, "aitk.safetensors", changes)))
    with pytest.raises(DeltaError, match=r"looks made for Flux, but the source model is SD1\.x"):
        build_patch(roots(family("sd1")), "sd1", [[use]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_folded_rows_in_half_precision(tmp_path):
    """On CUDA folding is on by default: the fused layers' q, k and v down factors come out of the layer's own
    float16 GEMM, and each block's up-projection adds into its columns of the wider output."""
    source = flux_roots()
    changes = _changes(source["unet"], MODULES)
    use = LoraUse(read_lora(write_file(tmp_path, "aitk.safetensors", changes)), 1.0, 0.8)
    reference = _forge_merge(source["unet"], changes, 0.8).cuda().half()
    flux = source["unet"].cuda().half()
    inputs = tuple(t.cuda() for t in flux_inputs(2))
    batch = tuple(torch.cat([t, t]) for t in inputs)
    outs = {}
    with torch.autocast("cuda", torch.float16):
        plain = run_flux(flux, batch)
        merged = run_flux(reference, inputs)
        for fold in (None, False):
            patch = build_patch(source, "flux", [[use]], fold=fold)
            with patch, patch.rows([(slice(0, 2), None), (slice(2, 4), 0)]):
                assert patch.folded_layers == (len({layer for layer, _ in MODULES.values()}) if fold is None else 0)
                outs[fold] = run_flux(flux, batch)
            patch.release()
    assert torch.equal(outs[None][:2], plain[:2]) and torch.equal(outs[False][:2], plain[:2])
    assert rel_err(outs[None][2:], outs[False][2:]) <= 2e-3
    assert rel_err(outs[None][2:], merged) <= 5e-3 and rel_err(outs[None][2:], plain[2:]) > 1e-2
