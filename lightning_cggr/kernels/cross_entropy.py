"""Triton fused linear cross-entropy and per-token logit statistics (``impl="triton"``).

Never allocates logits: every program computes a ``[BLOCK_M, BLOCK_V]`` logits tile from
``BLOCK_H``-wide slices of ``hidden`` and ``weight`` (``tl.dot``, fp32 accumulation) and consumes it.

Forward (``_lce_fwd_kernel``, grid = row blocks): online logsumexp over vocabulary tiles; per row
also the label logit, the logit sum (label smoothing), and -- for :func:`triton_token_stats` -- the
online entropy and the running top-2 logits. Writes fp32 ``lse`` and the per-row loss.

Backward (``_lce_bwd_kernel``, grid = row blocks x vocabulary tiles): recomputes its logits tile,
forms ``dL/dz = softmax * (1 + 2 s lse) - (1 - eps) onehot - eps / V`` (times the soft-cap chain
factor and the per-row upstream gradient) and adds ``dz @ W`` into ``grad_hidden`` and
``dz.T @ h`` into ``grad_weight`` with fp32 atomics. ``grad_weight`` accumulates in an fp32 buffer
and is cast to the weight's dtype once at the end.

Ignored rows cost nothing: a stable device-side argsort puts the kept rows first, the kept count
stays a device tensor that the kernels read, and programs whose row block starts past it exit at
once -- no host sync, no data-dependent shapes. All offsets are int64.

Cost: one logits pass forward, one recompute plus two gradient matmuls backward (4 N·V·H MACs in
all, like Apple's Cut Cross-Entropy; Liger's FLCE spends 3 but holds chunk x V logits).
On CUDA the tile sizes are autotuned; under ``TRITON_INTERPRET=1`` (CPU) one small fixed config
is used. fp32 inputs use IEEE fp32 dots (no TF32), bf16/fp16 use tensor-core dots.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from lightning_cggr.kernels.reference import TokenStats, check_args

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_FIXED = dict(BLOCK_M=16, BLOCK_V=128, BLOCK_H=32)  # interpreter config: small, fast to simulate


def _configs(bwd: bool):
    out = []
    for bm, bv, bh, warps in (
        (64, 128, 64, 4),
        (64, 256, 32, 8),
        (128, 128, 32, 8),
        (128, 64, 64, 4),
        (32, 256, 64, 4),
    ):
        out.append(triton.Config(dict(BLOCK_M=bm, BLOCK_V=bv, BLOCK_H=bh), num_warps=warps, num_stages=3))
    return out


def _maybe_autotune(bwd: bool):
    def wrap(fn):
        if INTERPRET:
            return fn
        reset = ["grad_h_ptr", "grad_w_ptr"] if bwd else None
        return triton.autotune(configs=_configs(bwd), key=["H", "V", "N_BUCKET"], reset_to_zero=reset)(fn)

    return wrap


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, row_mask, offs_v, v_mask, H, stride_h, stride_w,
                 BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """fp32 [BLOCK_M, BLOCK_V] tile of hidden[rows] @ weight[offs_v].T (rows, offs_v int64)."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_mask = offs_k < H
        hk = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                     mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        wk = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :],
                     mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            hk = hk.to(tl.float32)
            wk = wk.to(tl.float32)
        acc = tl.dot(hk, tl.trans(wk), acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lce_fwd_kernel(
    h_ptr, w_ptr, y_ptr, perm_ptr, count_ptr,
    lse_ptr, loss_ptr, ent_ptr, margin_ptr,
    N, V, H, N_BUCKET, stride_h, stride_w,
    ignore_index, label_smoothing, lse_square_scale, softcap,
    HAS_LABELS: tl.constexpr, USE_PERM: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr, STATS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * BLOCK_M
    if USE_PERM:
        n_active = tl.load(count_ptr).to(tl.int64)
    else:
        n_active = N
    if row_start < n_active:
        offs_m = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = offs_m < n_active
        if USE_PERM:
            rows = tl.load(perm_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        else:
            rows = offs_m
        if HAS_LABELS:
            y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
        else:
            y = tl.zeros((BLOCK_M,), tl.int64) + ignore_index  # no labels: every row "ignored"
        valid = row_mask & (y != ignore_index)

        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK_M,), tl.float32)
        z_y = tl.zeros((BLOCK_M,), tl.float32)
        z_sum = tl.zeros((BLOCK_M,), tl.float32)
        t = tl.zeros((BLOCK_M,), tl.float32)  # sum exp(z - m) * z, for the entropy
        top1 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        top2 = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            v_mask = offs_v < V
            z = _logits_tile(h_ptr, w_ptr, rows, row_mask, offs_v, v_mask, H, stride_h, stride_w,
                             BLOCK_M, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
            if HAS_SOFTCAP:
                z = softcap * _tanh(z / softcap)
            z_fin = tl.where(v_mask[None, :], z, 0.0)
            z = tl.where(v_mask[None, :], z, float("-inf"))
            tile_max = tl.max(z, axis=1)
            m_new = tl.maximum(m, tile_max)
            alpha = tl.exp(m - m_new)
            e = tl.exp(z - m_new[:, None])
            s = s * alpha + tl.sum(e, axis=1)
            z_y += tl.sum(tl.where(offs_v[None, :] == y[:, None], z_fin, 0.0), axis=1)
            if HAS_SMOOTHING:
                z_sum += tl.sum(z_fin, axis=1)
            if STATS:
                t = t * alpha + tl.sum(e * z_fin, axis=1)
                arg = tl.argmax(z, axis=1).to(tl.int64)
                second = tl.max(tl.where(offs_v[None, :] == (v0 + arg)[:, None], float("-inf"), z), axis=1)
                top2 = tl.maximum(tl.minimum(top1, tile_max), tl.maximum(top2, second))
                top1 = tl.maximum(top1, tile_max)
            m = m_new
        lse = m + tl.log(s)
        loss = lse - (1.0 - label_smoothing) * z_y
        if HAS_SMOOTHING:
            loss -= label_smoothing / V * z_sum
        loss += lse_square_scale * lse * lse
        loss = tl.where(valid, loss, 0.0)
        tl.store(lse_ptr + rows, lse, mask=row_mask)
        tl.store(loss_ptr + rows, loss, mask=row_mask)
        if STATS:
            tl.store(ent_ptr + rows, lse - t / s, mask=row_mask)
            tl.store(margin_ptr + rows, top1 - top2, mask=row_mask)


@triton.jit
def _lce_bwd_kernel(
    h_ptr, w_ptr, y_ptr, perm_ptr, count_ptr, lse_ptr, scale_ptr, scale_stride,
    grad_h_ptr, grad_w_ptr,
    N, V, H, N_BUCKET, stride_h, stride_w,
    ignore_index, label_smoothing, lse_square_scale, softcap,
    HAS_SOFTCAP: tl.constexpr, HAS_SMOOTHING: tl.constexpr, NEED_H: tl.constexpr,
    NEED_W: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    row_start = pid_m.to(tl.int64) * BLOCK_M
    n_active = tl.load(count_ptr).to(tl.int64)
    if row_start < n_active:
        offs_m = row_start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = offs_m < n_active
        rows = tl.load(perm_ptr + offs_m, mask=row_mask, other=0).to(tl.int64)
        y = tl.load(y_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
        valid = row_mask & (y != ignore_index)
        lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
        scale = tl.load(scale_ptr + rows * scale_stride, mask=row_mask, other=0.0).to(tl.float32)
        offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = offs_v < V

        z = _logits_tile(h_ptr, w_ptr, rows, row_mask, offs_v, v_mask, H, stride_h, stride_w,
                         BLOCK_M, BLOCK_V, BLOCK_H, DOT_PRECISION, UPCAST)
        if HAS_SOFTCAP:
            th = _tanh(z / softcap)
            z = softcap * th
        g = tl.exp(z - lse[:, None]) * (1.0 + 2.0 * lse_square_scale * lse)[:, None]
        if HAS_SMOOTHING:
            g -= label_smoothing / V
        g -= tl.where(offs_v[None, :] == y[:, None], 1.0 - label_smoothing, 0.0)
        if HAS_SOFTCAP:
            g *= 1.0 - th * th
        g = tl.where(valid[:, None] & v_mask[None, :], g * scale[:, None], 0.0)
        g = g.to(h_ptr.dtype.element_ty)
        if UPCAST:
            g = g.to(tl.float32)

        for k0 in range(0, H, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            k_mask = offs_k < H
            if NEED_H:
                wk = tl.load(w_ptr + offs_v[:, None] * stride_w + offs_k[None, :],
                             mask=v_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST:
                    wk = wk.to(tl.float32)
                dh = tl.dot(g, wk, input_precision=DOT_PRECISION)
                tl.atomic_add(grad_h_ptr + rows[:, None] * H + offs_k[None, :], dh,
                              mask=row_mask[:, None] & k_mask[None, :])
            if NEED_W:
                hk = tl.load(h_ptr + rows[:, None] * stride_h + offs_k[None, :],
                             mask=row_mask[:, None] & k_mask[None, :], other=0.0)
                if UPCAST:
                    hk = hk.to(tl.float32)
                dw = tl.dot(tl.trans(g), hk, input_precision=DOT_PRECISION)
                tl.atomic_add(grad_w_ptr + offs_v[:, None] * H + offs_k[None, :], dw,
                              mask=v_mask[:, None] & k_mask[None, :])


_fwd = _maybe_autotune(False)(_lce_fwd_kernel)
_bwd = _maybe_autotune(True)(_lce_bwd_kernel)


def _meta():
    return dict(_FIXED) if INTERPRET else {}


def _n_bucket(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()  # autotune key: next power of two of N


def _prepare(hidden: torch.Tensor, weight: torch.Tensor):
    """Common compute dtype (autocast dtype under autocast), contiguous rows, the dot precision."""
    if torch.float64 in (hidden.dtype, weight.dtype):
        raise ValueError("impl='triton' supports fp32/bf16/fp16 inputs; use impl='torch' for float64")
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
    else:
        cdt = torch.promote_types(hidden.dtype, weight.dtype)
    h = hidden.to(cdt)
    w = weight.to(cdt)
    if h.stride(-1) != 1:
        h = h.contiguous()
    if w.stride(-1) != 1:
        w = w.contiguous()
    # the interpreter's tl.dot mis-handles bf16 operands (numpy has no bf16): upcast the tiles
    # there; on GPUs bf16 tiles go to the tensor cores as they are
    upcast = INTERPRET and cdt == torch.bfloat16
    return h, w, ("ieee" if cdt == torch.float32 else "tf32"), upcast


def _grid_fwd(n):
    return lambda meta: (triton.cdiv(n, meta["BLOCK_M"]),)


class _TritonLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, label_smoothing,
                lse_square_scale, softcap):
        h, w, prec, upcast = _prepare(hidden, weight)
        n, hdim = h.shape
        vocab = w.shape[0]
        labels = labels.long().contiguous()
        valid = labels != ignore_index
        count = valid.sum(dtype=torch.int32).reshape(1)
        # kept rows first (stable), so that programs past the kept count exit at once
        perm = torch.argsort((~valid).to(torch.int8), stable=True)
        lse = torch.empty(n, dtype=torch.float32, device=h.device)
        losses = torch.zeros(n, dtype=torch.float32, device=h.device)
        if n > 0:
            _fwd[_grid_fwd(n)](
                h, w, labels, perm, count, lse, losses, lse, lse,
                n, vocab, hdim, _n_bucket(n), h.stride(0), w.stride(0),
                ignore_index, label_smoothing, lse_square_scale, softcap or 1.0,
                HAS_LABELS=True, USE_PERM=True, HAS_SOFTCAP=softcap is not None,
                HAS_SMOOTHING=label_smoothing > 0.0, STATS=False, DOT_PRECISION=prec, UPCAST=upcast, **_meta(),
            )
        denom = count.clamp_min(1).to(torch.float32).reshape(())
        ctx.save_for_backward(h, w, labels, perm, count, lse, denom)
        ctx.opts = (ignore_index, reduction, label_smoothing, lse_square_scale, softcap, prec, upcast)
        ctx.dtypes = (hidden.dtype, weight.dtype)
        if reduction == "none":
            return losses
        total = losses.sum()
        return total if reduction == "sum" else total / denom

    @staticmethod
    def backward(ctx, grad_out):
        h, w, labels, perm, count, lse, denom = ctx.saved_tensors
        ignore_index, reduction, label_smoothing, lse_square_scale, softcap, prec, upcast = ctx.opts
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, hdim = h.shape
        vocab = w.shape[0]
        if reduction == "none":
            scale, scale_stride = grad_out.float().contiguous(), 1
        else:
            scale = grad_out.float().reshape(1)
            if reduction == "mean":
                scale = scale / denom
            scale_stride = 0
        grad_h = torch.zeros(h.shape, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
        if n > 0 and (need_h or need_w):
            dummy = torch.empty(1, dtype=torch.float32, device=h.device)  # never written
            _bwd[lambda meta: (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(vocab, meta["BLOCK_V"]))](
                h, w, labels, perm, count, lse, scale, scale_stride,
                grad_h if need_h else dummy, grad_w if need_w else dummy,
                n, vocab, hdim, _n_bucket(n), h.stride(0), w.stride(0),
                ignore_index, label_smoothing, lse_square_scale, softcap or 1.0,
                HAS_SOFTCAP=softcap is not None, HAS_SMOOTHING=label_smoothing > 0.0,
                NEED_H=need_h, NEED_W=need_w, DOT_PRECISION=prec, UPCAST=upcast, **_meta(),
            )
        hdt, wdt = ctx.dtypes
        return (
            grad_h.to(hdt) if need_h else None,
            grad_w.to(wdt) if need_w else None,
            None, None, None, None, None, None,
        )


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRET:
        raise ValueError(
            "impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton and "
            "lightning_cggr.kernels.cross_entropy are imported; use impl='torch' on CPU"
        )


def triton_linear_cross_entropy(
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
    """Fused Triton linear cross-entropy; same contract as :func:`lightning_cggr.kernels.linear_cross_entropy`.

    ``chunk_size`` is accepted for signature compatibility and ignored (tiles are autotuned).
    """
    del chunk_size
    check_args(hidden, weight, labels, reduction, label_smoothing, lse_square_scale, softcap)
    _check_device(hidden)
    return _TritonLinearCE.apply(
        hidden, weight, labels, int(ignore_index), reduction, float(label_smoothing),
        float(lse_square_scale), None if softcap is None else float(softcap),
    )


@torch.no_grad()
def triton_token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
) -> TokenStats:
    """Per-token fp32 ``lse``, ``entropy``, ``margin``, ``nll`` in one fused pass, no logits tensor."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"token_stats: need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if weight.shape[0] < 2:
        raise ValueError("token_stats: the margin needs a vocabulary of at least 2")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != hidden.shape[0]):
        raise ValueError(f"token_stats: labels must be [N], got {tuple(labels.shape)}")
    _check_device(hidden)
    h, w, prec, upcast = _prepare(hidden, weight)
    n, hdim = h.shape
    out = torch.zeros(4, n, dtype=torch.float32, device=h.device)
    y = labels.long().contiguous() if labels is not None else out[3]
    if n > 0:
        _fwd[_grid_fwd(n)](
            h, w, y, y, y, out[0], out[3], out[1], out[2],
            n, w.shape[0], hdim, _n_bucket(n), h.stride(0), w.stride(0),
            ignore_index, 0.0, 0.0, 1.0,
            HAS_LABELS=labels is not None, USE_PERM=False, HAS_SOFTCAP=False,
            HAS_SMOOTHING=False, STATS=True, DOT_PRECISION=prec, UPCAST=upcast, **_meta(),
        )
    return TokenStats(out[0], out[1], out[2], out[3])
