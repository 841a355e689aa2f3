"""Build the reference model of ``scoring=excess_loss`` in one command (RHO-LOSS's holdout-trained model).

    python -m lightning_cggr.routing.holdout --out runs/reference                       # tiny default, ~1 min CPU
    python -m lightning_cggr.train cggr=rho_loss cggr.router.reference=runs/reference
    python -m lightning_cggr.routing.holdout --out runs/ref-smollm2 --init pretrained --steps 40 \\
        model=smollm2_gguf data.batch_size=4 data.block_size=256                        # SmolLM2, continued

RHO-LOSS (Mindermann et al., ICML 2022) scores a point by its current loss minus the loss of a small
"irreducible loss" model trained on held-out data of the same distribution; Rho-1 does the same with
a reference model. This command trains that model briefly and saves it (``save_pretrained``: weights,
config and tokenizer) where ``cggr.router.reference`` loads it; ``holdout.json`` beside it records what
was trained on what, and the reference's held-out loss before and after.

The data: the same corpus, tokenizer and block size as the run the positional Hydra overrides describe
(the same overrides as ``lightning_cggr.train`` takes). The reference trains on a fixed part of the
*training* documents (``--fraction`` of them, chosen by a salted checksum of the text), never on the
validation documents: a reference that saw the validation split would steer selection toward it and
flatter every held-out number measured there. RHO-LOSS reports that an irreducible-loss model trained
on part of the training set itself works nearly as well as one on separate holdout data; those
documents stay in the trained model's data too (say so when reading results).

The model, ``--init``:
- ``random`` (default): the run's own architecture and vocabulary (its Hugging Face config), with
  ``--layers`` blocks (default 2), random init: a small model of the same family;
- ``pretrained``: a copy of the run's model itself (e.g. SmolLM2's real weights), continued on the
  holdout documents (Rho-1's reference is a model trained on chosen data).
It trains with the project's own step (``cggr.enabled=false``: every token), AdamW and the LR schedule
of ``train()`` sized to ``--steps``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import sys
import time
import zlib
from pathlib import Path
from typing import Sequence

import torch

INITS = ("random", "pretrained")
_SALT = b"lightning_cggr.holdout\0"


def holdout_documents(train_docs: Sequence[str], fraction: float) -> list[str]:
    """The documents whose salted text checksum falls in the lowest ``fraction``: deterministic, independent
    of the validation split's own checksum, at least one document."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"--fraction={fraction}: must be in (0, 1]")
    if not train_docs:
        raise ValueError("no training documents to hold out from")
    picked = [d for d in train_docs if zlib.crc32(_SALT + d.encode("utf-8")) % 10_000 < fraction * 10_000]
    return picked or [min(train_docs, key=lambda d: zlib.crc32(_SALT + d.encode("utf-8")))]


def small_model_like(model: torch.nn.Module, layers: int) -> torch.nn.Module:
    """A random-init model of ``model``'s architecture and vocabulary with ``layers`` blocks."""
    from transformers import AutoModelForCausalLM

    from .router import _num_layers_attr

    if layers < 1:
        raise ValueError(f"--layers={layers}: must be >= 1")
    config = copy.deepcopy(model.config)
    attr = _num_layers_attr(config)
    setattr(config, attr, layers)
    if hasattr(config, "layer_types") and isinstance(config.layer_types, list):  # per-layer lists follow the count
        config.layer_types = config.layer_types[:layers]
    dtype = next(model.parameters()).dtype
    return AutoModelForCausalLM.from_config(config).to(dtype)


def _compose(overrides: Sequence[str]):
    """The run's config as ``overrides`` compose it, checked as the train command checks its own:
    a misspelt key or option is one ConfigError line (with its "did you mean"), not a traceback."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from ..cli import hydra_problem, unknown_key_problems
    from ..config import config_error
    from ..errors import ConfigError
    from ..train import CONF_DIR, RESERVED_TRAINER_KEYS  # (importing it registers the dataclass defaults)

    ignored = [o for o in overrides if o.lstrip("+~").startswith("trainer.")]
    if ignored:
        raise ConfigError(f"invalid configuration: {ignored[0]}: this command reads the run's model and data "
                          "only; it trains --steps optimizer steps (drop the trainer.* override)")
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="holdout"):
            cfg = compose(config_name="train", overrides=["output_dir=/tmp/lightning_cggr_holdout", *overrides])
    except HydraException as err:
        raise ConfigError(f"invalid configuration: {hydra_problem(err, CONF_DIR, RESERVED_TRAINER_KEYS)}") from err
    plain = OmegaConf.to_container(cfg, resolve=True)
    if problems := unknown_key_problems(plain, CONF_DIR, RESERVED_TRAINER_KEYS):
        raise config_error(problems)
    return plain


def _heldout_loss(step, batches) -> float:
    total = count = 0.0
    model = step.model
    was = model.training
    model.eval()
    for b in batches:
        nll, n = step.eval_terms(b)
        total, count = total + float(nll), count + float(n)  # host reads: a build tool, not the step
    model.train(was)
    return total / max(count, 1.0)


def build_reference(
    overrides: Sequence[str],
    out: str | Path,
    *,
    steps: int = 200,
    fraction: float = 0.5,
    init: str = "random",
    layers: int = 2,
    lr: float | None = None,
    eval_batches: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    """Train the reference on the holdout documents of the run ``overrides`` describe; save it in ``out``.

    Returns the provenance written to ``out/holdout.json``.
    """
    import lightning as L

    from ..config import CGGRConfig, parse_config
    from ..data import build_tokenizer
    from ..data.text import PackedTextDataModule, load_documents, split_documents
    from ..models import build_model
    from ..step import CGGRStep, build_optimizer, build_scheduler, optimizer_step
    from .router import find_blocks, find_decoder

    if init not in INITS:
        raise ValueError(f"--init={init!r}: choose {' or '.join(INITS)}")
    if steps < 1:
        raise ValueError(f"--steps={steps}: must be >= 1")
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"--lr={lr}: must be a number > 0 (or leave it out: the run's optim.lr)")
    if seed < 0:
        raise ValueError(f"--seed={seed}: must be >= 0")
    target = Path(out).expanduser()
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise ValueError(f"--out={out} already holds {'a reference' if (target / 'holdout.json').is_file() else 'files'}; "
                         "give another folder, or --overwrite to replace it")
    run = parse_config(_compose(overrides))
    if run.data.source not in ("pydoc", "files", "hf"):
        raise ValueError(f"data.source={run.data.source}: the holdout reference is built for packed text "
                         "(pydoc, files, hf)")
    L.seed_everything(seed, workers=True, verbose=False)
    train_docs, val_docs = split_documents(load_documents(run.data), run.data.val_fraction)
    holdout = holdout_documents(train_docs, fraction)
    tokenizer = build_tokenizer(run.data) if run.data.tokenizer == "bpe" else None  # the run's own tokenizer
    model, tokenizer = build_model(run.model, tokenizer)
    if init == "random":
        have = len(find_blocks(find_decoder(model))[1])
        if layers > have:
            raise ValueError(f"--layers={layers}: the run's model has {have} blocks, and the reference is a smaller "
                             f"model of its family; give --layers <= {have}")
        torch.manual_seed(seed)
        model = small_model_like(model, layers)
    model.train()
    data = PackedTextDataModule(holdout, val_docs, tokenizer, run.data, seed=seed)
    data.setup("fit")
    # a tenth of the steps warms the LR up from 0 (none under 10 steps: a 1-step warm-up trains nothing)
    optim = dataclasses.replace(run.optim, lr=run.optim.lr if lr is None else lr,
                                warmup_steps=min(run.optim.warmup_steps, steps // 10))
    step = CGGRStep(model, CGGRConfig(enabled=False), run.loss)  # the run's loss settings, all of them
    optimizer = build_optimizer(model, optim)
    scheduler = build_scheduler(optimizer, optim, steps)
    val = [b for _, b in zip(range(eval_batches), data.val_dataloader())]
    before = _heldout_loss(step, val)
    t0 = time.perf_counter()
    it, done, losses = iter(data.train_dataloader()), 0, []
    while done < steps:
        try:
            batch = next(it)
        except StopIteration:  # another pass over the holdout documents
            it = iter(data.train_dataloader())
            continue
        res = optimizer_step(step, optimizer, [batch], done, scheduler=scheduler, clip=1.0)
        losses.append(res[0].metrics["train/loss"])
        done += 1
    seconds = time.perf_counter() - t0
    after = _heldout_loss(step, val)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {
        "overrides": list(overrides),
        "init": init,
        "layers": len(find_blocks(find_decoder(model))[1]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": model.get_output_embeddings().weight.shape[0],
        "steps": steps,
        "batch": [run.data.batch_size, run.data.block_size],
        "lr": optim.lr,
        "holdout_fraction": fraction,
        "holdout_documents": len(holdout),
        "train_documents": len(train_docs),
        "validation_documents": len(val_docs),
        "holdout_tokens": int(data.train_set.blocks.numel()) if hasattr(data.train_set, "blocks") else None,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "final_train_loss": float(torch.stack(losses[-10:]).mean()),
        "train_seconds": seconds,
        "seed": seed,
    }
    (out / "holdout.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def main(argv: Sequence[str] | None = None) -> int:
    doc = __doc__ or ""
    ap = argparse.ArgumentParser(prog="python -m lightning_cggr.routing.holdout", description=doc.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="folder to save the reference in (cggr.router.reference=<it>)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps on the holdout documents (default 200)")
    ap.add_argument("--fraction", type=float, default=0.5, help="part of the training documents held out for it (default 0.5)")
    ap.add_argument("--init", default="random", choices=INITS, help="random: small model of the same family; "
                    "pretrained: the run's own model, continued")
    ap.add_argument("--layers", type=int, default=2, help="--init random: number of blocks, at most the run's model's (default 2)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the run's optim.lr)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="replace what --out holds (refused without it)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides describing the run (model, data) as for train")
    args = ap.parse_args(argv)
    from ..errors import UserError

    try:
        rec = build_reference(args.overrides, args.out, steps=args.steps, fraction=args.fraction, init=args.init,
                              layers=args.layers, lr=args.lr, seed=args.seed, overwrite=args.overwrite)
    except (ValueError, UserError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(rec, indent=1))
    loss_before, loss_after = rec["heldout_loss_before"], rec["heldout_loss_after"]
    print(f"reference saved in {args.out}: held-out loss {loss_before:.3f} -> {loss_after:.3f} "
          f"(ppl {math.exp(min(loss_after, 50)):.1f}); use cggr.router.reference={args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
