"""Families whose logits are more than ``head(final hidden states)``: the step must train and score the
model's own logits (Gemma 2's soft cap, Cohere's and Granite's scales), and refuse what it cannot."""

from __future__ import annotations

import pytest
import torch

from lightning_cggr.config import CGGRConfig, LossConfig, RouterConfig
from lightning_cggr.routing.reference import ReferenceModel
from lightning_cggr.routing.router import logit_transform
from lightning_cggr.routing.selection import IGNORE_INDEX, shift_targets
from lightning_cggr.step import CGGRStep

V, T = 64, 12
SMALL = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _family(name: str):
    """A tiny random model of the family, its head scaled so the logits reach well past any cap."""
    import transformers

    cls, extra = {
        "gemma2": ("Gemma2", dict(final_logit_softcapping=5.0, head_dim=8)),
        "cohere": ("Cohere", dict(logit_scale=0.5)),
        "granite": ("Granite", dict(logits_scaling=4.0)),
        "llama": ("Llama", {}),
    }[name]
    torch.manual_seed(0)
    config = getattr(transformers, f"{cls}Config")(**SMALL, **extra)
    model = getattr(transformers, f"{cls}ForCausalLM")(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(30.0)  # tied in some families: embeddings grow too
    return model


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, T), generator=g)
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _model_nll(model, batch) -> torch.Tensor:
    """Float64 per-position NLL of the model's own logits (its full forward), 0 where ignored."""
    targets = shift_targets(batch["labels"], None)
    logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits.double(), dim=-1)
    nll = -logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(targets != IGNORE_INDEX, nll, torch.zeros_like(nll)), targets


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_the_transform_is_read_from_the_config(family):
    want = {"gemma2": (1.0, 5.0), "cohere": (0.5, None), "granite": (0.25, None)}[family]
    transform = logit_transform(_family(family))
    assert (transform.scale, transform.softcap, transform.pre) == (*want, None)


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_standard_step_trains_the_models_own_loss(family, impl):
    """Loss and every parameter's gradient equal those of the model's own logits (HF's forward)."""
    model = _family(family)
    model.eval()  # no dropout: both sides see the same function
    _assert_standard_step_is_the_models_own(model, _batch(), impl)


def _assert_standard_step_is_the_models_own(model, batch, impl: str) -> set[str]:
    """The standard step's loss and every parameter's gradient against those of the model's own float64
    loss (its full forward); the names of the parameters that got a gradient. Gradients are cleared."""
    nll, targets = _model_nll(model, batch)
    want = nll.sum() / (targets != IGNORE_INDEX).sum()
    want.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    step = CGGRStep(model, CGGRConfig(enabled=False), LossConfig(impl=impl))
    out = step(batch, global_step=0)
    torch.testing.assert_close(out.nll_sum.double() / out.kept, want.detach(), rtol=1e-5, atol=1e-5)
    (out.nll_sum / out.kept).backward()
    params = dict(model.named_parameters())
    for name, grad in ref_grads.items():
        torch.testing.assert_close(params[name].grad.double(), grad.double(), rtol=1e-3, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")
    model.zero_grad(set_to_none=True)
    return set(ref_grads)


@pytest.mark.parametrize("family", ["gemma2", "cohere", "granite"])
def test_scores_are_the_models_own_statistics(family):
    """Router-free scoring reads the statistics of the model's own logits: its NLL per token."""
    model = _family(family)
    model.eval()
    batch = _batch(2)
    nll, targets = _model_nll(model, batch)
    step = CGGRStep(model, CGGRConfig(router=RouterConfig(source="final"), scoring="loss"))
    with torch.no_grad():
        stats = step.token_statistics(step.hidden_states(batch["input_ids"]), targets)
    torch.testing.assert_close(stats.nll.double(), nll.detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_reference_model_statistics_are_its_own(family):
    model = _family(family)
    batch = _batch(3)
    nll, targets = _model_nll(model.eval(), batch)
    stats = ReferenceModel(model).token_stats(batch["input_ids"], None, targets)
    torch.testing.assert_close(stats.nll.double(), nll.detach(), rtol=1e-4, atol=1e-4)


def test_torch_lce_is_refused_for_a_soft_capped_model():
    with pytest.raises(ValueError, match="loss.impl=torch_lce cannot soft-cap the logits as Gemma2ForCausalLM"):
        CGGRStep(_family("gemma2"), CGGRConfig(), LossConfig(impl="torch_lce"))


def test_an_unknown_transform_after_the_head_is_refused():
    """A family that changes its logits in a way the config does not declare is refused by the probe,
    not trained on a loss that is not its own."""
    from transformers import LlamaForCausalLM

    class Doubled(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = 2.0 * out.logits
            return out

    model = _family("llama")
    odd = Doubled(model.config)
    odd.load_state_dict(model.state_dict())
    with pytest.raises(ValueError, match="Doubled: its logits are not head\\(h\\) of its decoder's final hidden"):
        CGGRStep(odd, CGGRConfig())
    with pytest.raises(ValueError, match="Doubled: its logits are not head"):
        ReferenceModel(odd)
    odd.train()
    CGGRStep(model, CGGRConfig())  # the plain family passes the same probe
    assert odd.training  # the probe restored the mode it found


def _windowed(family: str, window: int):
    import transformers

    extra = {"mistral": dict(sliding_window=window),
             "qwen2": dict(sliding_window=window, use_sliding_window=True, max_window_layers=0)}[family]
    cls = {"mistral": "Mistral", "qwen2": "Qwen2"}[family]
    torch.manual_seed(0)
    model = getattr(transformers, f"{cls}ForCausalLM")(getattr(transformers, f"{cls}Config")(**SMALL, **extra))
    model.set_attn_implementation("sdpa")
    return model.eval()


@pytest.mark.parametrize("window", [4, T - 1, T, 64])
@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_packed_batches_keep_a_sliding_window_shorter_than_the_sequence(family, window):
    """Packed text (no attention_mask) takes the mask-free causal path only where the model's sliding
    window covers the whole sequence; a shorter window keeps transformers' masks, so the step's loss is
    the model's own either way (it was not: a window of 4 over 12 tokens was silently dropped)."""
    from lightning_cggr.models.attention import window_shorter_than

    model = _windowed(family, window)
    batch = _batch(4)
    nll, targets = _model_nll(model, batch)
    want = nll.sum() / (targets != IGNORE_INDEX).sum()
    step = CGGRStep(model, CGGRConfig(enabled=False))
    nll_sum, count = step.eval_terms(batch)
    torch.testing.assert_close((nll_sum / count).double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert window_shorter_than(model.config, T) == (window < T)
    with step.attention_scope(None, T):  # the fast path is kept wherever it is exact
        assert (model.config._attn_implementation == "sdpa") == (window < T)


def test_a_family_whose_attention_needs_the_mask_keeps_transformers_masks():
    """Doge builds its own attention mask from ``attention_mask``; without one (the mask-free path) its
    attention would see future tokens. The construction probe finds that and the step keeps
    transformers' masks for it, while a plain family keeps the fast path."""
    import transformers

    torch.manual_seed(0)
    doge = transformers.DogeForCausalLM(transformers.DogeConfig(**SMALL)).eval()
    batch = _batch(5)
    nll, targets = _model_nll(doge, batch)
    step = CGGRStep(doge, CGGRConfig(enabled=False))
    assert not step._mask_free
    nll_sum, count = step.eval_terms(batch)
    want = nll.sum() / (targets != IGNORE_INDEX).sum()
    torch.testing.assert_close((nll_sum / count).double(), want.detach(), rtol=1e-5, atol=1e-5)
    assert CGGRStep(_family("llama"), CGGRConfig(enabled=False))._mask_free


def test_a_family_that_fails_without_the_mask_keeps_transformers_masks():
    """Falcon checks its implementation's name and sends anything but ``sdpa`` down an eager path that
    needs the mask: packed batches crashed at the first step. The probe sees it and keeps the masks."""
    import transformers

    torch.manual_seed(0)
    config = transformers.FalconConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    falcon = transformers.FalconForCausalLM(config).eval()
    falcon.set_attn_implementation("sdpa")
    batch = _batch(6)
    nll, targets = _model_nll(falcon, batch)
    step = CGGRStep(falcon, CGGRConfig(enabled=False))
    assert not step._mask_free
    nll_sum, count = step.eval_terms(batch)
    torch.testing.assert_close((nll_sum / count).double(), (nll.sum() / (targets != IGNORE_INDEX).sum()).detach(),
                               rtol=1e-5, atol=1e-5)


def _biased_head(family: str):
    """A tiny Phi / GPT-J / CodeGen (their LM heads have a bias), the bias set large so it matters."""
    import transformers

    torch.manual_seed(0)
    if family == "phi":
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL))
    else:
        cls = {"gptj": "GPTJ", "codegen": "CodeGen"}[family]
        config = getattr(transformers, f"{cls}Config")(vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4,
                                                      n_positions=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        model = getattr(transformers, f"{cls}ForCausalLM")(config)
    with torch.no_grad():
        model.get_output_embeddings().bias.normal_(0.0, 3.0)
    return model.eval()


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("family", ["phi", "gptj", "codegen"])
def test_a_head_with_a_bias_trains_the_models_own_loss(family, impl):
    """``logits = h @ W.T + b``: the step's loss and every gradient, the head's bias included, equal
    those of the model's own logits; router-free scores are the model's own NLL; a routed step runs.
    (These families were refused before the kernels took a bias.)"""
    model = _biased_head(family)
    batch = _batch(8)
    assert "lm_head.bias" in _assert_standard_step_is_the_models_own(model, batch, impl)
    nll, targets = _model_nll(model, batch)
    scorer = CGGRStep(model, CGGRConfig(router=RouterConfig(source="final"), scoring="loss"), LossConfig(impl=impl))
    with torch.no_grad():
        stats = scorer.token_statistics(scorer.hidden_states(batch["input_ids"]), targets)
    torch.testing.assert_close(stats.nll.double(), nll.detach(), rtol=1e-4, atol=1e-4)
    routed = CGGRStep(model, CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1)), LossConfig(impl=impl))
    loss = routed(batch, global_step=0).loss
    loss.backward()
    assert torch.isfinite(loss) and model.get_output_embeddings().bias.grad.abs().sum() > 0


def test_a_logit_scale_scales_the_heads_bias_too():
    """``scale * head(h) = (scale h) @ W.T + scale b``: the operands the kernels get, by hand."""
    from lightning_cggr.routing.router import LogitTransform

    torch.manual_seed(0)
    head = torch.nn.Linear(8, 5)
    h = torch.randn(3, 8)
    hs, w, b = LogitTransform(scale=0.25).operands(h, head)
    torch.testing.assert_close(torch.nn.functional.linear(hs, w, b), 0.25 * head(h))
    assert w is head.weight and LogitTransform().operands(h, head) == (h, head.weight, head.bias)


def _head_transform_family(family: str):
    """A tiny BERT-style causal LM: its decoder's final hidden states pass through a head transform
    (dense, activation, norm; ELECTRA's to a narrower width) before the LM head; the head's bias large."""
    import transformers

    torch.manual_seed(0)
    small = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    if family == "modernbert-decoder":
        config = transformers.ModernBertDecoderConfig(**small, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                       cls_token_id=1, sep_token_id=2)
        model = transformers.ModernBertDecoderForCausalLM(config)
    else:
        cls, extra = {"bert": ("Bert", {}), "roberta": ("Roberta", {}),
                      "electra": ("Electra", dict(embedding_size=16))}[family]
        config = getattr(transformers, f"{cls}Config")(**small, **extra, is_decoder=True)
        model = getattr(transformers, f"{cls}ForCausalLM" if cls != "Bert" else "BertLMHeadModel")(config)
    head = model.get_output_embeddings()
    if head.bias is not None:
        with torch.no_grad():
            head.bias.normal_(0.0, 3.0)
    return model.eval()


HEAD_INPUTS = {"bert": "cls.predictions without its decoder", "roberta": "lm_head without its decoder",
               "electra": "generator_predictions", "modernbert-decoder": "lm_head"}


@pytest.mark.parametrize("family", sorted(HEAD_INPUTS))
def test_a_head_transform_between_decoder_and_head_trains_the_models_own_loss(family):
    """BERT-style heads (refused before): the step applies the model's own head transform, found by
    the probe, to the kept rows. Loss and every gradient, the transform's included, equal those of the
    model's own float64 logits; router-free scores are its NLL; a routed step trains the transform."""
    model = _head_transform_family(family)
    step = CGGRStep(model, CGGRConfig(enabled=False))
    assert step.logit_transform.pre.name == HEAD_INPUTS[family]
    transform_params = {id(p) for p in step.logit_transform.pre.parameters()}
    assert transform_params and not transform_params & {id(p) for p in model.get_output_embeddings().parameters()}
    batch = _batch(9)
    graded = _assert_standard_step_is_the_models_own(model, batch, "torch")
    named = dict(model.named_parameters())
    assert transform_params <= {id(named[n]) for n in graded}  # its gradients were among those compared
    nll, targets = _model_nll(model, batch)
    scorer = CGGRStep(model, CGGRConfig(router=RouterConfig(source="final"), scoring="loss"))
    with torch.no_grad():
        stats = scorer.token_statistics(scorer.hidden_states(batch["input_ids"]), targets)
    torch.testing.assert_close(stats.nll.double(), nll.detach(), rtol=1e-4, atol=1e-4)
    routed = CGGRStep(model.train(), CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1)))
    loss = routed(batch, global_step=0).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.abs().sum() > 0
               for p in step.logit_transform.pre.parameters() if p.dim() >= 2)


def test_a_decoder_that_sees_later_tokens_is_refused():
    """A BERT-style model loaded without ``is_decoder=True`` attends both ways: trained on next tokens
    it would read them. The probe refuses it by name, with the fix; the same model as a decoder (the
    only difference) is accepted, and the probe restores the mode it found."""
    import transformers

    small = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    torch.manual_seed(0)
    both_ways = transformers.BertLMHeadModel(transformers.BertConfig(**small)).train()
    with pytest.raises(ValueError, match="BertLMHeadModel: its decoder is not causal: its hidden states at positions "
                                         "0-2 change .* is_decoder=True in the config"):
        CGGRStep(both_ways, CGGRConfig())
    with pytest.raises(ValueError, match="not causal"):
        ReferenceModel(both_ways)
    assert both_ways.training
    causal = transformers.BertLMHeadModel(transformers.BertConfig(**small, is_decoder=True))
    causal.load_state_dict(both_ways.state_dict())
    CGGRStep(causal, CGGRConfig())


def test_a_head_narrower_than_the_decoder_without_a_module_between_is_refused_by_name():
    """A model that maps its hidden states to the head's width in its forward, with no module the
    probe can find: refused with the widths named, not failing inside a matrix product."""
    from transformers import LlamaForCausalLM

    class Sliced(LlamaForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            self.lm_head = torch.nn.Linear(16, config.vocab_size, bias=False)

        def forward(self, input_ids=None, **kwargs):
            from transformers.modeling_outputs import CausalLMOutputWithPast

            h = self.model(input_ids=input_ids, **kwargs).last_hidden_state
            return CausalLMOutputWithPast(logits=self.lm_head(h[..., :16]))

    with pytest.raises(ValueError, match="Sliced: its LM head takes width 16 but its decoder's final hidden "
                                         "states have width 32, and no module between"):
        CGGRStep(Sliced(_family("llama").config), CGGRConfig())


@pytest.mark.parametrize("family", ["opt", "gemma3", "bert-generation"])
def test_router_of_a_decoder_nested_one_level_down(family):
    """OPT keeps its blocks in ``model.decoder.layers``, Gemma 3's multimodal model in
    ``model.language_model.layers``, BERT-style decoders in ``model.encoder.layer``: the router's view
    truncates them there, sharing every weight, and its hidden states are those of the same model cut to
    k blocks by hand."""
    import copy

    import transformers

    from lightning_cggr.routing.router import TruncatedRouter, find_blocks, find_decoder

    torch.manual_seed(0)
    if family == "opt":
        config = transformers.OPTConfig(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=3,
                                        num_attention_heads=4, word_embed_proj_dim=16, pad_token_id=0)
        model, path = transformers.OPTForCausalLM(config).eval(), "decoder.layers"
    elif family == "bert-generation":
        config = transformers.BertGenerationConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3,
                                                   num_attention_heads=4, intermediate_size=64, is_decoder=True)
        model, path = transformers.BertGenerationDecoder(config).eval(), "encoder.layer"
    else:
        text = dict(SMALL, head_dim=8, num_hidden_layers=3, sliding_window=64)
        config = transformers.Gemma3Config(text_config=text, vision_config=dict(hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))
        model, path = transformers.Gemma3ForConditionalGeneration(config).eval(), "language_model.layers"
    decoder = find_decoder(model)
    name, blocks = find_blocks(decoder)
    assert name == path and len(blocks) == 3
    router = TruncatedRouter(model, 2)
    ids = _batch(7)["input_ids"]
    with torch.no_grad():
        got = router.hidden_states(ids)
        cut = copy.deepcopy(model)
        inner = find_decoder(cut)
        for part in path.split(".")[:-1]:
            inner = getattr(inner, part)
        last = path.split(".")[-1]
        setattr(inner, last, getattr(inner, last)[:2])
        for cfg in {id(c): c for c in [cut.config, cut.config.get_text_config(), inner.config]}.values():
            cfg.num_hidden_layers = 2
        want = find_decoder(cut)(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [id(b) for b in router.blocks] == [id(b) for b in list(blocks)[:2]]  # the model's own blocks
    assert len(find_blocks(find_decoder(model))[1]) == 3  # the model is untouched


def _per_layer_inputs_family(family: str):
    """A tiny Gemma 4 / Gemma 3n text model: per-layer input embeddings (one slice per block, the table
    shaped by the depth), a sliding window of 4, Gemma 3n's KV sharing and sparsity on the first block."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  max_position_embeddings=64, sliding_window=4, vocab_size_per_layer_input=V,
                  hidden_size_per_layer_input=8)
    if family == "gemma4":
        config = transformers.Gemma4TextConfig(**common, intermediate_size=64, num_hidden_layers=6,
                                               layer_types=["sliding_attention"] * 5 + ["full_attention"])
        return transformers.Gemma4ForCausalLM(config).eval()
    config = transformers.Gemma3nTextConfig(**common, intermediate_size=[64] * 4, num_hidden_layers=4,
                                            layer_types=["sliding_attention", "full_attention"] * 2,
                                            num_kv_shared_layers=2, laurel_rank=4,
                                            activation_sparsity_pattern=[0.95, 0.0, 0.0, 0.0])
    return transformers.Gemma3nForCausalLM(config).eval()


@pytest.mark.parametrize("family", ["gemma4", "gemma3n"])
def test_per_layer_input_families_train_their_own_loss_and_route(family):
    """Gemma 4 and Gemma 3n reshape their per-layer inputs by the config's depth: the router's view, which
    set that depth to k, crashed at the first routed step. The view now keeps it, and Gemma 4's router
    states are the model's own after k blocks (its ``output_hidden_states``, final norm applied)."""
    from lightning_cggr.routing.router import TruncatedRouter, find_decoder

    model = _per_layer_inputs_family(family)
    batch = _batch(9)
    nll, targets = _model_nll(model, batch)
    nll_sum, count = CGGRStep(model, CGGRConfig(enabled=False)).eval_terms(batch)
    torch.testing.assert_close((nll_sum / count).double(), (nll.sum() / (targets != IGNORE_INDEX).sum()).detach(),
                               rtol=1e-5, atol=1e-5)
    loss = CGGRStep(model, CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=2)))(batch, global_step=0).loss
    loss.backward()
    assert torch.isfinite(loss)
    if family == "gemma4":
        decoder = find_decoder(model)
        with torch.no_grad():
            states = decoder(input_ids=batch["input_ids"], output_hidden_states=True, use_cache=False).hidden_states
            for k in (1, 2, 5):
                torch.testing.assert_close(TruncatedRouter(model, k).hidden_states(batch["input_ids"]),
                                           decoder.norm(states[k]), rtol=1e-5, atol=1e-5)
