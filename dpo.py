"""Phase 2 of TinyThinker, self-reflection: DPO + NLL on pairs built from the student's own chains (METHOD 7).

Reads in the order of the math: sequence log-probabilities of a target under the encoder-decoder (7.4), the DPO+NLL
loss (7.4), then the chosen/rejected pairs built from self-sampled chains (7.2 recall pairs, 7.3 analyze pairs).
The builders are pure functions: the sampling loop that produces the chains lives in tinythinker.py.
"""
from collections import defaultdict

import torch
import torch.nn.functional as F

from data import LETTERS, Chain, analyze_input, collate, recall_input, summary_target
from t5 import truncate

MAX_LENGTH = 200  # prompt and each completion are truncated to 200 tokens, </s> included (METHOD 7.4)

# -----------------------------------------------------------------------------
# log pi(y|x) for an encoder-decoder (METHOD 7.4)


def token_logprobs(model, input_ids, attention_mask, labels):
    """log p(y_t | y_<t, x) = log_softmax(logits)[y_t] for every target position, 0 where labels == -100 (that is
    -cross_entropy with reduction="none"). Decoder inputs = shift_right(labels). In fp32 whatever the model's dtype:
    the sums over up to 200 tokens and their differences are what DPO compares. The model computes logits for the
    labelled positions only (T5.forward with labels), so the padding of a pair batch, whose chosen and rejected
    completions differ in length, costs no lm_head and no softmax."""
    logits, _ = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    labelled = labels != -100
    scored = -F.cross_entropy(logits.float(), labels[labelled], reduction="none")
    return scored.new_zeros(labels.shape).masked_scatter(labelled, scored)


def tokenize_pairs(pairs, tokenizer, max_length=MAX_LENGTH):
    """Pairs {prompt, chosen, rejected} -> (prompt ids, chosen ids, rejected ids), each with </s> and cut to
    max_length tokens keeping the final </s> (t5.truncate; METHOD 7.4: encoder input = prompt, labels = completion).
    Done once per iteration; collate_pairs batches the result."""
    return [tuple(truncate(tokenizer.encode(pair[k]), max_length) for k in ("prompt", "chosen", "rejected"))
            for pair in pairs]


def collate_pairs(batch, device="cpu"):
    """B tokenized pairs -> ONE batch of 2B rows, chosen rows first and the prompt repeated, so that a single forward
    scores both halves (as TRL's concatenated_forward does). data.collate pads inputs with 0 and labels with -100,
    so padding is never scored. Returns (input_ids [2B, Lp], attention_mask [2B, Lp], labels [2B, T])."""
    rows = [(prompt, chosen) for prompt, chosen, _ in batch] + [(prompt, rejected) for prompt, _, rejected in batch]
    return tuple(t.to(device) for t in collate(rows))


def concatenated_logprobs(model, input_ids, attention_mask, labels):
    """One forward over a collate_pairs batch -> (log pi(chosen) [B], log pi(rejected) [B], chosen NLL).
    The NLL is the token mean of -log p over every chosen target token of the batch (one mean per batch, not per
    sequence), i.e. cross-entropy with ignore_index=-100 on the chosen half (METHOD 7.4)."""
    logps = token_logprobs(model, input_ids, attention_mask, labels)
    n = len(logps) // 2
    chosen_nll = -logps[:n].sum() / (labels[:n] != -100).sum()
    sequence = logps.sum(-1)
    return sequence[:n], sequence[n:], chosen_nll


@torch.no_grad()
def reference_logprobs(model, batch, device):
    """[B, 2]: log pi_ref(chosen|prompt), log pi_ref(rejected|prompt) of a batch of tokenized pairs, on the CPU;
    computed once per iteration, before the policy moves."""
    chosen, rejected, _ = concatenated_logprobs(model, *collate_pairs(batch, device))
    return torch.stack([chosen, rejected], 1).float().cpu()


# -----------------------------------------------------------------------------
# DPO + NLL loss (METHOD 7.4: beta 0.5, rpo_alpha 0.5, the "DPO + alpha * NLL" form, see A10)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_nll, beta=0.5, alpha=0.5):
    """loss = mean_i -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) + alpha * NLL, where pi/ref are the
    summed sequence log-probs of policy and reference and NLL the token-mean chosen NLL. Metrics use TRL's names;
    the implicit rewards are beta * (pi - ref)."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)
    rejected_rewards = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean() + alpha * chosen_nll
    metrics = {
        "rewards/chosen": chosen_rewards.mean().item(),
        "rewards/rejected": rejected_rewards.mean().item(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean().item(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
        "nll": chosen_nll.item(),
    }
    return loss, metrics


# -----------------------------------------------------------------------------
# Pairs from self-sampled chains (METHOD 7.1-7.3)
# Chains are data.Chain objects (id, answer, recall, analyses by letter, summary, prediction) as run_chains
# returns them; a teacher record stands in as a chain that answers right. The official code resampled with unseeded
# pandas .sample(); here every draw comes from the caller's seeded random.Random, so the pairs can be rebuilt exactly.


def recall_pairs(chains, questions, records, rng):
    """Recall pairs (METHOD 7.2) from the recall pass (per question: recall sampled, analyze and summarize greedy).
    `questions` maps id -> data.Question; `records` are the teacher's records, the back-fill pool of chosen recalls.
    Returns (pairs, contexts): contexts holds the chosen chain of every zipped pair, identical texts included (A18
    drops the pair, not the context), for the analyze pass to sample under."""
    teacher = _teacher_chains(records)
    pairs, contexts = [], []
    for group in _group(chains, key=lambda c: c.id).values():
        qid, answer = group[0].id, group[0].answer
        chosen, rejected = _sides(group, answer, key=lambda c: c.recall)
        if not rejected:
            continue
        chosen, rejected = _balance(chosen, rejected, teacher.get(qid), rng, repeat=False, missing=(
            f"recall_pairs: no teacher record for question id {qid!r} to back-fill C from"))
        prompt = recall_input(questions[qid])
        for c, r in zip(chosen, rejected):
            if c.recall != r.recall:
                pairs.append({"prompt": prompt, "chosen": c.recall, "rejected": r.recall})
            contexts.append(c)
    return pairs, contexts


def analyze_pairs(chains, questions, contexts, rng):
    """Analyze pairs (METHOD 7.3) from the analyze pass (per context: analyze sampled, summarize greedy), two per
    zipped (chosen, rejected) chain: one for the gold option, one for the option the rejected chain picked. A chosen
    set smaller than the rejected one is topped up to its size (A9, a deliberate fix of the official code)."""
    context_key = lambda c: (c.id, c.recall)  # the same question and recall = the same context string
    backups = _group(contexts, key=context_key)
    pairs = []
    for key, group in _group(chains, key=context_key).items():
        (qid, recall), answer = key, group[0].answer
        letters = [c for c in group if c.prediction and c.prediction in LETTERS]
        chosen, rejected = _sides(letters, answer, key=_analysis_tuple, keep=_sane)
        if not rejected:
            continue
        # A9: C topped up to |R| from itself (from the context's own analyses when empty), with replacement
        chosen, rejected = _balance(chosen, rejected, chosen or backups.get(key), rng, repeat=True, missing=(
            f"analyze_pairs: no context for question id {qid!r} with recall {recall!r}"))
        for c, r in zip(chosen, rejected):
            for letter in (answer, r.prediction):
                if c.analyses[letter] != r.analyses[letter]:
                    pairs.append({"prompt": analyze_input(questions[qid], recall, letter),
                                  "chosen": c.analyses[letter], "rejected": r.analyses[letter]})
    return pairs


def _teacher_chains(records):
    """The back-fill pool of 7.2 step 4 by question id: each teacher record as a chain that answers right. Repeated
    records count once, as the official pool (summarize.json) was deduplicated."""
    pool = defaultdict(dict)
    for r in records:
        chain = Chain(id=r["id"], answer=r["answer"], recall=r["key_information"], analyses=r["explanations"],
                      summary=summary_target(r["answer"]), prediction=r["answer"])
        pool[chain.id].setdefault((chain.recall, _analysis_tuple(chain)), chain)
    return {qid: list(chains.values()) for qid, chains in pool.items()}


def _analysis_tuple(chain):
    return tuple(sorted(chain.analyses.items()))


def _group(chains, key):
    """Chains grouped by key, groups and members in first-seen order."""
    groups = defaultdict(list)
    for c in chains:
        groups[key(c)].append(c)
    return groups


def _dedup(chains, key):
    """First chain of every key, in order (pandas drop_duplicates)."""
    first = {}
    for c in chains:
        first.setdefault(key(c), c)
    return list(first.values())


def _sides(chains, answer, key, keep=list):
    """(C, R): the chains that reach `answer` and the others, each deduplicated by key and passed through `keep`,
    then every key found on both sides removed from both."""
    chosen = keep(_dedup([c for c in chains if c.prediction == answer], key))
    rejected = keep(_dedup([c for c in chains if c.prediction != answer], key))
    both = {key(c) for c in chosen} & {key(r) for r in rejected}
    return [c for c in chosen if key(c) not in both], [r for r in rejected if key(r) not in both]


def _balance(chosen, rejected, pool, rng, repeat, missing):
    """C and R made the same size to be zipped: a larger C draws R again with replacement up to |C|; a larger R tops
    C up to |R| with draws from `pool`, each pool chain at most once while the pool has enough unless `repeat`
    (pandas' sample(n, replace=n > len) of the official recall rule). An empty pool is a ValueError saying `missing`."""
    if len(chosen) > len(rejected):
        return chosen, rng.choices(rejected, k=len(chosen))
    k = len(rejected) - len(chosen)
    if not k:
        return chosen, rejected
    if not pool:
        raise ValueError(missing)
    return chosen + (rng.choices(pool, k=k) if repeat or k > len(pool) else rng.sample(pool, k)), rejected


def _sane(chains):
    """7.3's sanity filter: keep chains whose prediction is among the options analysed anywhere in the set."""
    analysed = {letter for c in chains for letter in c.analyses}
    return [c for c in chains if c.prediction in analysed]
