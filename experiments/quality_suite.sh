#!/usr/bin/env bash
# Issue 14, item 3: quality per second on CPU (time-budgeted protocol of experiments/quality.py), one
# run after another (never two at once: they time steps). Results go to experiments/results/ and
# RESULTS.md / the README blocks are regenerated at the end.
#
#   bash experiments/quality_suite.sh            # all three parts, ~7.3 h on a quiet 2-core CPU
#   bash experiments/quality_suite.sh tiny       # tiny model, 400 steps x 5 seeds, 11 methods      ~2.1 h
#   bash experiments/quality_suite.sh mid        # SmolLM2 arch, 8 blocks, random init, 200 x 3, 7   ~4.1 h
#   bash experiments/quality_suite.sh smollm2    # SmolLM2-135M real weights, 1 h of runs, 3 seeds   ~1.1 h
#   QUALITY_SMOKE=1 bash experiments/quality_suite.sh [part]   # every command for a few steps, into /tmp
#
# Every method trains for at least the baseline's time W (faster ones take more steps, slower ones run
# to --steps), so a part costs about seeds x sum over methods of max(W, steps x its step time), plus
# evaluation. Step times measured with this suite's calibration on this machine in quiet moments
# (2026-11-27, load < 2; the committed throughput results agree: tiny standard 0.235 s, SmolLM2 7.5 s):
#   tiny 16x128:  standard 0.26 s; token rules 0.27-0.28 s, infobatch 0.36-0.48 s (no compute saved, every
#                 row through the head), rho_token 0.46 s (reference forward), sequence rules 0.06-0.30 s.
#                 W = 104 s; 11 methods ~23 min/seed + evaluation ~1 min; 5 seeds ~2 h; reference ~1 min.
#   mid 8x128:    standard 2.5-3.1 s (0.46x SmolLM2's, interleaved); routed methods from SmolLM2's ratios
#                 below. W = 600 s; 7 methods ~75 min/seed + evaluation ~6 min; 3 seeds ~4 h; reference
#                 (2 blocks, 200 steps) ~4 min; first GGUF load and build cache ~1 min.
#   smollm2 4x256: standard 5.9 s, importance_sequence 2.9 s, random_sequence 2.1 s, random_token 5.1 s,
#                 rho_token 8.2 s (a SmolLM2-size reference runs on every token). --budget-s 180 per method
#                 and seed (~30 steps of standard): 5 methods x 3 seeds = 45 min + slower methods to --steps
#                 ~4 min + evaluation ~7 min + calibration and builds ~4 min = ~1 h; its reference (only if
#                 an excess-loss rule is among the two best: SmolLM2 continued 30 steps) ~4 min.
# On a shared machine these figures do not hold: with 2-3 other processes on the 2 cores (OpenMP
# oversubscription) single steps took 5-20x their quiet time in the smoke runs, and calibration takes
# whatever the load is at that moment. quality.py prints its own projection ("projected training
# time") after calibrating, before each long part starts: check it.
set -euo pipefail
cd "$(dirname "$0")/.."
what=${1:-all}
smoke=${QUALITY_SMOKE:-0}

if [ "$smoke" = 1 ]; then  # a handful of steps per part: proves every command runs, measures nothing
  OUT=${QUALITY_OUT:-/tmp/quality_smoke}
  REF=${QUALITY_REF:-$OUT/references}
  TINY=(--steps 4 --seeds 0 --evals 1 --eval-batches 1 --calibrate-steps 1)
  MID=(--steps 2 --seeds 0 --evals 1 --eval-batches 1 --calibrate-steps 1)
  SMOL=(--budget-s 15 --seeds 0 --evals 1 --eval-batches 1 --calibrate-steps 1)
  REF_STEPS=3; SMOL_REF_STEPS=1
  WARM=(--cggr-warmup 1)
else
  OUT=${QUALITY_OUT:-experiments/results}
  REF=${QUALITY_REF:-$HOME/.cache/lightning_cggr/references}
  TINY=(--steps 400 --seeds 0,1,2,3,4 --evals 10 --eval-batches 4)
  MID=(--steps 200 --seeds 0,1,2 --evals 10 --eval-batches 4)
  SMOL=(--budget-s 180 --seeds 0,1,2 --evals 4 --eval-batches 2)
  REF_STEPS=200; SMOL_REF_STEPS=30
  WARM=()
fi
mkdir -p "$OUT" "$REF"

TINY_METHODS=standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence,importance_token,importance_sequence,infobatch_token,infobatch_random_token,rho_token,rho_sequence
MID_METHODS=standard_fused,importance_token,random_token,importance_sequence,random_sequence,rho_token,rho_sequence
MID_DATA=(data.batch_size=8 data.block_size=128)  # the mid preset's shape, for the reference's data

if [ "$what" = all ] || [ "$what" = tiny ]; then
  python -m lightning_cggr.routing.holdout --overwrite --out "$REF/tiny" --steps "$REF_STEPS"
  python -m experiments.quality --preset tiny "${TINY[@]}" "${WARM[@]}" --reference "$REF/tiny" \
    --methods "$TINY_METHODS" --out "$OUT"
fi
if [ "$what" = all ] || [ "$what" = mid ]; then
  python -m lightning_cggr.routing.holdout --overwrite --out "$REF/mid" --steps "$REF_STEPS" --layers 2 --lr 1e-3 \
    model=smollm2_gguf data.tokenizer=model "${MID_DATA[@]}"
  python -m experiments.quality --preset mid "${MID[@]}" "${WARM[@]}" --reference "$REF/mid" \
    --methods "$MID_METHODS" --out "$OUT"
fi
if [ "$what" = all ] || [ "$what" = smollm2 ]; then
  # standard vs the two best rules of the mid-size run vs their random controls (SMOLLM2_METHODS overrides)
  if [ -z "${SMOLLM2_METHODS:-}" ]; then
    [ -f "$OUT/quality-mid-cpu.json" ] || { echo "error: $OUT/quality-mid-cpu.json missing: run the mid part first or set SMOLLM2_METHODS" >&2; exit 2; }
    SMOLLM2_METHODS=$(python -c "import json, sys; from experiments.quality_stats import best_with_controls; \
print(','.join(best_with_controls(json.load(open(sys.argv[1])), 2)))" "$OUT/quality-mid-cpu.json")
  fi
  echo "smollm2 methods: $SMOLLM2_METHODS" >&2
  REFARG=()
  if [[ "$SMOLLM2_METHODS" == *rho_* ]]; then
    python -m lightning_cggr.routing.holdout --overwrite --out "$REF/smollm2" --init pretrained --steps "$SMOL_REF_STEPS" \
      --lr 3e-4 model=smollm2_gguf data.tokenizer=model data.batch_size=4 data.block_size=256
    REFARG=(--reference "$REF/smollm2")
  fi
  python -m experiments.quality --preset smollm2 "${SMOL[@]}" --cggr-warmup 0 "${REFARG[@]}" \
    --methods "$SMOLLM2_METHODS" --out "$OUT"
fi
if [ "$smoke" = 1 ]; then
  python -m experiments.report --results "$OUT" --readme ''
else
  python -m experiments.report
fi
