"""Benchmarks of lightning_cggr (never imported by the package). Each reproduces its table on CPU:

    python -m experiments.throughput --preset tiny      # equal batch: step time, tokens/s, peak memory
    python -m experiments.sweep sweep=cpu_tiny          # equal memory budget: largest batch, tokens/s
    python -m experiments.quality --preset tiny         # time-budgeted: loss at equal time/steps, time to target
    bash experiments/quality_suite.sh                   # issue 14's quality runs (tiny, mid, SmolLM2), hours
    python -m experiments.report                        # results/*.json -> results/RESULTS.md + plots
    bash experiments/gpu_suite.sh                       # all of it on one GPU, <= 8 min, into $OUT

Every benchmark trains through the package's own step (:mod:`lightning_cggr.step`) via
:class:`experiments.bench.Runner`. Modules by concern: ``methods`` (the compared methods as config
overrides), ``compose`` (presets + Hydra composition + validation, the command line), ``bench``
(building, batches, the runner), ``isolate`` (fresh-process measurement points), ``stats`` (pure
summaries), ``quality_stats`` (schedule sizing, time to target, paired tests, the verdict rule),
``results_io`` (environment, files, tables). Shapes are ``presets/bench/*.yaml``,
sweep grids ``presets/sweep/*.yaml``.
"""
