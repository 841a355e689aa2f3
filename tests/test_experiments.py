"""The benchmark harness's pure parts against hand-worked examples; OOM handling with fakes.

Nothing here is timed and no number measured on this machine is asserted: the examples are small
enough to work out by hand (see the comments).
"""

import json
import math
import os
import re
import sys
import signal

import pytest
import torch

from experiments import compose, isolate, methods, stats
from experiments import results_io as rio
from experiments.sweep import load_sweep, plan_points

MiB = 2**20


# ---- statistics and summaries -------------------------------------------------------------------


def test_throughput_summary_medians_and_ratios():
    # medians: fused 2, naive 4, cggr 1 -> tokens/s 50, 25, 100; cggr is 2x fused and 4x naive
    s = stats.throughput_summary(
        {"standard_fused": [2.0, 1.0, 3.0], "standard_naive": [4.0, 4.0, 5.0], "cggr_combined": [1.0, 1.0, 9.0]},
        tokens_per_step=100,
    )
    assert s["standard_fused"]["median_step_s"] == 2.0
    assert s["standard_fused"]["tokens_per_s"] == 50.0
    assert s["standard_naive"]["tokens_per_s"] == 25.0
    assert s["cggr_combined"]["speedup_vs_standard_fused"] == 2.0
    assert s["cggr_combined"]["speedup_vs_standard_naive"] == 4.0
    assert s["standard_naive"]["speedup_vs_standard_fused"] == 0.5
    assert s["cggr_combined"]["max_step_s"] == 9.0  # the outlier is kept in the raw range, not the median


def _pt(method, b, status="ok", peak=None, tps=None):
    return {"method": method, "batch_size": b, "status": status,
            "peak_bytes": None if peak is None else peak * MiB, "tokens_per_s": tps}


def test_sweep_summary_largest_batch_within_budget():
    budget = 250 * MiB
    points = [
        _pt("standard_fused", 8, peak=100, tps=1000.0),
        _pt("standard_fused", 16, peak=200, tps=1500.0),
        _pt("standard_fused", 32, status="oom"),
        _pt("cggr_combined", 8, peak=80, tps=900.0),
        _pt("cggr_combined", 16, peak=150, tps=1400.0),
        _pt("cggr_combined", 32, peak=260, tps=1800.0),  # ran, but 260 > 250: does not fit
        _pt("cggr_sequence", 8, peak=60, tps=3000.0),
        _pt("cggr_sequence", 16, peak=90, tps=2800.0),  # largest fitting is not the fastest
        _pt("random_token", 8, status="killed"),
    ]
    s = stats.sweep_summary(points, budget)
    assert s["standard_fused"]["best_batch_size"] == 16 and s["standard_fused"]["tokens_per_s"] == 1500.0
    assert s["cggr_combined"]["best_batch_size"] == 16
    assert s["cggr_combined"]["tokens_per_s_vs_baseline"] == pytest.approx(1400 / 1500)
    assert s["cggr_sequence"]["best_batch_size"] == 16
    assert s["cggr_sequence"]["fastest_fitting_batch_size"] == 8
    assert s["cggr_sequence"]["tokens_per_s_vs_baseline"] == pytest.approx(2800 / 1500)
    assert s["random_token"]["best_batch_size"] is None and s["random_token"]["tokens_per_s_vs_baseline"] is None
    assert s["standard_fused"]["bound"] == "budget" and s["cggr_combined"]["bound"] == "budget"
    assert s["cggr_sequence"]["bound"] == "grid"  # nothing above 16 was in its points


def test_sweep_summary_says_when_the_largest_batch_was_only_the_last_one_measured():
    """A run that hit its time limit before B=4 must not read as 'B=4 does not fit' (seen on the H200)."""
    budget = 100 * MiB
    points = [_pt("standard_fused", 2, peak=40, tps=10.0), _pt("standard_fused", 4, peak=80, tps=20.0),
              _pt("random_sequence", 2, peak=20, tps=12.0), _pt("random_sequence", 4, status="not_run"),
              _pt("cggr_final", 2, peak=60, tps=9.0), _pt("cggr_final", 4, status="error")]
    s = stats.sweep_summary(points, budget)
    assert s["random_sequence"]["best_batch_size"] == 2 and s["random_sequence"]["bound"] == "unmeasured"
    assert s["random_sequence"]["largest_tried"] == 2  # the not-run point is not a tried one
    assert s["cggr_final"]["bound"] == "unmeasured"
    assert "may fit more" in stats.bound_note(s["random_sequence"]) and stats.bound_note({"bound": "budget"}) == ""


def test_fit_status_words():
    budget = 100 * MiB
    assert stats.fit_status(_pt("m", 1, peak=100, tps=1.0), budget) == "fits"  # at the budget fits
    assert stats.fit_status(_pt("m", 1, peak=101, tps=1.0), budget).startswith("does not fit: peak 101 MiB")
    assert stats.fit_status(_pt("m", 1, status="oom"), budget) == "does not fit: out of memory"
    assert stats.fit_status({"status": "killed", "error": "x"}, budget) == "does not fit: x"
    assert stats.fit_status({"status": "error", "error": "boom"}, budget) == "error: boom"


def test_interpolation_and_curve_at():
    curve = [{"step": 0, "time_s": 0.0, "loss": 10.0}, {"step": 10, "time_s": 5.0, "loss": 8.0},
             {"step": 20, "time_s": 10.0, "loss": 6.0}]
    at = stats.curve_at(curve, "time_s", 7.5)  # halfway between the 2nd and 3rd evaluations
    assert at["loss"] == pytest.approx(7.0) and at["step"] == pytest.approx(15.0)
    assert at["ppl"] == pytest.approx(math.exp(7.0))
    assert stats.curve_at(curve, "step", 20)["loss"] == 6.0
    assert stats.curve_at(curve, "time_s", 10.5) is None  # past the last evaluation: no extrapolation
    assert stats.interpolate_at([1.0], [3.0], 1.0) == 3.0


def test_quality_summary_two_seeds():
    # seed 0: loss 4 at step 10; budget 6 s lies between (5 s, 4.0) and (10 s, 3.0) -> 3.8
    # seed 1: loss 6 at step 10; budget 5 s hits an evaluation exactly -> 6.0
    runs = {"cggr_combined": {
        0: [{"step": 0, "time_s": 0.0, "loss": 9.0}, {"step": 10, "time_s": 5.0, "loss": 4.0},
            {"step": 20, "time_s": 10.0, "loss": 3.0}],
        1: [{"step": 0, "time_s": 0.0, "loss": 9.0}, {"step": 10, "time_s": 5.0, "loss": 6.0}],
    }}
    s = stats.quality_summary(runs, equal_steps=10, wall_budget_s={0: 6.0, 1: 5.0})["cggr_combined"]
    assert s["loss_at_equal_steps"]["mean"] == pytest.approx(5.0)
    assert s["loss_at_equal_steps"]["std"] == pytest.approx(math.sqrt(2.0))  # sample std of 4 and 6
    assert s["loss_at_equal_time"]["mean"] == pytest.approx((3.8 + 6.0) / 2)
    assert s["steps_at_equal_time"]["mean"] == pytest.approx((12.0 + 10.0) / 2)


def test_quality_summary_method_that_never_reached_the_budget():
    runs = {"m": {0: [{"step": 0, "time_s": 0.0, "loss": 9.0}, {"step": 10, "time_s": 2.0, "loss": 5.0}]}}
    s = stats.quality_summary(runs, equal_steps=10, wall_budget_s={0: 3.0})["m"]
    assert s["loss_at_equal_time"]["n"] == 0 and s["loss_at_equal_time"]["mean"] is None


def test_mean_spread_single_value_has_no_spread():
    assert stats.mean_spread([2.5]) == {"n": 1, "mean": 2.5, "std": None, "min": 2.5, "max": 2.5}


def test_md_table_renders_none_as_dash():
    t = rio.md_table(["a", "b"], [[1, None]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | — |"]


def test_plan_points_ascend_and_rotate_methods():
    assert plan_points(["a", "b"], [8, 2]) == [(2, "a"), (2, "b"), (8, "b"), (8, "a")]


# ---- methods and configs ------------------------------------------------------------------------


def test_method_overrides_substitute_the_device_fused_loss():
    assert methods.method_overrides("standard_fused", "cpu") == ["cggr.enabled=false", "loss.impl=torch"]
    assert methods.method_overrides("cggr_combined", "cuda") == ["cggr.scoring=combined", "loss.impl=triton"]
    with pytest.raises(ValueError, match="unknown method"):
        methods.method_overrides("nope", "cpu")
    with pytest.raises(SystemExit):
        methods.parse_methods("standard_fused,typo")
    assert methods.parse_methods("all") == list(methods.METHODS)
    no_ref = methods.parse_methods("no_reference")
    assert "rho_token" not in no_ref and "standard_fused" in no_ref
    assert set(no_ref) | set(methods.NEEDS_REFERENCE) == set(methods.METHODS)


def test_resolve_method_validates_with_the_package_and_fails_loudly():
    base = compose.base_overrides("tiny", "cpu", [])
    ok = compose.resolve_method("standard_fused", base, "cpu")
    assert ok["config"]["loss"]["impl"] == "torch" and ok["config"]["cggr"]["enabled"] is False
    assert ok["config"]["data"]["batch_size"] == 16  # the preset's shape (presets/bench/tiny.yaml)
    with pytest.raises(SystemExit, match="cggr.scoring='no_such_scorer'"):
        compose.resolve_method("standard_fused", [*base, "cggr.scoring=no_such_scorer"], "cpu")
    # the trainer's settings too, which the harness reads (a sweep ran its whole grid into errors and
    # wrote them over the results; accumulate_grad_batches=0 was read as 1), as the job checks them
    with pytest.raises(SystemExit, match=r"trainer.precision='bf17': Precision 'bf17' is invalid"):
        compose.resolve_method("standard_fused", [*base, "trainer.precision=bf17"], "cpu")
    with pytest.raises(SystemExit, match=r"trainer.accumulate_grad_batches=0: must be an integer >= 1"):
        compose.resolve_method("standard_fused", [*base, "trainer.accumulate_grad_batches=0"], "cpu")
    # a misspelt key gets the job's line, without Hydra's "+key" advice that would then be refused
    with pytest.raises(SystemExit, match=r"model.num_layer: no such setting; did you mean model.num_layers\?$"):
        compose.resolve_method("standard_fused", [*base, "model.num_layer=2"], "cpu")


def test_sweep_reads_options_among_its_words_and_names_a_list_it_cannot_read(monkeypatch):
    from experiments import sweep

    with pytest.raises(SystemExit, match=r"sweep.batch_sizes=\[16,32: cannot read .* 'sweep.batch_sizes=\[16,32\]'"):
        sweep.load_sweep(["sweep=cpu_tiny", "sweep.batch_sizes=[16,32"])
    seen = {}
    monkeypatch.setattr(sweep, "load_sweep", lambda words: seen.update(words=words) or sys.exit("stop"))
    with pytest.raises(SystemExit):  # options after the words, as the other experiments take them
        sweep.main(["sweep=cpu_tiny", "--out", "/tmp/unused", "sweep.batch_sizes=[2]", "--reference", "/tmp/ref"])
    assert seen["words"] == ["sweep=cpu_tiny", "sweep.batch_sizes=[2]"]


def test_load_sweep_rejects_unknown_keys_and_applies_dot_overrides():
    s, rest = load_sweep(["sweep=cpu_tiny", "sweep.batch_sizes=[2,4]", "model.num_layers=2"])
    assert s["batch_sizes"] == [2, 4] and rest == ["model.num_layers=2"]
    with pytest.raises(SystemExit, match="unknown key"):
        load_sweep(["sweep=cpu_tiny", "sweep.bogus=1"])
    with pytest.raises(SystemExit, match="available"):
        load_sweep(["sweep=does_not_exist"])
    # the grid sets the batch size of every point: one given beside it was replaced without a word
    with pytest.raises(SystemExit, match=r"data.batch_size=8: each point of the grid sets data.batch_size"):
        load_sweep(["sweep=cpu_tiny", "data.batch_size=8"])


# ---- out of memory is "does not fit", never a crash ----------------------------------------------


def fake_cuda_oom(spec):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def fake_host_oom(spec):
    raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")


def fake_bug(spec):
    raise ValueError("a real bug")


def fake_ok(spec):
    return {"status": "ok", "peak_bytes": 1, "tokens_per_s": 1.0}


def fake_sigkill(spec):
    os.kill(os.getpid(), signal.SIGKILL)


def test_guarded_maps_oom_to_status_and_keeps_other_errors():
    assert isolate.guarded(fake_cuda_oom, {})["status"] == "oom"
    assert isolate.guarded(fake_host_oom, {})["status"] == "oom"
    assert isolate.guarded(lambda s: (_ for _ in ()).throw(MemoryError()), {})["status"] == "oom"
    bug = isolate.guarded(fake_bug, {})
    assert bug["status"] == "error" and "a real bug" in bug["error"]
    assert isolate.guarded(fake_ok, {})["status"] == "ok"


def test_run_isolated_survives_oom_kill_and_watchdog():
    pre = ("experiments.isolate",)  # a light forkserver for the test
    here = __name__
    assert isolate.run_isolated(f"{here}:fake_cuda_oom", {}, timeout_s=120, preload=pre)["status"] == "oom"
    assert isolate.run_isolated(f"{here}:fake_ok", {}, timeout_s=120, preload=pre)["status"] == "ok"
    killed = isolate.run_isolated(f"{here}:fake_sigkill", {}, timeout_s=120, preload=pre)
    assert killed["status"] == "killed" and "signal 9" in killed["error"]
    capped = isolate.run_isolated(f"{here}:fake_ok", {"rss_kill_bytes": 1}, timeout_s=120, preload=pre)
    assert capped["status"] == "killed" and "hard cap" in capped["error"]
    assert stats.fit_status(killed, 1) .startswith("does not fit")


def test_readme_results_block_is_replaced_between_markers_only(tmp_path, monkeypatch):
    from experiments import report

    monkeypatch.setattr(report, "readme_block", lambda results: "NEW TABLE")
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nold table\n{report.README_END}\noutro\n")
    assert report.update_readme(readme, [])
    assert readme.read_text() == f"intro\n{report.README_START}\nNEW TABLE\n{report.README_END}\noutro\n"
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers here\n")
    assert not report.update_readme(plain, [])
    assert plain.read_text() == "no markers here\n"


def test_report_on_another_results_folder_leaves_the_readme_alone(tmp_path, monkeypatch):
    """A rehearsal or GPU results folder gets its own RESULTS file; only experiments/results
    (the committed runs) may rewrite the README's summary block."""
    import shutil
    from pathlib import Path

    from experiments import report

    other, committed = tmp_path / "gpu_out", tmp_path / "committed"
    for folder in (other, committed):  # copies: the report rewrites each experiment's .md beside its JSON
        folder.mkdir()
        shutil.copy(rio.RESULTS_DIR / "throughput-tiny-cpu.json", folder)
    monkeypatch.setattr(rio, "RESULTS_DIR", committed)  # stands for experiments/results
    touched = []
    monkeypatch.setattr(report, "make_plots", lambda results: None)
    monkeypatch.setattr(report, "update_readme", lambda path, results: touched.append(path) or True)
    assert report.main(["--results", str(other)]) == 0
    assert touched == [] and (other / "RESULTS.md").is_file()
    assert report.main(["--results", str(committed), "--output", str(tmp_path / "R.md")]) == 0
    assert [Path(p).name for p in touched] == ["README.md"]


def test_readme_shapes_line_is_read_from_the_results():
    from experiments.report import shapes_line

    def result(experiment, kind, batch, seeds=None, steps=None, tag="cpu", model="llama h8 L2", router=1):
        shape = {"model": model, "model_source": "random", "batch_size": batch, "block_size": 64,
                 "min_tokens_ratio": 0.5, "router_layers": router}
        return {"experiment": experiment, "kind": kind, "shape": shape, "environment": {"device_tag": tag},
                "settings": {"seeds": seeds, "steps": steps}}

    line = shapes_line([result("throughput-mini", "throughput", 16), result("quality-mini", "quality", 4, [0, 5], 30)])
    assert line == ("mini = llama h8 L2 (random init), 16x64 tokens, quality 4x64, 2 seeds, 30 steps; "
                    "kept ratio 0.5, 1-layer router")
    # the same name on a GPU (another vocabulary there) is its own entry; a router depth other than
    # the usual one is said beside its shape
    line = shapes_line([result("throughput-mini", "throughput", 16),
                        result("throughput-mini", "throughput", 8, tag="h200", model="llama h8 L2 V99"),
                        result("quality-deep", "quality", 4, [0], 30, router=2)])
    assert line == ("deep = llama h8 L2 (random init), quality 4x64, 1 seed, 30 steps, kept ratio 0.5, 2-layer router; "
                    "mini = llama h8 L2 (random init), 16x64 tokens; "
                    "mini (h200) = llama h8 L2 V99 (random init), 8x64 tokens; "
                    "kept ratio 0.5, 1-layer router (where not said)")


def test_readme_table_pivots_methods_by_shape_from_hand_made_results():
    from experiments.report import readme_table

    def res(exp, kind, summary):
        meta = {m: {"label": m.replace("_", " ")} for m in summary}
        return {"experiment": exp, "kind": kind, "environment": {"device_tag": "cpu"}, "methods": meta,
                "summary": summary}

    results = [
        res("throughput-tiny", "throughput", {"standard_fused": {"speedup_vs_standard_fused": 1.0},
                                              "random_sequence": {"speedup_vs_standard_fused": 3.456}}),
        res("quality-tiny", "quality", {
            "standard_fused": {"loss_at_equal_time_minus_baseline": 0.0,
                               "time_to_target": {"n": 2, "reached": 2, "ratio_mean": 1.0}},
            "random_sequence": {"loss_at_equal_time_minus_baseline": 0.1234,
                                "time_to_target": {"n": 2, "reached": 0}}}),
        res("quality-mid", "quality", {"random_sequence": {"loss_at_equal_time_minus_baseline": -0.05,
                                                           "time_to_target": {"n": 3, "reached": 2, "ratio_mean": 0.7}}}),
        res("sweep-big", "sweep", {"standard_fused": {"largest_fitting_batch": 8}}),  # nothing this table shows
    ]
    lines = readme_table(results).splitlines()
    assert lines[0] == ("| method | tiny: step rate / Δ loss @ equal time / time to std's loss "
                        "| mid: step rate / Δ loss @ equal time / time to std's loss |")
    assert lines[2] == "| standard fused | 1.00x / +0.000 / 1.00x (2/2) | — |"
    assert lines[3] == "| random sequence | 3.46x / +0.123 / not reached (0/2) | — / -0.050 / 0.70x (2/3) |"  # no step rate
    assert len(lines) == 4  # methods without a result anywhere get no row, shapes without one no column


def test_hand_written_notes_are_included_once(tmp_path, monkeypatch):
    import shutil

    from experiments import report

    shutil.copy(rio.RESULTS_DIR / "throughput-tiny-cpu.json", tmp_path)
    (tmp_path / report.NOTES_FILE).write_text("## What changed\n\nA sentence.\n")
    monkeypatch.setattr(report, "make_plots", lambda results: None)
    assert report.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count("## What changed\n\nA sentence.") == 1
    assert report.NOTES_FILE not in text  # not listed among the other result files


def test_a_correction_made_after_the_run_is_printed_above_its_table(tmp_path, monkeypatch):
    """A derived figure recomputed after the run (the JSON's "corrections") is said where the table is read."""
    from experiments import report

    p = json.loads((rio.RESULTS_DIR / "throughput-tiny-cpu.json").read_text())
    p["corrections"] = ["2026-01-01: a figure recomputed"]
    (tmp_path / "throughput-tiny-cpu.json").write_text(json.dumps(p))
    monkeypatch.setattr(report, "make_plots", lambda results: None)
    assert report.main(["--results", str(tmp_path)]) == 0
    text = (tmp_path / "RESULTS.md").read_text()
    said = text.index("Corrected after the run: 2026-01-01: a figure recomputed")
    assert text.count("Corrected after the run:") == 1 and said < text.index("| method | kind |")


# ---- the loss benchmark's variants and its GEMM bound -------------------------------------------


@pytest.mark.parametrize("module, args, message", [
    ("quality", ["--seeds", "0,x"], "argument --seeds: '0,x': expected comma-separated seeds >= 0"),
    ("quality", ["--seeds", ","], "argument --seeds: ',': expected"),
    ("bench_cross_entropy", ["--shapes", "576x49152"], "argument --shapes: '576x49152': expected comma-separated HxVxN"),
    ("bench_cross_entropy", ["--shapes", "8x0x4"], "argument --shapes: '8x0x4'"),
    ("bench_cross_entropy", ["--ratios", "1.0,0"], "argument --ratios: '1.0,0': expected comma-separated ratios in (0, 1]"),
    ("bench_cross_entropy", ["--repeats", "0"], "argument --repeats: '0': must be an integer >= 1"),
    ("bench_cross_entropy", ["--dtype", "int8"], "argument --dtype: invalid choice: 'int8'"),
    ("throughput", ["--threads", "-1"], "argument --threads: '-1': must be an integer >= 1"),
    ("throughput", ["--device", "gpu"], "argument --device: 'gpu': expected auto, cpu, cuda or cuda:N"),
    ("throughput", ["--mem-steps", "-1"], "argument --mem-steps: '-1': must be an integer >= 0"),
    ("throughput", ["--peak-tflops", "0"], "--peak-tflops=0.0: must be > 0"),
    ("decide_cost", ["--batch-size", "0"], "argument --batch-size: '0': must be an integer >= 1"),
    ("trainer_check", ["--steps", "5", "--skip", "5", "--device", "cpu"], "--skip=5 leaves none of --steps=5"),
    ("model_families", ["--families", "lama"], "not a causal-LM model type of this transformers: lama (did you mean llama"),
])
def test_benchmark_arguments_are_checked_by_the_parser(module, args, message, capsys):
    """A malformed list or number is argparse's usage error (exit 2, naming the argument), not a
    traceback later (or, for decide_cost's batch of 0, a results file of nothing)."""
    import importlib

    main = importlib.import_module(f"experiments.{module}").main
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("words, message", [
    (["sweep.steps=0"], "sweep.steps=0: must be an integer >= 1"),
    (["sweep.memory_budget_mib=-1"], "sweep.memory_budget_mib=-1: must be a number > 0"),
    (["sweep.device=gpu"], "sweep.device='gpu': must be auto, cpu, cuda or cuda:N"),
    (["sweep.batch_sizes=[]"], "sweep.batch_sizes=[]: must be a non-empty list of integers >= 1"),
    (["sweep.threads=0", "sweep.warmup=-1"], "sweep.warmup=-1: must be an integer >= 0; sweep.threads=0"),
])
def test_sweep_values_that_would_measure_nothing_are_refused(words, message):
    """Before the check these ran in seconds and wrote a results file of nothing (steps=0, a negative
    budget) or of failed points (device=gpu)."""
    from experiments import sweep

    with pytest.raises(SystemExit, match=re.escape(message)):
        sweep.load_sweep(["sweep=cpu_tiny", *words])
    settings, _ = sweep.load_sweep(["sweep=cpu_tiny", "sweep.steps=2"])  # the shipped grid as it is, one value changed
    assert settings["steps"] == 2 and sweep.sweep_problems(settings) == []


def test_benchmark_list_arguments_parse_what_they_should():
    from experiments import bench_cross_entropy as bce
    from experiments.compose import number_list

    assert bce.parse_shapes("576x49152x16384, 64x1000x128") == [(576, 49152, 16384), (64, 1000, 128)]
    assert number_list(int, "0,1")("3,1,") == [3, 1]
    assert number_list(float, "1", lambda r: 0 < r <= 1)("1,0.25") == [1.0, 0.25]


def test_bench_variants_parse_and_gemm_floor_is_the_three_gemms():
    from experiments import bench_cross_entropy as bce

    assert bce.parse_variants("triton:512,torch:rule:weight,torch:8:bias") == {
        "triton[512]": ("triton", 512, None, False), "torch[rule,weight]": ("torch", None, "weight", False),
        "torch[8,bias]": ("torch", 8, None, True)}
    assert bce.split_names("torch,triton[256,weight],torch[rule,bias]") == [
        "torch", "triton[256,weight]", "torch[rule,bias]"]  # --impls / --profile keep a variant's commas
    for bad in ("triton", "naive:512", "triton:x", "triton:64:bf16", "torch:bias", "torch:0"):
        with pytest.raises(SystemExit):
            bce.parse_variants(bad)
    impls, _ = bce.implementations(torch.device("cpu"), None, bce.parse_variants("torch:4:weight,torch:4:bias"))
    assert {"torch[4,weight]", "torch[4,bias]", "gemm_floor"} <= set(impls)
    # --impls narrows the standard set; the variants, asked for by name, stay (they were dropped)
    narrowed, _ = bce.implementations(torch.device("cpu"), ["torch"], bce.parse_variants("torch:4"))
    assert set(narrowed) == {"torch", "torch[4]", "gemm_floor"}
    # gemm_floor leaves the logits as their own "gradient": grad_h = (h W^T) W and grad_W = (h W^T)^T h,
    # with ignored rows zeroed before the GEMMs
    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, -100, 2, 3, -100, 4])
    impls["gemm_floor"](h, w, y).backward()
    hm = h.detach() * (y != -100).double()[:, None]
    z = hm @ w.detach().t()
    torch.testing.assert_close(h.grad, z @ w.detach())
    torch.testing.assert_close(w.grad, z.t() @ hm)


def test_trainer_check_settings_and_compile_events_from_a_hand_written_log():
    """A setting is perf.compile's value plus optional overrides; recompiles and graph breaks are
    counted from torch's log lines (TORCH_LOGS=recompiles,graph_breaks), with the first reasons."""
    from experiments.trainer_check import compile_events, setting_overrides

    assert setting_overrides("true") == ["perf.compile=true"]
    assert setting_overrides("true:perf.compile_dynamic=false:cggr=sequence") == [
        "perf.compile=true", "perf.compile_dynamic=false", "cggr=sequence"]
    with pytest.raises(SystemExit, match="not an override"):
        setting_overrides("true:dynamic")
    log = "\n".join([
        "Epoch 0: 10/40",
        "V1127 17:38:01.1 42 torch/_dynamo/guards.py:3000] [0/1] [__recompiles] Recompiling function forward in modeling_llama.py:250",
        "    triggered by the following guard failure(s):",
        "    - 0/0: tensor 'hidden_states' size mismatch at index 0. expected 8, actual 2",
        "lightning/pytorch/utilities/_pytree.py:21: a warning printed in between",
        "V1127 17:38:09.1 42 torch/_dynamo/symbolic_convert.py:500] [1/0] [__graph_breaks] Graph break in user code at x.py:3",
        "Epoch 0: 40/40",
    ])
    ev = compile_events(log)
    assert ev["recompiles"] == 1 and ev["graph_breaks"] == 1
    assert ev["recompile_reasons"][0].endswith("size mismatch at index 0. expected 8, actual 2")
    assert ev["recompile_reasons"][0].startswith("Recompiling function forward in modeling_llama.py:250 triggered by")
    assert ev["graph_break_lines"] == ["Graph break in user code at x.py:3"]
    assert compile_events("Epoch 0: 40/40") == dict(recompiles=0, graph_breaks=0, recompile_reasons=[],
                                                    graph_break_lines=[])


def test_trainer_check_gives_a_repeated_setting_its_own_run_folder(monkeypatch, tmp_path):
    """Each run of the list trains in its own folder: a repeated setting (eager first and last, to
    see the machine's drift) must not find the first run's checkpoint and refuse to start."""
    import subprocess

    from experiments import trainer_check

    commands = []

    class Done:
        returncode, stdout, stderr = 0, "", ""

    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: commands.append(cmd) or Done())
    runs = [trainer_check.run_setting(s, ["cggr=sequence"], 4, tmp_path, 60, i)
            for i, s in enumerate(["false", "true", "false"])]
    dirs = [r["run_dir"] for r in runs]
    assert len(set(dirs)) == 3
    assert [f"output_dir={d}" in cmd for d, cmd in zip(dirs, commands)] == [True] * 3
    assert ["perf.compile=false" in c for c in commands] == [True, False, True]


def test_throughput_flop_bound_is_the_baseline_flops_over_the_methods():
    """Hand-worked: 18 TFLOP for standard, 6 for a method -> 3.00x; a method without a FLOP count
    (failed) or no baseline gives no bound. The committed H200 run's table shows the column."""
    from experiments import throughput

    s = {"standard_fused": {"model_tflop_per_step": 18.0}, "seq": {"model_tflop_per_step": 6.0},
         "failed": {"failed": "OOM"}}
    assert throughput.flop_bound(s, "seq") == pytest.approx(3.0)
    assert throughput.flop_bound(s, "standard_fused") == pytest.approx(1.0)
    assert throughput.flop_bound(s, "failed") is None
    assert throughput.flop_bound({"seq": {"model_tflop_per_step": 6.0}}, "seq") is None
    import json

    payload = json.loads((rio.RESULTS_DIR / "throughput-smollm2_shape-h200.json").read_text())
    table = throughput.markdown(payload)
    row = next(line for line in table.splitlines() if line.startswith("| CGGR sequence"))
    want = payload["summary"]["standard_fused"]["model_tflop_per_step"] / payload["summary"]["cggr_sequence"][
        "model_tflop_per_step"]
    assert f"| {want:.2f}x |" in row


def test_decide_cost_times_the_steps_own_decision_eager_and_compiled(tmp_path, one_thread):
    """experiments.decide_cost calls step.decide eagerly and compiled (aot_eager: no code generation,
    so fast) on the same statistics: the two keep the same tokens, and the eager call's element-wise
    ops are counted one by one (dozens per call)."""
    import json

    from experiments import decide_cost

    assert decide_cost.main(["--device", "cpu", "--batch-size", "2", "--block-size", "16", "--rounds", "2",
                             "--backend", "aot_eager", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decide_cost-cpu.json").read_text())["rows"]
    assert [(r["unit"], r["ratio"]) for r in rows] == [(u, q) for u, _, q in decide_cost.CASES]
    for r in rows:
        assert r["same_selection"]
        assert r["eager"]["ops_per_call"] >= 50 and r["eager"]["launches_per_call"] is None
        assert r["eager"]["median_ms"] > 0 and r["compiled"]["median_ms"] > 0
    assert "| token | combined | 0.25 |" in (tmp_path / "decide_cost-cpu.md").read_text()


def test_model_families_harness_reports_each_verdict(tmp_path):
    """The family check on families with known outcomes: Llama trains its own loss, Gemma 2's soft cap
    is applied (and RecurrentGemma's, Inkling's width divisor), Llama 4's decoder is found under
    ``model`` (its base_model_prefix names no attribute),
    OPT's blocks one level down, Phi's head bias is trained, Gemma 4's per-layer lists are cut to the
    harness's depth, BERT's head transform is applied and counted (same loss each); ProphetNet, whose
    logits are not a head of its final states, is refused by the probe; JSON and markdown."""
    import json

    from experiments import model_families

    families = ("llama", "gemma2", "llama4_text", "opt", "recurrent_gemma", "inkling_text", "phi", "gemma4_text",
                "bert")
    model_families.main(["--families", *families, "prophetnet", "--out", str(tmp_path)])
    rows = {r["family"]: r for r in json.loads((tmp_path / "model_families-cpu.json").read_text())["rows"]}
    assert [rows[f]["verdict"] for f in families] == ["same loss"] * len(families)
    assert rows["llama"]["abs_diff"] <= 1e-4
    assert {f: rows[f]["router_states"] for f in ("llama", "phi", "gemma4_text", "opt")} == {
        "llama": "same as the model's states", "phi": "same as the model's states",
        "gemma4_text": "same as the model's states", "opt": "same as a hand cut"}  # OPT projects after its norm
    assert all(rows[f]["flops"] == "exact" for f in ("llama", "phi", "gemma4_text", "opt", "bert")), rows  # vs torch's
    assert rows["prophetnet"]["verdict"] == "refused" and "its logits are not head(h)" in rows["prophetnet"]["detail"]
    assert "| gemma2 | Gemma2ForCausalLM | same loss |" in (tmp_path / "model_families-cpu.md").read_text()


def test_the_report_writes_a_recorded_command_the_same_from_any_checkout():
    """A result's JSON records sys.argv, with the absolute path of the checkout that ran it; the
    report, read in another checkout, rewrote every such line (RESULTS.md changed under a user)."""
    from experiments.report import command_line

    tail = ["--preset", "tiny", "--steps", "20"]
    for where in ("/tmp/runclone2", "/home/someone/lightning_cggr", str(rio.REPO)):
        assert command_line([f"{where}/experiments/throughput.py", *tail]) == \
            "python -m experiments.throughput --preset tiny --steps 20"
    assert command_line(["experiments/sweep.py", "sweep=cpu_tiny"]) == "python -m experiments.sweep sweep=cpu_tiny"
    assert command_line([f"{rio.REPO}/experiments/quality.py", "--reference", f"{rio.REPO}/runs/ref"]) == \
        "python -m experiments.quality --reference runs/ref"
    assert command_line([]) == ""


def test_headline_spread_is_that_of_the_paired_difference_not_of_the_loss():
    """Seeds 4.0/5.0/6.0 for standard and 3.9/4.8/6.0 for a method: Δ -0.1/-0.2/0.0, mean -0.1,
    sample sd 0.1; the method's own loss spreads by 1.0, which says nothing of the comparison."""
    from experiments.report import headline

    def res(summary):
        return {"experiment": "quality-mini", "kind": "quality", "environment": {"device_tag": "cpu"},
                "methods": {m: {"label": m} for m in summary}, "summary": summary}

    q = {"standard_fused": {"loss_at_equal_time": {"mean": 5.0, "std": 1.0}},
         "random_sequence": {"loss_at_equal_time": {"mean": 4.9, "std": 1.05},
                             "loss_at_equal_time_minus_baseline": -0.1,
                             "paired_vs_baseline_time": {"n": 3, "mean": -0.1, "std": 0.1}}}
    row = [line for line in headline([res(q)]).splitlines() if "random_sequence" in line]
    assert row and "-0.100 (± 0.100)" in row[0], row
