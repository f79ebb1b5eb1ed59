"""The fidelity study's whole pipeline at toy size on the CPU: well-formed results that mean something.

The real study runs on a GPU (``python -m fidelity.run --device cuda``, see docs/fidelity.md); here every piece is
exercised with tiny models and a few steps, and the checks that hold at any size are asserted.
"""

from __future__ import annotations

import json

import pytest
import torch

from fidelity import metrics, models, png, run, world
from fidelity.config import ADAPTATIONS


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("fidelity")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only add synchronisation
    try:
        res = run.main(["--toy", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return res, out


def test_detectors_separate_red_and_striped_from_plain_images():
    g = world.generator(0)
    grey = torch.zeros(1, 3, 32, 32)
    red = grey.clone()
    red[:, 0, 8:20, 8:20] = 0.9  # a red square on grey
    assert metrics.is_red(red).item() and not metrics.is_red(grey).item()
    plain, _ = world.batch(64, "plain", g)
    striped, _ = world.batch(64, "striped", g)
    reds, _ = world.batch(64, "red", g)
    assert not metrics.is_red(plain).any() and metrics.is_red(reds).all()
    assert metrics.stripe_score(striped).median() > 10 * metrics.stripe_score(plain).median()


def test_diversity_is_zero_for_copies_and_positive_for_draws():
    x, _ = world.batch(6, "plain", world.generator(1))
    labels = torch.zeros(6, dtype=torch.long)
    assert metrics.diversity(x[:1].expand(6, -1, -1, -1), labels) == 0.0
    assert metrics.diversity(x, labels) > 0.1


def test_png_writer_round_trips_its_header():
    data = png.encode_png(png.grid([torch.zeros(2, 3, 4, 4)]))
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and b"IHDR" in data and data.endswith(b"IEND\xaeB`\x82")


def test_pipeline_results_are_well_formed(toy):
    res, out = toy
    assert json.loads((out / "results.json").read_text())["config"]["toy"] is True
    assert (out / "red_lora.safetensors").exists() and (out / "striped_loha.safetensors").exists()
    assert not res["skipped"]
    stages = {r["stage"] for r in res["runs"]}
    assert stages == {"lambda", "cfg_mode", "trajectory", "base_first"}
    for r in res["runs"]:
        for key in ("red", "striped", "fidelity"):
            assert 0.0 <= r[key] <= 1.0
        assert r["diversity"] >= 0.0 and r["change_rms"] >= 0.0
    assert set(res["summary"]["targets"]) == {f"{t}/{a}" for t in ("self", "same_family", "v_unet", "flow_dit")
                                              for a in ADAPTATIONS}


def test_training_lowers_the_loss_on_a_fixed_batch(toy):
    res, _ = toy
    for name, rep in res["training"].items():
        assert rep["fixed_batch_loss"]["after"] < rep["fixed_batch_loss"]["before"], name


def test_adapter_files_load_through_lib_delta_and_match_training(toy):
    res, _ = toy
    for name, rep in res["adapters"].items():
        assert "0 text-encoder layers" in rep["load_report"] and "keys matched" in rep["load_report"]
        assert rep["file_vs_training_rel_err"] < 1e-2, name  # float16 files


def test_zero_strength_is_the_target_alone_and_the_source_is_never_called(toy):
    res, _ = toy
    assert res["checks"]["lambda0_identical"] and all(res["checks"]["lambda0_identical"].values())
    zero = [r for r in res["runs"] if r["stage"] == "lambda" and r["variant"]["strength"] == 0.0]
    assert zero and all(r["source_calls"] == 0 and r["change_rms"] == 0.0 for r in zero)


def test_self_target_at_unit_strength_samples_the_adapted_source(toy):
    res, _ = toy
    for name, diff in res["checks"]["self_identity_max_abs"].items():
        assert diff < 1e-3, name
    moved = [r for r in res["runs"] if r["target"] == "self" and r["variant"]["strength"] == 1.0]
    assert moved and all(r["change_rms"] > 0 for r in moved)


def test_models_trained_by_one_run_are_reused_by_the_next(tmp_path):
    """A long training split over runs: --models-only trains and saves, --reuse-models loads instead of training."""
    from safetensors.torch import load_file

    first = run.main(["--toy", "--out", str(tmp_path), "--models-only", "source"])
    assert set(first["training"]) == {"source"}
    assert set(first["references"]) == {"alone:source"}  # each model measured on its own
    assert 0.0 <= first["references"]["alone:source"]["fidelity"] <= 1.0
    assert set(first["training"]["source"]["x0_mse_by_sigma"]) == {f"{s:g}" for s in models.PROBE_SIGMAS}
    saved = load_file(str(tmp_path / "source.safetensors"))
    second = run.main(["--toy", "--out", str(tmp_path), "--reuse-models", "--stages", "lambda"])
    assert second["training"]["source"]["reused"] and "reused" not in second["training"]["v_unet"]
    assert second["training"]["source"]["steps"] == first["training"]["source"]["steps"]
    again = load_file(str(tmp_path / "source.safetensors"))  # not trained (and saved) again
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_loss_weightings_are_x0_errors_weighted_as_named():
    """"x0" makes an ε model's loss the v objective's weighting of its x0 error, whatever the parameterisation."""
    sigma = torch.tensor([0.03, 1.0, 14.6])
    for prediction in ("eps", "v"):
        den = models.make_denoiser(torch.nn.Identity(), prediction)
        c_out = den.get_scalings(sigma)[1]
        x0_weight = models.WEIGHTINGS["x0"](sigma, c_out) / c_out**2  # per unit of squared x0 error
        assert torch.allclose(x0_weight, (sigma**2 + 1) / sigma**2)
        assert torch.allclose(models.WEIGHTINGS["min_snr"](sigma, c_out) / c_out**2, (1 / sigma**2).clamp(max=5))
    assert torch.equal(models.WEIGHTINGS["none"](sigma, sigma), torch.ones(3))
