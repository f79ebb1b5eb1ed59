"""A full-size random-weight Flux.1-dev as Forge 2 loads it, in the layout Flux users keep: the diffusion model alone
(for models/Stable-diffusion), its VAE (models/VAE), CLIP-L and T5-XXL (models/text_encoder), and a rank-4 kohya
LoRA over the attention and first MLP layers of every block, and a second one that also changes CLIP-L's and
T5-XXL's attention (kohya's ``lora_te1_`` and ``lora_te3_``). Forge sizes every Flux at 19 double and 38 single
blocks of width 3072 whatever the file holds (huggingface_guess/detection.py, the Flux branch), so nothing smaller
loads: 11.9 B + 4.8 B parameters, 34 GB on disk. The names and shapes come from Forge's own classes on the meta
device, so the files are what its loader reads; the values are drawn on the GPU, block by block.

    python flux_fixture.py --forge FORGE_ROOT --out DIR [--device cuda] [--reduced]

Run with Forge's python (its backend and transformers); writes DIR/manifest.json last, so a cut build is rebuilt.
``--reduced`` draws the smaller Flux that a Forge copy made by reduced_flux.py loads (give that copy as FORGE_ROOT:
T5's layer count comes from its config), for the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from reduced_flux import REDUCED

VERSION = 3
SEED = 1206
# huggingface_guess/detection.py, the Flux branch with guidance_in: Flux.1-dev, the layout Forge builds
FLUX_DEV = dict(in_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072, mlp_ratio=4.0, num_heads=24,
                depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56], theta=10000, qkv_bias=True,
                guidance_embed=True)
REPO = "backend/huggingface/black-forest-labs/FLUX.1-dev"
FILES = {"checkpoint": "delta_e2e_flux_dit.safetensors", "vae": "delta_e2e_flux_ae.safetensors",
         "clip_l": "delta_e2e_flux_clip_l.safetensors", "t5xxl": "delta_e2e_flux_t5xxl_fp16.safetensors"}
FOLDERS = {"checkpoint": "Stable-diffusion", "vae": "VAE", "clip_l": "text_encoder", "t5xxl": "text_encoder"}
DTYPES = {"checkpoint": torch.bfloat16, "vae": torch.float32, "clip_l": torch.float16, "t5xxl": torch.float16}
LORA = "delta_e2e_flux_lora"
LORA_TE = "delta_e2e_flux_lora_te"  # the same layers of the DiT, and the text encoders' q and v projections
LORA_RANK = 4
# each adapted layer changes by about 0.6 of its output (√4 · 0.3 against 1 from the base weight): the small gates pass
# on an eighth of what a block adds, and a prediction the LoRA moves by less would decode to nearly the same image
LORA_UP_STD = 0.3
LORA_UP_STD_REDUCED = 0.6  # the reduced Flux's LoRA spans 12 blocks, not 57: each layer changes twice as much
LORA_LAYERS = ("img_attn.qkv", "txt_attn.qkv", "linear1")  # of each double block (the two) and single block
TE_LAYERS = {"clip_l": ("lora_te1_", ("self_attn.q_proj", "self_attn.v_proj")),
             "t5xxl": ("lora_te3_", ("SelfAttention.q", "SelfAttention.v"))}


def forge_backend(root: Path, device: str = "cpu") -> None:
    """Make Forge's backend importable from ``root``, with the flags it reads on import; its configs are read
    relative to its root."""
    sys.argv = [*sys.argv[:1], *(["--always-cpu"] if device == "cpu" else [])]
    for p in (root, root / "packages_3rdparty", root / "repositories" / "huggingface_guess"):
        sys.path.insert(0, str(p))
    os.chdir(root)


def forge_layouts(root: Path, dit_config: dict) -> dict[str, dict[str, torch.Size]]:
    """Each file's tensor names and shapes, from Forge's classes built on the meta device (no memory)."""
    forge_backend(root)
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from backend.utils import read_arbitrary_config
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        dit = IntegratedFluxTransformer2DModel(**dit_config)
        t5 = IntegratedT5(read_arbitrary_config(f"{REPO}/text_encoder_2"))
        clip = IntegratedCLIP(CLIPTextModel, CLIPTextConfig.from_pretrained(f"{REPO}/text_encoder"))
        vae = IntegratedAutoencoderKL.from_config(IntegratedAutoencoderKL.load_config(f"{REPO}/vae"))

    def bare(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Size]:
        # the layout of a file of Forge's VAE / Text Encoder box: T5 and CLIP without their wrapper's prefix
        # (backend/loader.py replace_state_dict), no logit scale or position ids
        return {k[len(prefix):]: v.shape for k, v in module.state_dict().items()
                if k.startswith(prefix) and not k.endswith(("logit_scale", "position_ids", "text_projection.weight"))}

    return {"checkpoint": bare(dit), "vae": bare(vae), "clip_l": bare(clip, "transformer."),
            "t5xxl": bare(t5, "transformer.")}


# The adaLN layers that make each block's shift, scale and gate (and the final layer's): a trained Flux starts them
# at zero (adaLN-Zero) and keeps them small, so each block adds a little to the residual stream; at N(0, 1/fan_in)
# every gate would be of order one. (Either draw keeps |x0| under 7 in flux_depth_check.py, and this one on the GPU
# too: the flat images of the first GPU runs came from the request's schedule, docs/e2e.md, runs N to P.)
MODULATION = ("_mod.lin.weight", "modulation.lin.weight", "adaLN_modulation.1.weight")
MODULATION_SCALE = 0.125  # a power of two: the same bf16 values as the unscaled draw, scaled


def draw(name: str, shape: torch.Size, gen: torch.Generator, device: str) -> torch.Tensor:
    """Values that keep each layer's output at about its input's scale: weights N(0, 1/fan_in) (the adaLN layers
    an eighth of that), embeddings N(0, 0.02²), norm scales 1, biases 0."""
    if name.endswith("bias"):
        return torch.zeros(shape, device=device)
    if len(shape) == 1 or name.endswith("scale"):
        return torch.ones(shape, device=device)
    if "embedding" in name or name == "shared.weight":
        return torch.randn(shape, generator=gen, device=device) * 0.02
    fan_in = int(torch.Size(shape[1:]).numel())
    weight = torch.randn(shape, generator=gen, device=device) * fan_in ** -0.5
    return weight * MODULATION_SCALE if name.endswith(MODULATION) else weight


def write_file(path: Path, layout: dict[str, torch.Size], dtype: torch.dtype, gen: torch.Generator,
               device: str) -> int:
    from safetensors.torch import save_file

    state = {k: draw(k, s, gen, device).to(dtype).cpu() for k, s in layout.items()}
    save_file(state, str(path), metadata={"delta_e2e_model": path.stem, "delta_e2e_fixture": str(VERSION)})
    return sum(t.numel() for t in state.values())


def lora_targets(layout: dict[str, torch.Size], prefix: str = "lora_unet_",
                 layers: tuple[str, ...] = LORA_LAYERS) -> dict[str, torch.Size]:
    """kohya module names (``lora_unet_double_blocks_0_img_attn_qkv``) of the layers a LoRA changes, with their
    weights' shapes."""
    return {prefix + k[:-len(".weight")].replace(".", "_"): s for k, s in layout.items()
            if k.endswith(".weight") and k[:-len(".weight")].endswith(layers)
            and (prefix != "lora_unet_" or k.startswith(("double_blocks.", "single_blocks.")))}


def write_lora(path: Path, targets: dict[str, torch.Size], gen: torch.Generator, device: str,
               up_std: float = LORA_UP_STD) -> None:
    """Kohya names (``lora_unet_double_blocks_0_img_attn_qkv``), which both Forge's LoRA loader and the extension's
    map onto Forge's Flux modules."""
    from safetensors.torch import save_file

    tensors = {}
    for key, (out, inp) in targets.items():
        tensors[f"{key}.lora_down.weight"] = torch.randn(LORA_RANK, inp, generator=gen, device=device) * inp ** -0.5
        tensors[f"{key}.lora_up.weight"] = torch.randn(out, LORA_RANK, generator=gen, device=device) * up_std
        tensors[f"{key}.alpha"] = torch.tensor(float(LORA_RANK))
    save_file({k: v.to(torch.float16).cpu() for k, v in tensors.items()}, str(path),
              metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "flux1"})


def build(root: Path, out: Path, device: str, reduced: bool = False) -> dict:
    started = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    dit_config = {**FLUX_DEV, **REDUCED} if reduced else FLUX_DEV
    layouts = forge_layouts(root, dit_config)
    gen = torch.Generator(device).manual_seed(SEED)
    counts = {}
    for part, layout in layouts.items():
        counts[part] = write_file(out / FILES[part], layout, DTYPES[part], gen, device)
        print(f"  {FILES[part]}: {counts[part] / 1e9:.2f} B parameters, {time.monotonic() - started:.0f}s", flush=True)
    targets = lora_targets(layouts["checkpoint"])
    up_std = LORA_UP_STD_REDUCED if reduced else LORA_UP_STD
    write_lora(out / f"{LORA}.safetensors", targets, gen, device, up_std)
    te_targets = {k: v for part, (prefix, layers) in TE_LAYERS.items()
                  for k, v in lora_targets(layouts[part], prefix, layers).items()}
    write_lora(out / f"{LORA_TE}.safetensors", {**targets, **te_targets}, gen, device, up_std)
    manifest = {"fixture_version": VERSION, "model": "flux", "seed": SEED, "reduced": reduced,
                "sizes": {k: dit_config[k] for k in ("hidden_size", "num_heads", "depth", "depth_single_blocks")},
                "files": {"checkpoint": FILES["checkpoint"]},
                "modules": {FILES[p]: FOLDERS[p] for p in ("vae", "clip_l", "t5xxl")},
                "loras": {"lora": LORA, "lora_te": LORA_TE}, "lora_rank": LORA_RANK, "lora_modules": len(targets),
                "lora_te_modules": len(te_targets), "parameters": counts,
                "seconds": round(time.monotonic() - started, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--forge", type=Path, required=True, help="the Forge 2 install (its root)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--reduced", action="store_true", help="the smaller Flux of a reduced_flux.py copy of Forge")
    a = p.parse_args(argv)
    torch.set_grad_enabled(False)
    print(json.dumps(build(a.forge.resolve(), a.out.resolve(), a.device, a.reduced)), flush=True)


if __name__ == "__main__":
    main()
