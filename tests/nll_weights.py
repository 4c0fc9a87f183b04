"""How much a real chosen token weighs in reflect's NLL term under the official trainer's normalisation, relative to
this project's (decision A25, METHOD 7.4), on the pairs a reflect run trained on.

    python -m tests.nll_weights RUN     # RUN: an acquire run folder whose reflect has run, e.g. runs/world

The official encoder-decoder path (get_batch_logps at a11ef50) writes 0 over the labels' -100 in place before the NLL
is computed from the same tensor, so CrossEntropyLoss(ignore_index=-100) finds nothing to ignore and averages over
every position of the chosen half, padding included: a real token weighs 1 / (B x T) there, where T is the width of
the concatenated labels (the longest chosen or rejected target of the batch), and 1 / (real chosen tokens) here. The
ratio, real chosen tokens / (B x T), is printed for every batch reflect trained: each iteration's pairs files
tokenized as reflect tokenizes them (dpo.tokenize_pairs at the run's max_length, the tokenizer of RUN/best) and cut
into the batches of its plan (tinythinker.reflect_plan with the iteration's seed).
"""
import argparse
import os
import re
import statistics
from types import SimpleNamespace

import cli
import data
import dpo
import tinythinker
from t5 import Tokenizer


def weights(pairs, plan):
    """{kind: [real chosen tokens / (B x T) of each step of `plan` on that kind]} over tokenized pairs {kind: [(prompt,
    chosen, rejected)]}: T the width dpo.collate_pairs pads both halves to, as the official concatenated batch."""
    found = {kind: [] for kind in pairs}
    for number in range(len(plan)):
        step = plan[number]
        labels = dpo.collate_pairs([pairs[step.stage][i] for i in step.indices])[2]
        chosen = labels[:len(step.indices)]
        found[step.stage].append((chosen != -100).sum().item() / chosen.numel())
    return found


def spread(values):
    return f"{min(values):.2f}-{max(values):.2f} (median {statistics.median(values):.2f}, {len(values)} batches)"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="an acquire run folder whose reflect/ has run (its iter_*/*_pairs.jsonl)")
    run = parser.parse_args().run
    cfg = SimpleNamespace(**cli.read_run_config(os.path.join(run, "reflect")))
    tokenizer = Tokenizer.from_pretrained(os.path.join(run, "best"))
    iterations = sorted(int(d[5:]) for d in os.listdir(os.path.join(run, "reflect")) if re.fullmatch(r"iter_\d+", d))
    every = []
    for k in iterations:
        folder = os.path.join(run, "reflect", f"iter_{k}")
        texts = {kind: data.read_jsonl(os.path.join(folder, f"{kind}_pairs.jsonl")) for kind in ("recall", "analyze")
                 if os.path.isfile(os.path.join(folder, f"{kind}_pairs.jsonl"))}
        pairs = {kind: dpo.tokenize_pairs(t, tokenizer, cfg.max_length) for kind, t in texts.items() if t}
        if not pairs:
            continue
        for kind, found in weights(pairs, tinythinker.reflect_plan(cfg, pairs, cfg.seed + k)).items():
            print(f"iteration {k}, {len(pairs[kind])} {kind} pairs: {spread(found)}")
            every += found
    if not every:
        raise SystemExit(f"{run}/reflect: no preference pairs to weigh")
    print(f"a real chosen token's weight in the official NLL mean, relative to ours, per batch of {cfg.batch_size} "
          f"pairs: {spread(every)}")


if __name__ == "__main__":
    cli.command(main)
