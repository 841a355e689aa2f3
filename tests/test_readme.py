"""README.md cannot drift: its commands are run or checked, its references exist.

How blocks are marked: see tests/readme_doctest.py. The README tests switch on once README.md
carries its first ``<!-- doc-test: ... -->`` marker; the mechanism itself is tested on examples here.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from readme_doctest import (
    GENERATE_LIMITS,
    REPO,
    TRAIN_LIMITS,
    Block,
    check_shell_command,
    ci_script,
    marker_problems,
    parse_blocks,
    python_import_problems,
    run_script,
    shell_commands,
    write_example_files,
)

from lightning_cggr.train import CONF_DIR

README = REPO / "README.md"
TEXT = README.read_text(encoding="utf-8")
BLOCKS = parse_blocks(TEXT)
ACTIVE = "<!-- doc-test:" in TEXT
readme_only = pytest.mark.skipif(not ACTIVE, reason="README.md has no doc-test markers yet (see tests/readme_doctest.py)")


def checked_blocks() -> list[Block]:
    return [b for b in BLOCKS if b.mode == "check" and (b.is_shell or b.is_python)]


def check_block(block: Block, folder: Path) -> list[str]:
    """Every problem of a ``check`` block, run from ``folder`` (its example files created there)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_example_files(folder, block.files)
    old = Path.cwd()
    os.chdir(folder)
    try:
        if block.is_python:
            compile(block.text, block.where, "exec")
            return python_import_problems(block.text)
        return [p for cmd in shell_commands(block.text) for p in check_shell_command(cmd, folder)]
    finally:
        os.chdir(old)


def run_block(block: Block, folder: Path, cache: Path) -> subprocess.CompletedProcess:
    folder.mkdir(parents=True, exist_ok=True)
    write_example_files(folder, block.files)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "1"}
    if block.is_python:
        cmd = [sys.executable, "-c", block.text]
    else:
        cmd = ["bash", "-c", run_script(block, sys.executable, str(cache))]
    return subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=900)


# ---- the mechanism, on examples ------------------------------------------------------------------
EXAMPLE = """# Title

<!-- doc-test: skip needs a GPU; experiments/gpu_suite.sh runs it -->
```bash
python -m lightning_cggr.train trainer=gpu
```

```bash
python -m lightning_cggr.train trainer.max_steps=50   # shorter
python -m lightning_cggr.train data.source=files \\
    'data.paths=[a.txt,b.txt]' && python -m lightning_cggr.export outputs/x my-model
```

<!-- doc-test: check files=a.txt,b.txt -->
```bash
python -m lightning_cggr.train data.source=files 'data.paths=[a.txt,b.txt]'
```

<!-- doc-test: ci -->
```bash
pip install -e ".[test]"
```

```yaml
not: a command
```
"""


def test_blocks_and_markers_are_parsed():
    blocks = parse_blocks(EXAMPLE)
    assert [(b.lang, b.mode, b.marked) for b in blocks] == [
        ("bash", "skip", True), ("bash", "check", False), ("bash", "check", True), ("bash", "ci", True),
        ("yaml", "check", False)]
    assert blocks[0].reason == "needs a GPU; experiments/gpu_suite.sh runs it" and blocks[0].line == 4
    assert blocks[2].files == ["a.txt", "b.txt"] and blocks[2].reason == ""
    assert shell_commands(blocks[1].text) == [
        ["python", "-m", "lightning_cggr.train", "trainer.max_steps=50"],
        ["python", "-m", "lightning_cggr.train", "data.source=files", "data.paths=[a.txt,b.txt]"],
        ["python", "-m", "lightning_cggr.export", "outputs/x", "my-model"],
    ]
    assert ci_script(EXAMPLE) == f"# --- README.md:{blocks[3].line}\npip install -e \".[test]\"\n"
    assert not any(marker_problems(b) for b in blocks)
    bad = parse_blocks("<!-- doc-test: skip -->\n```bash\nx\n```\n<!-- doc-test: walk -->\n```bash\ny\n```\n")
    assert [len(marker_problems(b)) for b in bad] == [1, 1]


def test_check_finds_drift_and_passes_what_is_right(tmp_path):
    blocks = parse_blocks(EXAMPLE)
    assert check_block(blocks[2], tmp_path / "ok") == []  # the files exist there
    problems = check_block(blocks[1], tmp_path / "drift")  # no files created: a.txt is missing
    assert len(problems) == 1 and "data.paths: a.txt does not exist" in problems[0]
    drift = Block("bash", "python -m lightning_cggr.train cggr.scorng=entropy\n"
                          "python -m lightning_cggr.train +trainer.max_step=5 -m cggr.scoring=entropy,mrgin\n"
                          "python -m lightning_cggr.generate\npip install lightning-cggr\n"
                          "python -m experiments.nothing_here\n", 1)
    found = check_block(drift, tmp_path / "more")
    assert any("cggr.scorng: no such setting; did you mean cggr.scoring?" in p for p in found)
    assert any("trainer.max_step: not an argument of lightning.Trainer" in p for p in found)
    assert any("cggr.scoring='mrgin'" in p for p in found)
    assert any("lightning_cggr.generate: bad arguments" in p for p in found)
    assert any("pip install lightning-cggr" in p and "doc-test: ci" in p for p in found)
    assert any("no module experiments.nothing_here" in p for p in found)


def test_python_blocks_are_checked_for_names_that_moved():
    assert python_import_problems("from lightning_cggr.models.gguf import load_smollm2_gguf\n") == []
    assert python_import_problems("from lightning_cggr.gguf import load_smollm2_gguf\n") == [
        "from lightning_cggr.gguf import ...: no such module"]
    assert python_import_problems("from lightning_cggr.export import export, nothing\n") == [
        "from lightning_cggr.export import nothing: lightning_cggr.export has no nothing"]


def test_run_block_adds_the_limits_to_every_command_and_they_win(tmp_path):
    """A run block's commands reach the interpreter with the limits after the README's own values
    (console scripts as ``python -m``), and Hydra takes the limit. The real commands of the README's
    run blocks are run by test_readme_run_blocks; here a stand-in interpreter records its arguments."""
    block = Block("bash", "python -m lightning_cggr.train hydra.run.dir=runs/demo trainer.max_steps=500 \\\n"
                          "    model.num_layers=2\n"
                          "lightning-cggr-export runs/demo my-model\n"
                          "python -m lightning_cggr.generate my-model \"The for statement\" --max-new-tokens 500\n"
                          "python3 -c pass\n", 1, mode="run", marked=True)
    record = tmp_path / "python"
    record.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s|" "$a"; done; echo\n')
    record.chmod(0o755)
    done = subprocess.run(["bash", "-c", run_script(block, str(record), "CACHE")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = [line.rstrip("|").split("|") for line in done.stdout.splitlines()]
    train = ["-m", "lightning_cggr.train", "hydra.run.dir=runs/demo", "trainer.max_steps=500", "model.num_layers=2"]
    assert calls == [
        train + [*TRAIN_LIMITS, "data.cache_dir=CACHE"],
        ["-m", "lightning_cggr.export", "runs/demo", "my-model"],
        ["-m", "lightning_cggr.generate", "my-model", "The for statement", "--max-new-tokens", "500",
         *GENERATE_LIMITS],
        ["-c", "pass"],
    ]
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[a for a in calls[0][2:] if not a.startswith("hydra.")])
    assert cfg.trainer.max_steps == 2 and cfg.trainer.limit_val_batches == 2  # the last value of a key wins


# ---- README.md itself ----------------------------------------------------------------------------
@readme_only
def test_readme_markers_are_understood():
    assert [p for b in BLOCKS for p in marker_problems(b)] == []


@readme_only
@pytest.mark.parametrize("block", checked_blocks(), ids=[b.where for b in checked_blocks()])
def test_readme_check_blocks(block, tmp_path):
    assert check_block(block, tmp_path) == []


RUN_BLOCKS = [b for b in BLOCKS if b.mode == "run" and (b.is_shell or b.is_python)]


@readme_only
@pytest.mark.slow
@pytest.mark.parametrize("block", RUN_BLOCKS, ids=[b.where for b in RUN_BLOCKS])
def test_readme_run_blocks(block, tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme-run")
    done = run_block(block, folder, tmp_path_factory.getbasetemp() / "tokenizer-cache")
    assert done.returncode == 0, f"{block.where}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


REFERENCE = re.compile(r"`([^`\s]+)`")
PATH_ROOTS = ("lightning_cggr/", "experiments/", "tests/", ".ci/")


def reference_problems(markdown: str) -> list[str]:
    """Inline code naming a repository path or a ``lightning_cggr.x`` name, and relative links
    (and #anchors), that do not exist."""
    problems = []
    prose = re.sub(r"^(`{3,}|~{3,}).*?^\1", "", markdown, flags=re.S | re.M)  # fenced blocks: commands
    for ref in sorted(set(REFERENCE.findall(prose))):
        ref = ref.rstrip(".,:;")
        if ref.startswith(PATH_ROOTS) and not any(c in ref for c in "*<>{}$"):
            if not (REPO / ref.split("#")[0]).exists():
                problems.append(f"`{ref}`: no such path in the repository")
        elif re.fullmatch(r"lightning_cggr(\.\w+)+", ref) and not _resolves(ref):
            problems.append(f"`{ref}`: no such module or attribute")
    anchors = {_anchor(h) for h in re.findall(r"^#+\s+(.*)$", prose, flags=re.M)}
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"\w+://|mailto:", target):
            continue
        path, _, anchor = target.partition("#")
        if path and not (REPO / path).exists():
            problems.append(f"link {target}: no such path in the repository")
        elif not path and anchor not in anchors:
            problems.append(f"link {target}: no heading with that anchor")
    return problems


def _anchor(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _resolves(dotted: str) -> bool:
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def test_reference_check_finds_dangling_names():
    md = ("See `lightning_cggr/conf/cggr/` and `lightning_cggr.models.gguf.load_smollm2_gguf`, not "
          "`lightning_cggr/nowhere.py` or `lightning_cggr.router.TruncatedRouter`; [up](#a-title), "
          "[gone](#nothing), [file](pyproject.toml), [lost](docs/x.md).\n\n## A title\n")
    assert reference_problems(md) == [
        "`lightning_cggr.router.TruncatedRouter`: no such module or attribute",
        "`lightning_cggr/nowhere.py`: no such path in the repository",
        "link #nothing: no heading with that anchor",
        "link docs/x.md: no such path in the repository",
    ]


@readme_only
def test_readme_references_exist():
    assert reference_problems(TEXT) == []
