"""bench.py's memory rows as a user runs them, at t5-small's shape with tiny batches: each side measured in its own
process, the results in the JSON and in the Markdown section it rewrites; and a compiled row's note from another run.
Its train and generate rows, both sides agreeing, are checked by tests/test_gpu_check.py, whose rehearsal of
tests/gpu_check.sh runs them. Timings are not checked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
import bench  # noqa: E402  (imports transformers)

ROOT = Path(__file__).resolve().parent.parent


def test_bench_memory_rows(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nkept above\n")
    command = [sys.executable, "bench.py", "--only", "memory", "--sizes", "small", "--threads", "1", "--batch", "2",
               "--src", "12", "--tgt", "6", "--gen-batch", "3", "--new-tokens", "4",
               "--out", str(tmp_path / "bench.json"), "--markdown", str(markdown)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    rows = json.loads((tmp_path / "bench.json").read_text())["runs"][0]["rows"]
    assert [(r["bench"], r["variant"], r["shape"]) for r in rows] == [
        ("memory", "train", "2 x (12 + 6)"), ("memory", "generate", "3 x 4 new (input 12)")]
    assert all(r["ours"] > 0 and r["theirs"] > 0 for r in rows)
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n") and text.count("| small | ") == 2
    assert "python bench.py --only memory --sizes small" in text


def test_a_compiled_row_is_set_against_the_eager_row_of_an_earlier_run():
    """tests/gpu_check.sh times the compile rows in their own bench.py command: the note against transformers' eager
    generate still finds the eager row of the same GPU and shape in the run before."""
    machine = dict(device="cuda", gpu="NVIDIA H100 80GB HBM3", cpu="x86", cpu_count=16, threads=2, torch="2.11",
                   transformers="5.17.0", theirs_attention="sdpa", dtype="bf16 autocast (fp32 weights)",
                   load_before=[0.0] * 3, load_after=[0.0] * 3)
    row = dict(size="small", bench="generate", unit="new tokens/s", shape="1 x 128 new (input 200)")
    runs = [dict(command="python bench.py --variants eager", date="", machine=machine, seconds=1.0,
                 rows=[dict(row, variant="eager", ours=100.0, theirs=50.0)]),
            dict(command="python bench.py --variants compile", date="", machine=machine, seconds=1.0,
                 rows=[dict(row, variant="compile", ours=300.0, theirs=120.0)])]
    [compiled] = [line for line in bench.render(runs).splitlines() if "generate (compile)" in line]
    assert "| 2.50x |" in compiled and "against transformers' eager: 6.00x" in compiled
