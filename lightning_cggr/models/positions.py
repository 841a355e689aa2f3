"""How long a sequence a built model can take: its declared position count, and whether that count is a
hard limit (a learned position table, indexed by position) or a trained range (rotary, ALiBi: longer
sequences run, off the lengths the model was trained at)."""

from __future__ import annotations

import torch

POSITION_CONFIG_NAMES = ("max_position_embeddings", "n_positions", "n_ctx")
"""Config attributes that declare how many positions a model was built for, first found wins."""
TABLE_OFFSETS = (0, 1, 2)
"""Extra rows a learned position table may carry (OPT and BART-style decoders add 2 to the count)."""


def declared_positions(model: torch.nn.Module) -> tuple[str, int] | None:
    """(config attribute, value) of the model's declared position count, or None."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in POSITION_CONFIG_NAMES:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def learned_position_table(model: torch.nn.Module, positions: int) -> str | None:
    """The name of an embedding table (not the token embedding) with one row per declared position
    (plus :data:`TABLE_OFFSETS`): positions past ``positions`` would index it past its end."""
    token = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Embedding) and module is not token:
            if module.num_embeddings - positions in TABLE_OFFSETS:
                return name
    return None


def sequence_length_problem(model: torch.nn.Module, length: int, *, random: bool) -> tuple[str | None, str | None]:
    """(error, warning) for training ``model`` on sequences of ``length`` tokens (``data.block_size``):
    an error where a learned position table is shorter, a warning where only the declared count is."""
    declared = declared_positions(model)
    if declared is None or length <= declared[1]:
        return None, None
    name, count = declared
    fix = (f"lower data.block_size to {count} or raise model.max_position_embeddings" if random
           else f"lower data.block_size to {count}")
    table = learned_position_table(model, count)
    if table is not None:
        return (f"data.block_size={length} is longer than the model's {count} learned positions ({name}; its "
                f"position table {table} would be indexed past its end); {fix}"), None
    return None, (f"data.block_size={length} is longer than the model's {name}={count}: it runs (its positions "
                  f"are computed, not looked up), but past the lengths it was built or trained for; {fix}")
