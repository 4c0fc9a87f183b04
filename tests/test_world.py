"""The embedded world: deterministic, answered by its teacher in the LLM teacher's format, and built so that the
held-out questions' knowledge is in training only inside Key Information."""
import collections
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import evaluate
import teacher
import tinythinker
import world

ROOT = Path(__file__).resolve().parent.parent

def test_the_world_is_made_the_same_every_time():
    first, second = world.make_world(), world.make_world()
    assert (first.train, first.valid, first.test) == (second.train, second.valid, second.test)
    assert len(first.train) == 464 and len(first.valid) == 48 and len(first.test) == 96


def test_every_teacher_completion_goes_through_the_llm_parser():
    made, failures = world.make_world(), []
    records = [r for q in made.train for r in teacher.records_from_completions(
        q, [world.teacher_completion(made, q)], failures)]
    assert failures == [] and len(records) == len(made.train)
    for record in records:
        assert sorted(record["explanations"]) == ["A", "B", "C", "D"]


def test_held_out_knowledge_is_in_training_only_inside_key_information():
    made = world.make_world()
    asked = collections.defaultdict(set)  # animal -> kinds of training question
    for q in made.train:
        asked[made.animal[q.id][0]].add(made.animal[q.id][1])
    completions = [world.teacher_completion(made, q) for q in made.train]
    key_information = " ".join(c.splitlines()[0] for c in completions)
    explanations = " ".join(line for c in completions for line in c.splitlines()[1:])
    for q in made.valid + made.test:
        animal, kind = made.animal[q.id]
        food = q.choices["ABCD".index(q.answer)]
        assert kind == "eat" and asked[animal] == {"where"}  # its food is never a gold answer in training ...
        assert food == world.food_of(made.habitat[animal], made.size[animal])  # ... but follows by the rule
        assert f"the {animal} lives in the {made.habitat[animal]} and is {made.size[animal]}." in key_information
        assert animal not in explanations  # explanations say "it"; a "where" one states no size
    where = next(q for q in made.train if made.animal[q.id][1] == "where")
    assert made.size[made.animal[where.id][0]] not in "".join(world.teacher_completion(made, where).splitlines()[1:])


def test_a_shrunken_demo_learns_the_held_out_foods(tmp_path, monkeypatch):
    """The README's first command end to end (acquire, reflect, evaluate) on a smaller world, 24 animals per habitat
    (20 known, 1 for validation, 3 held out: 36 test questions), with the demo's presets but 45 epochs (945 steps).
    A smaller world has fewer steps per epoch, and acquire's jump comes after a number of epochs; with 16 known
    animals per habitat and 30 epochs the student answered 33%.
    The same seed lands differently on different CPUs, whose matmul kernels round differently: 64% on the test (83%
    validation) after acquire and 67% after reflect on a 2-core AMD EPYC (AVX2), 58% after acquire on a 2-core Intel
    Xeon (AVX-512). So the bar is 50%. Margin: at chance each of the 36 answers is right with p = 1/4, and
    P(>= 18 of 36 right) = 0.001; in the extreme where the 12 held-out animals are the only independent units (all
    three wordings right or all wrong), P(>= 6 of 12 right) = 0.05. Either way 50% is well outside what an untrained or
    recall-blind student reaches (the ablation's recall-blind variants stay at 17-26%)."""
    monkeypatch.setattr(world, "make_world", functools.partial(world.make_world, per_habitat=24, known=20, valid=1))
    run = tmp_path / "run"
    tinythinker.acquire(tinythinker.parse_config(["--phase", "acquire", "--out", str(run), "--epochs", "45",
                                                  "--eval-every", "945"]))
    # Sampled hotter than the demo's 0.7, at which this student's two samples per question were all right: no pairs.
    tinythinker.reflect(tinythinker.parse_config(["--phase", "reflect", "--from", str(run), "--samples", "2",
                                                  "--temperature", "1.5", "--iterations", "1", "--epochs", "1"]))
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(run)])
    evaluate.main()
    report = {row["phase"]: row for row in json.loads((run / "report.json").read_text())}
    assert report["acquire"]["questions"] == 36 and report["acquire"]["chance"] == 25.0
    assert report["acquire"]["accuracy"] >= 50.0
    assert report["reflect"]["accuracy"] >= 50.0  # DPO on its own samples has not undone what acquire learned
    assert (run / "reflect" / "iter_1" / "recall_pairs.jsonl").is_file()


def test_the_readme_demo_line_runs_as_typed(tmp_path):
    """The README's first command, read from the README, each step as a subprocess from a fresh directory, with only
    sizes shrunk: one acquire epoch and one reflect iteration of one cycle (the learning is test_a_shrunken_demo's)."""
    first_line = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    steps = [step.split() for step in first_line.split(" && ") if step.startswith("python ")]
    assert [s[:3] for s in steps] == [["python", "tinythinker.py", "--phase"]] * 2 + [["python", "evaluate.py"]]
    sizes = {"acquire": ["--epochs", "1", "--eval-every", "45"], "reflect": ["--iterations", "1", "--epochs", "1",
                                                                          "--samples", "1"]}
    for _, script, *args in steps:
        extra = sizes.get(args[1], []) if args else []
        out = subprocess.run([sys.executable, str(ROOT / script), *args, *extra], cwd=tmp_path, capture_output=True,
                             text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "runs" / "world" / "report.json").read_text())
    assert [(r["phase"], r["data"], r["split"], r["questions"]) for r in report] == [
        ("acquire", "world", "test", 96), ("reflect", "world", "test", 96)]
    assert "summarize: " in out.stdout  # the demo ends by showing one held-out question's chain
    # Each config.json: the settings its phase uses, each from where it came, and the decisions METHOD 9 gives it
    for phase, folder in [("acquire", ""), ("reflect", "reflect")]:
        config = json.loads((tmp_path / "runs" / "world" / folder / "config.json").read_text())
        assert config["decisions"] == tinythinker.decisions(phase, "world")
        assert not set(tinythinker.unused(phase)) & (set(config) | set(config["sources"]))
        assert set(config["sources"]) | set(tinythinker.unused(phase)) | {"sources"} == set(
            tinythinker.Config.__dataclass_fields__)
    # reflect trained the acquire run's model, a T5 from scratch, and says so
    assert (config["model"], config["sources"]["model"]) == ("scratch", "acquire run")
    assert (config["lr"], config["sources"]["lr"]) == (5e-5, "world preset")
    assert (config["iterations"], config["sources"]["iterations"]) == (1, "command line")
