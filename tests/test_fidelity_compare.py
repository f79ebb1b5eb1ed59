"""The comparison study (naive route, adaptive λ, gaps, two budgets) at toy size on the CPU, and its pieces.

The real runs are two GPU commands (docs/fidelity.md); here the whole pipeline runs with tiny models, and the
pieces whose behaviour holds at any size are checked exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fidelity import adaptive, compare, compare_tables, evaluation, gaps, metrics, models, naive, pipeline, world
from fidelity.adapters import Adapter, AdapterSpec
from fidelity.config import ADAPTATIONS
from fidelity.study import Variant, delta_sample, sample
from lib_delta.lora import LoraUse, build_patch, read_lora
from lib_delta.spaces import SpaceBridge


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: threads only add synchronisation (several times slower on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    first = compare.main(["--part", "1", "--toy", "--out", str(out), "--results", str(out / "r1")])
    second = compare.main(["--part", "2", "--toy", "--out", str(out), "--results", str(out / "r2")])
    return first, second, out


def test_every_configuration_runs_on_both_seeds_with_a_spread(parts):
    for res in parts[:2]:
        assert res["eval"]["seeds"] == [41, 42] and not res["skipped"]
        for row in res["runs"]:
            assert len(row["seeds"]) == 2
            for key in ("fidelity", "diversity", "red", "striped"):
                values = [s[key] for s in row["seeds"]]
                assert row[key] == pytest.approx(sum(values) / 2)
                assert row["spread"][key] == pytest.approx(max(values) - min(values))
            assert row["fidelity_vs_adapted"] is None or row["fidelity_vs_adapted"] >= 0


def test_the_stages_of_each_part(parts):
    first, second, _ = parts
    assert {r["stage"] for r in first["runs"]} == {"lambda", "naive", "gap_scale", "gap_steps"}
    assert {r["stage"] for r in second["runs"]} == {"lambda", "naive", "gap_colour", "adaptive"}
    assert {r["rule"] for r in second["runs"] if r["stage"] == "adaptive"} == set(adaptive.RULES)
    assert "uniform t" in first["dit"] and "40 steps" in first["dit"] and "40 steps" in second["dit"]
    assert "uniform t" not in second["dit"]  # trained once, beside the 1× DiT on the same budget
    for res in (first, second):  # the merged file loads on the ε UNets only
        naive_targets = {(r["target"], r["strength"]) for r in res["runs"] if r["method"] == "naive"}
        assert {("same_family", w) for w in compare.TOY["naive_weights"]} <= naive_targets
        for t in ("v_unet", "flow_dit"):
            for ad in ADAPTATIONS:
                assert res["naive_unavailable"][f"{t}/{ad}"].startswith(naive.NOT_LOADED)
    colour = {(r["target"], r["method"], r["gap"]["level"]) for r in second["runs"] if r["stage"] == "gap_colour"}
    assert {("self", "naive", 0.0), ("colour_1", "delta", 1.0), ("colour_1", "naive", 1.0)} <= colour
    undeclared = [r for r in first["runs"] if r["stage"] == "gap_scale" and not r["declared"]]
    assert undeclared and all(r["change_rms"] > 0 for r in undeclared)


def test_the_merged_file_at_no_colour_gap_is_the_adapted_source(parts):
    """k = 0 is the source itself: the file merged into it at ×1 samples the adapted source's images exactly, so
    the merged series starts from the whole effect, as Delta Sampling's does (the sweep's control row)."""
    second = parts[1]
    for ad in ADAPTATIONS:
        row = compare_tables._find(second, stage="gap_colour", target="self", adaptation=ad)
        adapted = second["references"][f"adapted:{ad}"]
        for key in ("red", "striped", "fidelity", "diversity"):
            assert row[key] == adapted[key], (ad, key)
        assert row["recovered"] in (None, 1.0) and row["fidelity_vs_adapted"] == 1.0
        merged = compare_tables.gap_series(second, "colour", ad, "merged ×1")
        delta = compare_tables.gap_series(second, "colour", ad, "λ=1")
        assert [r["gap"]["level"] for r in merged] == [r["gap"]["level"] for r in delta] == [0.0, 1.0]
        assert delta[0]["target"] == "self" and merged[0]["target"] == "self"
    assert set(second["summary"]["finetune_naive_vs_delta"]) == {f"{ad}@k={k:g}" for ad in ADAPTATIONS
                                                                  for k in (0.0, 1.0)}


def test_part_two_trains_part_ones_models_on(parts):
    first, second, out = parts
    for name in ("source", "same_family", "v_unet", "flow_dit"):
        rep = second["training"][name]
        assert rep["first_round"]["steps"] == first["training"][name]["steps"] and rep["first_round"]["reused"]
        assert (out / "budget2" / f"{name}.safetensors").exists()
    assert second["budget"] == "2×" and first["budget"] == "1×"
    # both budgets judged by one classifier: part 2 loads part 1's
    assert second["classifier"]["reused"] and "reused" not in first["classifier"]
    assert second["classifier"]["held_out_accuracy"] == first["classifier"]["held_out_accuracy"]


def test_adaptive_gains_stay_inside_their_clamp(parts):
    for res in parts[:2]:
        for row in (r for r in res["runs"] if r["stage"] == "adaptive"):
            assert len(row["gains"]) == 1  # one sampling pass over both seeds
            for g in row["gains"]:
                assert 1 / adaptive.GAIN_LIMIT - 1e-6 <= g["min"] <= g["max"] <= adaptive.GAIN_LIMIT + 1e-6


def test_markdown_covers_both_budgets_and_rewrites_only_the_marked_part(parts, tmp_path):
    _, _, out = parts
    text = (out / "r2" / "compare.md").read_text()
    assert "#### 1× training" in text and "#### 2× training" in text
    assert naive.NOT_LOADED in text and "best constant" in text and "| colour |" in text
    assert compare_tables.FINETUNE_NAME in text and "trained independently" in text
    page = tmp_path / "page.md"
    page.write_text(f"intro\n{compare_tables.BEGIN}\nthe text generated before\n{compare_tables.END}\noutro\n")
    compare_tables.main([str(out / "r1" / "results.json"), str(out / "r2" / "results.json"), "--page", str(page),
                         "--images", str(tmp_path / "img")])
    doc = page.read_text()
    assert doc.startswith("intro\n") and doc.endswith("outro\n") and "generated before" not in doc
    assert "#### 2× training" in doc
    assert (tmp_path / "img" / "compare_samples_1x.png").exists()
    assert json.loads((out / "r2" / "results.json").read_text())["summary"]["adaptive"]


# --- the pieces -------------------------------------------------------------------------------------------------


def test_combine_takes_mean_and_spread_and_keeps_missing_values_missing():
    row = evaluation.combine([{"fidelity": 0.9, "recovered": None, "stage": "x"},
                              {"fidelity": 0.8, "recovered": 0.5, "stage": "x"}])
    assert row["fidelity"] == pytest.approx(0.85) and row["spread"]["fidelity"] == pytest.approx(0.1)
    assert row["recovered"] is None and "recovered" not in row["spread"] and row["stage"] == "x"


def test_flat_fraction_holds_the_delta_at_the_running_mean_fraction():
    state: dict = {}
    target = torch.ones(2, 3, 4, 4)
    k1 = adaptive.flat_fraction_gain(target, target, 0.2 * target, (target, target), state)
    assert torch.allclose(k1, torch.ones(2))  # the first call sets the fraction
    k2 = adaptive.flat_fraction_gain(target, target, 0.6 * target, (target, target), state)
    # running mean of the fractions 0.2 and 0.6 is 0.4: the second delta is scaled from 0.6 to 0.4
    assert torch.allclose(k2 * 0.6, torch.full((2,), 0.4))
    ratio = adaptive.x0_ratio_gain(2 * target, target, target, (target, target), {})
    assert torch.allclose(ratio, torch.full((2,), 2.0))
    assert torch.allclose(adaptive.clamp_gain(torch.tensor([100.0, 1e-6])),
                          torch.tensor([adaptive.GAIN_LIMIT, 1 / adaptive.GAIN_LIMIT]))


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory):
    """Untrained toy models with their zero layers refilled (so they respond), and a trained-shape LoRA file whose
    zero-initialised up factors are refilled so the adapter really moves the source."""
    path = tmp_path_factory.mktemp("adapter") / "red.safetensors"
    specs = models.specs(toy=True)
    zoo = {name: models.build(spec) for name, spec in specs.items()}
    for m in zoo.values():
        m.net.eval().requires_grad_(False)
    adapter = Adapter(zoo["source"].net, AdapterSpec("lora", 4, 4.0, seed=3))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, p in adapter.factors.items():
            if key.endswith("__up"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    adapter.save(path, "red")
    return zoo, path


def test_the_adapter_merges_into_the_same_family_only(toy_models):
    zoo, path = toy_models
    assert isinstance(naive.naive_patch(zoo["same_family"], path, 1.0), type(
        build_patch({"unet": zoo["same_family"].net}, "sd1", [[LoraUse(read_lora(path))]])))
    for t in ("v_unet", "flow_dit"):
        why = naive.naive_patch(zoo[t], path, 1.0)
        assert isinstance(why, str) and why.startswith(naive.NOT_LOADED)


def test_merged_adapter_on_the_source_is_the_adapted_source_and_its_weight_scales_the_change(toy_models):
    zoo, path = toy_models
    labels = torch.arange(4) % len(world.CLASSES)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    alone = naive.sample(zoo["source"], labels, noise, 3, 3.0)
    merged = {w: naive.naive_sample(zoo["source"], naive.naive_patch(zoo["source"], path, w), labels, noise, 3, 3.0)
              for w in (0.5, 1.0)}
    patch = build_patch({"unet": zoo["source"].net}, "sd1", [[LoraUse(read_lora(path))]])
    ds, _ = delta_sample(zoo["source"], zoo["source"], patch, "red", Variant(), labels, noise, 3, 3.0)
    assert torch.allclose(merged[1.0], ds, atol=1e-3)  # self target, λ = 1: the adapted source either way
    moved = {w: (merged[w] - alone).abs().mean().item() for w in merged}
    assert 0 < moved[0.5] < moved[1.0]


def test_adaptive_x0_ratio_on_the_source_itself_is_plain_delta_sampling(toy_models):
    """Target = source: the target's x0 is the source base's, the gain is 1, and the result is λ = 1's."""
    zoo, path = toy_models
    labels = torch.arange(4) % len(world.CLASSES)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    patch = build_patch({"unet": zoo["source"].net}, "sd1", [[LoraUse(read_lora(path))]])
    plain, _ = delta_sample(zoo["source"], zoo["source"], patch, "red", Variant(), labels, noise, 3, 3.0)
    adapted, gains = adaptive.adaptive_sample(zoo["source"], zoo["source"], patch, "red", "x0_ratio", 1.0, False,
                                              labels, noise, 3, 3.0)
    assert gains["min"] == pytest.approx(1.0, abs=1e-4) and gains["max"] == pytest.approx(1.0, abs=1e-4)
    assert torch.allclose(plain, adapted, atol=1e-4)
    other, g2 = adaptive.adaptive_sample(zoo["v_unet"], zoo["source"], patch, "red", "guidance_ratio", 1.0, False,
                                         labels, noise, 3, 3.0)
    assert g2["max"] != pytest.approx(1.0) and torch.isfinite(other).all()


def test_colour_shift_cools_the_world_and_zero_is_identity():
    x, _ = world.batch(32, "red", world.generator(2), size=16)
    assert torch.equal(gaps.shift_colour(x, 0.0), x)
    cold = gaps.shift_colour(x, 1.0)
    assert cold[:, 0].mean() < x[:, 0].mean() and cold[:, 2].mean() > x[:, 2].mean()
    assert metrics.is_red(x).float().mean() > metrics.is_red(cold).float().mean()


def _max_param_diff(a: models.DiffusionModel, b: models.DiffusionModel) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a.net.parameters(), b.net.parameters(), strict=True))


def test_a_colour_gap_target_is_a_fine_tune_of_the_source(toy_models):
    """k = 0 is the source bit for bit, and the adapter file merged into it is the adapted source; k > 0 starts
    from the source's weights (not the independently trained same-family model's) and moves them, and the
    source's file loads on it whole: the case of an SD1.5 LoRA on an SD1.5 fine-tune."""
    zoo, path = toy_models
    source = zoo["source"]
    before = [t.clone() for t in source.net.parameters()]
    tune = gaps.finetune_config(models.TrainConfig(steps=6, batch=8, lr=2e-3, warmup=2, ema=0.0), seconds=None,
                                steps=2)
    labels = torch.arange(4) % len(world.CLASSES)
    noise = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    same = gaps.colour_target(source, 0.0, tune, 16, 0, 16)
    assert same.net is not source.net and _max_param_diff(same, source) == 0.0
    assert torch.equal(sample(same, labels, noise, 3, 3.0), sample(source, labels, noise, 3, 3.0))
    adapted = sample(source, labels, noise, 3, 3.0,
                     adapted=build_patch({"unet": source.net}, "sd1", [[LoraUse(read_lora(path))]]))
    merged = naive.naive_sample(same, naive.naive_patch(same, path, 1.0), labels, noise, 3, 3.0)
    assert torch.equal(merged, adapted) and not torch.equal(merged, sample(source, labels, noise, 3, 3.0))
    tuned = gaps.colour_target(source, 1.0, tune, 16, 2, 16)
    moved = _max_param_diff(tuned, source)
    assert 0 < moved < _max_param_diff(zoo["same_family"], source) / 10
    assert all(torch.equal(a, b) for a, b in zip(before, source.net.parameters(), strict=True))  # left as it was
    patch = naive.naive_patch(tuned, path, 1.0)
    assert not isinstance(patch, str) and patch.reports[0][0].keys_matched == patch.reports[0][0].keys_total


def test_a_declared_latent_scale_maps_the_delta_and_an_undeclared_one_does_not(toy_models):
    zoo, _ = toy_models
    m = zoo["same_family"]
    scaled = gaps.ScaledModel(m.spec, m.encoder, m.net, m.denoiser, scale=0.5)
    d = torch.ones(1, 3, 2, 2)
    assert torch.allclose(SpaceBridge(zoo["source"].space, scaled.space).delta_to_target(d), 0.5 * d)
    assert torch.equal(SpaceBridge(zoo["source"].space, scaled.declared_as(False).space).delta_to_target(d), d)
    assert torch.equal(scaled.decode(d), 2 * d)


def _row(rec: float, fid: float, spread: float = 0.0, **kw) -> dict:
    return {"recovered": rec, "fidelity": fid, "diversity": 1.0, "fidelity_vs_adapted": fid,
            "spread": {"recovered": spread, "fidelity": 0.0}, "target": "t", "reference": "alone:t", **kw}


def test_matching_and_winning_read_the_seeds_noise():
    res = {"references": {"alone:t": {"fidelity": 1.0, "diversity": 1.0}},
           "eval": {"images_per_seed": 100, "seeds": [1, 2]}}
    best = _row(1.0, 0.99)
    assert compare_tables.matches(res, _row(0.97, 0.99), best)  # within the 0.05 floor
    assert not compare_tables.matches(res, _row(0.80, 0.99), best)
    assert compare_tables.matches(res, _row(0.80, 0.99, spread=0.3), best)  # a noisy rule: not told apart
    assert not compare_tables.matches(res, _row(1.0, 0.90), best)  # outside the fidelity bound
    assert compare_tables.winner(res, _row(1.0, 0.99), _row(0.5, 0.99), ("a", "b")) == "a"
    assert compare_tables.winner(res, _row(1.0, 0.90), _row(0.5, 0.99), ("a", "b")) == "b"
    assert compare_tables.winner(res, _row(1.0, 0.99), _row(0.98, 0.99), ("a", "b")) == "tie"
    # a route that changes nothing keeps the target's fidelity but wins nothing
    assert compare_tables.winner(res, _row(1.0, 0.90), _row(0.01, 0.99), ("a", "b")) == "neither"
    assert compare_tables.winner(res, _row(0.9, 0.99), _row(0.01, 0.99), ("a", "b")) == "a"


def test_pipeline_saves_and_loads_a_model_exactly(tmp_path, toy_models):
    zoo, _ = toy_models
    pipeline.save_model(zoo["v_unet"], tmp_path / "v.safetensors")
    fresh = models.build(models.specs(toy=True)["v_unet"])
    with torch.no_grad():
        for p in fresh.net.parameters():
            p.add_(1.0)
    pipeline.load_model(fresh, tmp_path / "v.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(fresh.net.state_dict().values(),
                                                 zoo["v_unet"].net.state_dict().values(), strict=True))


def test_each_part_is_planned_to_fit_one_nine_minute_gpu_call():
    """Every stage of each full-size part (training budgets and their overheads, then the grid at the recorded
    runs' cost) is planned to end 15 s before the part's deadline (the training walls vary by about that much);
    the deadline leaves a minute of the ten-minute call to the imports, the figures and the page."""
    for part in (1, 2):
        cfg = compare.study_config(part, toy=False, images=None, deadline=None)
        plan = compare.plan(cfg, part, len(compare.EVAL_SEEDS))
        assert list(plan["stages_s"]) == list(compare.STAGES[part])
        assert plan["total_s"] <= cfg.deadline_s - 15, (part, plan)
        assert cfg.deadline_s <= 600 - 60
    # every stage runs in one part at least; the λ sweep and the merged file in both
    stages = set(compare.STAGES[1]) | set(compare.STAGES[2])
    assert {"adaptive", "gap_colour", "gap_scale", "gap_steps", "dit"} <= stages
    assert {"references", "lambda", "naive"} <= set(compare.STAGES[1]) & set(compare.STAGES[2])


RECORDED = {part: Path(__file__).parent.parent / "docs" / "fidelity-runs" / f"compare-budget{part}-h100.json"
            for part in (1, 2)}


def test_the_cost_estimates_reproduce_the_recorded_runs():
    """The plan's costs against the two parts run on one H100: each configuration kind's estimate is at or above
    its mean measured time and at most 20 % above it, and the training estimate (budgets plus overheads) lands
    within −3 %…+6 % of the recorded wall time from the classifier to the last adapter written."""
    runs = [json.loads(RECORDED[p].read_text()) for p in (1, 2)]
    measured: dict[str, list[float]] = {}
    for res in runs:
        for row in res["runs"]:
            if row["stage"] != "gap_steps":  # 20-step configurations only
                measured.setdefault(row["method"], []).append(row["seconds"])
    for method, est in compare.EST_CONFIG_S.items():
        mean = sum(measured[method]) / len(measured[method])
        assert mean <= est <= 1.2 * mean, (method, est, mean)
    for part, res in zip((1, 2), runs, strict=True):
        cfg = compare.study_config(part, toy=False, images=None, deadline=None)
        plan = compare.plan(cfg, part, len(compare.EVAL_SEEDS))
        t = res["timings"]
        recorded = t["adapter_striped_loha"] - t["measures"]
        estimated = sum(plan["train_s"].values())
        assert 0.97 * recorded <= estimated <= 1.06 * recorded, (part, estimated, recorded)
        assert compare.EST_MEASURES_S["trained"] >= t["measures"]
        assert t["references"] - t["adapter_striped_loha"] <= compare.EST_FIXED_S["references"]


def test_a_run_cut_at_the_deadline_still_makes_its_page(parts):
    """The GPU run may stop anywhere: the tables and the README's start-here table render from what ran."""
    first, second, _ = parts
    for res in (first, second):
        for keep in ("lambda", "naive", None):
            cut = dict(res, runs=[r for r in res["runs"] if r["stage"] == keep], skipped=[{"stage": "adaptive"}])
            cut.pop("dit")
            cut["summary"] = compare_tables.summarise(cut)
            text = compare_tables.markdown([cut])
            assert "Configurations skipped at the deadline: adaptive: 1." in text
            assert compare_tables.start_here([cut]).count("\n") == 4  # header, rule, three targets


def test_a_gap_is_read_net_of_what_the_adaptation_costs_the_source():
    refs = {"alone:source": {"fidelity": 0.95, "diversity": 0.5}, "adapted:red_lora": {"fidelity": 0.76},
            "alone:v_unet": {"fidelity": 0.95, "diversity": 0.4}}
    res = {"references": refs}
    run = {"target": "v_unet", "adaptation": "red_lora", "fidelity": 0.80, "diversity": 0.4}
    assert not compare_tables.acceptable(run, refs["alone:v_unet"], "relative")  # 0.80 < 0.95 · 0.95
    assert compare_tables.holds_on_gap(res, run)  # the adapter itself keeps 80 %: 0.80 ≥ 0.95 · 0.95 · 0.8
    assert not compare_tables.holds_on_gap(res, {**run, "fidelity": 0.70})
    assert not compare_tables.holds_on_gap(res, {**run, "diversity": 0.3})
    refs["adapted:red_lora"]["fidelity"] = 0.99  # an adapter that helps shapes does not lower the floor
    assert not compare_tables.holds_on_gap(res, {**run, "fidelity": 0.88})
