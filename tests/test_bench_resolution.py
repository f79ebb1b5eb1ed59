"""The source-resolution benchmark (bench/resolution.py) on tiny CPU models: every scheme runs at both sizes, the
native source at its own smaller latent, and the report is written. Timings mean nothing here."""

from __future__ import annotations

import json
import math

import torch

from bench import resolution


def test_both_sizes_run_every_scheme_and_the_native_source_is_smaller(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = resolution.main(["--toy", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads((tmp_path / "results.json").read_text())["sizes"].keys() == res["sizes"].keys()
    assert list(res["sizes"]) == ["sd15-sdxl-1024x1024", "sd15-sdxl-1536x1024"]
    for entry in res["sizes"].values():
        assert "error" not in entry
        (h, w), (sh, sw) = entry["latent"], entry["source_latent"]
        assert sh * sw < h * w and sh % 8 == 0 and sw % 8 == 0
        steps = {r["key"]: r for r in entry["steps"]}
        assert set(steps) == {"target", "default", "native", "graph", "graph-native"}
        assert all(r["finite"] and r["median"] > 0 for r in steps.values())
        gens = {r["key"]: r for r in entry["generation"]}
        assert gens["default"]["psnr"] == math.inf and gens["graph"]["psnr"] == math.inf  # graphs are exact
        assert math.isfinite(gens["native"]["psnr"])  # the native source changes the result
        assert gens["native"]["source_calls"] == gens["default"]["source_calls"] > 0
    text = (tmp_path / "resolution.md").read_text()
    assert "source at its own size" in text and "goal ≤ 1.4×" in text
