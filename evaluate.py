"""Three-stage inference, self-consistency voting and reports (METHOD section 6).

    python evaluate.py                                   # the demo runs (runs/world) on the world's held-out questions
    python evaluate.py runs/csqa --split test            # greedy chains, the validation protocol
    python evaluate.py runs/csqa --samples 10 --temperature 0.7   # self-consistency: majority vote over 10 sampled chains

A chain answers one question: recall general knowledge, analyze every option given that recall, summarize the
analyses into "So the answer is option X." Each stage is one batched `generate` over all the questions, so a chain
costs three rounds of generation however many questions there are.
"""
import argparse
import collections
import json
import os
import re
import sys
from dataclasses import asdict

import torch
from tqdm import tqdm

import data
import world
from data import Chain
from t5 import T5, Tokenizer


# --precision of a run: the autocast dtype of its model on CUDA (T5.amp_dtype); CPUs always compute in fp32.
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def questions(name, split, data_dir=None):
    """The questions of one split: the embedded world's, or an official data set's (data.load)."""
    if name == "world":
        return getattr(world.make_world(), split)
    return data.load(name, split, data_dir)


def read_run_config(run_dir):
    """The settings a run directory was trained with (tinythinker.py writes config.json); DataError if unreadable."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise data.DataError(f"{run_dir}: no config.json; pass a run directory made by `python tinythinker.py`")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise data.DataError(f"{path}: not a run config ({e})") from None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), str) for k in ("data", "stages")):
        raise data.DataError(f"{path}: not a run config (no data or stages)")
    return cfg


def generate_texts(model, tokenizer, prompts, temperature=0.0, batch_size=256, max_new_tokens=200, desc=None):
    """One continuation per prompt: greedy when temperature is 0, else sampling at that temperature with top-k and
    top-p off (METHOD 6: T=0.7, top_k 0). Prompts are batched in length order so a batch pads little."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    texts = [None] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, disable=desc is None):
        rows = order[start:start + batch_size]
        input_ids, attention_mask = tokenizer([prompts[i] for i in rows])
        generated = model.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                                   do_sample=temperature > 0, temperature=temperature or 1.0)
        for i, text in zip(rows, tokenizer.batch_decode(generated.tolist())):
            texts[i] = text.strip()
    return texts


@torch.no_grad()
def run_chains(model, tokenizer, questions, stages="recall_analyze_summarize", recalls=None,
               recall_temperature=0.0, analyze_temperature=0.0, batch_size=256, max_new_tokens=200, desc=None):
    """Chain every question through the stages of `stages` (a data.STAGES variant). Summarize is always greedy.

    `recalls`, when given, fixes the recall of each question instead of generating it: self-reflection samples
    analyses under a recall it has already chosen (METHOD 7.1, analyze pass).
    Option letters come from each question's own choices rather than from the "(X)" patterns of the first input
    (A15), so questions with different numbers of options can share a batch."""
    was_training = model.training
    model.eval()
    generate = lambda prompts, temperature, stage: generate_texts(
        model, tokenizer, prompts, temperature, batch_size, max_new_tokens, desc and f"{desc} {stage}")
    use_recall, use_analyze = "recall" in stages, "analyze" in stages
    if use_recall and recalls is None:
        recalls = generate([data.recall_input(q) for q in questions], recall_temperature, "recall")
        recalls = [data.with_period(r) for r in recalls]
    if not use_recall:
        recalls = [None] * len(questions)
    analyses = [None] * len(questions)
    if use_analyze:
        jobs = [(i, letter) for i, q in enumerate(questions) for letter in data.LETTERS[:len(q.choices)]]
        texts = generate([data.analyze_input(questions[i], recalls[i], letter) for i, letter in jobs],
                         analyze_temperature, "analyze")
        analyses = [{} for _ in questions]
        for (i, letter), text in zip(jobs, texts):
            analyses[i][letter] = data.with_period(text)
    summaries = generate([data.summarize_input(q, r, a) for q, r, a in zip(questions, recalls, analyses)],
                         0.0, "summarize")
    model.train(was_training)
    return [Chain(q.id, q.answer, r, a, s, data.parse_answer(s))
            for q, r, a, s in zip(questions, recalls, analyses, summaries)]


@torch.no_grad()
def run_cot(model, tokenizer, questions, temperature=0.0, batch_size=256, max_new_tokens=200, desc=None):
    """A Tailored Learning run's single chain-of-thought stage (METHOD 11.7): one rationale per question, its answer
    parsed as the official code does; the rationale is the chain's summary."""
    texts = generate_texts(model, tokenizer, [data.cot_input(q) for q in questions], temperature, batch_size,
                           max_new_tokens, desc)
    return [Chain(q.id, q.answer, None, None, t, data.parse_cot(t, q)) for q, t in zip(questions, texts)]


def vote(predictions):
    """Self-consistency (METHOD 6): the most common prediction; an unparseable chain (None) is a vote too, and a tie
    goes to the answer seen first (Counter keeps first-seen order among equal counts)."""
    return collections.Counter(predictions).most_common(1)[0][0]


def accuracy(model, tokenizer, questions, stages, samples=1, temperature=0.0, **kwargs):
    """Accuracy (%) of the voted answers, and every chain. With samples > 1, recall and analyze are sampled at
    `temperature` and summarize stays greedy, as in the official generate.py's "random" mode."""
    repeated = [q for q in questions for _ in range(samples)]
    if stages == "cot":
        chains = run_cot(model, tokenizer, repeated, temperature, **kwargs)
    else:
        chains = run_chains(model, tokenizer, repeated, stages, recall_temperature=temperature,
                            analyze_temperature=temperature, **kwargs)
    votes = [vote([c.prediction for c in chains[i * samples:(i + 1) * samples]]) for i in range(len(questions))]
    correct = sum(v == q.answer for v, q in zip(votes, questions))
    return 100.0 * correct / max(len(questions), 1), chains


def checkpoints(run_dir):
    """The models a run directory holds, in training order: acquire's best, then reflect's best if it ran; a Tailored
    Learning run's best of every round."""
    rounds = sorted((int(d.split("_")[1]), d) for d in os.listdir(run_dir) if re.fullmatch(r"round_\d+", d))
    if rounds:
        return [(f"round {k}", os.path.join(run_dir, d, "best")) for k, d in rounds
                if os.path.isdir(os.path.join(run_dir, d, "best"))]
    found = [("acquire", os.path.join(run_dir, "best"))]
    if os.path.isdir(os.path.join(run_dir, "reflect", "best")):
        found.append(("reflect", os.path.join(run_dir, "reflect", "best")))
    return [(phase, path) for phase, path in found if os.path.isdir(path)]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", default=["runs/world"], help="run directories made by tinythinker.py")
    parser.add_argument("--split", default="test")
    parser.add_argument("--samples", type=int, default=1, help="chains per question; > 1 votes (self-consistency)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature when --samples > 1")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=None, help="report path without extension (default: RUN/report)")
    args = parser.parse_args()
    check(args)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for run_dir in args.runs:
        cfg = read_run_config(run_dir)
        if cfg["data"] == "world":
            print("demo: evaluating on the embedded world's held-out questions; "
                  "for a real run: python evaluate.py runs/csqa --split test")
        split_questions = questions(cfg["data"], args.split, cfg["data_dir"])
        if not split_questions:
            raise SystemExit(f"{run_dir}: the {args.split} split of {cfg['data']} has no questions")
        temperature = args.temperature if args.samples > 1 else 0.0
        decoding = f"vote of {args.samples} at T={temperature}" if args.samples > 1 else "greedy"
        for phase, path in checkpoints(run_dir):
            model, tokenizer = T5.from_pretrained(path, device=device), Tokenizer.from_pretrained(path)
            model.amp_dtype = PRECISIONS[cfg.get("precision", "bf16")]  # as the run validated
            # Reflect trains recall and analyze inside the full chain, so its model is always evaluated on it.
            stages = "recall_analyze_summarize" if phase == "reflect" else cfg["stages"]
            acc, chains = accuracy(model, tokenizer, split_questions, stages, args.samples, temperature,
                                   batch_size=args.batch_size, max_new_tokens=cfg["max_new_tokens"],
                                   desc=f"{phase} {args.split}")
            with open(os.path.join(path, f"predictions_{args.split}.jsonl"), "w") as f:
                for chain in chains:
                    f.write(json.dumps(asdict(chain)) + "\n")
            chance = 100.0 * sum(1 / len(q.choices) for q in split_questions) / len(split_questions)
            rows.append(dict(run=run_dir, phase=phase, data=cfg["data"], stages=stages, split=args.split,
                             decoding=decoding, questions=len(split_questions), accuracy=round(acc, 2),
                             chance=round(chance, 2)))
    header = list(rows[0])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join(str(r[k]) for k in header) + " |" for r in rows])
    print(table)
    # What was learned, in the student's own words: the last checkpoint's chain on the first question.
    q, chain = split_questions[0], chains[0]
    print(f"\n{phase} model on a {args.split} question: {q.question} {data.option_string(q)} (gold: {q.answer})")
    for name, text in [("recall", chain.recall)] + [(f"analyze {k}", v) for k, v in (chain.analyses or {}).items()]:
        if text is not None:
            print(f"  {name}: {text}")
    print(f"  summarize: {chain.summary}\n")
    out = args.out or os.path.join(args.runs[0], "report")
    with open(out + ".md", "w") as f:
        f.write(table + "\n")
    with open(out + ".json", "w") as f:
        json.dump(rows, f, indent=1)
    print(f"wrote {out}.md, {out}.json and predictions_{args.split}.jsonl beside each checkpoint")


def check(args):
    """One clear line for an argument that cannot work, before any model is loaded."""
    if args.split not in ("train", "valid", "test"):
        raise SystemExit(f"--split must be train, valid or test, not {args.split!r}")
    for name in ("samples", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, not {getattr(args, name)}")
    if args.samples > 1 and not args.temperature > 0:
        raise SystemExit(f"--temperature must be above 0 to sample {args.samples} chains, not {args.temperature}")
    for run_dir in args.runs:
        read_run_config(run_dir)
        if not checkpoints(run_dir):
            raise SystemExit(f"{run_dir}: no trained model ({os.path.join(run_dir, 'best')}); train one first: "
                             f"python tinythinker.py --phase acquire --out {run_dir}")


if __name__ == "__main__":
    try:
        main()
    except data.DataError as e:
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
