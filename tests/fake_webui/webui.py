"""Drive the stand-in WebUI from tests: write checkpoints, load the active model, generate through the script."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def install() -> None:
    """Make ``modules``, ``k_diffusion``, ``omegaconf`` and ``networks`` importable from this folder."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    import torch

    torch.set_num_threads(1)  # tiny models: one thread is fastest, and CI machines are shared


@contextlib.contextmanager
def without_ui_registration() -> Iterator[None]:
    """Without gradio there is no UI to register settings and X/Y/Z axes with (they are tested on their own);
    the host's ``register()`` still registers its callbacks."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        from lib_delta.webui import interfaces as a1111_interfaces

        saved = a1111_interfaces.register_interfaces
        a1111_interfaces.register_interfaces = lambda: None
        try:
            yield
        finally:
            a1111_interfaces.register_interfaces = saved
    else:
        yield


CONFIGS = {
    "sd1": "v1-inference.yaml",
    "sd1-inpaint": "v1-inpainting-inference.yaml",
    "sd2": "v2-inference.yaml",
    "sd2v": "v2-inference-v.yaml",
    "sdxl": "sd_xl_base.yaml",
    "pix2pix": "instruct-pix2pix.yaml",
}


def write_checkpoint(path: Path, kind: str, seed: int, yaml_beside: bool = False) -> Path:
    """A checkpoint file of a tiny model with random, non-degenerate weights (``.safetensors`` or ``.ckpt``)."""
    import shutil

    import safetensors.torch
    import tiny_ldm
    import torch
    from omegaconf import OmegaConf

    config = HERE / "configs" / CONFIGS[kind]
    model = tiny_ldm.build(OmegaConf.load(config).model, seed)
    # stored in float16, as released checkpoints are (the WebUI casts on load)
    sd = {k: (v.half() if v.is_floating_point() and not k.startswith("alphas") else v).contiguous().clone()
          for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save({"state_dict": sd}, str(path))
    if yaml_beside:
        shutil.copy(config, path.with_suffix(".yaml"))
    return path


class WebUI:
    """One stand-in WebUI session: its checkpoint folder, its active model and the Delta Sampling script."""

    def __init__(self, models_dir: Path):
        install()
        from modules import script_callbacks, sd_hijack, sd_models, shared

        script_callbacks.clear_callbacks()
        shared.opts.reset()
        shared.state.reset()
        shared.sd_model = None
        sd_hijack.model_hijack.__init__()
        self.models_dir = models_dir
        sd_models.list_models(str(models_dir))
        self.script = self.load_script()

    def load_script(self):
        """Import the script file as the WebUI does: a fresh module each time (callbacks cleared before)."""
        import importlib.util

        from modules import scripts

        path = HERE.parent.parent / "scripts" / "delta_sampling.py"
        spec = importlib.util.spec_from_file_location("delta_sampling.py", path)
        module = importlib.util.module_from_spec(spec)
        with without_ui_registration():
            spec.loader.exec_module(module)
        script = module.DeltaSamplingScript()
        script.args_from, script.args_to = 0, 1
        script.filename = str(path)
        self.runner = scripts.ScriptRunner([script])
        return script

    def refresh(self) -> None:
        from modules import sd_models

        sd_models.list_models(str(self.models_dir))

    def load(self, name: str):
        from modules import sd_models

        return sd_models.load_model(sd_models.get_closet_checkpoint_match(name))

    def add_script(self, script) -> None:
        """Another always-on script after Delta Sampling (the ControlNet stand-in): its args follow ours."""
        script.args_from, script.args_to = 1, 2
        script.filename = script.title()
        self.runner.alwayson_scripts.append(script)
        script.alwayson = True

    def txt2img(self, delta: dict | None = None, controlnet: list | None = None, **kwargs: Any):
        from modules import processing

        args = (delta or {}, controlnet or [])
        p = processing.StableDiffusionProcessingTxt2Img(scripts=self.runner, script_args=args, **kwargs)
        return processing.process_images(p)

    def img2img(self, delta: dict | None = None, controlnet: list | None = None, **kwargs: Any):
        from modules import processing

        args = (delta or {}, controlnet or [])
        p = processing.StableDiffusionProcessingImg2Img(scripts=self.runner, script_args=args, **kwargs)
        return processing.process_images(p)
