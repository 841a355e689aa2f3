"""lightning_cggr: Confidence-Gated Gradient Routing for causal LM training with PyTorch Lightning."""

__version__ = "0.1.0"
