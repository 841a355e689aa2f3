"""A block longer than the model's positions: an error where the model looks positions up in a table
(its own forward fails past it), a warning where it computes them (its forward runs)."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from lightning_cggr.models.positions import sequence_length_problem

POSITIONS = 16


def tiny(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=64, n_positions=POSITIONS, n_embd=16, n_layer=1, n_head=2)
        return tf.GPT2LMHeadModel(config)
    if family == "opt":  # its table holds 2 rows more than the declared count
        config = tf.OPTConfig(vocab_size=64, max_position_embeddings=POSITIONS, hidden_size=16, ffn_dim=32,
                              num_hidden_layers=1, num_attention_heads=2, word_embed_proj_dim=16)
        return tf.OPTForCausalLM(config)
    config = tf.LlamaConfig(vocab_size=64, max_position_embeddings=POSITIONS, hidden_size=16, intermediate_size=32,
                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2)
    return tf.LlamaForCausalLM(config)


def forward_runs(model: torch.nn.Module, length: int) -> bool:
    try:
        with torch.no_grad():
            model(input_ids=torch.randint(0, 64, (1, length)))
        return True
    except IndexError:
        return False


@pytest.mark.parametrize("family, table", [("gpt2", True), ("opt", True), ("llama", False)])
def test_a_block_past_the_positions_is_refused_exactly_where_the_models_forward_fails(family, table):
    model = tiny(family).eval()
    assert forward_runs(model, POSITIONS)  # the reference: the model's own forward at the limit and past it
    assert forward_runs(model, POSITIONS + 1) is not table
    assert sequence_length_problem(model, POSITIONS, random=False) == (None, None)
    error, warning = sequence_length_problem(model, POSITIONS + 1, random=False)
    if table:
        assert warning is None and f"{POSITIONS} learned positions" in error
        assert f"lower data.block_size to {POSITIONS}" in error
    else:
        assert error is None and f"max_position_embeddings={POSITIONS}" in warning


def test_the_random_models_fix_names_its_setting():
    error, _ = sequence_length_problem(tiny("gpt2"), 2 * POSITIONS, random=True)
    assert "raise model.max_position_embeddings" in error
