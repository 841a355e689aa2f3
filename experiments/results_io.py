"""Where results go and what they record: the environment, JSON + markdown files, load sampling,
table formatting and the common end of every experiment (:func:`publish`)."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from experiments.stats import median

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_tag(device: str) -> str:
    """'cpu' or a short slug of the GPU name ('h100', 'h200', 'a100', ...)."""
    if not device.startswith("cuda"):
        return "cpu"
    import torch

    name = torch.cuda.get_device_name(0).lower()
    for key in ("h200", "h100", "a100", "l40s", "a10", "l4", "v100", "t4", "4090", "3090", "3060"):
        if key in name:
            return key
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: str) -> dict[str, Any]:
    """Versions, hardware, git commit and load: everything a reader needs to judge the numbers."""
    import torch

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("lightning", "transformers", "triton", "hydra", "omegaconf", "gguf"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is a fact worth recording
            versions[mod] = None
    hw = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
    }
    if device.startswith("cuda"):
        p = torch.cuda.get_device_properties(0)
        hw.update(gpu=p.name, gpu_memory_bytes=p.total_memory, cuda=torch.version.cuda)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        # code changes only: results written by an earlier run of the same suite do not count
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", ".", ":(exclude)experiments/results"],
                                    cwd=REPO, capture_output=True, text=True).stdout)
    except OSError:
        commit, dirty = None, None
    return {
        "device": device,
        "device_tag": device_tag(device),
        "versions": versions,
        "hardware": hw,
        "git_commit": commit,
        "git_tree_dirty": dirty,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
        "argv": sys.argv,
    }


def results_path(experiment: str, device: str, suffix: str, out_dir: Path | None = None) -> Path:
    d = Path(out_dir) if out_dir else RESULTS_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d / f"{experiment}-{device_tag(device)}.{suffix}"


def write_results(payload: dict[str, Any], experiment: str, device: str, markdown: str, out_dir=None) -> Path:
    payload.setdefault("environment", {})["loadavg_end"] = os.getloadavg()
    path = results_path(experiment, device, "json", out_dir)
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    results_path(experiment, device, "md", out_dir).write_text(markdown + "\n")
    return path


class LoadSampler:
    """Samples the 1-minute load average every ``every`` seconds in a thread (machine busyness)."""

    def __init__(self, every: float = 15.0):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.samples.append(round(os.getloadavg()[0], 2))
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=1)

    def summary(self) -> dict[str, Any]:
        s = self.samples or [os.getloadavg()[0]]
        return {"samples_1min": s, "max": max(s), "median": round(median(s), 2)}


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; None renders as an em dash."""
    def cell(v):
        return "—" if v is None else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def publish(payload: dict, name: str, device: str, markdown: Callable[[dict], str], out_dir=None,
            plot: Callable | None = None) -> int:
    """The end of every experiment: JSON + markdown (+ PNG) under the results folder, the table on
    stdout, where it went on stderr; returns the exit status 0."""
    md = markdown(payload)
    path = write_results(payload, name, device, md, out_dir)
    if plot is not None:
        try_plot(plot, payload, results_path(name, device, "png", out_dir))
    print(md)
    print(f"\nwrote {path}", file=sys.stderr)
    return 0


def fmt_x(v) -> str | None:
    """A ratio for a table cell ("1.27x"), or None (an empty cell)."""
    return None if v is None else f"{v:.2f}x"


def fmt_f0(v) -> str | None:
    return None if v is None else f"{v:.0f}"


def fmt_mib(v) -> str | None:
    """Bytes as whole MiB for a table cell, or None."""
    return None if v is None else f"{v / 2**20:.0f}"


def try_plot(draw: Callable, payload: dict, path: Path) -> None:
    """Draw a PNG if matplotlib is installed (GPU machines may lack it: ``python -m experiments.report``
    redraws every plot from the JSON later)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"note: matplotlib missing, {path.name} not drawn; run python -m experiments.report later",
              file=sys.stderr)
        return
    draw(payload, path)


def r2(x):
    """A load figure for prose: two decimals, or a dash."""
    return "—" if x is None else f"{float(x):.2f}"
