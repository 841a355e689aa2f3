"""Measurement points in fresh processes: peak memory that belongs to one method alone, and a sweep
that survives out-of-memory errors, the kernel's OOM killer and a runaway RSS.

Processes are forked from a ``forkserver`` that has imported torch/lightning/transformers but run no
tensor work, so each starts from the same import-only footprint without paying the import.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
import time
import traceback
from typing import Any, Callable, Sequence

from experiments.bench import (BatchStream, Runner, build_model_and_data, built_shape, current_rss_bytes,
                              peak_rss_bytes)
from experiments.compose import set_threads
from experiments.stats import median


def measure_point(spec: dict[str, Any]) -> dict[str, Any]:
    """Build one method's model, run warm-up + timed steps at one batch size, report time and memory.

    spec: config (resolved), device, warmup, steps, optional cuda_budget_bytes. Run in a fresh process
    (:func:`run_isolated`) so peak RSS / peak CUDA memory belong to this method alone.
    """
    import torch

    device = spec["device"]
    cuda = device.startswith("cuda")
    set_threads(spec.get("threads"))
    rss_start = current_rss_bytes()
    if cuda and spec.get("cuda_budget_bytes"):  # a real allocator limit: over budget raises OOM
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec["cuda_budget_bytes"] / total))
    _, model, dm = build_model_and_data(spec["config"])
    model.to(device).train()
    n = spec["warmup"] + spec["steps"]
    runner = Runner(model, spec["config"], device, total_steps=n)
    k = runner.accumulate
    stream = BatchStream(dm.train_dataloader, device)
    batches = [[stream[i * k + j] for j in range(k)] for i in range(n)]
    B, T = batches[0][0]["input_ids"].shape
    rss_built = current_rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        cuda_built = torch.cuda.memory_allocated()
    times = []
    for i, micro in enumerate(batches):
        dt, _ = runner.train_step(micro)
        if i >= spec["warmup"]:
            times.append(dt)
    out = {
        "status": "ok",
        "batch_size": B,
        "block_size": T,
        "step_times_s": times,
        "median_step_s": median(times),
        "tokens_per_s": B * T * k / median(times),
        "rss_start_bytes": rss_start,
        "rss_after_build_bytes": rss_built,
        "peak_rss_bytes": peak_rss_bytes(),
        "loss_impl": runner.step.loss_impl,
        "built_shape": built_shape(model, spec["config"]),
    }
    if cuda:
        out["cuda_after_build_bytes"] = cuda_built
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated()
        out["peak_bytes"] = out["cuda_peak_bytes"]
    else:
        out["peak_bytes"] = out["peak_rss_bytes"]
    return out


def is_oom(err: BaseException) -> bool:
    """CUDA out-of-memory, a host MemoryError, or the allocator's 'can't allocate' RuntimeError."""
    try:
        import torch

        if isinstance(err, torch.OutOfMemoryError):
            return True
    except ImportError:
        pass
    if isinstance(err, MemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def guarded(fn: Callable[[dict], dict], spec: dict) -> dict:
    """Run ``fn(spec)``; an out-of-memory becomes {'status': 'oom'}, any other error {'status': 'error'}."""
    try:
        return fn(spec)
    except BaseException as err:  # noqa: BLE001 - the sweep must survive every point
        if isinstance(err, KeyboardInterrupt):
            raise
        status = "oom" if is_oom(err) else "error"
        return {"status": status, "error": f"{type(err).__name__}: {' '.join(str(err).split())[:500]}",
                "traceback": traceback.format_exc()[-3000:]}


WATCHDOG_EXIT = 77


def _watchdog(limit_bytes: int, every: float = 0.02) -> None:
    if current_rss_bytes() > limit_bytes:  # already over: no race with a fast point
        os._exit(WATCHDOG_EXIT)

    def loop():
        while True:
            if current_rss_bytes() > limit_bytes:
                os._exit(WATCHDOG_EXIT)
            time.sleep(every)

    threading.Thread(target=loop, daemon=True).start()


def _resolve_target(target: str) -> Callable[[dict], dict]:
    mod, _, fn = target.partition(":")
    return getattr(__import__(mod, fromlist=[fn]), fn)


def _child_main(target: str, spec: dict, conn) -> None:
    if spec.get("rss_kill_bytes"):
        _watchdog(int(spec["rss_kill_bytes"]))
    conn.send(guarded(_resolve_target(target), spec))
    conn.close()


PRELOAD = ["experiments.isolate", "torch", "lightning", "transformers", "lightning_cggr.step",
           "lightning_cggr.data", "lightning_cggr.models", "lightning_cggr.config"]

_CTX = None


def _context(preload: Sequence[str]):
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(list(preload))
    return _CTX


def run_isolated(target: str, spec: dict, timeout_s: float = 600.0, preload: Sequence[str] = PRELOAD) -> dict:
    """``target`` ('module:function') on ``spec`` in a fresh forked process; never raises for the point.

    A process killed by a signal (the kernel's OOM killer) or by the RSS watchdog is 'killed' (does
    not fit); a timeout is 'error'.
    """
    ctx = _context(preload)
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(target, spec, send))
    proc.start()
    send.close()
    result = None
    try:
        if recv.poll(timeout_s):
            result = recv.recv()
    except EOFError:
        result = None
    proc.join(timeout=10 if result is not None else 1)
    if proc.is_alive():
        proc.kill()
        proc.join()
        return result or {"status": "error", "error": f"timed out after {timeout_s:.0f} s"}
    if result is not None:
        return result
    code = proc.exitcode
    if code == WATCHDOG_EXIT:
        return {"status": "killed", "error": f"RSS over the hard cap of {spec.get('rss_kill_bytes', 0) / 2**20:.0f} MiB"}
    if code is not None and code < 0:
        return {"status": "killed", "error": f"process killed by signal {-code} (out of memory?)"}
    return {"status": "error", "error": f"worker exited with code {code} and no result"}
