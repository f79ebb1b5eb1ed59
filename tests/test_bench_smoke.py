"""The benchmark's machinery on tiny CPU models: every section runs, every scheme gives the reference's output,
and the report is well-formed. Timings are not checked (they mean nothing here)."""

from __future__ import annotations

import json
import math
import re
import struct
import zlib

import pytest

from bench import report
from bench.run import main

TOLERANCE_OUT = 1e-5  # float32 on the CPU: one batched call against two calls
EXACT = {"default", "held", "cond", "graph", "graph-cond", "remote", "remote-graph"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = main(["--toy", "--out", str(out)])
    return results, out


def test_every_section_ran_and_the_json_matches(run):
    results, out = run
    # the image encoder's section needs transformers, which the test dependencies leave out
    assert results["skipped"] in ({}, {"ip-encoder": "failed: ModuleNotFoundError: transformers is not installed"})
    assert json.loads((out / "results.json").read_text())["pairs"].keys() == results["pairs"].keys()
    assert len(results["pairs"]) == 3
    for key in ("source_call", "lora_layers", "generation", "reuse", "profiles", "flops"):
        assert results[key], key
    # every patched layer of the source call is timed once, under its own shapes
    layers = results["lora_layers"]
    assert sum(r["count"] for r in layers["rows"]) == results["source_call"][0]["layers"]
    assert all(r["us"] > 0 and r["out_rw_us"] > 0 for r in layers["rows"])


def test_each_scheme_gives_the_reference_output(run):
    results, _ = run
    for pair in results["pairs"].values():
        keys = {r["key"] for r in pair["schemes"]}
        assert {"target", "reference", "floor"} | EXACT <= keys
        for row in pair["schemes"]:
            assert row["median"] > 0 and row["finite"], row["label"]
            if row["key"] in EXACT:
                assert row["ok"], (pair["label"], row["label"], row["err_out"], row["err_delta"])
                assert row["delta_size"] > 1e-3  # the LoRA moves the result, so equality means something
    for call in results["source_call"]:
        assert call["err_vs_merged"] < 1e-4


def test_the_forge_step_with_the_source_beside_gives_the_reference_output(run):
    """The Forge host's order of a step (prefetch in the conditioning modifier, correction of the combined
    prediction): the same output as the reference, per step at both sizes, and half the source calls over a
    generation that stops its deltas halfway; its P3/P4 rows in the goals."""
    results, out = run
    forge = results["forge_two_gpu"]
    assert set(forge["pairs"]) == {"sd15-sdxl-512", "sd15-sdxl-1024"}
    for pair in forge["pairs"].values():
        rows = {r["key"]: r for r in pair["schemes"]}
        assert set(rows) == {"target", "forge-remote", "forge-remote-cond"}
        for key in ("forge-remote", "forge-remote-cond"):
            assert rows[key]["ok"] and rows[key]["delta_size"] > 1e-3, (pair["label"], rows[key])
    gen = {r["key"]: r for r in forge["generation"]["rows"]}
    assert gen["forge-cond-window-remote"]["source_calls"] == forge["generation"]["steps"] // 2
    goals = [g for g in report.goals(results) if "Forge" in g[2]]
    assert [g[0][:2] for g in goals] == ["P3"] + ["P4"] * 4
    assert "## The Forge host's step with the source on GPU 1" in (out / "performance.md").read_text()


def test_the_forge_section_skips_without_a_second_gpu(monkeypatch, tmp_path):
    from bench import run as bench_run
    from bench.rig import Env

    detect = Env.detect
    monkeypatch.setattr(Env, "detect", staticmethod(lambda toy: Env(**{**vars(detect(toy)), "second": None})))
    results = bench_run.main(["--toy", "--out", str(tmp_path), "--sections", "forge-two-gpu"])
    assert results["skipped"] == {"forge-two-gpu": "needs two GPUs"} and "forge_two_gpu" not in results


def test_delta_reuse_counts_and_exactness(run):
    results, _ = run
    rows = {r["key"]: r for r in results["reuse"]["rows"]}
    steps = results["reuse"]["steps"]
    assert rows["default"]["source_calls"] == steps and math.isinf(rows["default"]["psnr"])
    assert rows["reuse-2"]["source_calls"] == math.ceil(steps / 2)
    assert math.isfinite(rows["reuse-2"]["psnr"])
    assert rows["graph-reuse-2"]["psnr"] == rows["reuse-2"]["psnr"]  # the graph path changes nothing
    gen = {r["key"]: r for r in results["generation"]["rows"]}
    assert gen["cond-window"]["source_calls"] == results["generation"]["steps"] // 2


def test_report_and_chart_are_well_formed(run):
    results, out = run
    md = (out / "performance.md").read_text()
    assert md.startswith("# Performance") and "## Goals" in md
    for pair in results["pairs"].values():
        assert pair["label"] in md
    assert len(re.findall(r"^\| P\d ", md, flags=re.M)) == len(report.goals(results))
    png = (out / "performance.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    idat = png[png.index(b"IDAT") + 4:png.index(b"IEND") - 8]
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)


def test_the_controlnet_section_puts_the_unit_on_the_adapted_rows_only(run, tmp_path):
    """The call with a unit equals the reference (the ControlNet on a second source copy) on the adapted rows,
    leaves the base rows as the plain call has them, and the control really moves the adapted rows; the section
    merges into an earlier results file and renders its table."""
    results, out = run
    cn = results["controlnet"]
    assert [s["px"] for s in cn["sizes"]] == [512, 1024]
    for size in cn["sizes"]:
        assert size["finite"] and size["control_size"] > 1e-2, size
        assert size["adapted_rows_vs_reference"] < TOLERANCE_OUT and size["base_rows_vs_plain"] == 0, size
        assert all(size[k]["median"] > 0 for k in ("plain", "rows", "reference", "graph_rows")), size
    assert "## A ControlNet unit on the source call" in (out / "performance.md").read_text()
    base = {k: v for k, v in results.items() if k != "controlnet"}
    merged = report.merge(base, {**results, "pairs": {}, "profiles": {}})
    assert merged["controlnet"] == cn and "controlnet" in merged["runs"][-1]["sections"]
    report.write(merged, tmp_path)
    assert "| 1024 px |" in (tmp_path / "performance.md").read_text()


def test_the_controlnet_calls_replayed_from_static_inputs_give_the_eager_results():
    """The graphed calls as a recorded graph runs them (the inputs copied into static buffers, the recorded call
    run on those): the same rows as the eager calls, so the graph columns time the same computation."""
    import argparse

    from bench.control import measure_control
    from bench.rig import Env, Models
    from tests.test_cuda_graph import FakeGraphs

    env = Env.detect(True)
    args = argparse.Namespace(rounds=1, iters=1, warmup=0)
    with env.sampling():
        res = measure_control(env, Models(env), args, backend=FakeGraphs())
    for size in res["sizes"]:
        assert size["graphed"] and size["graph_vs_eager"] < 1e-6 and size["control_size"] > 1e-2, size
