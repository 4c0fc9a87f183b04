"""Three-stage inference, self-consistency voting and reports (METHOD section 6).

    python evaluate.py                                   # the demo runs (runs/world) on the world's held-out questions
    python evaluate.py runs/csqa --split test            # greedy chains, the validation protocol
    python evaluate.py runs/csqa --samples 10 --temperature 0.7   # self-consistency: a vote of 10 sampled chains
    torchrun --nproc_per_node 4 evaluate.py runs/csqa --split test   # the questions shared out over 4 GPUs

A chain answers one question: recall general knowledge, analyze every option given that recall, summarize the
analyses into "So the answer is option X." Each stage is one batched `generate` over all the questions, so a chain
costs three rounds of generation however many questions there are.
"""
import argparse
import collections
import json
import os
import re
import zlib
from dataclasses import asdict

import torch

import cli
import data
from data import Chain
from files import atomic_write
from t5 import load_pretrained


def generate_texts(model, tokenizer, prompts, temperature=0.0, top_k=0, batch_size=256, max_new_tokens=200, desc=None,
                   seed=0):
    """One continuation per prompt: greedy when temperature is 0, else sampled at that temperature (METHOD 6: top-k
    off). Prompts are batched in length order so a batch pads little, and the batches are shared out over the ranks
    (cli.sharded). Batch b samples from a generator seeded by (seed, b), so the texts are the same whatever the
    number of ranks."""
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))

    def generate(batch):
        b, rows = batch
        input_ids, attention_mask = tokenizer([prompts[i] for i in rows])
        generator = torch.Generator(device).manual_seed(zlib.crc32(f"{seed}/{b}".encode())) if temperature else None
        generated = model.generate(input_ids.to(device), attention_mask.to(device), max_new_tokens=max_new_tokens,
                                   do_sample=temperature > 0, temperature=temperature or 1.0, top_k=top_k,
                                   generator=generator)
        return [text.strip() for text in tokenizer.batch_decode(generated.tolist())]

    texts = [None] * len(prompts)
    batches = list(enumerate(cli.chunks(order, batch_size)))
    for (_, rows), generated in zip(batches, cli.sharded(batches, generate, desc)):
        for i, text in zip(rows, generated):
            texts[i] = text
    return texts


@torch.no_grad()
def run_chains(model, tokenizer, questions, stages="recall_analyze_summarize", recalls=None,
               recall_temperature=0.0, analyze_temperature=0.0, batch_size=256, max_new_tokens=200, desc=None, seed=0):
    """Chain every question through the stages of `stages` (a data.STAGES variant). Summarize is always greedy.

    `recalls`, when given, fixes the recall of each question instead of generating it: self-reflection samples
    analyses under a recall it has already chosen (METHOD 7.1, analyze pass).
    Option letters come from each question's own choices rather than from the "(X)" patterns of the first input
    (A15), so questions with different numbers of options can share a batch."""
    was_training = model.training
    model.eval()
    generate = lambda prompts, temperature, stage: generate_texts(
        model, tokenizer, prompts, temperature, batch_size=batch_size, max_new_tokens=max_new_tokens,
        desc=desc and f"{desc} {stage}", seed=f"{seed}/{stage}")
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
def run_cot(model, tokenizer, questions, temperature=0.0, batch_size=256, max_new_tokens=200, desc=None, seed=0):
    """A Tailored Learning run's single chain-of-thought stage (METHOD 10.7): one rationale per question, its answer
    parsed as the official code does; the rationale is the chain's summary."""
    texts = generate_texts(model, tokenizer, [data.cot_input(q) for q in questions], temperature,
                           batch_size=batch_size, max_new_tokens=max_new_tokens, desc=desc, seed=seed)
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


def validator(cfg, tokenizer, valid, stages):
    """The validation train.fit runs: greedy accuracy (%) on the validation questions, on every rank."""
    return lambda model: accuracy(model, tokenizer, valid, stages, batch_size=cfg.eval_batch_size,
                                  max_new_tokens=cfg.max_new_tokens)[0]


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


def parse_args(argv=None):
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", default=["runs/world"], help="run folders made by tinythinker.py or "
                        "tailored.py; each is evaluated on the data set and data folder its config.json names "
                        "(default runs/world)")
    parser.add_argument("--split", default="test", help="the questions answered: train, valid or test (default test)")
    parser.add_argument("--samples", type=int, default=1, help="chains per question; > 1 votes (self-consistency) "
                        "(default 1, greedy)")
    parser.add_argument("--temperature", type=cli.finite, default=0.7,
                        help="sampling temperature when --samples > 1 (default 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="the sampled chains' seed when --samples > 1 (default 0)")
    parser.add_argument("--batch-size", type=int, default=256, help="questions (or chains) per generation batch "
                        "(default 256)")
    parser.add_argument("--out", default=None, help="report path without extension, written as .md and .json "
                        "(default RUN/report, RUN the first run folder)")
    args = parser.parse_args(argv)
    check(args)
    return args


def check(args):
    """One clear line for an argument that cannot work, before any model is loaded."""
    if args.split not in ("train", "valid", "test"):
        raise SystemExit(f"--split must be train, valid or test, not {args.split!r}")
    cli.check_positive(args, ("samples", "batch_size"))
    cli.check_seed(args.seed)
    if args.samples > 1 and not args.temperature > 0:
        raise SystemExit(f"--temperature must be above 0 to sample {args.samples} chains, not {args.temperature}")
    for run_dir in args.runs:
        cli.read_run_config(run_dir)
        if not checkpoints(run_dir):
            raise SystemExit(f"{run_dir}: no trained model ({os.path.join(run_dir, 'best')}); train one first: "
                             f"python tinythinker.py --phase acquire --out {run_dir}")
    # every folder evaluate writes to, checked before a chain is computed (os.access sees a read-only disk as root too)
    report_dir = os.path.dirname(os.path.abspath(args.out or os.path.join(args.runs[0], "report")))
    for folder in [report_dir, *args.runs, *(path for run_dir in args.runs for _, path in checkpoints(run_dir))]:
        if not os.access(folder, os.W_OK):
            raise SystemExit(f"{folder}: cannot be written to (missing or read-only); evaluate.py writes its lock "
                             f"into each run folder, predictions_{args.split}.jsonl beside each checkpoint and the "
                             "report at --out")


def evaluate(args):
    """Every checkpoint of every run on one split; rank 0 writes each checkpoint's predictions and the report."""
    runtime = cli.setup_device()
    lead = runtime.rank == 0
    for run_dir in args.runs:  # no training or other evaluation may write there meanwhile
        cli.hold_run(run_dir)
    rows = []
    for run_dir in args.runs:
        cfg = cli.read_run_config(run_dir)
        cli.demo("evaluate", cfg["data"] == "world")
        split_questions = cli.questions(cfg["data"], args.split, cfg["data_dir"])
        if not split_questions:
            raise SystemExit(f"{run_dir}: the {args.split} split of {cfg['data']} has no questions")
        temperature = args.temperature if args.samples > 1 else 0.0
        decoding = f"vote of {args.samples} at T={temperature}" if args.samples > 1 else "greedy"
        for phase, path in checkpoints(run_dir):
            model, tokenizer = load_pretrained(path, device=runtime.device)
            model.amp_dtype = cli.PRECISIONS[cfg.get("precision", "fp32")]  # as the run validated
            # Reflect trains recall and analyze inside the full chain, so its model is always evaluated on it.
            stages = "recall_analyze_summarize" if phase == "reflect" else cfg["stages"]
            acc, chains = accuracy(model, tokenizer, split_questions, stages, args.samples, temperature,
                                   batch_size=args.batch_size, max_new_tokens=cfg["max_new_tokens"],
                                   desc=f"{phase} {args.split}", seed=args.seed)
            if lead:
                data.write_jsonl(os.path.join(path, f"predictions_{args.split}.jsonl"), [asdict(c) for c in chains])
            # a number question has no options to guess among: no chance figure (None, "-" in the table)
            chance = None if any(not q.choices for q in split_questions) else round(
                100.0 * sum(1 / len(q.choices) for q in split_questions) / len(split_questions), 2)
            rows.append(dict(run=run_dir, phase=phase, data=cfg["data"], stages=stages, split=args.split,
                             decoding=decoding, questions=len(split_questions), accuracy=round(acc, 2),
                             chance=chance))
            shown = phase, split_questions[0], chains[0]
    if lead:
        report(args, rows, *shown)
    for run_dir in args.runs:
        cli.release_run(run_dir)


def report(args, rows, phase, q, chain):
    """The table of every checkpoint, and what was learned in the student's own words: the last checkpoint's chain
    on the split's first question."""
    header = list(rows[0])
    table = "\n".join(["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
                      + ["| " + " | ".join("-" if r[k] is None else str(r[k]) for k in header) + " |" for r in rows])
    print(table)
    shown = f"{q.question} {data.option_string(q)}".strip()  # a number question has no options
    print(f"\n{phase} model on a {args.split} question: {shown} (gold: {q.answer})")
    for name, text in [("recall", chain.recall)] + [(f"analyze {k}", v) for k, v in (chain.analyses or {}).items()]:
        if text is not None:
            print(f"  {name}: {text}")
    print(f"  summarize: {chain.summary}\n")
    out = args.out or os.path.join(args.runs[0], "report")
    atomic_write(out + ".md", (table + "\n").encode())
    atomic_write(out + ".json", json.dumps(rows, indent=1).encode())
    print(f"wrote {out}.md, {out}.json and predictions_{args.split}.jsonl beside each checkpoint")


def main(argv=None):
    cli.command(lambda: evaluate(parse_args(argv)), interrupted="interrupted")


if __name__ == "__main__":
    main()
