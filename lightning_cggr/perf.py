"""Efficiency options of the training step: ``torch.compile`` of the decoder blocks, activation
checkpointing and the AdamW implementation. They change how the step runs, never what it computes
(tests compare each with the plain path), and a benchmark applies them to every method alike.

What is compiled (``perf.compile``, with ``perf.compile_scope=blocks``, the default): each decoder
block, in place (``nn.Module.compile``), so parameters, ``state_dict`` keys and checkpoints are
unchanged. The blocks are shared by the model's forward and the router's view of its first k blocks
(lightning_cggr.routing.router), so both run the compiled code; every block of a model has the same
code, and with parameters as graph inputs one graph serves them all. A graph is made per distinct
situation, not per step: training vs the router's no-grad eval pass, and the batch size (sequence
routing runs ``ceil(ratio * B)`` rows; ``perf.compile_dynamic`` says what the second size does: see
:func:`dynamic_arg`). Left eager: embeddings, final norm and the mask code (a few launches per
forward) and the loss kernels (Triton or chunked torch, their own code). The routing decision
(scoring, the keep ratio, selection and their metrics: O(B x T) element-wise work and a sort, about
a hundred eager ops) is compiled as a function of its own with ``perf.compile_routing=true``
(:func:`compile_function`; off by default until a GPU measures it), except for the rules that draw
from a generator (``stratified``, ``importance``, ``infobatch``) and a ratio curriculum.

``perf.compile_scope=decoder`` compiles the decoder's whole forward (embeddings, every block, final
norm) as one graph instead, in place too, and the router's view of its first k blocks as a second
one (:func:`compile_model`). Why: each compiled block is a region the host enters on its own, and at
SmolLM2's depth that entry cost is what bounds the compiled GPU step (H200 profile of
``reduce-overhead``, experiments/results/throughput-smollm2_shape_cudagraphs-h200.json: 30 region
calls each way -- dynamo's cache lookups, the compiled functions' wrappers, 60 CUDA-graph launches
-- add up to about 24 ms of host time per step under the profiler, while random-sequence selection's
GPU kernels take 21 ms of its 35 ms step). One region is entered once per forward and once per
backward. The price is compile time, which grows with depth, since torch inlines every block.
Measured with the user's command on this project's CPU at 30 blocks, 32 wide
(experiments/results/NOTES.md): 1.24x (token routing) and 1.16x (sequence routing) the per-block
tokens/s, and 100 s and 166 s of start-up on a cold cache against 33 s and 38 s; not yet on a GPU.
Only on one device: DDP's and FSDP's hooks sit on each block.

``perf.activation_checkpointing`` (:func:`apply_activation_checkpointing`): transformers' own
activation checkpointing of every decoder block (or of every n-th), turned on before anything is
compiled, so compiled blocks trace the recompute with them. It trades about one more forward of the
decoder per step for holding one block's activations at a time: the largest batch that fits a
memory budget grows.

``optim.fused`` (:func:`adamw_kwargs`): ``auto`` uses torch's fused AdamW (one kernel per
parameter group instead of a per-tensor or multi-tensor loop) when every trained parameter is a
plain floating-point CUDA tensor, else torch's default; ``true`` asks for it wherever torch offers
it (CUDA, and CPU in recent torch) and is an error where it does not; ``false`` keeps torch's default
(foreach on CUDA, a per-tensor loop on CPU).
"""

from __future__ import annotations

import contextlib
import math
import types
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

COMPILE_SCOPES = ("blocks", "decoder")
"""``perf.compile_scope``: what one compiled region is (:func:`compile_model`)."""

DYNAMIC_CHOICES = ("auto", True, False)
"""``perf.compile_dynamic`` values (:func:`dynamic_arg`)."""

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
    return device_type == "cuda" and single_device(strategy, devices)


def single_device(strategy: Any, devices: Any) -> bool:
    """Whether a Trainer's ``strategy`` and ``devices`` make a run on one device."""
    return strategy in SINGLE_DEVICE_STRATEGIES and str(devices) in ("1", "[0]")


def scope_problem(scope: Any, setting: Any, strategy: Any, devices: Any) -> str | None:
    """Why ``perf.compile_scope=scope`` cannot serve a run (``setting``: a resolved ``perf.compile``), or None."""
    if scope != "decoder" or not compile_mode(setting) or single_device(strategy, devices):
        return None
    return (f"perf.compile_scope=decoder with trainer.strategy={strategy} on devices={devices}: the whole-decoder "
            f"graph is for one device (DDP's and FSDP's hooks sit on each block, which would run inside it); "
            f"use perf.compile_scope=blocks")


COMPILE_KNOBS = {"compile_scope": "blocks", "compile_dynamic": "auto", "compile_routing": False}
"""The ``perf`` settings that shape what is compiled, with their defaults: read only when something
is compiled (``perf.compile_backend``, which compiler, is left out: it changes nothing compiled)."""


def compile_knob_problems(perf: Any, setting: Any, off_because: str = "") -> list[str]:
    """Settings of ``perf`` (a PerfConfig) that would be silently ignored because the resolved
    ``perf.compile`` (``setting``) compiles nothing; ``off_because`` says why ``auto`` resolved to
    false (e.g. "false on a cpu run"). Empty when compiling or when every knob is at its default."""
    if compile_mode(setting):
        return []

    def show(value):  # as the override is written
        return str(value).lower() if isinstance(value, bool) or value is None else str(value)

    why = (f"perf.compile=auto ({off_because})" if perf.compile == "auto" and off_because
           else f"perf.compile={show(setting)}")
    return [f"perf.{name}={show(getattr(perf, name))}: shapes what is compiled, but {why} compiles nothing; "
            f"set perf.compile=true (or a mode) to compile, or leave perf.{name} at {show(default)}"
            for name, default in COMPILE_KNOBS.items() if getattr(perf, name) != default]


def auto_compile_off_because(device_type: str, strategy: Any, devices: Any) -> str:
    """Why :func:`resolve_compile` turned ``auto`` off, for messages."""
    if device_type != "cuda":
        return f"false on a {device_type} run"
    return f"false across devices: trainer.strategy={strategy}, devices={devices}"


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


def dynamic_arg(setting: Any) -> bool | None:
    """torch.compile's ``dynamic`` argument for a ``perf.compile_dynamic`` value.

    ``auto`` (None, torch's default): the first batch size gets a specialized graph; a second size
    recompiles once with that dimension symbolic, and the symbolic graph then serves every size. A
    second size comes from sequence routing. (It also came from the validation loader's last,
    partial batch, before training, since ``train()`` validates first, so every compiled run trained
    with a symbolic batch dimension; packed text's validation batches are now padded to full size,
    lightning_cggr.data.text.FullBatches. Chat batches are padded to their longest conversation, so
    their sequence length changes anyway.)
    ``false``: a graph specialized to each size (sequence routing with a constant or dynamic ratio
    has two: the full batch and ``ceil(ratio * B)`` rows), so no kernel is generated for symbolic
    shapes; each new size compiles, and torch runs a block eagerly once it has
    ``torch._dynamo.config.recompile_limit`` graphs (:func:`static_shape_problem` refuses runs that
    would get there). ``true``: symbolic from the first call.

    Why the choice exists: compiled sequence routing is bound by the host, not the GPU (H200 profile,
    experiments/results/throughput-smollm2_shape_compiled-h200.md: 25 ms of kernels in a 78 ms step),
    and under the Trainer on an H100 it ran at 0.67x token routing's compiled rate
    (trainer_check_sequence-h100.md). A symbolic batch dimension adds host work to every block call
    (shape arithmetic, guards); whether specialized graphs win is not measured yet (the GPU suite's
    ``trainer_sequence`` part compares them with CUDA graphs), so ``auto`` keeps torch's default."""
    if setting is True or setting is False:
        return setting
    if setting == "auto":
        return None
    raise ValueError(f"perf.compile_dynamic={setting!r}: must be auto, true or false")


def training_batch_sizes(cggr: Any, batch_size: int) -> set[int]:
    """Every batch size the decoder blocks run with gradients in a run of ``cggr`` at ``batch_size``
    rows: the full batch (warm-up, standard and token routing) and, under sequence routing, each
    routed row capacity the ratio schedule gives (host arithmetic, no model)."""
    from .routing.schedule import curriculum_ratio
    from .routing.selection import static_capacity

    sizes = {int(batch_size)}
    sel = cggr.selection
    if not cggr.enabled or sel.unit != "sequence" or sel.strategy == "infobatch":  # infobatch: every row
        return sizes
    q = cggr.ratio_schedule
    if q.kind == "dynamic":
        ratios = [q.max]  # the static capacity; the ratio itself only marks rows valid
    elif q.kind == "curriculum":
        ratios = [curriculum_ratio(cggr.min_tokens_ratio, s, q.steps, q.shape) for s in range(int(q.steps) + 1)]
    else:
        ratios = [cggr.min_tokens_ratio]
    return sizes | {static_capacity(int(batch_size), float(r)) for r in ratios}


def static_shape_problem(run: Any) -> str | None:
    """Why ``perf.compile_dynamic=false`` cannot serve ``run`` (a RunConfig), or None.

    Specialized graphs need few distinct shapes: chat batches are padded to their longest
    conversation (a new sequence length nearly every batch), and a curriculum under sequence routing
    gives one routed batch size per capacity it passes through. Counted against torch's recompile
    limit: the training sizes, plus the no-grad full batch (router, validation) and one more to spare
    (a last, partial validation batch from a loader that does not pad it); under
    ``perf.compile_scope=decoder`` one more, the router's view, whose graph shares the decoder's code
    and so its count."""
    if dynamic_arg(run.perf.compile_dynamic) is not False or not compile_mode(run.perf.compile):
        return None
    fix = "use perf.compile_dynamic=auto (one graph with a symbolic dimension serves every shape)"
    if run.data.source == "chat":
        return (f"perf.compile_dynamic=false with data.source=chat: chat batches are padded to their longest "
                f"conversation, so nearly every batch has a new length and compiles a new graph; {fix}")
    import torch._dynamo.config as dynamo_config

    limit = getattr(dynamo_config, "recompile_limit", None) or dynamo_config.cache_size_limit
    sizes = training_batch_sizes(run.cggr, run.data.batch_size)
    others = "the no-grad and last validation batches"
    extra = 2
    if run.perf.compile_scope == "decoder":
        others, extra = others + " and the router's view", 3
    if len(sizes) + extra > limit:
        return (f"perf.compile_dynamic=false: this run's decoder sees {len(sizes)} training batch sizes "
                f"(sequence routing under a ratio curriculum), more than torch compiles before it falls back to "
                f"eager (recompile_limit={limit}, with {others}); {fix}, "
                f"or cggr.ratio_schedule.kind=constant")
    return None


def _compile_options(setting: Any, backend: str, cuda_graphs: bool = True) -> dict[str, Any] | None:
    """torch.compile's ``backend`` and ``mode`` for a resolved ``perf.compile`` (None: off); with
    ``cuda_graphs=False`` a CUDA-graph mode becomes inductor's default mode."""
    mode = compile_mode(setting)
    if mode is None:
        return None
    if backend not in COMPILE_BACKENDS:
        raise ValueError(f"perf.compile_backend={backend!r}: must be one of {', '.join(COMPILE_BACKENDS)}")
    options: dict[str, Any] = {"backend": backend}
    if backend == "inductor":
        options["mode"] = "default" if mode in CUDA_GRAPH_MODES and not cuda_graphs else mode
    return options


COMPILED_WITH = "_cggr_compile_options"
"""Attribute a decoder compiled whole carries: its torch.compile options, so the router's view of
it (a shallow copy, lightning_cggr.routing.router) compiles itself the same way instead of calling
the whole decoder's compiled code."""


def compile_model(model: torch.nn.Module, setting: Any, backend: str = "inductor", dynamic: Any = "auto",
                  scope: str = "blocks") -> int:
    """Compile ``model``'s decoder in place (``perf.compile``); returns how many regions were compiled.

    ``scope`` (``perf.compile_scope``): ``blocks`` compiles every decoder block on its own; ``decoder``
    the decoder's forward as one region (every block inlined), and the router's view compiles its
    own copy on first use. Either way parameters and ``state_dict`` keys are unchanged. Idempotent in
    effect: compiling again replaces the compiled wrappers (and those of the other scope), and torch's
    cache of generated code is shared, so several steps around one model do not compile twice. A
    copy of a compiled model must be compiled again (its wrappers call the original's modules);
    :class:`~lightning_cggr.step.CGGRStep` compiles the model it is given. ``dynamic``: a
    ``perf.compile_dynamic`` value (:func:`dynamic_arg`).
    """
    dynamic = dynamic_arg(dynamic)
    if scope not in COMPILE_SCOPES:
        raise ValueError(f"perf.compile_scope={scope!r}: must be one of {', '.join(COMPILE_SCOPES)}")
    options = _compile_options(setting, backend)
    if options is None:
        return 0
    from .routing.router import find_blocks, find_decoder

    decoder = find_decoder(model)
    _, blocks = find_blocks(decoder)
    options["dynamic"] = dynamic
    for module in (decoder, *blocks):  # the other scope's wrappers, if any
        module._compiled_call_impl = None
    decoder.__dict__.pop(COMPILED_WITH, None)
    if scope == "decoder":
        decoder.compile(**options)
        setattr(decoder, COMPILED_WITH, dict(options))
        return 1
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def compile_function(fn, setting: Any, backend: str = "inductor"):
    """``fn`` compiled with the model's options (``perf.compile``), or None when compilation is off.

    For the step's routing decision (scoring, ratio, selection and their metrics:
    :func:`lightning_cggr.step.decide`), a pure function of tensors with static shapes. Never
    recorded as a CUDA graph: under ``reduce-overhead`` it takes inductor's default mode, since its
    outputs (the selection, the logged metrics) outlive the next replay of a graph. Always with
    torch's automatic dynamic shapes, whatever ``perf.compile_dynamic`` says of the model's graphs:
    a second sequence length (chat batches) compiles once more with that dimension symbolic, not
    once per length. (A ratio curriculum, whose capacity changes every step, is not compiled at
    all: :func:`lightning_cggr.step.decide`.)
    """
    options = _compile_options(setting, backend, cuda_graphs=False)
    if options is None:
        return None
    # torch caches compiled graphs per code object, up to its recompile limit (8): a copy of the code
    # per caller keeps steps of different settings in one process (a benchmark's methods) apart
    own = types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    own.__kwdefaults__, own.__doc__ = fn.__kwdefaults__, fn.__doc__
    return torch.compile(own, **options)


SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")
"""``perf.sdpa_backend``: which of sdpa's kernels runs attention (``model.attn_implementation=sdpa``).
``auto`` leaves the choice to torch (on the H200 with torch 2.11: cuDNN's, by the profile); the others
allow that kernel alone (``torch.nn.attention.sdpa_kernel``): ``flash`` (torch's FlashAttention-2;
on CPU its flash kernel for CPU), ``cudnn`` and ``efficient`` (CUDA only), ``math`` (the plain
composition, any device; a reference)."""

_SDPA_ENUM = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
              "math": "MATH"}
CUDA_ONLY_SDPA = ("cudnn", "efficient")


def sdpa_backend_problem(backend: str, attn_implementation: str, device_type: str | None = None,
                         masked: bool = False) -> str | None:
    """Why ``perf.sdpa_backend=backend`` cannot serve a run, or None. ``device_type`` None: not known yet;
    ``masked``: attention takes a padding mask (chat data), which torch's flash kernel on CUDA cannot."""
    if backend not in SDPA_BACKENDS:
        return f"perf.sdpa_backend={backend!r}: must be one of {', '.join(SDPA_BACKENDS)}"
    if backend == "auto":
        return None
    if attn_implementation != "sdpa":
        return (f"perf.sdpa_backend={backend} picks a kernel of sdpa, but model.attn_implementation="
                f"{attn_implementation}; use model.attn_implementation=sdpa or perf.sdpa_backend=auto")
    if backend in CUDA_ONLY_SDPA and device_type is not None and device_type != "cuda":
        return (f"perf.sdpa_backend={backend} is a CUDA kernel and this run's device is {device_type}; "
                f"use perf.sdpa_backend=auto, flash or math")
    if backend == "flash" and masked and device_type == "cuda":
        return ("perf.sdpa_backend=flash: these batches carry a padding mask (chat data), which torch's flash "
                "kernel on CUDA does not take; use perf.sdpa_backend=auto, cudnn or efficient")
    return None


def sdpa_scope(backend: str):
    """A context in which sdpa runs the ``perf.sdpa_backend`` kernel only (``auto``: torch's choice,
    no context). The kernel is chosen at the forward; its backward follows it. Under
    ``torch.compile`` the choice is made when the graph is traced, inside this context."""
    if backend == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, _SDPA_ENUM[backend])])


LOW_PRECISION_DTYPES = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "bf16": torch.bfloat16,
                        "16-mixed": torch.float16, "16-true": torch.float16, "16": torch.float16}
"""``trainer.precision`` values whose matrix multiplies run in a 16-bit type."""

SLOW_LOW_PRECISION = 3.0
"""How many times an fp32 matrix multiply's time a 16-bit one may take on the CPU before a run that
asks for it is warned (with native bf16, AVX512-BF16 or AMX, it takes less than fp32's)."""


def cpu_matmul_slowdown(dtype: torch.dtype, size: int = 256, repeats: int = 3) -> float:
    """How many times as long a ``size``-cubed matrix multiply takes on this CPU in ``dtype`` as in fp32
    (the fastest of ``repeats`` each, after one warm-up): about 0.1 s where ``dtype`` is emulated."""
    import time

    a = torch.randn(size, size, generator=torch.Generator().manual_seed(0))

    def fastest(x: torch.Tensor) -> float:
        x @ x
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            x @ x
            best = min(best, time.perf_counter() - start)
        return best

    return fastest(a.to(dtype)) / max(fastest(a), 1e-9)


def precision_warning(precision: Any, device_type: str, slowdown=None) -> str | None:
    """A warning for a 16-bit ``trainer.precision`` on a CPU that computes it far slower than fp32
    (``slowdown(dtype)``, by default :func:`cpu_matmul_slowdown`: most CPUs without AVX512-BF16 or AMX
    emulate bf16), or None. The run still uses what was asked for; the message names the fix."""
    dtype = LOW_PRECISION_DTYPES.get(str(precision))
    if device_type != "cpu" or dtype is None:
        return None
    times = (slowdown or cpu_matmul_slowdown)(dtype)
    if times < SLOW_LOW_PRECISION:
        return None
    name = str(dtype).removeprefix("torch.")
    return (f"trainer.precision={precision} on the CPU: a {name} matrix multiply took {times:.0f}x as long as "
            f"an fp32 one here (torch's CPU capability: {torch.backends.cpu.get_cpu_capability()}; native "
            f"bf16 needs AVX512-BF16 or AMX), so this run will be many times slower than in fp32; add "
            f"trainer.precision=32-true")


def apply_activation_checkpointing(model: torch.nn.Module, setting: bool | int) -> None:
    """``perf.activation_checkpointing``: keep only each decoder block's input for the backward and run
    the block's forward again there (transformers' own activation -- formerly "gradient" --
    checkpointing, non-reentrant), so a step holds one block's activations at a time instead of every
    block's: more batch per gigabyte for about one more decoder forward per step. ``setting``: False
    (off), True (every block) or an int n >= 1: blocks 0, n, 2n, ... only, a dial between the two
    (about 1/n of the recompute, the other blocks keep their activations). Where it acts: blocks in
    training mode with gradients on, i.e. the forward's decoder (under sequence routing, on the kept
    rows); the router's no-grad pass, validation and generation run as before. Compiled blocks
    compile the recompute with them. ``False`` leaves the model as it is (a model handed over with
    checkpointing on keeps it). A model without transformers' checkpointing support is refused,
    never run without it."""
    if setting is False:
        return
    every = 1 if setting is True else int(setting)
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"perf.activation_checkpointing={str(setting).lower()}: {type(model).__name__} does not support activation "
            "checkpointing (transformers' supports_gradient_checkpointing); use perf.activation_checkpointing=false"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x: the new name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if every == 1:
        return
    from .routing.router import find_blocks, find_decoder  # here: routing.router imports this module

    _, blocks = find_blocks(find_decoder(model))
    if not all(hasattr(b, "gradient_checkpointing") for b in blocks):
        raise ValueError(
            f"perf.activation_checkpointing={every}: {type(model).__name__}'s blocks cannot be checkpointed one "
            "by one in this transformers version; use perf.activation_checkpointing=true"
        )
    for i, block in enumerate(blocks):
        block.gradient_checkpointing = i % every == 0


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
