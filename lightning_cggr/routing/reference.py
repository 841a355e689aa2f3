"""A frozen reference model for Rho-1 excess-loss scoring (``cggr.scoring=excess_loss``).

Rho-1 ("Not All Tokens Are What You Need", NeurIPS 2024) scores a token by how much worse the
model being trained predicts it than a reference model does: ``score = NLL_current - NLL_reference``.
The reference runs in inference mode, optionally in a lower precision, and is held by a plain
object rather than registered as a submodule: it adds no trainable parameters, no optimizer state,
no ``state_dict`` keys and no checkpoint bytes. It follows the training device on first use.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from ..kernels import TokenStats
from .router import checked_logit_transform, find_decoder, find_head


def load_reference(name: str | os.PathLike, dtype: str = "bfloat16") -> nn.Module:
    """The reference model ``name``: a hub id, a ``save_pretrained`` folder (an exported run, the
    RHO-LOSS holdout's), ``smollm2_gguf``, or a lightning_cggr run folder or checkpoint in one (its
    trained weights, as :func:`lightning_cggr.export.load_trained` reads them)."""
    from ..config import ModelConfig
    from ..errors import UserError
    from ..export import is_hf_folder, load_trained
    from ..models import build_model

    name = os.fspath(name)  # a pathlib.Path from Python
    path = Path(name).expanduser()
    if name != "smollm2_gguf" and path.exists() and not is_hf_folder(path) and (
            path.is_file() or (path / "checkpoints").is_dir()):
        try:
            return load_trained(path, dtype)[0]
        except UserError as err:  # named by the setting that asked for it
            raise type(err)(f"cggr.router.reference={name}: {err}") from err
    source = "smollm2_gguf" if name == "smollm2_gguf" else "pretrained"
    model, _ = build_model(ModelConfig(source=source, name=name, dtype=dtype), key="cggr.router.reference")
    return model


class ReferenceModel:
    """Frozen causal LM that yields per-token statistics of its own next-token predictions."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None = None):
        self.logit_transform = checked_logit_transform(model)  # fails early on an unsupported architecture
        model.eval()
        model.requires_grad_(False)
        if dtype is not None:
            model.to(dtype)
        self.model = model  # a plain attribute of a plain object: never registered

    @property
    def vocab_size(self) -> int:
        return find_head(self.model).weight.shape[0]

    @property
    def device(self) -> torch.device:
        return find_head(self.model).weight.device

    def to(self, device: torch.device) -> "ReferenceModel":
        if self.device != torch.device(device):  # host-side comparison of device objects
            self.model.to(device)
        return self

    def token_stats(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        targets: torch.Tensor,
        *,
        impl: str = "torch",
        chunk_size: int | None = None,
    ) -> TokenStats:
        """[B, T]-shaped statistics of the reference's logits against ``targets`` (shifted labels)."""
        self.to(input_ids.device)
        with torch.inference_mode():
            hidden = find_decoder(self.model)(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).last_hidden_state
            B, T, H = hidden.shape
            stats = self.logit_transform.token_stats(hidden.reshape(B * T, H), find_head(self.model),
                                                     targets.reshape(-1), impl=impl, chunk_size=chunk_size)
            return TokenStats(*(s.view(B, T).clone() for s in stats))
