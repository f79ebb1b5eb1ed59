"""Test helpers: LoRA files written in each real format, and an independent merged reference.

The reference computes each merged weight straight from the WebUI's formulas (dense ``updown``, block-diagonal
OFT rotations, explicit BOFT permutations), never through ``lib_delta.lora``, so equality with the functional
path checks the key map, the format math and the application all at once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn

from devkit.families import tiny_sd1, tiny_sd2v, tiny_sdxl
from devkit.flux import Flux, IntegratedT5

GEN_SEED = 1234


def family(name: str):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2v, "sdxl": tiny_sdxl}[name](seed=3)


def roots(fam) -> dict[str, nn.Module]:
    if fam.name == "sdxl":
        return {"unet": fam.unet, "te1": fam.text_encoders[0], "te2": fam.text_encoders[1]}
    return {"unet": fam.unet, "te": fam.text_encoders[0]}


def unet_inputs(fam, batch: int, seed: int = 0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.full((batch,), 500.0)
    ctx_dim = fam.unet.config.context_dim
    ctx = torch.randn(batch, 6, ctx_dim, generator=g)
    y = None
    if fam.unet.config.adm_in_channels:
        y = torch.randn(batch, fam.unet.config.adm_in_channels, generator=g)
    return x, t, ctx, y


def run_unet(unet: nn.Module, inputs: tuple) -> torch.Tensor:
    x, t, ctx, y = inputs
    with torch.no_grad():
        return unet(x, t, context=ctx, y=y)


def flux_roots(seed: int = 5) -> dict[str, nn.Module]:
    """A tiny Flux source as Forge builds it: the transformer, CLIP-L and T5-XXL."""
    torch.manual_seed(seed)
    return {"unet": Flux().eval(), "te1": family("sd1").text_encoders[0], "t5": IntegratedT5().eval()}


def flux_inputs(batch: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 16, 16, generator=g), torch.randn(batch, 5, 24, generator=g),
            torch.full((batch,), 700.0), torch.randn(batch, 16, generator=g), torch.full((batch,), 3.5))


def run_flux(flux: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        return flux(*inputs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# --- random factors per format --------------------------------------------------------------------------------


def rand(g: torch.Generator, *shape: int, std: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * std


def lora_parts(g, w: torch.Tensor, rank: int = 4, alpha: float | None = 2.0, conv_full: bool = True,
               tucker: bool = False) -> dict[str, torch.Tensor]:
    out, fan_in = w.shape[0], w[0].numel()
    p = {}
    if w.dim() == 4:
        cin, k = w.shape[1], w.shape[2:]
        if tucker:
            p["lora_down.weight"] = rand(g, rank, cin, 1, 1, std=cin**-0.5)
            p["lora_mid.weight"] = rand(g, rank, rank, *k, std=(rank * k[0] * k[1]) ** -0.5)
        else:
            shape = (rank, cin, *k) if conv_full else (rank, cin, 1, 1)
            p["lora_down.weight"] = rand(g, *shape, std=fan_in**-0.5)
        p["lora_up.weight"] = rand(g, out, rank, 1, 1, std=0.3 / rank**0.5)
    else:
        p["lora_down.weight"] = rand(g, rank, fan_in, std=fan_in**-0.5)
        p["lora_up.weight"] = rand(g, out, rank, std=0.3 / rank**0.5)
    if alpha is not None:
        p["alpha"] = torch.tensor(alpha)
    return p


def loha_parts(g, w, rank: int = 3, tucker: bool = False) -> dict[str, torch.Tensor]:
    out, fan_in = w.shape[0], w[0].numel()
    p = {"alpha": torch.tensor(float(rank))}
    for i in (1, 2):
        if tucker:
            p[f"hada_t{i}"] = rand(g, rank, rank, *w.shape[2:], std=0.5)
            p[f"hada_w{i}_a"] = rand(g, rank, out, std=0.5)
            p[f"hada_w{i}_b"] = rand(g, rank, w.shape[1], std=0.5 * w.shape[1] ** -0.5)
        else:
            p[f"hada_w{i}_a"] = rand(g, out, rank, std=0.5)
            p[f"hada_w{i}_b"] = rand(g, rank, fan_in, std=0.5 * fan_in**-0.25)  # LyCORIS flattens conv kernels
    return p


def lokr_parts(g, w, factor: int = 4, w1_low: bool = False, w2_low: bool = True, t2: bool = False,
               rank: int = 2) -> dict[str, torch.Tensor]:
    out, cin = w.shape[0], w.shape[1]
    o1, i1 = factor, factor
    o2, i2 = out // o1, cin // i1
    k = w.shape[2:]
    p = {"alpha": torch.tensor(1.0)}
    if w1_low:
        p["lokr_w1_a"], p["lokr_w1_b"] = rand(g, o1, rank, std=0.5), rand(g, rank, i1, std=0.5)
    else:
        p["lokr_w1"] = rand(g, o1, i1, std=0.5)
    if t2:
        p["lokr_t2"] = rand(g, rank, rank, *k, std=0.5)
        p["lokr_w2_a"], p["lokr_w2_b"] = rand(g, rank, o2, std=0.3), rand(g, rank, i2, std=0.3 * i2**-0.5)
    elif w2_low:
        p["lokr_w2_a"] = rand(g, o2, rank, std=0.3)
        p["lokr_w2_b"] = rand(g, rank, i2 * (k.numel() if k else 1), std=0.3 * (i2 * (k.numel() or 1)) ** -0.5)
    else:
        p["lokr_w2"] = rand(g, o2, i2, *k, std=0.1 * (i2 * (k.numel() or 1)) ** -0.5)
    return p


def ia3_parts(g, w, on_input: bool = False) -> dict[str, torch.Tensor]:
    n = w.shape[1] if on_input else w.shape[0]
    return {"weight": rand(g, n, std=0.3), "on_input": torch.tensor(on_input)}


def full_parts(g, w, bias: bool = True) -> dict[str, torch.Tensor]:
    p = {"diff": rand(g, *w.shape, std=0.3 * w.float().std().item())}
    if bias:
        p["diff_b"] = rand(g, w.shape[0], std=0.1)
    return p


def norm_parts(g, w) -> dict[str, torch.Tensor]:
    return {"w_norm": rand(g, *w.shape, std=0.3), "b_norm": rand(g, *w.shape, std=0.1)}


def oft_parts(g, w, blocks: int = 4, alpha: float | None = None, diag: bool = False, boft: int = 0,
              rescale: bool = False) -> dict[str, torch.Tensor]:
    out = w.shape[0]
    if boft:
        b = out // blocks
        p = {"oft_blocks": rand(g, boft, blocks, b, b, std=0.2)}
    elif diag:
        b = out // blocks
        q = rand(g, blocks, b, b, std=0.2)
        q = q - q.transpose(1, 2)
        eye = torch.eye(b)
        p = {"oft_diag": (eye + q) @ torch.linalg.inv(eye - q)}
    else:
        b = out // blocks
        p = {"oft_blocks": rand(g, blocks, b, b, std=0.2)}
    if alpha is not None:
        p["alpha"] = torch.tensor(alpha)
    if rescale:
        p["rescale"] = 1 + rand(g, out, *[1] * (w.dim() - 1), std=0.1)
    return p


def with_dora(parts: dict, w: torch.Tensor, g, on_out: bool = False) -> dict:
    """DoRA magnitude: the layer's column (or row) norms, perturbed so it changes the result."""
    w = w.float()
    if on_out:
        norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
    else:
        norm = w.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
    return {**parts, "dora_scale": norm * (1 + rand(g, *norm.shape, std=0.2))}


# --- the reference: the WebUI's ``calc_updown`` written out densely -----------------------------------------


def ref_updown(parts: dict, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ΔW after scale and DoRA, extra bias), before the multiplier."""
    peft = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
    p = {peft.get(k, k): v.double() if v.is_floating_point() else v for k, v in parts.items()}
    w = w.double()
    dim, bias = None, None
    if "lora_up.weight" in p:
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        up2, down2 = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)
        if "lora_mid.weight" in p:
            upd = torch.einsum("nmkl,in,mj->ijkl", p["lora_mid.weight"], up2, down2)
        else:
            upd = up2 @ down2
        dim = down.shape[0]
    elif "hada_w1_a" in p:
        def half(i):
            a, b = p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]
            if f"hada_t{i}" in p:
                return torch.einsum("ijkl,ip,jr->prkl", p[f"hada_t{i}"], a, b).reshape(-1)
            return (a @ b.reshape(b.shape[0], -1)).reshape(-1)
        upd = half(1) * half(2)
        dim = p["hada_w1_b"].shape[0]
    elif "weight" in p:
        vec = p["weight"]
        upd = w * (vec.reshape(1, -1, *[1] * (w.dim() - 2)) if bool(p["on_input"]) else
                   vec.reshape(-1, *[1] * (w.dim() - 1)))
    elif any(k.startswith("lokr") for k in p):
        w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = torch.einsum("ijkl,ip,jr->prkl", p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        upd = torch.kron(w1.contiguous(), w2.contiguous())
        dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else (p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None)
    elif "diff" in p:
        upd, bias = p["diff"], p.get("diff_b")
    elif "w_norm" in p:
        upd, bias = p["w_norm"], p.get("b_norm")
    else:
        upd = _ref_oft(p, w) - w
    upd = upd.reshape(w.shape)
    if dim is not None and "alpha" in p and not any(k.startswith("oft") for k in p):
        upd = upd * float(p["alpha"]) / dim
    if "dora_scale" in p:
        ds = p["dora_scale"]
        merged = w + upd
        if ds.shape[0] == w.shape[0] and ds.numel() == w.shape[0]:
            norm = merged.reshape(w.shape[0], -1).norm(dim=1).reshape(ds.shape)
        else:
            norm = merged.transpose(0, 1).reshape(w.shape[1], -1).norm(dim=1).reshape(ds.shape)
        upd = merged * (ds / norm) - w
    return upd, bias


def _cayley(blocks: torch.Tensor, constraint: float) -> torch.Tensor:
    q = blocks - blocks.transpose(-1, -2)
    if constraint:
        n = q.norm()
        q = q * ((min(n, constraint) + 1e-8) / (n + 1e-8))
    eye = torch.eye(q.shape[-1], dtype=q.dtype)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _ref_oft(p: dict, w: torch.Tensor) -> torch.Tensor:
    out = w.shape[0]
    flat = w.reshape(out, -1)
    if "oft_diag" in p:
        r = p["oft_diag"]
    else:
        r = _cayley(p["oft_blocks"], float(p["alpha"]) * out if "alpha" in p else 0.0)
    if r.dim() == 3:  # block-diagonal rotation, each block applied transposed (the WebUI's einsum "knm,kn->km")
        merged = torch.block_diag(*[blk.T for blk in r]) @ flat
    else:  # BOFT: permute rows, rotate blocks, permute back; one stage per leading index
        x = flat
        b = r.shape[-1]
        for i in range(r.shape[0]):
            k = 2**i * (b // 2)
            perm = torch.arange(out).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
            x = _apply_perm_rot(x, perm, torch.block_diag(*r[i]))
        merged = x
    if "rescale" in p:
        merged = p["rescale"].reshape(-1, 1) * merged
    return merged.reshape(w.shape)


def _apply_perm_rot(x: torch.Tensor, perm: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rows reordered by ``perm``, rotated block-wise, then put back where they came from."""
    y = rot @ x[perm]
    back = torch.empty_like(y)
    back[perm] = y
    return back


# --- files and merged models ----------------------------------------------------------------------------------


@dataclass
class Change:
    """One LoRA module: which layer (canonical path in its root), file key stem, format parts, and slot."""

    root: str  # "unet", "te", "te1", "te2"
    path: str  # e.g. "input_blocks.1.1.transformer_blocks.0.attn1.to_q" or "transformer.resblocks.0.attn"
    key: str  # file key without the part, e.g. "lora_unet_input_blocks_1_1_..." or "unet.down_blocks.0..."
    parts: dict[str, torch.Tensor]
    slot: int | str | None = None  # MultiheadAttention projection
    separator: str = "."  # between key and part


def layer_weight(root: nn.Module, path: str, slot=None) -> torch.Tensor:
    m = root.get_submodule(path)
    if slot is None:
        return m.weight.detach()
    if slot == "out":
        return m.out_proj.weight.detach()
    e = m.embed_dim
    return m.in_proj_weight.detach()[slot * e: (slot + 1) * e]


def write_file(tmp_path, name: str, changes: list[Change], extra: dict | None = None,
               metadata: dict | None = None) -> str:
    tensors = {}
    for c in changes:
        for part, t in c.parts.items():
            tensors[f"{c.key}{c.separator}{part}"] = t.contiguous()
    tensors.update(extra or {})
    path = str(tmp_path / name)
    save_file(tensors, path, metadata=metadata)
    return path


@torch.no_grad()
def merge_reference(roots_: dict[str, nn.Module], changes: list[Change], te: float = 1.0,
                    unet: float | None = None) -> dict[str, nn.Module]:
    """Deep copies of the roots with every change merged into the weights, by the reference math."""
    unet = te if unet is None else unet
    merged = {k: copy.deepcopy(v) for k, v in roots_.items()}
    for c in changes:
        root = merged[c.root]
        mult = unet if c.root == "unet" else te
        m = root.get_submodule(c.path)
        if c.slot is None:
            w, b_owner = m.weight, m
        elif c.slot == "out":
            w, b_owner = m.out_proj.weight, m.out_proj
        else:
            e = m.embed_dim
            w, b_owner = m.in_proj_weight[c.slot * e: (c.slot + 1) * e], None
        upd, bias = ref_updown(c.parts, w.detach())
        w += (mult * upd).to(w.dtype)
        if bias is not None:
            if b_owner is None:  # q/k/v: a slice of in_proj_bias
                b = m.in_proj_bias[c.slot * e: (c.slot + 1) * e]
            else:
                if b_owner.bias is None:
                    b_owner.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype), requires_grad=False)
                b = b_owner.bias
            b += (mult * bias).to(w.dtype)
    return merged


def unet_key(path: str, prefix: str = "lora_unet_") -> str:
    return prefix + path.replace(".", "_")
