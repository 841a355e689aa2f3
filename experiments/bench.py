"""Building and stepping for benchmarks: the package's own model, data and training step.

:class:`Runner` holds one method's training state: the product's :class:`~lightning_cggr.step.CGGRStep`
around the model (on the model's device), AdamW and the LR schedule from the same builders
``train()`` uses, stepped by :func:`lightning_cggr.step.optimizer_step` (what Lightning's automatic
optimization does around ``training_step``; ``tests/test_step.py`` checks the two agree). No
training logic lives here: only timing, device synchronisation and batch bookkeeping.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import time
from typing import Any, Callable, Iterable

from experiments.compose import BENCH_KEY, parse_run
from experiments.results_io import REPO


def build_model_and_data(config: dict[str, Any]):
    """(run, model, datamodule) exactly as ``lightning_cggr.train.train`` builds them, after seeding.

    ``bench.pad_vocab`` (a harness-only key of the bench presets) pads the embedding and head to that
    many rows, for throughput at a real model's vocabulary with a smaller tokenizer.
    ``bench.random_init_layers``: replace the built (e.g. pretrained) model by a random-init one of the
    same architecture and vocabulary with that many blocks (its tokenizer stays the real one).
    """
    import lightning as L

    run = parse_run(config)
    L.seed_everything(config["seed"], workers=True, verbose=False)
    if (config.get(BENCH_KEY) or {}).get("cache_build"):
        model, datamodule = _cached_build(config, run)
        L.seed_everything(config["seed"], workers=True, verbose=False)
        return run, model, datamodule
    return (run, *_build(config, run))


def _build(config: dict[str, Any], run):
    from lightning_cggr.data import build_datamodule, build_tokenizer
    from lightning_cggr.models import build_model

    tokenizer = build_tokenizer(run.data) if run.data.tokenizer == "bpe" else None
    model, tokenizer = build_model(run.model, tokenizer)
    layers = (config.get(BENCH_KEY) or {}).get("random_init_layers")
    if layers:  # the loaded model's architecture and tokenizer, `layers` blocks, random init (seeded above)
        from lightning_cggr.routing.holdout import small_model_like

        model = small_model_like(model, int(layers)).train()
    pad_vocab = (config.get(BENCH_KEY) or {}).get("pad_vocab")
    if pad_vocab and pad_vocab > model.get_input_embeddings().weight.shape[0]:
        # Throughput-only shapes (e.g. SmolLM2's 49152-row head on a small tokenizer): unused rows.
        model.resize_token_embeddings(pad_vocab, mean_resizing=False)
    datamodule = build_datamodule(run.data, tokenizer, seed=config["seed"])
    datamodule.setup("fit")
    return model, datamodule


def _cached_build(config: dict[str, Any], run):
    """``bench.cache_build``: pickle the built (model, datamodule) once, keyed by the model/data/seed
    config, the transformers version and the building code's source, so fresh measurement processes
    of a pretrained model skip the GGUF dequantization and tokenization. Weights and batches are identical."""
    import torch
    import transformers

    from lightning_cggr.data import cache_dir

    key = {k: config.get(k) for k in ("model", "data", "seed", BENCH_KEY)}
    src = hashlib.sha256()  # the building code too: a change to loading or splitting must not hit a stale pickle
    for folder in ("models", "data"):
        for f in sorted((REPO / "lightning_cggr" / folder).glob("*.py")):
            src.update(f.read_bytes())
    key = json.dumps({**key, "transformers": transformers.__version__, "code": src.hexdigest()},
                     sort_keys=True, default=str)
    path = cache_dir() / "bench" / f"build-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=False)
    model, datamodule = _build(config, run)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save((model, datamodule), tmp)
    tmp.replace(path)
    return model, datamodule


def built_shape(model, config: dict) -> dict:
    """The model as built (a pretrained source's sizes are not in the config): for the results' shape."""
    from lightning_cggr.routing.router import find_blocks, find_decoder

    c = model.config
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    layers = len(find_blocks(find_decoder(model))[1])
    vocab = model.get_output_embeddings().weight.shape[0]
    lora = ((config.get("model") or {}).get("lora") or {}).get("r") or 0  # model.lora: adapters train, weights frozen
    out = {"model": f"{c.model_type} h{hidden} L{layers} V{vocab}" + (f", LoRA r={lora}" if lora else ""),
           "parameters": sum(p.numel() for p in model.parameters())}
    if (config.get(BENCH_KEY) or {}).get("random_init_layers"):
        out["model_source"] = f"random init; {config['model']['source']} architecture and tokenizer"
    return out


def take_batches(loader_fn: Callable[[], Iterable], n: int, device) -> list[dict]:
    """The first ``n`` batches of the loader (re-iterated when it runs out), moved to ``device``."""
    stream = BatchStream(loader_fn, device)
    return [stream[i] for i in range(n)]


class BatchStream:
    """Batch i of an endless, deterministic pass over the loader (re-iterated as needed), on ``device``.

    Every method asks for batch i by index, so all see the same batches in the same order.
    """

    def __init__(self, loader_fn: Callable[[], Iterable], device):
        self.loader_fn, self.device, self.batches = loader_fn, device, []
        self._it = None

    def __getitem__(self, i: int) -> dict:
        while len(self.batches) <= i:
            if self._it is None:
                self._it = iter(self.loader_fn())
            try:
                b = next(self._it)
            except StopIteration:
                self._it = None
                if not self.batches:
                    raise RuntimeError("the data loader yields no batches (batch size larger than the dataset?)") from None
                continue
            self.batches.append({k: v.to(self.device) for k, v in b.items()})
        return self.batches[i]


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


class Runner:
    """One method's training state, driven exactly like ``train()``'s, on the model's device.

    ``config`` is the method's composed config; ``total_steps`` sizes the LR schedule (as
    ``trainer.max_steps`` does in ``train()``). Several runners may share a model and an
    ``optimizer``/``scheduler`` (throughput timing) or each own a copy (quality runs).
    """

    def __init__(self, model, config: dict[str, Any], device: str, total_steps: int, optimizer=None, scheduler=None):
        from lightning_cggr.step import CGGRStep, build_optimizer, build_scheduler

        run = parse_run(config)
        self.model, self.device = model, device
        # the same perf/optim for every method; total_steps: the run length strategy=infobatch anneals over
        self.step = CGGRStep(model, run.cggr, run.loss, perf=run.perf, total_steps=total_steps)
        if self.step.reference is not None:
            self.step.reference.to(device)
        self.optimizer = optimizer or build_optimizer(model, run.optim)
        self.scheduler = scheduler or build_scheduler(self.optimizer, run.optim, total_steps)
        trainer = config["trainer"]
        self.precision = str(trainer["precision"])
        self.clip = trainer.get("gradient_clip_val")
        self.accumulate = int(trainer.get("accumulate_grad_batches") or 1)
        self.global_step = 0

    def autocast(self):
        from lightning_cggr.step import autocast_for

        return autocast_for(self.precision, self.device)

    def train_step(self, micro_batches: list[dict]):
        """One optimizer step on ``micro_batches`` (``accumulate`` of them); returns (seconds, mean
        train loss as a device tensor). The device is synchronized before and after, not inside."""
        import torch

        from lightning_cggr.step import optimizer_step

        if len(micro_batches) != self.accumulate:
            raise ValueError(f"{len(micro_batches)} micro-batches for accumulate_grad_batches={self.accumulate}")
        sync(self.device)
        t0 = time.perf_counter()
        results = optimizer_step(self.step, self.optimizer, micro_batches, self.global_step,
                                 scheduler=self.scheduler, clip=self.clip, autocast=self.autocast)
        sync(self.device)
        dt = time.perf_counter() - t0
        self.global_step += 1
        losses = torch.stack([r.metrics["train/loss"].float() for r in results])
        return dt, losses.mean()

    def heldout_loss(self, batches: list[dict]) -> float:
        """Mean next-token NLL over every trainable token of ``batches`` (the step's ``eval_terms``,
        what ``validation_step`` computes), in eval mode."""
        import torch

        was_training = self.model.training
        self.model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        with self.autocast():
            for b in batches:
                nll, n = self.step.eval_terms(b)
                total += nll.double()
                count += n.double()
        self.model.train(was_training)
        return float(total / count.clamp(min=1))


def deepcopy_model(model):
    return copy.deepcopy(model)


def weights_fingerprint(model) -> str:
    """A short digest of every parameter's values (proves equal initial weights across runs)."""
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes()[:4096])
            h.update(repr(float(p.double().sum())).encode())
    return h.hexdigest()[:16]


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
