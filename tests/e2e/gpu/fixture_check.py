"""Run a random-weight fixture once through Forge's own engine, in-process, and say whether it makes an image.

A random model can predict values far outside a latent's range while every step stays finite; the VAE then decodes
NaN and every image is the same flat colour, which makes any comparison between two generations vacuous. This loads
the fixture as Forge does (``forge_loader`` with the modules chosen beside it), encodes a prompt with its own text
encoders, runs the diffusion model at the start and the middle of the schedule with a hook on every block, and
decodes the prediction: the report names where the values grow.

    python fixture_check.py --forge FORGE_ROOT --dir FIXTURE_DIR [--device cuda] [--px 512] [--out REPORT.json]

Run with Forge's python (its backend). Prints one JSON report (and writes it to --out); exits 1 when the prediction
is out of range, not finite, or decodes to NaN or one colour.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

PROMPT = "a photo of a cat sitting on a red chair"
IN_RANGE = 1e3  # |x0| of a latent; the VAEs decode NaN long before their activations overflow
BLOCK_LISTS = ("double_blocks", "single_blocks", "input_blocks", "middle_block", "output_blocks")


def forge_backend(root: Path, device: str) -> None:
    """Forge's backend importable (flux_fixture.forge_backend), and the one WebUI setting its text engines read."""
    from types import SimpleNamespace

    from flux_fixture import forge_backend as importable

    importable(root, device)
    from modules import shared

    shared.opts = SimpleNamespace(emphasis="Original")  # the WebUI's default


def absmax(value: Any) -> float:
    t = value[0] if isinstance(value, tuple) else value
    return float(t.detach().float().abs().max()) if isinstance(t, torch.Tensor) else float("nan")


def block_maxima(model: torch.nn.Module) -> tuple[dict[str, float], list]:
    """A forward hook on every block of the model's block lists and on each of its other direct children (the
    embedders, the final layer), recording each output's largest value; a block that returns two streams (Flux's
    double blocks: image, text) gets one entry per stream."""
    seen: dict[str, float] = {}
    handles = []

    def watch(module: torch.nn.Module, key: str) -> None:
        def hook(_m, _i, out):
            outs = out if isinstance(out, tuple) else (out,)
            for j, t in enumerate(o for o in outs if isinstance(o, torch.Tensor)):
                name = key if j == 0 else f"{key}.{j}"
                seen[name] = max(seen.get(name, 0.0), absmax(t))
        handles.append(module.register_forward_hook(hook))

    for name, child in model.named_children():
        if name in BLOCK_LISTS:
            for i, block in enumerate(child):
                watch(block, f"{name}.{i}")
        elif not isinstance(child, torch.nn.ModuleList):
            watch(child, name)
    return seen, handles


def model_inputs(cond: Any) -> dict[str, Any]:
    """KModel.apply_model's keyword arguments from what the engine's conditioning returned."""
    if isinstance(cond, dict):  # Flux: crossattn, vector, guidance
        extra = {"y": cond["vector"]} if "vector" in cond else {}
        if "guidance" in cond:
            extra["guidance"] = cond["guidance"]
        return {"c_crossattn": cond["crossattn"], **extra}
    return {"c_crossattn": cond}


@torch.inference_mode()
def check(directory: Path, device: str, px: int) -> dict:
    from backend import memory_management
    from backend.loader import forge_loader

    manifest = json.loads((directory / "manifest.json").read_text())
    modules = [str(directory / name) for name in manifest.get("modules", {})]
    engine = forge_loader(str(directory / manifest["files"]["checkpoint"]), additional_state_dicts=modules)
    cond = engine.get_learned_conditioning([PROMPT])
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model_inputs(cond).items()}
    report: dict[str, Any] = {"conditioning": {k: absmax(v) for k, v in inputs.items()}, "sigmas": {}}

    unet = engine.forge_objects.unet
    memory_management.load_models_gpu([unet])
    kmodel = unet.model
    predictor = kmodel.predictor
    channels = engine.forge_objects.vae.latent_channels
    gen = torch.Generator(device).manual_seed(0)
    noise = torch.randn(1, channels, px // 8, px // 8, generator=gen, device=device)
    ok = True
    for sigma in (float(predictor.sigma_max), float(predictor.percent_to_sigma(0.5))):
        s = torch.tensor([sigma], device=device)
        x = predictor.noise_scaling(s, noise, torch.zeros_like(noise))
        seen, handles = block_maxima(kmodel.diffusion_model)
        try:
            x0 = kmodel.apply_model(x, s, **inputs)
        finally:
            for h in handles:
                h.remove()
        image = engine.decode_first_stage(x0).float()
        row = {"x0_absmax": absmax(x0), "x0_finite": bool(torch.isfinite(x0).all()),
               "image_nan": int(torch.isnan(image).sum()), "image_std": float(torch.nan_to_num(image).std()),
               "blocks": {k: round(v, 2) for k, v in seen.items()}}
        report["sigmas"][f"{sigma:.4g}"] = row
        ok &= row["x0_finite"] and row["x0_absmax"] < IN_RANGE and row["image_nan"] == 0 and row["image_std"] > 1e-3
    report["ok"] = ok
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--forge", type=Path, required=True)
    p.add_argument("--dir", type=Path, required=True, help="a fixture folder with its manifest.json")
    p.add_argument("--device", default="cuda")
    p.add_argument("--px", type=int, default=512)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    out = a.out.resolve() if a.out else None
    directory = a.dir.resolve()
    forge_backend(a.forge.resolve(), a.device)
    report = check(directory, a.device, a.px)
    print(json.dumps(report, indent=1), flush=True)
    if out:
        out.write_text(json.dumps(report, indent=1))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    main()
