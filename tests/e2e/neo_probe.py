"""Inside a real Forge Neo process, without its server: what the host's private loading does to Neo.

Run by test_neo_inprocess.py with Neo's python, in Neo's WebUI folder:
    python neo_probe.py <repo root> <data dir> <SD1.5 checkpoint>
and prints one JSON object:
- "families": every engine class Neo's loader builds, with the latent format the host reads from its guess, and
  whether an SD1.5 source is refused on it as a target;
- "bare" / "kept": Neo's global model-type flags set as an active Flux Kontext / Klein / Wan model would have them, then
  Neo's ``forge_loader`` on the checkpoint, once bare (what Neo does to them) and once inside the host's
  ``model_flags_kept`` (what the host leaves);
- "dropped" / "released": a private engine built by the host's loader, its text encoder and UNet loaded by Neo's
  memory manager as encoding and sampling load them, then either only dropped or released by the host first; which
  of its parts are still alive by weak reference with the cycle collector off, then after a collection, and whether
  Neo's loaded-model list still names any of them.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import weakref
from types import SimpleNamespace

FLAGS = ("kontext", "klein", "wan", "edit", "krea2", "pid", "ops")


def init_neo(root: str, data_dir: str) -> None:
    os.chdir(root)
    sys.path[:0] = [root, os.path.join(root, "modules_forge", "packages")]
    sys.argv = ["neo_probe", "--cpu", "--data-dir", data_dir, "--skip-python-version-check"]
    os.environ["IGNORE_CMD_ARGS_ERRORS"] = "1"
    from modules import shared_init

    shared_init.initialize()


def flags_around(load, path: str) -> dict:
    import torch
    from backend.args import dynamic_args

    refs = dynamic_args.ref_latents
    dynamic_args.kontext = dynamic_args.klein = dynamic_args.wan = True
    refs[:] = [torch.ones(1, 16, 8, 8)]
    concat = dynamic_args.concat_latent = torch.ones(1)
    dynamic_args.ops = "ActiveOperations"
    engine = load(path)
    out = {k: getattr(dynamic_args, k) for k in FLAGS}
    out["ref_latents_same_list"] = dynamic_args.ref_latents is refs
    out["ref_latents"] = len(dynamic_args.ref_latents)
    out["concat_latent_kept"] = dynamic_args.concat_latent is concat
    del engine
    gc.collect()
    return out


def parts(entry) -> dict[str, weakref.ref]:
    objects = entry.engine.forge_objects
    return {"engine": weakref.ref(entry.engine), "UNet patcher": weakref.ref(objects.unet),
            "KModel": weakref.ref(objects.unet.model),
            "diffusion model": weakref.ref(objects.unet.model.diffusion_model),
            "CLIP patcher": weakref.ref(objects.clip.patcher),
            "text encoders": weakref.ref(objects.clip.cond_stage_model)}


def lifetime(path: str, release: bool) -> dict:
    from backend import memory_management
    from modules import prompt_parser

    from lib_delta.hosts.forge import models

    info = SimpleNamespace(filename=path, name=os.path.basename(path), title=os.path.basename(path),
                           name_for_extra="probe")
    entry = models._load(info, models.key_of(info), "source checkpoint")
    entry.engine.get_learned_conditioning(prompt_parser.SdConditioning(["a cat"]))  # loads its text encoder
    memory_management.load_models_gpu([entry.unet])  # as sampling loads it beside the target
    refs = parts(entry)
    modules = {id(r()) for k, r in refs.items() if k in ("KModel", "text encoders")}
    listed_before = _listed(modules)
    gc.disable()  # from here on, only reference counting frees anything
    try:
        if release:
            models._release(entry)
        del entry
        alive = [k for k, r in refs.items() if r() is not None]
        listed = _listed(modules)
    finally:
        gc.enable()
    gc.collect()
    return {"listed_before": listed_before, "alive_without_collection": alive, "listed_after": listed,
            "alive_after_collection": [k for k, r in refs.items() if r() is not None]}


def _listed(modules: set[int]) -> list[str]:
    """The entries of Neo's loaded-model list that keep one of these modules (their patcher may be gone)."""
    from backend import memory_management

    from lib_delta.hosts.forge import memory

    return [type(memory.module_of(e)).__name__ for e in memory_management.current_loaded_models
            if id(memory.module_of(e)) in modules]


# the flags Neo's engines set in __init__ (diffusion_engine/*.py), where the family reads them
_FLAGGED = {"StableDiffusion": "is_sd1", "StableDiffusionXL": "is_sdxl", "StableDiffusionXLRefiner": "is_sdxl",
            "Mugen": "is_sdxl"}


def families() -> dict:
    """Every engine class Neo's loader can build, with its guess's real latent format as the host reads it (the VAE
    left out, as Neo's keeps no scale), and what an SD1.5 source meets on it as a target."""
    from backend.loader import possible_models

    from lib_delta.errors import DeltaError
    from lib_delta.hosts.forge import models
    from lib_delta.spaces import SD1, check_latent_compatible

    out = {}
    for engine_class in possible_models:
        name = engine_class.__name__
        engine = type(name, (), {_FLAGGED[name]: True} if name in _FLAGGED else {})()
        engine.model_config = engine_class.matched_guesses[0]({})
        engine.forge_objects = SimpleNamespace(vae=SimpleNamespace(first_stage_model=None))
        fmt = models.latent_format(engine)
        try:
            check_latent_compatible(SD1, fmt, "sd15", name)
            sd1 = "accepted"
        except DeltaError as e:
            sd1 = f"refused: {e}"
        out[name] = {"family": models.family_of(engine), "format": [fmt.name, fmt.channels, fmt.scale, fmt.shift],
                     "sd1_source": sd1}
    return out


def main() -> None:
    repo, data_dir, checkpoint = sys.argv[1:4]
    root = os.getcwd()
    init_neo(root, data_dir)
    sys.path.append(repo)
    from backend.loader import forge_loader

    from lib_delta.hosts.forge import isolation

    def kept(path):
        with isolation.model_flags_kept():
            return forge_loader(path)

    result = {"families": families()}
    result.update(bare=flags_around(forge_loader, checkpoint), kept=flags_around(kept, checkpoint))
    gc.collect()
    result["dropped"] = lifetime(checkpoint, release=False)
    result["released"] = lifetime(checkpoint, release=True)
    print("NEO_PROBE " + json.dumps(result, default=str))


if __name__ == "__main__":
    main()
