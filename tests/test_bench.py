"""bench/gpu.sh cannot rot: its --smoke mode runs every stage (benchmarks, shapes64, one ablation row with its
position curve, evaluate) at toy size on the CPU."""
import os
import subprocess
import sys
from pathlib import Path


def test_gpu_script_smoke_runs_every_stage_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    script = Path(__file__).parents[1] / "bench" / "gpu.sh"
    subprocess.run(["bash", str(script), "--smoke"], env=env, check=True, timeout=600, capture_output=True)
    results = (tmp_path / "results.txt").read_text()
    assert "t2i UNet" in (tmp_path / "bench.txt").read_text() or "ratio" in (tmp_path / "bench.txt").read_text()
    assert "| 2 | daam |" in (tmp_path / "bench.txt").read_text()             # bench/sd.py's table
    for row in ("shapes64", "cosine"):
        assert f'{row}: position curve {{"step": 2' in results, results
        assert f"== {row}" in results and "GenEval-style summary" in results
    assert "failed" not in results and results.rstrip().endswith("done")
