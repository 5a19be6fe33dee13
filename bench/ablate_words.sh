#!/usr/bin/env bash
# Issue #22's ablation: which text path makes the wording matter less? Each row fine-tunes the template-trained
# model (bench/template_default) with configs/shapes32-words.yaml and one change, on the full run's schedule
# (train.max_steps=3500) but stopped at STOP steps, one CPU thread each, so every row sees the same steps and LR.
# Each row ends with a point of the position curve (t2i/probe.py): the probe ratio, and the in-cell share of 18
# one-object prompts in the template wording and in held-out wordings. The chosen row resumes to the full run:
#   t2i train --config configs/shapes32-words.yaml train.output_dir=runs/ablate-words/<row> <its overrides> --resume latest
#   bash bench/ablate_words.sh                     # every row (~7 min a row on one CPU thread)
#   python bench/ablation_words_table.py runs/ablate-words
set -euo pipefail
STOP=${STOP:-300}
RUNS=${RUNS:-runs/ablate-words}
T2I=${T2I:-t2i}
declare -A ROWS=(
  [templates]="data.wording=templates"
  [grammar-half]=""
  [grammar-all]="data.grammar_share=1.0"
  [word-dropout]="data.word_dropout=0.2"
  [uniform-t]="noise.timestep_bias=1"
)
ORDER=(templates grammar-half grammar-all word-dropout uniform-t)
[ $# -gt 0 ] && ORDER=("$@")
for row in "${ORDER[@]}"; do
  [ -e "$RUNS/$row/position.jsonl" ] && grep -q "\"step\": $STOP," "$RUNS/$row/position.jsonl" && continue
  echo "== $row: ${ROWS[$row]}"
  start=--overwrite
  compgen -G "$RUNS/$row/checkpoint-*" > /dev/null && start="--resume latest"
  OMP_NUM_THREADS=1 $T2I train --config configs/shapes32-words.yaml train.output_dir="$RUNS/$row" \
    train.position_every="$STOP" train.preview_every=0 ${ROWS[$row]} $start --stop-at "$STOP"
done
