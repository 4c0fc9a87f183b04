"""bench.py as a user runs it, at t5-small's shape with tiny batches: it runs both sides, they agree (tokens and
loss), and its results land in the JSON and in the Markdown section it rewrites. Timings are not checked."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def test_bench_train_generate_and_memory_rows(tmp_path):
    markdown = tmp_path / "BENCHMARKS.md"
    markdown.write_text("# Benchmarks\n\nkept above\n")
    command = [sys.executable, "bench.py", "--only", "train,generate,memory", "--sizes", "small", "--threads", "1",
               "--batch", "2", "--src", "12", "--tgt", "6", "--gen-batch", "1,3", "--new-tokens", "4",
               "--warmup", "0", "--repeats", "1", "--out", str(tmp_path / "bench.json"), "--markdown", str(markdown)]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=300)
    rows = json.loads((tmp_path / "bench.json").read_text())["runs"][0]["rows"]
    assert [(r["bench"], r["variant"], r["shape"]) for r in rows] == [
        ("memory", "train", "2 x (12 + 6)"), ("memory", "generate", "3 x 4 new (input 12)"),
        ("generate", "eager", "1 x 4 new (input 12)"), ("generate", "eager", "3 x 4 new (input 12)"),
        ("train", "eager", "2 x (12 + 6)")]
    assert all(r["same_tokens"] == 1.0 for r in rows[2:4]) and rows[4]["loss_diff"] <= 1e-5
    assert all(r["ours"] > 0 and r["theirs"] > 0 for r in rows)
    text = markdown.read_text()
    assert text.startswith("# Benchmarks\n\nkept above\n") and text.count("| small | ") == 5
    assert "python bench.py --only train,generate,memory --sizes small" in text
