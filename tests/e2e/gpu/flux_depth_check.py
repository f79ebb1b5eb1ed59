"""How far the Flux fixture's draw lets a prediction grow, on the CPU: Forge's own Flux class at its full 19 double
and 38 single blocks but a narrower width (the full 3072 needs 24 GB), the weights drawn as ``flux_fixture.draw``
draws them, unit-scale conditioning; prints |x0| and how much a kohya-like LoRA on the fixture LoRA's layers (merged
into the weights) moves x0, at two sigmas.

    python flux_depth_check.py --forge FORGE_ROOT [--width 768] [--lora-std 0.3] [--adaln-scale 0.125]

Run with Forge's python (its backend). A quick look before a fixture version goes to the GPU, not a test.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import flux_fixture as ff
import torch

SIGMAS = (1.0, 0.5)


def drawn(model: torch.nn.Module, lora_std: float | None) -> dict[str, torch.Tensor]:
    """The model's weights as the fixture draws them; with ``lora_std``, a rank-4 LoRA merged into its layers."""
    gen = torch.Generator().manual_seed(ff.SEED)
    state = {k: ff.draw(k, v.shape, gen, "cpu") for k, v in model.state_dict().items()}
    if lora_std is not None:
        lora = torch.Generator().manual_seed(ff.SEED + 1)
        for k, w in state.items():
            if k.endswith(tuple(f"{layer}.weight" for layer in ff.LORA_LAYERS)):
                out, inp = w.shape
                up = torch.randn(out, ff.LORA_RANK, generator=lora) * lora_std
                state[k] = w + up @ (torch.randn(ff.LORA_RANK, inp, generator=lora) * inp ** -0.5)
    return state


@torch.no_grad()
def predictions(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[float, torch.Tensor]:
    """x0 = x − σ·v at each sigma, x = σ·noise on a 32 × 32 latent (256 px)."""
    model.load_state_dict(state)
    noise = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(2))
    context = torch.nn.functional.rms_norm(torch.randn(1, 256, 4096, generator=torch.Generator().manual_seed(3)),
                                           (4096,))
    pooled = torch.nn.functional.layer_norm(torch.randn(1, 768, generator=torch.Generator().manual_seed(4)), (768,))
    out = {}
    for sigma in SIGMAS:
        x = sigma * noise
        v = model(x, torch.tensor([sigma]), context, pooled, guidance=torch.tensor([3.5]))
        out[sigma] = x - sigma * v
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--forge", type=Path, required=True)
    p.add_argument("--width", type=int, default=768, help="a multiple of 128 (heads of Flux's width)")
    p.add_argument("--lora-std", type=float, default=ff.LORA_UP_STD)
    p.add_argument("--adaln-scale", type=float, default=ff.MODULATION_SCALE, help="1 draws as version 2 did")
    a = p.parse_args(argv)
    ff.MODULATION_SCALE = a.adaln_scale
    ff.forge_backend(a.forge.resolve())
    from backend.nn.flux import IntegratedFluxTransformer2DModel

    model = IntegratedFluxTransformer2DModel(**{**ff.FLUX_DEV, "hidden_size": a.width,
                                                "num_heads": a.width // 128}).eval()
    plain = predictions(model, drawn(model, None))
    adapted = predictions(model, drawn(model, a.lora_std))
    for sigma in SIGMAS:
        moved = float((adapted[sigma] - plain[sigma]).norm() / plain[sigma].norm())
        print(f"sigma {sigma}: |x0| {float(plain[sigma].abs().max()):.2f}, std {float(plain[sigma].std()):.3f}; "
              f"LoRA (up std {a.lora_std}) moves x0 by {100 * moved:.1f} % of its norm", flush=True)


if __name__ == "__main__":
    main()
