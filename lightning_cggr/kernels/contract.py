"""What every implementation of the loss and the statistics promises, and the checks of its inputs.

The loss of one kept row (label ``y`` not ``ignore_index``), with ``z`` the fp32 logits
``hidden @ weight.T`` (``+ bias`` when the head has one), soft-capped to ``softcap * tanh(z / softcap)``
when ``softcap`` is set::

    loss = lse(z) - (1 - eps) * z[y] - eps / V * sum(z) + lse_square_scale * lse(z) ** 2

times ``row_weight[i]`` when given. Ignored rows contribute 0 (value and gradient; ``torch`` and
``triton`` zero their hidden states before the GEMMs, so even a non-finite one there changes nothing,
while ``naive`` and the peers, ``liger`` and ``torch_lce``, multiply every row: a NaN or inf hidden
state in an ignored row reaches their weight gradient, and torch_lce's mean). ``"sum"`` adds
the rows, ``"mean"`` divides that sum by the number of kept rows (a device tensor clamped to >= 1, so
an all-ignored call is 0, not torch's NaN; row weights do not change the denominator), ``"none"``
returns the fp32 ``[N]`` row losses. Losses are fp32; gradients come back in each input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

REDUCTIONS = ("mean", "sum", "none")
GRAD_ACCUMS = ("fp32", "weight")
"""Where the chunked paths sum ``grad_W`` over row chunks: ``"fp32"`` in one fp32 buffer (fp64 for
fp64 inputs) cast to the weight's dtype once at the end (the default: one rounding); ``"weight"``
straight into a buffer of the weight's dtype (for bf16/fp16 weights one rounding per chunk, as
Liger-Kernel does by default; it saves the ``V x H`` fp32 accumulator, 2 GiB at a 128k x 4096 head).
With fp32 (fp64) weights both are the same."""
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

LOGITS_BUDGET_BYTES = 256 << 20
"""Bytes of one logits chunk (the chunked paths hold exactly one, rewritten in place as its gradient)."""


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


class CEOptions(NamedTuple):
    """The loss options a row operation needs (plain Python numbers: they become kernel constants)."""

    ignore_index: int = -100
    label_smoothing: float = 0.0
    lse_square_scale: float = 0.0
    softcap: float | None = None


def default_chunk_rows(vocab: int, elem_bytes: int, budget_bytes: int = LOGITS_BUDGET_BYTES) -> int:
    """Rows per chunk: the largest power of two whose ``rows x vocab`` logits fit ``budget_bytes``,
    clamped to [64, 4096].

    With the 256 MiB default: bf16 logits give 2048 rows at V = 49152 and 1024 rows at V = 128256
    (large enough that each chunk's three GEMMs run near peak on a GPU); fp32 logits give 1024 and 512.
    """
    rows = max(1, budget_bytes // (max(vocab, 1) * elem_bytes))
    return max(64, min(4096, 1 << (rows.bit_length() - 1)))


def check_args(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    reduction: str,
    label_smoothing: float,
    lse_square_scale: float,
    softcap: float | None,
    row_weight: torch.Tensor | None = None,
    chunk_size: int | None = None,
    grad_accum: str | None = None,
    bias: torch.Tensor | None = None,
) -> None:
    """Validate shapes and options; raise one ValueError listing every problem (host-side only)."""
    problems = bias_problems(bias, weight)
    if grad_accum is not None and grad_accum not in GRAD_ACCUMS:
        problems.append(f"grad_accum must be None (the implementation's default) or one of {GRAD_ACCUMS}, "
                        f"got {grad_accum!r}")
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
        if t.dtype not in FLOAT_DTYPES:
            problems.append(f"{name} must be float32/bfloat16/float16/float64, got {t.dtype}")
    if reduction not in REDUCTIONS:
        problems.append(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        problems.append(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if lse_square_scale < 0.0:
        problems.append(f"lse_square_scale (z-loss) must be >= 0, got {lse_square_scale}")
    if softcap is not None and not softcap > 0.0:
        problems.append(f"softcap must be None or > 0, got {softcap}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        problems.append(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if row_weight is not None:
        if row_weight.shape != labels.shape:
            problems.append(f"row_weight must be [N] like labels, got shape {tuple(row_weight.shape)}")
        if not row_weight.is_floating_point():
            problems.append(f"row_weight must be a float tensor, got {row_weight.dtype}")
        if row_weight.device != hidden.device:
            problems.append(f"row_weight is on {row_weight.device}, hidden on {hidden.device}")
        if row_weight.requires_grad:
            problems.append("row_weight must not require grad (no gradient flows to it): pass row_weight.detach()")
    if problems:
        raise ValueError("linear_cross_entropy: " + "; ".join(problems))


def bias_problems(bias: torch.Tensor | None, weight: torch.Tensor) -> list[str]:
    """What is wrong with a head's ``bias`` for ``weight`` [V, H]: it must be a float [V] on the same device."""
    if bias is None:
        return []
    problems = []
    if bias.dim() != 1 or (weight.dim() == 2 and bias.shape[0] != weight.shape[0]):
        problems.append(f"bias must be [V] = [{weight.shape[0]}] like the weight's rows, got shape {tuple(bias.shape)}")
    if bias.dtype not in FLOAT_DTYPES:
        problems.append(f"bias must be float32/bfloat16/float16/float64, got {bias.dtype}")
    if bias.device != weight.device:
        problems.append(f"bias is on {bias.device}, weight on {weight.device}")
    return problems


def check_stats_args(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None,
                     chunk_size: int | None, softcap: float | None = None,
                     bias: torch.Tensor | None = None) -> None:
    """Validate the inputs of ``token_stats``; raise one ValueError naming the problem."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"token_stats: need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}"
        )
    if weight.shape[0] < 2:
        raise ValueError("token_stats: the margin needs a vocabulary of at least 2")
    if labels is not None and (labels.dim() != 1 or labels.shape[0] != hidden.shape[0]):
        raise ValueError(f"token_stats: labels must be [N], got {tuple(labels.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"token_stats: chunk_size must be None or an int >= 1, got {chunk_size!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0.0):
        raise ValueError(f"token_stats: softcap must be None or a number > 0, got {softcap!r}")
    if problems := bias_problems(bias, weight):
        raise ValueError("token_stats: " + "; ".join(problems))
