"""dpo.py: sequence log-probs, the DPO+NLL loss, and the pair rules of METHOD 7.2 / 7.3 on crafted chains."""
import copy
import math
import random

import pytest
import torch

from data import Chain, Question, collate
from dpo import (analyze_pairs, collate_pairs, concatenated_logprobs, dpo_loss, recall_pairs, token_logprobs,
                 tokenize_pairs)
from t5 import T5, T5Config


def tiny_t5(seed=0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
    return T5(config).eval()


class CharTokenizer:
    """Stands in for t5.Tokenizer: tokenize_pairs only needs encode() with </s> (id 1) appended."""

    def encode(self, text):
        return [3 + ord(ch) % 60 for ch in text] + [1]


TOK = CharTokenizer()
PAIRS = [{"prompt": "fish live in", "chosen": "water", "rejected": "trees and sky"},
         {"prompt": "hot?", "chosen": "fire is hot", "rejected": "ice"},
         {"prompt": "two plus two", "chosen": "four", "rejected": "five"}]


# ----------------------------------------------------------------------------- log-probs

def sequence_logprobs(model, input_ids, attention_mask, labels):
    """log pi(y|x) = sum over target tokens (</s> included, -100 ignored) of log p(y_t | y_<t, x): Tensor[B]."""
    return token_logprobs(model, input_ids, attention_mask, labels).sum(-1)


def test_sequence_logprobs_are_summed_label_logprobs_with_padding_ignored():
    model = tiny_t5()
    input_ids = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0], [10, 1, 0, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0]])
    labels = torch.tensor([[11, 12, 13, 1], [14, 1, -100, -100], [15, 16, 1, -100]])
    got = sequence_logprobs(model, input_ids, attention_mask, labels)

    decoder_input_ids = torch.tensor([[0, 11, 12, 13], [0, 14, 1, 0], [0, 15, 16, 1]])  # shift right by hand
    with torch.no_grad():
        logits, _ = model(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    logp = logits.log_softmax(-1)
    expected = torch.stack([sum(logp[i, t, labels[i, t]] for t in range(4) if labels[i, t] != -100) for i in range(3)])
    assert torch.allclose(got, expected, atol=1e-5)
    assert (got < 0).all()
    # each row alone, unpadded, scores the same: padding is neither attended to nor scored
    for i, (n_in, n_out) in enumerate([(4, 4), (3, 2), (2, 3)]):
        row = slice(i, i + 1)
        alone = sequence_logprobs(model, input_ids[row, :n_in], attention_mask[row, :n_in], labels[row, :n_out])
        assert torch.allclose(alone, got[i:i + 1], atol=1e-5)


def batch_of(pairs):
    return collate_pairs(tokenize_pairs(pairs, TOK))


def test_collate_pairs_repeats_the_prompt_and_tokenize_pairs_truncates_keeping_eos():
    enc = TOK.encode
    input_ids, attention_mask, labels = batch_of(PAIRS[:2])
    prompts = [enc("fish live in"), enc("hot?") + [0] * 8]
    assert input_ids.tolist() == prompts * 2
    assert attention_mask.tolist() == [[1] * 13, [1] * 5 + [0] * 8] * 2
    width = len(enc("trees and sky"))
    assert labels.tolist() == [t + [-100] * (width - len(t))
                               for t in (enc("water"), enc("fire is hot"), enc("trees and sky"), enc("ice"))]

    tokenized = tokenize_pairs([{"prompt": "abcdef", "chosen": "ghijkl", "rejected": "m"}], TOK, max_length=4)
    assert tokenized == [(enc("abc"), enc("ghi"), enc("m"))]  # at most 3 tokens + </s>


def test_concatenated_forward_equals_separate_forwards():
    model = tiny_t5()
    with torch.no_grad():
        chosen, rejected, chosen_nll = concatenated_logprobs(model, *batch_of(PAIRS))
        for side, got in (("chosen", chosen), ("rejected", rejected)):
            x, mask, y = collate([(TOK.encode(p["prompt"]), TOK.encode(p[side])) for p in PAIRS])
            assert torch.allclose(got, sequence_logprobs(model, x, mask, y), atol=1e-5)
            if side == "chosen":  # the NLL term is the model's own token-mean CE over the chosen half
                _, loss = model(input_ids=x, attention_mask=mask, labels=y)
                assert torch.allclose(chosen_nll, loss, atol=1e-5)
                n_tokens = sum(len(TOK.encode(p["chosen"])) for p in PAIRS)
                assert torch.allclose(chosen_nll, -got.sum() / n_tokens, atol=1e-5)


# ----------------------------------------------------------------------------- loss

def test_dpo_loss_matches_hand_computation():
    policy_chosen = torch.tensor([-5.0, -3.0], requires_grad=True)
    policy_rejected = torch.tensor([-6.0, -2.0], requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-5.5, -3.0]), torch.tensor([-5.0, -2.5])
    chosen_nll = torch.tensor(1.2, requires_grad=True)
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_nll, beta=0.5, alpha=0.5)
    # pair 1: h = (-5 + 5.5) - (-6 + 5) = 1.5, beta*h = 0.75, -log sigmoid(0.75) = log(1 + e^-0.75) = 0.3868710
    # pair 2: h = (-3 + 3) - (-2 + 2.5) = -0.5, beta*h = -0.25, -log sigmoid(-0.25) = log(1 + e^0.25) = 0.8259394
    # loss = (0.3868710 + 0.8259394) / 2 + 0.5 * 1.2 = 0.6064052 + 0.6 = 1.2064052
    assert loss.item() == pytest.approx(1.2064052, abs=1e-6)
    assert metrics == pytest.approx({"rewards/chosen": 0.125,      # mean(0.5 * 0.5, 0.5 * 0)
                                     "rewards/rejected": -0.125,   # mean(0.5 * -1, 0.5 * 0.5)
                                     "rewards/accuracies": 0.5,    # 0.25 > -0.5 yes, 0 > 0.25 no
                                     "rewards/margins": 0.25,      # mean(0.75, -0.25)
                                     "nll": 1.2})
    loss.backward()
    # d loss / d pi_c = -(beta / B) * sigmoid(-beta*h) = -0.25 * [sigmoid(-0.75), sigmoid(0.25)]; pi_r opposite
    assert policy_chosen.grad.tolist() == pytest.approx([-0.0802053, -0.1405441], abs=1e-6)
    assert policy_rejected.grad.tolist() == pytest.approx([0.0802053, 0.1405441], abs=1e-6)
    assert chosen_nll.grad.item() == pytest.approx(0.5)


def test_dpo_steps_move_the_policy_toward_chosen_and_away_from_rejected():
    model = tiny_t5()
    reference = copy.deepcopy(model)
    batch = batch_of(PAIRS)
    with torch.no_grad():  # precomputed once, as precompute_ref_log_probs=True does
        ref_chosen, ref_rejected, _ = concatenated_logprobs(reference, *batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    history = []
    for _ in range(6):
        chosen, rejected, chosen_nll = concatenated_logprobs(model, *batch)
        loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_nll, alpha=0.0)
        history.append((loss.item(), metrics))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    first_loss, first = history[0]
    assert first_loss == pytest.approx(math.log(2), abs=1e-5)  # policy == reference: h = 0
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    with torch.no_grad():
        _, last = dpo_loss(*concatenated_logprobs(model, *batch)[:2], ref_chosen, ref_rejected, torch.tensor(0.0))
    assert last["rewards/margins"] > 1.0
    assert last["rewards/accuracies"] == 1.0
    assert last["rewards/chosen"] > 0 > last["rewards/rejected"]
    assert [m["rewards/margins"] for _, m in history] == sorted(m["rewards/margins"] for _, m in history)


# ----------------------------------------------------------------------------- pairs (METHOD 7.2, 7.3)

FISH = Question("q1", "Where do fish live?", ["sea", "desert", "sky"], "A")
FIRE = Question("q2", "What is hot?", ["ice", "fire"], "B")
QUESTIONS = {q.id: q for q in (FISH, FIRE)}
FISH_RECALL = "Where do fish live?\n(A) sea (B) desert (C) sky\nRecall:"


def chain(q, recall, prediction, tag=None):
    """A chain as evaluate.run_chains returns it, its analyses labelled by tag (default: the recall)."""
    analyses = {x: f"{x} says {tag or recall}" for x in "ABCDE"[:len(q.choices)]}
    return Chain(id=q.id, answer=q.answer, recall=recall, analyses=analyses, summary="", prediction=prediction)


def record(q, key_information, tag):
    return {"id": q.id, "question": q.question, "choices": q.choices, "answer": q.answer,
            "key_information": key_information, "explanations": {x: f"{x} by {tag}." for x in "ABCDE"[:len(q.choices)]}}


def test_recall_pairs_dedup_both_sides_and_resample_rejected():
    chains = [chain(FISH, "r1.", "A"), chain(FISH, "w1.", "B"), chain(FISH, "r1.", "A"), chain(FISH, "r2.", "A"),
              chain(FISH, "w1.", "C"), chain(FISH, "w1.", None)]
    pairs, contexts = recall_pairs(chains, QUESTIONS, [], random.Random(0))
    # C = {r1, r2}, R = {w1}: R is drawn twice with replacement
    assert pairs == [{"prompt": FISH_RECALL, "chosen": "r1.", "rejected": "w1."},
                     {"prompt": FISH_RECALL, "chosen": "r2.", "rejected": "w1."}]
    assert contexts[0] is chains[0] and contexts[1] is chains[3]


def test_recall_pairs_skip_questions_without_rejected():
    all_right = [chain(FISH, f"r{i}.", "A") for i in range(3)]
    shared_only = [chain(FIRE, "s.", "B"), chain(FIRE, "r.", "B"), chain(FIRE, "s.", "A")]  # "s." on both sides
    assert recall_pairs(all_right + shared_only, QUESTIONS, [], random.Random(0)) == ([], [])


def test_recall_pairs_remove_shared_texts_and_backfill_from_teacher():
    records = [record(FISH, "t1.", "t1"), record(FISH, "t2.", "t2"), record(FIRE, "t3.", "t3")]
    chains = [chain(FISH, "r1.", "A"), chain(FISH, "s.", "A"), chain(FISH, "s.", "B"), chain(FISH, "w1.", None),
              chain(FISH, "w2.", "C")]
    pairs, contexts = recall_pairs(chains, QUESTIONS, records, random.Random(0))
    # "s." is removed from both sides: C = [r1], R = [w1, w2] (None counts as wrong); a teacher KI back-fills C
    assert [p["rejected"] for p in pairs] == ["w1.", "w2."]
    assert pairs[0]["chosen"] == "r1." and pairs[1]["chosen"] in {"t1.", "t2."}
    tag = pairs[1]["chosen"][:2]  # the teacher's reasons come along as the context's analyses
    assert contexts[1].recall == pairs[1]["chosen"] and contexts[1].analyses == {x: f"{x} by {tag}." for x in "ABC"}


def test_recall_pairs_leave_out_a_backfill_equal_to_the_rejected_recall_but_keep_its_context():
    """A18: the recall was right and a later stage went wrong; the teacher's back-fill is the same text."""
    chains = [chain(FISH, "t1.", "B"), chain(FISH, "w.", "C")]
    pairs, contexts = recall_pairs(chains, QUESTIONS, [record(FISH, "t1.", "t1")] * 2, random.Random(0))
    assert pairs == [{"prompt": FISH_RECALL, "chosen": "t1.", "rejected": "w."}]
    assert [c.recall for c in contexts] == ["t1.", "t1."]  # both comparisons still send "t1." to the analyze pass


def test_recall_pairs_all_wrong_backfill_without_then_with_replacement():
    wrong = [chain(FISH, f"w{i}.", "B") for i in range(3)]
    three = [record(FISH, f"t{i}.", f"t{i}") for i in range(3)]
    pairs, _ = recall_pairs(wrong, QUESTIONS, three, random.Random(0))
    assert sorted(p["chosen"] for p in pairs) == ["t0.", "t1.", "t2."]  # enough teacher records: no repeats
    assert [p["rejected"] for p in pairs] == ["w0.", "w1.", "w2."]
    pairs, _ = recall_pairs(wrong, QUESTIONS, three[:2], random.Random(0))
    assert len(pairs) == 3 and {p["chosen"] for p in pairs} == {"t0.", "t1."}
    with pytest.raises(ValueError, match="q1"):
        recall_pairs(wrong, QUESTIONS, [record(FIRE, "t.", "t")], random.Random(0))


def test_recall_pairs_count_a_repeated_teacher_record_once():
    wrong = [chain(FISH, "w0.", "B"), chain(FISH, "w1.", "C")]
    records = [record(FISH, "t0.", "t0"), record(FISH, "t0.", "t0"), record(FISH, "t1.", "t1")]
    for seed in range(20):  # 2 draws without replacement from {t0, t1}: both, whatever the seed
        pairs, _ = recall_pairs(wrong, QUESTIONS, records, random.Random(seed))
        assert sorted(p["chosen"] for p in pairs) == ["t0.", "t1."]


def test_recall_pairs_are_reproducible_from_the_seed():
    chains = [chain(q, f"{q.id}-{i}.", "A" if i % 3 == 0 else "B") for q in (FISH, FIRE) for i in range(10)]
    records = [record(q, f"{q.id}-t{i}.", str(i)) for q in (FISH, FIRE) for i in range(4)]
    first = recall_pairs(chains, QUESTIONS, records, random.Random(7))
    assert first == recall_pairs(chains, QUESTIONS, records, random.Random(7))
    assert first != recall_pairs(chains, QUESTIONS, records, random.Random(8))
    # fish: 4 right, 6 wrong -> 2 teacher back-fills; fire: 6 right, 4 wrong -> R drawn 6 times
    assert [p["prompt"] for p in first[0]] == [FISH_RECALL] * 6 + ["What is hot?\n(A) ice (B) fire\nRecall:"] * 6


FISH_CONTEXT = "Where do fish live?\n(A) sea (B) desert (C) sky\nRecall: Fish swim."


def analyzed(tag, prediction, recall="Fish swim."):
    return chain(FISH, recall, prediction, tag)


def summary(pairs):
    """(option of the prompt, chosen, rejected) of every pair."""
    return [(p["prompt"][-2], p["chosen"], p["rejected"]) for p in pairs]


def test_analyze_pairs_emit_two_pairs_per_comparison_in_the_sft_format():
    pairs = analyze_pairs([analyzed("good", "A"), analyzed("bad", "C")], QUESTIONS, [], random.Random(0))
    assert pairs == [
        {"prompt": FISH_CONTEXT + "\nAnalyze: For option A,", "chosen": "A says good", "rejected": "A says bad"},
        {"prompt": FISH_CONTEXT + "\nAnalyze: For option C,", "chosen": "C says good", "rejected": "C says bad"}]


def test_analyze_pairs_drop_non_letters_unanalysed_options_duplicates_and_shared_tuples():
    group = [analyzed("c1", "A"), analyzed("c1", "A"), analyzed("c2", "A"),
             analyzed("none", None), analyzed("f", "F"), analyzed("d", "D"),  # no letter, not A-E, not an option
             analyzed("r1", "B"), analyzed("r1", "B"), analyzed("c2", "C")]    # "c2" tuple on both sides
    # C = [c1], R = [r1]
    assert summary(analyze_pairs(group, QUESTIONS, [], random.Random(0))) == [
        ("A", "A says c1", "A says r1"), ("B", "B says c1", "B says r1")]
    assert analyze_pairs(group[:6], QUESTIONS, [], random.Random(0)) == []  # only unusable rejected chains
    assert analyze_pairs([analyzed("c1", "A"), analyzed("c2", "A")], QUESTIONS, [], random.Random(0)) == []


def test_analyze_pairs_leave_out_options_both_chains_analysed_alike():
    """A18: the chains differ in option B only; the gold option's analysis is the same text on both sides."""
    good, bad = analyzed("x", "A"), analyzed("x", "B")
    bad.analyses = {**good.analyses, "B": "B says bad"}
    assert summary(analyze_pairs([good, bad], QUESTIONS, [], random.Random(0))) == [("B", "B says x", "B says bad")]


def test_analyze_pairs_resample_rejected_when_chosen_outnumber():
    group = [analyzed("c1", "A"), analyzed("c2", "A"), analyzed("c3", "A"), analyzed("r", "B")]
    assert summary(analyze_pairs(group, QUESTIONS, [], random.Random(0))) == [
        (x, f"{x} says {c}", f"{x} says r") for c in ("c1", "c2", "c3") for x in "AB"]


def test_analyze_pairs_top_up_chosen_from_itself_when_rejected_outnumber():
    """A9 fixed: |C| = 2, |R| = 3 gives 3 comparisons (the official code gave |R|-|C| = 1)."""
    group = [analyzed("c1", "A"), analyzed("r1", "B"), analyzed("c2", "A"), analyzed("r2", "C"), analyzed("r3", "B")]
    pairs = analyze_pairs(group, QUESTIONS, [], random.Random(0))
    assert [p["rejected"] for p in pairs] == [f"{x} says {r}" for r, y in (("r1", "B"), ("r2", "C"), ("r3", "B"))
                                              for x in ("A", y)]
    chosen_tags = [p["chosen"].split()[-1] for p in pairs]
    assert chosen_tags[:4] == ["c1", "c1", "c2", "c2"] and chosen_tags[4] == chosen_tags[5] in {"c1", "c2"}


def test_analyze_pairs_fill_an_empty_chosen_set_from_the_contexts():
    records = [record(FISH, "Fish swim.", "teacher")]
    _, contexts = recall_pairs([analyzed("w", "B")], QUESTIONS, records, random.Random(0))  # the teacher's KI is chosen
    assert contexts[0].recall == "Fish swim."
    other = analyzed("elsewhere", "A", recall="Fish fly.")  # a context with another recall is never drawn
    pairs = analyze_pairs([analyzed("r1", "B"), analyzed("r2", "C")], QUESTIONS, contexts + [other], random.Random(0))
    assert summary(pairs) == [("A", "A by teacher.", "A says r1"), ("B", "B by teacher.", "B says r1"),
                              ("A", "A by teacher.", "A says r2"), ("C", "C by teacher.", "C says r2")]
    with pytest.raises(ValueError, match="Fish swim"):
        analyze_pairs([analyzed("r1", "B")], QUESTIONS, [other], random.Random(0))


def test_analyze_pairs_group_by_recall_context():
    group = [analyzed("c", "A"), analyzed("x", "A", recall="Fish fly."), analyzed("r", "B"),
             analyzed("y", "C", recall="Fish fly.")]
    pairs = analyze_pairs(group, QUESTIONS, [], random.Random(0))
    fly = FISH_CONTEXT.replace("Fish swim.", "Fish fly.")
    assert [p["prompt"] for p in pairs] == [f"{context}\nAnalyze: For option {x}," for context, x in
                                            ((FISH_CONTEXT, "A"), (FISH_CONTEXT, "B"), (fly, "A"), (fly, "C"))]
    assert [p["chosen"].split()[-1] for p in pairs] == ["c", "c", "x", "x"]
