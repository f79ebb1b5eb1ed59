"""The ControlNet study of fidelity/control.py at its smallest on the CPU: the pipeline runs through the host's row
hooks and writes its results; the placement measure tells a shape where the mask asked for it from one elsewhere."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from fidelity import control, placement, world


def test_placement_finds_the_worlds_shapes_where_their_masks_are_and_not_elsewhere():
    images, _, masks = world.batch_with_masks(120, "plain", world.generator(3), "cpu", 32)
    right = placement.placement(images, masks)
    wrong = placement.placement(images, masks.roll(1, 0))  # each image against another image's mask
    assert right["iou"] > 0.8 and right["hit"] > 0.95 and right["centre_px"] < 0.5, right
    assert wrong["iou"] < 0.4 and wrong["hit"] < 0.3 and wrong["centre_px"] > 3, wrong
    grey = torch.zeros(4, 3, 32, 32)  # no shape at all: its centroid is the image's centre
    assert placement.placement(grey, masks[:4])["iou"] == 0


def test_the_mask_renderer_draws_the_same_images_as_the_world():
    labels = torch.arange(10) % len(world.CLASSES)
    plain = world.render(labels, "striped", world.generator(5))
    images, masks = world.render_with_masks(labels, "striped", world.generator(5))
    assert torch.equal(plain, images) and masks.shape == (10, 1, 32, 32) and 0.02 < masks.mean() < 0.5


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    out = tmp_path_factory.mktemp("control")
    step = control.toy().model_train["source"]
    cfg = replace(control.toy(), images=4, steps=2, targets=("flow_dit",),
                  model_train={"source": replace(step, steps=2), "flow_dit": replace(step, steps=2)},
                  control_train=replace(control.toy().control_train, steps=3), classifier_steps=2)
    torch.set_num_threads(1)
    return control.run_stage(cfg, torch.device("cpu"), out, out), out


def test_the_stage_runs_the_control_on_the_sources_adapted_rows_and_writes_its_results(stage):
    res, out = stage
    assert json.loads((out / "results.json").read_text())["stage"] == "control"
    assert "| flow_dit + Delta Sampling | 1 |" in (out / "control.md").read_text()
    checks = res["checks"]
    # the source as its own target at λ = 1 is the source with its control; and that control moves the images
    assert checks["self_identity_max_abs"] < 1e-4 and checks["control_change_rms"] > 1e-4, checks
    runs = {(r["target"], r["strength"]): r for r in res["runs"]}
    assert set(runs) == {("flow_dit", 0.0), ("flow_dit", 1.0)}
    assert runs["flow_dit", 0.0]["source_calls"] == 0 and runs["flow_dit", 1.0]["source_calls"] == 2
    for r in [*runs.values(), *res["references"].values()]:
        assert 0 <= r["iou"] <= 1 and r["centre_px"] >= 0
    assert res["training"]["control"]["steps"] == 3
