"""Both training phases end to end on a handful of questions written here in the official OpenBookQA layout, with a
tiny T5 and a tokenizer trained on the spot, through the same command line a user runs."""
import json
import os
import sys

import pytest
import sentencepiece as spm
import torch

import data
import evaluate
import tinythinker
import train
from t5 import T5, T5Config, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HANDFUL = [  # question, choices, gold, Key Information, one reason per option
    ("What cuts wood?", ["a saw", "a spoon", "a cup"], "A", "Cutting wood needs a sharp blade.",
     ["a saw has a toothed blade.", "a spoon is for eating soup.", "a cup holds a drink."]),
    ("What holds water?", ["a net", "a bucket", "a fork"], "B", "Holding water needs a sealed container.",
     ["a net has holes.", "a bucket is a sealed container.", "a fork has gaps between its prongs."]),
    ("What gives light at night?", ["a rock", "a shoe", "a lamp"], "C", "Light at night comes from a bulb or flame.",
     ["a rock gives no light.", "a shoe is worn on a foot.", "a lamp has a bright bulb."]),
    ("What keeps you dry in rain?", ["a coat", "a sieve", "a kite"], "A", "Staying dry needs a waterproof cover.",
     ["a coat is waterproof.", "a sieve lets water through.", "a kite flies in the wind."]),
]


def official_record(i, question, choices, gold):
    return {"id": f"q{i}", "question": {"stem": question, "choices": [
        {"label": data.LETTERS[j], "text": text} for j, text in enumerate(choices)]}, "answerKey": gold}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """data/obqa/original/{train,dev,test}.jsonl (the same handful in each), teacher records, and a tiny model."""
    root = tmp_path_factory.mktemp("handful")
    original = root / "data" / "obqa" / "original"
    original.mkdir(parents=True)
    lines = "".join(json.dumps(official_record(i, *h[:3])) + "\n" for i, h in enumerate(HANDFUL))
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        (original / name).write_text(lines)
    records = [dict(id=f"q{i}", question=q, choices=c, answer=g, key_information=ki,
                    explanations={data.LETTERS[j]: r for j, r in enumerate(reasons)})
               for i, (q, c, g, ki, reasons) in enumerate(HANDFUL)]
    (root / "data" / "obqa" / "teacher_train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    texts = [x + " " + y for stage in data.stage_examples(records, "recall_analyze_summarize").values() for x, y in stage]
    # A unigram spm, as public checkpoints have: on four questions, Tokenizer.train's BPE makes most words a piece of
    # their own, seen a few times each, and 40 recall steps no longer reproduce the Key Information letter for letter.
    (root / "model").mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(root / "model" / "spiece"),
                                   vocab_size=200, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    tokenizer = Tokenizer(root / "model" / "spiece.model")
    torch.manual_seed(0)
    config = T5Config(vocab_size=tokenizer.vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                      dropout_rate=0.0)
    T5(config).save_pretrained(root / "model")
    return root


def args(world, run, *extra):
    return ["--data", "obqa", "--data-dir", str(world / "data"), "--model", str(world / "model"), "--out", str(run),
            "--batch-size", "4", "--interval", "1", "--max-new-tokens", "24", "--eval-batch-size", "64", *extra]


def read_log(run):
    with open(os.path.join(run, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


# ---------------------------------------------------------------------------------------------- the staged schedule

@pytest.mark.parametrize("stages, expected", [
    # interval 2, k = 4 options: 2 recall, 8 analyze, 2 summarize per cycle; the last cycle takes what is left
    ("recall_analyze_summarize", "RR" + "A" * 8 + "SS" + "RR" + "A" * 8 + "SS" + "R" + "A" * 4 + "S"),
    ("recall_summarize", "RRSS" "RRSS" "RS"),
    ("analyze_summarize", "A" * 8 + "SS" + "A" * 8 + "SS" + "A" * 4 + "S"),
    ("summarize", "SSSSS"),
])
def test_schedule_batch_sequence(stages, expected):
    batches = {s: n for s, n in dict(recall=5, analyze=20, summarize=5).items() if s in stages}
    quotas = dict(recall=2, analyze=8, summarize=2)
    assert "".join(s[0].upper() for s in train.stage_schedule(batches, quotas)) == expected


def test_schedule_skips_an_exhausted_loader():
    order = train.stage_schedule(dict(recall=1, analyze=10, summarize=3), dict(recall=2, analyze=4, summarize=2))
    assert "".join(s[0].upper() for s in order) == "R" "AAAA" "SS" "AAAA" "S" "AA"


def test_plan_trains_every_example_once_per_epoch():
    sizes = dict(recall=10, analyze=31, summarize=10)
    plan = train.Plan(sizes, batch=4, epochs=2, seed=1, quotas=dict(recall=1, analyze=3, summarize=1))
    assert plan.cycle == 5 and len(plan) == 2 * (3 + 8 + 3)
    for epoch in range(2):
        seen = {s: [] for s in sizes}
        for step in range(epoch * len(plan) // 2, (epoch + 1) * len(plan) // 2):
            seen[plan[step].stage] += plan[step].indices
        assert {s: sorted(i) for s, i in seen.items()} == {s: list(range(n)) for s, n in sizes.items()}
    assert plan[0].indices != plan[len(plan) // 2].indices  # a new shuffle every epoch


def test_a_step_budget_is_the_full_plan_cut_at_that_step():
    """acquire --steps (ablation.py's control): as many epochs as the budget needs, the same steps, cut at it."""
    sizes, quotas = dict(recall=10, analyze=31, summarize=10), dict(recall=1, analyze=3, summarize=1)
    full = train.Plan(sizes, batch=4, epochs=3, seed=1, quotas=quotas)
    cut = train.Plan(sizes, batch=4, epochs=1, seed=1, quotas=quotas, max_steps=len(full) - 5)
    assert len(cut) == len(full) - 5 > 2 * 14  # into the third epoch, whatever `epochs` says
    assert [cut[i] for i in range(len(cut))] == [full[i] for i in range(len(cut))]


# ---------------------------------------------------------------------------------------------- phase 1

def test_acquire_learns_the_handful_through_all_three_stages(world, tmp_path):
    run = tmp_path / "run"
    tinythinker.acquire(tinythinker.parse_config(args(world, run, "--lr", "3e-3", "--epochs", "40")))
    validations = [r["valid_accuracy"] for r in read_log(run) if "valid_accuracy" in r]
    assert len(validations) == 40  # one per cycle: an epoch of the handful is exactly one cycle here
    assert validations[-1] == 100.0
    model, tokenizer = T5.from_pretrained(run / "best"), Tokenizer.from_pretrained(run / "best")
    train = data.load("obqa", "train", world / "data")
    acc, chains = evaluate.accuracy(model, tokenizer, train, "recall_analyze_summarize", max_new_tokens=24)
    assert acc == 100.0
    assert [c.recall for c in chains] == [h[3] for h in HANDFUL]  # recall reproduces the teacher's Key Information
    config = json.loads((run / "config.json").read_text())
    assert config["effective_batch_size"] == 4 and config["env"]["torch"] == torch.__version__
    assert config["examples"] == dict(recall=4, analyze=12, summarize=4)


def test_acquire_resumes_a_killed_run_to_the_same_weights(world, tmp_path, monkeypatch):
    flags = ["--lr", "3e-3", "--epochs", "4"]
    tinythinker.acquire(tinythinker.parse_config(args(world, tmp_path / "whole", *flags)))

    real, calls = evaluate.accuracy, []

    def dies_at_third_validation(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after two saved states, with steps done since the last one
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "accuracy", dies_at_third_validation)
    with pytest.raises(KeyboardInterrupt):
        tinythinker.acquire(tinythinker.parse_config(args(world, tmp_path / "killed", *flags)))
    monkeypatch.setattr(evaluate, "accuracy", real)
    with pytest.raises(SystemExit, match="--resume"):  # an existing run is never silently overwritten
        tinythinker.acquire(tinythinker.parse_config(args(world, tmp_path / "killed", *flags)))
    tinythinker.acquire(tinythinker.parse_config(args(world, tmp_path / "killed", *flags, "--resume")))

    whole = torch.load(tmp_path / "whole" / "state.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "state.pt", weights_only=True)
    assert whole["step"] == resumed["step"] == 20
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert read_log(tmp_path / "whole") == read_log(tmp_path / "killed")


# ---------------------------------------------------------------------------------------------- evaluate.py

def test_vote_takes_the_majority_and_breaks_ties_by_first_seen():
    assert evaluate.vote(["B", "A", "B", None]) == "B"
    assert evaluate.vote([None, None, "A"]) is None  # an unparseable chain is a vote too
    assert evaluate.vote(["C", "A", "A", "C"]) == "C"


def test_accuracy_votes_over_sampled_chains(monkeypatch):
    questions = [data.Question("q0", "?", ["x", "y"], "A"), data.Question("q1", "?", ["x", "y"], "B")]
    predictions = iter(["A", "B", "A", "A", None, "A"])  # q0 votes A (right), q1 votes A (wrong)

    def crafted(model, tokenizer, repeated, stages, **kwargs):
        assert [q.id for q in repeated] == ["q0"] * 3 + ["q1"] * 3
        assert kwargs["recall_temperature"] == kwargs["analyze_temperature"] == 0.7
        return [data.Chain(q.id, q.answer, None, None, "", next(predictions)) for q in repeated]

    monkeypatch.setattr(evaluate, "run_chains", crafted)
    acc, chains = evaluate.accuracy(None, None, questions, "summarize", samples=3, temperature=0.7)
    assert acc == 50.0 and len(chains) == 6


def test_report_on_a_trained_run(world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    tinythinker.acquire(tinythinker.parse_config(args(world, run, "--lr", "3e-3", "--epochs", "2")))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(run), "--split", "test"])
    evaluate.main()
    [row] = json.loads((run / "report.json").read_text())
    assert row["phase"] == "acquire" and row["questions"] == 4 and row["chance"] == pytest.approx(33.33)
    assert 0 <= row["accuracy"] <= 100 and "| acquire |" in (run / "report.md").read_text()
    predictions = (run / "best" / "predictions_test.jsonl").read_text().splitlines()
    assert [json.loads(p)["id"] for p in predictions] == ["q0", "q1", "q2", "q3"]


# ---------------------------------------------------------------------------------------------- phase 2

def test_reflect_iteration_writes_its_artifacts_and_resumes(world, tmp_path, monkeypatch):
    run = tmp_path / "run"
    # A briefly trained student: its sampled chains are partly wrong, so there is something to prefer.
    tinythinker.acquire(tinythinker.parse_config(args(world, run, "--lr", "3e-3", "--epochs", "12")))
    reflect = ["--phase", "reflect", "--from", str(run), "--iterations", "1", "--samples", "4", "--epochs", "2",
               "--batch-size", "4", "--lr", "1e-4", "--max-new-tokens", "24"]
    real, calls = evaluate.accuracy, []

    def dies_at_second_validation(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "accuracy", dies_at_second_validation)
    with pytest.raises(KeyboardInterrupt):
        tinythinker.reflect(tinythinker.parse_config(reflect))
    iteration = run / "reflect" / "iter_1"
    pairs = {s: (iteration / f"{s}_pairs.jsonl").read_text() for s in ("recall", "analyze")}
    assert pairs["recall"] or pairs["analyze"]
    for line in (pairs["recall"] + pairs["analyze"]).splitlines():
        pair = json.loads(line)
        assert set(pair) == {"prompt", "chosen", "rejected"} and pair["chosen"] != pair["rejected"]

    monkeypatch.setattr(evaluate, "accuracy", real)
    tinythinker.reflect(tinythinker.parse_config(reflect + ["--resume"]))
    assert {s: (iteration / f"{s}_pairs.jsonl").read_text() for s in pairs} == pairs  # not sampled again
    log = [json.loads(line) for line in (iteration / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))  # each step logged once across the restart
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "nll"} <= set(steps[0])
    assert (run / "reflect" / "best" / "model.safetensors").is_file()
    assert (iteration / "done.json").is_file()


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_acquire_under_cpu_autocast_trains_like_fp32(world, tmp_path, precision):
    """--precision on a CPU: autocast in the model and, for fp16, train.fit's GradScaler("cpu"); the loss curve stays
    near fp32's (bf16 keeps 8 bits of mantissa, so the bound is loose) and the run validates and saves."""
    flags = ("--lr", "3e-3", "--epochs", "2")
    tinythinker.acquire(tinythinker.parse_config(args(world, tmp_path / "fp32", *flags)))
    tinythinker.acquire(tinythinker.parse_config(args(world, tmp_path / precision, *flags, "--precision", precision)))
    fp32, amp = ([r["loss"] for r in read_log(tmp_path / name) if "loss" in r] for name in ("fp32", precision))
    assert len(amp) == len(fp32) == 10 and amp[-1] < amp[0]
    torch.testing.assert_close(torch.tensor(amp), torch.tensor(fp32), rtol=0.05, atol=0.05)
    assert json.loads((tmp_path / precision / "config.json").read_text())["precision"] == precision
    assert (tmp_path / precision / "best" / "model.safetensors").is_file()
