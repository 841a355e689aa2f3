"""Which Hugging Face causal-LM families the step trains correctly, checked one by one on the CPU.

For every model type in transformers' causal-LM auto mapping: build a tiny random model from the
family's default config shrunk to a few blocks (the harness's own guess of the size keys; where that
fails the family is "not built", which says nothing about the product), then

- ``CGGRStep`` with CGGR off: accepted, or refused (the step's own error, first line);
- if accepted, the step's held-out NLL on a packed batch (3 x 12 tokens, no attention mask) against a
  float64 NLL of the model's own logits from its full forward (``model(input_ids).logits``); a
  sliding window, where the config has one, is set to 4 tokens so that it binds;
- a routed step (token CGGR, 1-block router, no warm-up): forward and backward run, finite loss;
- the router's hidden states (its view of the first block, final norm) against the model's own: its
  decoder's ``output_hidden_states`` after that block with the decoder's final norm applied ("same as
  the model's states"); where the family's states follow another convention (Mamba records them
  differently, hyper-connection and AltUp models keep several streams) or it has no final norm by a
  known name, against the decoder deep-copied and cut to one block by hand ("same as a hand cut");
- the FLOP formula behind MFU (:mod:`lightning_cggr.flops`) against ``torch.utils.flop_counter``'s count
  of one training forward+backward with eager attention and eager experts: "exact", or the formula's
  ratio to the count (state-space and linear-attention scans are not in the formula), or why there is
  no formula for the family.

A family "accepted but different" would be a silent error: the step training a loss that is not the
model's. Run (about 5-10 minutes; a memory cap keeps a family with huge defaults from stopping it):

    ulimit -v 12000000; python -m experiments.model_families

Results: ``experiments/results/model_families-cpu.{md,json}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
import warnings
from pathlib import Path

import torch

SHRINK = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
              head_dim=8, ffn_dim=64, n_inner=64, num_layers=2, num_heads=4, d_model=32, moe_intermediate_size=32,
              num_experts=4, num_local_experts=4, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1,
              eos_token_id=2, qk_rope_head_dim=8, qk_nope_head_dim=8, qk_head_dim=16, v_head_dim=8, kv_lora_rank=16,
              q_lora_rank=16, n_routed_experts=4, n_group=1, topk_group=1, first_k_dense_replace=1,
              mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4, shared_intermediate_size=32,
              n_layers=2, n_heads=4, n_shared_experts=1,
              axial_pos_shape=(3, 4), axial_pos_embds_dim=(16, 16))  # Reformer: factors of T, parts of the width
T = 12


LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
WIDTH_ONLY = {k: v for k, v in SHRINK.items() if k not in LAYER_KEYS}
DEPTH_ONLY = {k: SHRINK[k] for k in ("vocab_size", "num_hidden_layers", "n_layer", "num_layers", "pad_token_id",
                                     "bos_token_id", "eos_token_id")}
MAX_PARAMS = 600_000_000


def _per_layer_to_depth(config, old: int | None) -> None:
    """After the depth changed from ``old``: cut every per-layer list (one entry per block: layer types,
    per-layer widths, sparsity patterns) to the new depth, drop per-layer overrides of blocks beyond it
    (Gemma 4's ``per_layer_config``) and keep fewer KV-sharing blocks than blocks (Gemma 3n)."""
    new = next((getattr(config, k) for k in LAYER_KEYS if isinstance(getattr(config, k, None), int)), None)
    if old is None or new is None or new == old:
        return
    for key, value in list(vars(config).items()):
        try:
            if isinstance(value, list) and len(value) == old:
                setattr(config, key, value[:new])
            elif key == "per_layer_config" and isinstance(value, dict):
                setattr(config, key, {k: v for k, v in value.items() if str(k).isdigit() and int(k) < new})
            elif key == "num_kv_shared_layers" and isinstance(value, int) and value >= new:
                setattr(config, key, new // 2)
        except Exception:  # a validated attribute: left as it is
            pass


def _tiny(model_type: str):
    """The family's default config shrunk by :data:`SHRINK`; where that does not build (the family ties
    sizes together in ways one dict cannot know), at its default depth (:data:`WIDTH_ONLY`: per-layer
    lists stay valid), then at its default width (:data:`DEPTH_ONLY`), each if it stays under
    :data:`MAX_PARAMS` (counted on the meta device first)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    first = None
    for keys in (SHRINK, WIDTH_ONLY, DEPTH_ONLY):
        config = AutoConfig.for_model(model_type)
        targets = [config] + [c for c in [config.get_text_config()] if c is not config]  # composite configs
        for target in targets:
            depth = next((getattr(target, k) for k in LAYER_KEYS if isinstance(getattr(target, k, None), int)), None)
            for key, value in keys.items():
                try:
                    if hasattr(target, key):
                        setattr(target, key, value)
                except Exception:  # a derived property, a validated value, a per-layer attribute
                    pass
            target.is_decoder = True  # as a causal LM is loaded: BERT-style families attend both ways without it
            if isinstance(getattr(target, "sliding_window", None), int):
                target.sliding_window = 4
            _per_layer_to_depth(target, depth)
        try:
            with torch.device("meta"):
                count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
            if count > MAX_PARAMS:
                raise ValueError(f"{count / 1e6:.0f}M parameters at depth 2 (over the harness's cap)")
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(config).eval()
            vocab = model.get_input_embeddings().weight.shape[0]
            ids = torch.randint(3, min(vocab, SHRINK["vocab_size"]), (3, T), generator=torch.Generator().manual_seed(1))
            with torch.no_grad():
                logits = model(input_ids=ids, use_cache=False).logits.double()
            return model, ids, logits
        except Exception as err:
            first = first or err
    raise first


FINAL_NORM_NAMES = ("norm", "ln_f", "final_layernorm", "norm_f", "final_layer_norm", "final_norm", "ln_final")


@torch.no_grad()
def router_states(model, ids) -> str:
    """How the 1-block router's hidden states compare with the model's own (see the module docstring)."""
    import copy

    from lightning_cggr.routing.router import (LAYER_COUNT_NAMES, PER_LAYER_INPUT_NAMES, TruncatedRouter, block_owner,
                                               find_blocks, find_decoder)

    model.eval()
    decoder = find_decoder(model)
    path, blocks = find_blocks(decoder)
    got = TruncatedRouter(model, 1).hidden_states(ids)

    def close(want):
        return got.shape == want.shape and float((got - want).abs().max()) <= 1e-4 * (1 + float(want.abs().max()))

    owner = block_owner(decoder)
    norm = next((owner._modules[n] for n in FINAL_NORM_NAMES if owner._modules.get(n) is not None), None)
    states = decoder(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states
    if norm is not None and states is not None and len(states) == len(blocks) + 1 and close(norm(states[1])):
        return "same as the model's states"
    cut = copy.deepcopy(decoder)
    inner = block_owner(cut)
    inner._modules[path.split(".")[-1]] = inner._modules[path.split(".")[-1]][:1]
    for config in {id(c): c for c in (cut.config, getattr(inner, "config", cut.config))}.values():
        if not any(getattr(config, n, None) for n in PER_LAYER_INPUT_NAMES):  # as the view does
            name = next((n for n in LAYER_COUNT_NAMES if hasattr(config, n)), None)
            if name is not None:
                setattr(config, name, 1)
    if close(cut(input_ids=ids, use_cache=False).last_hidden_state):
        return "same as a hand cut"
    return "DIFFERENT"


def flops_check(model, ids) -> str:
    """The formula's model FLOPs over the counter's, for one training pass (see the module docstring)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lightning_cggr.flops import FlopShape, train_flops
    from lightning_cggr.models.attention import set_attn_implementation
    from lightning_cggr.routing.router import checked_logit_transform, find_decoder, find_head

    transform = checked_logit_transform(model)
    try:
        shape = FlopShape.of(model, transform)
    except ValueError as err:
        return f"no formula: {str(err)[:80]}"
    pre = transform.pre  # a head transform between decoder and head (BERT-style)
    for module in model.modules():  # grouped expert matmuls are invisible to the counter
        config = module.__dict__.get("config")
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"
    set_attn_implementation(model, "eager")  # the counter counts the full square, as causal=False does
    model.zero_grad(set_to_none=True)
    with FlopCounterMode(display=False) as counter:
        hidden = find_decoder(model)(input_ids=ids, use_cache=False).last_hidden_state
        find_head(model)(hidden if pre is None else pre(hidden)).float().square().mean().backward()
    counted = counter.get_total_flops()
    ratio = train_flops(shape, *ids.shape, causal=False) / counted if counted else float("nan")
    return "exact" if abs(ratio - 1.0) < 1e-6 else f"{ratio:.3f}"


def check(model_type: str) -> dict:
    from lightning_cggr.config import CGGRConfig, RouterConfig
    from lightning_cggr.routing.selection import IGNORE_INDEX, shift_targets
    from lightning_cggr.step import CGGRStep

    row = {"family": model_type}
    try:
        model, ids, logits = _tiny(model_type)
        row["class"] = type(model).__name__
    except Exception as err:  # the harness's tiny config does not fit this family
        return {**row, "verdict": "not built", "detail": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    batch = {"input_ids": ids, "labels": ids.clone()}
    try:
        step = CGGRStep(model, CGGRConfig(enabled=False))
    except Exception as err:
        return {**row, "verdict": "refused", "detail": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
    targets = shift_targets(batch["labels"], None)
    logp = torch.log_softmax(logits, dim=-1)
    want = float(-logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)[targets != IGNORE_INDEX].mean())
    nll_sum, count = step.eval_terms(batch)
    got = float(nll_sum / count)
    row.update(model_nll=want, step_nll=got, abs_diff=abs(got - want))
    equal = abs(got - want) <= 1e-4 * max(1.0, abs(want))
    model.train()
    try:
        routed = CGGRStep(model, CGGRConfig(warmup_steps=0, router=RouterConfig(num_layers=1)))
    except ValueError as err:  # the step's own refusal: standard training only
        verdict = "same loss, router refused" if equal else "DIFFERENT LOSS"
        return {**row, "verdict": verdict, "detail": f"ValueError: {str(err).splitlines()[0][:160]}"}
    try:
        out = routed(batch, global_step=0)
        out.loss.backward()
        row["routed_loss_finite"] = bool(torch.isfinite(out.loss))
        row["router_states"] = router_states(model, ids)
    except Exception as err:
        row["routed_loss_finite"] = False
        row["detail"] = f"routed step: {type(err).__name__}: {str(err).splitlines()[0][:160]}"
    try:
        row["flops"] = flops_check(model, ids)
    except Exception as err:  # the family's own limits (an implementation it refuses): not counted
        row["flops"] = f"not counted: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
    row["verdict"] = "same loss" if equal and row["routed_loss_finite"] else (
        "DIFFERENT LOSS" if not equal else "routed step failed")
    if row.get("router_states") == "DIFFERENT":
        row["verdict"] = "router states differ"
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.model_families", description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", help="model types (default: every causal-LM family)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    transformers.logging.set_verbosity_error()
    families = args.families or sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    if unknown := [name for name in families if name not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES]:
        import difflib

        hints = {name: difflib.get_close_matches(name, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, n=3) for name in unknown}
        parser.error("not a causal-LM model type of this transformers: " + "; ".join(
            f"{name}" + (f" (did you mean {', '.join(close)}?)" if close else "") for name, close in hints.items()))
    start = time.time()
    rows = []
    for name in families:
        row = check(name)
        rows.append(row)
        gc.collect()  # each family's models and copies go before the next is built (the memory cap)
        print(f"{name:28s} {row['verdict']:16s} {row.get('detail', '')[:110]}", flush=True)
    counts, states, flop_counts = {}, {}, {}
    for row in rows:
        counts[row["verdict"]] = counts.get(row["verdict"], 0) + 1
        if "router_states" in row:
            states[row["router_states"]] = states.get(row["router_states"], 0) + 1
        if "flops" in row:
            kind = row["flops"] if row["flops"] == "exact" else row["flops"].split(":")[0] if ":" in row["flops"] \
                else "within 5%" if abs(float(row["flops"]) - 1) <= 0.05 \
                else "above by more (MFU too high)" if float(row["flops"]) > 1 else "below by more (MFU too low)"
            flop_counts[kind] = flop_counts.get(kind, 0) + 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"transformers": transformers.__version__, "torch": torch.__version__, "wall_s": round(time.time() - start),
            "counts": counts, "router_states": states, "flops": flop_counts}
    (out / "model_families-cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Model families: does the step train the model's own loss?",
        "",
        f"transformers {meta['transformers']}, torch {meta['torch']}, CPU, fp32; "
        f"`python -m experiments.model_families` ({meta['wall_s']} s). Tiny random models (2 blocks, width 32, "
        "vocab 96, a sliding window of 4 where the config has one; where that config does not build, the same "
        "at the family's default depth, then its default width at 2 blocks; up to 600M parameters), packed "
        "batch 3 x 12. "
        "'same loss': the step's NLL equals a float64 NLL of the model's own logits (within 1e-4) and a routed "
        "step (token CGGR, 1-block router) trains with a finite loss; its router's states are the model's "
        "(the last column: the decoder's own states after the block, final norm applied, or else the decoder "
        "cut to one block by hand); the FLOP formula of MFU against torch's flop counter (eager attention and "
        "experts, forward+backward; 'exact' or the formula's ratio to the count). 'router refused': standard training "
        "matches, the router's construction refuses the family with the error shown. 'refused': the step's "
        "error at construction. 'not built': this harness's shrunk config does not fit the family (says "
        "nothing about the product).",
        "",
        "Counts: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
        "",
        "Router states: " + ", ".join(f"{k}: {v}" for k, v in sorted(states.items())),
        "",
        "FLOP formula: " + ", ".join(f"{k}: {v}" for k, v in sorted(flop_counts.items())),
        "",
        "| family | class | verdict | detail | router states | FLOP formula |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        detail = row.get("detail", "")
        if "abs_diff" in row and not detail:
            detail = f"/diff/ {row['abs_diff']:.1e}"
        lines.append(f"| {row['family']} | {row.get('class', '')} | {row['verdict']} | {detail.replace('|', '/')} "
                     f"| {row.get('router_states', '')} | {row.get('flops', '')} |")
    (out / "model_families-cpu.md").write_text("\n".join(lines) + "\n")
    print(counts)


if __name__ == "__main__":
    main()
