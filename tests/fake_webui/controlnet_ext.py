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
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def install(models_dir: Path):
    """Load the stand-in with ``models_dir`` as its ControlNet folder; returns a new ``Script`` instance."""
    for name, rel in MODULES.items():
        if name not in sys.modules:
            _load(name, HERE / rel)
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
