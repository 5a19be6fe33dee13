#!/usr/bin/env bash
# Issue #8's ablation: short runs of configs/shapes32.yaml at equal compute (same steps, batch, seed, one
# thread each), one row per change, each scored by `t2i evaluate` (24 prompts x 2 images per split). Rows
# run one after another; pass row names to run some of them. Results: $RUNS/<row>/pipeline, $RUNS/<row>.json.
#   bash bench/ablate.sh                 # every row, 400 steps each (~12 min a row on one idle CPU thread)
#   STEPS=800 bash bench/ablate.sh full no-grounding
#   EVAL_ONLY=1 bash bench/ablate.sh     # score the rows already trained
#   python bench/ablation_table.py runs/ablate   # the table
set -euo pipefail
STEPS=${STEPS:-400}
RUNS=${RUNS:-runs/ablate}
T2I=${T2I:-t2i}
declare -A ROWS=(
  [today]="model.pos_embed=false model.context_layers=0 noise.min_snr_gamma=5.0 data.position_prob=0.5 train.grounding_weight=0"
  [full]=""
  [no-grounding]="train.grounding_weight=0"
  [no-pos-embed]="model.pos_embed=false"
  [no-context-refiner]="model.context_layers=0"
  [min-snr]="noise.min_snr_gamma=5.0"
  [position-prob-0.5]="data.position_prob=0.5"
  [timestep-bias-2]="noise.timestep_bias=2.0"
  [finest-attention]="model.attention_levels=[true,true,true]"
)
ORDER=(full today no-grounding no-pos-embed no-context-refiner min-snr position-prob-0.5 timestep-bias-2 finest-attention)
[ $# -gt 0 ] && ORDER=("$@")
for row in "${ORDER[@]}"; do
  if [ ! -e "$RUNS/$row/pipeline/model_index.json" ] && [ -z "${EVAL_ONLY:-}" ]; then
    echo "== $row: ${ROWS[$row]}"
    start=--overwrite                                                    # nothing of the row's worth keeping
    compgen -G "$RUNS/$row/checkpoint-*" > /dev/null && start="--resume latest"   # an interrupted row carries on
    OMP_NUM_THREADS=1 $T2I train --config configs/shapes32.yaml train.output_dir="$RUNS/$row" train.max_steps="$STEPS" \
      train.warmup_steps=50 train.checkpoint_every=100 train.preview_every=0 ${ROWS[$row]} $start
  fi
  if [ -e "$RUNS/$row/pipeline/model_index.json" ] && [ ! -e "$RUNS/$row.json" ]; then
    OMP_NUM_THREADS=1 $T2I evaluate --model "$RUNS/$row/pipeline" --num-prompts 24 --images-per-prompt 2 \
      --calibration-prompts 16 --json "$RUNS/$row.json" > "$RUNS/$row.txt"
  fi
done
