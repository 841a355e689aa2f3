"""Linear cross-entropy and token statistics vs an independent float64 full-logits reference.

The Triton kernels run here under the Triton interpreter (``TRITON_INTERPRET=1``, set below before
anything imports triton) when CUDA is absent; shapes stay small so the file runs in well under a
minute on two CPU cores.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lightning_cggr.kernels import (  # noqa: E402
    LOSS_IMPLS,
    TokenStats,
    linear_cross_entropy,
    resolve_impl,
    token_stats,
)

HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_RUNS = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

IMPLS = ["torch", "naive"] + (["triton"] if TRITON_RUNS else [])
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}


# ----------------------------------------------------------------------------- reference
def ref_loss(h, w, y, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             lse_square_scale=0.0, softcap=None, chunk_size=None):
    """float64 full-logits loss written from the definition (log_softmax, explicit smoothing)."""
    z = h.double() @ w.double().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = y != ignore_index
    y0 = torch.where(valid, y, torch.zeros_like(y)).long()
    nll = -logp.gather(1, y0[:, None])[:, 0]
    smooth = -logp.mean(dim=1)
    lse = torch.logsumexp(z, dim=-1)
    loss = (1 - label_smoothing) * nll + label_smoothing * smooth + lse_square_scale * lse**2
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp_min(1)


def make(n, hdim, v, dtype=torch.float32, ignore_frac=0.3, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, hdim, generator=g) * scale).to(dtype)
    w = (torch.randn(v, hdim, generator=g) / hdim**0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < ignore_frac] = -100
    return h.to(DEVICE), w.to(DEVICE), y.to(DEVICE)


def run_both(h, w, y, impl, grad_out=None, **kw):
    """Loss and grads of ours (input dtype) and of the float64 reference."""
    h1 = h.detach().clone().requires_grad_(True)
    w1 = w.detach().clone().requires_grad_(True)
    out = linear_cross_entropy(h1, w1, y, impl=impl, **kw)
    h2 = h.detach().double().requires_grad_(True)
    w2 = w.detach().double().requires_grad_(True)
    ref = ref_loss(h2, w2, y, **kw)
    if grad_out is None:
        grad_out = torch.rand(ref.shape, dtype=torch.float64, device=ref.device) + 0.5
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    return (out, h1.grad, w1.grad), (ref, h2.grad, w2.grad)


def assert_close(ours, ref, dtype):
    tol = TOL[dtype]
    for a, b, name in zip(ours, ref, ("loss", "grad_hidden", "grad_weight")):
        assert a.dtype == (torch.float32 if name == "loss" else dtype), name
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------- contract
def test_impls_and_resolve():
    assert LOSS_IMPLS == ("auto", "triton", "torch", "naive")
    assert resolve_impl("torch", torch.device("cpu")) == "torch"
    assert resolve_impl("naive", torch.device("cpu")) == "naive"
    expected_auto = "triton" if (DEVICE.type == "cuda" and HAS_TRITON) else "torch"
    assert resolve_impl("auto", DEVICE) == expected_auto
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="torch.*naive|auto"):
        resolve_impl("tritn", torch.device("cpu"))


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if HAS_TRITON:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            resolve_impl("triton", torch.device("cpu"))
    h, w, y = make(4, 8, 10)
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        linear_cross_entropy(h.cpu(), w.cpu(), y.cpu(), impl="triton")


def test_triton_missing_raises(monkeypatch):
    import lightning_cggr.kernels as k

    monkeypatch.setattr(k, "_triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        resolve_impl("triton", torch.device("cuda"))
    assert resolve_impl("auto", torch.device("cuda")) == "torch"


def test_bad_arguments_raise():
    h, w, y = make(4, 8, 10)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, impl="torch", reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing"):
        linear_cross_entropy(h, w, y, impl="torch", label_smoothing=1.5)
    with pytest.raises(ValueError, match="width"):
        linear_cross_entropy(h, w[:, :4], y, impl="torch")
    with pytest.raises(ValueError, match="softcap"):
        linear_cross_entropy(h, w, y, impl="torch", softcap=0.0)


# ----------------------------------------------------------------------------- loss, all impls
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [1000, 4099])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grads_fp32(impl, v, reduction):
    h, w, y = make(37, 48, v, seed=v)
    ours, ref = run_both(h, w, y, impl, reduction=reduction, chunk_size=16)
    assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(label_smoothing=0.1),
        dict(lse_square_scale=1e-2),
        dict(softcap=3.0),
        dict(label_smoothing=0.2, lse_square_scale=1e-3, softcap=5.0, reduction="none"),
        dict(ignore_index=7),
    ],
    ids=["smoothing", "zloss", "softcap", "all_options", "ignore_index"],
)
def test_options(impl, opts):
    h, w, y = make(29, 32, 1000, seed=3, scale=3.0)  # scale: softcap must bite
    if opts.get("ignore_index") == 7:
        y[y == -100] = 1  # -100 is an ordinary (out-of-range) label now: make it valid
        y[::3] = 7
    ours, ref = run_both(h, w, y, impl, chunk_size=8, **opts)
    assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_is_zero_with_zero_grads(impl):
    h, w, y = make(16, 32, 1000)
    y[:] = -100
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = linear_cross_entropy(h, w, y, impl=impl)
    assert loss.requires_grad
    loss.backward()
    assert loss.detach().cpu().tolist() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
    # torch itself returns NaN here; we deliberately do not
    assert torch.isnan(F.cross_entropy(h.detach() @ w.detach().t(), y))


@pytest.mark.parametrize("impl", IMPLS)
def test_single_kept_row(impl):
    h, w, y = make(33, 32, 4099, ignore_frac=1.0, seed=5)
    y[17] = 4098  # last vocabulary entry, in the ragged tail tile
    ours, ref = run_both(h, w, y, impl)
    assert_close(ours, ref, torch.float32)
    assert torch.count_nonzero(ours[1].abs().sum(1)) == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(impl, dtype):
    h, w, y = make(40, 64, 1000, dtype=dtype, seed=11)
    ours, ref = run_both(h, w, y, impl, reduction="sum", chunk_size=16)
    assert_close(ours, ref, dtype)


@pytest.mark.parametrize("impl", IMPLS)
def test_tied_embedding_weight(impl):
    """The head weight is also the input embedding: both gradient paths must add up."""
    n, hdim, v = 24, 32, 1000
    _, w, y = make(n, hdim, v, seed=2)
    ids = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    proj = torch.randn(hdim, hdim, generator=torch.Generator().manual_seed(4)).to(DEVICE) / hdim**0.5

    def grad_of(fn, weight):
        emb = weight.detach().clone().requires_grad_(True)
        hidden = torch.tanh(F.embedding(ids, emb) @ proj.to(emb.dtype))
        fn(hidden, emb).backward()
        return emb.grad

    ours = grad_of(lambda hd, e: linear_cross_entropy(hd, e, y, impl=impl), w)
    ref = grad_of(lambda hd, e: ref_loss(hd, e, y), w.double())
    torch.testing.assert_close(ours.double(), ref, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_int32_labels_and_frozen_weight(impl):
    h, w, y = make(20, 32, 1000, seed=8)
    h1 = h.clone().requires_grad_(True)
    loss = linear_cross_entropy(h1, w, y.int(), impl=impl)
    loss.backward()
    h2 = h.double().requires_grad_(True)
    ref = ref_loss(h2, w.double(), y)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=2e-4, atol=2e-5)


def test_torch_path_matches_torch_linear_cross_entropy():
    """Peer check against torch's own chunked implementation where this torch has it."""
    if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        pytest.skip("torch.nn.functional.linear_cross_entropy needs torch >= 2.13")
    h, w, y = make(64, 32, 1000, seed=9)
    theirs = F.linear_cross_entropy(h, w, y, options=torch.nn.LinearCrossEntropyOptions())
    ours = linear_cross_entropy(h, w, y, impl="torch", chunk_size=16)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- token stats
def ref_stats(h, w, y, ignore_index=-100):
    z = h.double() @ w.double().t()
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    entropy = -(p * torch.log_softmax(z, -1)).sum(-1)
    s = z.sort(dim=-1, descending=True).values
    margin = s[:, 0] - s[:, 1]
    if y is None:
        nll = torch.zeros_like(lse)
    else:
        valid = y != ignore_index
        zy = z.gather(1, torch.where(valid, y, 0).long()[:, None])[:, 0]
        nll = torch.where(valid, lse - zy, torch.zeros_like(lse))
    return lse, entropy, margin, nll


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("v", [1000, 4099])
@pytest.mark.parametrize("with_labels", [True, False])
def test_token_stats(impl, v, with_labels):
    h, w, y = make(37, 48, v, seed=v + 1, scale=2.0)
    h.requires_grad_(True)
    stats = token_stats(h, w, y if with_labels else None, impl=impl, chunk_size=8)
    assert isinstance(stats, TokenStats)
    for got, want, name in zip(stats, ref_stats(h.detach(), w, y if with_labels else None), TokenStats._fields):
        assert got.dtype == torch.float32 and got.shape == (37,) and not got.requires_grad, name
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
def test_token_stats_ties_and_bf16(impl):
    h, w, y = make(16, 32, 1000, dtype=torch.bfloat16, seed=6)
    w[5] = w[3]  # duplicate rows -> duplicate logits
    h[0] = w[3] * 40  # row 0: top-1 logit tied between classes 3 and 5 -> margin 0
    stats = token_stats(h, w, y, impl=impl)
    ref = ref_stats(h.float(), w.float(), y)
    assert stats.margin[0].abs().max() == 0
    for got, want in zip(stats, ref):
        torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-3)


# ----------------------------------------------------------------------------- triton specifics
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton not installed or no CUDA/interpreter")


@needs_triton
def test_triton_rejects_float64():
    h, w, y = make(8, 16, 100)
    with pytest.raises(ValueError, match="float64"):
        linear_cross_entropy(h.double(), w.double(), y, impl="triton")


@needs_triton
def test_triton_never_reads_ignored_rows():
    """Ignored rows are skipped, not multiplied by zero: NaN hidden states there change nothing
    (a 0 * NaN path would poison grad_weight)."""
    h, w, y = make(45, 32, 1000, ignore_frac=0.7, seed=13)
    poisoned = torch.where((y == -100)[:, None], torch.full_like(h, float("nan")), h)
    ours, ref = run_both(poisoned, w, y, "triton", grad_out=torch.tensor(1.0, dtype=torch.float64))
    _, ref = run_both(h, w, y, "torch", grad_out=torch.tensor(1.0, dtype=torch.float64))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b.double(), rtol=2e-4, atol=2e-5)


@needs_triton
def test_triton_bf16_hidden_fp32_weight_promotes():
    """Mixed inputs (bf16 activations, fp32 master weight) compute in the promoted dtype."""
    h, w, y = make(24, 32, 1000, dtype=torch.float32, seed=12)
    hb = h.bfloat16()
    h1 = hb.clone().requires_grad_(True)
    w1 = w.clone().requires_grad_(True)
    loss = linear_cross_entropy(h1, w1, y, impl="triton")
    loss.backward()
    ours = (loss, h1.grad, w1.grad)
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.float32
    _, ref = run_both(hb.float(), w, y, "torch", grad_out=torch.tensor(1.0, dtype=torch.float64))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=1e-2, atol=1e-3)


@needs_triton
@pytest.mark.parametrize(
    "opts", [dict(), dict(label_smoothing=0.1, lse_square_scale=1e-2)], ids=["plain", "smoothing_zloss"]
)
def test_triton_matches_liger_flce(opts):
    """Peer check: Liger-Kernel's fused linear cross-entropy (also runs under the interpreter).

    Soft-capping is not compared: Liger's kernel calls ``softcap.to`` on a Python float, which the
    Triton interpreter rejects (AttributeError), so it only runs on GPUs.
    """
    liger = pytest.importorskip("liger_kernel.transformers", reason="liger-kernel not installed")
    h, w, y = make(37, 48, 1000, seed=21, scale=2.0)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    theirs = liger.LigerFusedLinearCrossEntropyLoss(**opts)(w1, h1, y)
    theirs.backward()
    ours = linear_cross_entropy(h2, w2, y, impl="triton", **opts)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- GPU only


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_no_host_sync_and_no_full_logits(impl):
    """No device->host sync in forward+backward, and peak memory far below one [N, V] fp32 logits."""
    n, hdim, v = 4096, 64, 32768
    h, w, y = make(n, hdim, v, ignore_frac=0.75, seed=31)
    h.requires_grad_(True)
    w.requires_grad_(True)
    linear_cross_entropy(h, w, y, impl=impl, chunk_size=256).backward()  # warm-up / autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = linear_cross_entropy(h, w, y, impl=impl, chunk_size=256)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.25 * n * v * 4, f"peak extra memory {peak} vs logits {n * v * 4}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_int64_offsets_large_n_times_v():
    """N*V > 2**31: nothing may index the (never allocated) logits with int32. The float64
    reference is computed for the last rows only (where row * V is largest)."""
    n, hdim, v = 17_000, 32, 128_256
    h, w, y = make(n, hdim, v, ignore_frac=0.5, seed=41)
    h1 = h.clone().requires_grad_(True)
    losses = linear_cross_entropy(h1, w, y, impl="triton", reduction="none")
    losses.sum().backward()
    tail = slice(n - 64, n)
    h2 = h[tail].double().requires_grad_(True)
    ref = ref_loss(h2, w.double(), y[tail], reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(losses[tail].double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h1.grad[tail].double(), h2.grad, rtol=1e-3, atol=1e-5)
    stats = token_stats(h, w, y, impl="triton")
    ref_nll = ref_stats(h[tail], w, y[tail])[3]
    torch.testing.assert_close(stats.nll[tail].double(), ref_nll, rtol=1e-4, atol=1e-4)
