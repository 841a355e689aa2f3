"""The methods every benchmark compares: each one a list of Hydra overrides on the same base config.

``{fused}`` stands for the device's fused loss (the same kernel for the fair baseline and for
CGGR), so a ratio measures routing, not a different loss implementation. ``{reference}`` stands for
the excess-loss reference folder (``--reference``; built by ``python -m lightning_cggr.routing.holdout``).

Every routing method names its ``control``: random selection of the same size (same unit, same
count or, for InfoBatch, the same expected pruning), the comparison a rule must win to earn its place.
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
    """Hydra overrides; ``{fused}`` is replaced by the device's fused loss impl, ``{reference}`` by
    the reference model folder."""
    control: str | None = None
    """kind=cggr: the random control of the same size (a method name)."""


_IMPORTANCE = ("cggr.selection.strategy=importance", "cggr.scoring=loss", "cggr.selection.importance_transform=relu")
_INFOBATCH = ("cggr.selection.strategy=infobatch",)
_RHO = ("cggr.scoring=excess_loss", "cggr.selection.strategy=noise_excluded", "cggr.router.reference={reference}",
        "cggr.router.reference_dtype=float32")
_SEQ = ("cggr.selection.unit=sequence",)

METHODS: dict[str, Method] = {
    "standard_naive": Method("standard, naive loss", "baseline", ("cggr.enabled=false", "loss.impl=naive")),
    "standard_fused": Method("standard, fused loss", "baseline", ("cggr.enabled=false", "loss.impl={fused}")),
    "cggr_entropy": Method("CGGR token, router, entropy", "cggr", ("cggr.scoring=entropy", "loss.impl={fused}"),
                           "random_token"),
    "cggr_margin": Method("CGGR token, router, margin", "cggr", ("cggr.scoring=margin", "loss.impl={fused}"),
                          "random_token"),
    "cggr_loss": Method("CGGR token, router, loss", "cggr", ("cggr.scoring=loss", "loss.impl={fused}"), "random_token"),
    "cggr_combined": Method("CGGR token, router, combined", "cggr", ("cggr.scoring=combined", "loss.impl={fused}"),
                            "random_token"),
    "random_token": Method("random-token control", "control", ("cggr.scoring=random", "loss.impl={fused}")),
    "cggr_sequence": Method(
        "CGGR sequence, router, combined", "cggr",
        ("cggr.selection.unit=sequence", "cggr.scoring=combined", "loss.impl={fused}"), "random_sequence",
    ),
    "cggr_sequence_stride4": Method(
        "CGGR sequence, router, combined, every 4th token scored", "cggr",
        ("cggr.selection.unit=sequence", "cggr.scoring=combined", "cggr.router.score_stride=4", "loss.impl={fused}"),
        "random_sequence",
    ),
    "random_sequence": Method(
        "random-sequence control", "control",
        ("cggr.selection.unit=sequence", "cggr.scoring=random", "loss.impl={fused}"),
    ),
    "cggr_final": Method(
        "CGGR token, router-free (final), combined", "cggr",
        ("cggr.router.source=final", "cggr.scoring=combined", "loss.impl={fused}"), "random_token",
    ),
    # the weighted rules of issue 14 (lightning_cggr/routing/sampling.py, importance.py)
    "importance_token": Method("importance-sampled token, router loss, 1/p", "cggr",
                               (*_IMPORTANCE, "loss.impl={fused}"), "random_token"),
    "importance_sequence": Method("importance-sampled sequence, router loss, 1/p", "cggr",
                                  (*_SEQ, *_IMPORTANCE, "loss.impl={fused}"), "random_sequence"),
    "infobatch_token": Method("InfoBatch token, router loss", "cggr",
                              (*_INFOBATCH, "cggr.scoring=loss", "loss.impl={fused}"), "infobatch_random_token"),
    "infobatch_random_token": Method("InfoBatch token, random scores (control)", "control",
                                     (*_INFOBATCH, "cggr.scoring=random", "loss.impl={fused}")),
    "infobatch_sequence": Method("InfoBatch sequence, router loss", "cggr",
                                 (*_SEQ, *_INFOBATCH, "cggr.scoring=loss", "loss.impl={fused}"),
                                 "infobatch_random_sequence"),
    "infobatch_random_sequence": Method("InfoBatch sequence, random scores (control)", "control",
                                        (*_SEQ, *_INFOBATCH, "cggr.scoring=random", "loss.impl={fused}")),
    "noise_token": Method("CGGR token, router loss, top 5% excluded", "cggr",
                          ("cggr.scoring=loss", "cggr.selection.strategy=noise_excluded", "loss.impl={fused}"),
                          "random_token"),
    "rho_token": Method("RHO-LOSS token: excess loss vs holdout reference, top 5% excluded", "cggr",
                        (*_RHO, "loss.impl={fused}"), "random_token"),
    "rho_sequence": Method("RHO-LOSS sequence: excess loss vs holdout reference, top 5% excluded", "cggr",
                           (*_SEQ, *_RHO, "loss.impl={fused}"), "random_sequence"),
}
NEEDS_REFERENCE = tuple(m for m, meta in METHODS.items() if any("{reference}" in o for o in meta.overrides))
"""Methods that need ``--reference`` (the holdout-trained reference model)."""
BASELINE = "standard_fused"
"""The fair baseline every ratio is taken against (same fused loss kernel as CGGR)."""


def fused_impl(device: str) -> str:
    """The fused loss the fair baseline and CGGR use on ``device``: chunked torch on CPU, Triton on CUDA."""
    return "triton" if device.startswith("cuda") else "torch"


def method_overrides(name: str, device: str, reference: str | None = None) -> list[str]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name in NEEDS_REFERENCE and not reference:
        raise ValueError(f"method {name} needs a reference model: pass --reference DIR (build one with "
                         "python -m lightning_cggr.routing.holdout --out DIR ...)")
    return [o.replace("{fused}", fused_impl(device)).replace("{reference}", str(reference))
            for o in METHODS[name].overrides]


def parse_methods(text: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b'] or 'all' or 'no_reference' (every method that runs without ``--reference``)
    -> validated method names, order kept."""
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    if names == ["all"]:
        return list(METHODS)
    if names == ["no_reference"]:
        return [m for m in METHODS if m not in NEEDS_REFERENCE]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise SystemExit(f"error: unknown method(s) {', '.join(unknown)}; choose from all, no_reference, {', '.join(METHODS)}")
    return names


def describe(names: Sequence[str], resolved: dict[str, dict]) -> dict[str, dict]:
    """The ``methods`` block of a results file: label, kind, overrides and resolved config per method."""
    return {m: {"label": METHODS[m].label, "kind": METHODS[m].kind, "control": METHODS[m].control, **resolved[m]}
            for m in names}
