#!/usr/bin/env bash
# Every CPU table in experiments/results/, one after the other (never two at once: they time steps).
#
#   bash experiments/cpu_suite.sh            # all, about 65 minutes on 2 cores
#   bash experiments/cpu_suite.sh tiny       # only the tiny-model experiments (~20 min)
#   bash experiments/cpu_suite.sh smollm2    # only SmolLM2-135M (offline GGUF; ~45 min)
#
# Each command is also runnable alone; the settings here are the ones the committed results used.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}

if [ "$what" = all ] || [ "$what" = tiny ]; then
  python -m experiments.throughput --preset tiny --steps 20 --warmup 2
  python -m experiments.quality --preset tiny --steps 80 --eval-every 20 --eval-batches 4 --seeds 0,1,2 data.batch_size=8
  python -m experiments.sweep --deadline-s 480 sweep=cpu_tiny
fi
if [ "$what" = all ] || [ "$what" = smollm2 ]; then
  python -m experiments.throughput --preset smollm2 --steps 10 --warmup 1 --mem-steps 1 \
    --methods standard_naive,standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence,cggr_final
  python -m experiments.quality --preset smollm2 --steps 10 --eval-every 5 --eval-batches 2 --seeds 0,1,2 --cggr-warmup 0 --max-factor 5 \
    --methods standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence,cggr_final
  python -m experiments.sweep --deadline-s 420 sweep=cpu_smollm2
fi
python -m experiments.report
