"""The groups' LoRA/LyCORIS files in AUTOMATIC1111: found among the WebUI's own LoRA list, applied functionally.

Names resolve only through the Lora extension's list (``networks.available_network_aliases``, what
``/sdapi/v1/loras`` shows); a request never names a path. Pickled files are read through the WebUI's safe
loader. Each private model (the source, or a group's fine-tuned checkpoint) gets one :class:`~lib_delta.lora.DeltaPatch`
holding every group that runs on it; the patch is attached only for the duration of one text-encoder pass or one
UNet forward, so between model calls the private model is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ...args import DeltaSettings, LoraRef
from ...errors import DeltaError
from ..common import names
from . import source as source_mod


def resolve(ref: LoraRef) -> Any:
    """The WebUI's entry (``NetworkOnDisk``) for a LoRA name or alias."""
    return names.lora(ref.name, "the WebUI's")


def model_family(model: Any) -> str:
    if getattr(model, "is_sdxl", False):
        return "sdxl"
    if getattr(model, "is_sd2", False):
        return "sd2"
    if getattr(model, "is_sd1", True) and not getattr(model, "is_sd3", False):
        return "sd1"
    raise DeltaError(f"LoRAs on a {source_mod.latent_format(model).name} source are not supported by Delta Sampling.")


def model_roots(model: Any) -> dict[str, Any]:
    unet = model.model.diffusion_model
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None:
        return {"unet": unet, "te1": conditioner.embedders[0], "te2": conditioner.embedders[1]}
    return {"unet": unet, "te": model.cond_stage_model}


@dataclass(frozen=True)
class Terms:
    """One group's terms on one model's patch."""

    patch: Any  # DeltaPatch
    group: int


class Adapter:
    """Every group's LoRA terms, on the model each group runs on."""

    def __init__(self, patches: dict[int, Any], group_model: list[source_mod.PrivateModel],
                 te_groups: set[int], unet_groups: set[int], device: Any) -> None:
        self.device = device  # where the models run (their modules are there while a patch is attached)
        # under --lowvram/--medvram the models visit the GPU for each call: their LoRA data goes back with them
        self.offload = device.type != "cpu" and source_mod.target_uses_lowvram()
        self._patches = patches  # id(PrivateModel) -> DeltaPatch
        self._group_model = group_model
        self._te = te_groups
        self._unet = unet_groups

    @classmethod
    def create(cls, settings: DeltaSettings, source: source_mod.PrivateModel, groups: list, device: Any) -> Adapter:
        from modules import sd_models

        from ...lora import LoraUse, build_patch, read_lora

        def safe_load(path: str) -> Any:
            return sd_models.read_state_dict(path, map_location="cpu")

        group_model = [g.checkpoint or source for g in groups]
        files: dict[str, Any] = {}
        uses: list[list[Any]] = []
        for g in settings.groups:
            uses.append([])
            for ref in g.loras:
                entry = resolve(ref)
                if entry.filename not in files:
                    files[entry.filename] = read_lora(entry.filename, safe_load)
                uses[-1].append(LoraUse(files[entry.filename], te=ref.te, unet=ref.unet))
        patches: dict[int, Any] = {}
        te_groups, unet_groups = set(), set()
        for model in {id(m): m for m in group_model}.values():
            mine = [u if group_model[i] is model else [] for i, u in enumerate(uses)]
            if not any(mine):
                continue
            # under lowvram the source moves to the GPU for each call: folded weights would be stacked anew each time
            patch = build_patch(model_roots(model.model), model_family(model.model), mine,
                                fold=False if source_mod.target_uses_lowvram() else None)
            patches[id(model)] = patch
            for i, reports in enumerate(patch.reports):
                if any(r.te_modules and r.te_multiplier for r in reports):
                    te_groups.add(i)
                if any(r.unet_modules and r.unet_multiplier for r in reports):
                    unet_groups.add(i)
        return cls(patches, group_model, te_groups, unet_groups, device)

    def te_terms(self, group: int) -> Terms | None:
        return self._terms(group) if group in self._te else None

    def unet_terms(self, group: int) -> Terms | None:
        return self._terms(group) if group in self._unet else None

    def _terms(self, group: int) -> Terms | None:
        patch = self._patches.get(id(self._group_model[group]))
        return Terms(patch, group) if patch is not None else None

    @contextlib.contextmanager
    def te_active(self, entry: source_mod.PrivateModel, terms: Terms) -> Iterator[None]:
        """A text-encoder pass with one group's terms on every row (open_clip runs sequence-first: whole batch)."""
        patch = terms.patch
        with self._visiting(patch), patch, patch.rows([(slice(None), terms.group)]):
            yield

    @contextlib.contextmanager
    def unet_rows(self, entry: source_mod.PrivateModel, plan: list[tuple[int, Terms | None]]) -> Iterator[None]:
        """One UNet forward whose consecutive row blocks (``(n_rows, terms)``) get their group's terms."""
        patch = self._patches.get(id(entry))
        if patch is None:
            yield
            return
        rows, start = [], 0
        for n, terms in plan:
            rows.append((slice(start, start + n), None if terms is None else terms.group))
            start += n
        with self._visiting(patch), patch, patch.rows(rows):
            yield

    @contextlib.contextmanager
    def _visiting(self, patch: Any) -> Iterator[None]:
        patch.to(device=self.device)
        try:
            yield
        finally:
            if self.offload:
                patch.to(device="cpu")

    def lay_out(self) -> None:
        """Stack folded weights now that the models sit where they run, before a CUDA graph keys on them."""
        for patch in self._patches.values():
            patch.to(device=self.device)
            patch.lay_out()

    def close(self) -> None:
        for patch in self._patches.values():
            patch.release()  # the source models keep compact weights between generations
