"""A Flux small enough for the CPU that Forge 2 still serves as Flux. Forge sizes every Flux from fixed constants
(huggingface_guess/detection.py, the Flux branch) and T5-XXL from its bundled config, so a smaller file does not load
into an unchanged Forge; this copies a Forge tree (without its venv, models and outputs) and sets those constants
smaller in the copy. Served from the copy with the install's own python, the Flux phase runs Forge's Flux path (its
predictor and schedule, the text encoders' conditioning, the 'VAE / Text Encoder' box, its LoRA loader) on the CPU.
The install itself is never written to.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

# width 768 keeps Flux's heads of 128 (axes 16 + 56 + 56); 4 double and 8 single blocks, T5-XXL at 2 of its 24 layers
REDUCED = {"hidden_size": 768, "num_heads": 6, "depth": 4, "depth_single_blocks": 8}
T5_LAYERS = 2
DETECTION = Path("repositories/huggingface_guess/huggingface_guess/detection.py")
T5_CONFIG = Path("backend/huggingface/black-forest-labs/FLUX.1-dev/text_encoder_2/config.json")
LEFT_OUT = {"venv", "models", "outputs", ".git"}  # at the tree's top only: its code has folders named models too


def set_constants(text: str, full: dict, reduced: dict) -> str:
    """detection.py's Flux branch with each ``dit_config["key"] = value`` of ``full`` set to ``reduced``'s value."""
    for key, value in reduced.items():
        old = f'dit_config["{key}"] = {full[key]}'
        if text.count(old) != 1:
            raise RuntimeError(f"{DETECTION} has no single line {old!r} to change: a Forge this copy does not know")
        text = text.replace(old, f'dit_config["{key}"] = {value}')
    return text


def commit(root: Path) -> str:
    """The tree's git commit ('' where it is no checkout): an updated install makes a new copy."""
    done = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def reduced_forge(root: Path, dest: Path, full: dict) -> Path:
    """A copy of the Forge tree at ``root`` in ``dest`` that sizes Flux as ``REDUCED`` (``full``: the sizes it has);
    kept and reused while it was made from the same tree at the same commit with the same sizes."""
    marker = dest / ".delta-reduced-flux.json"
    made = {"root": str(root.resolve()), "commit": commit(root), "sizes": REDUCED, "t5_layers": T5_LAYERS}
    if marker.is_file() and json.loads(marker.read_text()) == made:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    top = root.resolve()
    shutil.copytree(top, dest, symlinks=True,
                    ignore=lambda folder, names: [n for n in names if n == "__pycache__"
                                                  or (Path(folder).resolve() == top and n in LEFT_OUT)])
    (dest / "models").mkdir()
    (dest / DETECTION).write_text(set_constants((dest / DETECTION).read_text(), full, REDUCED))
    config = json.loads((dest / T5_CONFIG).read_text())
    config["num_layers"] = T5_LAYERS
    (dest / T5_CONFIG).write_text(json.dumps(config, indent=2))
    marker.write_text(json.dumps(made))
    return dest
