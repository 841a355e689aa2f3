"""Linear cross-entropy and per-token logit statistics that never hold ``[N, V]`` logits.

Loss implementations (``impl``, the ``loss.impl`` config choices, :data:`LOSS_IMPLS`):

- ``"triton"``: chunked cuBLAS GEMMs + one Triton row kernel per chunk
  (:mod:`lightning_cggr.kernels.cross_entropy`); CUDA, or CPU under ``TRITON_INTERPRET=1`` (tests).
- ``"torch"``: the same chunk pass with torch row ops, fp32 compute (:mod:`lightning_cggr.kernels.chunked`).
- ``"naive"``: full-logits ``F.cross_entropy``, the HF-style baseline (:mod:`~lightning_cggr.kernels.baselines`).
- ``"liger"``: Liger-Kernel's fused linear cross-entropy (optional dependency, ``pip install liger-kernel``).
- ``"torch_lce"``: torch's ``F.linear_cross_entropy`` with chunking options (torch >= 2.13).
- ``"auto"``: ``"triton"`` on CUDA when triton imports, else ``"torch"`` (on CPU the torch chunk pass
  measured faster than ``naive`` and ``torch_lce``: ``experiments/results/bench_cross_entropy_cpu.md``).

Asking for an implementation that cannot run here raises with the fix; nothing falls back silently,
and an option an implementation lacks (e.g. ``softcap`` on ``torch_lce``) raises too.
To pay only for the rows that keep a label, gather them first with :func:`compact_rows`.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from lightning_cggr.kernels.baselines import (
    liger_linear_cross_entropy,
    naive_linear_cross_entropy,
    torch_lce_available,
    torch_linear_cross_entropy,
)
from lightning_cggr.kernels.chunked import chunked_linear_cross_entropy, chunked_token_stats
from lightning_cggr.kernels.compact import CompactRows, compact_rows
from lightning_cggr.kernels.contract import GRAD_ACCUMS, REDUCTIONS, TokenStats

__all__ = [
    "GRAD_ACCUMS", "LOSS_IMPLS", "REDUCTIONS", "STATS_IMPLS", "CompactRows", "TokenStats", "compact_rows",
    "linear_cross_entropy", "resolve_impl", "resolve_stats_impl", "token_stats",
]

LOSS_IMPLS = ("auto", "triton", "torch", "naive", "liger", "torch_lce")
STATS_IMPLS = ("auto", "triton", "torch", "naive")
"""Implementations :func:`token_stats` has (the peers have no statistics kernel: see :func:`resolve_stats_impl`)."""


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _liger_available() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


LIGER_MIN_VERSION = "0.8.2"
"""The oldest Liger-Kernel ``impl="liger"`` accepts: 0.5.10, 0.6.0, 0.7.0, 0.8.0 and 0.8.1 gave
per-token losses and gradients far from float64 torch's (``reduction="none"``, the path row weights
take) in this project's tests; 0.8.2 and later match."""


@functools.cache  # resolve_impl runs at every loss call; the metadata lookup reads the disk
def _liger_version() -> str:
    from importlib.metadata import version

    return version("liger-kernel")


def _check_triton_device(name: str, device: torch.device) -> None:
    """Triton kernels (ours or Liger's) run on CUDA, or on CPU through the interpreter."""
    if not _triton_available():
        raise RuntimeError(
            f"loss impl {name!r} asked for but triton is not installed; `pip install triton` or use impl='torch'"
        )
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"loss impl {name!r} on a CPU tensor needs the Triton interpreter: set TRITON_INTERPRET=1 in the "
            "environment before triton is imported, or use impl='torch'"
        )
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"loss impl {name!r} does not run on device {device}; use impl='torch'")


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``impl`` to the concrete implementation that will run on ``device``.

    ``"auto"`` -> ``"triton"`` on CUDA when triton is installed, else ``"torch"``. An implementation
    that cannot run here (not installed; triton or liger on a CPU without ``TRITON_INTERPRET=1``;
    ``torch_lce`` on torch < 2.13) raises with the fix. Unknown names raise listing :data:`LOSS_IMPLS`.
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown loss impl {impl!r}; choose one of {LOSS_IMPLS}")
    device = torch.device(device)
    if impl == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if impl == "triton":
        _check_triton_device(impl, device)
    elif impl == "liger":
        if not _liger_available():
            raise RuntimeError("loss impl 'liger' needs Liger-Kernel: `pip install liger-kernel`, or choose "
                               "impl='triton' (CUDA) / 'torch'")
        from packaging.version import Version

        if Version(installed := _liger_version()) < Version(LIGER_MIN_VERSION):
            raise RuntimeError(f"loss impl 'liger' needs liger-kernel >= {LIGER_MIN_VERSION} (older releases give "
                               f"wrong per-token losses); this is {installed}: `pip install -U liger-kernel`, "
                               "or choose impl='triton' (CUDA) / 'torch'")
        _check_triton_device(impl, device)
    elif impl == "torch_lce" and not torch_lce_available():
        raise RuntimeError(f"loss impl 'torch_lce' needs torch >= 2.13 (F.linear_cross_entropy); this is torch "
                           f"{torch.__version__}: upgrade torch or choose impl='torch'")
    return impl


def resolve_stats_impl(loss_impl: str, device: torch.device) -> str:
    """The :func:`token_stats` implementation that goes with a loss implementation.

    Its own kernel where the loss has one (``triton``, ``torch``); ``naive`` scores with ``torch``
    (the chunked path: statistics never need ``[N, V]`` logits); ``liger`` and ``torch_lce`` have no
    statistics kernel and score with ``resolve_impl("auto", device)``.
    """
    kind = resolve_impl(loss_impl, device)
    if kind == "naive":
        return "torch"
    if kind in ("liger", "torch_lce"):
        return resolve_impl("auto", device)
    return kind


_LOSSES = {
    "triton": None,  # imported on first use: importing triton's kernels needs the interpreter flag set
    "torch": chunked_linear_cross_entropy,
    "naive": naive_linear_cross_entropy,
    "liger": liger_linear_cross_entropy,
    "torch_lce": torch_linear_cross_entropy,
}


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
    row_weight: torch.Tensor | None = None,
    grad_accum: str | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden[N, H] @ weight[V, H].T (+ bias[V])`` against ``labels[N]``.

    Per kept row: ``lse - (1 - eps) * z[y] - eps/V * sum(z) + lse_square_scale * lse**2`` with
    ``z = softcap * tanh(logits / softcap)`` when ``softcap`` is set (Gemma-2 style), times
    ``row_weight[i]`` when given (fp32 ``[N]``, no grad; e.g. importance weights ``1/p``). ``"mean"``
    is the sum over kept rows divided by the kept count (a device tensor clamped to >= 1; row weights
    do not change it): an all-ignored call returns 0 with zero gradients, not torch's NaN. ``"none"``
    returns fp32 ``[N]`` with 0 at ignored rows. No host sync in ``triton``/``torch``/``naive``/
    ``torch_lce``. ``chunk_size``: rows per chunk (default by rule, see
    :func:`~lightning_cggr.kernels.contract.default_chunk_rows`); ``naive`` and ``liger`` reject it.
    ``grad_accum``: what ``grad_W`` is summed in over the chunks (``"fp32"``, the chunked paths'
    default, or ``"weight"``: the weight's dtype, less memory, one bf16 rounding per chunk; see
    :data:`~lightning_cggr.kernels.contract.GRAD_ACCUMS`); ``liger`` maps it to its ``accum_dtype``
    (its default is ``"weight"``); ``naive`` and ``torch_lce`` reject it. ``bias``: the LM head's
    bias (Phi, GPT-J, CodeGen), added to every logit; its gradient is summed in fp32. Every
    implementation takes it.
    """
    kind = resolve_impl(impl, hidden.device)
    fn = _LOSSES[kind]
    if fn is None:
        from lightning_cggr.kernels import cross_entropy

        fn = cross_entropy.triton_linear_cross_entropy
    return fn(hidden, weight, labels, ignore_index=ignore_index, reduction=reduction,
              label_smoothing=label_smoothing, lse_square_scale=lse_square_scale, softcap=softcap,
              chunk_size=chunk_size, row_weight=row_weight, grad_accum=grad_accum, bias=bias)


def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    impl: str = "auto",
    chunk_size: int | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> TokenStats:
    """No-grad fp32 per-token ``lse``, ``entropy``, ``margin`` (top1 - top2) and ``nll`` of the logits
    ``hidden @ weight.T (+ bias)`` (of ``softcap * tanh(logits / softcap)`` when ``softcap`` is set, as
    :func:`linear_cross_entropy`).

    Per chunk of ``chunk_size`` rows (default by rule) one logits GEMM and one row pass; no logits are
    kept. ``"triton"`` computes the GEMM in the inputs' dtype and the statistics in fp32; ``"torch"``
    everything in fp32; ``"naive"`` is the torch path with all rows in one chunk.
    """
    if impl not in STATS_IMPLS:
        hint = (" (use resolve_stats_impl(loss_impl, device) to pick the statistics kernel for a loss impl)"
                if impl in LOSS_IMPLS else "")
        raise ValueError(f"token_stats has no impl {impl!r}; choose one of {STATS_IMPLS}{hint}")
    kind = resolve_impl(impl, hidden.device)
    if kind == "triton":
        from lightning_cggr.kernels import cross_entropy

        return cross_entropy.triton_token_stats(hidden, weight, labels, ignore_index=ignore_index,
                                                chunk_size=chunk_size, softcap=softcap, bias=bias)
    if kind == "naive":
        chunk_size = max(1, hidden.shape[0])
    return chunked_token_stats(hidden, weight, labels, ignore_index=ignore_index, chunk_size=chunk_size,
                               softcap=softcap, bias=bias)
