"""The time-budgeted quality run (experiments.quality) and its report: the summary of hand-made curves,
the README verdict read from it, every compared method validating, and a tiny end-to-end run."""

from __future__ import annotations

import copy
import json

import pytest

from experiments import compose, quality, report
from experiments import methods as M


def _curve(points):
    return [{"step": s, "time_s": t, "loss": l} for s, t, l in points]


def _payload(fast_time: float, rule_loss: float, control_loss: float) -> dict:
    """Three seeds; standard reaches 3.0 at step 10 / 10 s; the rule is twice as fast per step and ends at
    ``rule_loss`` at 10 s (reaching 3.0 at ``fast_time``); its control ends at ``control_loss``."""
    runs = {"standard_fused": {}, "importance_sequence": {}, "random_sequence": {}}
    for seed in range(3):
        j = 0.01 * seed  # seed-to-seed jitter
        runs["standard_fused"][seed] = _curve([(0, 0, 5.0), (5, 5, 4.0 + j), (10, 10, 3.0 + j)])
        runs["importance_sequence"][seed] = _curve([(0, 0, 5.0), (10, fast_time, 3.0 + j), (20, 10, rule_loss + j)])
        runs["random_sequence"][seed] = _curve([(0, 0, 5.0), (10, 5, 3.9 + j), (20, 10, control_loss + j)])
    budgets = {0: 10.0, 1: 10.0, 2: 10.0}
    plan = {"standard_fused": 10, "importance_sequence": 20, "random_sequence": 20}
    per_step = {s: {m: [0.5] for m in runs} for s in budgets}
    summary = quality.summarize(runs, budgets, plan, list(runs), 10, per_step)
    meta = {m: {"label": M.METHODS[m].label, "kind": M.METHODS[m].kind,
                "overrides": ["+bench=tiny", *M.method_overrides(m, "cpu")]} for m in runs}
    return {"experiment": "quality-mini", "kind": "quality", "protocol": "time-budget", "summary": summary,
            "methods": meta, "settings": {"seeds": [0, 1, 2], "steps": 10},
            "shape": {"model": "llama h8 L2"}, "environment": {"device_tag": "cpu"}}


def test_summary_time_to_target_and_paired_comparisons_from_hand_made_curves():
    s = _payload(fast_time=6.0, rule_loss=2.8, control_loss=2.9)["summary"]
    rule = s["importance_sequence"]
    assert rule["time_to_target"]["ratio_mean"] == pytest.approx(0.6) and rule["time_to_target"]["reached"] == 3
    assert rule["loss_at_equal_time"]["mean"] == pytest.approx(2.81)
    assert rule["paired_vs_baseline_time"]["mean"] == pytest.approx(-0.2)
    assert rule["paired_vs_baseline_time"]["wins"] == 3
    assert rule["paired_vs_control_time"]["mean"] == pytest.approx(-0.1) and rule["control"] == "random_sequence"
    assert rule["paired_vs_baseline_steps"]["mean"] == pytest.approx(0.0)  # both 3.0 + j at step 10
    assert rule["goal"]["ok"] is True
    base = s["standard_fused"]
    assert base["time_to_target"]["ratio_mean"] == pytest.approx(1.0)
    ctrl = s["random_sequence"]
    assert ctrl["time_to_target"]["ratio_mean"] == pytest.approx(0.5 + 0.5 * 0.9 / 1.0)  # 3.0 reached between 5 and 10 s
    assert "goal" not in ctrl


def test_verdict_picks_a_rule_only_when_it_meets_the_goal():
    good = _payload(fast_time=6.0, rule_loss=2.8, control_loss=2.9)
    text = report.verdict_block([good])
    assert "pick `cggr.selection.unit=sequence cggr.selection.strategy=importance" in text
    assert "0.60x its wall-clock" in text
    slow = _payload(fast_time=8.0, rule_loss=2.8, control_loss=2.9)  # 0.8x: not <= 0.75x
    text = report.verdict_block([slow])
    assert "mini (llama h8 L2, cpu, 3 seeds): none" in text and "0.80x on average" in text
    behind = _payload(fast_time=6.0, rule_loss=2.95, control_loss=2.9)  # loses to its control
    text = report.verdict_block([behind])
    assert ": none" in text
    # its control ended 0.1 below standard at equal time in every seed: said next to "none"
    assert "Random selection did better than standard here: random-sequence control (-0.100 at equal time, " \
           "3/3 seeds lower, standard's final loss at 0.95x its time (3/3 seeds))" in text
    worse_control = _payload(fast_time=8.0, rule_loss=2.8, control_loss=3.1)  # control above standard
    assert "Random selection did better" not in report.verdict_block([worse_control])
    assert "stays the upstream PR's" in report.verdict_block([good])
    assert "No time-budgeted quality results yet" in report.verdict_block([])
    lines = report.quality_findings(good)
    assert any("reached standard's final loss in 3/3 seeds, at 0.60x" in x and "meets the goal" in x for x in lines)


def test_best_rules_and_their_controls_for_the_follow_up_run():
    from experiments import quality_stats as Q

    good = _payload(fast_time=6.0, rule_loss=2.8, control_loss=2.9)
    assert Q.best_with_controls(good, k=2) == ["standard_fused", "importance_sequence", "random_sequence"]
    kinds = {"a": "cggr", "b": "cggr", "c": "cggr", "ctrl": "control"}
    summary = {  # a: reached in 2/3 seeds; b: in 3/3 at 0.9x; c: in 3/3 at 0.8x; the control is never ranked
        "a": {"time_to_target": {"n": 3, "reached": 2, "ratio_mean": 0.5}},
        "b": {"time_to_target": {"n": 3, "reached": 3, "ratio_mean": 0.9}},
        "c": {"time_to_target": {"n": 3, "reached": 3, "ratio_mean": 0.8}},
        "ctrl": {"time_to_target": {"n": 3, "reached": 3, "ratio_mean": 0.1}},
    }
    assert Q.rank_rules(summary, kinds) == ["c", "b", "a"]
    summary["a"]["goal"] = {"ok": True}
    assert Q.rank_rules(summary, kinds)[0] == "a"


def test_projected_time_counts_the_budget_and_the_equal_steps_point():
    calib = {"standard_fused": 1.0, "a": 0.5, "b": 2.0}
    plan = {"standard_fused": 10, "a": 20, "b": 5}
    # W = 10 s; a: 20 steps x 0.5 = 10 s; b: to step 10 at 2 s = 20 s; two seeds
    assert quality.projected_s(calib, plan, steps=10, seeds=2) == pytest.approx(80.0)


def test_every_method_validates_and_every_rule_names_a_control_of_its_unit():
    base = compose.base_overrides("tiny", "cpu", [])
    for name, meta in M.METHODS.items():
        r = compose.resolve_method(name, base, "cpu", reference="/tmp/some-reference")
        sel = r["config"]["cggr"]["selection"]
        if meta.kind == "cggr":
            ctrl = compose.resolve_method(meta.control, base, "cpu")["config"]["cggr"]
            assert M.METHODS[meta.control].kind == "control"
            assert ctrl["selection"]["unit"] == sel["unit"] and ctrl["scoring"] == "random"
    with pytest.raises(SystemExit, match="rho_token needs a reference model: pass --reference"):
        compose.resolve_method("rho_token", base, "cpu")


@pytest.mark.slow
def test_tiny_end_to_end_run_writes_curves_schedules_and_the_summary(tmp_path, one_thread):
    code = quality.main([
        "--preset", "tiny", "--steps", "8", "--seeds", "0", "--evals", "2", "--eval-batches", "1",
        "--calibrate-steps", "1", "--cggr-warmup", "0", "--out", str(tmp_path),
        "--methods", "importance_sequence,standard_fused,random_sequence",
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64",
        "data.batch_size=4", "data.block_size=32", "cggr.router.num_layers=1", "optim.warmup_steps=0", "optim.lr=0.01",
        f"data.cache_dir={tmp_path}/tok",
    ])
    assert code == 0
    p = json.loads((tmp_path / "quality-tiny-cpu.json").read_text())
    assert p["settings"]["methods"][0] == "standard_fused"  # the baseline first
    assert p["shape"]["model"].startswith("llama h32 L2 V")  # the model as built
    plan = p["raw"]["schedule_steps"]
    assert plan["standard_fused"] == 8 and all(n >= 1 for n in plan.values())
    budget = p["raw"]["wall_budget_s"]["0"]
    for m, seeds in p["raw"]["curves"].items():
        curve = seeds["0"]
        assert curve[0]["step"] == 0 and curve[-1]["step"] >= max(8, plan[m])
        assert curve[-1]["time_s"] >= budget or curve[-1]["step"] >= 8 * 4  # ran to the budget or the cap
        assert any(c["step"] == 8 for c in curve)  # the equal-steps evaluation
    s = p["summary"]
    assert s["standard_fused"]["time_to_target"]["per_seed"]["0"]["ratio"] <= 1.0
    assert "paired_vs_control_time" in s["importance_sequence"]
    md = (tmp_path / "quality-tiny-cpu.md").read_text()
    assert md.count("|") > 20
    assert "at n = 1 it cannot go below 1" in md  # one seed: the sign test's smallest p is 2 x 1/2


def _seed_part(payload: dict, seed: int) -> dict:
    """The run as if it had been made with one seed only (by hand: every per-seed entry filtered)."""
    part = copy.deepcopy(payload)
    key = str(seed)
    part["settings"]["seeds"] = [seed]
    raw = part["raw"]
    raw["curves"] = {m: {key: seeds[key]} for m, seeds in raw["curves"].items()}
    for name in ("wall_budget_s", "initial_weights_fingerprint", "step_times_s", "failed"):
        raw[name] = {key: raw[name][key]}
    return part


@pytest.mark.slow
def test_seeds_run_apart_and_merged_give_the_run_of_both_seeds(tmp_path, one_thread):
    """A 2-seed run, cut into two 1-seed runs and merged back, has the 2-seed run's summary (paired
    statistics, sign tests, time to target) and table. Runs that differ in plan or share a seed are
    refused by name."""
    from experiments import quality_merge, quality_report

    code = quality.main([
        "--preset", "tiny", "--steps", "6", "--seeds", "0,1,2", "--evals", "2", "--eval-batches", "1",
        "--calibrate-steps", "1", "--cggr-warmup", "0", "--out", str(tmp_path),
        "--methods", "standard_fused,random_sequence",
        "model.num_layers=2", "model.hidden_size=32", "model.num_heads=4", "model.intermediate_size=64",
        "data.batch_size=4", "data.block_size=32", "optim.warmup_steps=0", "optim.lr=0.01",
        f"data.cache_dir={tmp_path}/tok",
    ])
    assert code == 0
    both = json.loads((tmp_path / "quality-tiny-cpu.json").read_text())
    parts = [_seed_part(both, 0), _seed_part(both, 1), _seed_part(both, 2)]
    # a run describes its methods at its own first seed: as a run of seed 1 alone would
    for meta in parts[1]["methods"].values():
        meta["overrides"] = [o.replace("seed=0", "seed=1") for o in meta["overrides"]]
        meta["config"]["seed"] = meta["config"]["cggr"]["seed"] = 1
    merged = quality_merge.merge(parts)
    assert merged["settings"]["seeds"] == [0, 1, 2]
    assert json.loads(json.dumps(merged["summary"])) == both["summary"]
    assert merged["summary"]["random_sequence"]["paired_vs_baseline_time"]["n"] == 3
    table = quality_report.markdown(merged)
    assert "Pooled from 3 runs" in table
    again = quality_merge.merge([quality_merge.merge(parts[:2]), parts[2]])  # a merged result merged again
    assert json.loads(json.dumps(again["summary"])) == both["summary"]
    assert [run["seeds"] for run in again["raw"]["runs"]] == [[0], [1], [2]]
    assert table.split("\n| method")[1] == quality_report.markdown(both).split("\n| method")[1]

    files = []
    for i, part in enumerate(parts):
        files.append(tmp_path / f"part{i}.json")
        files[-1].write_text(json.dumps(part))
    assert quality_merge.main([*map(str, files), "--name", "merged", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "merged-cpu.json").read_text())["summary"] == both["summary"]

    with pytest.raises(quality_merge.MergeError, match="seed 0 is in run 1 and run 2"):
        quality_merge.merge([parts[0], parts[0]])
    other = copy.deepcopy(parts[1])
    other["settings"]["steps"] = 7
    with pytest.raises(quality_merge.MergeError, match="settings.steps differs: 6 in run 1, 7 in run 2"):
        quality_merge.merge([parts[0], other])
    other = copy.deepcopy(parts[1])
    other["methods"]["random_sequence"]["config"]["cggr"]["min_tokens_ratio"] = 0.5
    with pytest.raises(quality_merge.MergeError, match="method random_sequence is configured differently"):
        quality_merge.merge([parts[0], other])
    other = copy.deepcopy(parts[1])
    other["environment"]["versions"]["torch"] = "0.0"
    with pytest.raises(quality_merge.MergeError, match="environment.versions differs"):
        quality_merge.merge([parts[0], other])
