"""Typed schemas for the settings that shape a run, validated in one place.

Hydra composes ``conf/``; :func:`parse_config` turns the composed groups into these dataclasses and
:func:`validate` gathers every problem into one :class:`ConfigError`, raised before any model or
tokenizer is built. A misspelled key is an error, never ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

SCORING_STRATEGIES = ("entropy", "margin", "loss", "combined")
SELECTION_SCOPES = ("sequence", "batch")
MODEL_SOURCES = ("random", "pretrained", "smollm2_gguf")
MODEL_ARCHS = ("llama", "gpt2", "gpt_neox")
DATA_SOURCES = ("pydoc", "files")
TOKENIZERS = ("bpe", "model")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration mistake, reported as one readable message before training starts."""


@dataclass
class RouterConfig:
    """How tokens are scored."""

    num_layers: int = 2
    """First k blocks of the model that the router runs (shared weights); 1 <= k <= model layers."""
    chunk_size: int = 1024
    """Rows of [tokens, vocab] logits the router materializes at once while scoring."""


@dataclass
class SelectionConfig:
    """Which tokens keep their label."""

    scope: str = "sequence"
    """'sequence': top ratio of each sequence's trainable tokens; 'batch': of the whole batch's."""


@dataclass
class CGGRConfig:
    """Confidence-Gated Gradient Routing settings (the ``cggr`` group)."""

    enabled: bool = True
    """False trains on every trainable token through the same code: the standard baseline."""
    scoring: str = "combined"
    """Difficulty score: entropy | margin | loss | combined."""
    min_tokens_ratio: float = 0.25
    """Fraction of trainable tokens that keep their label, in (0, 1]; ceil, at least 1 per sequence."""
    warmup_steps: int = 10
    """The first N optimizer steps train on all tokens."""
    router: RouterConfig = field(default_factory=RouterConfig)
    selection: SelectionConfig = field(default_factory=SelectionConfig)


@dataclass
class LossConfig:
    """Which cross-entropy implementation computes the training loss."""

    impl: str = "auto"
    """auto | triton | torch | naive (naive = full-logits, HF-style; the benchmark baseline)."""


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


@dataclass
class DataConfig:
    """Where batches come from."""

    source: str = "pydoc"
    """pydoc (the English text of CPython's pydoc_data.topics, no download) | files (data.paths)."""
    paths: list[str] | None = None
    """Local UTF-8 text files for source=files; each file is one document."""
    tokenizer: str = "bpe"
    """bpe: a byte-level BPE trained on the corpus and cached; model: the pretrained model's own."""
    vocab_size: int = 8192
    block_size: int = 128
    """Tokens per training sequence (packed)."""
    batch_size: int = 16
    val_fraction: float = 0.05
    num_workers: int = 0
    cache_dir: str | None = None
    """Tokenizer cache; default ~/.cache/lightning_cggr (or $LIGHTNING_CGGR_CACHE)."""


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    cggr: CGGRConfig
    loss: LossConfig
    optim: OptimConfig


def _build(cls: type, values: Mapping[str, Any] | None, where: str, problems: list[str]):
    """Instantiate dataclass ``cls`` from ``values``, recording unknown keys instead of raising."""
    values = dict(values or {})
    kwargs = {}
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in known:
            problems.append(f"{where}.{key}: unknown key (known: {', '.join(known)})")
            continue
        sub = known[key].default_factory if known[key].default_factory is not dataclasses.MISSING else None
        if sub is not None and dataclasses.is_dataclass(sub):
            kwargs[key] = _build(sub, value, f"{where}.{key}", problems)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _check_choice(problems: list[str], name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append(f"{name}={value!r}: must be one of {', '.join(choices)}")


def config_error(problems: list[str]) -> ConfigError:
    """One problem: one line. Several: a header line and one line each."""
    if len(problems) == 1:
        return ConfigError(f"invalid configuration: {problems[0]}")
    return ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))


def _check_data_files(p: list[str], paths: Any) -> None:
    """Every data file exists and is not empty (a cheap stat, before anything is built)."""
    from pathlib import Path

    if isinstance(paths, (str, Path)):
        paths = [paths]
    for raw in paths:
        path = Path(str(raw)).expanduser()
        if not path.is_file():
            p.append(f"data.paths: {path} does not exist or is not a file")
        elif path.stat().st_size == 0:
            p.append(f"data.paths: {path} is empty")


def validate(run: RunConfig) -> None:
    """Check every value; raise one ConfigError listing all problems."""
    p: list[str] = []
    c, m, d = run.cggr, run.model, run.data
    _check_choice(p, "cggr.scoring", c.scoring, SCORING_STRATEGIES)
    _check_choice(p, "cggr.selection.scope", c.selection.scope, SELECTION_SCOPES)
    if isinstance(c.min_tokens_ratio, bool) or not isinstance(c.min_tokens_ratio, (int, float)):
        p.append(f"cggr.min_tokens_ratio={c.min_tokens_ratio!r}: must be a number in (0, 1]")
    elif not 0.0 < c.min_tokens_ratio <= 1.0:
        p.append(f"cggr.min_tokens_ratio={c.min_tokens_ratio}: must be in (0, 1]")
    if not isinstance(c.warmup_steps, int) or c.warmup_steps < 0:
        p.append(f"cggr.warmup_steps={c.warmup_steps!r}: must be an integer >= 0")
    if not isinstance(c.router.num_layers, int) or c.router.num_layers < 1:
        p.append(f"cggr.router.num_layers={c.router.num_layers!r}: must be an integer >= 1")
    if not isinstance(c.router.chunk_size, int) or c.router.chunk_size < 1:
        p.append(f"cggr.router.chunk_size={c.router.chunk_size!r}: must be an integer >= 1")
    _check_choice(p, "loss.impl", run.loss.impl, ("auto", "triton", "torch", "naive"))
    _check_choice(p, "model.source", m.source, MODEL_SOURCES)
    _check_choice(p, "model.dtype", m.dtype, DTYPES)
    if m.source == "random":
        _check_choice(p, "model.arch", m.arch, MODEL_ARCHS)
        if m.source == "random" and isinstance(c.router.num_layers, int) and c.enabled:
            if c.router.num_layers > m.num_layers:
                p.append(
                    f"cggr.router.num_layers={c.router.num_layers}: the model has only "
                    f"{m.num_layers} layers (model.num_layers)"
                )
        if m.hidden_size % max(m.num_heads, 1):
            p.append(f"model.hidden_size={m.hidden_size} must be divisible by model.num_heads={m.num_heads}")
    if m.source == "pretrained" and not m.name:
        p.append("model.name: required for model.source=pretrained (a hub id or a local folder)")
    _check_choice(p, "data.source", d.source, DATA_SOURCES)
    _check_choice(p, "data.tokenizer", d.tokenizer, TOKENIZERS)
    if d.tokenizer == "model" and m.source == "random":
        p.append("data.tokenizer=model needs a pretrained model (model.source); use data.tokenizer=bpe")
    if d.tokenizer == "bpe" and m.source != "random":
        p.append(
            "data.tokenizer=bpe with a pretrained model would not match its vocabulary; use data.tokenizer=model"
        )
    if d.source == "files" and not d.paths:
        p.append("data.paths: required for data.source=files (a list of text files)")
    for name in ("block_size", "batch_size", "vocab_size"):
        value = getattr(d, name)
        if not isinstance(value, int) or value < 2:
            p.append(f"data.{name}={value!r}: must be an integer >= 2")
    if not 0.0 < d.val_fraction < 1.0:
        p.append(f"data.val_fraction={d.val_fraction}: must be in (0, 1)")
    if run.optim.lr <= 0:
        p.append(f"optim.lr={run.optim.lr}: must be > 0")
    if d.source in ("files", "chat") and d.paths:
        _check_data_files(p, d.paths)
    if p:
        raise config_error(p)


def parse_config(cfg: Mapping[str, Any]) -> RunConfig:
    """Turn a composed (plain-container) config into validated dataclasses."""
    problems: list[str] = []
    parts = {}
    for name, cls in (
        ("model", ModelConfig),
        ("data", DataConfig),
        ("cggr", CGGRConfig),
        ("loss", LossConfig),
        ("optim", OptimConfig),
    ):
        parts[name] = _build(cls, cfg.get(name), name, problems)
    if problems:
        raise config_error(problems)
    if isinstance(parts["optim"].betas, list):
        parts["optim"].betas = tuple(parts["optim"].betas)
    run = RunConfig(**parts)
    validate(run)
    return run
