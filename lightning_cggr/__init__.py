"""lightning_cggr: Confidence-Gated Gradient Routing for causal LM training with PyTorch Lightning.

The names a Python user needs, importable from the package itself::

    from lightning_cggr import CGGRModule, CGGRConfig
    module = CGGRModule(hf_causal_lm, CGGRConfig(min_tokens_ratio=0.25))   # then lightning.Trainer().fit(module, loader)

They are loaded on first use, so ``import lightning_cggr`` (and ``python -m lightning_cggr.train``'s
start) stays as light as the submodule asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CGGRModule": "lightning_cggr.module",
    "CGGRStep": "lightning_cggr.step",
    "CGGRConfig": "lightning_cggr.config",
    "RouterConfig": "lightning_cggr.config",
    "SelectionConfig": "lightning_cggr.config",
    "LossConfig": "lightning_cggr.config",
    "OptimConfig": "lightning_cggr.config",
    "PerfConfig": "lightning_cggr.config",
    "RatioScheduleConfig": "lightning_cggr.config",
    "ConfigError": "lightning_cggr.errors",
    "linear_cross_entropy": "lightning_cggr.kernels",
    "token_stats": "lightning_cggr.kernels",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_cggr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from lightning_cggr.config import (CGGRConfig, LossConfig, OptimConfig, PerfConfig, RatioScheduleConfig,
                                       RouterConfig, SelectionConfig)
    from lightning_cggr.errors import ConfigError
    from lightning_cggr.kernels import linear_cross_entropy, token_stats
    from lightning_cggr.module import CGGRModule
    from lightning_cggr.step import CGGRStep
