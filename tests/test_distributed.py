"""Every phase under torchrun on CPU (gloo, two processes) against the same command in one process: the same
validation accuracies, preference pairs, exam mistakes and reports, and losses that follow the same curve."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import tinythinker
from test_tailored import LLM, write_handful_obqa
from test_tinythinker import ROOT, args, read_log, world  # noqa: F401  (world: the handful fixture)

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def launch(launcher, script, *flags):
    out = subprocess.run([*launcher, os.path.join(ROOT, script), *flags], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[:3000] + out.stderr[-3000:]
    return out.stdout


@pytest.fixture(scope="module")
def acquired(world, tmp_path_factory):
    """A briefly trained student of the handful (as test_reflect_iteration_...): its sampled chains are partly wrong."""
    run = tmp_path_factory.mktemp("acquired") / "run"
    tinythinker.acquire(tinythinker.parse_config(args(world, run, "--lr", "3e-3", "--epochs", "12")))
    return run


def test_acquire_on_two_processes_follows_one_and_validates_alike(world, tmp_path):
    def run(out, launcher, batch):
        flags = args(world, out, "--epochs", "2", "--lr", "3e-3", "--eval-every", "5")
        flags[flags.index("--batch-size") + 1] = str(batch)
        launch(launcher, "tinythinker.py", *flags)
        log = read_log(out)
        return [r["loss"] for r in log if "loss" in r], [r["valid_accuracy"] for r in log if "valid_accuracy" in r]

    (single, single_valid), (double, double_valid) = run(tmp_path / "one", [sys.executable], 4), \
        run(tmp_path / "two", TORCHRUN, 2)
    assert len(single) == len(double) == 10 and single[-1] < single[0]  # it trains
    torch.testing.assert_close(torch.tensor(double), torch.tensor(single), rtol=1e-4, atol=1e-5)
    assert len(single_valid) == 2 and double_valid == single_valid


# Run by torchrun: an acquire that goes through, then one killed at its second validation (after one saved state)
# by Ctrl-C's KeyboardInterrupt on every rank, as test_tinythinker's resume test does in one process, then its
# --resume; rank 0 keeps the killed run's state.pt as state_at_kill.pt. One launch for the three: each costs seconds.
KILL_AND_RESUME = """
import os, shutil, sys
sys.path.insert(0, os.getcwd())
import torch.distributed as dist
import evaluate, tinythinker
whole, killed, *flags = sys.argv[1:]
tinythinker.acquire(tinythinker.parse_config([*flags, "--out", whole]))
real, calls = evaluate.accuracy, []
def dies_at_second(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
        raise KeyboardInterrupt
    return real(*args, **kwargs)
evaluate.accuracy = dies_at_second
try:
    tinythinker.acquire(tinythinker.parse_config([*flags, "--out", killed]))
except KeyboardInterrupt:
    evaluate.accuracy = real
if dist.get_rank() == 0:
    shutil.copy(os.path.join(killed, "state.pt"), os.path.join(killed, "state_at_kill.pt"))
tinythinker.acquire(tinythinker.parse_config([*flags, "--out", killed, "--resume"]))
dist.destroy_process_group()
"""


def test_two_processes_resume_each_with_its_own_generators(world, tmp_path):
    """Dropout on (the handful's model with dropout_rate 0.1), two processes: a run killed after its first saved
    state and resumed ends with the weights, log and every rank's generators of the run that went through. The two
    ranks' saved generators differ, so a rank resumed with the other's would draw other dropout masks."""
    model = tmp_path / "model"
    shutil.copytree(world / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "dropout_rate": 0.1}))
    (tmp_path / "kill_and_resume.py").write_text(KILL_AND_RESUME)
    # the script puts its own --out after these: whole, then killed
    flags = args(world, tmp_path / "whole", "--model", str(model), "--epochs", "2", "--eval-every", "3",
                 "--max-new-tokens", "8")
    launch(TORCHRUN, str(tmp_path / "kill_and_resume.py"), str(tmp_path / "whole"), str(tmp_path / "killed"), *flags)
    at_kill = torch.load(tmp_path / "killed" / "state_at_kill.pt", weights_only=True)
    assert at_kill["step"] == 3 and len(at_kill["rng"]) == 2
    assert not torch.equal(at_kill["rng"][0]["torch"], at_kill["rng"][1]["torch"])
    whole, resumed = (torch.load(tmp_path / run / "state.pt", weights_only=True) for run in ("whole", "killed"))
    assert whole["step"] == resumed["step"] == 8
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for rank in (0, 1):
        assert torch.equal(whole["rng"][rank]["torch"], resumed["rng"][rank]["torch"]), rank
    assert read_log(tmp_path / "whole") == read_log(tmp_path / "killed")


def test_reflect_samples_the_same_pairs_on_two_processes_and_resumes(acquired, tmp_path):
    reflect = ["--phase", "reflect", "--samples", "4", "--epochs", "2", "--batch-size", "4", "--lr", "1e-4",
               "--max-new-tokens", "24"]
    runs = {}
    for name, launcher in (("one", [sys.executable]), ("two", TORCHRUN)):
        runs[name] = tmp_path / name
        shutil.copytree(acquired, runs[name])
        launch(launcher, "tinythinker.py", *reflect, "--from", str(runs[name]), "--iterations", "1")
    first = {name: run / "reflect" / "iter_1" for name, run in runs.items()}
    for pairs in ("recall_pairs.jsonl", "analyze_pairs.jsonl"):
        assert (first["one"] / pairs).read_text() == (first["two"] / pairs).read_text(), pairs
    assert (first["one"] / "recall_pairs.jsonl").read_text() + (first["one"] / "analyze_pairs.jsonl").read_text()
    losses = {name: [r["loss"] for r in read_log(iteration) if "loss" in r] for name, iteration in first.items()}
    torch.testing.assert_close(torch.tensor(losses["two"]), torch.tensor(losses["one"]), rtol=1e-4, atol=1e-5)
    # A second iteration on two processes continues the run: iteration 1 is done and kept, iteration 2 is sampled.
    kept = (first["two"] / "log.jsonl").read_text()
    launch(TORCHRUN, "tinythinker.py", *reflect, "--from", str(runs["two"]), "--iterations", "2", "--resume")
    assert (first["two"] / "log.jsonl").read_text() == kept
    assert (runs["two"] / "reflect" / "iter_2" / "done.json").is_file()
    assert (runs["two"] / "reflect" / "best" / "model.safetensors").is_file()


def test_evaluate_reports_alike_on_two_processes(acquired, tmp_path):
    """Self-consistency (sampled recalls and analyses, greedy summaries, then a vote): the same report and chains on 1
    and 2 processes (greedy sharding alone: the acquire test's validations)."""
    for decoding in (["--split", "train", "--samples", "3", "--temperature", "1.0"],):
        outputs = {}
        for name, launcher in (("one", [sys.executable]), ("two", TORCHRUN)):
            stdout = launch(launcher, "evaluate.py", str(acquired), *decoding, "--out", str(tmp_path / name))
            predictions = (acquired / "best" / f"predictions_{decoding[1]}.jsonl").read_text()
            report = json.loads((tmp_path / f"{name}.json").read_text())
            outputs[name] = report, predictions, stdout.count("| acquire |")
        assert outputs["one"] == outputs["two"] and outputs["one"][2] == 1  # rank 0 alone prints the table
        assert len(outputs["one"][1].splitlines()) == 4 * (3 if "--samples" in decoding else 1)


def test_tailored_on_two_processes_asks_once_and_finds_the_same_mistakes(tmp_path):
    """Round 2 from the same round-1 model (shared as compare.py shares it): the sharded exam finds the mistakes one
    process finds, rank 0 alone asks the teacher for their corrections, and the round trains."""
    write_handful_obqa(tmp_path / "data")
    llm = LLM()
    flags = ["--data", "obqa", "--data-dir", str(tmp_path / "data"), "--model", "scratch", "--base-url", llm.url,
             "--rounds", "2", "--epochs", "2", "--later-epochs", "2", "--batch-size", "4", "--max-new-tokens", "8"]
    launch([sys.executable], "tailored.py", *flags, "--out", str(tmp_path / "one"))
    one_requests = len(llm.log)
    for shared in ("tokenizer", "round_1"):
        shutil.copytree(tmp_path / "one" / shared, tmp_path / "two" / shared)
    # a new cache: the two-process run must ask for round 2's corrections itself
    shutil.move(tmp_path / "data" / "obqa" / "tailored.cache.jsonl", tmp_path / "one.cache.jsonl")
    launch(TORCHRUN, "tailored.py", *flags, "--out", str(tmp_path / "two"))
    for name in ("mistakes.jsonl", "corrections.jsonl"):
        assert (tmp_path / "one" / "round_2" / name).read_text() == (tmp_path / "two" / "round_2" / name).read_text()
    summary = {name: json.loads((tmp_path / name / "summary.json").read_text()) for name in ("one", "two")}
    assert summary["two"]["2"]["requests"] == summary["one"]["2"]["requests"] == len(llm.log) - one_requests > 0
    assert summary["two"]["2"]["steps"] == summary["one"]["2"]["steps"]
    llm.httpd.shutdown()
