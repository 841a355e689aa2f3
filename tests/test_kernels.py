"""Linear cross-entropy and token statistics vs an independent float64 full-logits reference.

The Triton kernels (and Liger-Kernel's, the peer) run here under the Triton interpreter
(``TRITON_INTERPRET=1``, set below before anything imports triton) when CUDA is absent; shapes stay
small so the CPU part runs in about a minute on two cores. Tests marked ``gpu`` run the real head
shapes on CUDA (under a minute on one H100).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lightning_cggr.kernels as K  # noqa: E402
from lightning_cggr.kernels import (  # noqa: E402
    LOSS_IMPLS,
    TokenStats,
    linear_cross_entropy,
    resolve_impl,
    resolve_stats_impl,
    token_stats,
)
from lightning_cggr.kernels.contract import default_chunk_rows  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
TRITON_RUNS = HAS_TRITON and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
HAS_TORCH_LCE = hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

OURS = ["torch"] + (["triton"] if TRITON_RUNS else [])  # the chunk pass, both row ops
IMPLS = OURS + ["naive"]
PEERS = (["liger"] if HAS_LIGER and TRITON_RUNS else []) + (["torch_lce"] if HAS_TORCH_LCE else [])
CHUNKED = {"torch", "triton", "torch_lce"}  # accept chunk_size
TOL = {torch.float32: dict(rtol=2e-4, atol=2e-5), torch.bfloat16: dict(rtol=4e-2, atol=4e-2),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="triton not installed or no CUDA/interpreter")


# ----------------------------------------------------------------------------- reference
def ref_loss(h, w, y, *, ignore_index=-100, reduction="mean", label_smoothing=0.0,
             lse_square_scale=0.0, softcap=None, chunk_size=None, row_weight=None, grad_accum=None):
    """float64 full-logits loss written from the definition (log_softmax, explicit smoothing);
    ``chunk_size`` and ``grad_accum`` say how ours computes, not what, and are ignored here."""
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
    if row_weight is not None:
        loss = loss * row_weight.double()
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
        g = torch.Generator().manual_seed(99)
        grad_out = (torch.rand(ref.shape, dtype=torch.float64, generator=g) + 0.5).to(ref.device)
    out.backward(grad_out.to(out.dtype))
    ref.backward(grad_out)
    return (out, h1.grad, w1.grad), (ref, h2.grad, w2.grad)


REL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # relative Frobenius error


def rel_err(a, b):
    return ((a.double() - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(ours, ref, dtype):
    """Elementwise within TOL, and as a whole within REL (elementwise atol alone would let small
    gradients pass whatever their value)."""
    tol = TOL[dtype]
    for a, b, name in zip(ours, ref, ("loss", "grad_hidden", "grad_weight")):
        assert a.dtype == (torch.float32 if name == "loss" else dtype), name
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m, name=name: f"{name}: {m}")
        if b.abs().sum() > 0:
            assert rel_err(a, b) < REL[dtype], f"{name}: relative error {rel_err(a, b):.2e}"


# ----------------------------------------------------------------------------- contract
def test_impls_and_resolve():
    assert set(LOSS_IMPLS) == {"auto", "triton", "torch", "naive", "liger", "torch_lce"}
    assert resolve_impl("torch", torch.device("cpu")) == "torch"
    assert resolve_impl("naive", torch.device("cpu")) == "naive"
    assert resolve_impl("auto", torch.device("cpu")) == "torch"
    expected_auto = "triton" if (DEVICE.type == "cuda" and HAS_TRITON) else "torch"
    assert resolve_impl("auto", DEVICE) == expected_auto
    with pytest.raises(ValueError, match="liger"):
        resolve_impl("tritn", torch.device("cpu"))
    assert resolve_stats_impl("naive", torch.device("cpu")) == "torch"
    if HAS_TORCH_LCE:
        assert resolve_stats_impl("torch_lce", torch.device("cpu")) == "torch"
    else:  # torch < 2.13: the loss it goes with cannot run either
        with pytest.raises(RuntimeError, match="torch >= 2.13"):
            resolve_stats_impl("torch_lce", torch.device("cpu"))
    with pytest.raises(ValueError, match="resolve_stats_impl"):
        token_stats(*make(4, 8, 10)[:2], impl="torch_lce")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    if HAS_TRITON:
        for impl in ("triton", "liger") if HAS_LIGER else ("triton",):
            with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
                resolve_impl(impl, torch.device("cpu"))
    h, w, y = make(4, 8, 10)
    with pytest.raises((ValueError, RuntimeError), match="triton"):
        linear_cross_entropy(h.cpu(), w.cpu(), y.cpu(), impl="triton")


def test_a_liger_kernel_older_than_the_checked_release_is_refused(monkeypatch):
    """liger-kernel 0.8.1 and older gave per-token losses far from float64 torch's in this file's
    liger cases; impl='liger' names the installed version and the one needed."""
    monkeypatch.setattr(K, "_liger_available", lambda: True)
    monkeypatch.setattr(K, "_triton_available", lambda: True)
    monkeypatch.setattr(K, "_liger_version", lambda: "0.8.1")
    with pytest.raises(RuntimeError, match=r"liger-kernel >= 0\.8\.2 .*this is 0\.8\.1"):
        resolve_impl("liger", torch.device("cuda"))
    for fine in ("0.8.2", "0.10.0"):
        monkeypatch.setattr(K, "_liger_version", lambda: fine)
        assert resolve_impl("liger", torch.device("cuda")) == "liger"


def test_missing_dependencies_raise_with_the_fix(monkeypatch):
    monkeypatch.setattr(K, "_triton_available", lambda: False)
    monkeypatch.setattr(K, "_liger_available", lambda: False)
    monkeypatch.setattr(K, "torch_lce_available", lambda: False)
    with pytest.raises(RuntimeError, match="not installed"):
        resolve_impl("triton", torch.device("cuda"))
    assert resolve_impl("auto", torch.device("cuda")) == "torch"
    with pytest.raises(RuntimeError, match="pip install liger-kernel"):
        resolve_impl("liger", torch.device("cuda"))
    with pytest.raises(RuntimeError, match="torch >= 2.13"):
        resolve_impl("torch_lce", torch.device("cpu"))


def test_bad_arguments_raise():
    h, w, y = make(4, 8, 10)
    cases = [
        (dict(reduction="avg"), "reduction"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(softcap=0.0), "softcap"),
        (dict(row_weight=torch.ones(3)), "row_weight must be"),
        (dict(row_weight=torch.ones(4, requires_grad=True)), "detach"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(grad_accum="bf16"), "grad_accum must be"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            linear_cross_entropy(h, w, y, impl="torch", **kw)
    with pytest.raises(ValueError, match="width"):
        linear_cross_entropy(h, w[:, :4], y, impl="torch")
    with pytest.raises(ValueError, match="chunk_size does not"):
        linear_cross_entropy(h, w, y, impl="naive", chunk_size=2)
    with pytest.raises(ValueError, match="naive.*grad_accum does not"):
        linear_cross_entropy(h, w, y, impl="naive", grad_accum="fp32")
    if HAS_TORCH_LCE:
        with pytest.raises(ValueError, match="torch_lce.*softcap"):
            linear_cross_entropy(h, w, y, impl="torch_lce", softcap=3.0)
        with pytest.raises(ValueError, match="torch_lce.*z-loss"):
            linear_cross_entropy(h, w, y, impl="torch_lce", lse_square_scale=1e-3)
        with pytest.raises(ValueError, match="torch_lce.*label_smoothing"):
            linear_cross_entropy(h, w, y, impl="torch_lce", label_smoothing=0.1)
        with pytest.raises(ValueError, match="torch_lce.*grad_accum"):
            linear_cross_entropy(h, w, y, impl="torch_lce", grad_accum="weight")
    if "liger" in PEERS:
        with pytest.raises(ValueError, match="liger.*chunk_size"):
            linear_cross_entropy(h, w, y, impl="liger", chunk_size=2)



@pytest.mark.parametrize("impl", IMPLS)
def test_inputs_of_the_wrong_shape_or_dtype_are_named(impl):
    """Each problem with the tensors is a ValueError naming it, on every implementation, before any
    kernel runs (and several problems in one message)."""
    h, w, y = make(4, 8, 10)
    cases = [
        ((h[None], w, y), "hidden must be [N, H], got shape (1, 4, 8)"),
        ((h, w[0], y), "weight must be [V, H], got shape (8,)"),
        ((h, w, y[:3]), "labels must be [N] matching hidden, got shape (3,)"),
        ((h, w, y.float()), "labels must be int64/int32, got torch.float32"),
        ((h.long(), w, y), "hidden must be float32/bfloat16/float16/float64, got torch.int64"),
        ((h, w, y.to("meta")), "hidden, weight, labels on different devices"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            linear_cross_entropy(*args, impl=impl)
    with pytest.raises(ValueError, match=re.escape("lse_square_scale (z-loss) must be >= 0, got -0.1")):
        linear_cross_entropy(h, w, y, impl=impl, lse_square_scale=-0.1)
    with pytest.raises(ValueError, match="row_weight must be a float tensor, got torch.int64"):
        linear_cross_entropy(h, w, y, impl=impl, row_weight=torch.ones(4, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"labels must be \[N\].*; labels must be int64/int32"):
        linear_cross_entropy(h, w, y[:3].float(), impl=impl)


def test_token_stats_names_its_input_problems():
    h, w, y = make(4, 8, 10)
    for args, kw, message in [
        ((h, w[:, :4], y), {}, "need hidden [N, H] and weight [V, H], got (4, 8), (10, 4)"),
        ((h, w[:1], y), {}, "the margin needs a vocabulary of at least 2"),
        ((h, w, y[:2]), {}, "labels must be [N], got (2,)"),
        ((h, w, y), {"chunk_size": 0}, "chunk_size must be None or an int >= 1, got 0"),
    ]:
        with pytest.raises(ValueError, match=re.escape("token_stats: " + message)):
            token_stats(*args, impl="torch", **kw)

def test_chunk_rule():
    """The documented rule: 2048 rows of bf16 logits at V=49152, 1024 at V=128256, within [64, 4096]."""
    assert default_chunk_rows(49152, 2) == 2048
    assert default_chunk_rows(128256, 2) == 1024
    assert default_chunk_rows(49152, 4) == 1024
    assert default_chunk_rows(97, 4) == 4096 and default_chunk_rows(10**9, 4) == 64


# ----------------------------------------------------------------------------- loss values and gradients
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(37, 48, 1000), (50, 24, 4099), (9, 64, 257)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_and_grads_fp32(impl, shape, reduction):
    n, hdim, v = shape
    h, w, y = make(n, hdim, v, seed=v)
    kw = dict(chunk_size=16) if impl in CHUNKED else {}  # several chunks, a ragged last one
    ours, ref = run_both(h, w, y, impl, reduction=reduction, **kw)
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
    ids=["smoothing", "zloss", "softcap", "all_options_none", "ignore_index"],
)
def test_options(impl, opts):
    h, w, y = make(29, 32, 1000, seed=3, scale=3.0)  # scale: softcap must bite
    if opts.get("ignore_index") == 7:
        y[y == -100] = 1  # -100 is an ordinary (out-of-range) label now: make it valid
        y[::3] = 7
    kw = dict(chunk_size=8) if impl in CHUNKED else {}
    ours, ref = run_both(h, w, y, impl, **kw, **opts)
    assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("impl", IMPLS + PEERS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_row_weights(impl, reduction):
    """Each row's loss (and gradient) times its weight; 'mean' still divides by the kept count."""
    h, w, y = make(33, 32, 1000, seed=17, ignore_frac=0.4)
    rw = (torch.rand(33, generator=torch.Generator().manual_seed(2)) * 3).to(DEVICE)
    rw[0] = 0.0
    kw = dict(chunk_size=8) if impl in CHUNKED else {}
    ours, ref = run_both(h, w, y, impl, reduction=reduction, row_weight=rw, **kw)
    assert_close(ours, ref, torch.float32)


@pytest.mark.parametrize("impl", IMPLS + PEERS)
def test_all_ignored_is_zero_with_zero_grads(impl):
    h, w, y = make(16, 32, 1000)
    y[:] = -100
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = linear_cross_entropy(h, w, y, impl=impl)
    assert loss.requires_grad and loss.dtype == torch.float32
    loss.backward()
    assert loss.detach().cpu().tolist() == 0.0
    assert torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
    # torch itself returns NaN here; we deliberately do not
    assert torch.isnan(F.cross_entropy(h.detach() @ w.detach().t(), y))


@pytest.mark.parametrize("impl", IMPLS + PEERS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_a_trainable_head_over_frozen_hidden_states_gets_its_gradient(impl, reduction):
    """A linear probe: hidden states that need no gradient, a head that trains. Liger forms its
    gradients only when its input needs one, so the head's came back None, silently."""
    h, w, y = make(21, 32, 1000, seed=3)
    w.requires_grad_(True)
    linear_cross_entropy(h, w, y, impl=impl, reduction=reduction).backward()
    w64 = w.detach().double().requires_grad_(True)
    ref_loss(h.double(), w64, y, reduction=reduction).backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("impl", IMPLS + PEERS)
def test_no_rows_is_a_zero_loss_with_zero_gradients(impl):
    h, w, y = make(0, 32, 1000)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = linear_cross_entropy(h, w, y, impl=impl)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(w.grad) == 0 and h.grad.shape == (0, 32)


@pytest.mark.parametrize("impl", OURS)
def test_extreme_logits(impl):
    """Logits of several thousand (and one row far above the rest): no overflow, exact gradients."""
    h, w, y = make(20, 32, 1000, seed=4, scale=400.0)
    h[3] *= 10
    ours, ref = run_both(h, w, y, impl, chunk_size=8)
    assert torch.isfinite(ours[0]).all()
    torch.testing.assert_close(ours[0].double(), ref[0], rtol=1e-5, atol=1e-3)
    # gradients are O(1); an fp32 logit near 5e3 carries ~5e-4 of rounding into its softmax term
    for a, b in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_kept_row(impl):
    h, w, y = make(33, 32, 4099, ignore_frac=1.0, seed=5)
    y[17] = 4098  # last vocabulary entry, in the ragged tail block
    ours, ref = run_both(h, w, y, impl)
    assert_close(ours, ref, torch.float32)
    assert torch.count_nonzero(ours[1].abs().sum(1)) == 1


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(impl, dtype):
    """bf16/fp16 inputs; for triton also the GEMMs (grad_W still accumulated in fp32)."""
    h, w, y = make(40, 64, 1000, dtype=dtype, seed=11)
    kw = dict(chunk_size=16) if impl in CHUNKED else {}
    ours, ref = run_both(h, w, y, impl, reduction="sum", **kw)
    assert_close(ours, ref, dtype)


@pytest.mark.parametrize("impl", OURS)
def test_grad_weight_accumulates_in_fp32_across_chunks(impl):
    """Many chunks of bf16 rows: the weight gradient is one fp32 sum, rounded to bf16 once. A bf16
    running sum over 32 chunks would be off by far more than one bf16 rounding."""
    h, w, y = make(256, 32, 300, dtype=torch.bfloat16, seed=19, ignore_frac=0.0)
    h1 = h.clone().requires_grad_(True)
    w1 = w.clone().requires_grad_(True)
    linear_cross_entropy(h1, w1, y, impl=impl, reduction="sum", chunk_size=8).backward()
    w2 = w.double().requires_grad_(True)
    ref_loss(h.double(), w2, y, reduction="sum").backward()
    torch.testing.assert_close(w1.grad.double(), w2.grad, rtol=1e-2, atol=2e-2)


@pytest.mark.parametrize("impl", OURS)
def test_grad_accum_weight_sums_in_the_weights_dtype(impl):
    """grad_accum="weight": grad_W summed in bf16 across 32 chunks (one rounding per chunk, Liger's
    default) -- still close to float64, but further from it than the fp32 accumulator; the loss and
    grad_hidden do not depend on it. With fp32 weights both settings are the same computation."""
    h, w, y = make(256, 32, 300, dtype=torch.bfloat16, seed=19, ignore_frac=0.0)
    w2 = w.double().requires_grad_(True)
    ref_loss(h.double(), w2, y, reduction="sum").backward()
    got = {}
    for acc in ("fp32", "weight"):
        h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss = linear_cross_entropy(h1, w1, y, impl=impl, reduction="sum", chunk_size=8, grad_accum=acc)
        loss.backward()
        assert w1.grad.dtype == torch.bfloat16
        got[acc] = (loss.detach(), h1.grad, w1.grad)
    assert torch.equal(got["fp32"][0], got["weight"][0]) and torch.equal(got["fp32"][1], got["weight"][1])
    torch.testing.assert_close(got["weight"][2].double(), w2.grad, rtol=5e-2, atol=5e-2)
    assert rel_err(got["weight"][2], w2.grad) < 3e-2
    assert rel_err(got["fp32"][2], w2.grad) < rel_err(got["weight"][2], w2.grad)

    h32, w32, y32 = make(64, 32, 300, seed=3)
    grads = []
    for acc in ("fp32", "weight"):
        w1 = w32.clone().requires_grad_(True)
        linear_cross_entropy(h32, w1, y32, impl=impl, chunk_size=8, grad_accum=acc).backward()
        grads.append(w1.grad)
    assert grads[0].dtype == torch.float32 and torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("impl", OURS)
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


@pytest.mark.parametrize("impl", OURS)
def test_int32_labels_frozen_weight_and_no_grad(impl):
    h, w, y = make(20, 32, 1000, seed=8)
    h1 = h.clone().requires_grad_(True)
    loss = linear_cross_entropy(h1, w, y.int(), impl=impl)
    loss.backward()
    h2 = h.double().requires_grad_(True)
    ref = ref_loss(h2, w.double(), y)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(h1.grad.double(), h2.grad, rtol=2e-4, atol=2e-5)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, w, y, impl=impl).double(), ref.detach(),
                                   rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("impl", OURS)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_without_grad_mode_only_the_logits_gemm_runs(impl, mode):
    """Validation calls the loss under no_grad with the LM head's Parameter: inside forward autograd
    still reports that the weight wants a gradient, and the gradients (computed during forward) cost
    two more GEMMs and a V x H buffer. Counted: one [N, H] x [H, V] product, 2 N H V FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    h, w, y = make(20, 32, 1000, seed=8)
    weight = torch.nn.Parameter(w)
    with getattr(torch, mode)(), FlopCounterMode(display=False) as counted:
        loss = linear_cross_entropy(h, weight, y, impl=impl)
    assert counted.get_total_flops() == 2 * 20 * 32 * 1000
    torch.testing.assert_close(loss.double(), ref_loss(h.double(), w.double(), y), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("impl", OURS)
def test_ignored_rows_never_leak(impl):
    """Ignored rows are zeroed before the GEMMs: NaN hidden states there change nothing (a 0 * NaN
    product would poison grad_weight)."""
    h, w, y = make(45, 32, 1000, ignore_frac=0.7, seed=13)
    poisoned = torch.where((y == -100)[:, None], torch.full_like(h, float("nan")), h)
    one = torch.tensor(1.0, dtype=torch.float64)
    ours, _ = run_both(poisoned, w, y, impl, grad_out=one, chunk_size=16)
    _, ref = run_both(h, w, y, impl, grad_out=one)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("impl", OURS)
def test_second_backward_raises_but_none_reduction_recomputes(impl):
    h, w, y = make(12, 16, 100, seed=9)
    h.requires_grad_(True)
    loss = linear_cross_entropy(h, w, y, impl=impl)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        loss.backward()
    h.grad = None
    rows = linear_cross_entropy(h, w, y, impl=impl, reduction="none")
    rows.sum().backward(retain_graph=True)
    first = h.grad.clone()
    rows.sum().backward()  # 'none' keeps its inputs and recomputes: a second backward is exact
    torch.testing.assert_close(h.grad, 2 * first)


@needs_triton
def test_triton_mixed_dtypes_and_autocast():
    """bf16 activations + fp32 weight compute in the promoted dtype; under autocast in its dtype,
    with the fp32 weight's gradient returned in fp32."""
    h, w, y = make(24, 32, 1000, dtype=torch.float32, seed=12)
    hb = h.bfloat16()
    _, ref = run_both(hb.float(), w, y, "torch", grad_out=torch.tensor(1.0, dtype=torch.float64))
    for autocast in (False, True):
        h1 = hb.clone().requires_grad_(True)
        w1 = w.clone().requires_grad_(True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=autocast):
            loss = linear_cross_entropy(h1, w1, y, impl="triton")
        loss.backward()
        assert loss.dtype == torch.float32 and h1.grad.dtype == torch.bfloat16 and w1.grad.dtype == torch.float32
        tol = dict(rtol=3e-2, atol=3e-2) if autocast else dict(rtol=1e-2, atol=1e-3)
        for a, b in zip((loss, h1.grad, w1.grad), ref):
            torch.testing.assert_close(a.double(), b, **tol)


@needs_triton
def test_triton_out_of_range_label_gives_nan_not_a_wrong_number():
    h, w, y = make(8, 16, 100, seed=3, ignore_frac=0.0)
    y[2] = 100
    rows = linear_cross_entropy(h, w, y, impl="triton", reduction="none")
    assert torch.isnan(rows[2]) and torch.isfinite(rows[torch.arange(8, device=DEVICE) != 2]).all()


@needs_triton
def test_triton_rejects_float64():
    h, w, y = make(8, 16, 100)
    with pytest.raises(ValueError, match="float64"):
        linear_cross_entropy(h.double(), w.double(), y, impl="triton")


AOT_COMPILE = """
import itertools, sys, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from lightning_cggr.kernels import cross_entropy as ce
sig = dict(z_ptr="*bf16", z_stride="i64", y_ptr="*i64", scale_ptr="*fp32", scale_stride="i64", loss_ptr="*fp32",
           lse_ptr="*fp32", V="i32", ignore_index="i32", label_smoothing="fp32", lse_square_scale="fp32",
           softcap="fp32", WANT_GRAD="constexpr", LSE_KNOWN="constexpr", HAS_SOFTCAP="constexpr",
           HAS_SMOOTHING="constexpr", HAS_ZLOSS="constexpr", BLOCK_V="constexpr")
block, warps = ce.launch_config(128256)
for want, known, opts in ((False, False, False), (True, False, False), (True, False, True), (True, True, True)):
    const = dict(WANT_GRAD=want, LSE_KNOWN=known, HAS_SOFTCAP=opts, HAS_SMOOTHING=opts, HAS_ZLOSS=opts, BLOCK_V=block)
    triton.compile(ASTSource(ce._ce_rows_kernel, sig, const), target=GPUTarget("cuda", 90, 32),
                   options=dict(num_warps=warps))
sig = dict(z_ptr="*bf16", z_stride="i64", y_ptr="*i64", lse_ptr="*fp32", ent_ptr="*fp32", margin_ptr="*fp32",
           nll_ptr="*fp32", V="i32", ignore_index="i32", softcap="fp32", HAS_LABELS="constexpr",
           HAS_SOFTCAP="constexpr", BLOCK_V="constexpr")
for labels, cap in itertools.product((True, False), (True, False)):
    triton.compile(ASTSource(ce._stats_rows_kernel, sig, dict(HAS_LABELS=labels, HAS_SOFTCAP=cap, BLOCK_V=block)),
                   target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
print("compiled")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_triton_kernels_compile_for_an_h100_without_one():
    """The interpreter runs the kernels as numpy and forgives what the compiler does not: compile the
    row kernels ahead of time for sm_90 (Triton's bundled ptxas, no GPU needed) at the Llama-3 launch
    configuration, in a subprocess without the interpreter."""
    import subprocess
    import sys

    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("this triton has no NVIDIA backend")
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONWARNINGS="ignore")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, "-c", AOT_COMPILE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


# ----------------------------------------------------------------------------- peers
@pytest.mark.skipif("liger" not in PEERS, reason="liger-kernel not installed or triton cannot run")
@pytest.mark.parametrize(
    "opts", [dict(), dict(label_smoothing=0.1, lse_square_scale=1e-2)], ids=["plain", "smoothing_zloss"]
)
def test_triton_matches_liger_flce(opts):
    """Peer check against Liger-Kernel's fused linear cross-entropy called directly (interpreter on CPU).

    Soft-capping is not compared on CPU: Liger's kernel calls ``softcap.to`` on a Python float, which
    the Triton interpreter rejects; the GPU test covers it.
    """
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    h, w, y = make(37, 48, 1000, seed=21, scale=2.0)
    h1, w1 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    h2, w2 = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    theirs = LigerFusedLinearCrossEntropyLoss(**opts)(w1, h1, y)
    theirs.backward()
    ours = linear_cross_entropy(h2, w2, y, impl="triton", chunk_size=16, **opts)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch.nn.functional.linear_cross_entropy needs torch >= 2.13")
def test_torch_path_matches_torch_linear_cross_entropy():
    """Peer check against torch's own chunked implementation called directly."""
    h, w, y = make(64, 32, 1000, seed=9)
    h1, h2 = h.clone().requires_grad_(True), h.clone().requires_grad_(True)
    theirs = F.linear_cross_entropy(h1, w, y, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=16))
    theirs.backward()
    ours = linear_cross_entropy(h2, w, y, impl="torch", chunk_size=16)
    ours.backward()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- a head with a bias
def _biased(n=37, hdim=48, v=1000, dtype=torch.float32, seed=21):
    """Inputs and a bias large enough (std 3) that a loss ignoring it would be far off."""
    h, w, y = make(n, hdim, v, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = (3.0 * torch.randn(v, generator=g)).to(dtype).to(DEVICE)
    return h, w, b, y


def _bias_reference(h, w, b, y, **kw):
    """The float64 reference with the bias folded in as one more hidden column (logits = [h, 1] @ [W, b].T):
    the gradient of that column of W is the bias's."""
    ones = torch.ones(h.shape[0], 1, dtype=torch.float64, device=h.device)
    h2 = h.detach().double().requires_grad_(True)
    wb = torch.cat([w.detach().double(), b.detach().double()[:, None]], dim=1).requires_grad_(True)
    return h2, wb, ref_loss(torch.cat([h2, ones], dim=1), wb, y, **kw)


@pytest.mark.parametrize("impl", IMPLS + PEERS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bias_loss_and_grads(impl, reduction):
    """``logits = h @ W.T + b``: loss and the gradients of h, W and b vs float64, in chunks of 8 where the
    implementation chunks (37 rows: a ragged last chunk)."""
    h, w, b, y = _biased()
    kw = dict(chunk_size=8) if impl in CHUNKED else {}
    h1, w1, b1 = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    out = linear_cross_entropy(h1, w1, y, impl=impl, reduction=reduction, bias=b1, **kw)
    h2, wb, ref = _bias_reference(h, w, b, y, reduction=reduction)
    grad_out = torch.rand(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    out.backward(grad_out.to(out.dtype).to(out.device))
    ref.backward(grad_out.to(ref.device))
    assert_close((out, h1.grad, w1.grad), (ref, h2.grad, wb.grad[:, :-1]), torch.float32)
    torch.testing.assert_close(b1.grad.double(), wb.grad[:, -1], rtol=2e-4, atol=2e-5)
    without = linear_cross_entropy(h, w, y, impl=impl, reduction=reduction, **kw)
    assert not torch.allclose(without.double(), ref.detach(), rtol=1e-2, atol=1e-2)  # the bias mattered


@pytest.mark.parametrize("impl", OURS)
def test_bias_with_options_low_precision_and_all_ignored(impl):
    """A bias with soft-cap, label smoothing and z-loss; in bf16; and with every row ignored (loss 0,
    zero gradients for the bias too)."""
    opts = dict(softcap=4.0, label_smoothing=0.1, lse_square_scale=1e-3)
    h, w, b, y = _biased(seed=5)
    h1, w1, b1 = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    out = linear_cross_entropy(h1, w1, y, impl=impl, bias=b1, chunk_size=8, **opts)
    h2, wb, ref = _bias_reference(h, w, b, y, **opts)
    out.backward()
    ref.backward()
    assert_close((out, h1.grad, w1.grad), (ref, h2.grad, wb.grad[:, :-1]), torch.float32)
    torch.testing.assert_close(b1.grad.double(), wb.grad[:, -1], rtol=2e-4, atol=2e-5)

    h, w, b, y = _biased(seed=6, dtype=torch.bfloat16)
    b1 = b.detach().clone().requires_grad_(True)
    out = linear_cross_entropy(h, w, y, impl=impl, bias=b1, chunk_size=8)
    _, wb, ref = _bias_reference(h, w, b, y)
    out.backward()
    ref.backward()
    assert b1.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref.detach(), **TOL[torch.bfloat16])
    assert rel_err(b1.grad, wb.grad[:, -1]) < REL[torch.bfloat16]

    b1 = b.detach().float().clone().requires_grad_(True)
    out = linear_cross_entropy(h.float(), w.float(), torch.full_like(y, -100), impl=impl, bias=b1)
    out.backward()
    assert out.item() == 0.0 and torch.count_nonzero(b1.grad) == 0


@pytest.mark.parametrize("impl", IMPLS + PEERS)
def test_bias_under_autocast(impl):
    """fp32 parameters under bf16 autocast (bf16-mixed training): every impl takes the fp32 bias with
    them, the loss is within bf16 error of float64 and the bias's gradient comes back fp32."""
    h, w, b, y = _biased(seed=31)
    h, w, b = (t.detach().clone().requires_grad_(True) for t in (h, w, b))
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out = linear_cross_entropy(h, w, y, impl=impl, bias=b)
    out.backward()
    _, wb, ref = _bias_reference(h, w, b, y)
    ref.backward()
    assert b.grad.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref.detach(), **TOL[torch.bfloat16])
    assert rel_err(b.grad, wb.grad[:, -1]) < 3e-2  # bf16 logits: 1.2-2.2% measured across the impls


def test_bias_of_the_wrong_shape_or_device_raises():
    h, w, b, y = _biased()
    with pytest.raises(ValueError, match=r"bias must be \[V\] = \[1000\]"):
        linear_cross_entropy(h, w, y, impl="torch", bias=b[:-1])
    with pytest.raises(ValueError, match="bias must be float"):
        linear_cross_entropy(h, w, y, impl="naive", bias=torch.zeros(1000, dtype=torch.long, device=DEVICE))
    with pytest.raises(ValueError, match=r"token_stats: bias must be \[V\]"):
        token_stats(h, w, y, impl="torch", bias=b[:, None])


@pytest.mark.parametrize("impl", IMPLS)
def test_token_stats_with_a_bias(impl):
    h, w, b, y = _biased(seed=8)
    stats = token_stats(h, w, y, impl=impl, chunk_size=8, bias=b)
    ones = torch.ones(h.shape[0], 1, dtype=h.dtype, device=h.device)
    want = ref_stats(torch.cat([h, ones], 1), torch.cat([w, b[:, None]], 1), y)
    for got, ref, name in zip(stats, want, TokenStats._fields):
        torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- token stats
def ref_stats(h, w, y, ignore_index=-100, softcap=None):
    z = h.double() @ w.double().t()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
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
def test_token_stats_of_softcapped_logits(impl):
    """Gemma-2 style ``softcap * tanh(z / softcap)``, with logits well past the cap (scale 6), so the cap
    changes every statistic; chunked and ragged (37 rows in chunks of 8)."""
    h, w, y = make(37, 48, 1000, seed=12, scale=6.0)
    stats = token_stats(h, w, y, impl=impl, chunk_size=8, softcap=5.0)
    uncapped = ref_stats(h, w, y)
    for got, want, plain, name in zip(stats, ref_stats(h, w, y, softcap=5.0), uncapped, TokenStats._fields):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
        assert not torch.allclose(want, plain, rtol=1e-2, atol=1e-2), name  # the cap mattered
    with pytest.raises(ValueError, match="softcap must be None or a number > 0"):
        token_stats(h, w, y, impl=impl, softcap=0.0)


def test_bf16_softcapped_statistics_cap_the_logits_in_fp32():
    """bf16 inputs: the statistics take the bf16 logits GEMM's output and cap it in fp32, as the loss
    does (capped in place in bf16 it rounded three times: nll 0.19 nats off the loss's). Reference:
    the same bf16 logits, capped and reduced in float64; the loss's per-token values agree with it."""
    h, w, y = make(64, 32, 300, seed=5, scale=2.0, ignore_frac=0.0)
    h, w = h.bfloat16(), w.bfloat16()
    z = (h @ w.t()).double()  # the GEMM's bf16 output
    capped = 30.0 * torch.tanh(z / 30.0)
    want_lse = torch.logsumexp(capped, -1)
    want_nll = want_lse - capped.gather(1, y[:, None])[:, 0]
    top = capped.topk(2, dim=-1).values
    stats = token_stats(h, w, y, impl="triton", softcap=30.0)  # the GEMM in bf16 (torch's path upcasts first)
    torch.testing.assert_close(stats.lse.double(), want_lse, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.nll.double(), want_nll, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.margin.double(), top[:, 0] - top[:, 1], rtol=1e-5, atol=1e-4)
    loss = linear_cross_entropy(h, w, y, impl="triton", softcap=30.0, reduction="none")
    torch.testing.assert_close(stats.nll, loss.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("impl", OURS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_stats_ties_extremes_and_bf16(impl, dtype):
    """Tied top-1 logits give margin 0; fp32 rows with logits in the thousands stay exact. (In bf16
    the triton path's logits are bf16 GEMM outputs, so extreme rows are only checked in fp32.)"""
    h, w, y = make(16, 32, 1000, seed=6)
    w[5] = w[3]  # duplicate rows -> duplicate logits
    h[0] = w[3] * 40  # row 0: top-1 logit tied between classes 3 and 5 -> margin 0
    if dtype == torch.float32:
        h[1] = h[1] * 300  # row 1: logits in the thousands
    h, w = h.to(dtype), w.to(dtype)
    stats = token_stats(h, w, y, impl=impl)
    ref = ref_stats(h, w, y)
    assert stats.margin[0].abs().max() == 0
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, want in zip(stats, ref):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize("impl", OURS)
def test_rows_longer_than_one_kernel_block(impl):
    """V = 20011 spans three of the row kernels' 8192-column blocks (ragged last block): the online
    logsumexp and the top-2 merge must carry across blocks, including a top-1 that arrives in a later
    block than the top-2 (row 0) and the reverse (row 1)."""
    h, w, y = make(12, 16, 20011, seed=23, ignore_frac=0.2)
    direction = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(5)), dim=0)
    w[100], w[17000] = 0.9 * direction.to(DEVICE), direction.to(DEVICE)
    h[0], h[1] = 30 * direction.to(DEVICE), -30 * direction.to(DEVICE)
    w[20010] = -0.95 * direction.to(DEVICE)  # row 1's top-2 in the ragged last block
    y[0], y[1] = 20010, 100
    ours, ref = run_both(h, w, y, impl, reduction="none")
    assert_close(ours, ref, torch.float32)
    stats = token_stats(h, w, y, impl=impl)
    for got, want, name in zip(stats, ref_stats(h, w, y), TokenStats._fields):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


# ----------------------------------------------------------------------------- GPU only
HEADS = [(576, 49152), (4096, 128256)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head", HEADS, ids=["smollm2", "llama3"])
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_real_heads_vs_float64(head, impl):
    """Values and gradients at the real head shapes, bf16, several chunks, vs float64 of the same inputs."""
    hdim, v = head
    h, w, y = make(384, hdim, v, dtype=torch.bfloat16, seed=hdim, ignore_frac=0.25)
    ours, ref = run_both(h, w, y, impl, reduction="none", chunk_size=128, label_smoothing=0.05)
    assert_close(ours, ref, torch.bfloat16)  # bf16 logits (triton) or fp32 compute of bf16 inputs (torch)
    stats = token_stats(h, w, y, impl=impl, chunk_size=128)
    for got, want, name in zip(stats, ref_stats(h, w, y), TokenStats._fields):
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=5e-2, msg=lambda m, n=name: f"{n}: {m}")
        assert rel_err(got, want) < (5e-2 if name == "margin" else 1e-2), name  # margins are small differences



@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_biased_head_vs_float64(impl):
    """Phi-2's head (2560 x 51200, with a bias) in bf16, several chunks: loss and the bias's gradient."""
    h, w, b, y = _biased(256, 2560, 51200, dtype=torch.bfloat16, seed=2)
    b1 = b.detach().clone().requires_grad_(True)
    out = linear_cross_entropy(h, w, y, impl=impl, bias=b1, chunk_size=64)
    _, wb, ref = _bias_reference(h, w, b, y)
    out.backward()
    ref.backward()
    torch.testing.assert_close(out.double(), ref.detach(), **TOL[torch.bfloat16])
    assert rel_err(b1.grad, wb.grad[:, -1]) < REL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("head", HEADS, ids=["smollm2", "llama3"])
def test_gpu_grad_accum_weight_at_real_heads(head):
    """grad_accum="weight" on cuBLAS (bf16 addmm into the bf16 gradient, 6 chunks): grad_W within bf16
    tolerance of float64, the loss and grad_hidden identical to the fp32-accumulating default."""
    hdim, v = head
    h, w, y = make(384, hdim, v, dtype=torch.bfloat16, seed=hdim + 1, ignore_frac=0.25)
    fp32, ref = run_both(h, w, y, "triton", reduction="sum", chunk_size=64)
    lean, _ = run_both(h, w, y, "triton", reduction="sum", chunk_size=64, grad_accum="weight")
    assert_close(lean, ref, torch.bfloat16)
    assert torch.equal(lean[0], fp32[0]) and torch.equal(lean[1], fp32[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gpu_compacted_step_no_host_sync_no_full_logits(impl):
    """Compaction + loss + backward at the SmolLM2 head: no device->host sync, and the peak extra
    memory (one logits chunk, the fp32 grad_W and its cast) stays far below one [N, V] fp32 logits."""
    n, hdim, v = 16384, 576, 49152
    h, w, y = make(n, hdim, v, dtype=torch.bfloat16, ignore_frac=0.75, seed=31)
    h.requires_grad_(True)
    w.requires_grad_(True)
    capacity = n // 2

    def step():
        c = K.compact_rows(y, capacity)
        linear_cross_entropy(h.index_select(0, c.index), w, c.labels, impl=impl, reduction="sum").backward()

    step()  # warm-up: compile the kernels, probe addmm(out_dtype)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 0.25 * n * v * 4, f"peak extra memory {peak} vs fp32 logits {n * v * 4}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_int64_offsets_one_chunk_beyond_2_31():
    """One chunk of 17000 x 128256 logits (> 2**31 elements): the row kernels' offsets must be int64.
    The float64 reference is computed for the last rows (where row * V is largest)."""
    n, hdim, v = 17_000, 32, 128_256
    h, w, y = make(n, hdim, v, dtype=torch.bfloat16, ignore_frac=0.5, seed=41)
    h1 = h.clone().requires_grad_(True)
    losses = linear_cross_entropy(h1, w, y, impl="triton", reduction="none", chunk_size=n)
    losses.sum().backward()
    tail = slice(n - 64, n)
    h2 = h[tail].double().requires_grad_(True)
    ref = ref_loss(h2, w.double(), y[tail], reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(losses[tail].double(), ref, rtol=2e-2, atol=2e-2)
    assert rel_err(h1.grad[tail], h2.grad) < 1e-2
    stats = token_stats(h, w, y, impl="triton", chunk_size=n)
    torch.testing.assert_close(stats.nll[tail].double(), ref_stats(h[tail], w, y[tail])[3], rtol=2e-2, atol=2e-2)
