"""Efficiency options of the training step: ``torch.compile`` of the decoder blocks and the AdamW
implementation. They change how the step runs, never what it computes (tests compare each with
the plain path), and a benchmark applies them to every method alike.

What is compiled (``perf.compile``): each decoder block, in place (``nn.Module.compile``), so
parameters, ``state_dict`` keys and checkpoints are unchanged. The blocks are shared by the model's
forward and the router's view of its first k blocks (lightning_cggr.routing.router), so both run
the compiled code; every block of a model has the same code, and with parameters as graph inputs
one graph serves them all. A graph is made per distinct situation, not per step: training vs the
router's no-grad eval pass, and the batch size (sequence routing runs ``ceil(ratio * B)`` rows;
the second size makes the batch dimension dynamic). Left eager: embeddings, final norm and the
mask code (a few launches per forward), the loss kernels (Triton or chunked torch, their own
code) and scoring/selection (O(B x T) element-wise work and one sort; about 20 launches, no matmul).

``optim.fused`` (:func:`adamw_kwargs`): ``auto`` uses torch's fused AdamW (one kernel per
parameter group instead of a per-tensor or multi-tensor loop) when every trained parameter is a
plain floating-point CUDA tensor, else torch's default; ``true`` asks for it wherever torch offers
it (CUDA, and CPU in recent torch) and is an error where it does not; ``false`` keeps torch's default
(foreach on CUDA, a per-tensor loop on CPU).
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
"""``perf.compile`` modes besides true/false (true = default). ``reduce-overhead`` (CUDA only)
replays each compiled block as a CUDA graph (torch's cudagraph trees; the step marks where each
micro-batch begins, see :func:`mark_step_begin`): the blocks are pure tensor code, while the
dynamic ratio, the Triton loss and the selection stay eager around them. It is there because the
H200 profile showed the compiled step bound by the host's launch cost (experiments/results)."""

CUDA_GRAPH_MODES = ("reduce-overhead",)
"""Modes that record CUDA graphs: they need a CUDA device."""

COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
"""``perf.compile_backend``: inductor generates kernels; aot_eager and eager only trace (to tell a
tracing problem from a code-generation one)."""

FUSED_CHOICES = ("auto", True, False)
"""``optim.fused`` values."""


SINGLE_DEVICE_STRATEGIES = (None, "auto", "single_device")


def resolve_compile(setting: Any, device_type: str, strategy: Any = None, devices: Any = 1) -> Any:
    """``perf.compile=auto`` made concrete: ``true`` (torch.compile's default mode) for a run on one
    CUDA device, ``false`` elsewhere: on CPU compilation costs start-up and was not measured to pay;
    across devices (DDP, FSDP1 which refuses compilation, FSDP2) it has CPU tests but no GPU
    measurement yet -- ask for it with ``perf.compile=true``. Any other value is returned as it is.

    Measured under the Trainer on one H100 (``experiments/results/trainer_check-h100.md``: the user's
    command, SmolLM2's body at 8 x 2048, bf16-mixed): 1.99x the eager run's tokens/s with ``true``,
    2.12x with ``reduce-overhead``; ``auto`` takes ``true``, which records no CUDA graphs (no extra
    memory per batch shape, nothing to re-record when sequence routing changes the batch)."""
    if setting != "auto":
        return setting
    single = strategy in SINGLE_DEVICE_STRATEGIES and str(devices) in ("1", "[0]")
    return device_type == "cuda" and single


def compile_mode(setting: Any) -> str | None:
    """The torch.compile mode of a ``perf.compile`` value, or None when compilation is off
    (``auto`` must be resolved first: :func:`resolve_compile`)."""
    if setting == "auto":
        raise ValueError("perf.compile=auto must be resolved against the run's device first (resolve_compile)")
    if setting is False or setting is None:
        return None
    if setting is True:
        return "default"
    if setting in COMPILE_MODES:
        return setting
    raise ValueError(f"perf.compile={setting!r}: must be auto, true, false or one of {', '.join(COMPILE_MODES)}")


def uses_cuda_graphs(setting: Any) -> bool:
    return compile_mode(setting) in CUDA_GRAPH_MODES


def mark_step_begin(setting: Any) -> None:
    """Before each micro-batch's forward under a CUDA-graph mode: tells torch's cudagraph trees that
    the previous step's graph outputs are no longer read, so their memory can be replayed into."""
    if uses_cuda_graphs(setting):
        torch.compiler.cudagraph_mark_step_begin()


def compile_blocks(model: torch.nn.Module, setting: Any, backend: str = "inductor") -> int:
    """Compile every decoder block of ``model`` in place (``perf.compile``); returns how many.

    Idempotent in effect: compiling again replaces each block's compiled wrapper, and torch's
    cache of generated code is shared, so several steps around one model do not compile twice.
    A copy of a compiled model must be compiled again (its wrappers call the original's blocks);
    :class:`~lightning_cggr.step.CGGRStep` compiles the model it is given.
    """
    mode = compile_mode(setting)
    if mode is None:
        return 0
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"perf.compile_backend={backend!r}: must be one of {', '.join(COMPILE_BACKENDS)}")
    from .routing.router import find_blocks, find_decoder

    _, blocks = find_blocks(find_decoder(model))
    options = {"backend": backend}
    if backend == "inductor":
        options["mode"] = mode
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _plain_cuda_float(p: torch.Tensor) -> bool:
    # DTensor (FSDP2-sharded) parameters are left to torch's default choice
    return p.is_cuda and p.is_floating_point() and not _is_dtensor(p.data)


def adamw_kwargs(params: Iterable[torch.Tensor], fused: Any, *, scaled_clipping: bool = False) -> dict[str, Any]:
    """Keyword arguments choosing torch's AdamW implementation for ``params`` (``optim.fused``).

    ``scaled_clipping``: gradients are clipped while a loss scaler is in use (``16-mixed``): a fused
    step unscales inside its kernel, after clipping would have run on scaled gradients, so ``auto``
    keeps torch's default there and ``true`` is an error."""
    if fused == "auto":
        params = list(params)
        if scaled_clipping:
            return {}
        return {"fused": True} if params and all(_plain_cuda_float(p) for p in params) else {}
    if fused is True:
        if scaled_clipping:
            raise ValueError("optim.fused=true with a loss scaler (trainer.precision=16-mixed) and gradient clipping "
                             "(trainer.gradient_clip_val > 0): a fused AdamW unscales the gradients inside its step, "
                             "after they would be clipped; use optim.fused=auto|false, bf16-mixed, or "
                             "trainer.gradient_clip_val=0")
        return {"fused": True}
    if fused is False:
        return {}
    raise ValueError(f"optim.fused={fused!r}: must be auto, true or false")
