"""The routing path never synchronizes with the device: no .item()/.tolist()/.cpu()/bool(tensor),
no boolean-mask indexing or nonzero (data-dependent shapes). Checked on CPU by making those calls
raise while the module's own routing code runs (the decoder is replaced by precomputed states, so
only this package's code is under test)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import kept_mean_loss, make_batch, make_tiny_model
from lightning_cggr.config import CGGRConfig, RatioScheduleConfig, RouterConfig, SelectionConfig
from lightning_cggr.step import CGGRStep
from lightning_cggr.routing.selection import shift_targets

pytestmark = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


class HostSync(AssertionError):
    """Raised by a patched tensor method: the routed step asked the device for a host value."""


@contextlib.contextmanager
def forbid_host_sync():
    with pytest.MonkeyPatch.context() as mp:
        yield _forbid(mp)


def _forbid(monkeypatch):
    def boom(name):
        def f(*args, **kwargs):
            raise HostSync(f"host sync: Tensor.{name}")

        return f

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, boom(name))
    monkeypatch.setattr(torch, "nonzero", boom("nonzero"))
    monkeypatch.setattr(torch, "masked_select", boom("masked_select"))
    getitem = torch.Tensor.__getitem__

    def checked_getitem(self, idx):
        parts = idx if isinstance(idx, tuple) else (idx,)
        if any(torch.is_tensor(p) and p.dtype == torch.bool for p in parts):
            raise HostSync("host sync: boolean-mask indexing (data-dependent shape)")
        return getitem(self, idx)

    monkeypatch.setattr(torch.Tensor, "__getitem__", checked_getitem)


CASES = {
    "token": {},
    "batch_min": dict(selection=SelectionConfig(scope="batch", min_per_sequence=2)),
    "stratified": dict(selection=SelectionConfig(strategy="stratified", strata=3)),
    "stratified_batch": dict(selection=SelectionConfig(scope="batch", strategy="stratified", min_per_sequence=1)),
    "dynamic": dict(ratio_schedule=RatioScheduleConfig(kind="dynamic", min=0.2, max=0.6)),
    "curriculum": dict(ratio_schedule=RatioScheduleConfig(kind="curriculum", steps=4)),
    "self_scoring": dict(router=RouterConfig(num_layers=1, source="final")),
    "random": dict(scoring="random"),
    "sequence": dict(selection=SelectionConfig(unit="sequence")),
    "sequence_dynamic": dict(selection=SelectionConfig(unit="sequence"),
                             ratio_schedule=RatioScheduleConfig(kind="dynamic", min=0.2, max=0.6)),
    "random_sequence": dict(scoring="random", selection=SelectionConfig(unit="sequence")),
    "excess_loss": dict(scoring="excess_loss", router=RouterConfig(num_layers=1, reference="given", reference_dtype="float32")),
    "importance": dict(selection=SelectionConfig(strategy="importance")),
    "importance_batch_relu": dict(selection=SelectionConfig(strategy="importance", scope="batch", importance_transform="relu")),
    "importance_dynamic": dict(selection=SelectionConfig(strategy="importance", p_min=0.1),
                               ratio_schedule=RatioScheduleConfig(kind="dynamic", min=0.2, max=0.6)),
    "importance_curriculum": dict(selection=SelectionConfig(strategy="importance"),
                                  ratio_schedule=RatioScheduleConfig(kind="curriculum", steps=4)),
    "importance_sequence": dict(selection=SelectionConfig(unit="sequence", strategy="importance", p_min=0.1)),
    "importance_sequence_dynamic": dict(selection=SelectionConfig(unit="sequence", strategy="importance", p_min=0.1),
                                        ratio_schedule=RatioScheduleConfig(kind="dynamic", min=0.2, max=0.6)),
    "infobatch": dict(selection=SelectionConfig(strategy="infobatch")),
    "infobatch_batch": dict(selection=SelectionConfig(strategy="infobatch", scope="batch")),
    "infobatch_sequence": dict(selection=SelectionConfig(unit="sequence", strategy="infobatch")),
    "infobatch_random": dict(scoring="random", selection=SelectionConfig(strategy="infobatch")),
    "noise_excluded": dict(selection=SelectionConfig(strategy="noise_excluded", noise_fraction=0.1)),
    "noise_excluded_dynamic": dict(selection=SelectionConfig(strategy="noise_excluded", noise_fraction=0.1),
                                   ratio_schedule=RatioScheduleConfig(kind="dynamic", min=0.2, max=0.6)),
    "noise_excluded_sequence": dict(selection=SelectionConfig(unit="sequence", strategy="noise_excluded", noise_fraction=0.3)),
    "rho_loss": dict(scoring="excess_loss", selection=SelectionConfig(strategy="noise_excluded"),
                     router=RouterConfig(num_layers=1, reference="given", reference_dtype="float32")),
    "self_scoring_importance": dict(router=RouterConfig(num_layers=1, source="final"),
                                    selection=SelectionConfig(strategy="importance")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_route_has_no_host_sync(monkeypatch, case):
    kwargs = dict(scoring="entropy", min_tokens_ratio=0.3, warmup_steps=0, router=RouterConfig(num_layers=1))
    kwargs.update(CASES[case])
    if kwargs.get("ratio_schedule") is not None and kwargs["ratio_schedule"].kind == "dynamic":
        del kwargs["min_tokens_ratio"]  # not read under a dynamic ratio (refused when set)
    model = make_tiny_model("llama", num_layers=2)
    reference = make_tiny_model("llama", num_layers=1, seed=3) if kwargs["scoring"] == "excess_loss" else None
    module = CGGRStep(model, CGGRConfig(**kwargs), reference=reference, total_steps=10)
    batch = make_batch(batch_size=3, seq_len=12)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    targets = shift_targets(batch["labels"], mask)

    # precompute every model forward outside the guard; inside, the routing code alone runs
    with torch.no_grad():
        states = {}
        if module.router is not None:
            router_h = module.router.hidden_states(ids, mask)
            monkeypatch.setattr(module.router, "hidden_states", lambda i, m=None: router_h)
        if module.reference is not None:
            ref_stats = module.reference.token_stats(ids, mask, targets)
            monkeypatch.setattr(module.reference, "token_stats", lambda *a, **k: ref_stats)
        for rows in (3, 2, 1):
            states[rows] = module.hidden_states(ids[:rows], mask[:rows])
    monkeypatch.setattr(module, "hidden_states", lambda i, m=None: states[i.shape[0]].clone().requires_grad_())

    with forbid_host_sync():
        routed = module.route(ids, mask, targets)
        hidden, sub_targets, selection, kept = routed[:4]
        if routed.weight is None:
            loss = kept_mean_loss(module, hidden, sub_targets, selection)
        else:  # the weighted rules: weighted NLL sum over the rule's normaliser
            nll, _ = module.loss_terms(hidden, sub_targets, selection, routed.weight)
            loss = nll / routed.normaliser.clamp(min=1)
        metrics = {k: v for k, v in routed.metrics.items()}
    assert torch.isfinite(loss)
    assert not (kept & (targets == -100)).any()
    assert all(torch.is_tensor(v) and v.dim() == 0 for v in metrics.values())


def test_the_guard_catches_a_sync():
    with pytest.raises(HostSync), forbid_host_sync():
        torch.ones(3).sum().item()
    with pytest.raises(HostSync), forbid_host_sync():
        torch.arange(4)[torch.arange(4) > 1]
