"""LoRA and LyCORIS files applied functionally to the private source model.

Typical use by a host::

    a, b = read_lora("a.safetensors"), read_lora("b.safetensors")
    patch = build_patch({"unet": unet, "te": text_encoder}, "sd1", [[LoraUse(a, te=1.0), LoraUse(b, 0.5, 0.8)]])
    with patch:  # attach ... detach
        with patch.rows([(slice(0, n), None), (slice(n, 2 * n), 0)]):  # base rows, then group 0's rows
            out = unet(torch.cat([x, x]), t, context)
"""

from .files import LoraFile, read_lora
from .index import ModelIndex
from .patch import DeltaPatch, LoadReport, LoraUse, build_patch, plan_file

__all__ = ["DeltaPatch", "LoadReport", "LoraFile", "LoraUse", "ModelIndex", "build_patch", "plan_file", "read_lora"]
