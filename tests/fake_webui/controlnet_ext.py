"""Install the sd-webui-controlnet stand-in (folder ``sd-webui-controlnet``) the way the WebUI loads the real one:
its modules in ``sys.modules`` as ``scripts.global_state``, ``scripts.controlnet_model_guess``,
``scripts.supported_preprocessor``, ``scripts.hook`` and ``internal_controlnet.external_code``, and its
``scripts/controlnet.py`` as a file module named ``controlnet.py`` whose ``Script`` joins the runner."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent / "sd-webui-controlnet"
MODULES = {
    "internal_controlnet.external_code": "internal_controlnet/external_code.py",
    "scripts.global_state": "scripts/global_state.py",
    "scripts.supported_preprocessor": "scripts/supported_preprocessor.py",
    "scripts.controlnet_model_guess": "scripts/controlnet_model_guess.py",
    "scripts.hook": "scripts/hook.py",
    "annotator.annotator_path": "annotator/annotator_path.py",
    "annotator.clipvision": "annotator/clipvision/__init__.py",
    "scripts.preprocessor.legacy.processor": "scripts/preprocessor/legacy/processor.py",
    "scripts.ipadapter.ipadapter_model": "scripts/ipadapter/ipadapter_model.py",
    "scripts.ipadapter.plugable_ipadapter": "scripts/ipadapter/plugable_ipadapter.py",
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def install(models_dir: Path, annotator_dir: Path | None = None):
    """Load the stand-in with ``models_dir`` as its ControlNet folder (and ``annotator_dir`` as its annotator models
    folder, where the CLIP-vision encoders are looked for); returns a new ``Script`` instance."""
    for name, rel in MODULES.items():
        if name not in sys.modules:
            _load(name, HERE / rel)
    sys.modules["annotator.annotator_path"].models_path = str(annotator_dir or "")
    gs = sys.modules["scripts.global_state"]
    gs.cn_models_dir = str(models_dir)
    gs.update_cn_models()
    script_module = _load("controlnet.py", HERE / "scripts" / "controlnet.py")
    sys.modules.pop("controlnet.py")  # the WebUI keeps script modules out of sys.modules
    return script_module.Script()


def uninstall() -> None:
    for name in MODULES:
        sys.modules.pop(name, None)


def write_controlnet(path: Path, family: str = "sd1", seed: int = 0, scale: float = 1.0) -> Path:
    """A tiny ControlNet file in the layout released ones have (``control_model.`` keys, float16), with its zero
    convolutions refilled so that it moves the image."""
    import safetensors.torch
    import torch

    from devkit.controlnet import build_controlnet, fill_zero_convs

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_controlnet(family)
    fill_zero_convs(net, torch.Generator().manual_seed(seed + 31), scale)
    sd = {f"control_model.{k}": v.half().contiguous() for k, v in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    return path


def write_ipadapter(path: Path, unet, clip_dim: int = 1024, tokens: int = 4, seed: int = 0, scale: float = 1.0) -> Path:
    """A plain IP-Adapter for ``unet`` in the layout released ones have (``image_proj.proj``/``.norm``,
    ``ip_adapter.{2n+1}.to_k_ip``/``to_v_ip`` per cross-attention in the extension's order, float16), with random
    weights: a trained adapter's ``to_k_ip``/``to_v_ip`` start as copies of the UNet's ``to_k``/``to_v``, so they
    are the UNet's plus noise (``scale`` of it), and the LayerNorm's zero bias is refilled."""
    import safetensors.torch
    import torch

    g = torch.Generator().manual_seed(seed)
    attns = []
    for part in (unet.input_blocks, unet.output_blocks, unet.middle_block):
        attns += [m for name, m in part.named_modules() if name.endswith("attn2")]
    context = attns[0].to_k.in_features
    sd = {"image_proj.proj.weight": torch.randn(tokens * context, clip_dim, generator=g) / clip_dim ** 0.5,
          "image_proj.proj.bias": torch.randn(tokens * context, generator=g) * 0.1,
          "image_proj.norm.weight": 1 + 0.1 * torch.randn(context, generator=g),
          "image_proj.norm.bias": 0.1 * torch.randn(context, generator=g)}
    for n, attn in enumerate(attns):
        for kind, own in (("k", attn.to_k.weight), ("v", attn.to_v.weight)):
            noise = torch.randn(own.shape, generator=g) / own.shape[1] ** 0.5
            sd[f"ip_adapter.{2 * n + 1}.to_{kind}_ip.weight"] = own.detach().float() + scale * noise
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.half().contiguous() for k, v in sd.items()}, str(path))
    return path


def write_clip_vision(path: Path, config: str = "clip_h", seed: int = 0) -> Path:
    """A random-weight CLIP-vision file of the stand-in's configuration (a plain state dict, as the extension's
    clip_vision/*.pth), with its zero biases refilled so the image decides its embedding."""
    import torch

    mod = sys.modules.get("annotator.clipvision") or _load("annotator.clipvision",
                                                             HERE / "annotator/clipvision/__init__.py")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = mod.build(config)
    g = torch.Generator().manual_seed(seed + 1)
    sd = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point() and not v.any():
            v = 0.02 * torch.randn(v.shape, generator=g)
        sd[k] = v.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))
    return path
