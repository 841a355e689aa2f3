"""A trained run as a Hugging Face model folder: ``save_pretrained`` weights, config and tokenizer.

    python -m lightning_cggr.export outputs/2026-11-27/10-00-00 my-model     # a run folder
    python -m lightning_cggr.export path/to/checkpoints/last.ckpt my-model   # or one of its checkpoints

The result loads anywhere with ``AutoModelForCausalLM.from_pretrained("my-model")`` and
``AutoTokenizer.from_pretrained("my-model")``; ``python -m lightning_cggr.generate my-model "prompt"``
samples from it.

What a run folder holds for this: ``model/`` (the model's Hugging Face config and the tokenizer
the run trained with, written by :func:`save_run_model_files` when training starts, no weights) and
``checkpoints/*.ckpt`` (Lightning checkpoints whose ``state_dict`` holds the model's weights under
the ``model.`` prefix; a ``trainer.strategy=fsdp2`` run writes a folder of shards instead, read
here with ``torch.distributed.checkpoint``). A run folder without ``model/`` (made before it
existed) is rebuilt from its resolved config ``.hydra/config.yaml`` with the same builders as
training: the tokenizer, and the base model whose weights the checkpoint then replaces. A
``model.lora`` run's ``model/`` also holds PEFT's ``adapter_config.json``: its checkpoints hold the
frozen weights and the adapters, which export folds into the weights (``merge_and_unload``), so the
result is a plain model.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import warnings
import zipfile
from pathlib import Path

import torch

from .cli import add_version_option
from .errors import CheckpointError, UserError, run_command

log = logging.getLogger(__name__)

RUN_MODEL_DIR = "model"
"""Subfolder of a run folder holding the model's HF config and the tokenizer (no weights)."""

PREFIX = "model."
"""Prefix of the model's weights in a checkpoint's ``state_dict`` (``CGGRModule.model``)."""
ADAPTER_CONFIG = "adapter_config.json"
"""PEFT's adapter settings in ``<run>/model/`` of a ``model.lora`` run."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---- what training leaves behind ----------------------------------------------------------------
def save_run_model_files(run_dir: str | Path, model, tokenizer) -> Path:
    """Write ``<run_dir>/model/``: the model's HF config (and generation config) and the tokenizer,
    so the run can be exported and sampled without the data, the tokenizer cache or the hub.
    Only global rank 0 writes (every rank of a multi-process run calls this)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    folder = Path(run_dir) / RUN_MODEL_DIR
    if getattr(rank_zero_only, "rank", 0) != 0:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    for adapter in getattr(model, "peft_config", {}).values():  # model.lora: how to rebuild the adapters
        adapter.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# ---- checkpoints --------------------------------------------------------------------------------
def is_sharded_checkpoint(path: Path) -> bool:
    """A ``torch.distributed.checkpoint`` folder (what ``trainer.strategy=fsdp2`` saves)."""
    return path.is_dir() and (path / ".metadata").is_file()


def check_checkpoint(path: str | Path, what: str = "checkpoint") -> None:
    """A cheap look at a checkpoint before anything is built: a complete torch file (a zip archive
    with its central directory, which a truncated copy lacks) or a sharded checkpoint folder."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{what}={path}: no such checkpoint")
    if path.is_dir():
        if not is_sharded_checkpoint(path):
            raise CheckpointError(
                f"{what}={path} is a folder but not a sharded checkpoint (no .metadata inside); give a "
                ".ckpt file or the checkpoint folder an fsdp2 run wrote"
            )
        return
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{what}={path} is not a complete torch checkpoint (truncated or another format, "
            f"{path.stat().st_size} bytes); copy it again or use another checkpoint of the run"
        )


def read_model_state(path: str | Path, template: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The model's weights in a Lightning checkpoint, without the ``model.`` prefix.

    A sharded (fsdp2) checkpoint folder is read into ``template`` (the model's own state dict, for
    names and shapes), gathered into whole tensors on the CPU."""
    path = Path(path).expanduser()
    check_checkpoint(path)
    if path.is_dir():
        return _read_sharded(path, template)
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # a damaged archive, a pickle with objects a weights-only load refuses
        raise CheckpointError(f"cannot read checkpoint {path}: {' '.join(str(err).split())[:300]}") from err
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict); give one from checkpoints/")
    weights = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    if not weights:
        raise CheckpointError(f"{path} holds no model weights (no '{PREFIX}*' keys in its state_dict)")
    return weights


def _read_sharded(path: Path, template: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp

    if template is None:
        raise CheckpointError(f"{path} is a sharded checkpoint: reading it needs the model (use load_trained)")
    state = {"state_dict": {PREFIX + k: torch.empty_like(v) for k, v in template.items()}}
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.load(state, checkpoint_id=str(path))
    except Exception as err:  # missing keys, other shapes, damaged shards
        raise CheckpointError(
            f"cannot read the sharded checkpoint {path} into this run's model: {' '.join(str(err).split())[:300]}"
        ) from err
    return {k[len(PREFIX):]: v for k, v in state["state_dict"].items()}


# ---- finding a run's pieces ---------------------------------------------------------------------
def is_hf_folder(path: Path) -> bool:
    """A ``save_pretrained`` folder with weights (e.g. one written by :func:`export`)."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return path.is_dir() and (path / "config.json").is_file() and any((path / w).is_file() for w in weights)


def _is_run_folder(path: Path) -> bool:
    return path.is_dir() and any((path / p).exists() for p in (RUN_MODEL_DIR, ".hydra", "checkpoints"))


def locate(source: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint) for a run folder (its ``checkpoints/last.ckpt``) or a checkpoint
    inside one (``<run>/checkpoints/<name>.ckpt``, a file or an fsdp2 folder)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; give a run folder (outputs/<date>/<time>) or a checkpoint in it")
    if _is_run_folder(path) and not is_sharded_checkpoint(path):
        ckpt = path / "checkpoints" / "last.ckpt"
        if not ckpt.exists():
            found = sorted(p.name for p in (path / "checkpoints").glob("*.ckpt")) if (path / "checkpoints").is_dir() else []
            hint = f" (it has: {', '.join(found)}; give one of them)" if found else " (did the run reach its first save?)"
            raise CheckpointError(f"{path} has no checkpoints/last.ckpt{hint}")
        return path, ckpt
    for parent in list(path.parents)[:3]:  # <run>/checkpoints/last.ckpt -> <run>
        if (parent / RUN_MODEL_DIR / "config.json").is_file() or (parent / ".hydra" / "config.yaml").is_file():
            return parent, path
    raise CheckpointError(
        f"{path}: no run folder above it (one with model/ or .hydra/config.yaml); give the run folder "
        "or a checkpoint inside it. A checkpoint of your own Trainer: CGGRModule.load_from_checkpoint(path, "
        "model=<the same architecture>).model.save_pretrained(folder)"
    )


def _skeleton(run_dir: Path, ckpt: Path | None = None):
    """(model with the run's architecture, tokenizer) without the trained weights."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder = run_dir / RUN_MODEL_DIR
    if (folder / "config.json").is_file():
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        if (folder / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(folder)
        if (folder / ADAPTER_CONFIG).is_file():  # a model.lora run: its checkpoints hold the wrapped model
            from peft import LoraConfig

            from .models import wrap_peft

            model = wrap_peft(model, LoraConfig.from_pretrained(folder))
        return model, AutoTokenizer.from_pretrained(folder)
    return _skeleton_from_config(run_dir, ckpt)


def _skeleton_from_config(run_dir: Path, ckpt: Path | None = None):
    """A run folder without model/: rebuild the tokenizer and model from ``.hydra/config.yaml``; the
    BPE the run trained comes from ``ckpt`` where it holds it, else it is trained again on the corpus
    (the same one while the corpus is unchanged)."""
    from omegaconf import OmegaConf

    from .config import parse_config
    from .data import build_tokenizer
    from .models import build_model

    resolved = run_dir / ".hydra" / "config.yaml"
    if not resolved.is_file():
        raise CheckpointError(f"{run_dir} has neither model/ nor .hydra/config.yaml; it is not a lightning_cggr run folder")
    log.info("%s has no %s/: rebuilding the tokenizer and model from %s", run_dir, RUN_MODEL_DIR, resolved)
    run = parse_config(OmegaConf.to_container(OmegaConf.load(resolved), resolve=False))
    stored = None
    if ckpt is not None and run.data.tokenizer == "bpe":
        from .rundir import read_checkpoint_meta

        stored = read_checkpoint_meta(ckpt)["tokenizer"]
    tokenizer = build_tokenizer(run.data, stored) if run.data.tokenizer == "bpe" else None
    model, tokenizer = build_model(run.model, tokenizer)
    return model.float(), tokenizer


def _resolve_dtype(dtype: str | torch.dtype | None, state: dict[str, torch.Tensor]) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise UserError(f"--dtype={dtype}: choose one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    floating = [v.dtype for v in state.values() if v.is_floating_point()]
    return floating[0] if floating else torch.float32


def load_trained(source: str | Path, dtype: str | torch.dtype | None = None):
    """(model in eval mode, tokenizer) from an exported folder, a run folder or a checkpoint.

    ``dtype``: float32 | bfloat16 | float16; default the checkpoint's (an exported folder: its own)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(source).expanduser()
    if is_hf_folder(path):
        kwargs = {"dtype": _resolve_dtype(dtype, {})} if dtype is not None else {"dtype": "auto"}
        return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval(), AutoTokenizer.from_pretrained(path)
    run_dir, ckpt = locate(path)
    check_checkpoint(ckpt)
    model, tokenizer = _skeleton(run_dir, ckpt)
    state = read_model_state(ckpt, model.state_dict())
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # other names or shapes: the checkpoint is not this run's model
        first = str(err).strip().splitlines()
        raise CheckpointError(
            f"{ckpt} does not match the model of {run_dir} ({' '.join(first[1:2] or first)[:200].strip()}); "
            "give a checkpoint of this run"
        ) from err
    if hasattr(model, "merge_and_unload"):  # a model.lora run: the adapters folded into the weights
        model = model.merge_and_unload()
    return model.to(_resolve_dtype(dtype, state)).eval(), tokenizer


def export(source: str | Path, out_dir: str | Path, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Write the model of a run folder or checkpoint as a ``save_pretrained`` folder with its
    tokenizer (and the run's resolved config as ``lightning_cggr_config.yaml``); returns the folder."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a folder to export into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; choose a new folder or pass --overwrite")
    model, tokenizer = load_trained(source, dtype)
    path = Path(source).expanduser()
    resolved = None if is_hf_folder(path) else locate(path)[0] / ".hydra" / "config.yaml"

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if resolved is not None and resolved.is_file():
            shutil.copyfile(resolved, folder / "lightning_cggr_config.yaml")

    _write_whole(out, write)
    return out


def _write_whole(out: Path, write) -> None:
    """``write`` a folder's files into a temporary folder beside ``out``, then move them into place:
    an export stopped on the way (Ctrl-C, a full disk: SmolLM2's weights are 540 MB) leaves no
    folder that looks like a model but lacks its weights or tokenizer. A new or empty ``out`` is
    replaced whole (one rename); with ``--overwrite`` into a folder holding other files each file
    is replaced by a rename of its own, and the others are left as they were."""
    import os
    import tempfile

    out = out.resolve() if out.is_symlink() else out  # a link to a folder: write where it points
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's folder is private; the export is a folder like any other
    try:
        write(tmp)
        if out.is_dir() and any(out.iterdir()):
            for item in sorted(tmp.iterdir()):
                target = out / item.name
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                os.replace(item, target)
        else:
            if out.is_dir():
                out.rmdir()
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _quiet_transformers() -> None:
    """No per-file progress bars from transformers on a command's output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m lightning_cggr.export",
        description="Write a trained run as a Hugging Face folder (save_pretrained weights, config, tokenizer).",
    )
    parser.add_argument("source", help="a run folder (uses checkpoints/last.ckpt) or a checkpoint in one")
    parser.add_argument("out_dir", help="the folder to write (new or empty, unless --overwrite)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights' dtype in the export (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="write into a folder that is not empty")
    add_version_option(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_cggr.export`` / ``lightning-cggr-export``; a mistake exits 2 with one line."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    _quiet_transformers()
    out = run_command(export, args.source, args.out_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"exported to {out} (load with AutoModelForCausalLM.from_pretrained({str(out)!r}))")


if __name__ == "__main__":
    main()
