"""The source-resolution stage of the fidelity study (fidelity/resolution.py) on the CPU: its world, its order of
runs, and its sampling path with tiny models (the study itself runs on a GPU, see docs/fidelity.md)."""

from __future__ import annotations

import pytest
import torch

from fidelity import adapters, metrics, models, resolution, world
from fidelity.study import PatchedSource
from lib_delta.lora import LoraUse, build_patch, read_lora
from lib_delta.resolution import METHOD, METHODS


def test_the_world_at_twice_the_size_scales_its_stripes_and_keeps_the_old_draws():
    g = world.generator(0)
    striped, _ = world.batch(64, "striped", g, size=64, stripe_period=8)
    plain, _ = world.batch(64, "plain", g, size=64, stripe_period=8)
    scaled, pixel = metrics.stripe_score(striped, 8), metrics.stripe_score(striped, 4)
    assert scaled.median() > 10 * metrics.stripe_score(plain, 8).median()
    assert scaled.median() > 10 * pixel.median()  # the stripes are at 8 px now, not at 4
    labels = torch.arange(5)
    assert torch.equal(world.render(labels, "striped", world.generator(3)),
                       world.render(labels, "striped", world.generator(3), stripe_period=world.STRIPE_PERIOD))


def test_runs_start_with_the_two_settings_and_cover_every_resampling_and_reuse():
    runs = resolution.runs(resolution.full())
    other = "shift" if METHOD == "area" else "area"
    assert [r.label() for r in runs[:3]] == ["λ=1 target", f"λ=1 native {METHOD}", f"λ=1 native {other}"]
    assert {r.method for r in runs if r.resolution == "native"} == set(METHODS)
    assert {(r.resolution, r.reuse) for r in runs if r.reuse > 1} == {(s, k) for s in ("native", "target")
                                                                       for k in (2, 3)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Untrained toy models (source at 16 px, target at 32 px) and a LoRA file on the source whose zero-initialised
    up factors are refilled, so that it moves the source's prediction."""
    torch.manual_seed(0)
    specs = models.specs(toy=True)
    source, target = models.build(specs["source"]), models.build(specs["same_family"])
    adapter = adapters.Adapter(source.net, adapters.AdapterSpec("lora", 4, 4.0, seed=1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in adapter.factors.items():
            if name.endswith("__up"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    path = adapter.save(tmp_path_factory.mktemp("res") / "l.safetensors", "l")
    patch = build_patch({"unet": source.net}, "sd1", [[LoraUse(read_lora(path))]])
    return source, target, patch


def _sample(tiny, run, size, monkeypatch, target=None):
    source, default_target, patch = tiny
    seen = []
    real = PatchedSource.__call__
    monkeypatch.setattr(PatchedSource, "__call__", lambda self, x, *a: (seen.append(tuple(x.shape[-2:])),
                                                                        real(self, x, *a))[1])
    labels = torch.tensor([0, 1])
    noise = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(4))
    images, calls = resolution.resolution_sample(target or default_target, source, patch, "l", run, labels, noise,
                                                 3, 3.0, source_size=16)
    return images, calls, seen


def test_the_native_source_samples_at_its_own_size_and_moves_the_image(tiny, monkeypatch):
    native, calls, seen = _sample(tiny, resolution.Run("native"), 32, monkeypatch)
    assert set(seen) == {(16, 16)} and calls == 3 and torch.isfinite(native).all()
    at_target, _, seen_t = _sample(tiny, resolution.Run("target"), 32, monkeypatch)
    assert set(seen_t) == {(32, 32)}
    plain, _, _ = _sample(tiny, resolution.Run("target", strength=0.0), 32, monkeypatch)
    assert (native - plain).abs().mean() > 1e-3 and (native - at_target).abs().mean() > 1e-4
    reused, calls_k2, _ = _sample(tiny, resolution.Run("native", reuse=2), 32, monkeypatch)
    assert calls_k2 == 2 and not torch.equal(reused, native)


def test_at_the_source_size_native_is_target_bit_for_bit(tiny, monkeypatch):
    source = tiny[0]
    native, _, seen = _sample(tiny, resolution.Run("native"), 16, monkeypatch, target=source)
    at_target, _, _ = _sample(tiny, resolution.Run("target"), 16, monkeypatch, target=source)
    assert set(seen) == {(16, 16)} and torch.equal(native, at_target)


def _row(name, label, recovered, fidelity):
    return {"adaptation": name, "label": label, "recovered": recovered, "fidelity": fidelity}


def test_the_verdict_applies_its_rules():
    native = f"λ=1 native {METHOD}"
    rows = []
    for name in ("red_lora", "striped_loha"):
        rows += [_row(name, "λ=1 target", 0.9, 0.98), _row(name, native, 0.88, 0.97),
                 _row(name, "λ=1 target reuse k=2", 0.7, 0.98)]
        rows += [_row(name, f"λ=1 native {m}", 0.5, 0.9) for m in METHODS if m != METHOD]
    lines = resolution.verdict({"runs": rows})
    assert lines[0].startswith("native as the default: yes (worst recovered -0.02")
    assert f"the product uses {METHOD}" in lines[1] and f"{METHOD} 0.88 / 0.970" in lines[1]
    assert lines[2] == "reuse k=2 at native: not measured"
    assert lines[3].startswith("reuse k=2 at target: worse than exact (worst recovered -0.20")
    rows[1] = _row("red_lora", native, 0.9, 0.90)  # loses class fidelity on one adaptation
    assert resolution.verdict({"runs": rows})[0].startswith("native as the default: no")
