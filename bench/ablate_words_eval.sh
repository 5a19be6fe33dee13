#!/usr/bin/env bash
# Score bench/ablate_words.sh's rows with `t2i evaluate` (every split, 16 prompts x 2 images): each row's last
# checkpoint exported as a pipeline (a copy of the row, so the row itself can still resume), then evaluated.
#   bash bench/ablate_words_eval.sh [row ...]      # results: $OUT/<row>.json and $OUT/<row>.txt
set -euo pipefail
RUNS=${RUNS:-runs/ablate-words}
OUT=${OUT:-runs/ablate-export}
STOP=${STOP:-300}
T2I=${T2I:-t2i}
ORDER=(templates grammar-half grammar-all word-dropout uniform-t)
[ $# -gt 0 ] && ORDER=("$@")
mkdir -p "$OUT"
for row in "${ORDER[@]}"; do
  [ -e "$OUT/$row.json" ] && continue
  if [ ! -e "$OUT/$row/pipeline/model_index.json" ]; then
    rm -rf "${OUT:?}/$row" && mkdir -p "$OUT/$row"
    cp -r "$RUNS/$row/config.yaml" "$RUNS/$row/text_encoder" "$RUNS/$row/tokenizer" "$RUNS/$row/checkpoint-$(printf %07d "$STOP")" "$OUT/$row/"
    OMP_NUM_THREADS=1 $T2I train --config "$OUT/$row/config.yaml" train.output_dir="$OUT/$row" train.max_steps="$STOP" \
      --resume latest                                     # the row's own config: exports its checkpoint
  fi
  OMP_NUM_THREADS=1 $T2I evaluate --model "$OUT/$row/pipeline" --num-prompts 16 --images-per-prompt 2 \
    --calibration-prompts 8 --effect-prompts 0 --json "$OUT/$row.json" > "$OUT/$row.txt"
done
