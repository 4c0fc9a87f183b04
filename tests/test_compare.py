"""`python ablation.py` and `python compare.py`, the commands behind the README's world figures, run as typed from a
fresh directory with only sizes shrunk (one seed, one acquire epoch, one reflect iteration of two samples per question,
two Tailored rounds of one epoch): the runs they make, the tables they write into runs/BENCHMARKS.md (and not into the
directory's BENCHMARKS.md, which they change only when asked), ablation reusing compare's TinyThinker runs (compare
runs them beside Tailored's, two at a time), and a rerun of compare training nothing."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = ["--seeds", "1", "--epochs", "1", "--iterations", "1", "--samples", "2"]


def script(name, *args, cwd):
    out = subprocess.run([sys.executable, str(ROOT / name), *args], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return out.stdout


def table(text, name):
    """{row name: its cells} of the table between <!-- name:begin --> and <!-- name:end -->."""
    body = re.search(f"<!-- {name}:begin -->(.*?)<!-- {name}:end -->", text, re.S).group(1)
    rows = [line.strip("|").split(" | ") for line in body.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def accuracy(cell):  # "62.5 ± 0.0" -> 62.5
    value = float(cell.split(" ± ")[0])
    assert 0.0 <= value <= 100.0
    return value


def test_compare_then_ablation_run_as_typed(tmp_path):
    (tmp_path / "BENCHMARKS.md").write_text("# A clone's own\n")
    # Two runs at a time: Tailored's beside TinyThinker's, then the answer-only acquire
    compare_out = script("compare.py", *SIZES, "--rounds", "2", "--jobs", "2", cwd=tmp_path)
    trained = sorted(line.split()[2:6] for line in compare_out.splitlines() if line.startswith("+ tinythinker.py"))
    run_dir = "runs/ablation/recall_analyze_summarize-epochs1-iterations1-samples2-seed1"
    assert trained == [["--phase", "acquire", "--stages", "recall_analyze_summarize"],
                       ["--phase", "acquire", "--stages", "summarize"], ["--phase", "reflect", "--from", run_dir]]
    benchmarks = (tmp_path / "runs" / "BENCHMARKS.md").read_text()
    assert "`python compare.py --seeds 1 --rounds 2 --epochs 1 --iterations 1 --samples 2`" in benchmarks
    compare = table(benchmarks, "compare-epochs1-iterations1-samples2")
    assert list(compare) == ["answer-only fine-tuning", "chain-of-thought fine-tuning (Tailored round 1)",
                             "Tailored rounds 1..2, with L_SR (lambda 0.5)",
                             "Tailored rounds 1..2, without L_SR (lambda 0)", "TinyThinker acquire",
                             "TinyThinker acquire + reflect"]
    for name in compare:
        accuracy(compare[name][0])

    # ablation reuses compare's TinyThinker runs: it trains only the control
    ablation_out = script("ablation.py", *SIZES, "--variants", "recall_analyze_summarize", cwd=tmp_path)
    trained = [line.split()[2:6] for line in ablation_out.splitlines() if line.startswith("+ tinythinker.py")]
    assert trained == [["--phase", "acquire", "--model", f"{run_dir}/best"]]
    benchmarks = (tmp_path / "runs" / "BENCHMARKS.md").read_text()
    assert ("`python ablation.py --seeds 1 --variants recall_analyze_summarize --epochs 1 --iterations 1 --samples 2`"
            in benchmarks)
    ablation = table(benchmarks, "ablation-epochs1-iterations1-samples2")
    assert list(ablation) == ["recall_analyze_summarize", "+ reflect", "+ continued acquire (control)"]
    for cells in ablation.values():
        accuracy(cells[0])  # held out
        accuracy(cells[2])  # training
    assert accuracy(ablation["recall_analyze_summarize"][0]) == accuracy(compare["TinyThinker acquire"][0])
    assert accuracy(ablation["+ reflect"][0]) == accuracy(compare["TinyThinker acquire + reflect"][0])
    reflect_steps = int(re.search(r"Reflect took (\d+) optimizer steps", benchmarks).group(1))
    control_dir = tmp_path / run_dir / "control"
    assert reflect_steps > 0 and (control_dir / "best").is_dir()
    control = json.loads((control_dir / "config.json").read_text())
    assert control["steps"] == control["total_steps"] == reflect_steps  # the control trained as many steps
    assert table(benchmarks, "compare-epochs1-iterations1-samples2") == compare  # ablation added its table beside it

    # A rerun of compare trains nothing: every run of both methods is finished; it only evaluates them again
    rerun = script("compare.py", *SIZES, "--rounds", "2", "--jobs", "2", cwd=tmp_path)
    assert not [line for line in rerun.splitlines() if line.startswith(("+ tinythinker.py", "+ tailored.py"))]
    assert table((tmp_path / "runs" / "BENCHMARKS.md").read_text(), "compare-epochs1-iterations1-samples2") == compare
    assert (tmp_path / "BENCHMARKS.md").read_text() == "# A clone's own\n"  # written only when asked (--markdown)
