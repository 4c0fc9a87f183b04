"""How long the README's real run (google-t5/t5-small on CommonsenseQA) takes on one core of this machine's CPU,
projected from measured rates: a few training steps and a few batched decoding steps of a randomly initialised T5 with
t5-small's shape, at CSQA's typical lengths, multiplied by the numbers of steps and generated tokens of each command.
Times are the process's CPU time on one thread, so other work on a shared machine does not inflate them much; several
cores divide them by less than their number.

    python -m tests.real_run_times     # the official CSQA files (downloaded if absent)

Lengths are estimated at 4 characters per token: the question with its options from the CSQA training file, the Key
Information and the explanations from the few-shot exemplars in prompts.json. Step counts: METHOD 5.3's scale example
for acquire (1,043 + 5,224 + 1,045 batches of 64 per epoch, 10 epochs, a validation every 700 steps); for reflect the
issue's example of 5,000 recall and 13,000 analyze pairs per iteration (6,280 DPO steps, A19), 5,000 chosen recalls
sampled again in the analyze pass, 5 iterations. Every generated sequence is taken to be as long as its target.
"""
import argparse
import json
import math
import time
from pathlib import Path

import torch

import data
from t5 import T5, T5Config

TRAIN, VALID, TEST = 8520, 1221, 1221  # CSQA questions per split (data.load: valid = a sample of official train)
BATCHES = dict(recall=1043, analyze=5224, summarize=1045)  # per epoch at batch 64 (METHOD 5.3)
OPTIONS, SUMMARY = 5, 9  # CSQA options; "So the answer is option X." + </s>
PAIRS = dict(recall=5000, analyze=13000)
CONTEXTS = 5000


def tokens(text):
    return max(1, round(len(text) / 4))


def lengths(data_dir):
    """Typical encoder and decoder lengths of each stage, in tokens."""
    questions = data.load("csqa", "train", data_dir)
    qo = sum(tokens(f"{q.question}\n{data.option_string(q)}") for q in questions) / len(questions)
    exemplars = json.loads((Path(__file__).resolve().parent.parent / "prompts.json").read_text())["exemplars"]["csqa"]
    ki = sum(tokens(e["Key Information"]) for e in exemplars) / len(exemplars) + 1
    reasons = [x.split("Because ", 1)[1] for e in exemplars for x in e["Explanations"]]
    reason = sum(map(tokens, reasons)) / len(reasons) + 1
    return dict(recall=(qo + 3, ki), analyze=(qo + ki + 8, reason),
                summarize=(qo + ki + OPTIONS * (reason + 4) + 4, SUMMARY))


def step_time(model, optimizer, batch, source, target, steps):
    """Seconds per optimizer step (forward, backward, AdamW) on a batch of uniform lengths."""
    ids = torch.randint(3, 32000, (batch, round(source)))
    labels = torch.randint(3, 32000, (batch, round(target)))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        start = time.process_time()
        _, loss = model(input_ids=ids, labels=labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.process_time() - start)
    return sum(times[1:]) / steps


def decode_time(model, batch, source, new_tokens):
    """Seconds per decoding step of a batch (the encoder pass included, spread over the steps)."""
    ids = torch.randint(3, 32000, (batch, round(source)))
    model.generate(ids[:2], max_new_tokens=2)  # warm-up
    start = time.process_time()
    out = model.generate(ids, max_new_tokens=round(new_tokens))
    return (time.process_time() - start) / out.shape[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch", type=int, default=64, help="training batch (acquire 64; a DPO step has 2 x 32)")
    parser.add_argument("--eval-batch", type=int, default=256, help="generation batch (eval_batch_size)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per stage")
    args = parser.parse_args()

    size = lengths(args.data_dir)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = T5(T5Config())  # t5-small's shape, random weights: the speed does not depend on the values
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    step = {s: step_time(model, optimizer, args.batch, *size[s], args.steps) for s in size}
    decode = {s: decode_time(model, args.eval_batch, *size[s]) for s in size}

    def chains(n, recall=True):
        """Seconds to run n three-stage chains (with the recall given when recall=False)."""
        batches = lambda k: math.ceil(k / args.eval_batch)
        seconds = batches(n * OPTIONS) * size["analyze"][1] * decode["analyze"]
        seconds += batches(n) * size["summarize"][1] * decode["summarize"]
        return seconds + (batches(n) * size["recall"][1] * decode["recall"] if recall else 0)

    acquire_steps = 10 * sum(BATCHES.values())
    ri = PAIRS["recall"] // 32 + 1
    dpo_steps = 10 * (ri + (PAIRS["analyze"] // PAIRS["recall"] + 1) * ri)
    dpo_step = (PAIRS["recall"] * step["recall"] + PAIRS["analyze"] * step["analyze"]) / sum(PAIRS.values())
    rows = {
        "acquire: training": 10 * sum(BATCHES[s] * step[s] for s in BATCHES),
        "acquire: validations": acquire_steps // 700 * chains(VALID),
        "reflect: sampling (5 iterations)": 5 * (chains(10 * TRAIN) + chains(10 * CONTEXTS, recall=False)),
        "reflect: DPO training (5 iterations)": 5 * dpo_steps * dpo_step * 64 / args.batch,  # 2 x 32 rows
        "reflect: validations (5 iterations)": 5 * 10 * chains(VALID),
        "evaluate: test, 2 checkpoints": 2 * chains(TEST),
    }
    print(f"lengths (tokens in, out): {json.dumps({s: [round(x) for x in v] for s, v in size.items()})}")
    print(f"training step, batch {args.batch} (s): {json.dumps({s: round(t, 3) for s, t in step.items()})}")
    print(f"decoding step, batch {args.eval_batch} (s): {json.dumps({s: round(t, 4) for s, t in decode.items()})}")
    acquire_tokens = 10 * 64 * sum(BATCHES[s] * sum(size[s]) for s in BATCHES)
    parameters = sum(p.numel() for p in model.parameters())
    print(f"acquire {acquire_steps} steps, {acquire_tokens / 1e6:.0f} M tokens (in + out), at most "
          f"{6 * parameters * acquire_tokens:.1e} FLOPs (6 x {parameters / 1e6:.0f} M parameters x tokens); "
          f"reflect {dpo_steps} DPO steps per iteration\n")
    print("| part | projected hours on one core |\n|---|---|")
    for name, seconds in rows.items():
        print(f"| {name} | {seconds / 3600:.1f} |")
    print(f"| total | {sum(rows.values()) / 3600:.1f} |")


if __name__ == "__main__":
    main()
