"""The math of each LoRA/LyCORIS module type: one file's change to one weight, as the WebUI computes it.

Each format yields a :class:`Delta` that is either low-rank (``ΔW = up @ down``, applied as two thin products) or
dense (``ΔW`` materialised). LoRA/LoCon (Tucker ``lora_mid`` folded into ``down``), LoHa without Tucker cores
(Khatri-Rao product: rank r1·r2) and LoKr (mixed-product rule: ``kron(U1,U2) @ kron(V1,V2)``) stay low-rank.
IA3, DoRA, OFT/BOFT, full-diff, norm and Tucker LoHa are dense: IA3, DoRA and OFT from the layer's own weight.

Scales follow the WebUI's ``NetworkModule.finalize_updown``: ``scale`` key, else ``alpha / dim`` where the
format has a dim, else 1; applied before DoRA, the multiplier after it (``W + m·(W_dora − W)``). A DoRA scale of
shape (out, 1, …) — LyCORIS ``wd_on_out`` — normalises per output row; (1, in, …) per input column.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

Parts = Mapping[str, torch.Tensor]
# Blocks (first row, row count) of a layer's weight, in the order of a module's own rows: where a module that is part
# of a fused layer sits in it (a diffusers Flux module's q rows of ``qkv``; the swapped halves of an adaLN layer).
Rows = tuple[tuple[int, int], ...]


class ShapeMismatch(Exception):
    """A file tensor does not fit the layer it names; the caller adds the file and key."""


@dataclass
class Delta:
    """``up @ down`` (down shaped ``(R, *W.shape[1:])``) or ``dense`` (``W.shape``), plus a bias change.

    A low-rank change to one block of a fused layer's rows keeps its own height: ``rows`` says which rows ``up``
    adds to (None: all of them); ``dense`` and ``bias`` always cover every row of the layer.
    """

    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    rows: tuple[int, int] | None = None

    @property
    def rank(self) -> int:
        return 0 if self.up is None else self.up.shape[1]

    def materialise(self) -> torch.Tensor | None:
        if self.dense is not None or self.up is None:
            return self.dense
        return (self.up @ self.down.flatten(1)).reshape(self.up.shape[0], *self.down.shape[1:])

    def scaled(self, factor: float) -> Delta:
        return Delta(
            None if self.up is None else self.up * factor,
            self.down,
            None if self.dense is None else self.dense * factor,
            None if self.bias is None else self.bias * factor,
            self.rows,
        )

    def in_rows(self, rows: Rows, height: int) -> Delta:
        """This change of a module, as a change of the ``height``-row layer whose ``rows`` the module is: a low-rank
        change to one block of rows names the block (the op adds into those rows alone); any other is spread over
        the layer's rows, with zeros in the rows that are not the module's."""
        bias = spread_rows(self.bias, rows, height)
        if self.up is not None and len(rows) == 1:
            return Delta(self.up, self.down, None, bias, rows[0])
        return Delta(spread_rows(self.up, rows, height), self.down, spread_rows(self.dense, rows, height), bias)

    def full(self, height: int) -> Delta:
        """The same change with ``up`` over every row of the layer (zeros outside ``rows``)."""
        if self.rows is None:
            return self
        return Delta(spread_rows(self.up, (self.rows,), height), self.down, self.dense, self.bias)


def take_rows(t: torch.Tensor, rows: Rows) -> torch.Tensor:
    """A module's rows of its layer's tensor, in the module's order (a view for one block)."""
    blocks = [t.narrow(0, first, count) for first, count in rows]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks)


def spread_rows(t: torch.Tensor | None, rows: Rows, height: int) -> torch.Tensor | None:
    """A module's rows put where they sit in a ``height``-row tensor of its layer, zeros elsewhere."""
    if t is None:
        return None
    out = t.new_zeros(height, *t.shape[1:])
    at = 0
    for first, count in rows:
        out[first:first + count] = t[at:at + count]
        at += count
    return out


_HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_GLORA = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")


def detect_format(parts: Parts) -> str | None:
    """Module type, tried in the WebUI's order; None when no known type accepts the parts."""
    if "lora_up.weight" in parts and "lora_down.weight" in parts:
        return "lora"
    if all(k in parts for k in _HADA):
        return "loha"
    if "weight" in parts:
        return "ia3"
    has_w1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
    has_w2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
    if has_w1 and has_w2:
        return "lokr"
    if "diff" in parts:
        return "full"
    if "w_norm" in parts:
        return "norm"
    if all(k in parts for k in _GLORA):
        return "glora"
    if "oft_blocks" in parts or "oft_diag" in parts:
        return "oft"
    return None


def format_label(fmt: str, parts: Parts, conv: bool) -> str:
    """Name for reports: LoRA, LoCon, LoHa, LoKr, IA3, OFT, BOFT, full, norm (+DoRA)."""
    name = {"lora": "LoRA", "loha": "LoHa", "lokr": "LoKr", "ia3": "IA3", "full": "full", "norm": "norm",
            "glora": "GLoRA", "oft": "OFT"}[fmt]
    if fmt == "lora" and conv and parts["lora_down.weight"].dim() == 4 and parts["lora_down.weight"].shape[-1] > 1:
        name = "LoCon"
    if fmt == "oft" and "oft_blocks" in parts and parts["oft_blocks"].dim() == 4:
        name = "BOFT"
    return name + ("+DoRA" if "dora_scale" in parts else "")


def build_delta(fmt: str, parts: Parts, weight: torch.Tensor, kind: str) -> Delta:
    """One file's change to ``weight`` (float32, the layer's own), before the user's multiplier."""
    p = {k: v.to(device=weight.device, dtype=torch.float32) if v.is_floating_point() else v for k, v in parts.items()}
    if kind == "norm" and fmt not in ("norm", "full"):
        raise ShapeMismatch(f"a {fmt} module cannot change a normalisation layer")
    if fmt == "lora":
        delta, dim = _lora(p, weight)
    elif fmt == "loha":
        delta, dim = _loha(p, weight)
    elif fmt == "lokr":
        delta, dim = _lokr(p, weight)
    elif fmt == "ia3":
        delta, dim = Delta(dense=_ia3(p, weight)), None
    elif fmt == "full":
        delta, dim = Delta(dense=_fit_dense(p["diff"], weight), bias=_fit_bias(p.get("diff_b"), weight)), None
    elif fmt == "norm":
        delta, dim = Delta(dense=_fit_dense(p["w_norm"], weight), bias=_fit_bias(p.get("b_norm"), weight)), None
    elif fmt == "oft":
        delta, dim = Delta(dense=_oft(p, weight)), None
    else:
        raise ShapeMismatch(f"module type {fmt} is not supported")

    scale = 1.0 if fmt == "oft" else _scale(p, dim)
    if scale != 1.0:  # the WebUI scales the weight change, never the extra bias
        delta = Delta(delta.up * scale if delta.up is not None else None, delta.down,
                      delta.dense * scale if delta.dense is not None else None, delta.bias)
    if "dora_scale" in p:
        delta = Delta(dense=_dora(weight, delta.materialise(), p["dora_scale"]), bias=delta.bias)
    return delta


def _scale(p: Parts, dim: int | None) -> float:
    if "scale" in p:
        return float(p["scale"])
    if dim is not None and "alpha" in p:
        return float(p["alpha"]) / dim
    return 1.0


# --- shape fitting --------------------------------------------------------------------------------------------


def _fit_dense(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    if t.numel() == weight.numel():
        return t.reshape(weight.shape)
    if _inpaint_pad_ok(t, weight) and t.shape[0] == weight.shape[0]:  # SD LoRA on an inpainting conv_in
        return torch.nn.functional.pad(t, (0, 0, 0, 0, 0, weight.shape[1] - t.shape[1]))
    raise ShapeMismatch(f"shape {tuple(t.shape)} does not fit the layer's {tuple(weight.shape)}")


def _fit_down(down: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``down`` as ``(R, *weight.shape[1:])``."""
    fan_in = math.prod(weight.shape[1:])
    if down[0].numel() == fan_in:
        return down.reshape(down.shape[0], *weight.shape[1:])
    if _inpaint_pad_ok(down, weight):
        return torch.nn.functional.pad(down, (0, 0, 0, 0, 0, weight.shape[1] - down.shape[1]))
    raise ShapeMismatch(f"input side {tuple(down.shape)} does not fit the layer's {tuple(weight.shape)}")


def _fit_up(up: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    up = up.reshape(up.shape[0], -1)
    if up.shape[0] != weight.shape[0]:
        raise ShapeMismatch(f"output side {tuple(up.shape)} does not fit the layer's {tuple(weight.shape)}")
    return up


def _fit_bias(b: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor | None:
    if b is None:
        return None
    if b.numel() != weight.shape[0]:
        raise ShapeMismatch(f"bias {tuple(b.shape)} does not fit the layer's {weight.shape[0]} outputs")
    return b.reshape(-1)


def _inpaint_pad_ok(t: torch.Tensor, weight: torch.Tensor) -> bool:
    """An SD1/SD2 conv_in change on a 9-channel inpainting conv_in: the extra input channels stay unchanged."""
    return t.dim() == 4 and weight.dim() == 4 and t.shape[2:] == weight.shape[2:] and t.shape[1] < weight.shape[1]


def _low_rank(up: torch.Tensor, down: torch.Tensor, weight: torch.Tensor) -> Delta:
    up, down = _fit_up(up, weight), _fit_down(down, weight)
    if up.shape[1] != down.shape[0]:
        raise ShapeMismatch(f"up {tuple(up.shape)} and down {tuple(down.shape)} ranks differ")
    return Delta(up=up, down=down)


# --- formats --------------------------------------------------------------------------------------------------


def _lora(p: Parts, weight: torch.Tensor) -> tuple[Delta, int]:
    up, down, mid = p["lora_up.weight"], p["lora_down.weight"], p.get("lora_mid.weight")
    dim = down.shape[0]
    if mid is not None:  # Tucker: 1×1 down, k×k core, 1×1 up; the core folds into a k×k down of rank r_mid
        down = torch.einsum("nmkl,mj->njkl", mid, down.reshape(dim, -1))
    return _low_rank(up, down, weight), dim


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """Tucker rebuild of LyCORIS (``make_weight_cp``): (wa.shape[1], wb.shape[1], kh, kw)."""
    return torch.einsum("ijkl,jr,ip->prkl", t, wb, wa)


def _loha(p: Parts, weight: torch.Tensor) -> tuple[Delta, int]:
    w1a, w1b, w2a, w2b = (p[k] for k in _HADA)
    dim = w1b.shape[0]
    if "hada_t1" in p or "hada_t2" in p:
        m1 = _cp(p["hada_t1"], w1a, w1b) if "hada_t1" in p else w1a @ w1b.flatten(1)
        m2 = _cp(p["hada_t2"], w2a, w2b) if "hada_t2" in p else w2a @ w2b.flatten(1)
        if m1.numel() != m2.numel():
            raise ShapeMismatch(f"LoHa halves {tuple(m1.shape)} and {tuple(m2.shape)} differ")
        return Delta(dense=_fit_dense(m1.reshape(-1) * m2.reshape(-1), weight)), dim
    # (A1 B1) ∘ (A2 B2) = (A1 ⊙row A2) @ (B1 ⊙col B2): a rank r1·r2 product of thin factors
    up = (w1a[:, :, None] * w2a[:, None, :]).flatten(1)
    b1, b2 = _fit_down(w1b, weight), _fit_down(w2b, weight)
    down = (b1[:, None] * b2[None, :]).flatten(0, 1)
    return _low_rank(up, down, weight), dim


def _lokr(p: Parts, weight: torch.Tensor) -> tuple[Delta, int | None]:
    dim = None
    if "lokr_w1" in p:
        u1, v1 = _split_full(p["lokr_w1"].flatten(1))
    else:
        u1, v1 = p["lokr_w1_a"], p["lokr_w1_b"].flatten(1)
        dim = p["lokr_w1_b"].shape[0]
    if "lokr_w2" in p:
        u2, v2 = _split_full(p["lokr_w2"].flatten(1))
    elif "lokr_t2" in p:
        w2 = _cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"]).flatten(1)
        u2, v2 = _split_full(w2)
        dim = p["lokr_w2_b"].shape[0]
    else:
        u2, v2 = p["lokr_w2_a"], p["lokr_w2_b"].flatten(1)
        dim = p["lokr_w2_b"].shape[0]
    # kron(U1 V1, U2 V2) = kron(U1, U2) @ kron(V1, V2): an exact low-rank form
    down = torch.kron(v1.contiguous(), v2.contiguous())
    return _low_rank(torch.kron(u1.contiguous(), u2.contiguous()), down.reshape(down.shape[0], -1), weight), dim


def _split_full(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A full Kronecker factor as ``w @ I`` or ``I @ w``, whichever has the smaller inner size."""
    o, i = w.shape
    if i <= o:
        return w, torch.eye(i, device=w.device, dtype=w.dtype)
    return torch.eye(o, device=w.device, dtype=w.dtype), w


def _ia3(p: Parts, weight: torch.Tensor) -> torch.Tensor:
    w = p["weight"].reshape(-1)
    axis = 1 if bool(p.get("on_input", torch.tensor(False)).item()) else 0
    if w.numel() != weight.shape[axis]:
        raise ShapeMismatch(f"IA3 vector of {w.numel()} does not fit the layer's {tuple(weight.shape)}")
    shape = [1] * weight.dim()
    shape[axis] = -1
    return weight * w.reshape(shape)


def _oft(p: Parts, weight: torch.Tensor) -> torch.Tensor:
    out_dim = weight.shape[0]
    if "oft_blocks" in p:
        blocks = p["oft_blocks"]
        q = blocks - blocks.transpose(-1, -2)  # skew-symmetric, so the Cayley transform is orthogonal
        constraint = float(p["alpha"]) * out_dim if "alpha" in p else 0.0
        if constraint != 0:
            norm = torch.linalg.norm(q.flatten())
            q = q * ((torch.clamp(norm, max=constraint) + 1e-8) / (norm + 1e-8))
        eye = torch.eye(q.shape[-1], device=q.device, dtype=q.dtype)
        r = (eye + q) @ torch.linalg.inv(eye - q)
    else:
        r = p["oft_diag"]  # older LyCORIS files store R itself
    rest = weight.shape[1:]
    if r.dim() == 3:
        n, b = r.shape[0], r.shape[-1]
        if "oft_diag" in p:
            n = out_dim // b
        if n * b != out_dim or r.shape[0] != n:
            raise ShapeMismatch(f"OFT blocks {tuple(r.shape)} do not fit the layer's {out_dim} outputs")
        merged = torch.einsum("knm,kn...->km...", r, weight.reshape(n, b, *rest)).reshape(weight.shape)
    elif r.dim() == 4:
        merged = _boft(r, weight)
    else:
        raise ShapeMismatch(f"OFT blocks of shape {tuple(r.shape)} are not understood")
    if "rescale" in p:
        merged = p["rescale"].reshape(-1, *[1] * (weight.dim() - 1)) * merged
    return merged - weight


def _boft(r: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Butterfly OFT: m stages of block rotations between fixed permutations of the output rows."""
    m, n, b = r.shape[0], r.shape[1], r.shape[2]
    out_dim, rest = weight.shape[0], weight.shape[1:]
    if n * b != out_dim or b % 2 or any(out_dim % (2**i * b) for i in range(m)):
        raise ShapeMismatch(f"BOFT blocks {tuple(r.shape)} do not fit the layer's {out_dim} outputs")
    x = weight
    for i in range(m):
        k = 2**i * (b // 2)
        x = x.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(-1, b, *rest)
        x = torch.einsum("bij,bj...->bi...", r[i], x)
        x = x.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(out_dim, *rest)
    return x


def _dora(weight: torch.Tensor, change: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    merged = weight + change
    on_out = dora_scale.shape[0] == weight.shape[0] and dora_scale.numel() == weight.shape[0] and weight.shape[0] > 1
    if on_out:
        norm = merged.flatten(1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (weight.dim() - 2))
    if dora_scale.numel() != norm.numel():
        raise ShapeMismatch(f"DoRA scale {tuple(dora_scale.shape)} does not fit the layer's {tuple(weight.shape)}")
    return merged * (dora_scale.reshape(norm.shape) / norm) - weight
