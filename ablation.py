"""The paper's two claims, rerun on the embedded world over several seeds, in a table like BENCHMARKS.md's:
held-out accuracy of each stage variant after acquire (does recall help?), and of the full variant after reflect
next to the control the paper lacks, acquire continued for as many steps as reflect took (does reflect help?).

    python ablation.py                      # 4 variants, reflect and control, seeds 1 2 3
    python ablation.py --seeds 1 --variants analyze_summarize recall_analyze_summarize
    python ablation.py --variants recall_analyze_summarize --epochs 15    # reflect from a student that still errs
    python ablation.py --seeds 1 --epochs 1 --iterations 1 --samples 2    # a quick look (minutes, not an hour)

Each run is the same command a user types (tinythinker.py, then evaluate.py), in its own process, under runs/ablation
of the current directory. The table is printed and written into runs/BENCHMARKS.md (--markdown), in place of the
table of the same sizes; --markdown BENCHMARKS.md writes it into the repository's. A rerun skips finished runs.
"""
import argparse
import glob
import json
import math
import os
import re
import statistics
import subprocess
import sys

import data
from files import atomic_write
from tinythinker import WORLD

HERE = os.path.dirname(os.path.abspath(__file__))
RUNS = os.path.join("runs", "ablation")
# Where the tables go unless --markdown names another file: beside the runs, not into the repository's BENCHMARKS.md,
# which changes only when asked (--markdown BENCHMARKS.md).
MARKDOWN = os.path.join("runs", "BENCHMARKS.md")


def run(script, *args):
    """python `script` (one of this project's) with args, in its own process with one thread, as compare.py runs it:
    float rounding differs with the thread count, and the two scripts share their TinyThinker runs."""
    print("+", script, " ".join(args), flush=True)
    subprocess.run([sys.executable, os.path.join(HERE, script), *args], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})


def sizes(epochs, iterations, samples):
    """The flags of acquire and of reflect that differ from the demo's, and the tag of the runs made with them."""
    given = {name: n for name, n in [("epochs", epochs), ("iterations", iterations), ("samples", samples)] if n}
    flags = {name: [f"--{name}", str(n)] for name, n in given.items()}
    return (flags.get("epochs", []), flags.get("iterations", []) + flags.get("samples", []),
            "".join(f"-{name}{n}" for name, n in given.items()))


def accuracies(run_dir, split):
    """evaluate.py's accuracy on `split` by phase: acquire, and reflect where the run has one."""
    out = os.path.join(run_dir, f"report_{split}")
    if not os.path.isfile(out + ".json"):
        run("evaluate.py", run_dir, "--split", split, "--out", out)
    with open(out + ".json") as f:
        return {row["phase"]: row["accuracy"] for row in json.load(f)}


def reflect_budget(run_dir):
    """Optimizer steps and validations reflect took, summed over its iterations (from their logs)."""
    steps = validations = 0
    for path in glob.glob(os.path.join(run_dir, "reflect", "iter_*", "log.jsonl")):
        with open(path) as f:
            rows = [json.loads(line) for line in f]
        steps += sum("loss" in r for r in rows)
        validations += sum("valid_accuracy" in r for r in rows)
    return steps, validations


def control(run_dir, seed):
    """A23: acquire continued from its best model for as many optimizer steps as reflect took, with reflect's batch
    size and learning rate and as many validations, so only the training signal differs: the teacher's rationales
    (SFT) instead of the student's own preferred chains (DPO + NLL)."""
    out = os.path.join(run_dir, "control")
    if not os.path.isdir(os.path.join(out, "best")):
        steps, validations = reflect_budget(run_dir)
        run("tinythinker.py", "--phase", "acquire", "--model", os.path.join(run_dir, "best"), "--out", out,
            "--seed", str(seed), "--steps", str(steps), "--eval-every", str(math.ceil(steps / max(validations, 1))),
            "--batch-size", str(WORLD["reflect"]["batch_size"]), "--lr", str(WORLD["reflect"]["lr"]))
    return out


def summary(values):
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {spread:.1f} | {', '.join(f'{v:.1f}' for v in values)}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run of each variant per seed "
                        "(default 1 2 3)")
    parser.add_argument("--variants", nargs="+", default=list(data.STAGES), help="the stage variants acquired; "
                        "recall_analyze_summarize is also reflected on, beside its control (default all four)")
    parser.add_argument("--epochs", type=int, help="acquire epochs (default: the demo's); fewer leave the student "
                                                    "errors on its training questions for reflect to learn from")
    parser.add_argument("--iterations", type=int, help="reflect iterations (default: the demo's)")
    parser.add_argument("--samples", type=int, help="reflect's chains per question (default: the demo's)")
    parser.add_argument("--markdown", default=MARKDOWN, help="the Markdown the table is written into, in place of the "
                        "one of the same sizes (default runs/BENCHMARKS.md; BENCHMARKS.md: the repository's)")
    args = parser.parse_args()
    acquire, reflect, tag = sizes(args.epochs, args.iterations, args.samples)
    begin, end = f"<!-- ablation{tag}:begin -->", f"<!-- ablation{tag}:end -->"
    test, train = {}, {}
    for seed in args.seeds:
        for variant in args.variants:
            out = os.path.join(RUNS, f"{variant}{tag}-seed{seed}")
            if not os.path.isfile(os.path.join(out, "best", "model.safetensors")):
                run("tinythinker.py", "--phase", "acquire", "--stages", variant, "--seed", str(seed), "--out", out,
                    *acquire)
            if variant != "recall_analyze_summarize":
                test.setdefault(variant, []).append(accuracies(out, "test")["acquire"])
                continue
            if not os.path.isdir(os.path.join(out, "reflect", "best")):
                run("tinythinker.py", "--phase", "reflect", "--from", out, "--seed", str(seed), *reflect)
            continued = control(out, seed)
            for name, phase, run_dir in [(variant, "acquire", out), ("+ reflect", "reflect", out),
                                         ("+ continued acquire (control)", "acquire", continued)]:
                test.setdefault(name, []).append(accuracies(run_dir, "test")[phase])
                train.setdefault(name, []).append(accuracies(run_dir, "train")[phase])
            test.setdefault("reflect steps", []).append(reflect_budget(out)[0])
    command = " ".join(["python ablation.py --seeds", *map(str, args.seeds), "--variants", *args.variants, *acquire,
                        *reflect])
    lines = [begin, f"`{command}` (chance 25.0%; training accuracy: the same greedy chains on the training questions)",
             "",
             "| stages | held-out accuracy, mean ± std (%) | per seed | training accuracy, mean ± std (%) "
             "| per seed |",
             "|---|---|---|---|---|"]
    steps = test.pop("reflect steps", None)
    for name, values in test.items():
        lines.append(f"| {name} | {summary(values)} | {summary(train[name]) if name in train else '| '} |")
    if steps:
        lines += ["", f"Reflect took {', '.join(map(str, steps))} optimizer steps (per seed); the control as many."]
    lines.append(end)
    table = "\n".join(lines)
    print(table)
    write_benchmarks(args.markdown, table, begin, end, "The paper's claims on the embedded world")


def write_benchmarks(markdown, table, begin, end, heading):
    """Put `table` (which starts with `begin` and ends with `end`) into the Markdown file `markdown` in place of the
    one there, or under a new `heading`."""
    text = open(markdown).read() if os.path.isfile(markdown) else ""
    if begin in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: table, text, flags=re.S)
    else:
        text += f"\n## {heading}\n\n{table}\n"
    os.makedirs(os.path.dirname(markdown) or ".", exist_ok=True)
    atomic_write(markdown, text.encode())
    print(f"wrote the table into {markdown}")


if __name__ == "__main__":
    main()
