"""Tailored Learning: the self-reflection loss by hand and against torch, the chain-of-thought format, the teacher's
two prompts through the cache, the exam, the batches, and the shrunken world through every round."""
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import zlib
from collections import defaultdict

import pytest
import torch

import data
import client
import evaluate
import tailored
import t5
import triplet
import world
from t5 import T5, T5Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return T5(T5Config(vocab_size=50, d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4, dropout_rate=0.1))


# ---------------------------------------------------------------------------------------------- the loss

def test_triplet_loss_by_hand_and_against_torch():
    a, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[0.0, 1.0]])
    # cos(a, n) = 0, cos(a, p) = 1/sqrt(2): max(0, 0 - 0.7071 + 1) = 0.2929
    assert triplet.triplet_loss(a, p, n).item() == pytest.approx(1 - 2 ** -0.5, abs=1e-6)
    assert triplet.triplet_loss(a, a, -a).item() == pytest.approx(0.0)  # cos(a, n) - cos(a, p) + 1 = -1 -> 0
    g = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(7, 5, generator=g, requires_grad=True) for _ in range(3))
    reference = torch.nn.TripletMarginWithDistanceLoss(
        distance_function=lambda x, y: -torch.nn.functional.cosine_similarity(x, y), margin=1.0)
    ours, theirs = triplet.triplet_loss(a, p, n), reference(a, p, n)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(torch.autograd.grad(ours, a)[0], torch.autograd.grad(theirs, a)[0])


def test_eos_state_of_a_padded_row_is_the_unpadded_one():
    model = tiny_model().eval()
    input_ids, mask = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    encoder_states, additive = model.encode(input_ids, mask)
    targets = [[10, 11, 12, 13, 1], [14, 1]]  # row 1 is padded by 3 in the batch
    together = triplet.eos_states(model, encoder_states, additive, targets)
    alone = triplet.eos_states(model, encoder_states[1:], additive[1:], targets[1:])
    torch.testing.assert_close(together[1], alone[0])
    # the state at eos is the decoder's final hidden state there: the last position of [start, 14, eos]
    h = model.decoder_states(torch.tensor([[0, 14, 1]]), encoder_states[1:], additive[1:])
    torch.testing.assert_close(alone[0], h[0, 2])


def test_decoder_states_give_forward_logits():
    model = tiny_model().eval()
    input_ids, mask, labels = torch.tensor([[5, 6, 1]]), torch.tensor([[1, 1, 1]]), torch.tensor([[7, 8, 1]])
    logits, _ = model(input_ids, mask, labels=labels)  # [labelled positions, vocab]
    h = model.decoder_states(torch.tensor([[0, 7, 8]]), *model.encode(input_ids, mask))
    torch.testing.assert_close(model.lm_logits(h)[0], logits)


def test_decoder_states_match_transformers_last_decoder_hidden_state(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, os.path.dirname(__file__))
    from make_t5_fixtures import tiny_hf_model
    reference = tiny_hf_model(gated=True, seed=2, d_model=32, d_kv=8, num_heads=4, d_ff=48)
    reference.save_pretrained(tmp_path)
    model = T5.from_pretrained(tmp_path)
    input_ids, mask, decoder_ids = torch.tensor([[5, 6, 7, 1]]), torch.tensor([[1, 1, 1, 1]]), torch.tensor([[0, 9, 1]])
    out = reference(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids, output_hidden_states=True)
    ours = model.decoder_states(decoder_ids, *model.encode(input_ids, mask))
    torch.testing.assert_close(ours, out.decoder_hidden_states[-1], rtol=1e-4, atol=1e-5)


def test_rows_without_a_positive_or_negative_are_masked():
    anchors = [[1, 2, 1], [3, 1], [4, 1], [5, 1]]
    positives = [[[1, 2, 1], [2, 2, 1]], [[3, 1]], [[6, 1]], [[7, 1]]]  # row 1: only its own text, so no positive
    negatives = [[[9, 1]], [[9, 1]], [], [[8, 1]]]                       # row 2: no negative
    kept, p, n = triplet.triplets(anchors, positives, negatives, triplet.draw(0, "test"))
    assert kept == [0, 3] and p == [[2, 2, 1], [7, 1]] and n == [[9, 1], [8, 1]]
    # the loss of the kept rows only, and gradients reach the model only through them
    model = tiny_model()
    input_ids, mask = torch.tensor([[5, 6, 1]] * 4), torch.ones(4, 3, dtype=torch.long)
    loss = triplet.self_reflection_loss(model, input_ids[kept], mask[kept], [anchors[i] for i in kept], p, n)
    with torch.no_grad():
        encoder_states, additive = model.eval().encode(input_ids[:2].repeat(3, 1), mask[:2].repeat(3, 1))
        states = triplet.eos_states(model, encoder_states, additive, [anchors[0], anchors[3], *p, *n])
    by_hand = sum(max(0.0, torch.cosine_similarity(states[i], states[4 + i], 0).item()
                      - torch.cosine_similarity(states[i], states[2 + i], 0).item() + 1.0) for i in range(2)) / 2
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)
    model.train()
    loss = triplet.self_reflection_loss(model, input_ids[kept], mask[kept], [anchors[i] for i in kept], p, n)
    assert loss.item() == pytest.approx(by_hand, abs=1e-5)  # dropout is off for the three passes ...
    assert model.training  # ... and only for them


def test_self_reflection_loss_cuts_long_continuations_at_eos():
    assert t5.truncate([5] * 10 + [1], 4) == [5, 5, 5, 1] and t5.truncate([5, 1], 4) == [5, 1]


# ---------------------------------------------------------------------------------------------- formats, prompts

def test_cot_format_and_parser():
    q = data.Question("q", "Where?", ["cave", "lake", "sea"], "B")
    assert data.cot_input(q) == "Question: Where?\nAnswer Choices:\n(a) cave\n(b) lake\n(c) sea\nAnswer:"
    assert data.parse_cot("It is wet. Therefore, the answer is lake (b). Or (a)", q) == "B"  # the first (x)
    assert data.parse_cot("(C)", q) == "C" and data.parse_cot("a", q) == "A"
    assert data.parse_cot("Therefore, the answer is sky (e).", q) is None  # not an offered option
    s = data.Question("s", "Is it?", ["yes", "no"], "B", "yes_no")
    assert data.cot_target("It is not. So, the answer is No.", s) == "It is not. So, the answer is No. Answer: No"
    assert data.parse_cot("yes, it seems. Answer: No", s) == "B" and data.parse_cot("maybe yes", s) == "A"
    assert data.parse_cot("maybe", s) is None


@pytest.mark.parametrize("text, number", [
    ("He has 48 + 24 = 72 clips.\nAnswer: 72", "72"),
    ("10% of 40 is 4, so 36 a day and 36 * 30 = 1,080 in all.\nAnswer: 1,080", "1080"),  # commas removed
    ("Each costs $1,234.50 in total.", "1234.50"),
    ("Half of 5 is 2.5 cups.\nAnswer: 2.5", "2.5"),
    ("She paid 18 dollars.\nAnswer: 18.0", "18.0"),  # compared as strings: not "18"
    ("The change is 3 - 5 = -2 degrees.\nAnswer: -2", "-2"),
    ("He buys 2 and then 3 more, so he has 5.", "5"),  # no marker: the last number, its "." dropped
    ("Therefore, the answer is 12. He started with 30.", "12"),  # the first number after the other marker
    ("So 9 + 3 = 12.\nAnswer: 12\n\nQuestion: Tom has 4 apples and buys 6 more.", "12"),
    ("He has 8 left.\n\nQuestion: Tom has 4 apples and buys 6 more.", "8"),  # a blank line ends the text
    ("It is 5 or 6.\nAnswer: 5, then 6\nAnswer: 7", "5"),  # the first number after the first marker
    ("no number here", None), ("\nAnswer: none", None),
    ("It was 3 and 4 more makes 7 Answer: 7 of 10", "7"),  # TL2: the student's "Answer:" follows a space
])
def test_the_official_number_parser(text, number):
    """Golden cases, each checked against the official tools.cleanup (Raibows/Learn-to-Reason) but the last, whose
    marker follows a space as a T5 student writes it (TL2)."""
    assert data.parse_cot(text, data.Question("g", "?", [], "0", "number")) == number


def test_the_official_yes_no_and_multiple_choice_parsers():
    """Cases where the official parsers differ from a lenient one: StrategyQA takes the first yes/no after the FIRST
    answer marker, of whitespace-separated words with only "." stripped; CSQA takes the first "(x)" of the first line
    or the line as a bare letter, and nothing else (TL13 reads letters in either case)."""
    s = data.Question("s", "Is it?", ["yes", "no"], "A", "yes_no")
    assert data.parse_cot("So, the answer is No.\nAnswer: Yes, no", s) == "B"  # "Yes," is not a yes/no word
    assert data.parse_cot("Answer: yes\nAnswer: no", s) == "B" and data.parse_cot("No it is not. So yes.", s) == "A"
    assert data.parse_cot("Yes, it is.", s) is None and data.parse_cot("It is so. (B)", s) is None
    q = data.Question("q", "Where?", ["cave", "lake", "sea"], "B")
    assert data.parse_cot("b.", q) is None and data.parse_cot("Hmm\n(a)", q) is None
    assert data.parse_cot("It is lake (b) not (c)", q) == "B" and data.parse_cot("(B)", q) == "B"
    assert data.parse_cot("So (e) or (a).", q) is None  # the first "(x)" is not offered: wrong, as the official's


def test_math_teacher_completions_prompts_and_targets():
    """GSM8K through the teacher's prompt, a completion's rationale and the student's target: the official demos,
    the gold number in feedback, the "Answer:" line cut and the gold one appended after a space, calculator
    annotations dropped."""
    q = data.Question("train-25", "Adam earns $40 daily. 10% is taxed. What does he keep in 30 days?", [], "1080",
                      "number")
    message = tailored.cot_message(q, "gsm8k")
    assert message.startswith("Question: Albert is wondering how much pizza he can eat in one day.")
    assert message.endswith("Answer: 110\n\nQuestion: " + q.question + "\nReasoning:")
    assert tailored.cot_message(q, "svamp").startswith("Question: Paul had 50 books.")
    assert tailored.cot_message(q, "/data/my-sums").startswith("Question: Albert")  # one's own numbers: GSM8K's
    assert "The correct answer is 1080.\nStudent: 40 * 30 = 1200" in tailored.feedback_message(q, "40 * 30 = 1200",
                                                                                                "gsm8k")
    completion = ("Error: the student forgot the taxes.\nReasoning: He keeps 40 - 4 = <<40-4=36>>36 a day,\nso "
                  "36 * 30 = <<36*30=1080>>1,080.\nAnswer: 1,080\n\nQuestion: Next one")
    rationale = tailored.parse_cot_completion(completion, q)
    assert rationale == "He keeps 40 - 4 = <<40-4=36>>36 a day, so 36 * 30 = <<36*30=1080>>1,080."
    assert data.cot_target(rationale, q) == "He keeps 40 - 4 = 36 a day, so 36 * 30 = 1,080. Answer: 1080"
    assert data.parse_cot(data.cot_target(rationale, q), q) == "1080"
    for wrong in ("He keeps 36 a day.\nAnswer: 1,000", "He keeps 40 a day for 30 days: 1,200."):
        with pytest.raises(client.InvalidCompletion):
            tailored.parse_cot_completion(wrong, q)


def test_generation_caps_per_task(tmp_path):
    """--max-new-tokens 0 resolves to the task's official cap (TL10), recorded as such in config.json."""
    caps = {name: tailored.parse_config(["--data", name]).max_new_tokens
            for name in ("gsm8k", "svamp", "multiarith", "csqa", "strategyqa", "obqa", "world")}
    assert caps == dict(gsm8k=256, svamp=192, multiarith=192, csqa=96, strategyqa=128, obqa=96, world=64)
    own = tmp_path / "sums.jsonl"
    own.write_text("".join(json.dumps({"id": f"n{i}", "question": f"{i} + 1?", "answer": str(i + 1)}) + "\n"
                           for i in range(10)))
    assert tailored.parse_config(["--data", str(own)]).max_new_tokens == 256
    assert tailored.parse_config(["--data", "gsm8k", "--max-new-tokens", "16"]).max_new_tokens == 16


def test_tailored_names_every_task_it_takes():
    with pytest.raises(data.DataError, match=r"^--data must be one of world, csqa, obqa, strategyqa, gsm8k, svamp, "
                                             r"multiarith or a directory or .jsonl file of your own questions, "
                                             r"not 'gsm'$"):
        tailored.parse_config(["--data", "gsm"])


def test_teacher_completions_keep_gold_rationales_only():
    q = data.Question("q", "Where?", ["cave", "lake"], "B")
    assert tailored.parse_cot_completion("Wet things live in lakes. Therefore, the answer is lake (b).\n\nQuestion: x",
                                        q) == "Wet things live in lakes. Therefore, the answer is lake (b)."
    feedback = "Error: caves are dry.\nAnswer: It swims. Therefore, the answer is lake (b)."
    assert tailored.parse_cot_completion(feedback, q) == "It swims. Therefore, the answer is lake (b)."
    with pytest.raises(client.InvalidCompletion):
        tailored.parse_cot_completion("Therefore, the answer is cave (a).", q)
    s = data.Question("s", "Is it?", ["yes", "no"], "A", "yes_no")
    assert tailored.parse_cot_completion("It is. So, the answer is Yes.\nAnswer: Yes", s) == \
        "It is. So, the answer is Yes."
    message = tailored.cot_message(q, "obqa")
    assert message.startswith("Question: What do people use to absorb extra ink from a fountain pen?\nAnswer Choices:")
    assert message.endswith("\n\nQuestion: Where?\nAnswer Choices:\n(a) cave\n(b) lake\nAnswer:")
    feedback = tailored.feedback_message(q, "Dry. Therefore, the answer is cave (a).", "obqa")
    assert feedback.startswith(message) and "The correct answer is lake (b)." in feedback
    assert "Student: Dry. Therefore, the answer is cave (a)." in feedback


def test_world_teacher_answers_both_prompts_in_the_official_format():
    made = world.make_world()
    for q in made.train[:40]:
        rationales = world.cot_completions(made, q, tailored.COT_N)
        assert len(set(rationales)) == tailored.COT_N
        assert [tailored.parse_cot_completion(r, q) for r in rationales] == rationales
        wrong = next(x for x in "ABCD" if x != q.answer)
        mistake = f"No idea. Therefore, the answer is {q.choices['ABCD'.index(wrong)]} ({wrong.lower()})."
        correction = tailored.parse_cot_completion(world.feedback_completion(made, q, mistake), q)
        assert f"Not {q.choices['ABCD'.index(wrong)]}:" in correction  # tailored to the student's wrong option


class ScriptedClient:
    """client.Client's interface: chat(payload) -> an OpenAI response; dies (as a killed run) after `die_after`."""

    def __init__(self, die_after=None):
        self.meter, self.payloads, self.die_after = client.Meter(), [], die_after

    def chat(self, payload):
        if self.die_after is not None and len(self.payloads) == self.die_after:
            raise KeyboardInterrupt
        self.payloads.append(payload)
        content = payload["messages"][0]["content"]
        letter = "b" if "The correct answer is lake (b)" in content else "a"  # the first one wrong, then corrected
        text = f"Error: wrong.\nAnswer: Reason {len(self.payloads)}. Therefore, the answer is x ({letter})."
        return {"choices": [{"message": {"content": text}, "finish_reason": "stop"}] * payload["n"]}


def test_feedback_requests_are_cached_and_resumed(tmp_path):
    q = data.Question("q", "Where?", ["cave", "lake"], "B")
    jobs = [(q, f"Wrong {i}. Therefore, the answer is cave (a).") for i in range(3)]
    settings = client.ClientConfig(workers=1)
    path = tmp_path / "cache.jsonl"
    with pytest.raises(KeyboardInterrupt):  # killed after two answered requests
        tailored.ask_all(jobs, "obqa", settings, ScriptedClient(die_after=2), client.Cache(path), "feedback")
    assert len(path.read_text().splitlines()) == 2  # each answer was on disk before it was used
    scripted = ScriptedClient()
    kept = tailored.ask_all(jobs, "obqa", settings, scripted, client.Cache(path), "feedback")
    assert len(scripted.payloads) == 1 and scripted.meter.counts["cached"] == 2  # only the unanswered one is asked
    assert kept == [[f"Reason {i}. Therefore, the answer is x (b)."] for i in (1, 2, 1)]
    assert all("Student: Wrong 2." in m["content"] for m in scripted.payloads[0]["messages"])
    again = ScriptedClient()
    assert tailored.ask_all(jobs, "obqa", settings, again, client.Cache(path), "feedback") == kept
    assert not again.payloads


def test_evaluate_decodes_one_chain_of_thought_and_votes(monkeypatch):
    questions = [data.Question("q0", "?", ["x", "y"], "A"), data.Question("q1", "?", ["x", "y"], "B")]
    texts = iter(["So (a).", "So (b).", "So (a).", "So (a).", "junk", "So (a)."])  # both vote A: q1 is wrong

    def scripted(model, tokenizer, prompts, temperature, **kwargs):
        assert prompts[0] == data.cot_input(questions[0]) and temperature == 0.7
        return [next(texts) for _ in prompts]

    monkeypatch.setattr(evaluate, "generate_texts", scripted)
    acc, chains = evaluate.accuracy(None, None, questions, "cot", samples=3, temperature=0.7)
    assert acc == 50.0 and [c.prediction for c in chains] == ["A", "B", "A", "A", None, "A"]
    assert chains[0].summary == "So (a)." and chains[0].recall is None


class CharTokenizer:
    """Text to ids, one per character (encode is all train_round asks of a tokenizer)."""

    @staticmethod
    def encode(text):
        return [2 + ord(c) % 48 for c in text] + [1]


def test_negatives_go_through_the_targets_formatter(tmp_path, monkeypatch):
    """Anchors, positives and negatives are all data.cot_target's texts (METHOD 10.5), as the official preprocessor
    formats all three: a student's wrong rationale of a number question gains the gold "Answer:" after its own."""
    q = data.Question("g", "What is 2 + 3?", [], "5", "number")
    anchors, wrong = [("g", "2 + 3 = 5."), ("g", "3 + 2 = 5.")], "2 + 3 = 6. Answer: 6"
    seen = {}

    def reflection(model, input_ids, attention_mask, anchors, positives, negatives, *args):
        seen.update(anchors=anchors, positives=positives, negatives=negatives)
        return torch.zeros(())

    def one_step(loop, out, model, tokenizer, plan, step_loss, validate, runtime, desc):
        step_loss(model, plan[0], plan[0].indices)
        return 0.0

    monkeypatch.setattr(triplet, "self_reflection_loss", reflection)
    monkeypatch.setattr(tailored.train, "fit", one_step)
    cfg = tailored.parse_config(["--data", "gsm8k", "--out", str(tmp_path), "--batch-size", "1"])
    runtime = tailored.cli.Runtime(torch.device("cpu"), None, 0, 1)
    texts = anchors, {"g": [t for _, t in anchors]}, {"g": [wrong]}  # anchors, positives, negatives
    tailored.train_round(cfg, 2, tiny_model(), CharTokenizer, texts, {"g": q}, [], runtime)
    assert seen["negatives"] == [CharTokenizer.encode("2 + 3 = 6. Answer: 6 Answer: 5")]
    targets = [CharTokenizer.encode(f"{t} Answer: 5") for _, t in anchors]
    assert seen["anchors"][0] in targets and seen["positives"][0] in targets and seen["anchors"] != seen["positives"]


# ---------------------------------------------------------------------------------------------- exam, batches

class Scripted:
    """A model and tokenizer whose 'samples' are scripted texts, for the exam."""

    def __init__(self, texts):
        self.texts = texts
        self.parameters = lambda: iter([torch.zeros(1)])

    def __call__(self, prompts):
        return torch.zeros(len(prompts), 1, dtype=torch.long), torch.ones(len(prompts), 1, dtype=torch.long)

    def generate(self, input_ids, attention_mask, max_new_tokens, generator, **kwargs):
        assert kwargs == dict(do_sample=True, temperature=1.0, top_k=50) and generator is not None
        return torch.zeros(len(input_ids), 1)

    def batch_decode(self, rows):
        return [self.texts.pop(0) for _ in rows]


def test_the_exam_keeps_only_distinct_wrong_answers():
    questions = [data.Question("q0", "?", ["x", "y"], "A"), data.Question("q1", "?", ["x", "y"], "B")]
    texts = ["So (a).", "So (b).", "So (b).", "nothing", "So (b).", "So (b).", "So (b).", "So (b)."]
    scripted = Scripted(texts)
    cfg = tailored.parse_config(["--data", "obqa"])
    assert tailored.exam(cfg, scripted, scripted, questions, 2) == {"q0": ["So (b).", "nothing"]}


def test_batches_hold_distinct_questions_and_every_example_once():
    groups = [[0, 1, 2, 3], [4], [5, 6], [7, 8, 9]]
    for epoch in range(3):
        batches = tailored.unique_batches(groups, 3, seed=1, epoch=epoch)
        assert sorted(i for b in batches for i in b) == list(range(10))
        owner = {i: g for g, members in enumerate(groups) for i in members}
        assert all(len({owner[i] for i in b}) == len(b) <= 3 for b in batches)
    assert tailored.unique_batches(groups, 3, 1, 0) != tailored.unique_batches(groups, 3, 1, 1)


# ---------------------------------------------------------------------------------------------- every round

@pytest.fixture
def shrunken(monkeypatch):
    """The world of tests/test_world.py's shrunken demo: 8 animals per habitat, 36 held-out test questions."""
    monkeypatch.setattr(world, "make_world", functools.partial(world.make_world, per_habitat=8, known=4, valid=1))
    monkeypatch.setattr(world, "MODEL", dict(world.MODEL, d_model=64, d_kv=16, d_ff=256))


def test_a_shrunken_world_through_every_round(tmp_path, monkeypatch, shrunken):
    """The README's commands end to end: teacher, round 1, then two rounds of exam, feedback and L_LM + L_SR, then
    evaluate.py. Too short to learn the held-out habitats (BENCHMARKS.md has the full world's figures), long enough
    that the round-1 student makes mistakes that the teacher corrects."""
    run = tmp_path / "run"
    tailored.tailored(tailored.parse_config(["--out", str(run), "--rounds", "3", "--epochs", "8", "--batch-size", "32",
                                         "--lr", "3e-3", "--later-epochs", "2", "--later-lr", "1e-4",
                                         "--eval-every", "100"]))
    round_1 = data.read_jsonl(run / "round_1" / "log.jsonl")
    losses = [r["lm"] for r in round_1 if "lm" in r]
    assert losses[-1] < losses[0] / 4  # it learns
    train = {q.id: q for q in world.make_world().train}
    for k in (2, 3):
        mistakes = data.read_jsonl(run / f"round_{k}" / "mistakes.jsonl")
        assert mistakes and all(data.parse_cot(t, train[m["id"]]) != train[m["id"]].answer
                                for m in mistakes for t in m["texts"])
        for row in data.read_jsonl(run / f"round_{k}" / "corrections.jsonl"):
            assert all(data.parse_cot(t, train[row["id"]]) == train[row["id"]].answer for t in row["texts"])
        log = data.read_jsonl(run / f"round_{k}" / "log.jsonl")
        assert sum(r.get("triplets", 0) for r in log) > 0 and any("sr" in r for r in log)
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary) == ["1", "2", "3"]
    assert summary["1"]["requests"] == len(world.make_world().train)  # one per training question
    assert summary["2"]["requests"] == summary["2"]["mistakes"] > 0  # one per mistake
    monkeypatch.setattr(sys, "argv", ["evaluate.py", str(run)])
    evaluate.main()
    report = {row["phase"]: row for row in json.loads((run / "report.json").read_text())}
    assert list(report) == ["round 1", "round 2", "round 3"] and report["round 1"]["questions"] == 36
    assert report["round 1"]["stages"] == "cot" and report["round 1"]["chance"] == 25.0
    assert (run / "round_3" / "best" / "predictions_test.jsonl").is_file()


def test_a_killed_round_resumes_to_the_same_weights(tmp_path, monkeypatch, shrunken):
    flags = ["--rounds", "2", "--epochs", "2", "--later-epochs", "1", "--batch-size", "32", "--lr", "3e-3",
             "--eval-every", "2"]
    tailored.tailored(tailored.parse_config(["--out", str(tmp_path / "whole"), *flags]))
    for done in ("tokenizer", "round_1"):  # the same finished round 1, as compare.py shares it
        shutil.copytree(tmp_path / "whole" / done, tmp_path / "killed" / done)
    real, calls = evaluate.accuracy, []

    def dies_in_round_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # killed at round 2's second validation, with a state saved at its first
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "accuracy", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        tailored.tailored(tailored.parse_config(["--out", str(tmp_path / "killed"), *flags]))
    monkeypatch.setattr(evaluate, "accuracy", real)
    tailored.tailored(tailored.parse_config(["--out", str(tmp_path / "killed"), *flags, "--resume"]))
    whole, resumed = (torch.load(tmp_path / run / "round_2" / "state.pt", weights_only=True)
                      for run in ("whole", "killed"))
    assert whole["step"] == resumed["step"] >= 3  # killed at step 3's validation, resumed from step 2
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    for name in ("mistakes.jsonl", "corrections.jsonl", "log.jsonl"):
        assert (tmp_path / "whole" / "round_2" / name).read_text() == \
            (tmp_path / "killed" / "round_2" / name).read_text()


@pytest.mark.parametrize("flags, message", [
    (["--data", "foo"], "--data must be one of world"), (["--rounds", "0"], "--rounds must be at least 1"),
    (["--lam", "-1"], "--lam at least 0"),
])
def test_command_line_mistakes_get_one_line(tmp_path, flags, message):
    out = subprocess.run([sys.executable, "tailored.py", "--out", str(tmp_path / "run"), *flags], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_readme_commands_run(tmp_path):
    """`python tailored.py` and `python evaluate.py RUN` as a user types them (one round of one epoch on the full
    world; every round is run by test_a_shrunken_world_through_every_round)."""
    run = str(tmp_path / "run")
    for command in (["tailored.py", "--out", run, "--rounds", "1", "--epochs", "1", "--max-new-tokens", "16"],
                    ["evaluate.py", run]):
        out = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
    assert "| round 1 | world | cot | test | greedy | 96 |" in out.stdout


HANDFUL = [("What cuts wood?", ["a saw", "a spoon", "a cup", "a rope"], "A"),
           ("What holds water?", ["a net", "a bucket", "a fork", "a sieve"], "B"),
           ("What gives light at night?", ["a rock", "a shoe", "a lamp", "a leaf"], "C"),
           ("What keeps you dry in rain?", ["a sieve", "a kite", "a net", "a coat"], "D")]


def write_handful_obqa(data_dir):
    """HANDFUL as OBQA's official files (the same four questions in train, dev and test) under data_dir/obqa."""
    original = data_dir / "obqa" / "original"
    original.mkdir(parents=True)
    lines = "".join(json.dumps({"id": f"q{i}", "question": {"stem": q, "choices": [
        {"label": x, "text": t} for x, t in zip("ABCD", choices)]}, "answerKey": gold}) + "\n"
        for i, (q, choices, gold) in enumerate(HANDFUL))
    for name in ("train.jsonl", "dev.jsonl", "test.jsonl"):
        (original / name).write_text(lines)


class LLM:
    """A scripted OpenAI-compatible teacher on 127.0.0.1: round-1 requests get 3 right rationales and 1 wrong one,
    feedback requests one right correction, its own for each wrong rationale; every request and correction is
    logged."""

    def __init__(self):
        self.log, self.corrections = [], []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.log.append(payload)
                content = payload["messages"][-1]["content"]
                stem = content.split("\n\nQuestion: ")[-1].split("\n")[0]
                question, choices, gold = next(h for h in HANDFUL if h[0] == stem)
                answer = f"{choices['ABCD'.index(gold)]} ({gold.lower()})"
                right = lambda i: f"Reason {i}. Therefore, the answer is {answer}."
                if "Student:" in content:
                    student = content.split("\nStudent: ", 1)[1].split("\nFirst point out", 1)[0]
                    correction = f"Reason fixed. Not {zlib.crc32(student.encode()):08x}. Therefore, the answer is " \
                                 f"{answer}."
                    outer.corrections.append((stem, correction))
                    texts = ["Error: the student chose badly.\nAnswer: " + correction]
                else:
                    texts = [right(i) for i in range(3)] + ["Bad. Therefore, the answer is nothing (z)."]
                choices_ = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts[:payload["n"]] if payload["n"] == 1 else texts)]
                raw = json.dumps({"choices": choices_}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def test_an_llm_teacher_through_every_round_and_its_cache(tmp_path):
    """`python tailored.py --data obqa` against a scripted LLM: round-1 rationales filtered to the gold answer,
    feedback on the student's mistakes, every response cached; a second run asks the teacher nothing."""
    write_handful_obqa(tmp_path / "data")
    llm = LLM()
    command = [sys.executable, "tailored.py", "--data", "obqa", "--data-dir", str(tmp_path / "data"), "--model",
               "scratch", "--base-url", llm.url, "--out", str(tmp_path / "run"), "--rounds", "2", "--epochs", "2",
               "--later-epochs", "1", "--max-new-tokens", "8"]
    for attempt in range(2):  # the second with --resume: the run is started
        out = subprocess.run(command + ["--resume"] * attempt, cwd=ROOT, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert out.returncode == 0, out.stderr[-2000:]
        if attempt == 0:
            asked = len(llm.log)
            assert [p["n"] for p in llm.log[:4]] == [tailored.COT_N] * 4 and asked > 4  # round 1, then feedback
            assert all(p["n"] == 1 and "Student:" in p["messages"][-1]["content"] for p in llm.log[4:])
    assert len(llm.log) == asked  # the second run found every round done and asked nothing
    first = data.read_jsonl(tmp_path / "run" / "round_1" / "teacher.jsonl")
    assert [len(row["texts"]) for row in first] == [3] * 4  # the wrong fourth rationale was filtered out
    corrections = data.read_jsonl(tmp_path / "run" / "round_2" / "corrections.jsonl")
    assert corrections and all(row["texts"][0].startswith("Reason fixed.") for row in corrections)
    # Every correction of every mistake is stored and trained on: one feedback request per wrong rationale, and a
    # question with several mistakes keeps each distinct correction (#29: it kept only its last request's).
    mistakes = data.read_jsonl(tmp_path / "run" / "round_2" / "mistakes.jsonl")
    assert max(len(row["texts"]) for row in mistakes) > 1  # a question with several mistakes
    ids = {stem: f"q{i}" for i, (stem, _, _) in enumerate(HANDFUL)}
    sent, stored = defaultdict(set), defaultdict(set)
    for stem, correction in llm.corrections:
        sent[ids[stem]].add(correction)
    for row in corrections:
        stored[row["id"]].update(row["texts"])
    assert stored == sent
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["2"]["rationales"] == sum(map(len, sent.values())) > len(sent)
    cache = (tmp_path / "data" / "obqa" / "tailored.cache.jsonl").read_text().splitlines()
    assert len(cache) == asked
    llm.httpd.shutdown()


def test_tailored_on_ones_own_data(tmp_path):
    """`python tailored.py --data path/to/mydata` (README "Your own data"): a directory of one's own JSONL questions,
    named by its basename for the run and the teacher's cache."""
    own = tmp_path / "path" / "to" / "mydata"
    own.mkdir(parents=True)
    for split in ("train", "valid", "test"):  # the same questions, under ids used once across the files
        (own / f"{split}.jsonl").write_text("".join(json.dumps({"id": f"{split}{i}", "question": q, "choices": [
            {"label": x, "text": t} for x, t in zip("ABCD", choices)], "answer": gold}) + "\n"
            for i, (q, choices, gold) in enumerate(HANDFUL)))
    llm = LLM()
    out = subprocess.run([sys.executable, os.path.join(ROOT, "tailored.py"), "--data", "path/to/mydata", "--model",
                          "scratch", "--data-dir", str(tmp_path / "data"), "--base-url", llm.url, "--rounds", "1",
                          "--epochs", "1", "--max-new-tokens", "8"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "runs" / "tailored_mydata" / "summary.json").read_text())
    assert summary["1"]["requests"] == len(llm.log) == 4 and summary["1"]["rationales"] == 12
    assert len((tmp_path / "data" / "mydata" / "tailored.cache.jsonl").read_text().splitlines()) == 4
    llm.httpd.shutdown()
