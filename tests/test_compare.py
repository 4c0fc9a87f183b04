"""`python ablation.py` and `python compare.py`, the commands behind the README's world figures, run as typed from a
fresh directory with only sizes shrunk (one seed, one acquire epoch, one reflect iteration of two samples per question,
two Tailored rounds of one epoch): the runs they make, the tables they write into BENCHMARKS.md, and compare reusing
ablation's runs."""
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


def test_ablation_then_compare_run_as_typed(tmp_path):
    script("ablation.py", *SIZES, "--variants", "recall_analyze_summarize", cwd=tmp_path)
    benchmarks = (tmp_path / "BENCHMARKS.md").read_text()
    assert ("`python ablation.py --seeds 1 --variants recall_analyze_summarize --epochs 1 --iterations 1 --samples 2`"
            in benchmarks)
    ablation = table(benchmarks, "ablation-epochs1-iterations1-samples2")
    assert list(ablation) == ["recall_analyze_summarize", "+ reflect", "+ continued acquire (control)"]
    for cells in ablation.values():
        accuracy(cells[0])  # held out
        accuracy(cells[2])  # training
    reflect_steps = int(re.search(r"Reflect took (\d+) optimizer steps", benchmarks).group(1))
    control_dir = tmp_path / "runs" / "ablation" / "recall_analyze_summarize-epochs1-iterations1-samples2-seed1"
    control_dir = control_dir / "control"
    assert reflect_steps > 0 and (control_dir / "best").is_dir()
    control = json.loads((control_dir / "config.json").read_text())
    assert control["steps"] == control["total_steps"] == reflect_steps  # the control trained as many steps

    # Two runs at a time: Tailored's, and the answer-only acquire, the only TinyThinker run ablation did not make
    compare_out = script("compare.py", *SIZES, "--rounds", "2", "--jobs", "2", cwd=tmp_path)
    trained = [line.split()[2:6] for line in compare_out.splitlines() if line.startswith("+ tinythinker.py")]
    assert trained == [["--phase", "acquire", "--stages", "summarize"]]
    benchmarks = (tmp_path / "BENCHMARKS.md").read_text()
    assert "`python compare.py --seeds 1 --rounds 2 --epochs 1 --iterations 1 --samples 2`" in benchmarks
    compare = table(benchmarks, "compare-epochs1-iterations1-samples2")
    assert list(compare) == ["answer-only fine-tuning", "chain-of-thought fine-tuning (Tailored round 1)",
                             "Tailored rounds 1..2, with L_SR (lambda 0.5)",
                             "Tailored rounds 1..2, without L_SR (lambda 0)", "TinyThinker acquire",
                             "TinyThinker acquire + reflect"]
    for name in compare:
        accuracy(compare[name][0])
    assert accuracy(compare["TinyThinker acquire"][0]) == accuracy(ablation["recall_analyze_summarize"][0])
    assert accuracy(compare["TinyThinker acquire + reflect"][0]) == accuracy(ablation["+ reflect"][0])
    assert table(benchmarks, "ablation-epochs1-iterations1-samples2") == ablation  # compare added its table beside it
