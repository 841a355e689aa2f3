"""Kept-row compaction: the loss over gathered kept rows equals the loss over all rows with masked labels."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

from lightning_cggr.kernels import compact_rows, linear_cross_entropy  # noqa: E402

TRITON_RUNS = importlib.util.find_spec("triton") is not None and (
    torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = ["torch", "naive"] + (["triton"] if TRITON_RUNS else [])


def _inputs(n=40, hdim=24, v=300, kept=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hdim, generator=g).to(DEVICE)
    w = (torch.randn(v, hdim, generator=g) / hdim**0.5).to(DEVICE)
    y = torch.full((n,), -100, dtype=torch.int64)
    rows = torch.randperm(n, generator=g)[:kept]
    y[rows] = torch.randint(0, v, (kept,), generator=g)
    return h, w, y.to(DEVICE)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("capacity", [11, 16], ids=["exact", "padded"])
def test_compaction_equals_masking_on_full_rows(impl, reduction, capacity):
    h, w, y = _inputs()
    rw = torch.rand(y.shape[0], generator=torch.Generator().manual_seed(3)).to(DEVICE) + 0.5

    h_full, w_full = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    full = linear_cross_entropy(h_full, w_full, y, impl=impl, reduction=reduction, row_weight=rw)
    full.backward()

    c = compact_rows(y, capacity)
    assert c.index.shape == (capacity,) and c.labels.shape == (capacity,) and int(c.dropped) == 0
    h_c, w_c = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    packed = linear_cross_entropy(h_c.index_select(0, c.index), w_c, c.labels, impl=impl,
                                  reduction=reduction, row_weight=rw.index_select(0, c.index))
    packed.backward()

    torch.testing.assert_close(packed, full, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_c.grad, h_full.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(w_c.grad, w_full.grad, rtol=1e-5, atol=1e-7)
    dropped_rows = (y == -100).nonzero().squeeze(1)
    assert torch.count_nonzero(h_c.grad[dropped_rows]) == 0


def test_compact_rows_order_padding_and_overflow():
    y = torch.tensor([-100, 5, -100, 7, 9, -100, 2]).to(DEVICE)
    c = compact_rows(y, 5)
    assert c.index[:4].tolist() == [1, 3, 4, 6]  # kept rows, original order
    assert c.labels.tolist() == [5, 7, 9, 2, -100]  # unused slot ignored
    assert int(c.dropped) == 0
    small = compact_rows(y, 2)
    assert small.index.tolist() == [1, 3] and small.labels.tolist() == [5, 7] and int(small.dropped) == 2
    other = compact_rows(torch.tensor([3, 3, 1]).to(DEVICE), 2, ignore_index=3)
    assert other.index.tolist() == [2, 0] and other.labels.tolist() == [1, 3]
    empty = compact_rows(torch.full((4,), -100).to(DEVICE), 3)
    assert (empty.labels == -100).all() and int(empty.dropped) == 0


def test_compact_rows_bad_input():
    y = torch.tensor([1, -100, 2])
    with pytest.raises(ValueError, match="exceeds"):
        compact_rows(y, 4)
    with pytest.raises(ValueError, match="int >= 0"):
        compact_rows(y, -1)
    with pytest.raises(ValueError, match="host number"):
        compact_rows(y, torch.tensor(2))
    with pytest.raises(ValueError, match=r"\[N\]"):
        compact_rows(y.view(1, 3), 2)
