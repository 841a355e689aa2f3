"""Pure parts of the time-budgeted quality run (experiments.quality_stats), on hand-worked examples and
textbook values: schedule sizing, time to target, exact t and sign tests, seed bands, the verdict."""

from __future__ import annotations

import math

import pytest

from experiments import quality_stats as Q


def test_schedule_steps_fit_the_baseline_budget_including_cggr_warmup():
    # budget 100 steps x 1.0 s = 100 s; 10 warm-up steps at 1.0 s, the other 90 s at 0.4 s -> 225 more
    assert Q.schedule_steps(0.4, 1.0, 100, 10, cap=1000) == 235
    assert Q.schedule_steps(1.0, 1.0, 100, 10, cap=1000) == 100  # as fast as the baseline: its steps
    assert Q.schedule_steps(1.25, 1.0, 100, 0, cap=1000) == 80  # slower: fewer steps
    assert Q.schedule_steps(0.1, 1.0, 100, 0, cap=300) == 300  # capped
    assert Q.schedule_steps(50.0, 1.0, 10, 0, cap=300) == 1  # at least one
    with pytest.raises(ValueError):
        Q.schedule_steps(0.0, 1.0, 10, 0, cap=10)


CURVE = [{"step": 0, "time_s": 0.0, "loss": 5.0}, {"step": 10, "time_s": 4.0, "loss": 4.0},
         {"step": 20, "time_s": 8.0, "loss": 3.0}, {"step": 30, "time_s": 12.0, "loss": 3.2}]


def test_first_crossing_interpolates_between_evaluations():
    assert Q.first_crossing(CURVE, 3.5) == pytest.approx(6.0)  # halfway from 4.0 (4 s) to 3.0 (8 s)
    assert Q.first_crossing(CURVE, 3.5, key="step") == pytest.approx(15.0)
    assert Q.first_crossing(CURVE, 3.0) == pytest.approx(8.0)
    assert Q.first_crossing(CURVE, 6.0) == 0.0  # already there at the start
    assert Q.first_crossing(CURVE, 2.9) is None  # never reached


def test_time_to_target_per_seed_and_summary():
    curves = {0: CURVE, 1: [{"step": 0, "time_s": 0.0, "loss": 5.0}, {"step": 10, "time_s": 5.0, "loss": 3.4}]}
    out = Q.time_to_target(curves, targets={0: 3.5, 1: 3.0}, budgets={0: 10.0, 1: 10.0})
    assert out["per_seed"][0] == {"time_s": pytest.approx(6.0), "ratio": pytest.approx(0.6)}
    assert out["per_seed"][1] == {"time_s": None, "ratio": None}
    assert (out["reached"], out["n"], out["ratio_mean"], out["ratio_std"]) == (1, 2, pytest.approx(0.6), None)
    assert Q.final_loss(CURVE, 20) == 3.0
    with pytest.raises(ValueError, match="no evaluation at step 25"):
        Q.final_loss(CURVE, 25)


@pytest.mark.parametrize(
    "t, df, p",
    [
        (12.706, 1, 0.05), (4.303, 2, 0.05), (3.182, 3, 0.05), (2.776, 4, 0.05), (2.571, 5, 0.05),
        (2.228, 10, 0.05), (9.925, 2, 0.01), (1.0, 1, 0.5), (0.0, 7, 1.0),
    ],
)
def test_t_two_sided_p_matches_the_t_table(t, df, p):
    assert Q.t_two_sided_p(t, df) == pytest.approx(p, abs=2e-4)
    assert Q.t_two_sided_p(-t, df) == Q.t_two_sided_p(t, df)


def test_t_p_closed_forms_for_one_and_two_degrees_of_freedom():
    for t in (0.3, 1.7, 6.0):
        assert Q.t_two_sided_p(t, 1) == pytest.approx(1 - 2 / math.pi * math.atan(t), rel=1e-12)  # Cauchy
        assert Q.t_two_sided_p(t, 2) == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-12)


def test_sign_test_exact_binomial():
    assert Q.sign_test_p(3, 0) == pytest.approx(0.25)  # 2 * (1/8): n = 3 can never reach 5%
    assert Q.sign_test_p(5, 0) == pytest.approx(0.0625)
    assert Q.sign_test_p(6, 1) == pytest.approx(2 * (1 + 7) / 128)
    assert Q.sign_test_p(2, 2) == 1.0 and Q.sign_test_p(0, 0) == 1.0


def test_paired_differences_over_common_seeds():
    a = {0: 3.0, 1: 3.1, 2: 2.9, 3: None}
    b = {0: 3.2, 1: 3.2, 2: 3.0, 3: 3.0, 4: 1.0}
    p = Q.paired(a, b)
    assert p["n"] == 3 and p["diffs"] == {0: pytest.approx(-0.2), 1: pytest.approx(-0.1), 2: pytest.approx(-0.1)}
    assert p["mean"] == pytest.approx(-0.4 / 3)
    sd = math.sqrt(((-0.2 + 0.4 / 3) ** 2 + 2 * (-0.1 + 0.4 / 3) ** 2) / 2)
    assert p["std"] == pytest.approx(sd)
    assert p["t"] == pytest.approx((-0.4 / 3) / (sd / math.sqrt(3)))
    assert p["p_t"] == pytest.approx(Q.t_two_sided_p(p["t"], 2))
    assert (p["wins"], p["losses"], p["ties"], p["p_sign"]) == (3, 0, 0, pytest.approx(0.25))
    text = Q.describe_paired(p)
    assert "lower by 0.133" in text and "n=3" in text and "its floor at n=3 is 0.250" in text
    assert Q.paired({0: 1.0}, {0: 1.0002})["ties"] == 1  # within the tie tolerance
    assert Q.paired({0: 1.0, 1: 2.0}, {0: 0.5, 1: 1.5})["p_t"] is None  # zero spread: no t test


def test_band_mean_min_max_where_every_seed_has_a_value():
    c0 = [{"step": 0, "time_s": 0.0, "loss": 4.0}, {"step": 10, "time_s": 10.0, "loss": 2.0}]
    c1 = [{"step": 0, "time_s": 0.0, "loss": 6.0}, {"step": 10, "time_s": 5.0, "loss": 4.0}]
    out = Q.band([c0, c1], "time_s", [0.0, 5.0, 10.0])
    assert out["x"] == [0.0, 5.0]  # seed 1 ends at 5 s
    assert out["mean"] == [5.0, 3.5] and out["lo"] == [4.0, 3.0] and out["hi"] == [6.0, 4.0]


def test_goal_needs_every_seed_fast_and_every_seed_ahead_of_the_control():
    ttt = {"per_seed": {0: {"ratio": 0.7}, 1: {"ratio": 0.6}, 2: {"ratio": 0.74}}}
    ahead = {"n": 3, "wins": 3}
    assert Q.meets_goal(ttt, ahead)["ok"] is True
    assert Q.meets_goal(ttt, {"n": 3, "wins": 2})["ok"] is False
    slow = {"per_seed": {0: {"ratio": 0.7}, 1: {"ratio": None}, 2: {"ratio": 0.5}}}
    assert Q.meets_goal(slow, ahead) == {"fast_enough": False, "beats_control": True, "ok": False}
    two = {"per_seed": {0: {"ratio": 0.5}, 1: {"ratio": 0.5}}}
    assert Q.meets_goal(two, {"n": 2, "wins": 2})["ok"] is False  # fewer than 3 seeds
    assert Q.meets_goal(ttt, None)["beats_control"] is None


def _planned(step_s: float, plan: int, budget: float = 4.0) -> dict:
    """A quality result of one seed: the baseline 4 x 1.0 s (W = 4 s), a method of ``step_s`` steps."""
    optim = {"lr": 1e-3, "warmup_steps": 2, "min_lr_ratio": 0.1}
    return {"methods": {"standard_fused": {"label": "standard", "kind": "baseline", "config": {"optim": optim}},
                        "m": {"label": "M", "kind": "cggr", "config": {"optim": optim}}},
            "raw": {"step_times_s": {"0": {"standard_fused": [1.0] * 4, "m": [step_s] * plan}},
                    "wall_budget_s": {"0": budget}, "schedule_steps": {"standard_fused": 4, "m": plan}}}


def test_a_schedule_unfinished_at_the_budget_is_reported_with_its_learning_rate_there():
    from experiments.quality_report import schedule_done_at_budget, unfinished_schedules

    # 0.5 s steps, planned for 10 but 8 fit into W = 4 s: 80% done; the LR at step 8 of a 10-step
    # schedule with 2 warm-up steps is 0.1 + 0.9 x (1 + cos(pi x 6/8)) / 2
    p = _planned(0.5, 10)
    r = schedule_done_at_budget(p)["m"]
    assert r["done"] == [8] and r["fraction_min"] == pytest.approx(0.8)
    want = 0.1 + 0.9 * (1 + math.cos(math.pi * 0.75)) / 2
    assert r["lr_factor"] == [pytest.approx(want)]
    assert unfinished_schedules(p) == [f"M: 8 of 10 steps in its worst seed (80%), LR up to {want:.2f}x the peak "
                                       "at W (floor 0.1x)"]
    assert unfinished_schedules(_planned(0.5, 8)) == []  # planned right: done at W
    assert set(schedule_done_at_budget(p)) == {"m"}  # the baseline's own schedule ends at W by definition


def test_the_verdict_explains_a_control_ahead_of_standard_by_its_own_numbers():
    from experiments.report import _controls_ahead

    def result(control_steps):
        return {"methods": {"standard_fused": {"label": "standard", "kind": "baseline"},
                            "c": {"label": "C", "kind": "control"}},
                "raw": {},
                "summary": {"standard_fused": {"steps_at_equal_time": {"mean": 200.0}},
                            "c": {"paired_vs_baseline_time": {"n": 3, "wins": 3, "mean": -0.1, "p_t": 0.27},
                                  "steps_at_equal_time": {"mean": control_steps},
                                  "paired_vs_baseline_steps": {"n": 3, "mean": -0.102}}}}

    more = _controls_ahead(result(260.0))  # more steps in the same time: the batch-size effect
    assert "C (-0.100 at equal time, 3/3 seeds lower, t-test p=0.27)" in more
    assert "takes more steps in the same time" in more and "Not from more steps" not in more
    fewer = _controls_ahead(result(191.5))  # fewer steps, already lower at equal steps: not that effect
    assert "takes more steps" not in fewer
    assert "Not from more steps: C ran 192 steps in that time against standard's 200 and was -0.102 at equal steps" in fewer
