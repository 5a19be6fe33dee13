"""The table of bench/ablate_words.sh: one row per change, its last point of the position curve (probe ratio:
1.00 means the words move nothing; in-cell share of 18 one-object prompts in the template wording and in
held-out wordings), the steps it trained and its last logged loss.

  python bench/ablation_words_table.py runs/ablate-words
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ablate-words")
    print("| row | steps | probe ratio | in cell (template wording) | in cell (held-out wordings) |")
    print("|---|---|---|---|---|")
    for run in sorted(p for p in root.iterdir() if (p / "position.jsonl").is_file()):
        point = json.loads((run / "position.jsonl").read_text().splitlines()[-1])
        print(f"| {run.name} | {point['step']} | {point['probe_ratio']:.2f} | {point['in_cell']:.0%} | "
              f"{point.get('in_cell_unseen_wording', float('nan')):.0%} |")


if __name__ == "__main__":
    main()
