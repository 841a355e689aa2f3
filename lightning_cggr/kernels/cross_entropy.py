"""``impl="triton"``: the chunk pass of :mod:`lightning_cggr.kernels.chunked` with Triton row kernels.

The GEMMs are torch's (cuBLAS on GPUs; a head's bias added by the logits GEMM itself) in the compute
dtype -- the autocast dtype under autocast, else the promoted input dtype (bf16 in, bf16 logits, fp32 accumulation inside the GEMM) -- and
``grad_W`` accumulates in one fp32 buffer (``addmm(..., out_dtype=torch.float32)`` where the
installed torch supports it for the device, see :func:`~lightning_cggr.kernels.chunked.accumulate_`).
Between them, per chunk, one Triton kernel with one program per row:

- ``_ce_rows_kernel``: pass 1 reads the row once (online max / sum of exp in fp32, plus the label
  logit and, for label smoothing, the logit sum) and writes the row's loss and lse; pass 2 (only when
  gradients are wanted) reads it again and overwrites it in place with
  ``scale * (softmax * (1 + 2 s lse) - eps / V - (1 - eps) onehot)`` (times ``1 - tanh^2`` under a
  soft cap). Ignored rows write zeros and read nothing. With a known lse (the ``"none"``-reduction
  backward) pass 1 is skipped.
- ``_stats_rows_kernel``: one read of the row: lse, entropy (online ``sum p z``), top-2 margin, nll.

Launch configuration is fixed by rule, never autotuned: ``BLOCK_V = min(8192, next_pow2(V))``
columns per step, ``num_warps = clamp(BLOCK_V / 512, 4, 16)``; the chunk rows come from
:func:`~lightning_cggr.kernels.contract.default_chunk_rows` (2048 rows of bf16 logits at V = 49152,
1024 at V = 128256). So the first call compiles two small kernels and runs; nothing is tried.
Row offsets are int64 (``row * stride`` exceeds 2**31 at 16k rows x 128k vocab), labels are read as
int64, and no kernel or wrapper reads a value back to the host. A label outside ``[0, V)`` (and not
``ignore_index``) makes that row's loss NaN rather than reading out of bounds.

On CPU the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is
imported): correctness only.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lightning_cggr.kernels.chunked import Backend, linear_ce, stats_pass
from lightning_cggr.kernels.contract import CEOptions, TokenStats

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a row of ``vocab`` logits: see the module docstring."""
    block = min(8192, triton.next_power_of_2(max(vocab, 2)))
    return block, max(4, min(16, block // 512))


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _ce_rows_kernel(
    z_ptr, z_stride, y_ptr, scale_ptr, scale_stride, loss_ptr, lse_ptr,
    V, ignore_index, label_smoothing, lse_square_scale, softcap,
    WANT_GRAD: tl.constexpr, LSE_KNOWN: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, HAS_ZLOSS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * z_stride
    cols = tl.arange(0, BLOCK_V).to(tl.int64)
    y = tl.load(y_ptr + row).to(tl.int64)
    if y == ignore_index:
        if not LSE_KNOWN:
            tl.store(loss_ptr + row, 0.0)
            tl.store(lse_ptr + row, 0.0)
        if WANT_GRAD:
            zero = tl.zeros((BLOCK_V,), dtype=z_ptr.dtype.element_ty)
            for v0 in range(0, V, BLOCK_V):
                tl.store(base + v0 + cols, zero, mask=v0 + cols < V)
        return

    in_range = (y >= 0) & (y < V)
    z_y = tl.load(base + y, mask=in_range, other=float("nan")).to(tl.float32)
    if HAS_SOFTCAP:
        z_y = softcap * _tanh(z_y / softcap)
    z_sum = 0.0
    if LSE_KNOWN:
        lse = tl.load(lse_ptr + row)
    else:
        m = float("-inf")
        d = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
            if HAS_SOFTCAP:
                x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
            if HAS_SMOOTHING:
                z_sum += tl.sum(tl.where(mask, x, 0.0), axis=0)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
            m = m_new
        lse = m + tl.log(d)
        tl.store(lse_ptr + row, lse)
    if not LSE_KNOWN:  # (the lse-known backward pass wants the gradient only)
        loss = lse - (1.0 - label_smoothing) * z_y
        if HAS_SMOOTHING:
            loss -= label_smoothing / V * z_sum
        if HAS_ZLOSS:
            loss += lse_square_scale * lse * lse
        tl.store(loss_ptr + row, loss)

    if WANT_GRAD:
        scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        p_scale = scale
        if HAS_ZLOSS:
            p_scale = scale * (1.0 + 2.0 * lse_square_scale * lse)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + cols
            mask = offs < V
            x = tl.load(base + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(x / softcap)
                x = softcap * t
            g = tl.exp(x - lse) * p_scale
            if HAS_SMOOTHING:
                g -= scale * (label_smoothing / V)
            g = tl.where(offs == y, g - scale * (1.0 - label_smoothing), g)
            if HAS_SOFTCAP:
                g *= 1.0 - t * t
            tl.store(base + offs, g.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stats_rows_kernel(
    z_ptr, z_stride, y_ptr, lse_ptr, ent_ptr, margin_ptr, nll_ptr,
    V, ignore_index, softcap, HAS_LABELS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = z_ptr + row * z_stride
    cols = tl.arange(0, BLOCK_V).to(tl.int64)
    m = float("-inf")
    d = 0.0
    t = 0.0  # sum exp(x - m) * x, rescaled like d: entropy = lse - t / d
    top1 = float("-inf")
    top2 = float("-inf")
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + cols
        mask = offs < V
        x = tl.load(base + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:  # in fp32, as the loss kernel caps
            x = tl.where(mask, softcap * _tanh(x / softcap), float("-inf"))
        b1 = tl.max(x, axis=0)
        arg = tl.argmax(x, axis=0)
        b2 = tl.max(tl.where(cols == arg, float("-inf"), x), axis=0)  # one copy of the max removed
        top2 = tl.maximum(tl.minimum(top1, b1), tl.maximum(top2, b2))
        top1 = tl.maximum(top1, b1)
        m_new = tl.maximum(m, b1)
        alpha = tl.exp(m - m_new)
        e = tl.exp(x - m_new)
        d = d * alpha + tl.sum(e, axis=0)
        t = t * alpha + tl.sum(e * tl.where(mask, x, 0.0), axis=0)  # (never 0 * -inf)
        m = m_new
    lse = m + tl.log(d)
    tl.store(lse_ptr + row, lse)
    tl.store(ent_ptr + row, lse - t / d)
    tl.store(margin_ptr + row, top1 - top2)
    if HAS_LABELS:
        y = tl.load(y_ptr + row).to(tl.int64)
        valid = y != ignore_index
        z_y = tl.load(base + y, mask=valid & (y >= 0) & (y < V), other=float("nan")).to(tl.float32)
        if HAS_SOFTCAP:
            z_y = softcap * _tanh(z_y / softcap)
        tl.store(nll_ptr + row, tl.where(valid, lse - z_y, 0.0))
    else:
        tl.store(nll_ptr + row, 0.0)


def triton_ce_rows(z, y, scale, loss, lse, opts: CEOptions, *, want_grad: bool, lse_known: bool) -> None:
    """Row operation of the chunk pass (see :data:`lightning_cggr.kernels.chunked.RowOp`)."""
    rows, vocab = z.shape
    ignore_index, eps, zscale, cap = opts
    block, warps = launch_config(vocab)
    if scale is None:
        scale, scale_stride = loss, 0  # never read
    else:
        scale_stride = 0 if scale.dim() == 0 else scale.stride(0)
    _ce_rows_kernel[(rows,)](
        z, z.stride(0), y, scale, scale_stride, loss, lse,
        vocab, ignore_index, eps, zscale, 1.0 if cap is None else cap,
        WANT_GRAD=want_grad, LSE_KNOWN=lse_known, HAS_SOFTCAP=cap is not None,
        HAS_SMOOTHING=eps > 0.0, HAS_ZLOSS=zscale > 0.0, BLOCK_V=block, num_warps=warps,
    )


def triton_stats_rows(z, y, out, ignore_index: int, softcap: float | None = None) -> None:
    """Statistics row operation (see :data:`lightning_cggr.kernels.chunked.StatsOp`)."""
    rows, vocab = z.shape
    block, warps = launch_config(vocab)
    _stats_rows_kernel[(rows,)](
        z, z.stride(0), out[3] if y is None else y, out[0], out[1], out[2], out[3],
        vocab, ignore_index, 1.0 if softcap is None else softcap, HAS_LABELS=y is not None,
        HAS_SOFTCAP=softcap is not None, BLOCK_V=block, num_warps=warps,
    )


def _triton_prepare(hidden: torch.Tensor, weight: torch.Tensor):
    """Both operands in the compute dtype (autocast's under autocast, else promoted), row-major."""
    if torch.float64 in (hidden.dtype, weight.dtype):
        raise ValueError("impl='triton' supports fp32/bf16/fp16 inputs; use impl='torch' for float64")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
    else:
        cdt = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(cdt).contiguous(), weight.to(cdt).contiguous()


TRITON = Backend("triton", _triton_prepare, triton_ce_rows, triton_stats_rows)


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton and "
            "lightning_cggr.kernels.cross_entropy are imported; use impl='torch' on CPU"
        )


def triton_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                                label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
                                chunk_size=None, row_weight=None, grad_accum=None, bias=None) -> torch.Tensor:
    """Chunked cuBLAS GEMMs + Triton row kernels (contract: :func:`lightning_cggr.kernels.linear_cross_entropy`)."""
    _check_device(hidden)
    return linear_ce(TRITON, hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                     label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
                     chunk_size=chunk_size, row_weight=row_weight, grad_accum=grad_accum, bias=bias)


def triton_token_stats(hidden, weight, labels=None, *, ignore_index=-100, chunk_size=None,
                       softcap=None, bias=None) -> TokenStats:
    """Per-token fp32 ``lse``, ``entropy``, ``margin``, ``nll``: chunk GEMM + one Triton row pass."""
    _check_device(hidden)
    return stats_pass(TRITON, hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size,
                      softcap=softcap, bias=bias)
