"""README doc-tests: every command in README.md is run or checked, so the README cannot drift.

A fenced code block is marked by an HTML comment (invisible on GitHub) on the line before it::

    <!-- doc-test: run -->          bash: runs as one script in an empty temporary folder, in order,
                                    each training command with short limits appended (2 steps, 2
                                    validation batches, no progress bar) and every `generate` with
                                    --max-new-tokens 4; python: runs as a script
    <!-- doc-test: check -->        (the default) bash: each command is parsed without running:
                                    `lightning_cggr.train` overrides are composed by Hydra and
                                    validated (unknown keys, values, data files), `export` and
                                    `generate` arguments are parsed, `python -m experiments.X`
                                    must exist, a script path must exist; python: compiled, and
                                    every name it imports must exist
    <!-- doc-test: ci -->           bash: run verbatim by .ci/run from the repository root of a
                                    fresh clone, all ci blocks in order in one shell (installs)
    <!-- doc-test: skip REASON -->  not run; REASON says why and what covers it instead

``run`` and ``check`` take ``files=a.txt,b.txt``: those files are created (a few hundred lines of
English prose; ``.jsonl`` names get chat conversations) in the temporary folder first, so
commands naming example data work. Commands go in ``bash`` (or sh, shell, console, zsh) blocks;
a ``check`` block holding a command that cannot be checked (``pip install``, ``cd``) is an error:
mark it ``ci`` or ``skip``. Blocks without a language or in another one (yaml, text, a diagram)
are not commands and are left alone.

    python tests/readme_doctest.py ci-script [README.md]     # the ci blocks, for .ci/run
    python tests/readme_doctest.py list [README.md]          # every block with its mode
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("run", "check", "ci", "skip")
SHELL_LANGS = ("bash", "sh", "shell", "console", "zsh")
PYTHON_LANGS = ("python", "py", "python3")

MARKER = re.compile(r"<!--\s*doc-test:\s*(?P<mode>\S+)(?P<rest>.*?)-->")
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")

TRAIN_LIMITS = ("trainer.max_steps=2", "trainer.val_check_interval=2", "++trainer.limit_val_batches=2",
                "trainer.enable_progress_bar=false")
"""Appended to every training command of a ``run`` block (the last value of a key wins in Hydra)."""
GENERATE_LIMITS = ("--max-new-tokens", "4")


@dataclass
class Block:
    """One fenced code block of the README and how the doc-test treats it."""

    lang: str
    text: str
    line: int
    """1-based line of the opening fence."""
    mode: str = "check"
    reason: str = ""
    files: list[str] = field(default_factory=list)
    marked: bool = False

    @property
    def where(self) -> str:
        return f"README.md:{self.line}"

    @property
    def is_shell(self) -> bool:
        return self.lang in SHELL_LANGS

    @property
    def is_python(self) -> bool:
        return self.lang in PYTHON_LANGS


def parse_blocks(markdown: str) -> list[Block]:
    """Every fenced code block with the mode of the marker on the line before it (if any)."""
    lines = markdown.splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group("fence"), m.group("lang").lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        block = Block(lang=lang, text="\n".join(lines[start + 1 : j]) + "\n", line=start + 1)
        previous = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        marker = MARKER.search(previous)
        if marker:
            block.marked = True
            block.mode = marker.group("mode")
            rest = marker.group("rest").strip()
            files = re.search(r"\bfiles=(\S+)", rest)
            if files:
                block.files = [f for f in files.group(1).split(",") if f]
                rest = (rest[: files.start()] + rest[files.end() :]).strip()
            block.reason = rest
        blocks.append(block)
        i = j + 1
    return blocks


def marker_problems(block: Block) -> list[str]:
    """Markers that are not understood."""
    if not block.marked:
        return []
    if block.mode not in MODES:
        return [f"{block.where}: unknown doc-test mode {block.mode!r}; use one of {', '.join(MODES)}"]
    if block.mode == "skip" and not block.reason:
        return [f"{block.where}: doc-test: skip needs a reason (what covers the block instead)"]
    if block.mode in ("run", "check") and block.reason:
        return [f"{block.where}: unexpected text {block.reason!r} after doc-test: {block.mode}"]
    if block.mode == "ci" and not block.is_shell:
        return [f"{block.where}: doc-test: ci is for shell blocks; this one is {block.lang!r}"]
    return []


# ---- shell commands ------------------------------------------------------------------------------
def logical_lines(text: str) -> list[str]:
    """Lines of a shell block with backslash continuations joined; prompts ($ ) dropped."""
    out, current = [], ""
    for raw in text.splitlines():
        line = raw[2:] if raw.startswith("$ ") else raw
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        out.append(current + line)
        current = ""
    if current:
        out.append(current)
    return [line for line in out if line.strip() and not line.strip().startswith("#")]


def shell_commands(text: str) -> list[list[str]]:
    """Every simple command (argument list) of a shell block: lines split at ``&&``, ``||``, ``;``
    and ``|``; comments dropped; quoting resolved as the shell would (no expansion)."""
    commands = []
    for line in logical_lines(text):
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in ("&&", "||", ";", "|", "&"):
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(token)
        if current:
            commands.append(current)
    return commands


def lightning_entry(cmd: list[str]) -> tuple[str, list[str]] | None:
    """("train" | "export" | "generate", its arguments) for a command of this package, else None."""
    scripts = {"lightning-cggr-train": "train", "lightning-cggr-export": "export", "lightning-cggr-generate": "generate"}
    if cmd and Path(cmd[0]).name in scripts:
        return scripts[Path(cmd[0]).name], cmd[1:]
    if len(cmd) >= 3 and Path(cmd[0]).name.startswith("python") and cmd[1] == "-m" and cmd[2].startswith("lightning_cggr."):
        return cmd[2].removeprefix("lightning_cggr."), cmd[3:]
    return None


HYDRA_FLAGS_WITH_VALUE = ("--cfg", "-c", "--package", "-p", "--info", "-i", "--config-path", "-cp",
                          "--config-name", "-cn", "--config-dir", "-cd", "--experimental-rerun")


def hydra_overrides(args: list[str]) -> tuple[list[str], bool]:
    """(overrides, multirun) of a train command line: Hydra's flags and hydra.* overrides dropped."""
    overrides, multirun, skip = [], False, False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in HYDRA_FLAGS_WITH_VALUE:
            skip = arg not in ("--info", "-i")  # --info's value is optional; no value for it in README
        elif arg.startswith("-"):
            continue
        elif not arg.lstrip("+~").startswith(("hydra.", "hydra/")):
            overrides.append(arg)
    return overrides, multirun


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """One override list per value of each sweep (``a=1,2``), the other sweeps at their first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    sweeps = {i: [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
              for i, o in enumerate(parsed) if o.is_sweep_override()}
    if not sweeps:
        return [overrides]
    base = [sweeps[i][0] if i in sweeps else o for i, o in enumerate(overrides)]
    return [base[:i] + [value] + base[i + 1 :] for i, values in sweeps.items() for value in values]


def check_train(args: list[str], output_dir: Path) -> list[str]:
    """The problems of a train command's overrides: composed by Hydra, checked for unknown keys and
    validated (values, data files relative to the current folder); device checks are left out."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    from lightning_cggr.cli import hydra_problem, unknown_key_problems
    from lightning_cggr.config import parse_config
    from lightning_cggr.errors import UserError
    from lightning_cggr.train import CONF_DIR, RESERVED_TRAINER_KEYS

    overrides, multirun = hydra_overrides(args)
    problems = []
    for variant in (expand_sweeps(overrides) if multirun else [overrides]):
        try:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                cfg = compose("train", overrides=[*variant, f"output_dir={output_dir}"])
            plain = OmegaConf.to_container(cfg, resolve=True)
            problems += unknown_key_problems(plain, CONF_DIR, RESERVED_TRAINER_KEYS)
            parse_config(plain)
        except HydraException as err:
            problems.append(hydra_problem(err, CONF_DIR, RESERVED_TRAINER_KEYS))
        except UserError as err:
            problems.append(str(err))
    return problems


def check_cli_arguments(entry: str, args: list[str]) -> list[str]:
    """An export/generate command's arguments parse."""
    module = importlib.import_module(f"lightning_cggr.{entry}")
    parser = getattr(module, "build_parser", None)
    if parser is None:
        return [f"lightning_cggr.{entry} has no build_parser(); the doc-test cannot check it"]
    try:
        parser().parse_args(args)
    except SystemExit:
        return [f"lightning_cggr.{entry}: bad arguments {args}"]
    return []


def check_shell_command(cmd: list[str], folder: Path) -> list[str]:
    """Problems of one command of a ``check`` block (run with ``folder`` as the current folder)."""
    line = shlex.join(cmd)
    entry = lightning_entry(cmd)
    if entry is not None:
        name, args = entry
        if name == "train":
            return [f"`{line}`: {p}" for p in check_train(args, folder / "outputs")]
        if name in ("export", "generate"):
            return [f"`{line}`: {p}" for p in check_cli_arguments(name, args)]
        if importlib.util.find_spec(f"lightning_cggr.{name}") is None:
            return [f"`{line}`: no module lightning_cggr.{name}"]
        return []
    if len(cmd) >= 3 and Path(cmd[0]).name.startswith("python") and cmd[1] == "-m":
        module = cmd[2]
        if module == "pytest":
            return []
        if module.split(".")[0] == "experiments":
            return [] if (REPO / Path(*module.split("."))).with_suffix(".py").is_file() else [
                f"`{line}`: no module {module} in the repository"]
    if len(cmd) >= 3 and Path(cmd[0]).name.startswith("python") and cmd[1] == "-c":
        try:
            compile(cmd[2], "<python -c>", "exec")
        except SyntaxError as err:
            return [f"`{line}`: {err}"]
        return python_import_problems(cmd[2])
    if "/" in cmd[0] and not cmd[0].startswith(("/", "~")):  # a script of the repository
        return [] if (REPO / cmd[0]).exists() else [f"`{line}`: {cmd[0]} does not exist in the repository"]
    return [f"`{line}`: cannot be checked without running it; mark the block `doc-test: ci` (.ci/run runs "
            "it) or `doc-test: skip REASON`"]


# ---- python blocks -------------------------------------------------------------------------------
def python_import_problems(code: str) -> list[str]:
    """Every module and name a Python snippet imports must exist (the snippet is not run)."""
    problems = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if importlib.util.find_spec(alias.name.split(".")[0]) is None or _missing_module(alias.name):
                    problems.append(f"import {alias.name}: no such module")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if _missing_module(node.module):
                problems.append(f"from {node.module} import ...: no such module")
                continue
            module = importlib.import_module(node.module)
            for alias in node.names:
                if alias.name != "*" and not hasattr(module, alias.name) and _missing_module(f"{node.module}.{alias.name}"):
                    problems.append(f"from {node.module} import {alias.name}: {node.module} has no {alias.name}")
    return problems


def _missing_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except ModuleNotFoundError:
        return True


# ---- example files -------------------------------------------------------------------------------
def write_example_files(folder: Path, names: list[str]) -> None:
    """Example data for commands naming files: English prose (pydoc topics), chat JSONL for .jsonl."""
    from pydoc_data.topics import topics

    texts = [t for _, t in sorted(topics.items()) if t.strip()]
    for k, name in enumerate(names):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jsonl"):
            rows = [{"messages": [{"role": "user", "content": f"What is topic {i}?"},
                                  {"role": "assistant", "content": texts[i][:200]}]} for i in range(40)]
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            path.write_text("\n\n".join(texts[(k * 40 + i) % len(texts)] for i in range(40)))


# ---- scripts -------------------------------------------------------------------------------------
def run_script(block: Block, python: str, cache: str) -> str:
    """The bash script of a ``run`` block: its text verbatim after functions that add the limits
    (``python -m lightning_cggr.train``, ``lightning-cggr-*`` and ``python`` itself = this test's
    interpreter)."""
    train = " ".join(shlex.quote(a) for a in (*TRAIN_LIMITS, f"data.cache_dir={cache}"))
    generate = " ".join(GENERATE_LIMITS)
    prelude = f"""set -euo pipefail
PYTHON={shlex.quote(python)}
python() {{
  if [ "${{1:-}}" = "-m" ] && [ "${{2:-}}" = "lightning_cggr.train" ]; then "$PYTHON" "$@" {train}
  elif [ "${{1:-}}" = "-m" ] && [ "${{2:-}}" = "lightning_cggr.generate" ]; then "$PYTHON" "$@" {generate}
  else "$PYTHON" "$@"; fi
}}
python3() {{ python "$@"; }}
lightning-cggr-train() {{ python -m lightning_cggr.train "$@"; }}
lightning-cggr-export() {{ python -m lightning_cggr.export "$@"; }}
lightning-cggr-generate() {{ python -m lightning_cggr.generate "$@"; }}
"""
    return prelude + f"# --- {block.where}\n" + block.text


def ci_script(markdown: str) -> str:
    """The ``ci`` blocks in order, for .ci/run (empty when there are none)."""
    parts = [f"# --- {b.where}\n{b.text}" for b in parse_blocks(markdown) if b.mode == "ci"]
    return "".join(parts)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("ci-script", "list"):
        print(__doc__.split("\n\n")[-1], file=sys.stderr)
        return 2
    readme = Path(argv[1]) if len(argv) > 1 else REPO / "README.md"
    text = readme.read_text(encoding="utf-8")
    if argv[0] == "ci-script":
        sys.stdout.write(ci_script(text))
        return 0
    for block in parse_blocks(text):
        first = block.text.strip().splitlines()[0] if block.text.strip() else ""
        print(f"{block.where:16} {block.lang or '-':8} {block.mode:6}{'*' if block.marked else ' '} {first[:70]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
