"""Where a step's time goes: a ``torch.profiler`` run of a few steps, summarized per step.

:func:`profile_steps` runs ``step_fn`` ``steps`` times under the profiler (CPU, and CUDA on a GPU)
and :func:`summarize` keeps what says where the time goes:

- ``top_device_kernels``: the GPU kernels with the most self time (ms per step, launches per step);
- ``top_cpu_ops``: the host-side operators and runtime calls with the most self CPU time;
- ``syncs_per_step``: host-device synchronizations. ``cudaStreamSynchronize`` is what a read of a
  device value (``.item()``, ``bool(tensor)``, a device-to-host copy) waits on: the number to watch.
  ``cudaDeviceSynchronize`` includes the harness's own two per step (before and after the timed
  step, ``experiments.bench.Runner``). ``aten::item`` / ``aten::_local_scalar_dense`` count reads
  of any scalar, also host tensors that cost no sync (AdamW's step counter when not fused);
- ``kernel_launches_per_step``: kernel launches issued by the host (runtime and driver API);
  together with the CPU op times it tells a launch-bound step from a compute-bound one.
"""

from __future__ import annotations

from typing import Any, Callable

LAUNCH_CALLS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx",
                "cudaLaunchCooperativeKernel", "cudaGraphLaunch")
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "aten::item", "aten::_local_scalar_dense")
HARNESS_DEVICE_SYNCS_PER_STEP = 2
"""torch.cuda.synchronize() before and after each timed step (experiments.bench.Runner.train_step)."""


def _self_device_us(avg) -> float:
    for name in ("self_device_time_total", "self_cuda_time_total"):  # the name changed in torch 2.4
        value = getattr(avg, name, None)
        if value is not None:
            return float(value)
    return 0.0


def _is_device_event(avg) -> bool:
    from torch.autograd import DeviceType

    return getattr(avg, "device_type", DeviceType.CPU) != DeviceType.CPU


def summarize(averages, steps: int, top: int = 15) -> dict[str, Any]:
    """Per-step summary of ``prof.key_averages()`` (any iterable of FunctionEventAvg-like rows
    with ``key``, ``count``, ``self_cpu_time_total``, a self device time and ``device_type``)."""
    rows = list(averages)
    per = 1.0 / max(steps, 1)
    kernels = [r for r in rows if _is_device_event(r)]
    host = [r for r in rows if not _is_device_event(r)]

    def entry(r, us: float) -> dict[str, Any]:
        return {"name": r.key[:200], "self_ms_per_step": round(us * per / 1000, 4), "calls_per_step": round(r.count * per, 2)}

    kernels.sort(key=_self_device_us, reverse=True)
    host.sort(key=lambda r: float(r.self_cpu_time_total), reverse=True)
    counts = {r.key: r.count for r in host}
    device_total = sum(_self_device_us(r) for r in kernels)
    return {
        "steps": steps,
        "top_device_kernels": [entry(r, _self_device_us(r)) for r in kernels[:top]],
        "top_cpu_ops": [entry(r, float(r.self_cpu_time_total)) for r in host[:top]],
        "device_kernel_ms_per_step": round(device_total * per / 1000, 4),
        "device_kernels_per_step": round(sum(r.count for r in kernels) * per, 2),
        "kernel_launches_per_step": round(sum(counts.get(n, 0) for n in LAUNCH_CALLS) * per, 2),
        "syncs_per_step": {n: round(counts.get(n, 0) * per, 2) for n in SYNC_CALLS},
        "harness_device_syncs_per_step": HARNESS_DEVICE_SYNCS_PER_STEP,
    }


def profile_steps(step_fn: Callable[[int], Any], steps: int, cuda: bool, top: int = 15) -> dict[str, Any]:
    """Run ``step_fn(i)`` for i in range(steps) under torch.profiler; return :func:`summarize`."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step_fn(i)
        if cuda:
            torch.cuda.synchronize()
    return summarize(prof.key_averages(), steps, top)


def markdown(profiles: dict[str, dict], labels: dict[str, str]) -> str:
    """One row per method: launches, syncs and the three most expensive kernels (or CPU ops)."""
    from experiments import results_io as rio

    header = ["method", "kernel launches / step", "GPU kernel ms / step", "cudaStreamSynchronize / step",
              "aten::item / step", "top kernels (ms / step)" if _any_kernels(profiles) else "top CPU ops (ms / step)"]
    rows = []
    for m, p in profiles.items():
        if "error" in p:
            rows.append([labels.get(m, m), "FAILED: " + p["error"][:120], None, None, None, None])
            continue
        top = p["top_device_kernels"] or p["top_cpu_ops"]
        rows.append([
            labels.get(m, m), p["kernel_launches_per_step"], p["device_kernel_ms_per_step"],
            p["syncs_per_step"]["cudaStreamSynchronize"], p["syncs_per_step"]["aten::item"],
            "; ".join(f"{t['name'][:60]} {t['self_ms_per_step']:.2f}" for t in top[:3]),
        ])
    return rio.md_table(header, rows)


def _any_kernels(profiles: dict[str, dict]) -> bool:
    return any(p.get("top_device_kernels") for p in profiles.values())
