"""The package as a user installs it: a wheel in a fresh virtualenv, run from an empty folder.

The wheel is built from a copy of the sources (no stale ``build/``), installed into a new venv
without its dependencies, which come from this interpreter's site-packages through a ``.pth`` file
placed after the venv's own (so the wheel's ``lightning_cggr`` wins, and nothing is downloaded).
Then the console scripts run: 5 training steps in an empty folder, and an export of that run.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kwargs)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "lightning_cggr", src / "lightning_cggr", ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--wheel-dir", str(dist), str(src)])
    (built,) = dist.glob("lightning_cggr-*.whl")
    return built


def test_wheel_ships_configs_samples_and_console_scripts(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    conf = REPO / "lightning_cggr" / "conf"
    for yaml in conf.rglob("*.yaml"):
        assert f"lightning_cggr/conf/{yaml.relative_to(conf).as_posix()}" in names
    assert "lightning_cggr/data/samples/chat.jsonl" in names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = zipfile.ZipFile(wheel).read(entry_points).decode()
    for line in ("lightning-cggr-train = lightning_cggr.train:cli", "lightning-cggr-export = lightning_cggr.export:main",
                 "lightning-cggr-generate = lightning_cggr.generate:main"):
        assert line in scripts


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_trains_5_steps_from_an_empty_folder_and_exports(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--quiet", str(wheel)])
    own = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (own / "zz_dependencies.pth").write_text("\n".join(sorted(deps)) + "\n")

    work = tmp_path / "empty"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", LIGHTNING_CGGR_CACHE=str(tmp_path / "cache"))
    where = run([str(python), "-c", "import lightning_cggr; print(lightning_cggr.__file__)"], cwd=work, env=env)
    assert Path(where.stdout.strip()).is_relative_to(own)  # the wheel's copy, not the source tree

    run(["lightning-cggr-train", "trainer.max_steps=5", "trainer.val_check_interval=5", "trainer.log_every_n_steps=1",
         "+trainer.limit_val_batches=2", "trainer.enable_progress_bar=false"], cwd=work, env=env)
    (run_dir,) = (work / "outputs").glob("*/*")  # outputs/<date>/<time>
    rows = list(csv.DictReader(open(run_dir / "csv" / "metrics.csv")))
    assert max(int(r["step"]) for r in rows if r.get("train/loss")) == 4  # 5 steps: 0..4
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "model" / "tokenizer.json").is_file()

    run(["lightning-cggr-export", str(run_dir), "hf"], cwd=work, env=env)
    assert (work / "hf" / "model.safetensors").is_file()
