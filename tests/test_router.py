"""The truncated router shares every weight with the model and computes what a k-layer model computes."""

from __future__ import annotations

import io

import pytest
import torch

from conftest import make_batch, make_tiny_model
from lightning_cggr.config import CGGRConfig, RouterConfig
from lightning_cggr.module import CGGRModule
from lightning_cggr.routing.router import TruncatedRouter


def _reference_k_layer_model(model, arch: str, k: int):
    """An independent k-layer model of the same family, loaded with the big model's first k blocks."""
    ref = make_tiny_model(arch, num_layers=k, seed=123)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not missing  # every weight of the small model comes from the big one
    assert unexpected and all(any(f".{i}." in key for i in range(k, 3)) for key in unexpected)
    return ref.eval()


@pytest.mark.parametrize("k", [1, 2])
def test_router_equals_truncated_model(arch, k):
    model = make_tiny_model(arch, num_layers=3)
    model.train()  # the router must score without dropout even while the model trains
    router = TruncatedRouter(model, k)
    batch = make_batch()
    got = router.hidden_states(batch["input_ids"], batch["attention_mask"])
    ref = _reference_k_layer_model(model, arch, k)
    want = ref.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)
    assert all(m.training for m in model.modules()), "router must restore the model's train mode"


def test_router_shares_storage_and_adds_no_parameters(arch):
    model = make_tiny_model(arch, num_layers=3)
    router = TruncatedRouter(model, 2)
    decoder_blocks = list(model.base_model._modules[router.block_attr])
    for mine, theirs in zip(router.blocks, decoder_blocks[:2]):
        assert mine is theirs
        for p, q in zip(mine.parameters(), theirs.parameters()):
            assert p.data_ptr() == q.data_ptr()
    assert len(router.blocks) == 2
    assert router.head.weight.data_ptr() == model.get_output_embeddings().weight.data_ptr()

    module = CGGRModule(model, CGGRConfig(router=RouterConfig(num_layers=2)))
    n_module = sum(p.numel() for p in module.parameters())
    n_model = sum(p.numel() for p in model.parameters())
    assert n_module == n_model
    assert set(module.state_dict()) == {f"model.{k}" for k in model.state_dict()}

    def nbytes(sd):
        buf = io.BytesIO()
        torch.save(sd, buf)
        return buf.tell()

    # the checkpoint is the base model's alone (the prefix adds a few bytes per key)
    assert nbytes(module.state_dict()) <= nbytes(model.state_dict()) + 64 * len(model.state_dict())


def test_router_follows_in_place_weight_updates():
    model = make_tiny_model("llama")
    router = TruncatedRouter(model, 1)
    batch = make_batch()
    before = router.hidden_states(batch["input_ids"]).clone()
    with torch.no_grad():
        model.base_model.layers[0].mlp.down_proj.weight.mul_(2.0)
    after = router.hidden_states(batch["input_ids"])
    assert not torch.allclose(before, after)


@pytest.mark.parametrize("k", [0, 4, -1, 2.5, True])
def test_router_rejects_layer_count_outside_range(k):
    model = make_tiny_model("llama", num_layers=3)
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        TruncatedRouter(model, k)


def test_router_rejects_unknown_architecture():
    class NoBlocks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        @property
        def base_model(self):
            return self.inner

    with pytest.raises(ValueError, match="layers or h or blocks"):
        TruncatedRouter(NoBlocks(), 1)
