"""The implementations that are not this package's chunk pass: the full-logits baseline and two peers.

- ``naive``: HF style, full ``[N, V]`` logits upcast to fp32 and ``F.cross_entropy``. The benchmark
  baseline; it holds ``N x V`` fp32 logits (plus their gradient), so it is no training path for
  large vocabularies. No ``chunk_size`` (it has no chunks).
- ``liger``: Liger-Kernel's fused linear cross-entropy (``pip install liger-kernel``; CUDA, or CPU
  under the Triton interpreter), at Liger's defaults (its grad_W accumulates in the weight's dtype).
  Supports label smoothing, z-loss and soft-capping; no ``chunk_size`` (Liger sizes its own chunks).
  Liger reads its kept count back to the host once per call (``.item()``): a sync this package's own
  paths avoid.
- ``torch_lce``: torch's ``F.linear_cross_entropy`` with ``LinearCrossEntropyOptions`` (torch >= 2.13;
  ``chunk_size`` becomes its ``batch_chunk_size``). It has no z-loss and no soft-capping, and its
  chunked path no label smoothing (torch would silently hold full logits): asking for any raises.

Each keeps this package's contract (:mod:`lightning_cggr.kernels.contract`): it is called with
``reduction="sum"`` (or ``"none"`` when per-row output or row weights are wanted, which makes the
peers recompute in backward) and reduced here, so ``"mean"`` divides by the kept count clamped to
>= 1 and an all-ignored call gives 0, not NaN; the loss is fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_cggr.kernels.contract import check_args


def _reduce(losses_or_sum: torch.Tensor, labels, ignore_index, reduction, row_weight, per_row: bool):
    """Finish a peer's output: row weights, then this package's reduction (no host sync)."""
    valid = labels != ignore_index
    out = losses_or_sum.float()
    if per_row:
        out = torch.where(valid, out, torch.zeros_like(out))
        if row_weight is not None:
            out = out * row_weight.float()
        if reduction == "none":
            return out
        out = out.sum()
    if reduction == "sum":
        return out
    return out / valid.sum().clamp_min(1)


def _promote(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """Peers want one dtype; outside autocast, mixed inputs compute in the promoted dtype (a bias in
    the same; under autocast, in the autocast dtype)."""
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return hidden, weight, None if bias is None else bias.to(torch.get_autocast_dtype(dev))
    cdt = torch.promote_types(hidden.dtype, weight.dtype)
    return hidden.to(cdt), weight.to(cdt), None if bias is None else bias.to(cdt)


def naive_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
                               chunk_size=None, row_weight=None, grad_accum=None, bias=None) -> torch.Tensor:
    """``impl="naive"``: full fp32 logits, ``F.cross_entropy``."""
    check_args(hidden, weight, labels, reduction, label_smoothing, lse_square_scale, softcap, row_weight, chunk_size,
               grad_accum, bias)
    for name, value in (("chunk_size", chunk_size), ("grad_accum", grad_accum)):
        if value is not None:
            raise ValueError(f"linear_cross_entropy: impl='naive' computes all rows at once (grad_W in one GEMM); "
                             f"{name} does not apply (use impl='torch' or 'triton' for a chunked path)")
    logits = F.linear(*_promote(hidden, weight, bias)).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    labels = labels.long()
    losses = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none",
                             label_smoothing=label_smoothing)
    if lse_square_scale > 0.0:
        losses = losses + lse_square_scale * torch.logsumexp(logits, dim=-1).square()
    return _reduce(losses, labels, ignore_index, reduction, row_weight, per_row=True)


def liger_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
                               chunk_size=None, row_weight=None, grad_accum=None, bias=None) -> torch.Tensor:
    """``impl="liger"``: Liger-Kernel's ``liger_fused_linear_cross_entropy`` (``grad_accum``: None or
    ``"weight"`` is Liger's default, ``"fp32"`` its ``accum_dtype=torch.float32``)."""
    check_args(hidden, weight, labels, reduction, label_smoothing, lse_square_scale, softcap, row_weight, chunk_size,
               grad_accum, bias)
    if chunk_size is not None:
        raise ValueError("linear_cross_entropy: impl='liger' sizes its own chunks; chunk_size is not supported")
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError as e:
        raise RuntimeError(
            "loss impl 'liger' needs Liger-Kernel: `pip install liger-kernel` (or choose impl='triton'/'torch')"
        ) from e
    per_row = reduction == "none" or row_weight is not None
    h, w, b = _promote(hidden, weight, bias)
    labels = labels.long()
    if h.shape[0] == 0:  # Liger divides by the row count: no rows, no loss (the contract's empty case)
        tied = sum(0 * t.sum() for t in (h, w, b) if t is not None)  # zero gradients, not none
        return _reduce(h.new_zeros(0, dtype=torch.float32) + tied, labels, ignore_index, reduction, row_weight,
                       per_row=True)
    if torch.is_grad_enabled() and not h.requires_grad and (w.requires_grad or (b is not None and b.requires_grad)):
        # Liger forms every gradient only when its input needs one: a frozen body under a trainable
        # head would get no head gradient at all (None, silently). Its input's gradient is dropped.
        h = h.detach().requires_grad_(True)
    extra = {"accum_dtype": torch.float32} if grad_accum == "fp32" else {}
    out = liger_fused_linear_cross_entropy(
        h, w, labels, bias=b, ignore_index=ignore_index, lse_square_scale=lse_square_scale,
        label_smoothing=label_smoothing, reduction="none" if per_row else "sum", softcap=softcap, **extra,
    )
    return _reduce(out, labels, ignore_index, reduction, row_weight, per_row)


def torch_lce_available() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def torch_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean",
                               label_smoothing=0.0, lse_square_scale=0.0, softcap=None,
                               chunk_size=None, row_weight=None, grad_accum=None, bias=None) -> torch.Tensor:
    """``impl="torch_lce"``: ``torch.nn.functional.linear_cross_entropy`` with chunking options."""
    check_args(hidden, weight, labels, reduction, label_smoothing, lse_square_scale, softcap, row_weight, chunk_size,
               grad_accum, bias)
    if not torch_lce_available():
        raise RuntimeError(
            f"loss impl 'torch_lce' needs torch >= 2.13 (torch.nn.functional.linear_cross_entropy); this is "
            f"torch {torch.__version__}: upgrade torch or choose impl='torch'"
        )
    unsupported = []
    if lse_square_scale > 0.0:
        unsupported.append(f"lse_square_scale={lse_square_scale} (z-loss)")
    if softcap is not None:
        unsupported.append(f"softcap={softcap}")
    if label_smoothing > 0.0:  # torch would run its full-logits reference path instead (with a warning)
        unsupported.append(f"label_smoothing={label_smoothing} (its chunked path needs 0)")
    if grad_accum is not None:
        unsupported.append(f"grad_accum={grad_accum!r} (torch chooses its own accumulation)")
    if unsupported:
        raise ValueError(f"linear_cross_entropy: impl='torch_lce' does not support {', '.join(unsupported)}; "
                         "use impl='torch', 'triton' or 'liger'")
    per_row = reduction == "none" or row_weight is not None
    h, w, b = _promote(hidden, weight, bias)
    labels = labels.long()
    out = F.linear_cross_entropy(
        h, w, labels, linear_bias=b, reduction="none" if per_row else "sum", ignore_index=ignore_index,
        label_smoothing=label_smoothing, options=torch.nn.LinearCrossEntropyOptions(batch_chunk_size=chunk_size),
    )
    return _reduce(out, labels, ignore_index, reduction, row_weight, per_row)
