"""Torch paths of the linear cross-entropy: the CPU implementation and the naive baseline.

``impl="torch"`` (:func:`chunked_linear_cross_entropy`) processes the rows of ``hidden`` in chunks,
so at most ``chunk_size x V`` logits (fp32) exist at any time, forward or backward. Gradients are
computed in the forward pass (one logits matmul and two gradient matmuls per chunk, no
recomputation) when the reduction is ``mean``/``sum``; for ``reduction="none"`` the per-row upstream
gradient is only known in backward, so backward recomputes each chunk's logits.

Why hand-written and not ``torch.nn.functional.linear_cross_entropy`` (torch >= 2.13): measured on
this project's 2-core x86 CPUs (fp32, H=576, V=49152, N=1024, fwd+bwd, interleaved medians of 3,
``experiments/results/bench_cross_entropy_cpu.md``): naive 8.2 s, this chunked path 7.2 s (0.88x),
``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions()`` 51.8 s (6.3x); DESIGN.md's earlier
measurement found 4.5x. It also lacks z-loss, soft-capping and a zero loss for an all-ignored call.
The benchmark keeps measuring it so the choice can be revisited.

``impl="naive"`` (:func:`naive_linear_cross_entropy`) is the HF-style path: full ``[N, V]`` logits
and ``F.cross_entropy`` -- the benchmark baseline, not meant for training large vocabularies.

All-ignored calls: torch's ``F.cross_entropy(reduction="mean")`` returns NaN there; every path of
this package returns 0 (and zero gradients), because a training step must survive a batch whose
labels are all masked. The kept-row count stays a device tensor (no host sync).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

REDUCTIONS = ("mean", "sum", "none")


class TokenStats(NamedTuple):
    """Per-token statistics of the logits ``hidden @ weight.T`` (each float32 ``[N]``)."""

    lse: torch.Tensor
    """log-sum-exp of the logits."""
    entropy: torch.Tensor
    """entropy of softmax(logits), in nats."""
    margin: torch.Tensor
    """top-1 logit minus top-2 logit (>= 0)."""
    nll: torch.Tensor
    """``lse - logit[label]``; 0 where the label is ``ignore_index`` or labels is None."""


def default_chunk_rows(vocab: int, budget_bytes: int = 1 << 28) -> int:
    """Rows per chunk so that one fp32 logits chunk (plus its gradient) fits ``budget_bytes``."""
    return max(16, min(4096, budget_bytes // (8 * max(vocab, 1))))


def check_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
) -> None:
    """Validate shapes and options; raise one ValueError listing every problem."""
    problems = []
    if hidden.dim() != 2:
        problems.append(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2:
        problems.append(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.dim() == 2 and weight.dim() == 2 and hidden.shape[1] != weight.shape[1]:
        problems.append(f"hidden width {hidden.shape[1]} != weight width {weight.shape[1]}")
    if labels.dim() != 1 or (hidden.dim() == 2 and labels.shape[0] != hidden.shape[0]):
        problems.append(f"labels must be [N] matching hidden, got shape {tuple(labels.shape)}")
    if labels.dtype not in (torch.int64, torch.int32):
        problems.append(f"labels must be int64/int32, got {labels.dtype}")
    if hidden.device != weight.device or hidden.device != labels.device:
        problems.append(
            f"hidden, weight, labels on different devices: {hidden.device}, {weight.device}, {labels.device}"
        )
    for name, t in (("hidden", hidden), ("weight", weight)):
        if t.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            problems.append(f"{name} must be float32/bfloat16/float16, got {t.dtype}")
    if reduction not in REDUCTIONS:
        problems.append(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        problems.append(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if lse_square_scale < 0.0:
        problems.append(f"lse_square_scale (z-loss) must be >= 0, got {lse_square_scale}")
    if softcap is not None and not softcap > 0.0:
        problems.append(f"softcap must be None or > 0, got {softcap}")
    if problems:
        raise ValueError("linear_cross_entropy: " + "; ".join(problems))


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Dtype of the torch path's matmuls: fp32 (fp64 if an input is fp64), whatever the inputs.

    bf16/fp16 inputs are upcast chunk by chunk (the weight once), so logits, statistics and the
    gradient accumulation are all fp32; gradients are returned in each input's own dtype. Autocast
    is disabled inside: this is the oracle / CPU path, speed on GPUs comes from ``impl="triton"``.
    """
    if torch.float64 in (hidden.dtype, weight.dtype):
        return torch.float64
    return torch.float32


def _chunk_loss_and_dlogits(
    z: torch.Tensor,
    y: torch.Tensor,
    valid: torch.Tensor,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    *,
    want_grad: bool,
):
    """Per-row loss (fp32) and, if asked, d(loss_row)/d(raw logits) for one chunk.

    ``z`` is the fp32 raw logits chunk [C, V] (modified in place: it is a private temporary).
    Ignored rows (``valid`` False) get loss 0 and gradient 0.
    """
    vocab = z.shape[1]
    if softcap is not None:
        z.div_(softcap).tanh_()
        t = z if want_grad else None  # tanh(z / cap), kept for the chain rule
        zc = z * softcap
    else:
        t = None
        zc = z
    lse = torch.logsumexp(zc, dim=1)
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    z_y = zc.gather(1, y_safe.unsqueeze(1)).squeeze(1)
    loss = lse - (1.0 - label_smoothing) * z_y
    if label_smoothing > 0.0:
        loss = loss - (label_smoothing / vocab) * zc.sum(dim=1)
    if lse_square_scale > 0.0:
        loss = loss + lse_square_scale * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    if not want_grad:
        return loss, lse, None
    # d loss / d zc = softmax * (1 + 2 s lse) - (1 - eps) onehot - eps / V
    g = zc.sub_(lse.unsqueeze(1)).exp_()  # softmax, reuses zc's storage when no softcap
    if lse_square_scale > 0.0:
        g.mul_((1.0 + 2.0 * lse_square_scale * lse).unsqueeze(1))
    if label_smoothing > 0.0:
        g.sub_(label_smoothing / vocab)
    g.scatter_add_(
        1, y_safe.unsqueeze(1), torch.full_like(z_y, -(1.0 - label_smoothing)).unsqueeze(1)
    )
    if t is not None:
        g.mul_(1.0 - t.square())
    g.mul_(valid.unsqueeze(1))
    return loss, lse, g


def _chunked_pass(hidden, weight, labels, valid, opts, chunk_rows, row_scale, need_h, need_w):
    """One sweep over row chunks: per-row losses and, if ``row_scale`` is given, the gradients.

    ``row_scale`` (fp32, scalar or ``[N]``) is d(output)/d(row loss). Gradients are accumulated in the
    compute dtype (fp32, or fp64 for fp64 inputs) and returned in it.
    """
    n = hidden.shape[0]
    cdt = compute_dtype(hidden, weight)
    w = weight.to(cdt)
    want_grad = row_scale is not None and (need_h or need_w)
    losses = torch.empty(n, dtype=torch.float32, device=w.device)
    grad_h = torch.empty(hidden.shape, dtype=cdt, device=w.device) if want_grad and need_h else None
    grad_w = torch.zeros(w.shape, dtype=cdt, device=w.device) if want_grad and need_w else None
    with torch.autocast(w.device.type, enabled=False):
        for start in range(0, n, chunk_rows):
            end = min(start + chunk_rows, n)
            hc = hidden[start:end].to(cdt)
            z = (hc @ w.t()).to(torch.float32 if cdt == torch.float32 else cdt)
            loss, _, g = _chunk_loss_and_dlogits(
                z, labels[start:end], valid[start:end], *opts, want_grad=want_grad
            )
            losses[start:end] = loss
            if want_grad:
                rs = row_scale if row_scale.dim() == 0 else row_scale[start:end].unsqueeze(1)
                g = g.mul_(rs.to(g.dtype)).to(cdt)
                if grad_h is not None:
                    torch.mm(g, w, out=grad_h[start:end])
                if grad_w is not None:
                    grad_w.addmm_(g.t(), hc)
    return losses, grad_h, grad_w


class _ChunkedLinearCE(torch.autograd.Function):
    """Gradients are computed during forward for ``mean``/``sum`` (scaled by the scalar upstream
    gradient in backward); for ``none`` backward recomputes the logits chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, label_smoothing,
                lse_square_scale, softcap, chunk_rows):
        labels = labels.long()
        valid = labels != ignore_index
        count = valid.sum().clamp_min(1).to(torch.float32)
        opts = (label_smoothing, lse_square_scale, softcap)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        eager = (need_h or need_w) and reduction != "none"
        # gradient of the reduced loss w.r.t. each row's loss: 1/count (mean) or 1 (sum)
        row_scale = None
        if eager:
            row_scale = (1.0 / count) if reduction == "mean" else torch.ones((), device=hidden.device)
        losses, grad_h, grad_w = _chunked_pass(
            hidden, weight, labels, valid, opts, chunk_rows, row_scale, need_h, need_w
        )
        ctx.reduction = reduction
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if eager:
            ctx.save_for_backward(grad_h, grad_w)
        elif need_h or need_w:
            ctx.opts, ctx.chunk_rows = opts, chunk_rows
            ctx.save_for_backward(hidden, weight, labels, valid)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total if reduction == "sum" else total / count

    @staticmethod
    def backward(ctx, grad_out):
        hdt, wdt = ctx.dtypes
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.reduction != "none":
            grad_h, grad_w = ctx.saved_tensors
            dh = (grad_h * grad_out.to(grad_h.dtype)).to(hdt) if need_h else None
            dw = (grad_w * grad_out.to(grad_w.dtype)).to(wdt) if need_w else None
        else:
            hidden, weight, labels, valid = ctx.saved_tensors
            _, dh, dw = _chunked_pass(
                hidden, weight, labels, valid, ctx.opts, ctx.chunk_rows, grad_out.float(), need_h, need_w
            )
            dh = dh.to(hdt) if need_h else None
            dw = dw.to(wdt) if need_w else None
        return dh, dw, None, None, None, None, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Row-chunked linear cross-entropy (``impl="torch"``); see the module docstring."""
    check_args(hidden, weight, labels, reduction, label_smoothing, lse_square_scale, softcap)
    rows = chunk_size or default_chunk_rows(weight.shape[0])
    return _ChunkedLinearCE.apply(
        hidden, weight, labels, ignore_index, reduction, float(label_smoothing),
        float(lse_square_scale), None if softcap is None else float(softcap), int(rows),
    )


def naive_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """HF-style full-logits path (``impl="naive"``): ``[N, V]`` logits, then ``F.cross_entropy``.

    Logits are upcast to fp32 like HF's ``ForCausalLMLoss``. ``chunk_size`` is accepted and ignored.
    """
    del chunk_size
    check_args(hidden, weight, labels, reduction, label_smoothing, lse_square_scale, softcap)
    logits = F.linear(hidden, weight).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = labels != ignore_index
    losses = F.cross_entropy(
        logits, labels.long(), ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    if lse_square_scale > 0.0:
        lse = torch.logsumexp(logits, dim=-1)
        losses = losses + lse_square_scale * torch.where(valid, lse.square(), torch.zeros_like(lse))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / valid.sum().clamp_min(1)


@torch.no_grad()
def chunked_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_size: int = 1024,
) -> TokenStats:
    """Torch path of :func:`token_stats`: fp32 statistics, ``chunk_size`` rows of logits at a time."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"token_stats: need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if weight.shape[0] < 2:
        raise ValueError("token_stats: the margin needs a vocabulary of at least 2")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != hidden.shape[0]):
        raise ValueError(f"token_stats: labels must be [N], got {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"token_stats: chunk_size must be >= 1, got {chunk_size}")
    n = hidden.shape[0]
    cdt = compute_dtype(hidden, weight)
    h, w = hidden.to(cdt), weight.to(cdt)
    out = torch.empty(4, n, dtype=torch.float32, device=hidden.device)
    with torch.autocast(h.device.type, enabled=False):
        for start in range(0, n, chunk_size):
            end = min(start + chunk_size, n)
            z = (h[start:end] @ w.t()).float()
            lse = torch.logsumexp(z, dim=1)
            top2 = z.topk(2, dim=1).values
            p = (z - lse.unsqueeze(1)).exp_()
            out[0, start:end] = lse
            out[1, start:end] = lse - (p * z).sum(dim=1)
            out[2, start:end] = top2[:, 0] - top2[:, 1]
            if labels is None:
                out[3, start:end] = 0.0
            else:
                y = labels[start:end]
                valid = y != ignore_index
                z_y = z.gather(1, torch.where(valid, y, torch.zeros_like(y)).long().unsqueeze(1)).squeeze(1)
                out[3, start:end] = torch.where(valid, lse - z_y, torch.zeros_like(lse))
    return TokenStats(out[0], out[1], out[2], out[3])
