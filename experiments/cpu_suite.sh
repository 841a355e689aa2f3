#!/usr/bin/env bash
# The CPU throughput, memory-budget and loss-kernel tables in experiments/results/, one after the
# other (never two at once: they time steps). Quality per second is experiments/quality_suite.sh.
#
#   bash experiments/cpu_suite.sh            # all, about 50 minutes on a quiet 2-core CPU
#   bash experiments/cpu_suite.sh tiny       # only the tiny-model experiments (~15 min)
#   bash experiments/cpu_suite.sh smollm2    # only SmolLM2-135M (offline GGUF; ~30 min)
#   bash experiments/cpu_suite.sh kernels    # the loss alone: every impl at SmolLM2's head (~5 min)
#
# Each command is also runnable alone; the settings here are the ones the committed results used.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
# every method that needs no reference model (the excess-loss rules need one: quality_suite.sh builds it)
METHODS=standard_naive,standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence,cggr_final,importance_token,importance_sequence,infobatch_token

if [ "$what" = all ] || [ "$what" = tiny ]; then
  python -m experiments.throughput --preset tiny --steps 20 --warmup 2 --methods "$METHODS"
  python -m experiments.sweep --deadline-s 480 sweep=cpu_tiny
fi
if [ "$what" = all ] || [ "$what" = smollm2 ]; then
  python -m experiments.throughput --preset smollm2 --steps 10 --warmup 1 --mem-steps 1 \
    --methods standard_naive,standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence,cggr_final,importance_sequence
  python -m experiments.sweep --deadline-s 420 sweep=cpu_smollm2
fi
if [ "$what" = all ] || [ "$what" = kernels ]; then
  python -m experiments.bench_cross_entropy --device cpu
fi
python -m experiments.report
