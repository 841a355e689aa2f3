"""Linear cross-entropy and per-token logit statistics that never hold ``[N, V]`` logits.

Implementations (``impl``):

- ``"triton"``: fused Triton kernels (:mod:`lightning_cggr.kernels.cross_entropy`), CUDA, or CPU
  under the Triton interpreter (``TRITON_INTERPRET=1`` set before triton is imported; slow, for tests).
- ``"torch"``: row-chunked torch code (:mod:`lightning_cggr.kernels.reference`), any device.
- ``"naive"``: full-logits ``F.cross_entropy``, the HF-style benchmark baseline.
- ``"auto"``: ``"triton"`` on CUDA when triton imports, else ``"torch"``.

Asking for ``"triton"`` where it cannot run raises; nothing falls back silently.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from lightning_cggr.kernels.reference import (
    TokenStats,
    chunked_linear_cross_entropy,
    chunked_token_stats,
    naive_linear_cross_entropy,
)

__all__ = ["LOSS_IMPLS", "TokenStats", "linear_cross_entropy", "resolve_impl", "token_stats"]

LOSS_IMPLS = ("auto", "triton", "torch", "naive")


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to the concrete implementation that will run on ``device``.

    ``"auto"`` -> ``"triton"`` on CUDA when triton is installed, else ``"torch"``. ``"triton"`` where it
    cannot run (not installed; a CPU device without ``TRITON_INTERPRET=1``) raises with the fix.
    Unknown names raise ``ValueError`` listing :data:`LOSS_IMPLS`.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}; choose one of {LOSS_IMPLS}")
    device = torch.device(device)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "triton":
        if not _triton_available():
            raise RuntimeError(
                "loss impl 'triton' asked for but triton is not installed; `pip install triton` "
                "or use impl='torch'"
            )
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "loss impl 'triton' on a CPU tensor needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 in the environment before triton is imported, or use impl='torch'"
            )
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"loss impl 'triton' does not run on device {device}; use impl='torch'")
    return impl


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    impl: str = "auto",
    label_smoothing: float = 0.0,
    lse_square_scale: float = 0.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden[N, H] @ weight[V, H].T`` against ``labels[N]``.

    Per kept row: ``lse - (1 - eps) * z[y] - eps/V * sum(z) + lse_square_scale * lse**2`` with
    ``z = softcap * tanh(logits / softcap)`` when ``softcap`` is set (Gemma-2 style). ``"mean"`` is
    the sum over kept rows divided by the kept count (a device tensor clamped to >= 1): an
    all-ignored call returns 0 with zero gradients, not torch's NaN. ``"none"`` returns fp32 ``[N]``
    with 0 at ignored rows. No host sync. ``chunk_size``: rows per chunk of the torch path
    (default: ~256 MiB of fp32 logits); ignored by ``triton`` and ``naive``.
    """
    kind = resolve_impl(impl, hidden.device)
    kwargs = dict(
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
        lse_square_scale=lse_square_scale,
        softcap=softcap,
        chunk_size=chunk_size,
    )
    if kind == "triton":
        from lightning_cggr.kernels.cross_entropy import triton_linear_cross_entropy

        return triton_linear_cross_entropy(hidden, weight, labels, **kwargs)
    if kind == "naive":
        return naive_linear_cross_entropy(hidden, weight, labels, **kwargs)
    return chunked_linear_cross_entropy(hidden, weight, labels, **kwargs)


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int = 1024,
) -> TokenStats:
    """No-grad fp32 per-token ``lse``, ``entropy``, ``margin`` (top1 - top2) and ``nll`` of the logits.

    The torch path holds at most ``chunk_size x V`` logits; the triton path never holds a logits
    tensor. ``"naive"`` uses the torch path with a single chunk (all rows at once).
    """
    kind = resolve_impl(impl, hidden.device)
    if kind == "triton":
        from lightning_cggr.kernels.cross_entropy import triton_token_stats

        return triton_token_stats(hidden, weight, labels, ignore_index=ignore_index)
    if kind == "naive":
        chunk_size = max(1, hidden.shape[0])
    with torch.no_grad():
        return chunked_token_stats(hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size)
