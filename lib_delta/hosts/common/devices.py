"""The ``delta_sampling_device`` setting ("Device for the source model"), read the same way by every host."""

from __future__ import annotations

from typing import Any

import torch

from ...errors import DeltaError


def chosen_device(opts: Any) -> torch.device | None:
    """The device the setting names: None for "same" (the host's own), else "cpu" or an existing "cuda:N"."""
    choice = str(getattr(opts, "delta_sampling_device", "same") or "same").strip()
    if choice == "same":
        return None
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        raise DeltaError(f"Delta Sampling device '{choice}' is not a device name: use 'same', 'cpu' or 'cuda:N' "
                         "(Settings > Delta Sampling).") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise DeltaError(f"Delta Sampling device '{choice}' does not exist on this machine; use 'same' or 'cpu'.")
    return device
