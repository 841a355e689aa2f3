"""Typed schemas for the settings that shape a run, validated in one place.

Hydra composes ``conf/``; :func:`parse_config` turns the composed groups into these dataclasses and
:func:`validate` gathers every problem into one :class:`ConfigError`, raised before any model or
tokenizer is built. A misspelled key is an error, never ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

# Choices are owned by the modules that implement them; this module only checks against them.
from .data import SOURCES as DATA_SOURCES
from .data import TOKENIZERS
from .kernels import GRAD_ACCUMS, LOSS_IMPLS
from .models import ARCHS as MODEL_ARCHS
from .models import ATTN_IMPLS
from .models import DTYPES
from .models import SOURCES as MODEL_SOURCES
from .perf import COMPILE_BACKENDS, COMPILE_MODES, COMPILE_SCOPES, DYNAMIC_CHOICES, FUSED_CHOICES, sdpa_backend_problem
from .routing.importance import TRANSFORMS as IMPORTANCE_TRANSFORMS
from .routing.router import SOURCES as ROUTER_SOURCES
from .routing.schedule import CURRICULUM_SHAPES, RATIO_SCHEDULES
from .routing.scoring import SCORING_NAMES as SCORING_STRATEGIES
from .routing.selection import SCOPES as SELECTION_SCOPES
from .routing.selection import SEQUENCE_STRATEGIES
from .routing.selection import STRATEGIES as SELECTION_STRATEGIES
from .routing.selection import UNITS as SELECTION_UNITS

from .errors import ConfigError  # re-exported: raised by validate()


@dataclass
class RouterConfig:
    """How tokens are scored."""

    num_layers: int = 2
    """First k blocks of the model that the router runs (shared weights); 1 <= k <= model layers."""
    chunk_size: int | None = None
    """Rows of [tokens, vocab] logits scoring holds at once; null: the kernels' rule per head shape
    (lightning_cggr.kernels: a few thousand rows, bounded memory)."""
    source: str = "truncated"
    """'truncated': the first ``num_layers`` blocks score before the forward; 'final': router-free,
    the main forward's own final hidden states (detached) score, no extra layers run (token unit only)."""
    reference: str | None = None
    """scoring=excess_loss: the frozen reference model (hub id, save_pretrained folder, smollm2_gguf,
    or a lightning_cggr run folder or a checkpoint in one) whose NLL is subtracted from the current
    one (Rho-1); required by and only used with excess_loss."""
    reference_dtype: str = "bfloat16"
    """Weights' dtype of the reference model: float32 | bfloat16 | float16 (it runs in inference mode)."""
    score_stride: int = 1
    """selection.unit=sequence with strategy=topk: score each sequence from every ``score_stride``-th
    of its trainable tokens, so the router's LM head (its statistics pass: most of its cost at
    SmolLM2's shape) runs on about 1/``score_stride`` of the tokens; the router's blocks still run on
    every token (attention needs them). 1: every token. Every sequence with a trainable token keeps at
    least one scored token. Measured on CPU only (README, experiments/results/NOTES.md)."""


@dataclass
class SelectionConfig:
    """Which tokens keep their label."""

    unit: str = "token"
    """'token': labels of easy tokens are masked; 'sequence': only the chosen sequences of the batch
    (``ceil(ratio * B)`` rows for topk, ranked by mean score over trainable tokens) run forward and
    backward at all."""
    scope: str = "sequence"
    """unit=token: 'sequence': top ratio of each sequence's trainable tokens; 'batch': of the whole
    batch's (batch-global top-k)."""
    strategy: str = "topk"
    """'topk' keeps the hardest; 'stratified' (unit=token) keeps the same count drawn (seeded) across
    ``strata`` difficulty buckets in proportion to their size, so easy-but-not-trivial tokens train too.
    Weighted rules (lightning_cggr.routing.sampling / .importance), for either unit:
    'importance' keeps each unit with probability p ∝ its transformed score, clipped to [p_min, 1],
    expected count = the ratio, loss weight 1/p (unbiased for the full-token mean);
    'infobatch' drops each below-mean unit with probability ``prune``, weighting the kept ones
    1/(1 - prune) (unbiased; no ratio; prunes nothing in the last ``anneal_fraction`` of training);
    'noise_excluded' skips the top ``noise_fraction`` of units (likely noise), keeps the ratio of the rest."""
    strata: int = 4
    """strategy=stratified: number of difficulty buckets (contiguous rank ranges), >= 1."""
    min_per_sequence: int = 0
    """unit=token, strategy topk or stratified: every sequence keeps at least min(this, its trainable
    tokens): its kept count is max(the ratio's, that), not their sum (with scope=batch each sequence's
    hardest ones are reserved first, and the batch keeps max(the ratio's count, the reserved ones));
    0 = the ratio alone."""
    p_min: float = 0.05
    """strategy=importance: the lowest keep probability, in (0, 1]; bounds the loss weight 1/p by
    1/p_min. At most the ratio (min_tokens_ratio; with ratio_schedule.kind=dynamic, ratio_schedule.min)."""
    importance_transform: str = "rank"
    """strategy=importance: score -> importance. 'rank' (scale-free, outlier-proof); 'relu'
    (max(score, 0): p ∝ score for non-negative scores such as loss or entropy); 'shift' (score minus
    the budget's minimum: signed scores such as combined or excess_loss); 'softplus'."""
    prune: float = 0.5
    """strategy=infobatch: chance that a below-mean ("well-learned") unit is dropped, in [0, 1)."""
    anneal_fraction: float = 0.125
    """strategy=infobatch: the last fraction of the run's optimizer steps (trainer.max_steps) that
    prunes nothing, in [0, 1] (InfoBatch's annealing)."""
    noise_fraction: float = 0.05
    """strategy=noise_excluded: fraction of each budget's highest-scoring units excluded as likely
    noise (RHO-LOSS), in [0, 1); meant for scoring=excess_loss or loss."""


@dataclass
class RatioScheduleConfig:
    """How the keep ratio in force changes over steps (after ``cggr.warmup_steps``)."""

    kind: str = "constant"
    """'constant': min_tokens_ratio; 'curriculum': anneal 1.0 -> min_tokens_ratio over ``steps``;
    'dynamic': max - (max - min) * the batch's mean router confidence (mean exp(-NLL)), per step."""
    steps: int = 100
    """kind=curriculum: routed steps the anneal takes, >= 1."""
    shape: str = "linear"
    """kind=curriculum: linear | cosine."""
    min: float = 0.1
    """kind=dynamic: the lowest ratio, in (0, 1]."""
    max: float = 0.5
    """kind=dynamic: the highest ratio, in [min, 1]; it also sizes the static buffers."""


@dataclass
class CGGRConfig:
    """Confidence-Gated Gradient Routing settings (the ``cggr`` group)."""

    enabled: bool = True
    """False trains on every trainable token through the same code: the standard baseline."""
    scoring: str = "combined"
    """Difficulty score: entropy | margin | loss | combined | excess_loss (current NLL minus
    router.reference's NLL) | random (seeded uniform scores, the control; no router runs)."""
    seed: int = 0
    """Seed of scoring=random and the drawing strategies (stratified, importance, infobatch): draws come
    from a device generator seeded by (seed, global_step, micro-batch), the micro-batch's index among
    the optimizer step's on all ranks (rank x accumulate + i), so the same seed and step give the same
    selection, and each rank and accumulated micro-batch draws its own."""
    min_tokens_ratio: float = 0.25
    """Fraction of trainable tokens that keep their label, in (0, 1]; ceil, at least 1 per sequence.
    selection.strategy=importance: the expected fraction; noise_excluded: of the units left after the
    exclusion; infobatch: not used. ratio_schedule.kind=curriculum: the ratio annealed to; dynamic: not
    read (set away from its default, an error: ratio_schedule.min and max bound the ratio)."""
    warmup_steps: int = 10
    """The first N optimizer steps train on all tokens."""
    router: RouterConfig = field(default_factory=RouterConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    ratio_schedule: RatioScheduleConfig = field(default_factory=RatioScheduleConfig)


@dataclass
class LossConfig:
    """Which cross-entropy implementation computes the training loss."""

    impl: str = "auto"
    """auto (triton on CUDA, the chunked torch path elsewhere) | triton | torch | naive (full logits,
    HF-style: the benchmark baseline) | liger (Liger-Kernel's fused linear cross-entropy; needs
    liger-kernel) | torch_lce (torch's F.linear_cross_entropy; no z-loss, softcap or smoothing)."""
    chunk_size: int | None = None
    """Rows per chunk of the chunked paths (torch, triton; torch_lce's batch chunk): null = by rule
    (a 256 MiB logits chunk: 2048 bf16 rows at V = 49152). Smaller chunks hold less memory."""
    grad_accum: str | None = None
    """What the LM head's weight gradient is summed in over the chunks: null = the impl's default
    (fp32 for torch/triton, the weight's dtype for liger) | fp32 | weight (the weight's dtype: with
    bf16 weights it saves the V x H fp32 buffer and rounds once per chunk; same as fp32 for fp32
    weights, e.g. under bf16-mixed). naive and torch_lce take neither key but chunk_size on torch_lce."""
    label_smoothing: float = 0.0
    """Training objective: each kept token's target is (1 - eps) on its label and eps spread uniformly
    over the vocabulary, in [0, 1) (0: plain cross-entropy). Validation (val/loss) stays the plain NLL."""
    z_loss: float = 0.0
    """Training objective: adds z_loss * logsumexp(logits)**2 per kept token (PaLM's auxiliary z-loss,
    1e-4 there: keeps the softmax normaliser near 1), >= 0 (0: off). Validation stays the plain NLL."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay."""

    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 20
    """Learning-rate warmup steps (unrelated to ``cggr.warmup_steps``)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of lr."""
    fused: bool | str = "auto"
    """AdamW implementation: auto (torch's fused kernel when every trained parameter is a CUDA
    floating-point tensor, else torch's default) | true (fused; an error where torch has no fused
    kernel for the parameters) | false (torch's default: foreach on CUDA, a loop on CPU)."""

    def __post_init__(self):
        if isinstance(self.betas, list):  # as YAML, Hydra and a Python mapping give it
            self.betas = tuple(self.betas)


@dataclass
class AdapterConfig:
    """LoRA adapters (PEFT, ``pip install -e .[peft]``) on the model's linear layers, trained in place
    of the model's own weights, which stay frozen; off while ``r`` is 0 (the whole model trains)."""

    r: int = 0
    """Rank of each adapter; 0: no adapters."""
    alpha: float = 16.0
    """An adapter adds ``(alpha / r) * B A x`` to its layer's output (B starts at zero)."""
    dropout: float = 0.0
    """Dropout on each adapter's input."""
    target_modules: Any = "all-linear"
    """Which linear layers get one: all-linear (every linear layer but the LM head) or a list of
    module names (e.g. [q_proj, v_proj]). Never the LM head: CGGR's loss multiplies its own weight."""


@dataclass
class ModelConfig:
    """Which causal LM to train."""

    source: str = "random"
    """random (a tiny config, random init) | pretrained (hub id or local folder) | smollm2_gguf."""
    name: str | None = None
    """Hub id or local folder for source=pretrained."""
    arch: str = "llama"
    """For source=random: llama | gpt2 | gpt_neox."""
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 352
    max_position_embeddings: int = 1024
    dtype: str = "float32"
    """Weights' dtype when loaded; mixed precision is the trainer's ``precision``."""
    attn_implementation: str = "sdpa"
    """Attention kernel, set explicitly: sdpa (torch's scaled_dot_product_attention; causal flash /
    cuDNN kernels on CUDA) | flash_attention_2 (the flash-attn package; CUDA only) | eager (plain
    matmuls, a reference)."""
    lora: AdapterConfig = field(default_factory=AdapterConfig)
    """LoRA adapters trained instead of the weights (``model.lora.r=16``); see :class:`AdapterConfig`."""


@dataclass
class DataConfig:
    """Where batches come from."""

    source: str = "pydoc"
    """pydoc (the English text of CPython's pydoc_data.topics, no download) | files (data.paths) |
    chat (JSONL conversations, assistant-only labels) | hf (a Hugging Face dataset, data.hf_name)."""
    paths: list[str] | None = None
    """Local UTF-8 text files for source=files (one path or a list; a folder stands for its files at any
    depth, a pattern such as corpus/**/*.txt for those it matches): each file is one document, and
    a single file is cut into documents at blank lines (else into blocks of about
    ``data.text.DOCUMENT_CHARS`` characters). For source=chat: JSONL files of {"messages": [...]};
    null means the chat sample shipped in lightning_cggr/data/samples."""
    tokenizer: str = "auto"
    """bpe: a byte-level BPE trained on the corpus and cached; model: the pretrained model's own;
    auto: bpe for model.source=random, model otherwise (resolved by parse_config)."""
    vocab_size: int = 8192
    """tokenizer=bpe: the most tokens the byte-level BPE may hold (its 256 bytes, the EOS token, then
    merges of pairs seen twice or more); a corpus with fewer such pairs gives fewer (pydoc's training
    split: 6,429 of 8,192), and the run's log says how many. The random model's embedding is sized to
    the tokenizer's own count."""
    block_size: int = 128
    """Tokens per training sequence (packed); for source=chat the truncation length."""
    batch_size: int = 16
    val_fraction: float = 0.05
    num_workers: int = 0
    cache_dir: str | None = None
    """Cache of trained tokenizers and tokenized corpora; default ~/.cache/lightning_cggr (or
    $LIGHTNING_CGGR_CACHE)."""
    hf_name: str | None = None
    """source=hf: the dataset's hub name (e.g. wikitext) or a local dataset folder."""
    hf_config: str | None = None
    """source=hf: the dataset's configuration (e.g. wikitext-2-raw-v1)."""
    hf_split: str = "train"
    """source=hf: the split read; data.val_fraction of its rows are held out for validation."""
    hf_text_field: str = "text"
    """source=hf: the column holding the text; each non-blank row is one document."""


@dataclass
class CheckpointConfig:
    """How often ``<run>/checkpoints/last.ckpt`` is written (besides every validation, the last step,
    a SIGTERM/SIGINT and, in one process, an exception)."""

    every_n_steps: int | None = None
    """Optimizer steps between saves; null: a tenth of ``trainer.max_steps`` (rounded up), so a killed
    run loses at most ~10% of its steps; 0: only at validation, the end and on signals."""


@dataclass
class PerfConfig:
    """How fast the step runs, never what it computes (the ``perf`` group; see lightning_cggr.perf)."""

    compile: bool | str = "auto"
    """torch.compile each decoder block in place (or the whole decoder: compile_scope), shared by the
    forward and the router's view:
    auto (true on one CUDA device, false elsewhere: lightning_cggr.perf.resolve_compile) |
    false | true (mode default) | default | max-autotune-no-cudagraphs | reduce-overhead (CUDA graphs,
    CUDA only). Measured under the Trainer on one H100: 1.99x the eager tokens/s with true, 2.12x with
    reduce-overhead (README, "Efficiency options")."""
    compile_backend: str = "inductor"
    """inductor (generated kernels) | aot_eager | eager (tracing only, for debugging a compile problem);
    from Python also a backend function, as ``torch.compile`` takes."""
    compile_dynamic: bool | str = "auto"
    """What a second batch size (sequence routing) or sequence length does to the compiled blocks:
    auto (torch's default: one recompile makes that dimension symbolic) | false (a graph specialized
    to each shape; refused for chat data and for a curriculum under sequence routing) | true (symbolic
    from the start). Not yet measured on a GPU (lightning_cggr.perf.dynamic_arg)."""
    compile_scope: str = "blocks"
    """What one compiled region is: blocks (each decoder block on its own; seconds of compilation) |
    decoder (the decoder's whole forward as one graph, and the router's view as another: the host
    enters one region per pass instead of one per block, for a longer compile; one device only).
    Measured on CPU only so far (lightning_cggr.perf, README "Efficiency options")."""
    sdpa_backend: str = "auto"
    """Which sdpa kernel runs attention (model.attn_implementation=sdpa only): auto (torch's choice) |
    flash | cudnn | efficient (these two CUDA only) | math; one named kernel only, an error where it
    cannot run, never a fallback (lightning_cggr.perf.SDPA_BACKENDS). Not yet measured on a GPU."""
    compile_routing: bool = False
    """Under perf.compile, also compile the routing decision (scores, keep ratio, selection and their
    metrics: about a hundred small eager ops per routed step, each a kernel launch on a GPU) as one
    graph (lightning_cggr.step.decide), compiled at the first routed step. Never compiled: the rules
    that draw from a generator (stratified, importance, infobatch) and a ratio curriculum. Off by
    default until measured on a GPU (on CPU: the same selections, 1.2x-2.3x faster per call; the
    step's rate within the machine's noise; README "Efficiency options")."""
    activation_checkpointing: bool | int = False
    """Recompute decoder blocks' activations in the backward instead of keeping them (transformers'
    activation checkpointing, non-reentrant; lightning_cggr.perf.apply_activation_checkpointing):
    false | true (every block: a step holds one block's activations at a time, for about one more
    decoder forward per step) | n (blocks 0, n, 2n, ...: about 1/n of the recompute). The same losses
    and gradients (tested). MFU counts model FLOPs only, so the recompute lowers it."""


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    cggr: CGGRConfig
    loss: LossConfig
    optim: OptimConfig
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


GROUPS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "cggr": CGGRConfig,
    "loss": LossConfig,
    "optim": OptimConfig,
    "checkpoint": CheckpointConfig,
    "perf": PerfConfig,
}
"""The config groups with a schema here, by their key in the composed config."""

SCHEMA_NODE = "schema"
"""Name of the Hydra config node holding every default above (first in ``conf/train.yaml``)."""


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def schema_defaults() -> dict[str, Any]:
    """Every group's dataclass defaults as plain containers: the one source of default values."""
    return {name: _plain(dataclasses.asdict(cls())) for name, cls in GROUPS.items()}


def register_schema() -> None:
    """Store :func:`schema_defaults` in Hydra's ConfigStore as ``schema``, the first entry of
    ``conf/train.yaml``'s defaults list; the YAML groups then hold only what differs from it.

    Stored as plain containers, not typed structured configs, so that a wrong value reaches
    :func:`validate` and gets its one-line message (typed nodes would fail inside Hydra first)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NODE, node=schema_defaults())


def _build(cls: type, values: Mapping[str, Any] | None, where: str, problems: list[str]):
    """Instantiate dataclass ``cls`` from ``values``, recording unknown keys instead of raising."""
    if values is not None and not isinstance(values, Mapping):
        problems.append(f"{where}={values!r}: must be a group of settings (a mapping), not a single value")
        values = None
    values = dict(values or {})
    kwargs = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1, cutoff=0.6)
            hint = f"; did you mean {where}.{close[0]}?" if close else ""
            problems.append(f"{where}.{key}: unknown key{hint} (known: {', '.join(known)})")
            continue
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{where}.{key}", problems)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def as_config(value: Any, cls: type, where: str):
    """A group's settings as given from Python: None (the defaults), a ``cls`` instance, or a mapping
    of its settings (as the Hydra job has them, nested groups included), built with the job's
    unknown-key messages; a nested group of a ``cls`` instance takes the same three forms (a new
    instance is returned, the given one is left as it is). Anything else is a ConfigError naming
    ``where`` and what it takes."""
    if value is None:
        return cls()
    if isinstance(value, cls):  # its nested groups the same way: CGGRConfig(router={"num_layers": 4})
        changes = {}
        for f in dataclasses.fields(cls):
            sub = f.default_factory if f.default_factory is not dataclasses.MISSING else None
            if sub is not None and dataclasses.is_dataclass(sub):
                current = getattr(value, f.name)
                if (built := as_config(current, sub, f"{where}.{f.name}")) is not current:
                    changes[f.name] = built
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, Mapping):
        problems: list[str] = []
        built = _build(cls, value, where, problems)
        if problems:
            raise config_error(problems)
        return built
    raise config_error([f"{where}: expected a lightning_cggr.{cls.__name__} or a mapping of its settings, "
                        f"not a {type(value).__name__} ({value!r})"])


def _check_choice(problems: list[str], name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"{name}={value!r}: must be one of {', '.join(choices)}")


def _check_auto_flag(problems: list[str], name: str, value: Any, choices: tuple) -> None:
    """``auto``/``true``/``false`` by identity for the booleans (so 1 or 0 is not taken for one)."""
    if not any(value is v or (isinstance(v, str) and value == v) for v in choices):
        problems.append(f"{name}={value!r}: must be auto, true or false")


def _is_int(value: Any) -> bool:
    """An integer, also numpy's (from Python), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A real number, also numpy's (from Python), never a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_ratio(value: Any) -> bool:
    return _is_number(value) and 0.0 < value <= 1.0


def _validate_loss(p: list[str], loss: LossConfig) -> None:
    if loss.chunk_size is not None:
        if not _is_int(loss.chunk_size) or loss.chunk_size < 1:
            p.append(f"loss.chunk_size={loss.chunk_size!r}: must be an integer >= 1 or null (by rule)")
        elif loss.impl in ("naive", "liger"):
            p.append(f"loss.chunk_size={loss.chunk_size}: loss.impl={loss.impl} has no chunks of ours; "
                     "use loss.impl=auto|triton|torch|torch_lce or leave loss.chunk_size null")
    for name, value, ok, rule in (("label_smoothing", loss.label_smoothing, lambda v: 0 <= v < 1, "in [0, 1)"),
                                  ("z_loss", loss.z_loss, lambda v: 0 <= v < math.inf, "a finite number >= 0")):
        if not _is_number(value) or not ok(value):
            p.append(f"loss.{name}={value!r}: must be {rule} (0: off)")
        elif value > 0 and loss.impl == "torch_lce":
            p.append(f"loss.{name}={value:g}: loss.impl=torch_lce (torch's F.linear_cross_entropy) has no "
                     f"{'label smoothing' if name == 'label_smoothing' else 'z-loss'} on its chunked path; use "
                     "loss.impl=auto|triton|torch|naive|liger")
    if loss.grad_accum is not None:
        if loss.grad_accum not in GRAD_ACCUMS:
            p.append(f"loss.grad_accum={loss.grad_accum!r}: must be null or one of {', '.join(GRAD_ACCUMS)}")
        elif loss.impl in ("naive", "torch_lce"):
            p.append(f"loss.grad_accum={loss.grad_accum}: loss.impl={loss.impl} chooses its own accumulation; "
                     "use loss.impl=auto|triton|torch|liger or leave loss.grad_accum null")


def _validate_selection_extras(p: list[str], c: CGGRConfig, reference_module: bool = False) -> None:
    """Router source, reference model, selection unit/strategy, ratio schedule and their combinations
    (``reference_module``: the step is given the reference model itself, so no path is needed)."""
    r, s, q = c.router, c.selection, c.ratio_schedule
    _check_choice(p, "cggr.router.source", r.source, ROUTER_SOURCES)
    _check_choice(p, "cggr.router.reference_dtype", r.reference_dtype, DTYPES)
    _check_choice(p, "cggr.selection.unit", s.unit, SELECTION_UNITS)
    _check_choice(p, "cggr.selection.strategy", s.strategy, SELECTION_STRATEGIES)
    _check_choice(p, "cggr.ratio_schedule.kind", q.kind, RATIO_SCHEDULES)
    _check_choice(p, "cggr.ratio_schedule.shape", q.shape, CURRICULUM_SHAPES)
    if not _is_int(c.seed):
        p.append(f"cggr.seed={c.seed!r}: must be an integer")
    if not _is_int(s.strata) or s.strata < 1:
        p.append(f"cggr.selection.strata={s.strata!r}: must be an integer >= 1")
    if not _is_int(s.min_per_sequence) or s.min_per_sequence < 0:
        p.append(f"cggr.selection.min_per_sequence={s.min_per_sequence!r}: must be an integer >= 0")
    _validate_weighted_rules(p, c)
    if c.scoring == "excess_loss" and (not r.reference or r.reference == "???") and not reference_module:
        p.append("cggr.scoring=excess_loss needs cggr.router.reference (the frozen reference checkpoint)")
    if r.reference is not None and c.scoring != "excess_loss":
        p.append(f"cggr.router.reference={r.reference!r} is only used by cggr.scoring=excess_loss")
    if r.reference is not None and not isinstance(r.reference, (str, os.PathLike)):
        p.append(f"cggr.router.reference={r.reference!r}: must be a model name or null")
    if not _is_int(r.score_stride) or r.score_stride < 1:
        p.append(f"cggr.router.score_stride={r.score_stride!r}: must be an integer >= 1")
    elif r.score_stride > 1:
        if s.unit != "sequence":
            p.append(f"cggr.router.score_stride={r.score_stride}: token selection needs every token's score; "
                     "it applies to cggr.selection.unit=sequence (or set it to 1)")
        if c.scoring == "random":
            p.append(f"cggr.router.score_stride={r.score_stride}: scoring=random reads no router statistics; "
                     "set it to 1")
        if s.strategy != "topk":
            p.append(f"cggr.router.score_stride={r.score_stride} with cggr.selection.strategy={s.strategy}: the "
                     "weighted rules normalise by every trainable token's count; use strategy=topk or stride 1")
    if s.unit == "sequence":
        if r.source == "final":
            p.append(
                "cggr.router.source=final with cggr.selection.unit=sequence: final-layer scores need the "
                "full forward of every sequence, which sequence routing exists to skip; use source=truncated"
            )
        if s.scope != "sequence":
            p.append(f"cggr.selection.scope={s.scope!r} applies to unit=token; leave it at sequence")
        if s.strategy not in SEQUENCE_STRATEGIES and s.strategy in SELECTION_STRATEGIES:
            p.append(f"cggr.selection.strategy={s.strategy!r} applies to unit=token; use one of "
                     f"{', '.join(SEQUENCE_STRATEGIES)}")
        if _is_int(s.min_per_sequence) and s.min_per_sequence > 0:
            p.append("cggr.selection.min_per_sequence applies to unit=token; set it to 0")
    for knob, value in _changed(q, SCHEDULE_KNOBS) if q.kind in RATIO_SCHEDULES else ():
        if SCHEDULE_KNOBS[knob] != q.kind:
            p.append(f"cggr.ratio_schedule.{knob}={value} applies to kind={SCHEDULE_KNOBS[knob]}, and this run's "
                     f"cggr.ratio_schedule.kind is {q.kind}; add cggr.ratio_schedule.kind={SCHEDULE_KNOBS[knob]}, "
                     f"or drop it")
    if q.kind == "dynamic" and _changed(c, ("min_tokens_ratio",)):
        p.append(f"cggr.min_tokens_ratio={c.min_tokens_ratio} is not read with cggr.ratio_schedule.kind=dynamic (the "
                 f"ratio comes from the batch's confidence, between ratio_schedule.min and max); set those instead")
    if q.kind == "curriculum" and (not _is_int(q.steps) or q.steps < 1):
        p.append(f"cggr.ratio_schedule.steps={q.steps!r}: must be an integer >= 1")
    if q.kind == "dynamic":
        for name in ("min", "max"):
            if not _is_ratio(getattr(q, name)):
                p.append(f"cggr.ratio_schedule.{name}={getattr(q, name)!r}: must be a number in (0, 1]")
        if _is_ratio(q.min) and _is_ratio(q.max) and q.min > q.max:
            p.append(f"cggr.ratio_schedule.min={q.min} > max={q.max}")
        if c.scoring == "random":
            p.append("cggr.ratio_schedule.kind=dynamic needs a confidence; scoring=random has none")


def _fraction(p: list[str], name: str, value: Any, *, zero_ok: bool, one_ok: bool) -> bool:
    """Record a problem unless ``value`` is a number in the stated interval; True when it is."""
    ok = _is_number(value)
    ok = ok and (value >= 0 if zero_ok else value > 0) and (value <= 1 if one_ok else value < 1)
    if not ok:
        lo, hi = ("[" if zero_ok else "("), ("]" if one_ok else ")")
        p.append(f"{name}={value!r}: must be a number in {lo}0, 1{hi}")
    return ok


SCHEDULE_KNOBS = {"steps": "curriculum", "shape": "curriculum", "min": "dynamic", "max": "dynamic"}
"""``cggr.ratio_schedule`` settings read by one kind only; set with another, each is an error."""

STRATEGY_KNOBS = {"strata": "stratified", "p_min": "importance", "importance_transform": "importance",
                  "prune": "infobatch", "anneal_fraction": "infobatch", "noise_fraction": "noise_excluded"}
"""``cggr.selection`` settings read by one strategy only; set with another, each is an error."""


def _validate_weighted_rules(p: list[str], c: CGGRConfig) -> None:
    """The weighted rules' knobs (always range-checked) and the combinations they do not support."""
    s, q = c.selection, c.ratio_schedule
    _check_choice(p, "cggr.selection.importance_transform", s.importance_transform, IMPORTANCE_TRANSFORMS)
    p_min_ok = _fraction(p, "cggr.selection.p_min", s.p_min, zero_ok=False, one_ok=True)
    _fraction(p, "cggr.selection.prune", s.prune, zero_ok=True, one_ok=False)
    _fraction(p, "cggr.selection.anneal_fraction", s.anneal_fraction, zero_ok=True, one_ok=True)
    _fraction(p, "cggr.selection.noise_fraction", s.noise_fraction, zero_ok=True, one_ok=False)
    for knob, value in _changed(s, STRATEGY_KNOBS) if s.strategy in SELECTION_STRATEGIES else ():
        if STRATEGY_KNOBS[knob] != s.strategy:
            p.append(f"cggr.selection.{knob}={value} applies to strategy={STRATEGY_KNOBS[knob]}, and this run's "
                     f"cggr.selection.strategy is {s.strategy}; add cggr.selection.strategy={STRATEGY_KNOBS[knob]}, "
                     f"or cggr.selection.{knob}={getattr(SelectionConfig(), knob)} (its default)")
    rule = s.strategy
    if rule not in ("importance", "infobatch", "noise_excluded"):
        return
    if _is_int(s.min_per_sequence) and s.min_per_sequence > 0:
        p.append(f"cggr.selection.min_per_sequence applies to strategy topk or stratified, not {rule}; set it to 0")
    if rule in ("importance", "noise_excluded") and c.scoring == "random":
        p.append(f"cggr.selection.strategy={rule} with cggr.scoring=random is a random draw of another size; "
                 "the random control is strategy=topk with scoring=random")
    if rule == "infobatch" and q.kind != "constant":
        p.append(f"cggr.selection.strategy=infobatch keeps every above-mean unit and has no keep ratio, so "
                 f"cggr.ratio_schedule.kind={q.kind} does not apply; use kind=constant")
    if rule == "importance" and p_min_ok:
        bound, name = ((q.min, "cggr.ratio_schedule.min") if q.kind == "dynamic"
                       else (c.min_tokens_ratio, "cggr.min_tokens_ratio"))
        if _is_ratio(bound) and s.p_min > bound:
            p.append(f"cggr.selection.p_min={s.p_min} exceeds {name}={bound}: the floor alone would keep "
                     f"more than the ratio; lower p_min")


PRECISIONS_THAT_CAST = ("bf16-true", "16-true", "64-true", "64")
"""Lightning precisions that cast the whole model to their dtype; the others (``32-true``, ``*-mixed``)
train the weights in the dtype they were loaded in."""


def config_error(problems: list[str]) -> ConfigError:
    """One problem: one line. Several: a header line and one line each."""
    if len(problems) == 1:
        return ConfigError(f"invalid configuration: {problems[0]}")
    return ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def optim_problems(optim: OptimConfig) -> list[str]:
    """The problems of ``optim`` alone (what :class:`~lightning_cggr.module.CGGRModule` checks)."""
    p: list[str] = []
    _validate_optim(p, optim)
    return p


def _validate_optim(p: list[str], o: OptimConfig) -> None:
    """AdamW's and the schedule's numbers (torch would refuse some only at the first step, and take a
    negative weight decay or a cosine floor above the peak without a word)."""
    if not _is_number(o.lr) or o.lr <= 0:
        p.append(f"optim.lr={o.lr!r}: must be a number > 0")
    if not _is_number(o.weight_decay) or o.weight_decay < 0:
        p.append(f"optim.weight_decay={o.weight_decay!r}: must be a number >= 0 (0: no weight decay)")
    betas = list(o.betas) if isinstance(o.betas, (list, tuple)) else None
    if betas is None or len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
        p.append(f"optim.betas={_plain(o.betas)!r}: must be two numbers in [0, 1), e.g. 'optim.betas=[0.9,0.95]'")
    if not _is_int(o.warmup_steps) or o.warmup_steps < 0:
        p.append(f"optim.warmup_steps={o.warmup_steps!r}: must be an integer >= 0")
    _fraction(p, "optim.min_lr_ratio", o.min_lr_ratio, zero_ok=True, one_ok=True)
    _check_auto_flag(p, "optim.fused", o.fused, FUSED_CHOICES)


def _validate_lora(p: list[str], a: AdapterConfig) -> None:
    if not _is_int(a.r) or a.r < 0:
        p.append(f"model.lora.r={a.r!r}: must be an integer >= 0 (0: no adapters, the whole model trains)")
        return
    if a.r == 0:
        return
    if not _is_number(a.alpha) or a.alpha <= 0:
        p.append(f"model.lora.alpha={a.alpha!r}: must be a number > 0")
    _fraction(p, "model.lora.dropout", a.dropout, zero_ok=True, one_ok=False)
    t = a.target_modules
    names = [] if t == "all-linear" else t if isinstance(t, list) and t and all(isinstance(x, str) and x for x in t) \
        else None
    if names is None:
        p.append(f"model.lora.target_modules={t!r}: must be all-linear or a list of module names")
    elif any(x.split(".")[-1] == "lm_head" for x in names):
        p.append("model.lora.target_modules names lm_head: CGGR's loss multiplies the LM head's own weight, so "
                 "its adapter would be skipped; leave lm_head out")
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        p.append(f"model.lora.r={a.r} needs the peft package: pip install -e .[peft]")


def _changed(config: Any, names: Iterable[str]) -> list[tuple[str, Any]]:
    """(name, value) of each of ``names`` whose value differs from the dataclass default of ``config``."""
    default = type(config)()
    return [(name, getattr(config, name)) for name in names if getattr(config, name) != getattr(default, name)]


RANDOM_MODEL_FIELDS = ("arch", "hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings")
"""``model`` settings that shape the random model only; a loaded model brings its own architecture."""
HF_DATA_FIELDS = ("hf_name", "hf_config", "hf_split", "hf_text_field")


def _ignored_setting_problems(p: list[str], m: ModelConfig, d: DataConfig) -> None:
    """Settings that the chosen model or data source would not read: each an error that names the
    source it belongs to, never a value silently dropped (``model.name=gpt2`` on the default random
    model used to train the random model)."""
    if m.source not in MODEL_SOURCES or d.source not in DATA_SOURCES:
        return  # reported already
    if m.name is not None and m.source != "pretrained":
        p.append(f"model.name={m.name}: read only with model.source=pretrained, and this run's model.source is "
                 f"{m.source}; use model=smollm model.name={m.name} (or add model.source=pretrained)")
    if d.paths is not None and d.source not in ("files", "chat"):
        p.append(f"data.paths: read only with data.source=files (text) or chat (JSONL), and this run's data.source "
                 f"is {d.source}; add data.source=files")
    for group, config, fields, reader, fix in (
            ("model", m, RANDOM_MODEL_FIELDS, "random", "the loaded model brings its own architecture; drop it"),
            ("data", d, HF_DATA_FIELDS, "hf", "add data.source=hf (data=wikitext for WikiText-2)")):
        for name, value in _changed(config, fields) if config.source != reader else ():
            p.append(f"{group}.{name}={value}: read only with {group}.source={reader}, and this run's {group}.source "
                     f"is {config.source}; {fix}")
    bpe = d.tokenizer == "bpe" or (d.tokenizer == "auto" and m.source == "random")
    if d.tokenizer in TOKENIZERS and not bpe and _changed(d, ("vocab_size",)):
        p.append(f"data.vocab_size={d.vocab_size}: sizes the BPE tokenizer trained for the random model, and this "
                 f"run uses the model's own tokenizer and vocabulary; drop it")


def _validate_checkpoint(p: list[str], c: CheckpointConfig) -> None:
    if c.every_n_steps is not None and (not _is_int(c.every_n_steps) or c.every_n_steps < 0):
        p.append(f"checkpoint.every_n_steps={c.every_n_steps!r}: must be an integer >= 0, or null (a tenth of the run)")


def _validate_attention(p: list[str], run: RunConfig) -> None:
    """``model.attn_implementation``: a choice that can run here, and one ``perf.sdpa_backend`` can steer."""
    from .models.attention import availability_problem

    impl = run.model.attn_implementation
    _check_choice(p, "model.attn_implementation", impl, ATTN_IMPLS)
    if impl in ATTN_IMPLS and availability_problem(impl):
        p.append(availability_problem(impl))
    if problem := sdpa_backend_problem(run.perf.sdpa_backend, impl):
        p.append(problem)


def _validate_perf_options(p: list[str], perf: PerfConfig) -> None:
    """The efficiency options themselves: compile, its backend, scope and dynamic shapes, activation
    checkpointing (``perf.sdpa_backend`` against the attention: :func:`_validate_attention`, and the step
    asks the model it is given)."""
    c = perf.compile
    if not (isinstance(c, bool) or c in COMPILE_MODES or c == "auto"):
        p.append(f"perf.compile={c!r}: must be auto, true, false or one of {', '.join(COMPILE_MODES)}")
    if not callable(perf.compile_backend):  # from Python, torch.compile also takes a backend function
        _check_choice(p, "perf.compile_backend", perf.compile_backend, COMPILE_BACKENDS)
    _check_auto_flag(p, "perf.compile_dynamic", perf.compile_dynamic, DYNAMIC_CHOICES)
    _check_choice(p, "perf.compile_scope", perf.compile_scope, COMPILE_SCOPES)
    if not isinstance(perf.compile_routing, bool):
        p.append(f"perf.compile_routing={perf.compile_routing!r}: must be true or false")
    ac = perf.activation_checkpointing
    if not (isinstance(ac, bool) or (_is_int(ac) and ac >= 1)):
        p.append(f"perf.activation_checkpointing={ac!r}: must be true, false or an integer n >= 1 (every n-th block)")


def step_config_problems(cggr: CGGRConfig, loss: LossConfig, perf: PerfConfig,
                         optim: OptimConfig | None = None, *, reference_module: bool = False) -> list[str]:
    """The problems of the groups a training step reads whatever the model and data (``cggr``, ``loss``,
    ``perf``, ``optim``): what :func:`validate` checks for the Hydra job, and what
    :class:`~lightning_cggr.step.CGGRStep` and :class:`~lightning_cggr.module.CGGRModule` check when
    built from Python with these dataclasses (``reference_module``: given the reference model of
    scoring=excess_loss itself, in place of ``cggr.router.reference``)."""
    p: list[str] = []
    c = cggr
    if not isinstance(c.enabled, bool):
        p.append(f"cggr.enabled={c.enabled!r}: must be true or false")
    _check_choice(p, "cggr.scoring", c.scoring, SCORING_STRATEGIES)
    _check_choice(p, "cggr.selection.scope", c.selection.scope, SELECTION_SCOPES)
    if not _is_number(c.min_tokens_ratio):
        p.append(f"cggr.min_tokens_ratio={c.min_tokens_ratio!r}: must be a number in (0, 1]")
    elif not 0.0 < c.min_tokens_ratio <= 1.0:
        p.append(f"cggr.min_tokens_ratio={c.min_tokens_ratio}: must be in (0, 1]")
    if not _is_int(c.warmup_steps) or c.warmup_steps < 0:
        p.append(f"cggr.warmup_steps={c.warmup_steps!r}: must be an integer >= 0")
    if not _is_int(c.router.num_layers) or c.router.num_layers < 1:
        p.append(f"cggr.router.num_layers={c.router.num_layers!r}: must be an integer >= 1")
    if c.router.chunk_size is not None and (not _is_int(c.router.chunk_size) or c.router.chunk_size < 1):
        p.append(f"cggr.router.chunk_size={c.router.chunk_size!r}: must be an integer >= 1 or null (by rule)")
    _validate_selection_extras(p, c, reference_module)
    _check_choice(p, "loss.impl", loss.impl, LOSS_IMPLS)
    _validate_loss(p, loss)
    _validate_perf_options(p, perf)
    if optim is not None:
        _validate_optim(p, optim)
    return p


def validate(run: RunConfig) -> None:
    """Check every value; raise one ConfigError listing all problems."""
    c, m, d = run.cggr, run.model, run.data
    p = step_config_problems(run.cggr, run.loss, run.perf, run.optim)
    _check_choice(p, "model.source", m.source, MODEL_SOURCES)
    _check_choice(p, "model.dtype", m.dtype, DTYPES)
    if m.source == "random":
        _check_choice(p, "model.arch", m.arch, MODEL_ARCHS)
        if _is_int(c.router.num_layers) and _is_int(m.num_layers) and c.enabled and c.router.source == "truncated":
            if c.router.num_layers > m.num_layers:
                p.append(
                    f"cggr.router.num_layers={c.router.num_layers}: the model has only "
                    f"{m.num_layers} layers (model.num_layers)"
                )
        sizes = {k: getattr(m, k) for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                              "max_position_embeddings")}
        for name, value in sizes.items():
            if not _is_int(value) or value < 1:
                p.append(f"model.{name}={value!r}: must be an integer >= 1")
        if all(_is_int(v) and v >= 1 for v in sizes.values()) and m.hidden_size % m.num_heads:
            p.append(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
    if m.source == "pretrained" and not m.name:
        p.append("model.name: required for model.source=pretrained (a hub id or a local folder)")
    _check_choice(p, "data.source", d.source, DATA_SOURCES)
    _check_choice(p, "data.tokenizer", d.tokenizer, TOKENIZERS)
    if d.source == "chat" and m.source == "random":  # the one fix: a model that has a chat template
        p.append(
            "data=chat needs a pretrained model with a chat template, not the random tiny model: add "
            "model=smollm2_gguf (SmolLM2-135M-Instruct, offline) or model=smollm / model.name=<hub id or folder>"
        )
    elif d.tokenizer == "model" and m.source == "random":
        p.append("data.tokenizer=model needs a pretrained model (e.g. model=smollm2_gguf); with the tiny "
                 "random model use data.tokenizer=bpe")
    elif d.source == "chat" and d.tokenizer != "model":
        p.append("data.source=chat renders conversations with the model's chat template; use data.tokenizer=model")
    if d.tokenizer == "bpe" and m.source != "random":
        p.append(
            "data.tokenizer=bpe with a pretrained model would not match its vocabulary; use data.tokenizer=model"
        )
    _ignored_setting_problems(p, m, d)
    paths_ok = d.paths is None or (isinstance(d.paths, list) and all(isinstance(x, str) and x for x in d.paths))
    if not paths_ok:
        p.append(f"data.paths={d.paths!r}: must be a file path or a list of them, e.g. 'data.paths=[a.txt,b.txt]'")
    if d.source == "files" and not d.paths:
        p.append("data.paths: required for data.source=files (a text file or a list of them)")
    if d.source == "hf" and not d.hf_name:
        p.append("data.hf_name: required for data.source=hf (e.g. wikitext, with data.hf_config=wikitext-2-raw-v1)")
    for name in ("hf_split", "hf_text_field"):
        if not isinstance(getattr(d, name), str) or not getattr(d, name):
            p.append(f"data.{name}={getattr(d, name)!r}: must be a non-empty name")
    if d.cache_dir is not None and (not isinstance(d.cache_dir, str) or not d.cache_dir):
        p.append(f"data.cache_dir={d.cache_dir!r}: must be a folder path or null (the default cache)")
    for name, least in (("block_size", 2), ("batch_size", 1), ("vocab_size", BPE_BASE_TOKENS)):
        value = getattr(d, name)
        if not isinstance(value, int) or value < least:
            why = " (a byte-level BPE holds the 256 bytes and its EOS token before any merge)" if name == "vocab_size" else ""
            p.append(f"data.{name}={value!r}: must be an integer >= {least}{why}")
    if not _is_int(d.num_workers) or d.num_workers < 0:
        p.append(f"data.num_workers={d.num_workers!r}: must be an integer >= 0")
    if not _is_number(d.val_fraction) or not 0.0 < d.val_fraction < 1.0:
        no_validation = " (to train without validation, keep it and add +trainer.limit_val_batches=0)"
        p.append(f"data.val_fraction={d.val_fraction!r}: must be a number in (0, 1), the share held out for "
                 f"validation{no_validation if d.val_fraction == 0 else ''}")
    _validate_attention(p, run)
    _validate_lora(p, m.lora)
    if d.source in ("files", "chat") and d.paths and paths_ok:
        from .data import data_file_problems  # reads the files: after the cheap checks

        p += data_file_problems(d.source, d.paths)
    _validate_checkpoint(p, run.checkpoint)
    if p:
        raise config_error(p)


def routing_warnings(run: RunConfig, max_steps: int | None = None) -> list[str]:
    """Settings that are valid but make routing save nothing; :func:`~lightning_cggr.train.train` logs
    each as a warning. A warm-up as long as the run (``max_steps``, the trainer's) routes no step; a
    ratio curriculum longer than the run never reaches ``min_tokens_ratio``. With
    ``selection.unit=sequence`` a batch keeps ``ceil(ratio * batch_size)`` sequences, so a batch
    smaller than ``1 / ratio`` trains every one of them at every step (InfoBatch keeps every unit's
    slot by design and is left out)."""
    c, q, b = run.cggr, run.cggr.ratio_schedule, run.data.batch_size
    if not c.enabled:
        return []
    warnings = []
    if max_steps is not None and 0 < max_steps <= c.warmup_steps:
        warnings.append(f"cggr.warmup_steps={c.warmup_steps} with trainer.max_steps={max_steps}: routing starts "
                        f"after the warm-up, so no step of this run is routed; lower cggr.warmup_steps (or "
                        f"cggr.enabled=false for standard training)")
    if q.kind == "curriculum" and max_steps is not None and max_steps > c.warmup_steps:
        from .routing.schedule import host_ratio

        last = host_ratio(q.kind, c.min_tokens_ratio, max_steps - 1, c.warmup_steps, q.steps, q.shape)
        if last > c.min_tokens_ratio + 1e-9:  # the anneal is cut off before it reaches its target
            routed = max_steps - c.warmup_steps
            digits = next(d for d in range(3, 12) if round(last, d) != round(c.min_tokens_ratio, d))
            shorter = f"cggr.ratio_schedule.steps <= {routed - 1} or " if routed > 1 else ""
            warnings.append(
                f"cggr.ratio_schedule.steps={q.steps} with trainer.max_steps={max_steps}: the curriculum reaches "
                f"cggr.min_tokens_ratio={c.min_tokens_ratio:g} at its routed step {q.steps + 1} but the run routes "
                f"only {routed}, so its last step keeps ratio {last:.{digits}f}; use {shorter}trainer.max_steps >= "
                f"{c.warmup_steps + q.steps + 1}")
    sel = c.selection
    if c.min_tokens_ratio >= 1 and q.kind != "dynamic" and sel.strategy in ("topk", "stratified", "importance"):
        unit = "sequence" if sel.unit == "sequence" else "token"
        warnings.append(f"cggr.min_tokens_ratio=1 keeps every {unit}: this trains as standard training does, "
                        f"with the scoring and the selection added to each step; use cggr.enabled=false for that, or a "
                        f"ratio below 1 to route")
    if sel.strategy == "infobatch" and _is_int(max_steps) and max_steps > c.warmup_steps:
        from .routing.sampling import infobatch_prune_fraction

        if sel.prune == 0:
            warnings.append("cggr.selection.prune=0: InfoBatch drops no unit, so every step trains on every token "
                            "(or sequence); set cggr.selection.prune (InfoBatch's default 0.5), or "
                            "cggr.enabled=false for standard training")
        elif infobatch_prune_fraction(sel.prune, c.warmup_steps, max_steps, sel.anneal_fraction) == 0:
            stop = next(s for s in range(max_steps)  # the first unpruned step (at most the warm-up's end)
                        if infobatch_prune_fraction(sel.prune, s, max_steps, sel.anneal_fraction) == 0)
            warnings.append(
                f"cggr.selection.anneal_fraction={sel.anneal_fraction:g} with trainer.max_steps={max_steps}: InfoBatch "
                f"prunes nothing from step {stop} on, and routing starts after cggr.warmup_steps={c.warmup_steps}, "
                f"so no step of this run prunes; lower cggr.selection.anneal_fraction or cggr.warmup_steps")
    if sel.unit != "sequence" or sel.strategy == "infobatch":
        return warnings
    smallest = q.min if q.kind == "dynamic" else c.min_tokens_ratio
    from .routing.selection import static_capacity

    if smallest >= 1 or static_capacity(b, smallest) < b:
        return warnings
    least = next(n for n in itertools.count(b + 1) if static_capacity(n, smallest) < n)  # ends: smallest < 1
    return warnings + [
        f"cggr.selection.unit=sequence keeps ceil({smallest:g} x data.batch_size) = {b} of the batch's {b} "
        f"sequences: every sequence trains at every step, so routing saves nothing; use data.batch_size >= "
        f"{least} (or cggr.selection.unit=token)"]


def lr_warnings(optim: OptimConfig, max_steps: int | None = None) -> list[str]:
    """An LR warm-up (``optim.warmup_steps``) as long as the run (``max_steps``, the trainer's): the LR
    peaks at the last step at the earliest and the cosine decay never starts
    (:func:`lightning_cggr.step.lr_factor`); :func:`~lightning_cggr.train.train` logs it as a warning."""
    w = optim.warmup_steps
    if not (_is_int(max_steps) and max_steps > 0 and w >= 1 and w >= max_steps - 1):
        return []
    from .step import lr_factor  # after the config checks: the run is about to build anyway

    last = lr_factor(max_steps - 1, optim, max_steps)
    return [f"optim.warmup_steps={w} with trainer.max_steps={max_steps}: the LR warm-up fills the whole run: the "
            f"LR rises through it (to {last:.3g} x optim.lr at its last step) and never decays; "
            f"lower optim.warmup_steps (e.g. {max_steps // 10}, a tenth of the run)"]


BPE_BASE_TOKENS = 257
"""The tokens a byte-level BPE holds before its first merge: the 256 bytes and the EOS token."""


def fine_tuning_lr_warnings(run: RunConfig) -> list[str]:
    """Every weight of a pretrained model trained at the LR chosen for the random tiny model (the
    dataclass default): its first steps can undo the pretraining. Measured on the 2-core CPU, 2 steps
    of SmolLM2-135M on the chat sample (warm-up 20): held-out loss 2.79 -> 5.58 at 3e-3, 2.70 at 3e-4."""
    if run.model.source == "random" or run.model.lora.r or run.optim.lr != OptimConfig.lr:
        return []
    return [f"optim.lr={run.optim.lr:g} is the random tiny model's default, and this run trains every weight of a "
            f"pretrained model: at that rate its first steps can undo the pretraining (SmolLM2-135M on the chat "
            f"sample: held-out loss 2.79 -> 5.58 in 2 steps; 2.70 at 3e-4); +experiment=smollm and "
            f"+experiment=smollm2_chat use optim.lr=3e-4; set optim.lr (or model.lora.r, adapters)"]


def parse_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Turn a composed (plain-container) config into validated dataclasses."""
    problems: list[str] = []
    parts = {}
    for name, cls in GROUPS.items():
        parts[name] = _build(cls, cfg.get(name), name, problems)
    if problems:
        raise config_error(problems)
    if isinstance(parts["data"].paths, str):  # data.paths=/a/file.txt: one file, not its characters
        parts["data"].paths = [parts["data"].paths]
    run = RunConfig(**parts)
    if run.data.tokenizer == "auto":  # the documented rule, resolved before validation
        run.data.tokenizer = "bpe" if run.model.source == "random" else "model"
    validate(run)
    return run
