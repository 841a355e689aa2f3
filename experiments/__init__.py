"""Benchmarks of lightning_cggr (never imported by the package). Each reproduces its table on CPU:

    python -m experiments.throughput --preset tiny      # equal batch: step time, tokens/s, peak memory
    python -m experiments.sweep sweep=cpu_tiny          # equal memory budget: largest batch, tokens/s
    python -m experiments.quality --preset tiny         # held-out loss at equal steps and equal time
    python -m experiments.report                        # results/*.json -> results/RESULTS.md + plots
    bash experiments/gpu_suite.sh                       # all of it on one GPU, <= 8 min, into $OUT

Presets (shapes) are conf/experiment/bench_*.yaml; sweep grids conf/sweep/*.yaml; methods are the
override lists in experiments/harness.py (METHODS).
"""
