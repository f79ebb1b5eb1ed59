"""sd-webui-controlnet ``scripts/global_state.py``: the model list, keys ``"<stem> [<model_hash>]"``."""

import hashlib
import os
from collections import OrderedDict

CN_MODEL_EXTS = [".pt", ".pth", ".ckpt", ".safetensors", ".bin"]
cn_models_dir = ""  # set by the stand-in's installer (the real one: models/ControlNet)
cn_models = OrderedDict()  # "name [hash]" -> path
cn_models_names = {}  # "name" -> "name [hash]"


def model_hash(filename):
    """The WebUI's old 8-hex ``sd_models.model_hash``: sha256 of 64 KiB at offset 1 MiB (here: of the head)."""
    with open(filename, "rb") as f:
        f.seek(0x100000)
        data = f.read(0x10000) or open(filename, "rb").read(0x10000)
    return hashlib.sha256(data).hexdigest()[0:8]


def update_cn_models():
    cn_models.clear()
    found = OrderedDict()
    if cn_models_dir and os.path.isdir(cn_models_dir):
        for entry in sorted(os.scandir(cn_models_dir), key=lambda e: e.name):
            name, ext = os.path.splitext(entry.name)
            if ext in CN_MODEL_EXTS and name != "None":
                found[f"{name} [{model_hash(entry.path)}]"] = entry.path
    cn_models.update({"None": None, **found})
    cn_models_names.clear()
    for name_and_hash, filename in cn_models.items():
        if filename is not None:
            cn_models_names[os.path.splitext(os.path.basename(filename))[0].lower()] = name_and_hash
