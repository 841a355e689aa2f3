"""The command line of ``lightning_cggr.train``: unknown keys, Hydra's errors as one line, exit codes.

Hydra prints its own composition errors (a bad override, an unknown group option) as several lines
with exit code 1; :func:`run_hydra` has Hydra raise them instead and reports each as one
:class:`~lightning_cggr.errors.ConfigError` line naming the fix, exit code 2, like every other user
mistake (:func:`lightning_cggr.errors.run_command`). ``HYDRA_FULL_ERROR=1`` still shows tracebacks.
"""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import inspect
import os
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

from .errors import _USER_FULL_ERROR_ENV, FULL_ERROR_ENV, ConfigError, run_command


def trainer_arguments() -> tuple[str, ...]:
    """The keyword arguments of ``lightning.Trainer``: the only keys ``trainer`` may hold.

    Read from the source of the installed Lightning's ``Trainer.__init__`` without importing it
    (importing Lightning takes seconds, and a config mistake should be reported before that); where
    that source cannot be read and parsed, from the imported class."""
    if (names := _trainer_arguments_from_source()) is not None:
        return names
    import lightning as L

    return tuple(p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self")


@functools.lru_cache(maxsize=1)
def _trainer_arguments_from_source() -> tuple[str, ...] | None:
    spec = importlib.util.find_spec("lightning")
    if spec is None or not spec.origin:
        return None
    try:
        tree = ast.parse((Path(spec.origin).parent / "pytorch" / "trainer" / "trainer.py").read_text("utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "Trainer":
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    a = item.args
                    if a.vararg or a.kwarg:  # a catch-all would admit any key: let the import decide
                        return None
                    names = [x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)]
                    return tuple(n for n in names if n != "self")
    return None


def known_top_level_keys(conf_dir: str | Path) -> set[str]:
    """Top-level keys a composed config may hold: the schema groups, ``trainer``, the other keys of
    the primary ``train.yaml`` and every config group folder of ``conf_dir``."""
    from omegaconf import OmegaConf

    from .config import GROUPS

    conf = Path(conf_dir)
    primary = OmegaConf.load(conf / "train.yaml")
    groups = {p.name for p in conf.iterdir() if p.is_dir()}
    return set(GROUPS) | {"trainer"} | (set(primary) - {"defaults"}) | groups


def _dotted(tree: Mapping, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        keys.append(prefix + key)
        if isinstance(value, Mapping):
            keys += _dotted(value, f"{prefix}{key}.")
    return keys


def known_keys(conf_dir: str | Path) -> list[str]:
    """Every dotted key the configs know: schema groups, trainer arguments, top-level keys."""
    from .config import schema_defaults

    trainer = {f"trainer.{a}" for a in trainer_arguments()}
    return sorted(set(_dotted(schema_defaults())) | trainer | known_top_level_keys(conf_dir))


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """``"; did you mean X?"`` for the closest known spelling of ``key``, else ``""``."""
    match = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match else ""


GLOBAL_GROUPS = ("experiment",)
"""Config groups whose options set keys anywhere (``# @package _global_``): never a key of their own."""


def unknown_key_problems(cfg: Mapping, conf_dir: str | Path, reserved: Mapping[str, str] = {}) -> list[str]:
    """Top-level and ``trainer`` keys that nothing reads (``+sed=1``, ``+trainer.max_step=5``), and
    ``trainer`` keys in ``reserved`` (set by train() itself; the value says why)."""
    problems = []
    top = known_top_level_keys(conf_dir) - set(GLOBAL_GROUPS)
    for key in cfg:
        if key in GLOBAL_GROUPS:
            problems.append(f"{key}.*: the settings of +{key}=... landed under '{key}.', where nothing reads them: "
                            f"an option of the {key} group must begin with the line '# @package _global_' "
                            f"(as lightning_cggr/conf/{key}/*.yaml do); add it to that file")
        elif key not in top:
            problems.append(f"{key}: unknown top-level key{did_you_mean(key, top)} (known: {', '.join(sorted(top))})")
    trainer = cfg.get("trainer")
    if trainer is not None and not isinstance(trainer, Mapping):
        return problems + [f"trainer={trainer!r}: must be a mapping of Lightning Trainer arguments"]
    args = trainer_arguments()
    for key in trainer or {}:
        if key in reserved:
            problems.append(_reserved_problem(key, reserved))
        elif key not in args:
            problems.append(f"trainer.{key}: not an argument of lightning.Trainer{did_you_mean(key, args)}")
    return problems


def _reserved_problem(arg: str, reserved: Mapping[str, str]) -> str:
    """The line for ``trainer.<arg>``, a Trainer argument the job sets itself (``reserved``: why)."""
    return f"trainer.{arg}: {reserved[arg]}; remove trainer.{arg}"


def omegaconf_problem(err: Exception) -> str:
    """One line for an OmegaConf error (a bad interpolation, a missing value): message and key."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    key = getattr(err, "full_key", None)
    return f"{key}: {first}" if key else first


OPEN_GROUPS = ("callbacks", "logger", "hydra")
"""Where a key that no config holds may be added on purpose (``+callbacks.mine._target_=...``): the
schema groups, the top level and ``trainer`` (Lightning's arguments) refuse any other."""


def hydra_problem(err: Exception, conf_dir: str | Path, reserved: Mapping[str, str] = {}) -> str:
    """One line naming the fix for an error Hydra raised while composing the config (``reserved``:
    as for :func:`unknown_key_problems`)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    message = str(err).strip()
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return (f"{group}={option}: no such option{did_you_mean(option, err.options)} "
                f"(choose one of {', '.join(err.options)})")
    override = re.match(r"Could not override '([^']+)'", message)
    if override:
        key = override.group(1)
        append = re.search(r"use (\+\S+)", message)
        add = append.group(1) if append else f"+{key}=VALUE"
        known = known_keys(conf_dir)
        if key.startswith("trainer.") and key.removeprefix("trainer.") in reserved:
            return _reserved_problem(key.removeprefix("trainer."), reserved)
        if key in known:  # e.g. a Trainer argument that the trainer option's YAML does not set
            return f"{key}: a valid key that the composed config does not hold yet; add it with {add}"
        if key.split(".")[0] in OPEN_GROUPS:
            return f"{key}: no such setting{did_you_mean(key, known)} (to add a new key on purpose, write {add})"
        return f"{key}: no such setting{did_you_mean(key, known)}"
    if isinstance(err, OverrideParseException):
        key, eq, value = str(err.override).partition("=")
        if eq and value.startswith("~"):  # the shell left it (not at a word's start), Hydra's grammar refuses it
            return (f"{key}={value}: Hydra cannot read an unquoted '~' (nor would it expand one); write the "
                    f"path out, e.g. {key}=$HOME{value[1:]} (the shell expands $HOME)")
        first = message.splitlines()[0] if message else "syntax error"
        return (f"cannot parse the override {err.override!r} ({first}); a value holding '=', spaces or "
                "other special characters needs quotes inside the shell's, e.g. 'ckpt_path=\"runs/step=50.ckpt\"', "
                "and a list brackets, e.g. 'data.paths=[a.txt,b.txt]'")
    lines = []
    for line in message.splitlines():
        if line.startswith(("Config search path", "Available options")):
            break
        if line.strip():
            lines.append(line.strip())
    return " ".join(lines) or type(err).__name__


def version_line() -> str:
    """``--version`` of every command: this package's version and its main dependencies' (read from
    the installed distributions' metadata, so nothing heavy is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    found = []
    for name in ("torch", "lightning", "transformers", "triton", "hydra-core"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return f"lightning_cggr {__version__} ({', '.join(found)})"


def add_version_option(parser) -> None:
    """``--version`` on an argparse command: :func:`version_line`, unwrapped, then exit 0."""
    import argparse

    class PrintVersion(argparse.Action):
        def __call__(self, parser, namespace, values, option_string=None):
            print(version_line())
            parser.exit()

    parser.add_argument("--version", action=PrintVersion, nargs=0,
                        help="show the versions of lightning_cggr and its main dependencies, and exit")


def run_hydra(hydra_main: Callable[[], object], conf_dir: str | Path, reserved: Mapping[str, str] = {}) -> None:
    """Run a ``@hydra.main`` function from the command line: Hydra's composition errors become one
    ConfigError line (``reserved``: as for :func:`unknown_key_problems`), and every user mistake
    exits 2 (:func:`lightning_cggr.errors.run_command`)."""
    from hydra.errors import HydraException

    def entry() -> None:
        try:
            hydra_main()
        except HydraException as err:  # a bad override, an unknown group option, a bad _target_
            raise ConfigError(f"invalid configuration: {hydra_problem(err, conf_dir, reserved)}") from err
        except KeyboardInterrupt:  # Ctrl-C before the task's own handling (Hydra writing .hydra/)
            import signal

            from .rundir import discard_new_run_folder
            from .signals import stopped_outside_training

            discard_new_run_folder()  # what Hydra wrote of a new folder: nothing else is there yet
            raise stopped_outside_training(signal.SIGINT) from None

    saved = {name: os.environ.get(name) for name in (FULL_ERROR_ENV, _USER_FULL_ERROR_ENV)}
    # Keep the user's own choice for errors.full_tracebacks() (also in the processes the run
    # launches), then have Hydra raise instead of printing its multi-line report and exiting 1.
    os.environ.setdefault(_USER_FULL_ERROR_ENV, os.environ.get(FULL_ERROR_ENV, ""))
    os.environ[FULL_ERROR_ENV] = "1"
    try:
        run_command(entry)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
