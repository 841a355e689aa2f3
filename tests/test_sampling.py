"""Unbiased and noise-excluding selection rules (lightning_cggr.routing.sampling), checked against
hand-worked examples, plain-Python references and Monte Carlo: exact inclusion probabilities,
unbiased weighted sums, static shapes, no host sync, and safe behaviour on empty or non-finite input."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from lightning_cggr.routing import importance as I
from lightning_cggr.routing import sampling as S

P_MIN = 0.05


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def messy_batch(B: int = 4, T: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed scores with ties, NaN/+-inf at some trainable positions, junk at untrainable ones,
    one row without any trainable token."""
    g = gen(seed)
    score = torch.round(torch.randn(B, T, generator=g) * 4) / 4  # ties
    trainable = torch.rand(B, T, generator=g) < 0.75
    trainable[0, :3] = True
    score[0, 0], score[0, 1], score[0, 2] = float("nan"), float("inf"), float("-inf")
    trainable[-1] = False
    score[-1] = torch.randn(T, generator=g)  # untrainable scores must be ignored
    return score, trainable


# ---- plain-Python references -------------------------------------------------------------------------


def ref_weights(values: list[float], transform: str) -> list[float]:
    finite = [v for v in values if math.isfinite(v)]
    out = []
    for v in values:
        if not math.isfinite(v):
            out.append(0.0)
        elif transform == "relu":
            out.append(max(v, 0.0))
        elif transform == "shift":
            out.append(v - min(finite))
        elif transform == "softplus":
            out.append(v + math.log1p(math.exp(-v)) if v > 0 else math.log1p(math.exp(v)))
        else:
            out.append(float(sum(1 for f in finite if f <= v)))
    return out


def ref_probabilities(values: list[float], ratio: float, p_min: float, transform: str) -> list[float]:
    """Bisection on c for sum clip(c w, p_min, 1) = ratio * n; equal share of the rest when out of reach."""
    n = len(values)
    if n == 0:
        return []
    w = ref_weights(values, transform)
    top = max(w)
    w = [x / top if top > 0 else 0.0 for x in w]
    target = ratio * n
    npos = sum(1 for x in w if x > 0)
    if npos == 0 or npos + p_min * (n - npos) < target:
        rest = (target - npos) / (n - npos)
        return [1.0 if x > 0 else rest for x in w]

    def total(c):
        return sum(min(1.0, max(p_min, c * x)) for x in w)

    lo, hi = 0.0, 2.0 / min(x for x in w if x > 0)
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if total(mid) < target else (lo, mid)
    return [min(1.0, max(p_min, hi * x)) for x in w]


def ref_exclude_topk(values: list[float], ratio: float, q: float) -> set[int]:
    """Positions kept: by score descending (non-finite easiest, ties by position), skip floor(q n), keep ceil(r rest)."""
    order = sorted(range(len(values)), key=lambda i: (-values[i] if math.isfinite(values[i]) else math.inf, i))
    n = len(order)
    e = math.floor(q * n + 1e-9)
    k = math.ceil(ratio * (n - e) - 1e-9)
    return set(order[e:e + k])


def budgets(score: torch.Tensor, trainable: torch.Tensor, scope: str):
    """[(flat positions, score values)] per budget: each row, or the whole batch."""
    B, T = score.shape
    rows = [range(b * T, (b + 1) * T) for b in range(B)] if scope == "sequence" else [range(B * T)]
    flat_s, flat_t = score.reshape(-1).tolist(), trainable.reshape(-1).tolist()
    return [([i for i in r if flat_t[i]], [flat_s[i] for i in r if flat_t[i]]) for r in rows]


def ref_sequence_means(score: torch.Tensor, trainable: torch.Tensor) -> list[float]:
    out = []
    for s_row, t_row in zip(score.tolist(), trainable.tolist()):
        vals = [s for s, t in zip(s_row, t_row) if t and math.isfinite(s)]
        out.append(sum(vals) / len(vals) if vals else -math.inf)
    return out


# ---- exact inclusion probabilities ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "values, ratio, p_min, transform, expected",
    [
        ([4, 2, 1, 1, 0], 0.4, 0.1, "relu", [0.95, 0.475, 0.2375, 0.2375, 0.1]),  # nothing clipped but the zero
        ([10, 1, 1, 0.1], 0.5, 0.2, "relu", [1.0, 0.4, 0.4, 0.2]),  # one at the cap, one at the floor
        ([-1, 0, 1, 3], 0.5, 0.1, "shift", [0.1, 0.3, 0.6, 1.0]),  # c = 0.3 after capping the top
        ([3, 1, 2, 2], 0.5, 0.1, "rank", [8 / 11, 2 / 11, 6 / 11, 6 / 11]),  # importances 4, 1, 3, 3
        ([5, -1, -2, -3], 0.5, 0.1, "relu", [1.0, 1 / 3, 1 / 3, 1 / 3]),  # out of reach: zeros share the rest
        ([2, 2, 2, 2], 0.5, 0.1, "shift", [0.5, 0.5, 0.5, 0.5]),  # all importances zero: uniform
        ([9, 1, 0, 3], 0.25, 0.25, "relu", [0.25] * 4),  # p_min == ratio: uniform at the floor
        ([1, 2, 3, 4], 1.0, 0.1, "softplus", [1.0] * 4),  # ratio 1 keeps everything
    ],
)
def test_hand_worked_probabilities(values, ratio, p_min, transform, expected):
    score = torch.tensor([values], dtype=torch.float32)
    p = I.importance_probabilities(score, torch.ones_like(score, dtype=torch.bool), ratio, p_min=p_min, transform=transform)
    torch.testing.assert_close(p[0], torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12)
    assert p.sum().item() == pytest.approx(ratio * len(values), abs=1e-12)


@pytest.mark.parametrize("transform", I.TRANSFORMS)
@pytest.mark.parametrize("scope", S.SCOPES)
@pytest.mark.parametrize("ratio, p_min", [(0.3, 0.05), (0.5, 0.2), (0.125, 0.125), (0.9, 0.01)])
def test_probabilities_match_bisection_reference(transform, scope, ratio, p_min):
    for seed in range(3):
        score, trainable = messy_batch(seed=seed)
        p = I.importance_probabilities(score, trainable, ratio, p_min=p_min, scope=scope, transform=transform)
        assert (p[~trainable] == 0).all()
        flat = p.reshape(-1).tolist()
        for positions, values in budgets(score, trainable, scope):
            ref = ref_probabilities(values, ratio, p_min, transform)
            assert [flat[i] for i in positions] == pytest.approx(ref, abs=1e-9)
            assert sum(flat[i] for i in positions) == pytest.approx(ratio * len(positions), abs=1e-9)


@pytest.mark.parametrize("transform", I.TRANSFORMS)
def test_probabilities_over_wide_ranges_and_many_units(transform):
    """Importances spanning 1e-30..1e38 (no cancellation in the segment sums), and 500 units."""
    values = [2.0, 1e38, -1e38, 0.0, 1e-30, 5e37, 3.0, -7.0, 1e-3]
    score = torch.tensor([values], dtype=torch.float64)
    p = I.importance_probabilities(score, torch.ones_like(score, dtype=torch.bool), 0.5, p_min=P_MIN, transform=transform)
    assert p[0].tolist() == pytest.approx(ref_probabilities(values, 0.5, P_MIN, transform), abs=1e-9)
    g = gen(11)
    score = torch.randn(1, 500, generator=g, dtype=torch.float64) ** 3
    for ratio, p_min in ((0.1, 0.01), (0.6, 0.3)):
        p = I.importance_probabilities(score, torch.ones_like(score, dtype=torch.bool), ratio, p_min=p_min, transform=transform)
        assert p[0].tolist() == pytest.approx(ref_probabilities(score[0].tolist(), ratio, p_min, transform), abs=1e-9)


def test_non_finite_scores_rank_easiest():
    score, trainable = messy_batch()
    for transform in I.TRANSFORMS:
        p = I.importance_probabilities(score, trainable, 0.4, p_min=P_MIN, transform=transform)
        assert torch.all(p[0, :3] == p[0][trainable[0]].min())  # nan, +inf, -inf sit at the row's floor
    # rank gives every finite score an importance >= 1, so the target is reachable and the floor is p_min
    assert torch.all(I.importance_probabilities(score, trainable, 0.4, p_min=P_MIN)[0, :3] == P_MIN)


def test_sequence_probabilities_use_the_row_means():
    score, trainable = messy_batch(B=6)
    seq = S.sequence_mean_scores(score, trainable)
    assert seq.tolist() == pytest.approx(ref_sequence_means(score, trainable))
    means = seq.tolist()
    active = [i for i, row in enumerate(trainable.tolist()) if any(row)]
    ref = ref_probabilities([means[i] for i in active], 0.5, 0.1, "shift")
    # importance_sample_sequences draws from exactly these probabilities; a one-row probe reproduces them
    probe = torch.tensor([[means[i] for i in active]])
    p = I.importance_probabilities(probe, torch.ones_like(probe, dtype=torch.bool), 0.5, p_min=0.1, transform="shift")
    assert p[0].tolist() == pytest.approx(ref, abs=1e-9)


# ---- sampling: unbiasedness and inclusion frequencies by Monte Carlo ------------------------------------


def check_monte_carlo(keep: torch.Tensor, weight: torch.Tensor, normaliser: torch.Tensor, p: torch.Tensor, x: torch.Tensor):
    """keep/weight [M, L] over M independent draws of one budget with inclusion probabilities p [L]."""
    M = keep.shape[0]
    freq = keep.double().mean(0)
    tol = 5 * torch.sqrt(p * (1 - p) / M) + 1e-12
    assert torch.all((freq - p).abs() <= tol), (freq, p)
    torch.testing.assert_close(weight[keep].double(), (1 / p).expand(M, -1)[keep].float().double())
    est = (weight.double() * x).sum(1) / normaliser.double().clamp(min=1)
    truth = (x * (p > 0)).sum() / normaliser.double().clamp(min=1)
    assert abs(est.mean() - truth) <= 5 * est.std() / math.sqrt(M) + 1e-12
    count = keep.sum(1).double()
    assert abs(count.mean() - p.sum()) <= 5 * count.std() / math.sqrt(M) + 1e-9
    assert torch.all((count == math.floor(p.sum() + 1e-9)) | (count == math.ceil(p.sum() - 1e-9)))  # fixed size


@pytest.mark.parametrize("transform", ["rank", "relu", "shift"])
def test_importance_sample_per_sequence_is_unbiased(transform):
    """Per-sequence budgets are independent, so a batch of M copies of one row is M independent draws."""
    M = 20000
    score = torch.tensor([[2.0, -1.0, 0.5, float("nan"), 3.0, 0.0, 1.0, -0.5]])
    trainable = torch.tensor([[True, True, True, True, True, False, True, True]])
    x = torch.tensor([1.0, 3.0, 0.2, 5.0, 0.7, 9.0, 1.5, 2.5], dtype=torch.float64)  # per-token NLL stand-ins
    sel = I.importance_sample(score.expand(M, -1), trainable.expand(M, -1), 0.4, p_min=0.1, transform=transform,
                              generator=gen(1))
    p = I.importance_probabilities(score, trainable, 0.4, p_min=0.1, transform=transform)[0]
    check_monte_carlo(sel.keep, sel.weight, torch.tensor(7), p, x)
    assert sel.normaliser.item() == 7 * M


def test_systematic_sample_frequencies_on_batch_budget():
    """The batch budget's probabilities, drawn 20k times: frequencies and the weighted sum as stated."""
    score, trainable = messy_batch(B=3, T=5, seed=2)
    p = I.importance_probabilities(score, trainable, 0.3, p_min=P_MIN, scope="batch", transform="softplus").reshape(-1)
    keep = I.systematic_sample(p.expand(20000, -1), gen(3))
    weight = torch.where(keep, 1 / p, torch.zeros_like(p))
    x = torch.linspace(0.1, 3.0, p.numel(), dtype=torch.float64)
    check_monte_carlo(keep, weight, trainable.sum(), p, x)


def test_importance_sample_batch_and_sequence_unit_through_the_api():
    """Repeated public calls (batch scope, sequence unit): frequencies match the stated probabilities."""
    M = 2000
    score, trainable = messy_batch(B=3, T=5, seed=4)
    g = gen(5)
    p = I.importance_probabilities(score, trainable, 0.3, p_min=P_MIN, scope="batch").reshape(-1)
    keeps, weights = [], []
    for _ in range(M):
        sel = I.importance_sample(score, trainable, 0.3, p_min=P_MIN, scope="batch", generator=g)
        keeps.append(sel.keep.reshape(-1))
        weights.append(sel.weight.reshape(-1))
    x = torch.linspace(0.5, 2.0, p.numel(), dtype=torch.float64)
    check_monte_carlo(torch.stack(keeps), torch.stack(weights), sel.normaliser, p, x)

    score, trainable = messy_batch(B=6, T=4, seed=6)  # last row has no trainable token
    tokens = trainable.sum(1).double()
    row_nll = torch.linspace(1.0, 3.0, 6, dtype=torch.float64) * tokens  # per-row NLL sums
    keeps, weights = [], []
    for _ in range(M):
        sel = I.importance_sample_sequences(score, trainable, 0.5, p_min=0.1, transform="shift", generator=g)
        w = torch.zeros(6).index_put_((sel.index,), sel.weight)
        assert torch.equal(w > 0, sel.keep)
        keeps.append(sel.keep)
        weights.append(w)
    means = ref_sequence_means(score, trainable)
    ref = ref_probabilities(means[:5], 0.5, 0.1, "shift") + [0.0]
    check_monte_carlo(torch.stack(keeps), torch.stack(weights), sel.normaliser, torch.tensor(ref, dtype=torch.float64), row_nll)
    assert sel.normaliser.item() == trainable.sum().item()


def test_infobatch_is_unbiased_and_prunes_only_low_units():
    M, prune = 20000, 0.6
    score = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0, float("nan"), 4.0]])  # mean of finite trainable: 3.4
    trainable = torch.tensor([[True, True, True, True, True, True, False]])
    low = torch.tensor([True, True, True, True, False, True, False])
    sel = S.infobatch_prune(score.expand(M, -1), trainable.expand(M, -1), prune, generator=gen(7))
    assert torch.all(sel.keep[:, 4]) and torch.all(sel.weight[:, 4] == 1)  # above the mean: always, weight 1
    assert not sel.keep[:, 6].any()
    boosted = sel.weight[sel.keep & low]
    assert boosted.numel() > 0 and torch.all(boosted == torch.tensor(1 / (1 - prune)))
    p = torch.where(low, 1 - prune, 1.0).double() * trainable[0]
    x = torch.tensor([0.3, 1.0, 2.0, 0.5, 4.0, 1.0, 7.0], dtype=torch.float64)
    freq = sel.keep.double().mean(0)
    assert torch.all((freq - p).abs() <= 5 * torch.sqrt(p * (1 - p) / M) + 1e-12)
    est = (sel.weight.double() * x).sum(1) / 6
    assert abs(est.mean() - (x[:6].sum() / 6)) <= 5 * est.std() / math.sqrt(M)
    assert torch.equal(sel.index, torch.arange(M * 7)) and torch.equal(sel.valid, sel.keep.reshape(-1))


def test_infobatch_scopes_and_sequence_unit():
    score = torch.tensor([[0.0, 1.0, 2.0], [10.0, 11.0, 12.0]])
    trainable = torch.ones(2, 3, dtype=torch.bool)
    # per-row means 1 and 11: one low token in each row; the batch mean 6: the whole first row is low
    for scope, low in (("sequence", [[1, 0, 0], [1, 0, 0]]), ("batch", [[1, 1, 1], [0, 0, 0]])):
        sel = S.infobatch_prune(score, trainable, 0.999999, scope=scope, generator=gen(0))
        assert torch.equal(~sel.keep, torch.tensor(low, dtype=torch.bool))  # 1e-6 survival: all low dropped
        assert torch.equal(S.infobatch_prune(score, trainable, 0.0, scope=scope).weight, torch.ones(2, 3))
    score = torch.tensor([[1.0, 1.0], [5.0, 5.0], [2.0, float("nan")], [0.0, 0.0]])
    trainable = torch.tensor([[True, True], [True, True], [True, True], [False, False]])
    # row means 1, 5, 2 (nan ignored), none; batch mean 8/3: rows 0 and 2 are low
    M = 4000
    g = gen(8)
    kept = torch.zeros(4)
    for _ in range(M):
        sel = S.infobatch_prune_sequences(score, trainable, 0.5, generator=g)
        assert sel.index.shape == (4,) and sel.keep[1] and not sel.keep[3]
        assert torch.equal(sel.valid, sel.keep.index_select(0, sel.index))
        assert torch.equal(sel.weight, torch.where(sel.valid, torch.tensor([2.0, 1, 2, 0]).index_select(0, sel.index), 0.0))
        kept += sel.keep
    assert (kept / M).tolist() == pytest.approx([0.5, 1.0, 0.5, 0.0], abs=5 * math.sqrt(0.25 / M))
    assert sel.normaliser.item() == 6


def test_infobatch_anneal():
    f = S.infobatch_prune_fraction
    assert [f(0.5, s, 100, 0.125) for s in (0, 87, 88, 99)] == [0.5, 0.5, 0.0, 0.0]  # stops at ceil(87.5)
    assert f(0.5, 9, 10, 0.0) == 0.5 and f(0.5, 10, 10, 0.0) == 0.0 and f(0.5, 0, 10, 1.0) == 0.0
    assert f(0.3, 7, 10, 0.3) == 0.0 and f(0.3, 6, 10, 0.3) == 0.3  # 0.7 * 10 = 7 exactly
    for bad in (dict(prune=1.0), dict(anneal_fraction=1.5), dict(total_steps=0), dict(step=-1)):
        args = dict(prune=0.5, step=0, total_steps=10, anneal_fraction=0.1) | bad
        with pytest.raises(ValueError):
            f(**args)


# ---- noise-excluding top-k -----------------------------------------------------------------------------


def test_noise_excluded_hand_worked():
    score = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0], [float("nan"), 9.0, 1.0, 7.0, float("-inf"), 3.0]])
    trainable = torch.tensor([[True] * 6, [True, True, True, True, True, False]])
    sel = S.noise_excluded_topk(score, trainable, 0.5, noise_fraction=1 / 3)
    # row 0: drop 5, 4; keep the top 2 of the remaining 4. Row 1 (n=5): drop 9; keep ceil(2) = 7, 1
    assert sel.keep.tolist() == [[False, False, True, True, False, False], [False, False, True, True, False, False]]
    assert torch.equal(sel.weight, sel.keep.float()) and sel.normaliser.item() == 4
    sel = S.noise_excluded_topk(score, trainable, 1.0, noise_fraction=0.0)
    assert torch.equal(sel.keep, trainable)  # non-finite kept last, never excluded
    seq = S.noise_excluded_topk_sequences(torch.tensor([[3.0], [9.0], [1.0], [5.0], [0.0]]),
                                          torch.tensor([[True], [True], [True], [True], [False]]), 0.5, noise_fraction=0.25)
    assert seq.index[seq.valid].tolist() == [3, 0] and seq.keep.tolist() == [True, False, False, True, False]
    assert seq.normaliser.item() == 2 and torch.equal(seq.weight, seq.valid.float())


@pytest.mark.parametrize("scope", S.SCOPES)
@pytest.mark.parametrize("ratio, q", [(0.25, 0.1), (0.5, 0.0), (0.4, 0.3), (1.0, 0.5)])
def test_noise_excluded_matches_reference(scope, ratio, q):
    for seed in range(3):
        score, trainable = messy_batch(seed=seed)
        sel = S.noise_excluded_topk(score, trainable, ratio, noise_fraction=q, scope=scope)
        kept = set(sel.keep.reshape(-1).nonzero().squeeze(1).tolist())
        ref = set()
        for positions, values in budgets(score, trainable, scope):
            ref |= {positions[i] for i in ref_exclude_topk(values, ratio, q)}
        assert kept == ref
        assert set(sel.index[sel.valid].tolist()) == kept and len(sel.index[sel.valid]) == len(kept)
        assert sel.normaliser.item() == len(kept)
    means = ref_sequence_means(score, trainable)
    seq = S.noise_excluded_topk_sequences(score, trainable, ratio, noise_fraction=q)
    active = [i for i in range(len(means)) if trainable[i].any()]
    ref = {active[i] for i in ref_exclude_topk([means[i] for i in active], ratio, q)}
    assert set(seq.index[seq.valid].tolist()) == ref == set(seq.keep.nonzero().squeeze(1).tolist())
    assert seq.normaliser.item() == trainable[sorted(ref)].sum().item()


# ---- static shapes, tensor ratio, empty and non-finite input -------------------------------------------


def all_rules(score, trainable, ratio, capacity_ratio=None, g=None):
    kw = dict(capacity_ratio=capacity_ratio)
    out = {}
    for scope in S.SCOPES:
        out[f"is_{scope}"] = I.importance_sample(score, trainable, ratio, p_min=P_MIN, scope=scope, generator=g, **kw)
        out[f"info_{scope}"] = S.infobatch_prune(score, trainable, 0.5, scope=scope, generator=g)
        out[f"noise_{scope}"] = S.noise_excluded_topk(score, trainable, ratio, noise_fraction=0.2, scope=scope, **kw)
    out["is_rows"] = I.importance_sample_sequences(score, trainable, ratio, p_min=P_MIN, generator=g, **kw)
    out["info_rows"] = S.infobatch_prune_sequences(score, trainable, 0.5, generator=g)
    out["noise_rows"] = S.noise_excluded_topk_sequences(score, trainable, ratio, noise_fraction=0.2, **kw)
    return out


def expected_lengths(B, T, cap):
    per_row, batch, rows = math.ceil(cap * T - 1e-9), math.ceil(cap * B * T - 1e-9), math.ceil(cap * B - 1e-9)
    return dict(is_sequence=B * per_row, is_batch=batch, noise_sequence=B * per_row, noise_batch=batch,
                info_sequence=B * T, info_batch=B * T, is_rows=rows, noise_rows=rows, info_rows=B)


def test_static_shapes_depend_only_on_shape_and_host_floats():
    B, T = 5, 8
    for seed in range(4):
        score, trainable = messy_batch(B, T, seed)
        trainable &= torch.rand(B, T, generator=gen(seed)) < (seed + 1) / 4  # very different trainable counts
        for ratio, cap in ((0.3, None), (torch.tensor(0.2), 0.45), (torch.tensor(0.45), 0.45)):
            out = all_rules(score, trainable, ratio, cap, gen(seed))
            for name, length in expected_lengths(B, T, 0.3 if cap is None else cap).items():
                assert out[name].index.shape == out[name].valid.shape == (length,), name
                assert out[name].index.dtype == torch.long and out[name].normaliser.shape == ()
            for name in ("is_sequence", "is_batch", "noise_sequence", "noise_batch", "info_sequence", "info_batch"):
                sel = out[name]
                assert sel.keep.shape == sel.weight.shape == (B, T) and sel.weight.dtype == torch.float32
                assert len(set(sel.index.tolist())) == len(sel.index)  # distinct entries
                rebuilt = torch.zeros(B * T, dtype=torch.bool).index_put_((sel.index,), sel.valid).view(B, T)
                assert torch.equal(rebuilt, sel.keep) and not (sel.keep & ~trainable).any()
                assert torch.equal(sel.weight > 0, sel.keep)


def test_tensor_ratio_matches_host_ratio():
    score, trainable = messy_batch()
    for scope in S.SCOPES:
        host = I.importance_probabilities(score, trainable, 0.3, p_min=P_MIN, scope=scope)
        dev = I.importance_probabilities(score, trainable, torch.tensor(0.3, dtype=torch.float64), p_min=P_MIN,
                                         scope=scope, capacity_ratio=0.5)
        torch.testing.assert_close(host, dev, rtol=0, atol=1e-12)
        dev32 = I.importance_probabilities(score, trainable, torch.tensor(0.3), p_min=P_MIN, scope=scope, capacity_ratio=0.5)
        torch.testing.assert_close(host, dev32, rtol=1e-6, atol=0)  # float32 0.3 is 0.3 + 1.2e-8
        clamped = I.importance_probabilities(score, trainable, torch.tensor(0.9), p_min=P_MIN, scope=scope, capacity_ratio=0.5)
        torch.testing.assert_close(clamped, I.importance_probabilities(score, trainable, 0.5, p_min=P_MIN, scope=scope))
        a = S.noise_excluded_topk(score, trainable, 0.3, noise_fraction=0.2, scope=scope)
        b = S.noise_excluded_topk(score, trainable, torch.tensor(0.3), noise_fraction=0.2, scope=scope, capacity_ratio=0.3)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
        assert torch.equal(
            I.importance_sample(score, trainable, 0.3, p_min=P_MIN, scope=scope, generator=gen(1)).keep,
            I.importance_sample(score, trainable, torch.tensor(0.3), p_min=P_MIN, scope=scope, capacity_ratio=0.3,
                                generator=gen(1)).keep,
        )


@pytest.mark.parametrize("fill", [float("-inf"), float("nan"), 1.0])
def test_all_untrainable_gives_zero_loss(fill):
    score = torch.full((3, 6), fill)
    trainable = torch.zeros(3, 6, dtype=torch.bool)
    nll = torch.rand(3, 6)
    for name, sel in all_rules(score, trainable, 0.5, g=gen(0)).items():
        assert not sel.keep.any() and not sel.valid.any() and sel.normaliser.item() == 0, name
        assert torch.isfinite(sel.weight).all()
        w = sel.weight if sel.weight.dim() == 2 else sel.weight.unsqueeze(1).expand(-1, 6)
        rows = nll if sel.weight.dim() == 2 else nll.index_select(0, sel.index)
        loss = (w * rows).sum() / sel.normaliser.clamp(min=1)
        assert loss.item() == 0.0


def test_non_finite_scores_never_crash():
    score = torch.tensor([[float("nan"), float("inf"), float("-inf"), 1.0], [float("nan")] * 4, [2.0, 1e38, -1e38, 0.0]])
    trainable = torch.tensor([[True, True, True, True], [True, True, False, True], [True, True, True, True]])
    for name, sel in all_rules(score, trainable, 0.5, g=gen(0)).items():
        assert torch.isfinite(sel.weight).all(), name
        assert sel.normaliser.item() >= 0
    for transform in I.TRANSFORMS:
        p = I.importance_probabilities(score, trainable, 0.5, p_min=P_MIN, transform=transform)
        assert torch.isfinite(p).all() and torch.all(p[trainable] >= P_MIN) and torch.all(p <= 1)
        assert p.sum(1).tolist() == pytest.approx([2.0, 1.5, 2.0])
    assert S.noise_excluded_topk(score, trainable, 0.25, noise_fraction=0.0).keep[0].tolist() == [False, False, False, True]


# ---- no host sync --------------------------------------------------------------------------------------


class HostSync(AssertionError):
    """Raised by a patched tensor method: a rule asked the device for a host value."""


@contextlib.contextmanager
def forbid_host_sync():
    with pytest.MonkeyPatch.context() as mp:
        def boom(name):
            def f(*args, **kwargs):
                raise HostSync(f"host sync: {name}")
            return f

        for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
            mp.setattr(torch.Tensor, name, boom(f"Tensor.{name}"))
        for name in ("nonzero", "masked_select", "unique"):
            mp.setattr(torch, name, boom(f"torch.{name}"))
        getitem = torch.Tensor.__getitem__

        def checked_getitem(self, idx):
            parts = idx if isinstance(idx, tuple) else (idx,)
            if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
                raise HostSync("host sync: boolean-mask indexing")
            return getitem(self, idx)

        mp.setattr(torch.Tensor, "__getitem__", checked_getitem)
        yield


def test_rules_have_no_host_sync():
    score, trainable = messy_batch()
    with forbid_host_sync():
        for ratio, cap in ((0.3, None), (torch.tensor(0.35), 0.5)):
            all_rules(score, trainable, ratio, cap, gen(0))
            for transform in I.TRANSFORMS:
                I.importance_probabilities(score, trainable, ratio, p_min=P_MIN, transform=transform, capacity_ratio=cap)
    with pytest.raises(HostSync), forbid_host_sync():
        torch.ones(2).sum().item()


# ---- argument checks -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, t: I.importance_sample(s, t, 0.0, p_min=0.1), "ratio"),
        (lambda s, t: I.importance_sample(s, t, 1.5, p_min=0.1), "ratio"),
        (lambda s, t: I.importance_sample(s, t, 0.5, p_min=0.0), "p_min"),
        (lambda s, t: I.importance_sample(s, t, 0.5, p_min=1.5), "p_min"),
        (lambda s, t: I.importance_sample(s, t, 0.2, p_min=0.3), "p_min"),
        (lambda s, t: I.importance_sample_sequences(s, t, 0.2, p_min=0.3), "p_min"),
        (lambda s, t: I.importance_sample(s, t, torch.tensor(0.2), p_min=0.1), "capacity_ratio"),
        (lambda s, t: I.importance_sample(s, t, torch.tensor(0.2), p_min=0.3, capacity_ratio=0.25), "p_min"),
        (lambda s, t: I.importance_sample(s, t, 0.5, p_min=0.1, capacity_ratio=0.25), "capacity_ratio"),
        (lambda s, t: I.importance_sample(s, t, 0.5, p_min=0.1, scope="row"), "scope"),
        (lambda s, t: I.importance_sample(s, t, 0.5, p_min=0.1, transform="exp"), "transform"),
        (lambda s, t: I.importance_sample(s[:, :2], t, 0.5, p_min=0.1), r"\[B, T\]"),
        (lambda s, t: S.infobatch_prune(s, t, 1.0), "prune"),
        (lambda s, t: S.infobatch_prune_sequences(s, t, -0.1), "prune"),
        (lambda s, t: S.noise_excluded_topk(s, t, 0.5, noise_fraction=1.0), "noise_fraction"),
        (lambda s, t: S.noise_excluded_topk_sequences(s, t, 0.5, noise_fraction=-0.5), "noise_fraction"),
        (lambda s, t: S.noise_excluded_topk(s, t, 1.01, noise_fraction=0.1), "ratio"),
    ],
)
def test_bad_arguments_raise(call, match):
    score, trainable = messy_batch()
    with pytest.raises(ValueError, match=match):
        call(score, trainable)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_stays_on_device():
    score, trainable = messy_batch(B=8, T=64, seed=12)
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    with forbid_host_sync():
        out = all_rules(score.to(dev), trainable.to(dev), torch.tensor(0.3, device=dev), 0.5, g)
    for name, sel in out.items():
        assert all(t.device.type == "cuda" for t in sel), name
    for scope in S.SCOPES:
        for transform in I.TRANSFORMS:
            cpu = I.importance_probabilities(score, trainable, 0.3, p_min=P_MIN, scope=scope, transform=transform)
            gpu = I.importance_probabilities(score.to(dev), trainable.to(dev), 0.3, p_min=P_MIN, scope=scope,
                                             transform=transform)
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-12)
    p = I.importance_probabilities(score[:1], trainable[:1], 0.3, p_min=P_MIN)[0]
    sel = I.importance_sample(score[:1].to(dev).expand(20000, -1), trainable[:1].to(dev).expand(20000, -1), 0.3,
                              p_min=P_MIN, generator=g)
    x = torch.linspace(0.1, 2.0, p.numel(), dtype=torch.float64)
    check_monte_carlo(sel.keep.cpu(), sel.weight.cpu(), trainable[0].sum(), p, x)
