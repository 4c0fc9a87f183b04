"""The paper's stage ablation, rerun on the embedded world: held-out accuracy of each stage variant after acquire,
and of the full variant after reflect, over several seeds, written into BENCHMARKS.md.

    python ablation.py                      # 4 variants + reflect, seeds 1 2 3 (about 40 minutes on 2 CPU cores)
    python ablation.py --seeds 1 --variants summarize recall_analyze_summarize

Each run is the same command a user types (tinythinker.py, then evaluate.py), in its own process, under runs/ablation.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

import data

RUNS = os.path.join("runs", "ablation")
BEGIN, END = "<!-- ablation:begin -->", "<!-- ablation:end -->"


def run(*args):
    print("+", " ".join(args), flush=True)
    subprocess.run([sys.executable, *args], check=True)


def held_out_rows(run_dir):
    """evaluate.py's report rows on the test questions, by phase: acquire, and reflect where the run has one."""
    run("evaluate.py", run_dir, "--split", "test")
    with open(os.path.join(run_dir, "report.json")) as f:
        return {row["phase"]: row for row in json.load(f)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--variants", nargs="+", default=list(data.STAGES))
    parser.add_argument("--no-reflect", action="store_true")
    args = parser.parse_args()
    results, chance = {}, None
    for seed in args.seeds:
        for variant in args.variants:
            out = os.path.join(RUNS, f"{variant}-seed{seed}")
            if not os.path.isfile(os.path.join(out, "best", "model.safetensors")):
                run("tinythinker.py", "--phase", "acquire", "--stages", variant, "--seed", str(seed), "--out", out)
            reflects = variant == "recall_analyze_summarize" and not args.no_reflect
            if reflects and not os.path.isdir(os.path.join(out, "reflect", "best")):
                run("tinythinker.py", "--phase", "reflect", "--from", out, "--seed", str(seed))
            rows = held_out_rows(out)  # one evaluate.py call scores both checkpoints
            results.setdefault(variant, []).append(rows["acquire"]["accuracy"])
            chance = rows["acquire"]["chance"]
            if reflects:
                results.setdefault("+ reflect", []).append(rows["reflect"]["accuracy"])
    lines = [BEGIN, f"`python ablation.py --seeds {' '.join(map(str, args.seeds))}` "
             f"(held-out test questions of the world; chance {chance:.1f}%)", "",
             "| stages | held-out accuracy, mean ± std (%) | per seed | chance (%) |", "|---|---|---|---|"]
    for name, accs in results.items():
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        lines.append(f"| {name} | {statistics.mean(accs):.1f} ± {spread:.1f} | {', '.join(f'{a:.1f}' for a in accs)} "
                     f"| {chance:.1f} |")
    lines.append(END)
    table = "\n".join(lines)
    print(table)
    text = open("BENCHMARKS.md").read() if os.path.isfile("BENCHMARKS.md") else ""
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: table, text, flags=re.S)
    else:
        text += "\n## Stage ablation on the embedded world\n\n" + table + "\n"
    with open("BENCHMARKS.md", "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
