"""Every measure on two (or more) evaluation seeds: the mean, and the spread between seeds.

An evaluation set is the classes in turn and one draw of start noise per seed; every configuration (a model alone,
the adapted source, Delta Sampling, the adapter merged into the target) is a function ``(labels, noise) ->
images``, run once on all seeds' images together and measured per seed. A row keeps each seed's measures, their
mean under the usual keys, and ``spread``: the largest minus the smallest value over the seeds, so that a
difference smaller than the spread is not read as a result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import metrics, report, world
from .config import ATTRIBUTE
from .study import measure

Sampler = Callable[[Tensor, Tensor], Tensor]
MEASURES = ("red", "striped", "fidelity", "diversity", "change_rms", "recovered", "fidelity_vs_adapted")


@dataclass
class EvalSet:
    """The evaluation seeds' labels and noise, the measures, and the reference images of each seed."""

    seeds: tuple[int, ...]
    images: int
    size: int
    device: torch.device
    detectors: metrics.Detectors
    classifier: torch.nn.Module
    labels: Tensor = field(init=False)
    noise: dict[int, Tensor] = field(init=False)
    refs: dict[str, dict] = field(default_factory=dict)  # "alone:<model>" / "adapted:<adaptation>" -> row
    ref_images: dict[str, dict[int, Tensor]] = field(default_factory=dict)
    last_images: dict[int, Tensor] = field(default_factory=dict)  # the last run's, per seed (for the figures)

    def __post_init__(self) -> None:
        self.labels = (torch.arange(self.images) % len(world.CLASSES)).to(self.device)
        self.noise = {s: torch.randn(self.images, 3, self.size, self.size, generator=torch.Generator().manual_seed(s))
                      .to(self.device) for s in self.seeds}

    def sample_seeds(self, sampler: Sampler) -> dict[int, Tensor]:
        """One sampling pass over every seed's images at once (a GPU pays per step, not per image), split back."""
        imgs = sampler(self.labels.repeat(len(self.seeds)), torch.cat([self.noise[s] for s in self.seeds]))
        return dict(zip(self.seeds, imgs.split(self.images), strict=True))

    def reference(self, key: str, sampler: Sampler) -> dict:
        """Run and keep a reference configuration (the model alone, the adapted source)."""
        imgs = self.sample_seeds(sampler)
        self.ref_images[key] = imgs
        row = combine([measure(imgs[s], self.labels, self.detectors, self.classifier) for s in self.seeds])
        self.refs[key] = row
        return row

    def run(self, sampler: Sampler, target_ref: str, adaptation: str | None) -> dict:
        """Run a configuration on every seed; ``target_ref`` is the reference it moves from ("alone:<model>")
        and ``adaptation`` the effect it should carry (None for none)."""
        per_seed = []
        self.last_images = self.sample_seeds(sampler)
        for s, imgs in self.last_images.items():
            m = measure(imgs, self.labels, self.detectors, self.classifier, self.ref_images[target_ref][s])
            if adaptation is not None:
                m["recovered"] = recovered(m, self._seed(target_ref, s), self._seed("alone:source", s),
                                           self._seed(f"adapted:{adaptation}", s), ATTRIBUTE[adaptation])
                adapted = self._seed(f"adapted:{adaptation}", s)["fidelity"]
                m["fidelity_vs_adapted"] = m["fidelity"] / adapted if adapted > 0 else None
            per_seed.append(m)
        return combine(per_seed)

    def _seed(self, key: str, seed: int) -> dict:
        return self.refs[key]["seeds"][self.seeds.index(seed)]

    def first_images(self, key: str, n: int) -> Tensor:
        return self.ref_images[key][self.seeds[0]][:n]


def recovered(row: dict, target_alone: dict, source_base: dict, adapted: dict, attribute: str) -> float | None:
    """The share of the adaptation's effect on the source that the configuration adds to its target (as
    ``report.recovered``, on one seed); None where the adaptation had no effect on that seed."""
    effect = adapted[attribute] - source_base[attribute]
    if effect <= 0:
        return None
    return (row[attribute] - target_alone[attribute]) / effect


def combine(per_seed: list[dict]) -> dict:
    """Mean of each measure over the seeds under its own key, ``spread`` (max − min), and ``seeds``."""
    out: dict = {"seeds": per_seed, "spread": {}}
    for key in per_seed[0]:
        values = [m.get(key) for m in per_seed]
        if any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in values):
            out[key] = None if any(v is None for v in values) else values[0]
            continue
        out[key] = sum(values) / len(values)
        out["spread"][key] = max(values) - min(values)
    return out


def acceptable(row: dict, alone: dict, reading: str) -> bool:
    """The bounds of ``report.acceptable`` on the mean over seeds; ``reading`` "vs_adapted" asks the class fidelity
    to be at least 95 % of the adapted source's own (which a damaging adaptation lowers first)."""
    if reading == "vs_adapted":
        ok_fid = row.get("fidelity_vs_adapted") is not None and row["fidelity_vs_adapted"] >= report.MIN_FIDELITY - 1e-9
        return ok_fid and row["diversity"] >= report.MIN_DIVERSITY * alone["diversity"]
    return report.acceptable(row, alone, reading)
