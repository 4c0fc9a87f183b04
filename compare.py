"""The two methods side by side on the embedded world: same student (a T5 from scratch, world.MODEL), same teacher
(the world's built-in one), same held-out questions; held-out accuracy over seeds with each row's budget, in a table
like BENCHMARKS.md's.

    python compare.py                       # seeds 1 2 3, two runs at a time (36 minutes on 2 cores)
    python compare.py --seeds 1 --jobs 1
    python compare.py --only tailored       # train only Tailored's runs; TinyThinker's enter the table if finished
    python compare.py --seeds 1 --epochs 1 --iterations 1 --samples 2 --rounds 2    # a quick look (minutes)

Each run is the command a user types (tinythinker.py, tailored.py, then evaluate.py), in its own process with one
thread. The TinyThinker runs are ablation.py's (runs/ablation, same commands and seeds), so either script reuses the
other's; the Tailored runs go under runs/compare of the current directory. The table is printed and written into
runs/BENCHMARKS.md (--markdown), in place of the table of the same sizes; --markdown BENCHMARKS.md writes it into the
repository's. A rerun skips finished runs. --epochs sets every acquire's and every Tailored round's epochs,
--iterations and --samples reflect's; their runs and their table are kept apart from the demo's. The Tailored run
without L_SR (--lam 0) starts from the same round-1 model as the one with it (round 1 has no L_SR, and the round-2
exam is seeded), so the two differ only in the loss of rounds 2..K.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import ablation
import world

RUNS = os.path.join("runs", "compare")
# print writes a line and its newline separately: two jobs starting at once ran their "+" lines together
ECHO = threading.Lock()


def run(script, *args):
    """python `script` (one of this project's) with args, in its own process with one thread; its output goes to
    runs/compare/log.txt."""
    with ECHO:
        print("+", script, " ".join(args), flush=True)
    with open(os.path.join(RUNS, "log.txt"), "a") as log:
        subprocess.run([sys.executable, os.path.join(ablation.HERE, script), *args], check=True, stdout=log,
                       stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})


def report(run_dir):
    """evaluate.py's rows on the held-out test questions, by phase."""
    run("evaluate.py", run_dir, "--split", "test")
    with open(os.path.join(run_dir, "report.json")) as f:
        return {row["phase"]: row for row in json.load(f)}


def last_step(log_path):
    with open(log_path) as f:
        return max(json.loads(line)["step"] for line in f)


def tinythinker_rows(seed, stages, train, sizes):
    """Answer-only (stages summarize) or the full TinyThinker (acquire, then reflect) for one seed; with train False,
    only a finished run's rows. sizes: ablation.sizes' flags and tag."""
    acquire, reflect, tag = sizes
    out = os.path.join(ablation.RUNS, f"{stages}{tag}-seed{seed}")
    full = stages == "recall_analyze_summarize"
    finished = os.path.isfile(os.path.join(out, "best", "model.safetensors")) and (
        not full or os.path.isdir(os.path.join(out, "reflect", "best")))
    if not finished and not train:
        return {}
    if not os.path.isfile(os.path.join(out, "best", "model.safetensors")):
        run("tinythinker.py", "--phase", "acquire", "--stages", stages, "--seed", str(seed), "--out", out, *acquire)
    if full and not os.path.isdir(os.path.join(out, "reflect", "best")):
        run("tinythinker.py", "--phase", "reflect", "--from", out, "--seed", str(seed), *reflect)
    rows = report(out)
    with open(os.path.join(out, "config.json")) as f:
        acquire_steps = json.load(f)["total_steps"]
    requests = len(world.make_world().train)  # the built-in teacher answers one request per training question
    if not full:
        return {"answer-only fine-tuning": (rows["acquire"]["accuracy"], acquire_steps, requests)}
    iterations = [d for d in os.listdir(os.path.join(out, "reflect")) if re.fullmatch(r"iter_\d+", d)]
    reflect_steps = sum(last_step(os.path.join(out, "reflect", d, "log.jsonl")) for d in iterations)
    return {"TinyThinker acquire": (rows["acquire"]["accuracy"], acquire_steps, requests),
            "TinyThinker acquire + reflect": (rows["reflect"]["accuracy"], acquire_steps + reflect_steps, requests)}


def tailored_rows(seed, rounds, train, epochs):
    """Tailored with L_SR, then without it from the same round-1 model; with train False, only finished runs' rows.
    epochs: of every round (None: the demo's)."""
    result, tag = {}, f"-epochs{epochs}" if epochs else ""
    flags = ["--epochs", str(epochs), "--later-epochs", str(epochs)] if epochs else []
    for lam in ("0.5", "0"):
        out = os.path.join(RUNS, f"tailored{tag}-lam{lam}-seed{seed}")
        if not train and not os.path.isfile(os.path.join(out, "summary.json")):
            continue
        if lam == "0" and not os.path.isdir(out):
            source = os.path.join(RUNS, f"tailored{tag}-lam0.5-seed{seed}")
            os.makedirs(out)
            for shared in ("tokenizer", "round_1"):
                shutil.copytree(os.path.join(source, shared), os.path.join(out, shared))
        if not os.path.isfile(os.path.join(out, "summary.json")):  # tailored.py writes it when its rounds are done
            run("tailored.py", "--seed", str(seed), "--rounds", str(rounds), "--lam", lam, "--out", out, "--resume",
                *flags)
        rows = report(out)
        with open(os.path.join(out, "summary.json")) as f:
            done = {int(k): stats for k, stats in json.load(f).items()}
        steps = requests = 0
        for k, stats in sorted(done.items()):
            steps, requests = steps + stats["steps"], requests + stats["requests"]
            if k == 1 and lam == "0.5":
                result["chain-of-thought fine-tuning (Tailored round 1)"] = (rows["round 1"]["accuracy"], steps,
                                                                             requests)
        last = max(done)
        name = f"Tailored rounds 1..{last}, " + ("with L_SR (lambda 0.5)" if lam == "0.5" else
                                                 "without L_SR (lambda 0)")
        result[name] = (rows[f"round {last}"]["accuracy"], steps, requests)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="one run of each method per seed "
                        "(default 1 2 3)")
    parser.add_argument("--rounds", type=int, default=3, help="Tailored Learning's rounds (default 3)")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each with one thread (default 2)")
    parser.add_argument("--only", choices=["tailored", "tinythinker"], help="train only this method's runs; the "
                        "other's enter the table if they are finished (default: train both)")
    parser.add_argument("--epochs", type=int, help="epochs of every acquire and Tailored round (default: the demo's)")
    parser.add_argument("--iterations", type=int, help="reflect iterations (default: the demo's)")
    parser.add_argument("--samples", type=int, help="reflect's chains per question (default: the demo's)")
    parser.add_argument("--markdown", default=ablation.MARKDOWN, help="the Markdown the table is written into, in "
                        "place of the one of the same sizes (default runs/BENCHMARKS.md; BENCHMARKS.md: the "
                        "repository's)")
    args = parser.parse_args()
    sizes = ablation.sizes(args.epochs, args.iterations, args.samples)
    trains = lambda method: args.only in (None, method)
    os.makedirs(RUNS, exist_ok=True)
    chains = [(f, seed) for seed in args.seeds for f in (
        lambda s: tailored_rows(s, args.rounds, trains("tailored"), args.epochs),
        lambda s: tinythinker_rows(s, "recall_analyze_summarize", trains("tinythinker"), sizes),
        lambda s: tinythinker_rows(s, "summarize", trains("tinythinker"), sizes))]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: (job[1], job[0](job[1])), chains))
    table = {}  # row name -> {seed: (accuracy, steps, requests)}
    for seed, rows in results:
        for name, value in rows.items():
            table.setdefault(name, {})[seed] = value
    order = ["answer-only fine-tuning", "chain-of-thought fine-tuning (Tailored round 1)"]
    order += sorted(n for n in table if n.startswith("Tailored"))
    order += ["TinyThinker acquire", "TinyThinker acquire + reflect"]
    acquire, reflect, tag = sizes
    command = " ".join(["python compare.py --seeds", *map(str, args.seeds), "--rounds", str(args.rounds), *acquire,
                        *reflect])
    begin, end = f"<!-- compare{tag}:begin -->", f"<!-- compare{tag}:end -->"
    lines = [begin, f"`{command}` (held-out test questions of the world, 96; chance 25.0%; budget = optimizer steps "
             "and teacher requests, each per seed, min-max over seeds)", "",
             "| method | held-out accuracy, mean ± std (%) | per seed | optimizer steps | teacher requests |",
             "|---|---|---|---|---|"]
    span = lambda xs: f"{min(xs)}" if min(xs) == max(xs) else f"{min(xs)}-{max(xs)}"
    for name in [n for n in order if n in table]:
        accs = [table[name][s][0] for s in args.seeds if s in table[name]]
        spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
        steps, requests = ([table[name][s][i] for s in table[name]] for i in (1, 2))
        lines.append(f"| {name} | {statistics.mean(accs):.1f} ± {spread:.1f} | {', '.join(f'{a:.1f}' for a in accs)} "
                     f"| {span(steps)} | {span(requests)} |")
    lines.append(end)
    text = "\n".join(lines)
    print(text)
    ablation.write_benchmarks(args.markdown, text, begin, end,
                              "Tailored Learning against TinyThinker on the embedded world")


if __name__ == "__main__":
    main()
