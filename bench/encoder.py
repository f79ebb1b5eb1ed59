"""The IP-Adapter's image encoder on the GPU: the memory it holds while it embeds the unit's picture, and how long.

The encoder is the CLIP ViT-H/14 vision tower that SD1.5 IP-Adapters (plain and Plus) are trained with: transformers'
``CLIPVisionModelWithProjection`` with the configuration sd-webui-controlnet's ``ClipVisionDetector`` builds it from
(``annotator/clipvision/__init__.py``, ``config_clip_h``), random weights (memory and time do not depend on them).
Two precisions, as the hosts run it: float32 (sd-webui-controlnet loads the state dict into the float32 model and
never casts it) and float16 (Forge's ``backend.patcher.clipvision`` loader). One 224×224 picture per call, with
``output_hidden_states=True`` as both hosts ask (Plus adapters read the penultimate layer).

The encoder runs once per unit and generation, before sampling; the hosts unload it afterwards (AUTOMATIC1111's
Delta Sampling host moves an encoder it loaded off the GPU again; Forge's memory manager frees it when the next model
needs the room), so its weights are a peak at the start of a generation, not resident beside the source.
"""

from __future__ import annotations

import gc

import torch

from .measure import PeakMemory, TensorBytesPeak, summary, time_calls
from .rig import Env

# sd-webui-controlnet's config_clip_h (the fields that size the network)
VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
         "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
# the same shape of network at a size the CPU smoke runs in seconds
TOY = {**VIT_H, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "projection_dim": 32}


def build_encoder(env: Env, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with torch.device(env.device):  # transformers' random initialisation, done on the GPU in seconds
        net = CLIPVisionModelWithProjection(CLIPVisionConfig(**(TOY if env.toy else VIT_H)))
    return net.to(dtype).eval().requires_grad_(False)


def allocated(env: Env) -> int:
    if not env.cuda:
        return 0
    gc.collect()
    torch.cuda.synchronize(env.device)
    return torch.cuda.memory_allocated(env.device)


def measure_encoder(env: Env, iters: int = 10) -> dict:
    """Per precision: weights on the device, the peak above them while one picture is embedded, ms per picture."""
    rows = []
    for name, dtype in (("float32 (sd-webui-controlnet)", torch.float32), ("float16 (Forge)", torch.float16)):
        before = allocated(env)
        net = build_encoder(env, dtype)
        params = sum(p.numel() for p in net.parameters())
        weights = allocated(env) - before if env.cuda else params * dtype.itemsize
        pixels = torch.randn(1, 3, 224, 224, device=env.device, dtype=dtype)

        def embed(net: torch.nn.Module = net, pixels: torch.Tensor = pixels) -> object:
            # the hosts call the encoder outside the sampler's autocast, in the encoder's own dtype
            with torch.autocast(env.device.type, enabled=False):
                return net(pixel_values=pixels, output_hidden_states=True)

        embed()
        if env.cuda:
            with PeakMemory(env) as running:
                embed()
            peak = running.peaks[str(env.device)]
        else:  # the tensors' bytes, counted op by op: what the GPU would allocate for them
            with TensorBytesPeak() as running:
                out = embed()
            del out
            peak = running.peak
        ms = time_calls(env, embed, warmup=2, iters=iters)
        rows.append({"precision": name, "parameters": params, "weights_mb": weights / 2**20,
                     "embed_peak_mb": peak / 2**20, "embed_ms": summary(ms),
                     "peak_counted": "CUDA allocator" if env.cuda else "tensor bytes"})
        del net, pixels, embed
        gc.collect()
        if env.cuda:
            torch.cuda.empty_cache()
    return {"layout": "CLIP ViT-H/14 vision" if not env.toy else "CLIP vision (toy size)", "rows": rows}


def main(argv: list[str] | None = None) -> dict:
    """The full-size encoder's memory without a GPU: ``python -m bench.encoder --out encoder-cpu.json``."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m bench.encoder", description=main.__doc__)
    ap.add_argument("--out", default=None, help="where to write the results as JSON")
    ap.add_argument("--toy", action="store_true", help="the toy-size network (seconds)")
    ap.add_argument("--iters", type=int, default=2, help="timed pictures per precision")
    args = ap.parse_args(argv)
    env = Env.detect(toy=True) if args.toy else Env(False, torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                                                     None)
    res = measure_encoder(env, iters=args.iters)
    res["device"] = str(env.device)
    res["torch"] = torch.__version__
    for r in res["rows"]:
        print(f"{r['precision']}: {r['parameters'] / 1e6:.1f} M parameters, weights {r['weights_mb']:.1f} MiB, "
              f"+{r['embed_peak_mb']:.1f} MiB while embedding ({r['peak_counted']}), "
              f"{r['embed_ms']['median']:.0f} ms", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
