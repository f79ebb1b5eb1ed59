"""Outside a server, with the WebUI's python: Delta Sampling's IP-Adapter row hooks against sd-webui-controlnet's own
``PlugableIPAdapter.hook``, on the full-size SD1.5 UNet (the WebUI's ldm class, the SD1.5 fixture's weights) with an
IP-Adapter fixture.

    <webui python> ipadapter_probe.py <repo root> <A1111 root> <sd-webui-controlnet> <SD1.5 checkpoint> <IP-Adapter>

One UNet call of three rows: row 0 a base row, rows 1-2 the adapted cond and uncond rows under our hooks; the
reference is the extension's hooked UNet on rows 1-2 with those cond/uncond marks. Prints one JSON object: the
number of cross-attentions, whether the base row is bit-identical to a call without hooks, the relative difference
of the adapted rows to the extension's, and how much the adapter moves them. The image embedding is drawn at random
(the encoder is not part of what is compared: both sides take the same ``get_image_emb`` output).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path


def main(repo: str, webui: str, extension: str, checkpoint: str, adapter: str) -> None:
    import torch

    sys.path[:0] = [str(Path(webui) / "repositories" / "stable-diffusion-stability-ai"), repo]
    package = types.ModuleType("scripts")  # the extension's modules import each other as scripts.*
    package.__path__ = [str(Path(extension) / "scripts")]
    sys.modules["scripts"] = package
    from ldm.modules.diffusionmodules.openaimodel import UNetModel
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from scripts.ipadapter.ipadapter_model import IPAdapterModel
    from scripts.ipadapter.plugable_ipadapter import PlugableIPAdapter, clear_all_ip_adapter

    from lib_delta.hosts.a1111 import ipadapter as ip_mod
    from lib_delta.hosts.a1111.ip_rows import RowImagePrompt, cross_attentions

    torch.set_grad_enabled(False)
    config = OmegaConf.load(Path(webui) / "configs" / "v1-inference.yaml").model.params.unet_config.params
    config.use_checkpoint = False
    unet = UNetModel(**config).eval()
    prefix = "model.diffusion_model."
    unet.load_state_dict({k[len(prefix):]: v.float() for k, v in load_file(checkpoint).items()
                          if k.startswith(prefix)})
    nested: dict[str, dict] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in load_file(adapter).items():
        part, _, rest = key.partition(".")
        nested[part][rest] = value
    model = IPAdapterModel.load(nested, Path(adapter).name).to("cpu", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    clip_out = {"image_embeds": torch.randn(1, 1024, generator=g)}
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.full((3,), 600.0)
    context = torch.randn(3, 77, 768, generator=g)
    plain = unet(x, t, context=context)
    layers = len(cross_attentions(unet))
    unit = ip_mod.LoadedIPUnit(types.SimpleNamespace(unit=types.SimpleNamespace(weight=0.8)),
                               ip_mod._kvs(model, model.get_image_emb(clip_out), layers))
    hooks = RowImagePrompt(unet)
    with hooks.rows([(slice(1, 3), ((unit, (True, False)),))]):
        mixed = unet(x, t, context=context)
    hooks.remove()
    plug = PlugableIPAdapter(model)
    plug.hook(model=unet, preprocessor_outputs=clip_out, weight=0.8, start=0.0, end=1.0, latent_width=8,
              latent_height=8, effective_region_mask=None, dtype=torch.float32)
    unet.cond_mark = torch.tensor([1.0, 0.0]).view(2, 1, 1, 1)
    try:
        reference = unet(x[1:], t[1:], context=context[1:])
    finally:
        clear_all_ip_adapter()

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    print(json.dumps({"layers": layers, "base_row_identical": bool(torch.equal(mixed[:1], plain[:1])),
                      "rel_vs_extension": rel(mixed[1:], reference), "rel_vs_plain": rel(mixed[1:], plain[1:])}))


if __name__ == "__main__":
    main(*sys.argv[1:6])
