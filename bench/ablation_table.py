"""The ablation table of bench/ablate.sh: one markdown table per prompt split, a row per run, from the
`t2i evaluate` JSON reports in a folder.

    python bench/ablation_table.py runs/ablate
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from t2i.evaluate import pct

FIDELITY = ("colour", "shape", "size", "position", "relation", "count", "exact")


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/ablate")
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)}
    if not reports:
        sys.exit(f"no evaluate reports (*.json) in {folder}")
    splits = next(iter(reports.values()))["fidelity"]
    for split in splits:
        header = ["run"] + list(FIDELITY) + ["GenEval-style", "noun pointing", "noun mIoU", "colour pointing"]
        print(f"\n### {split}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name, r in reports.items():
            model = r["fidelity"][split]["model"]
            ge = [v["rate"] for v in model["geneval"].values() if v["rate"] is not None]
            loc = r["localisation"][split]
            cells = [pct(model[m]["rate"]) for m in FIDELITY] + [pct(sum(ge) / len(ge) if ge else None)]
            cells += [pct(loc["noun"]["ours"]["pointing"]), pct(loc["noun"]["ours"]["miou"]),
                      pct(loc["colour"]["ours"]["pointing"])]
            print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
