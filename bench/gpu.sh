#!/usr/bin/env bash
# One prepared script for when a GPU is at hand: in about 9 minutes it
#   1. runs the UNet, training and sampling benchmarks on CUDA (bench/unet.py against a matched diffusers UNet,
#      bench/train.py and bench/sample.py against eager fp32, bench/sd.py: recording cross-attention on SD 1.5's
#      UNet against none and a DAAM-style recorder, bench/finetune_sd.py: fine-tuning SD 1.5's UNet at 64x64 latents
#      with and without gradient checkpointing), alone on the GPU so the timings hold;
#   2. trains configs/shapes64.yaml in bf16 for $STEPS64 steps (position curve every 100 steps) and, beside it,
#      the noise-schedule ablation of configs/shapes32.yaml ($ABLATE_STEPS steps a row, rows in parallel);
#   3. scores every model it trained with `t2i evaluate`.
# Everything lands under $OUT as it goes (logs line-buffered, one results.txt with every row's curve and scores),
# so a run cut short still says what it got. `--smoke` runs every stage at toy size on the CPU in about a
# minute (tests/test_bench.py runs it, so the script cannot rot).
#   OUT=/tmp/gpu bash bench/gpu.sh              # on a GPU
#   OUT=/tmp/gpu bash bench/gpu.sh --smoke      # on a CPU
#   ROWS="cosine curriculum" bash bench/gpu.sh  # some ablation rows (ROWS= for none)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
RUNS=${RUNS:-$OUT/runs}  # train logs, pipelines, evaluate reports (packed into results.tar.gz)
mkdir -p "$OUT" "$RUNS"
RESULTS=$OUT/results.txt

# The schedule ablation at equal steps: today's cosine, and four ways to give layout its share of training.
declare -A ROW=(
  [cosine]="noise.beta_schedule=squaredcos_cap_v2 noise.timestep_bias=1 noise.bias_steps=null"
  [linear]="noise.timestep_bias=1 noise.bias_steps=null"
  [linear-bias3]="noise.bias_steps=null"
  [curriculum]="noise.bias_steps=500 noise.bias_ramp=500"
  [mixture]="noise.bias_steps=null noise.uniform_share=0.5"
  [shifted-cosine]="noise.beta_schedule=squaredcos_cap_v2 noise.snr_shift=6 noise.timestep_bias=1 noise.bias_steps=null"
  [curriculum-no-grounding]="noise.bias_steps=500 noise.bias_ramp=500 train.grounding_weight=0"
)
ROWS=${ROWS-cosine linear linear-bias3 curriculum mixture shifted-cosine curriculum-no-grounding}

if [ "${1:-}" = "--smoke" ]; then
  DEVICE=cpu STEPS64=${STEPS64:-2} ABLATE_STEPS=${ABLATE_STEPS:-2} CURVE=2 ROWS=${ROWS%% *}
  TINY="model.preset=tiny text.width=32 text.layers=1 text.heads=2 data.size=16 train.batch_size=4 data.num_workers=0
        train.preview_steps=2"
  TINY64="$TINY train.mixed_precision=no"
  BENCH_UNET="--preset tiny --batch 2 --tokens 8 --repeats 1"
  BENCH_TRAIN="--preset tiny --size 16 --batch 2 --text-width 32 --steps 1 --variants eager"
  BENCH_SAMPLE="--preset tiny --size 16 --text-width 32 --steps 2 --batches 1 --repeats 1 --variants eager"
  BENCH_SD="--tiny --steps 2 --repeats 1"
  BENCH_FT="--tiny --steps 1"
  EVAL="--num-prompts 2 --images-per-prompt 1 --calibration-prompts 2 --effect-prompts 0 --steps 2"
else
  DEVICE=cuda STEPS64=${STEPS64:-400} ABLATE_STEPS=${ABLATE_STEPS:-1500} CURVE=500 TINY="" TINY64=""
  BENCH_UNET="--preset base --batch 256 --tokens 77 --size 32 --repeats 3"
  BENCH_TRAIN="--preset base --size 64 --batch 256 --text-width 256 --steps 10 --variants eager,channels_last,bf16,fused_adamw"
  BENCH_SAMPLE="--preset base --size 64 --text-width 256 --steps 20 --batches 1,32 --repeats 2 --variants eager,bf16"
  BENCH_SD="--batch 4 --steps 10 20 --repeats 3 --warmup 1"   # SD 1.5's UNet, fp16: recording cost and memory
  BENCH_FT="--batch 16 --steps 5 --warmup 2"                     # SD 1.5's UNet fine-tuned at 64x64 latents, bf16
  EVAL="--num-prompts 24 --images-per-prompt 2 --calibration-prompts 16 --effect-prompts 0"
fi
say() { echo "[$(date -u +%T)] $*" | tee -a "$RESULTS"; }

# 0. the machine
{ date -u; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; $PY -c "import torch, diffusers, transformers, accelerate; \
print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| diffusers', diffusers.__version__, \
'| transformers', transformers.__version__, '| accelerate', accelerate.__version__)"; } > "$OUT/env.txt" 2>&1
say "machine: $(tail -1 "$OUT/env.txt")"

# 1. benchmarks, alone on the device
{ timeout 100 $PY bench/unet.py $BENCH_UNET --device $DEVICE
  timeout 120 $PY bench/train.py $BENCH_TRAIN --device $DEVICE
  timeout 100 $PY bench/sample.py $BENCH_SAMPLE --device $DEVICE
  timeout 150 $PY bench/sd.py $BENCH_SD --device $DEVICE
  timeout 150 $PY bench/finetune_sd.py $BENCH_FT --device $DEVICE; } > "$OUT/bench.txt" 2>&1
say "benchmarks: $(grep -c . "$OUT/bench.txt") lines in bench.txt"

# 2. shapes64 and the ablation rows, side by side
train() {  # name, config, steps, overrides...
  local name=$1 config=$2 steps=$3; shift 3
  $PY -m t2i.cli train --config "$config" train.output_dir="$RUNS/$name" train.max_steps="$steps" \
    train.checkpoint_every="$steps" train.preview_every=0 train.position_every="$CURVE" train.report_to=none "$@" \
    --overwrite > "$RUNS/$name.log" 2>&1 || say "$name: training failed ($(tail -c 300 "$RUNS/$name.log"))"
  say "$name: position curve $(tr '\n' ' ' < "$RUNS/$name/position.jsonl" 2>/dev/null)"
  if [ -e "$RUNS/$name/pipeline/model_index.json" ]; then
    $PY -m t2i.cli evaluate --model "$RUNS/$name/pipeline" --device $DEVICE $EVAL --json "$RUNS/$name.json" \
      > "$RUNS/$name.txt" 2> "$RUNS/$name.err" || say "$name: evaluate failed ($(tail -c 300 "$RUNS/$name.err"))"
    { echo "== $name"; cat "$RUNS/$name.txt"; } >> "$RESULTS"
  fi
}
CURVE64=$([ "$CURVE" = 2 ] && echo 2 || echo 100)
CURVE=$CURVE64 train shapes64 configs/shapes64.yaml "$STEPS64" train.warmup_steps=$((STEPS64 / 8)) \
  noise.bias_steps=$((STEPS64 * 3 / 10)) noise.bias_ramp=$((STEPS64 * 3 / 10)) $TINY64 &
for row in $ROWS; do
  OMP_NUM_THREADS=2 train "$row" configs/shapes32.yaml "$ABLATE_STEPS" ${ROW[$row]} $TINY &
done
wait
( cd "$RUNS" && tar czf "$OUT/results.tar.gz" --exclude='checkpoint-*' --exclude='*.safetensors' . ) 2>/dev/null
say "done"
