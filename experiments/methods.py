"""The methods every benchmark compares: each one a list of Hydra overrides on the same base config.

``{fused}`` stands for the device's fused loss (the same kernel for the fair baseline and for
CGGR), so a ratio measures routing, not a different loss implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Method:
    label: str
    """Human-readable name used in tables and plots."""
    kind: str
    """baseline | cggr | control"""
    overrides: tuple[str, ...]
    """Hydra overrides; ``{fused}`` is replaced by the device's fused loss impl."""


METHODS: dict[str, Method] = {
    "standard_naive": Method("standard, naive loss", "baseline", ("cggr.enabled=false", "loss.impl=naive")),
    "standard_fused": Method("standard, fused loss", "baseline", ("cggr.enabled=false", "loss.impl={fused}")),
    "cggr_entropy": Method("CGGR token, router, entropy", "cggr", ("cggr.scoring=entropy", "loss.impl={fused}")),
    "cggr_margin": Method("CGGR token, router, margin", "cggr", ("cggr.scoring=margin", "loss.impl={fused}")),
    "cggr_loss": Method("CGGR token, router, loss", "cggr", ("cggr.scoring=loss", "loss.impl={fused}")),
    "cggr_combined": Method("CGGR token, router, combined", "cggr", ("cggr.scoring=combined", "loss.impl={fused}")),
    "random_token": Method("random-token control", "control", ("cggr.scoring=random", "loss.impl={fused}")),
    "cggr_sequence": Method(
        "CGGR sequence, router, combined", "cggr",
        ("cggr.selection.unit=sequence", "cggr.scoring=combined", "loss.impl={fused}"),
    ),
    "random_sequence": Method(
        "random-sequence control", "control",
        ("cggr.selection.unit=sequence", "cggr.scoring=random", "loss.impl={fused}"),
    ),
    "cggr_final": Method(
        "CGGR token, router-free (final), combined", "cggr",
        ("cggr.router.source=final", "cggr.scoring=combined", "loss.impl={fused}"),
    ),
}
BASELINE = "standard_fused"
"""The fair baseline every ratio is taken against (same fused loss kernel as CGGR)."""


def fused_impl(device: str) -> str:
    """The fused loss the fair baseline and CGGR use on ``device``: chunked torch on CPU, Triton on CUDA."""
    return "triton" if device.startswith("cuda") else "torch"


def method_overrides(name: str, device: str) -> list[str]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return [o.replace("{fused}", fused_impl(device)) for o in METHODS[name].overrides]


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] or 'all' -> validated method names, order kept."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if names == ["all"]:
        return list(METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from all, {', '.join(METHODS)}")
    return names


def describe(names: Sequence[str], resolved: dict[str, dict]) -> dict[str, dict]:
    """The ``methods`` block of a results file: label, kind, overrides and resolved config per method."""
    return {m: {"label": METHODS[m].label, "kind": METHODS[m].kind, **resolved[m]} for m in names}
