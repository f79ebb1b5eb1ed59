"""GPU timing: one source UNet call on [base rows | adapted rows] with the functional LoRA, against plain weights.

Run by hand on a CUDA machine from the repository root: ``python tests/lora/bench_functional_lora.py``. Builds the
full-size UNet of the family with random weights in float16, writes kohya-style LoRAs, and prints milliseconds per
call for: the plain model on the whole batch (the floor), the patched model with its plan, and the two-copies
alternative (plain model on the base rows + a merged copy on the adapted rows).
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from devkit.families import fill_zero_tensors
from devkit.ldm_unet import build_unet
from lib_delta.lora import LoraFile, LoraUse, build_patch


def _targets(unet: nn.Module, convs: bool) -> list[tuple[str, nn.Module]]:
    """kohya's default LoRA targets (transformer blocks, proj_in/out); LoCon adds the ResBlock and sampler convs."""
    found = []
    for name, m in unet.named_modules():
        in_transformer = ".transformer_blocks." in name or name.endswith(("proj_in", "proj_out"))
        if isinstance(m, (nn.Linear, nn.Conv2d)) and in_transformer:
            found.append((name, m))
        elif convs and isinstance(m, nn.Conv2d) and not in_transformer and name.count(".") >= 2:
            found.append((name, m))
    return found


def make_lora(unet: nn.Module, kind: str, rank: int, seed: int = 0) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, m in _targets(unet, convs=kind == "locon"):
        stem = "lora_unet_" + name.replace(".", "_")
        w = m.weight
        fan_in = w[0].numel()
        if kind == "loha":
            tensors[f"{stem}.hada_w1_a"] = torch.randn(w.shape[0], rank, generator=g) * 0.03
            tensors[f"{stem}.hada_w1_b"] = torch.randn(rank, fan_in, generator=g) * fan_in**-0.5
            tensors[f"{stem}.hada_w2_a"] = torch.randn(w.shape[0], rank, generator=g) * 0.03
            tensors[f"{stem}.hada_w2_b"] = torch.randn(rank, fan_in, generator=g) * fan_in**-0.5
        else:
            down_shape = (rank, *w.shape[1:]) if w.dim() == 4 else (rank, fan_in)
            tensors[f"{stem}.lora_down.weight"] = torch.randn(*down_shape, generator=g) * fan_in**-0.5
            tensors[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], rank, *[1] * (w.dim() - 2), generator=g) * 0.01
            if kind == "dora":
                norm = w.float().transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
                tensors[f"{stem}.dora_scale"] = norm.cpu() * 1.05
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    return LoraFile.from_tensors(f"bench_{kind}.safetensors", tensors)


def timed(fn, iters: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def bench_rows(unet: nn.Module, merged: nn.Module, patch, n: int, size: int, iters: int, reps: int = 5) -> str:
    cfg = unet.config

    def twice(*shape: int) -> torch.Tensor:  # base and adapted rows see the same latent and conditioning
        half = torch.randn(n, *shape, device="cuda", dtype=torch.half)
        return torch.cat([half, half])

    x, ctx = twice(cfg.in_channels, size, size), twice(77, cfg.context_dim)
    t = torch.full((2 * n,), 500.0, device="cuda")
    y = twice(cfg.adm_in_channels) if cfg.adm_in_channels else None

    def call(model, rows=slice(None)):
        return model(x[rows], t[rows], context=ctx[rows], y=None if y is None else y[rows])

    base, adapted = slice(0, n), slice(n, 2 * n)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):  # as the WebUI samples
        plain, dual, two_copies = [], [], []
        for _ in range(reps):  # interleaved, best of: this machine's timings drift
            plain.append(timed(lambda: call(unet), iters))
            two_copies.append(timed(lambda: (call(unet, base), call(merged, adapted)), iters))
            with patch, patch.rows([(base, None), (adapted, 0)]):
                dual.append(timed(lambda: call(unet), iters))
        plain, dual, two_copies = min(plain), min(dual), min(two_copies)
        with patch, patch.rows([(base, None), (adapted, 0)]):
            out = call(unet)
        ref = call(merged, adapted)
        err = float((out[n:].float() - ref.float()).norm() / ref.float().norm())
        moved = float((out[:n].float() - ref.float()).norm() / ref.float().norm())
    return (f"{2 * n} rows: plain {plain:.2f} ms, functional {dual:.2f} ms ({100 * (dual / plain - 1):+.1f}%), "
            f"two copies {two_copies:.2f} ms; adapted rows vs merged {err:.1e} (LoRA moves them {moved:.1e})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="sd1", choices=["sd1", "sd2", "sdxl"])
    ap.add_argument("--rows", type=int, nargs="+", default=[2, 4])  # base rows (= adapted rows) per call
    ap.add_argument("--size", type=int, default=64)  # latent side
    ap.add_argument("--kinds", nargs="+", default=["lora", "locon", "loha", "dora"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--dense", action="store_true", help="build_patch(dense=True): one kernel per layer")
    args = ap.parse_args()

    torch.manual_seed(0)
    unet = build_unet(args.family, "full", device="cuda")
    fill_zero_tensors(unet, torch.Generator("cuda").manual_seed(1))  # zero-initialised outputs would hide the LoRA
    unet = unet.half().eval().requires_grad_(False)
    print(f"{args.family} UNet, {sum(p.numel() for p in unet.parameters()) / 1e9:.2f} B params, "
          f"{torch.cuda.get_device_name()}, latent {args.size}², LoRA rank {args.rank}")
    for kind in args.kinds:
        lora = make_lora(unet, kind, args.rank)
        merged = copy.deepcopy(unet)
        build_patch({"unet": merged}, args.family, [[LoraUse(lora)]]).merge_into(0)
        patch = build_patch({"unet": unet}, args.family, [[LoraUse(lora)]], dense=args.dense)
        print(f"  {kind}: {len(patch.modules)} layers, {patch.nbytes() / 2**20:.0f} MiB of LoRA terms")
        for n in args.rows:
            print("    " + bench_rows(unet, merged, patch, n, args.size, args.iters))
        del merged
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
