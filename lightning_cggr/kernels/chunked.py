"""The chunked linear cross-entropy shared by ``impl="torch"`` and ``impl="triton"``, and its torch row ops.

One pass over row chunks of ``hidden`` (the structure of Liger's FLCE, QuACK's and torch's own
``F.linear_cross_entropy``), with one preallocated ``[chunk, V]`` logits buffer:

1. ``z = h_c @ W.T`` (``+ b`` for a head with a bias: the same GEMM, ``addmm``) into the buffer (one
   GEMM: cuBLAS on GPUs, MKL/OpenBLAS on CPUs);
2. one row operation reads ``z``, writes each row's fp32 loss and lse and, when gradients are wanted,
   overwrites ``z`` in place with ``dloss/dz * scale`` (0 at ignored rows);
3. ``grad_h_c = dz @ W`` (one GEMM) and ``grad_W += dz.T @ h_c`` (one GEMM into a single fp32
   accumulator, cast to the weight's dtype once, in backward; with ``grad_accum="weight"`` into a
   buffer of the weight's dtype instead, see :data:`~lightning_cggr.kernels.contract.GRAD_ACCUMS`);
   with a bias, ``grad_b += dz.sum(0)`` in fp32 (a ``[V]`` vector: always fp32, one rounding).

Gradients are therefore computed in forward whenever an input requires grad; backward only multiplies
them by the upstream gradient (the reduction's ``scale``, a device tensor ``row_weight / kept count``
for ``"mean"``, is folded into ``dz``). ``reduction="none"`` cannot do that: each row's upstream
gradient must be inside ``dz`` before the rows are summed into ``grad_W``, and it is only known in
backward, so that reduction keeps ``hidden``/``weight``/``lse`` and backward runs the pass again
(logits GEMM, one row pass with the saved lse, two gradient GEMMs). Double backward is unsupported;
a second ``backward`` through the same graph raises.

Ignored rows (label ``ignore_index``) are zeroed in the chunk of ``hidden`` before the GEMMs, so they
cost their (cheap) share of the GEMMs but can never leak into a gradient, even if their hidden states
are NaN. To stop paying for them at all, compact the kept rows first
(:func:`lightning_cggr.kernels.compact_rows`). Nothing here syncs with the host: the kept count stays
a device tensor and every shape depends on ``N``, ``H`` and ``V`` only.

``impl="torch"`` (:func:`chunked_linear_cross_entropy`) computes in fp32 (fp64 for fp64 inputs)
whatever the input dtype: it is the CPU path and an oracle. Measured on this project's 2-core x86 CPUs
(fp32, H=576, V=49152, N=1024, fwd+bwd, ``experiments/results/bench_cross_entropy_cpu.md``) it is
faster than the full-logits ``naive`` path and than ``F.linear_cross_entropy``, hence ``auto`` on CPU.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from lightning_cggr.kernels.contract import (
    CEOptions,
    TokenStats,
    check_args,
    check_stats_args,
    default_chunk_rows,
)

RowOp = Callable[..., None]
"""``row_op(z, y, scale, loss, lse, opts, *, want_grad, lse_known)``: reads the logits chunk ``z``
[C, V], writes fp32 ``loss[C]`` and ``lse[C]`` (with ``lse_known`` it reads ``lse`` instead and need
not write ``loss``); with ``want_grad`` rewrites ``z`` in place as ``scale * dloss/dz`` (``scale``:
fp32, 0-d or [C]), zero at ignored rows."""

StatsOp = Callable[..., None]
"""``stats_op(z, y, out, ignore_index, softcap)``: writes ``out[0..3, C]`` = lse, entropy, margin, nll of
``z`` (capped to ``softcap * tanh(z / softcap)`` first when ``softcap`` is not None, in fp32 or wider)."""


class Backend(NamedTuple):
    """How one implementation runs the chunk pass: its GEMM dtype and its row operations."""

    name: str
    prepare: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    """(hidden, weight) -> both in the GEMM dtype, row-major (a copy only where needed); a bias is cast
    to the same dtype."""
    row_op: RowOp
    stats_op: StatsOp


# ----------------------------------------------------------------------------- grad_W accumulation
_FP32_OUT_GEMM: dict[tuple[torch.device, torch.dtype], bool] = {}


def fp32_out_gemm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch.mm``/``torch.addmm(acc_fp32, a, b, out_dtype=torch.float32, out=acc_fp32)`` run for
    ``dtype`` operands on ``device`` (cuBLAS, torch >= 2.8; not on CPU). Probed once per pair on tiny
    tensors laid out like the real call: a failed dispatch raises at once, nothing is read back (no
    sync)."""
    key = (torch.device(device), dtype)
    if key not in _FP32_OUT_GEMM:
        ok = False
        if key[0].type == "cuda":
            try:
                a = torch.zeros(3, 2, dtype=dtype, device=key[0]).t()  # transposed, as dz.T is
                b = torch.zeros(3, 2, dtype=dtype, device=key[0])
                acc = torch.zeros(2, 2, dtype=torch.float32, device=key[0])
                torch.mm(a, b, out_dtype=torch.float32, out=acc)
                torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
                ok = True
            except (RuntimeError, TypeError, NotImplementedError):
                ok = False
        _FP32_OUT_GEMM[key] = ok
    return _FP32_OUT_GEMM[key]


def accumulate_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """``acc += a @ b`` (``acc = a @ b`` when ``first``: no zero fill) into the grad_W accumulator ``acc``.

    Same dtype: ``mm``/``addmm_`` (for a bf16/fp16 ``acc``, the ``grad_accum="weight"`` case, the GEMM
    sums in fp32 and adds to ``acc`` with one rounding per chunk). bf16/fp16 operands into an fp32
    ``acc``: cuBLAS writes the fp32 sum straight into ``acc`` (``out_dtype``) where supported;
    elsewhere (CPU, older torch) the chunk's product is formed in the operands' dtype (fp32
    accumulation inside the GEMM, one rounding of each chunk's partial sum) and added to ``acc`` in
    fp32 -- the fallback Liger-Kernel also uses. Any other pairing (fp32 operands of the torch path
    into a bf16 ``acc``): the product, then one rounding into ``acc``.
    """
    if a.dtype == acc.dtype:
        if first:
            torch.mm(a, b, out=acc)
        else:
            acc.addmm_(a, b)
    elif acc.dtype == torch.float32 and fp32_out_gemm_supported(acc.device, a.dtype):
        if first:
            torch.mm(a, b, out_dtype=acc.dtype, out=acc)
        else:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    elif first:
        acc.copy_(torch.mm(a, b))
    else:
        acc.add_(torch.mm(a, b))


# ----------------------------------------------------------------------------- the chunk pass
def chunk_pass(h, w, labels, opts: CEOptions, row_op: RowOp, chunk_rows: int, row_scale, need_h, need_w,
               acc_dtype: torch.dtype, lse=None, bias=None, need_b=False):
    """One sweep over row chunks. ``h``/``w`` (and ``bias`` [V], or None): GEMM dtype, row-major;
    ``labels``: int64 [N].

    ``row_scale`` (fp32, 0-d or [N]) is d(output)/d(row loss); gradients are formed only when it is
    given. ``lse`` (fp32 [N]) given: the row op skips its logsumexp pass. Returns ``(loss [N] fp32,
    lse [N] fp32, grad_h [N, H] in h's dtype or None, grad_w [V, H] in acc_dtype or None, grad_b [V]
    fp32 (fp64) or None)``.
    """
    n, width = h.shape
    vocab = w.shape[0]
    dev = h.device
    want_grad = row_scale is not None and (need_h or need_w or need_b)
    lse_known = lse is not None
    loss = torch.empty(n, dtype=torch.float32, device=dev)
    if lse is None:
        lse = torch.empty(n, dtype=torch.float32, device=dev)
    grad_h = torch.empty_like(h) if want_grad and need_h else None
    grad_w = None
    if want_grad and need_w:  # written whole by the first chunk's GEMM
        grad_w = (torch.empty if n > 0 else torch.zeros)((vocab, width), dtype=acc_dtype, device=dev)
    grad_b = None
    if want_grad and need_b:
        grad_b = torch.zeros(vocab, dtype=torch.float64 if acc_dtype == torch.float64 else torch.float32, device=dev)
    if n == 0:
        return loss, lse, grad_h, grad_w, grad_b
    invalid = (labels == opts.ignore_index).unsqueeze(1)
    rows = min(chunk_rows, n)
    buf = torch.empty((rows, vocab), dtype=h.dtype, device=dev)
    wt = w.t()
    for start in range(0, n, rows):
        end = min(start + rows, n)
        hc = h[start:end].masked_fill(invalid[start:end], 0)  # ignored rows never reach a gradient
        z = buf[: end - start]
        if bias is None:
            torch.mm(hc, wt, out=z)
        else:
            torch.addmm(bias, hc, wt, out=z)
        scale = None
        if want_grad:
            scale = row_scale if row_scale.dim() == 0 else row_scale[start:end]
        row_op(z, labels[start:end], scale, loss[start:end], lse[start:end], opts,
               want_grad=want_grad, lse_known=lse_known)
        if grad_h is not None:
            torch.mm(z, w, out=grad_h[start:end])
        if grad_w is not None:
            accumulate_(grad_w, z.t(), hc, first=start == 0)
        if grad_b is not None:
            grad_b += z.sum(dim=0, dtype=grad_b.dtype)
    return loss, lse, grad_h, grad_w, grad_b


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Autograd wrapper of :func:`chunk_pass` for any :class:`Backend` (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, row_weight, opts, reduction, backend, chunk_size, grad_accum):
        dev = hidden.device
        h, w = backend.prepare(hidden, weight)
        b = None if bias is None else bias.to(w.dtype).contiguous()
        labels = labels.long().contiguous()
        valid = labels != opts.ignore_index
        count = valid.sum().clamp_min(1).to(torch.float32)
        rw = None if row_weight is None else row_weight.to(torch.float32).contiguous()
        chunk_rows = chunk_size or default_chunk_rows(w.shape[0], h.element_size())
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        acc_dtype = accumulator_dtype(h.dtype, weight.dtype, grad_accum)
        eager = (need_h or need_w or need_b) and reduction != "none"
        row_scale = None
        if eager:
            base = (1.0 / count) if reduction == "mean" else torch.ones((), dtype=torch.float32, device=dev)
            row_scale = base if rw is None else rw * base
        with torch.autocast(dev.type, enabled=False):
            loss, lse, grad_h, grad_w, grad_b = chunk_pass(
                h, w, labels, opts, backend.row_op, chunk_rows, row_scale, need_h, need_w, acc_dtype,
                bias=b, need_b=need_b,
            )
        if rw is not None:
            loss = torch.where(valid, loss * rw, torch.zeros_like(loss))
        ctx.reduction, ctx.opts, ctx.backend, ctx.chunk_rows = reduction, opts, backend, chunk_rows
        ctx.acc_dtype = acc_dtype
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.grads = None
        if eager:
            ctx.grads = (grad_h, grad_w, grad_b)  # private buffers, scaled in place by backward
        elif need_h or need_w or need_b:
            ctx.save_for_backward(h, w, b, labels, lse, rw)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total if reduction == "sum" else total / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        need = ctx.needs_input_grad[:3]
        go = grad_out.to(torch.float32)
        if ctx.reduction != "none":
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_cross_entropy: backward ran twice through one forward; its gradients are "
                    "computed in forward and consumed by the first backward. Recompute the loss instead."
                )
            grads = ctx.grads
            ctx.grads = None
        else:
            h, w, b, labels, lse, rw = ctx.saved_tensors
            scale = go.contiguous() if rw is None else (go * rw).contiguous()
            with torch.autocast(h.device.type, enabled=False):
                _, _, *grads = chunk_pass(
                    h, w, labels, ctx.opts, ctx.backend.row_op, ctx.chunk_rows, scale, need[0], need[1],
                    ctx.acc_dtype, lse=lse, bias=b, need_b=need[2],
                )
            go = None
        out = [None if not wanted else (g if go is None else g.mul_(go.to(g.dtype))).to(dtype)
               for wanted, g, dtype in zip(need, grads, ctx.dtypes)]
        return (*out, None, None, None, None, None, None, None)


def accumulator_dtype(gemm_dtype: torch.dtype, weight_dtype: torch.dtype, grad_accum: str) -> torch.dtype:
    """The dtype ``grad_W`` is summed in (:data:`~lightning_cggr.kernels.contract.GRAD_ACCUMS`)."""
    if torch.float64 in (gemm_dtype, weight_dtype):
        return torch.float64
    if grad_accum == "weight":
        return weight_dtype  # (None, the default, and "fp32" sum in fp32)
    return torch.float32


def linear_ce(backend: Backend, hidden, weight, labels, *, ignore_index, reduction, label_smoothing,
              lse_square_scale, softcap, chunk_size, row_weight, grad_accum=None, bias=None) -> torch.Tensor:
    """Validate, then run :class:`LinearCrossEntropyFunction` with ``backend``."""
    check_args(hidden, weight, labels, reduction, label_smoothing, lse_square_scale, softcap, row_weight, chunk_size,
               grad_accum, bias)
    opts = CEOptions(int(ignore_index), float(label_smoothing), float(lse_square_scale),
                     None if softcap is None else float(softcap))
    if not torch.is_grad_enabled():  # validation (no_grad, inference_mode): inside forward, needs_input_grad
        # still says the head's Parameter wants a gradient, which would cost a grad-W GEMM and a V x H buffer
        hidden, weight = hidden.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    return LinearCrossEntropyFunction.apply(hidden, weight, bias, labels, row_weight, opts, reduction, backend,
                                            chunk_size, grad_accum)


@torch.no_grad()
def stats_pass(backend: Backend, hidden, weight, labels, *, ignore_index: int, chunk_size: int | None,
               softcap: float | None = None, bias: torch.Tensor | None = None) -> TokenStats:
    """No-grad per-token statistics: per chunk one logits GEMM (``+ bias``) and one row-statistics pass
    (with ``softcap``, the row operation caps the logits to ``softcap * tanh(z / softcap)`` in fp32: in
    place on a bf16 chunk it would round three times)."""
    check_stats_args(hidden, weight, labels, chunk_size, softcap, bias)
    h, w = backend.prepare(hidden.detach(), weight.detach())
    b = None if bias is None else bias.detach().to(w.dtype).contiguous()
    n, vocab = h.shape[0], w.shape[0]
    out = torch.zeros(4, n, dtype=torch.float32, device=h.device)
    if n == 0:
        return TokenStats(*out)
    y = labels.long().contiguous() if labels is not None else None
    rows = min(chunk_size or default_chunk_rows(vocab, h.element_size()), n)
    buf = torch.empty((rows, vocab), dtype=h.dtype, device=h.device)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, n, rows):
            end = min(start + rows, n)
            z = buf[: end - start]
            if b is None:
                torch.mm(h[start:end], w.t(), out=z)
            else:
                torch.addmm(b, h[start:end], w.t(), out=z)
            backend.stats_op(z, None if y is None else y[start:end], out[:, start:end], ignore_index, softcap)
    return TokenStats(*out)


# ----------------------------------------------------------------------------- torch row ops
def torch_ce_rows(z, y, scale, loss, lse, opts: CEOptions, *, want_grad: bool, lse_known: bool) -> None:
    """The row operation of ``impl="torch"`` in eager torch ops (z fp32/fp64, modified in place)."""
    ignore_index, eps, zscale, cap = opts
    vocab = z.shape[1]
    valid = y != ignore_index
    y0 = torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)
    t = None
    if cap is not None:
        t = torch.tanh(z / cap)
        z.copy_(t).mul_(cap)  # z = cap * tanh(x / cap); t kept for the chain rule
    z_y = z.gather(1, y0).squeeze(1)
    z_sum = z.sum(dim=1) if eps > 0.0 else None
    if lse_known:
        lse_v = lse.to(z.dtype)
        z.sub_(lse_v.unsqueeze(1)).exp_()  # softmax
        inv_s = None
    else:
        m = z.amax(dim=1)
        z.sub_(m.unsqueeze(1)).exp_()  # exp(z - max)
        s = z.sum(dim=1)
        lse_v = m + s.log()
        lse.copy_(lse_v)
        inv_s = s.reciprocal()
    row = lse_v - (1.0 - eps) * z_y
    if z_sum is not None:
        row = row - (eps / vocab) * z_sum
    if zscale > 0.0:
        row = row + zscale * lse_v.square()
    loss.copy_(torch.where(valid, row, torch.zeros_like(row)))
    if not want_grad:
        return
    # dloss/dz = softmax * (1 + 2 s lse) - eps / V - (1 - eps) onehot, times the per-row scale
    sc = torch.where(valid, scale.to(z.dtype).expand_as(lse_v), torch.zeros_like(lse_v))
    factor = sc if inv_s is None else sc * inv_s
    if zscale > 0.0:
        factor = factor * (1.0 + 2.0 * zscale * lse_v)
    z.mul_(factor.unsqueeze(1))
    if eps > 0.0:
        z.sub_((sc * (eps / vocab)).unsqueeze(1))
    z.scatter_add_(1, y0, (-(1.0 - eps) * sc).unsqueeze(1))
    if t is not None:
        z.mul_(t.square_().neg_().add_(1.0))


def torch_stats_rows(z, y, out, ignore_index: int, softcap: float | None = None) -> None:
    """The statistics row operation of the torch path (z fp32/fp64, modified in place)."""
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    top2 = z.topk(2, dim=1).values
    z_y = None
    if y is not None:
        valid = y != ignore_index
        z_y = z.gather(1, torch.where(valid, y, torch.zeros_like(y)).unsqueeze(1)).squeeze(1)
    m = top2[:, 0]
    z.sub_(m.unsqueeze(1))  # z - max
    e = torch.exp(z)  # the one [C, V] temporary
    s = e.sum(dim=1)
    lse = m + s.log()
    # entropy = lse - sum(p z) = log s - sum(p (z - m))
    out[0] = lse
    out[1] = s.log() - e.mul_(z).sum(dim=1) / s
    out[2] = top2[:, 0] - top2[:, 1]
    if y is None:
        out[3] = 0.0
    else:
        out[3] = torch.where(valid, lse - z_y, torch.zeros_like(lse))


def _torch_prepare(hidden: torch.Tensor, weight: torch.Tensor):
    cdt = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    return hidden.to(cdt).contiguous(), weight.to(cdt).contiguous()


TORCH = Backend("torch", _torch_prepare, torch_ce_rows, torch_stats_rows)


def chunked_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                                 label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
                                 chunk_size=None, row_weight=None, grad_accum=None, bias=None) -> torch.Tensor:
    """``impl="torch"``: the chunk pass with torch row ops, fp32 (fp64) compute."""
    return linear_ce(TORCH, hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
                     label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
                     chunk_size=chunk_size, row_weight=row_weight, grad_accum=grad_accum, bias=bias)


def chunked_token_stats(hidden, weight, labels=None, *, ignore_index=-100, chunk_size=None,
                        softcap=None, bias=None) -> TokenStats:
    """``impl="torch"`` statistics: fp32 (fp64) logits, one chunk at a time."""
    return stats_pass(TORCH, hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size,
                      softcap=softcap, bias=bias)
