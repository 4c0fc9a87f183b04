"""Tailored Learning's self-reflection loss (METHOD 10.5): a triplet margin loss on the decoder's final hidden
state at the eos position, beside the LM loss,

    L = L_LM + lam * mean over kept rows of max(0, cos(a, n) - cos(a, p) + margin)

anchor a = a teacher rationale of the question, positive p = another teacher rationale of the same question, negative
n = one of the student's own wrong rationales for it. A row without a positive or a negative is left out (masked).
Its own module, as dpo.py holds TinyThinker's: the formula, its representation and the triplets, nothing of the loop.
"""
import random

import torch
import torch.nn.functional as F

from t5 import eval_mode, truncate


def triplet_loss(anchor, positive, negative, margin=1.0):
    """mean_i max(0, cos(a_i, n_i) - cos(a_i, p_i) + margin): torch's TripletMarginWithDistanceLoss with the distance
    d(x, y) = -cos(x, y). NaN rows (a zero vector) count as 0, as the official nan_to_num does."""
    rows = F.cosine_similarity(anchor, negative, dim=-1) - F.cosine_similarity(anchor, positive, dim=-1) + margin
    return rows.clamp_min(0).nan_to_num().mean()


def eos_states(model, encoder_states, mask, targets):
    """[N, d_model]: the decoder's final hidden state at the position that reads each target's eos. The decoder input
    is the start token then the target (eos included), right-padded: a causal decoder's state at eos ignores the padding
    after it (TL4: the state after reading the whole rationale, as GPT-J's last-token state)."""
    device, width = encoder_states.device, max(map(len, targets))
    rows = [[model.config.decoder_start_token_id, *t] + [model.config.pad_token_id] * (width - len(t)) for t in targets]
    h = model.decoder_states(torch.tensor(rows, device=device), encoder_states, mask)
    return h[torch.arange(len(targets), device=device), torch.tensor([len(t) for t in targets], device=device)]


def triplets(anchors, positives, negatives, rng):
    """(rows, positive, negative) for the rows of a batch that have both: positives[i] are the other teacher
    rationales of row i's question (the anchor's own text excluded), negatives[i] the student's wrong ones; one of
    each is drawn with `rng`. Rows missing either are left out (the mask of METHOD 10.5)."""
    kept, chosen_p, chosen_n = [], [], []
    for i, anchor in enumerate(anchors):
        others = [p for p in positives[i] if p != anchor]
        if others and negatives[i]:
            kept.append(i)
            chosen_p.append(rng.choice(others))
            chosen_n.append(rng.choice(negatives[i]))
    return kept, chosen_p, chosen_n


def self_reflection_loss(model, input_ids, attention_mask, anchors, positives, negatives, margin=1.0, max_length=192):
    """L_SR of a batch's kept rows (token lists, eos included). The prompt is encoded once without gradients, as the
    official code caches its prefix; the three continuations go through one concatenated decoder pass with gradients.
    Dropout is off throughout (TL5: GPT-J, the official student, has none)."""
    targets = [truncate(t, max_length) for t in anchors + positives + negatives]  # still ending in eos
    with eval_mode(model):
        with torch.no_grad(), model.autocast(input_ids.device):
            encoder_states, mask = model.encode(input_ids, attention_mask)
        states = eos_states(model, encoder_states.repeat(3, 1, 1), mask.repeat(3, 1, 1, 1), targets)
    a, p, n = states.float().chunk(3)
    return triplet_loss(a, p, n, margin)


def draw(seed, *keys):
    """A generator for one step's draws, from the seed and the step alone: a resumed round draws the same triplets."""
    return random.Random("-".join(map(str, (seed, *keys))))
