"""The run folder: what a new run or a resume may do with it, decided before anything is written.

One run lives in one folder (``hydra.run.dir``; ``output_dir`` in the config): ``checkpoints/``,
the loggers' files, ``.hydra/``. :func:`plan_run` decides, from the config and the folder alone:

- ``ckpt_path=auto``: resume the folder's own ``checkpoints/last.ckpt`` in place, or start a new
  run when there is none yet (so one command serves every job of a chain);
- ``ckpt_path=<file or FSDP2 folder>``: resume that checkpoint (in place when it is this folder's);
- ``ckpt_path=null``: a new run; refused when the folder already holds one (it would overwrite
  that run's ``last.ckpt``).

A resume must match the checkpoint: every setting that shapes the trajectory (model, data, cggr,
loss, optim, seed) equals the one stored in the checkpoint, except those listed in
:data:`CHANGEABLE_ON_RESUME`. A mismatch is a :class:`~lightning_cggr.errors.UserError` listing
each difference. From the command line the check runs in :class:`RunFolderCallback`, a Hydra
callback called before Hydra creates the folder or writes ``.hydra/config.yaml``, so a refused
resume leaves the folder byte-identical; ``train()`` repeats it for programmatic use.

A run that fails on a user error before it saved anything leaves no folder behind:
:func:`discard_new_run_folder` removes the folder the callback saw created, when it holds nothing
but Hydra's bookkeeping.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from .errors import CheckpointError, ConfigError, UserError

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "last.ckpt"
IDENTITY_KEYS = ("model", "data", "cggr", "loss", "optim", "seed")
"""Top-level settings a resume must keep (except the keys below)."""
CHANGEABLE_ON_RESUME = ("data.batch_size", "data.num_workers", "data.cache_dir", "loss.impl", "loss.chunk_size",
                        "loss.grad_accum", "model.attn_implementation", "optim.fused")
"""May differ on resume (as may everything outside IDENTITY_KEYS: trainer.*, checkpoint.*, perf.*,
logger, callbacks): kernels and loader settings, not what is computed. A new batch size or device
count restarts the interrupted epoch, with a warning."""
DATA_LOCATIONS = ("data.paths", "data.hf_name")
"""Where the data is read from: may differ on resume when the checkpoint holds its training set's
fingerprint (data moved to another folder). The same data continues exactly; other data is said
and restarts the interrupted epoch (:class:`lightning_cggr.data.resumable.ResumableLoader`)."""


@dataclass
class RunPlan:
    ckpt: Path | None
    """The checkpoint to resume from; None for a new run."""
    in_place: bool
    """The checkpoint is this run folder's own: its loggers' history continues."""
    start_step: int
    """Optimizer steps already done (the checkpoint's global step; 0 for a new run)."""
    tokenizer: str | None = None
    """The checkpoint's own BPE tokenizer (its ``tokenizers`` JSON), where the run trained one on its
    corpus: a resume tokenizes with it, so token ids keep the meaning the weights learned."""
    initial: dict[str, float] | None = None
    """The run's starting point (``val/loss_initial``...: the validation before its first step), as
    its checkpoint holds it: a resumed run reports it again."""


def last_checkpoint(out: Path) -> Path | None:
    path = out / "checkpoints" / CHECKPOINT_NAME
    if path.exists():
        return path
    old = path.with_name(f".{CHECKPOINT_NAME}.old")  # an FSDP2 swap cut between its two renames
    return old if old.is_dir() else None


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The global step and stored config of a checkpoint file or FSDP2 folder, without loading the
    tensors into memory (memory-mapped)."""
    import torch

    from .export import check_checkpoint

    check_checkpoint(path, what="ckpt_path")  # complete file or sharded folder, with its own message
    file = path / "meta.pt" if path.is_dir() else path
    try:
        try:
            ckpt = torch.load(file, map_location="cpu", mmap=True, weights_only=False)
        except RuntimeError:  # not a zip archive (legacy format): mmap refuses it
            ckpt = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as err:
        raise UserError(
            f"ckpt_path={path}: not a readable checkpoint ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "give another checkpoint, e.g. <run>/checkpoints/last.ckpt"
        ) from err
    from .module import CONFIG_KEY

    stored = ckpt.get(CONFIG_KEY) or {}
    return {"global_step": int(ckpt.get("global_step", 0)), "config": stored.get("config"),
            "tokenizer": stored.get("tokenizer"), "data": stored.get("data"), "initial": stored.get("initial"),
            # a weights-only save (best.ckpt, periodic step_*.ckpt) has no optimizer or schedule state
            "resumable": path.is_dir() or "optimizer_states" in ckpt}


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, Mapping):
        for k, v in value.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = list(value) if isinstance(value, tuple) else value
    return out


def _schema_defaults() -> dict[str, Any]:
    """The dataclass defaults of IDENTITY_KEYS' groups, flattened like :func:`_flatten`."""
    from .config import GROUPS

    return _flatten({k: dataclasses.asdict(GROUPS[k]()) for k in IDENTITY_KEYS if k in GROUPS}, "", {})


def config_differences(now: Mapping[str, Any], then: Mapping[str, Any], movable: tuple[str, ...] = ()) -> list[str]:
    """Settings of IDENTITY_KEYS that differ (dotted key: checkpoint value vs now), except
    CHANGEABLE_ON_RESUME and ``movable``. A setting the checkpoint's config does not have (one added
    to the package after it was written) matches when it is at its default now, which is what the
    older package did."""
    a = _flatten({k: then.get(k) for k in IDENTITY_KEYS}, "", {})
    b = _flatten({k: now.get(k) for k in IDENTITY_KEYS}, "", {})
    defaults = _schema_defaults()
    out = []
    for key in sorted(set(a) | set(b)):
        if key in CHANGEABLE_ON_RESUME + movable or any(key.startswith(c + ".") for c in CHANGEABLE_ON_RESUME):
            continue
        if key not in a and key in defaults and b.get(key) == defaults[key]:
            continue
        if key not in a:
            out.append(f"{key}={b.get(key)!r} (the checkpoint predates this setting: it trained with "
                       f"{defaults.get(key)!r})")
        elif a.get(key) != b.get(key):
            out.append(f"{key}={b.get(key)!r} (the checkpoint has {a.get(key)!r})")
    return out


def _stored_config(path: Path, meta: dict) -> dict | None:
    if meta.get("config") is not None:
        return meta["config"]
    saved = (path.parent if path.is_dir() else path).parent.parent / ".hydra" / "config.yaml"
    return OmegaConf.to_container(OmegaConf.load(saved), resolve=False) if saved.is_file() else None


def _folder_setting() -> str:
    """The setting that names the run folder: a multirun's jobs are folders of ``hydra.sweep.dir``."""
    return "hydra.sweep.dir" if in_multirun() else "hydra.run.dir"


def plan_run(cfg: Mapping[str, Any], out: Path) -> RunPlan:
    """Decide what this run does with folder ``out`` (see the module docstring); raises a
    UserError before anything is written when it must not run."""
    ckpt_path = cfg.get("ckpt_path")
    existing = last_checkpoint(out)
    if ckpt_path in (None, ""):
        if existing is not None:
            step = read_checkpoint_meta(existing)["global_step"]
            raise UserError(
                f"{out} already holds a run (checkpoints/{CHECKPOINT_NAME}, step {step}): resume it with "
                f"ckpt_path=auto, or start a new run in another folder ({_folder_setting()}=...)"
            )
        return RunPlan(None, False, 0)
    if str(ckpt_path) == "auto":
        if existing is None:
            log.info("ckpt_path=auto: no checkpoint in %s yet, starting a new run", out / "checkpoints")
            return RunPlan(None, False, 0)
        path = existing
    else:
        path = Path(str(ckpt_path)).expanduser()
        if not path.exists():  # an FSDP2 checkpoint is a folder
            raise ConfigError(f"invalid configuration: ckpt_path={ckpt_path}: no such checkpoint")
        if existing is not None and existing.resolve() != path.resolve():
            raise UserError(
                f"{out} already holds another run (checkpoints/{CHECKPOINT_NAME}): resume that one with "
                f"ckpt_path=auto, or resume {path} in a new folder ({_folder_setting()}=...)"
            )
    meta = read_checkpoint_meta(path)
    if not meta["resumable"]:
        raise CheckpointError(
            f"ckpt_path={path} holds the model's weights only (as best.ckpt and the step_*.ckpt of "
            "callbacks=periodic_checkpoints do), not the optimizer, schedule and position a resume needs: "
            "resume checkpoints/last.ckpt, or train on from these weights in a new run: python -m "
            f"lightning_cggr.export {path} <folder>, then model.source=pretrained model.name=<folder>")
    stored = _stored_config(path, meta)
    if stored is None:
        log.warning("%s stores no config: the resume cannot be checked against it", path)
    else:
        diffs = config_differences(cfg, stored, DATA_LOCATIONS if meta["data"] is not None else ())
        now, then = (_flatten({"data": c.get("data")}, "", {}) for c in (cfg, stored))
        moved = [k for k in DATA_LOCATIONS if now.get(k) != then.get(k)] if meta["data"] else []
        if moved and not diffs:
            log.info("%s: not the checkpoint's; the data is read from the new place, and its training set is "
                     "checked against the checkpoint's when training starts", ", ".join(moved))
        if diffs:
            raise UserError(
                f"cannot resume {path}: the config differs from the checkpoint's: {'; '.join(diffs)}. "
                "Resume with the checkpoint's settings, or start a new run in another folder"
            )
    in_place = out.resolve() in path.resolve().parents
    return RunPlan(path, in_place, meta["global_step"], meta["tokenizer"], meta["initial"])


# ---- the command line: before Hydra touches the folder ---------------------------------------

RUN_FOLDER: Path | None = None
"""The run folder of this process's Hydra run (or multirun job), new or not (None: no Hydra run)."""
_NEW_TOP: Path | None = None
"""The highest folder this run creates on the way to it (``outputs/<date>/`` above
``outputs/<date>/<time>/``, or the run folder itself); None where the run folder existed before."""
_BEFORE: dict[Path, bytes | int] = {}
"""What the folders held before Hydra wrote into them: the bytes of each file under a ``.hydra/``
and the size of each log file (a refused run puts them back: :func:`discard_new_run_folder`)."""
_REMEMBERED_AT: list[float] = []
"""When ``_BEFORE`` was taken: a folder with anything newer in it is not put back."""
_SWEEP: dict[str, Any] = {}
"""A multirun's sweep folder (``dir``) and the folders that existed in it before (``existing``)."""


def _first_missing(folder: Path) -> Path | None:
    """The highest folder on the way to ``folder`` that does not exist yet (None: ``folder`` exists)."""
    if folder.exists():
        return None
    top = folder
    while not top.parent.exists():
        top = top.parent
    return top


def _remember(folder: Path) -> None:
    """Record what Hydra may overwrite in ``folder`` (and the run folders below it, for a sweep)."""
    _BEFORE.clear()
    _REMEMBERED_AT[:] = [time.time()]
    if not folder.is_dir():
        return
    for path in folder.rglob("*"):
        if not path.is_file():
            continue
        if ".hydra" in path.relative_to(folder).parts:  # a sweep folder: its run folders' too
            _BEFORE[path] = path.read_bytes()
        elif path.suffix == ".log":
            _BEFORE[path] = path.stat().st_size


def _check_home(config: DictConfig, keys: tuple[str, ...]) -> None:
    for key in keys:
        given = OmegaConf.select(config, key, throw_on_resolution_failure=False)
        if isinstance(given, str) and given.startswith("~"):  # Hydra takes it as a folder named ~
            raise ConfigError(
                f"invalid configuration: {key}={given}: Hydra does not expand '~', so the run would "
                f"go into a folder named '~' under {Path.cwd()}; write the path out, e.g. "
                f"{key}=$HOME{given[1:]} (the shell expands $HOME)")


def _cli_output_dir(config: DictConfig) -> tuple[Path, dict]:
    """(run folder, the task config resolved as train() will see it) from Hydra's full config."""
    raw_out = OmegaConf.to_container(config, resolve=False).get("output_dir")
    out = Path(str(OmegaConf.select(config, "hydra.run.dir"))).absolute()
    task = copy.deepcopy(config)
    with read_write(task), open_dict(task):
        del task["hydra"]
        if isinstance(raw_out, str) and "hydra:" in raw_out:
            task["output_dir"] = str(out)
    resolved = OmegaConf.to_container(task, resolve=True)
    return Path(str(resolved["output_dir"])).absolute(), resolved


def _check_writable(folder: Path, key: str) -> None:
    """Refuse a run folder that cannot be written (or, not there yet, created): Hydra would fail on
    its log file with a traceback. Probed by writing, which also sees what permissions do not say (a
    read-only mount, an immutable folder, root's writes)."""
    import tempfile

    where = folder if folder.exists() else folder.parent
    while not where.exists():
        where = where.parent
    try:
        if not where.is_dir():
            raise NotADirectoryError(f"{where} is a file")
        with tempfile.NamedTemporaryFile(dir=where, prefix=".write-probe."):
            pass
    except OSError as err:
        raise ConfigError(f"invalid configuration: {key}={folder}: cannot write into {where} "
                          f"({err.strerror or err}); choose another folder or fix its permissions") from err


def _folder_of(config: DictConfig, key: str) -> Path:
    """The absolute folder ``key`` names; a value that cannot be resolved is refused here, before
    Hydra reads it (it would fail there with a traceback)."""
    from omegaconf.errors import OmegaConfBaseException

    from .cli import omegaconf_problem

    try:
        return Path(os.path.abspath(str(OmegaConf.select(config, key))))
    except OmegaConfBaseException as err:
        problem = omegaconf_problem(err)
        _refuse(ConfigError(f"invalid configuration: {problem if problem.startswith(key) else f'{key}: {problem}'}"))
        raise  # not reached: _refuse exits


def _refuse(err: UserError) -> None:
    from .errors import report

    report(err)  # reported like every user mistake (lightning_cggr.errors)
    sys.exit(err.exit_code)


class RunFolderCallback(HydraCallback):
    """Hydra callback (``hydra.callbacks`` in ``conf/train.yaml``): before Hydra creates the run
    folder or writes into it, record whether it exists and what it holds, and refuse a run or
    resume that must not touch it (one line on stderr, exit 2, the folder unchanged).

    A multirun gives no hook between a job's config and Hydra's writing of its ``.hydra/``: the
    sweep folder is recorded at the sweep's start instead, each job's checks run in ``train()``,
    and a job refused there has its folder put back as it was (:func:`discard_new_run_folder`)."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        global RUN_FOLDER, _NEW_TOP
        _SWEEP.clear()  # (a multirun before, in the same process: tests)
        RUN_FOLDER = folder = _folder_of(config, "hydra.run.dir")
        _NEW_TOP = _first_missing(folder)
        _remember(folder)
        try:
            _check_home(config, ("hydra.run.dir", "output_dir"))
            _check_writable(folder, "hydra.run.dir")
            try:
                out, task = _cli_output_dir(config)
            except Exception:  # a config mistake: main() reports it with its own message
                return
            plan_run(task, out)
        except UserError as err:
            _refuse(err)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _SWEEP.clear()
        try:
            _check_home(config, ("hydra.sweep.dir", "output_dir"))
            sweep = _folder_of(config, "hydra.sweep.dir")
            _check_writable(sweep, "hydra.sweep.dir")
        except UserError as err:
            _refuse(err)
        existing = {sweep, *(p for p in sweep.rglob("*") if p.is_dir())} if sweep.is_dir() else set()
        _SWEEP.update(dir=sweep, existing=existing)
        _remember(sweep)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        global RUN_FOLDER, _NEW_TOP
        if not _SWEEP:  # a single run: on_run_start saw the folder before Hydra wrote into it
            return
        RUN_FOLDER = folder = Path(os.path.abspath(str(config.hydra.runtime.output_dir)))
        _NEW_TOP = None if folder in _SWEEP["existing"] else folder


    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _SWEEP.clear()


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (``-m``)."""
    return bool(_SWEEP)


BOOKKEEPING = (".hydra", "model")
"""What a run writes before it trains: Hydra's config copies, the model's HF config and tokenizer."""


def discard_new_run_folder() -> bool:
    """Undo what Hydra wrote for a run that failed before it saved anything: remove the run folder
    this process's Hydra run created if it holds nothing but bookkeeping (``.hydra/``, ``model/``,
    log files, empty folders), with the empty folders created above it; in a folder that existed,
    put back the ``.hydra/`` files and log files as they were. Returns whether a folder was removed."""
    folder = RUN_FOLDER
    if folder is None or not folder.is_dir():
        return False
    if _NEW_TOP is None:  # the folder was there before
        _restore(folder)
        return False
    for path in folder.rglob("*"):
        if path.is_dir() or _written_by_hydra(folder, path):
            continue
        return False  # a checkpoint, metrics, anything the run wrote: keep it
    import logging as _logging

    for handler in _logging.getLogger().handlers:  # Hydra's file handler holds <folder>/<job>.log open
        if isinstance(handler, _logging.FileHandler) and Path(handler.baseFilename).parent == folder:
            handler.close()
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    while parent == _NEW_TOP or _NEW_TOP in parent.parents:
        try:
            parent.rmdir()  # only while empty: another run's folder beside this one stays
        except OSError:
            break
        parent = parent.parent
    return True


def _written_by_hydra(folder: Path, path: Path, model: bool = True) -> bool:
    """Whether ``path`` in run folder ``folder`` is bookkeeping: ``.hydra/``, a log file of the
    folder itself, and (``model``) ``model/``."""
    rel = path.relative_to(folder).parts
    kept = BOOKKEEPING if model else BOOKKEEPING[:1]
    return rel[0] in kept or (len(rel) == 1 and path.suffix == ".log")


def _restore(folder: Path) -> None:
    """Put ``folder``'s ``.hydra/`` files and log files back as :func:`_remember` found them (a file
    Hydra added goes), unless the run wrote anything else there since (it trained: keep its record)."""
    if not _REMEMBERED_AT or not folder.is_dir():
        return
    files = [p for p in folder.rglob("*") if p.is_file()]
    if any(not _written_by_hydra(folder, p) and p.stat().st_mtime > _REMEMBERED_AT[0] for p in files):
        return
    for path in files:
        if not _written_by_hydra(folder, path, model=False):
            continue
        before = _BEFORE.get(path)
        try:
            if before is None:
                path.unlink()
            elif isinstance(before, bytes):
                if path.read_bytes() != before:
                    path.write_bytes(before)
            elif path.stat().st_size > before:
                os.truncate(path, before)
        except OSError:  # best effort: the refusal itself is what the user must see
            pass
