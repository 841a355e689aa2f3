#!/usr/bin/env bash
# The GPU versions of the experiments as one non-interactive run, sized for <= 8 minutes on one H100.
#
#   bash experiments/gpu_suite.sh                 # on the GPU machine, from the repository root
#   GPU_SUITE_DRY=1 bash experiments/gpu_suite.sh # a minutes-long CPU rehearsal of the same flow
#   GPU_SUITE_ONLY=fsdp,large bash experiments/gpu_suite.sh  # only the named parts, of: tests, kernel_tests,
#       loss, eager, compiled, large, graphs, graphs_decoder, targets, checkpointing, trainer, trainer_sequence, scope, routing, attention,
#       quality, mid, tiny, fsdp, sweep
#       (perf = tests,eager,compiled: issue 16)
#
# Writes under $OUT (default ./gpu_out): gpu_results.tgz (every JSON, table and plot), RESULTS-gpu.md
# and suite.log. Unpack the archive into experiments/results/ and run `python -m experiments.report`
# to fold the GPU tables (and plots, if matplotlib was missing there) into RESULTS.md.
#
# The device machines have torch, triton, transformers, lightning and torchmetrics but not
# hydra-core / omegaconf / antlr4 (the harness composes configs with Hydra): their pure-Python
# wheels are carried in experiments/wheels/ and installed offline into a scratch folder put on
# PYTHONPATH (nothing in the machine's environment changes). Real SmolLM2 weights are not used
# here: the 98 MB GGUF exceeds what travels to the machine, so the SmolLM2 rows use its exact shape
# with random weights (experiments/presets/bench/smollm2_shape.yaml), which is what throughput and memory
# depend on. Each step has a time limit; the whole suite stops starting new work after $BUDGET_S.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/gpu_out}
BUDGET_S=${GPU_SUITE_BUDGET_S:-450}
mkdir -p "$OUT"
RES=$(mktemp -d)/results
mkdir -p "$RES"
LOG="$OUT/suite.log"
START=$(date +%s)
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "[gpu_suite $(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }

if ! python -c "import hydra, omegaconf" 2>/dev/null; then
  DEPS=$(mktemp -d)/pydeps
  python -m pip install --quiet --no-index --no-deps --target "$DEPS" experiments/wheels/*.whl >>"$LOG" 2>&1 \
    || { say "offline install of experiments/wheels failed"; exit 2; }
  export PYTHONPATH="$DEPS${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! python -c "import pytest" 2>/dev/null; then  # for the GPU-only tests (step 0)
  PYDEPS=$(mktemp -d)/pytest
  python -m pip install --quiet --no-index --no-deps --target "$PYDEPS" experiments/wheels/pytest/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH="$PYDEPS${PYTHONPATH:+:$PYTHONPATH}" || say "offline install of pytest failed"
fi
if ! python -c "import liger_kernel" 2>/dev/null; then  # the loss benchmark's peer and loss.impl=liger
  LIGER=$(mktemp -d)/liger
  python -m pip install --quiet --no-index --no-deps --target "$LIGER" experiments/wheels/liger/*.whl >>"$LOG" 2>&1 \
    && export PYTHONPATH="$LIGER${PYTHONPATH:+:$PYTHONPATH}" || say "offline install of liger-kernel failed"
fi
export PYTEST_DISABLE_PLUGIN_AUTOLOAD=1  # the machine's pytest plugins crash older carried pytest wheels
export LIGHTNING_CGGR_CACHE=${LIGHTNING_CGGR_CACHE:-$(mktemp -d)/cache}
export TOKENIZERS_PARALLELISM=false

if [ "${GPU_SUITE_DRY:-0}" = "1" ]; then
  # GRAPHS: CUDA graphs need CUDA (the harness runs the job's checks, which refuse them elsewhere)
  GRAPHS=true
  DEV=cpu; SHAPE=(data.batch_size=2 data.block_size=64 model.num_layers=4); LARGE=(data.batch_size=4 data.block_size=64 model.num_layers=4); S=(--steps 2 --warmup 1); SC=(--steps 1 --warmup 2); SCX=(perf.compile_backend=aot_eager)
  P=(--profile --profile-steps 1)
  FSDP=(trainer.strategy=fsdp2 trainer.devices=2 trainer.max_steps=4)
  LOSSX=(--shapes 64x1000x128 --repeats 2 --variants torch:32,torch:16:weight,torch:rule:bias --profile torch,gemm_floor)
  TC=(--device cpu --steps 6 --skip 2 --settings false,true checkpoint.every_n_steps=1000 perf.compile_backend=aot_eager model.num_layers=2 data.batch_size=2 data.block_size=64)
  MID=(--steps 4 --seeds 0,1 --evals 2 --eval-batches 1 --calibrate-steps 1); MIDX=(model.num_layers=2 data.batch_size=4 data.block_size=64)
  Q=(--steps 4 --eval-every 2 --eval-batches 1); SW=(sweep.device=cpu sweep.batch_sizes=[2,4] sweep.steps=1 sweep.warmup=1 sweep.memory_budget_mib=8000 data.block_size=64 model.num_layers=4)
else
  GRAPHS=reduce-overhead
  DEV=cuda; SHAPE=(data.batch_size=8 data.block_size=2048); LARGE=(data.batch_size=32 data.block_size=2048); S=(--steps 15 --warmup 3); SC=(--steps 12 --warmup 4); SCX=()
  P=(--profile --profile-steps 3)
  FSDP=(trainer=gpu trainer.strategy=fsdp trainer.devices=1 trainer.max_steps=30 trainer.val_check_interval=30)
  LOSSX=(--variants triton:4096,triton:2048,triton:512,triton:2048:weight,triton:256:weight,triton:rule:weight,triton:rule:bias --profile triton,gemm_floor)
  TC=(--device cuda --steps 40 --skip 10 --settings false,true,reduce-overhead --timeout-s 110 trainer=gpu checkpoint.every_n_steps=1000
      model.hidden_size=576 model.num_layers=30 model.num_heads=9 model.intermediate_size=1536 model.max_position_embeddings=2048
      data.batch_size=8 data.block_size=2048)
  MID=(--steps 200 --seeds 0,1,2 --evals 8 --eval-batches 4); MIDX=(model.num_layers=8 data.batch_size=16 data.block_size=512)
  Q=(--steps 60 --eval-every 15 --eval-batches 4); SW=()
fi
python - <<'EOF' >>"$LOG" 2>&1
import torch, sys
print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", file=sys.stderr)
EOF
nvidia-smi >>"$LOG" 2>&1 || true

step() {  # step <seconds cap> <module> <args...>
  local cap=$1; shift
  local t; t=$(left)
  if [ "$t" -lt 20 ]; then say "SKIPPED (suite budget spent): $*"; return; fi
  [ "$cap" -gt "$t" ] && cap=$t
  say "start (limit ${cap}s): python -m $*"
  timeout --signal=TERM --kill-after=10 "$cap" python -m "$@" >>"$LOG" 2>&1
  say "done rc=$?: $1"
}

# perf.compile defaults to auto (compiled on CUDA); the eager parts say perf.compile=false, as when measured
EAGER=(perf.compile=false)
ONLY=${GPU_SUITE_ONLY:-}
[ "$ONLY" = perf ] && ONLY=tests,eager,compiled
part() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }  # part <name>: whether this part of the suite runs

# 0. the GPU-only tests: Triton kernels on CUDA (no host sync, no [N, V] logits, int64 offsets),
#    Lightning's FSDPStrategy (FSDP1) wrapping each block once with the router running, and the whole
#    optimizer step on packed text without a synchronizing call (tests/test_perf.py); JUnit XML kept
if part tests; then
  step 120 pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py tests/test_ddp.py tests/test_perf.py --junitxml="$RES/gpu_tests.xml"
elif part kernel_tests; then  # the loss kernels' GPU tests alone
  step 90 pytest -q -m gpu -p no:cacheprovider tests/test_kernels.py --junitxml="$RES/gpu_tests.xml"
fi
# 0b. the user's FSDP command end to end (on the rehearsal: FSDP2 on 2 CPU processes); metrics kept
part fsdp && step 90 lightning_cggr.train "${FSDP[@]}" output_dir="$RES/fsdp_run" hydra.run.dir="$RES/fsdp_run/hydra" \
  trainer.enable_progress_bar=false
rm -rf "$RES/fsdp_run/checkpoints"  # weights do not travel back
# 1. the loss alone at both heads (SmolLM2 576 x 49152, Llama-3 4096 x 128256), every impl incl. Liger,
#    ratio 1.0 and 0.25 (compacted), interleaved (issue 11's targets are checked in its report)
#    plus the frontier of loss.chunk_size / loss.grad_accum, the GEMMs-alone bound and a profile of each call
part loss && step 150 experiments.bench_cross_entropy --device "$DEV" --budget-s 100 --out "$RES" "${LOSSX[@]}"
# 1c. SmolLM2's shape, eager, with MFU and a torch.profiler summary per method (issue 16: where the time goes)
MAIN=standard_naive,standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence,cggr_final,importance_sequence
part eager && step 150 experiments.throughput --device "$DEV" --preset smollm2_shape "${S[@]}" --out "$RES" "${P[@]}" --methods "$MAIN" "${SHAPE[@]}" "${EAGER[@]}"
# 1d. the same with every decoder block compiled (perf.compile=true), same efficiency options for every
#     method; the first steps include compilation (dropped as warm-up). The rehearsal traces with
#     aot_eager instead of generating kernels (CPU inductor would take minutes at this shape)
part compiled && step 180 experiments.throughput --device "$DEV" --preset smollm2_shape "${SC[@]}" --out "$RES" "${P[@]}" \
  --name throughput-smollm2_shape_compiled \
  --methods standard_naive,standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence \
  "${SHAPE[@]}" perf.compile=true "${SCX[@]}"
# 1e. the same compiled step at 4x the batch (32 x 2048): whether the step is bound by the host (launch and
#     Python cost per step, fixed) or by the GPU's math, which routing removes
part large && step 150 experiments.throughput --device "$DEV" --preset smollm2_shape "${SC[@]}" --out "$RES" \
  --name throughput-smollm2_shape_compiled_b32 --methods standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence \
  "${LARGE[@]}" perf.compile=true "${SCX[@]}"
# 1f. the 8 x 2048 compiled step with each compiled block replayed as a CUDA graph (perf.compile=reduce-overhead):
#     the host's launch cost per block goes, the eager parts (loss, selection, optimizer) stay
part graphs && step 150 experiments.throughput --device "$DEV" --preset smollm2_shape "${SC[@]}" --out "$RES" "${P[@]}" \
  --name throughput-smollm2_shape_cudagraphs --methods standard_fused,cggr_combined,random_token,cggr_sequence,cggr_sequence_stride4,random_sequence \
  "${SHAPE[@]}" perf.compile=$GRAPHS "${SCX[@]}"
# 1f'. the same CUDA-graph step with the decoder compiled whole (perf.compile_scope=decoder): one region per pass
#     instead of 30; its profile (launches, host time per step) against 1f's
part graphs_decoder && step 200 experiments.throughput --device "$DEV" --preset smollm2_shape "${SC[@]}" --out "$RES" "${P[@]}" \
  --name throughput-smollm2_shape_cudagraphs_decoder --methods standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence \
  "${SHAPE[@]}" perf.compile=$GRAPHS perf.compile_scope=decoder "${SCX[@]}"
# 1f''. issue 16's targets with every host-overhead lever on at once (CUDA graphs, the decoder one region, the
#      routing decision compiled, sequence routing scoring every 4th token): standard's MFU and the routed step
#      rates at 8 x 2048 (the targets' shape) and at 32 x 2048
part targets && step 240 experiments.throughput --device "$DEV" --preset smollm2_shape "${SC[@]}" --out "$RES" "${P[@]}" \
  --name throughput-smollm2_shape_all_levers --methods standard_fused,cggr_combined,cggr_sequence_stride4,random_sequence \
  "${SHAPE[@]}" perf.compile=$GRAPHS perf.compile_scope=decoder perf.compile_routing=true "${SCX[@]}"
part targets && step 200 experiments.throughput --device "$DEV" --preset smollm2_shape "${SC[@]}" --out "$RES" \
  --name throughput-smollm2_shape_all_levers_b32 --methods standard_fused,cggr_combined,cggr_sequence_stride4,random_sequence \
  "${LARGE[@]}" perf.compile=$GRAPHS perf.compile_scope=decoder perf.compile_routing=true "${SCX[@]}"
# 1f'''. perf.activation_checkpointing: the largest batch within the 12 GiB budget at block 2048 (part sweep's grid,
#       fewer methods) and the step rate it costs there
part checkpointing && step 240 experiments.sweep --out "$RES" --deadline-s 210 sweep=gpu_smollm2_shape \
  sweep.name=sweep-smollm2_shape_ckpt 'sweep.methods=[standard_fused,cggr_combined,cggr_sequence]' \
  perf.activation_checkpointing=true "${SW[@]}" "${EAGER[@]}"
# 2a. issue 14's mid-size model on the GPU: SmolLM2's width with 8 blocks (head padded to 49152 rows), 16 x 512,
#     200 steps x 3 seeds, standard vs the two best rules of the CPU SmolLM2 run vs their random controls
part mid && step 280 experiments.quality --device "$DEV" --preset smollm2_shape --name quality-mid_shape "${MID[@]}" --out "$RES" \
  --methods standard_fused,importance_sequence,random_sequence,infobatch_token,infobatch_random_token \
  optim.lr=1e-3 optim.warmup_steps=20 "${MIDX[@]}" "${EAGER[@]}"
# 1g. perf.compile under the Trainer: the user's command (python -m lightning_cggr.train) per setting, SmolLM2's
#     body (8k-token BPE head) at 8 x 2048: tokens/s, MFU and the final val/loss from each run's metrics.csv
#     (logged every step: a device sync per step); the last setting logs at the default interval (a sync
#     every 10 steps, no per-step sync left in the loop), each value a 10-step window
part trainer && step 400 experiments.trainer_check --out "$RES" "${TC[@]}" \
  --settings "$( [ "${GPU_SUITE_DRY:-0}" = "1" ] && echo false,true || echo false,true,reduce-overhead ),true:trainer.log_every_n_steps=10"
# 1h. the same with sequence routing (cggr=sequence: the routed batch is a quarter of the rows, so the
#     compiled blocks see a second batch size): eager, compiled with torch's automatic dynamic shapes (the
#     default), compiled with a graph specialized to each batch size, and CUDA graphs
part trainer_sequence && step 280 experiments.trainer_check --out "$RES" --name trainer_check_sequence \
  "${TC[@]}" --settings false,true,true:perf.compile_dynamic=false,reduce-overhead cggr=sequence
# 1i. perf.compile_scope under the Trainer, sequence routing: each block a compiled region (the default) vs the
#     decoder compiled whole (the host enters one region per pass instead of 30), plain and with CUDA graphs;
#     the process wall column shows what the longer compile costs
#     (30 steps each, up to 150 s a run: the whole-decoder compile of 30 blocks is the unknown; run it on its own)
part scope && step 560 experiments.trainer_check --out "$RES" --name trainer_check_scope "${TC[@]}" --steps 30 --timeout-s 150 \
  --settings true,true:perf.compile_scope=decoder,reduce-overhead,reduce-overhead:perf.compile_scope=decoder cggr=sequence
# 1j. perf.compile_routing under the Trainer, sequence routing (the host-bound step): the routing decision's
#     ~100 eager ops (the default) vs compiled as one graph, plain and with CUDA graphs on the blocks; then the
#     decision alone per call, eager vs compiled, with its CUDA kernel launches
part routing && step 300 experiments.trainer_check --out "$RES" --name trainer_check_routing "${TC[@]}" --steps 30 \
  --timeout-s 90 --settings true,true:perf.compile_routing=true,reduce-overhead,reduce-overhead:perf.compile_routing=true \
  cggr=sequence
part routing && step 90 experiments.decide_cost --device "$DEV" --out "$RES"
# 1k. perf.sdpa_backend under the Trainer, standard training (the 35% MFU target's step): torch's choice (cuDNN's
#     kernel in the H200 profile: 12 of 55 ms of kernels per step) against torch's FlashAttention-2 and the
#     memory-efficient kernel, compiled, and with CUDA graphs
part attention && step 330 experiments.trainer_check --out "$RES" --name trainer_check_attention "${TC[@]}" --steps 30 \
  --timeout-s 75 --settings reduce-overhead,reduce-overhead:perf.sdpa_backend=flash,reduce-overhead:perf.sdpa_backend=efficient,reduce-overhead:perf.sdpa_backend=cudnn \
  cggr.enabled=false
# 2. quality, SmolLM2 shape from random init, 8 x 512, one seed (GPU time is scarce)
part quality && step 150 experiments.quality --device "$DEV" --preset smollm2_shape "${Q[@]}" --seeds 0 --out "$RES" \
  --methods standard_naive,standard_fused,cggr_combined,random_token,cggr_sequence,random_sequence,cggr_final \
  data.batch_size=8 data.block_size=512 optim.lr=1e-3 optim.warmup_steps=10 "${EAGER[@]}" \
  $( [ "${GPU_SUITE_DRY:-0}" = "1" ] && echo "data.batch_size=2 data.block_size=64 model.num_layers=4" )
# 2b. throughput at the tiny shape (16 x 128, as on CPU)
part tiny && step 90 experiments.throughput --device "$DEV" --preset tiny "${S[@]}" --out "$RES" --methods "$MAIN" "${EAGER[@]}"
# 3. batch-size sweep at a 12 GiB budget (block 2048), whatever time is left
T=$(left); part sweep && [ "$T" -gt 30 ] && step "$T" experiments.sweep --out "$RES" --deadline-s $((T - 25)) sweep=gpu_smollm2_shape "${SW[@]}" "${EAGER[@]}"

python -m experiments.report --results "$RES" --output "$RES/RESULTS-gpu.md" --readme '' >>"$LOG" 2>&1
cp "$RES/RESULTS-gpu.md" "$OUT/" 2>/dev/null
tar czf "$OUT/gpu_results.tgz" -C "$RES" .
say "finished; results in $OUT"
