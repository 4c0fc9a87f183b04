"""tests/gpu_check.sh as its CPU rehearsal, typed as README says, `OUT=DIR bash tests/gpu_check.sh --cpu`: every step
runs (the CUDA-only ones are skipped), at most 8 files and no folder land in OUT (what the device tool returns), and
the report has each step's result. Its bench step is bench.py's train and generate test too (tests/test_bench.py runs
the memory rows): rows at t5-small's shape with tiny batches, both sides agreeing, merged into the JSON and the
Markdown section it rewrites, under the command as typed in a clone. Timings are not checked."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
STEPS = ["environment", "CUDA tests", "world bf16: acquire", "world bf16: reflect", "world bf16: evaluate",
         "world fp16: acquire", "world fp16: reflect", "world fp16: evaluate", "bench eager"]
CUDA_ONLY = ["bench compile: generate", "bench compile: train"]
BENCH = ("python bench.py --only train,generate --variants eager --gen-batch 1,3 --sizes small --threads 1 "
         "--batch 2 --src 12 --tgt 6 --new-tokens 4 --warmup 0 --repeats 1 --out bench.json --markdown BENCHMARKS.md")


def test_the_gpu_check_rehearses_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "tmp"
    work.mkdir()
    result = subprocess.run(["bash", "tests/gpu_check.sh", "--cpu"], cwd=ROOT, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "OUT": str(out), "PYTHON": sys.executable,
                                              "TMPDIR": str(work)})
    report = (out / "gpu_check.md").read_text()
    assert result.returncode == 0, report + result.stderr
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["gpu_check.md", "tests.log", "world_bf16.log", "world_fp16.log", "bench.log", "bench.json", "BENCHMARKS.md"])
    assert all(p.is_file() for p in out.iterdir())
    table = dict(line.split(" | ")[:2] for line in report.splitlines() if line.startswith("| ") and " | " in line)
    assert [table.get(f"| {step}") for step in STEPS] == ["exit 0"] * len(STEPS)
    assert [table.get(f"| {step}") for step in CUDA_ONLY] == ["skipped: CUDA only"] * len(CUDA_ONLY)
    for step in STEPS:
        assert f"\n## {step}: exit 0 after " in report, step
    for precision in ("bf16", "fp16"):  # evaluate's table of both checkpoints, in the step's last lines
        section = report.split(f"## world {precision}: evaluate")[1].split("\n## ")[0]
        assert "| acquire | world |" in section and "| reflect | world |" in section
        config = json.loads((next(work.glob("gpu_check.*")) / f"world_{precision}" / "config.json").read_text())
        assert config["precision"] == precision and config["env"]["devices"] == 1

    bench = json.loads((out / "bench.json").read_text())
    assert len(bench["runs"]) > 1  # the repo's runs, and this one
    run = bench["runs"][-1]
    assert run["command"] == BENCH
    rows = run["rows"]
    assert [(r["bench"], r["variant"], r["shape"]) for r in rows] == [
        ("generate", "eager", "1 x 4 new (input 12)"), ("generate", "eager", "3 x 4 new (input 12)"),
        ("train", "eager", "2 x (12 + 6)")]
    assert all(r["same_tokens"] == 1.0 for r in rows[:2]) and rows[2]["loss_diff"] <= 1e-5
    assert all(r["ours"] > 0 and r["theirs"] > 0 for r in rows)
    markdown, kept = (out / "BENCHMARKS.md").read_text(), (ROOT / "BENCHMARKS.md").read_text()
    assert markdown.split("<!-- results:")[0] == kept.split("<!-- results:")[0]  # the text above is kept
    assert markdown.split(f"`{BENCH}`")[1].split("<!--")[0].count("| small | ") == 3
    assert str(out) not in markdown
