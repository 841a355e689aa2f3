"""Small random-init configs of the tested families (Llama, GPT-2, GPT-NeoX): tests and CPU runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import ModelConfig

ARCHS = ("llama", "gpt2", "gpt_neox")
"""``model.arch`` choices for ``model.source=random``."""


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

    from .attention import set_attn_implementation

    model = AutoModelForCausalLM.from_config(tiny_config(cfg, vocab_size, eos_token_id))
    return set_attn_implementation(model.to(getattr(torch, cfg.dtype)), cfg.attn_implementation)
