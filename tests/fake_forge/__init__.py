"""A small stand-in for the pieces of Stable Diffusion WebUI Forge 2 that ``lib_delta.hosts.forge`` touches.

``installed()`` puts it into ``sys.modules`` under Forge's module names for the duration of a test, with Forge's
start-up wrappers around ``torch.load`` and ``safetensors.torch.load_file``, and takes it all out again, so the A1111
stand-in and this one never meet. Nothing here is Forge code: it is written from Forge's behaviour (the host notes,
and Forge's source at dfdcbab6 where cited), at the size the tests need (see ``backend`` and ``webui``);
``harness`` is the tests' session on top of it. ``installed(neo=True)`` installs the Forge Neo flavour instead
(``neo``: Neo's pieces where its API or behaviour differs from Forge 2's).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from types import ModuleType

from . import backend, controlnet, ipadapter, webui
from . import neo as neo_flavour


def _module(name: str, **attrs) -> ModuleType:
    m = ModuleType(name)
    m.__dict__.update(attrs)
    return m


def _modules(neo: bool) -> dict[str, ModuleType]:
    b, w = backend, webui
    mods = {
        "modules_forge": _module("modules_forge"),
        # modules_forge/forge_version.py; backend/args.py: Forge 2's dynamic_args is a dict its loader never writes
        "modules_forge.forge_version": _module("modules_forge.forge_version", version="2.0.1v1.10.1"),
        "backend.args": _module("backend.args", dynamic_args={"embedding_dir": None, "forge_unet_storage_dtype": None,
                                                               "online_lora": False}),
        "backend": _module("backend"),
        "backend.loader": _module("backend.loader", forge_loader=b.forge_loader),
        "backend.memory_management": b,
        "backend.utils": _module("backend.utils", load_torch_file=b.load_torch_file),
        "backend.sampling": _module("backend.sampling"),
        "backend.sampling.condition": b,
        "backend.sampling.sampling_function": b,
        "modules": _module("modules"),
        "modules.shared": _module("modules.shared", opts=w.opts, state=w.state),
        "modules.devices": _module("modules.devices", autocast=w.autocast),
        "modules.sd_models": w,
        "modules.prompt_parser": w,
        "modules.sd_samplers": _module("modules.sd_samplers", find_sampler_config=w.find_sampler_config),
        "modules.sd_samplers_common": _module("modules.sd_samplers_common", setup_img2img_steps=w.setup_img2img_steps),
        "modules.script_callbacks": _module("modules.script_callbacks", on_script_unloaded=w.on_script_unloaded),
        "modules.scripts": _module("modules.scripts", Script=w.Script, AlwaysVisible=w.AlwaysVisible),
        "networks": w,
    }
    mods.update(controlnet.modules(neo))
    mods.update(ipadapter.modules(neo))
    ipadapter.extend(mods)
    if neo:
        mods.update(neo_flavour.modules())
    for name, m in mods.items():  # `from package import submodule` looks for an attribute first
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(mods[parent], child, m)
    return mods


@contextlib.contextmanager
def installed(neo: bool = False) -> Iterator[None]:
    """Forge 2's stand-in, or with ``neo`` its Forge Neo flavour (``neo``: Neo's pieces where they differ)."""
    restore_flavour = neo_flavour.apply() if neo else (lambda: None)
    mods = _modules(neo)
    saved = {name: sys.modules.get(name) for name in mods}
    sys.modules.update(mods)
    restore_loaders = backend.patch_loaders()
    try:
        yield
    finally:
        restore_loaders()
        restore_flavour()
        for name, old in saved.items():
            if old is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = old
