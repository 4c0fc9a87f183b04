"""Tailored Learning (Wang et al., EMNLP 2023, arXiv 2310.13332) on the same T5 student, data and teacher.

    python tailored.py                          # every round on the embedded world, offline, a T5 from scratch
    python tailored.py --data csqa --rounds 3   # the LLM teacher through teacher.py's client and cache
    python evaluate.py runs/tailored_world      # every round's model, single-stage chain-of-thought decoding

Round 1: the teacher writes chain-of-thought rationales for every training question (teacher.COT_N each); those whose
answer is the gold one are kept and the student is fine-tuned on them (standard distillation). Each later round:
the student takes an exam (4 sampled rationales per training question, T 1.0, top-k 50); its wrong ones go back to
the teacher with the gold answer, which corrects them; the student, from the previous round's model, trains on the
corrections with L = L_LM + lam * L_SR (triplet.py). METHOD.md section 11 is the method, TL1..TL9 its adaptations to T5.
"""
import argparse
import dataclasses
import json
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

import data
import evaluate
import teacher
import tinythinker
import triplet
import world
from t5 import T5, Tokenizer


@dataclass
class Config:
    data: str = "world"                 # world | csqa | obqa | strategyqa
    data_dir: str = "data"
    model: str = "google-t5/t5-small"   # Hub id or local directory; "scratch" = a new T5 sized by world.MODEL
    out: str = ""                       # run directory (default runs/tailored_{data})
    resume: bool = False                # continue a killed round from its last state.pt
    seed: int = 42
    rounds: int = 3                     # Figure 1 shows rounds 1-3 (METHOD 11.4)
    lam: float = 0.5                    # weight of L_SR; 0 = the LM loss alone (the paper's ablation)
    margin: float = 1.0
    sr_max_length: int = 192            # tokens of each triplet continuation
    exam_samples: int = 4               # the exam: transformers' sampling defaults, as the official code left them
    exam_temperature: float = 1.0
    exam_top_k: int = 50
    batch_size: int = 16                # the official effective batch (8 GPUs x 2)
    lr: float = 3e-4                    # re-tuned for T5 (METHOD 11.8); the official 7e-6 was for GPT-J-6B
    warmup: float = 0.1
    epochs: int = 10                    # per round (METHOD 11.6)
    later_epochs: int = 0               # rounds 2..K; 0 = epochs
    later_lr: float = 0.0               # rounds 2..K; 0 = lr
    eval_every: int = 0                 # optimizer steps between validations; 0 = once per epoch
    grad_clip: float = 1.0
    precision: str = "fp32"             # CUDA autocast dtype, as tinythinker's --precision (A20)
    eval_batch_size: int = 256
    max_new_tokens: int = 128           # the official StrategyQA cap; CSQA's is 96 (METHOD 11.7)
    base_url: str = "https://api.openai.com/v1"  # the teacher (real data only); see teacher.py
    teacher_model: str = "gpt-4o-2024-05-13"
    api_key_env: str = "OPENAI_API_KEY"
    workers: int = 8


# The embedded world: round 1 learns from scratch with tinythinker.WORLD's acquire settings (batch 64, lr 3e-3,
# 30 epochs); later rounds refine on the corrections. At round 1's lr they undid it within 4 steps (on the previous
# world: validation 75% -> 29%, the LM loss 0.04 -> 0.46); at 1e-4 they moved validation by a question or two.
WORLD = dict(model="scratch", batch_size=64, lr=3e-3, epochs=30, later_epochs=10, later_lr=1e-4, eval_every=150,
             max_new_tokens=64)
DECISIONS = {
    "TL1 prompt": "encoder input = the official prompt without few-shot demos (T5's 512 tokens cannot hold them); "
                 "OBQA and the world use the CSQA layout, StrategyQA the Reasoning/Answer layout",
    "TL2 newlines": "the yes/no target's 'Answer:' line follows a space: T5's vocabulary has no newline",
    "TL3 round-1 teacher": "the official demos, no gold hint, teacher.COT_N = 4 completions per question; only "
                          "rationales reaching the gold answer are kept (the prompt and count were not retrievable)",
    "TL4 representation": "decoder final hidden state (after the final layer norm) at the position reading eos, "
                         "decoder input = start + target: GPT-J's last-token state; continuations cut to 192 tokens "
                         "keeping eos",
    "TL5 passes": "prompt encoded once without gradients; anchor, positive, negative in one decoder pass with "
                 "gradients and dropout off (GPT-J has no dropout)",
    "TL6 round data": "round k trains on round k's corrections only (the README's --teacher_data = the new file); "
                     "positives come from every teacher rationale of the question so far, negatives from round k's "
                     "exam (positives from the new file alone would leave a once-corrected question without one)",
    "TL7 round 1": "LM loss only, no round-0 exam: a T5 has no few-shot ability, so its untrained samples are noise; "
                  "round 1 is then the standard distillation baseline",
    "TL8 optimisation": "the loop TinyThinker uses (tinythinker.fit): AdamW without weight decay, warm-up + cosine, "
                       "clip 1.0, best-by-validation model per round; the official: wd 0.01, warm-up then constant",
    "TL9 rounds chain": "round k starts from round k-1's best-validation model",
}


def parse_config(argv=None):
    """Defaults, then the world's presets, then the command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tinythinker.add_flags(parser, Config)
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    cfg = Config(**{**(WORLD if given.get("data", Config.data) == "world" else {}), **given})
    cfg.out = cfg.out or os.path.join("runs", f"tailored_{cfg.data}")
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# The teacher: the world's built-in one, or an LLM through teacher.py's client and cache

class Teacher:
    """Both of Tailored's requests for a list of jobs: (q, None) asks for round-1 rationales, (q, wrong) for the
    correction of a wrong one. Returns the kept rationales of each job, one request per job."""

    def __init__(self, cfg):
        self.made, self.client = None, None
        if cfg.data == "world":
            self.made = world.make_world()
            return
        self.cfg = teacher.TeacherConfig(data=cfg.data, base_url=cfg.base_url, model=cfg.teacher_model,
                                         api_key_env=cfg.api_key_env, workers=cfg.workers)
        self.client = teacher.Client(self.cfg, os.environ.get(cfg.api_key_env), teacher.Meter())
        self.cache = teacher.Cache(Path(cfg.data_dir) / cfg.data / "tailored.cache.jsonl")

    def __call__(self, jobs, desc):
        if self.client:
            return teacher.ask_all(jobs, self.cfg, self.client, self.cache, desc)
        kept = []
        for q, wrong in jobs:  # the built-in teacher's completions go through the LLM parser and gold filter
            texts = (world.cot_completions(self.made, q, teacher.COT_N) if wrong is None
                     else [world.feedback_completion(self.made, q, wrong)])
            kept.append([])
            for text in texts:
                try:
                    kept[-1].append(teacher.parse_cot_completion(text, q))
                except teacher.InvalidCompletion:
                    pass
        return kept


def rationales_file(path, make):
    """{question id: [texts]} kept in a JSONL file: made once, read back by a resumed run (no request repeated)."""
    if not os.path.isfile(path):
        tinythinker.write_jsonl([dict(id=i, texts=t) for i, t in make().items()], path)
    return {row["id"]: row["texts"] for row in tinythinker.read_jsonl(path)}


# ----------------------------------------------------------------------------------------------------------------
# The exam (METHOD 11.4)

@torch.no_grad()
def exam(cfg, model, tokenizer, questions, desc):
    """{question id: the student's distinct wrong rationales}: exam_samples sampled rationales per question (T 1.0,
    top-k 50), of which only those whose parsed answer is not the gold one are kept (a question with none is absent)."""
    device = next(model.parameters()).device
    per_batch = max(1, cfg.eval_batch_size // cfg.exam_samples)
    mistakes = {}
    for start in tqdm(range(0, len(questions), per_batch), desc=desc, leave=False):
        batch = questions[start:start + per_batch]
        input_ids, attention_mask = tokenizer([data.cot_input(q) for q in batch])
        out = model.generate(input_ids.to(device), attention_mask.to(device), cfg.max_new_tokens, do_sample=True,
                             temperature=cfg.exam_temperature, top_k=cfg.exam_top_k,
                             num_return_sequences=cfg.exam_samples)
        texts = [t.strip() for t in tokenizer.batch_decode(out.tolist())]
        for i, q in enumerate(batch):
            samples = texts[i * cfg.exam_samples:(i + 1) * cfg.exam_samples]
            wrong = list(dict.fromkeys(t for t in samples if data.parse_cot(t, q) != q.answer))
            if wrong:
                mistakes[q.id] = wrong
    return mistakes


# ----------------------------------------------------------------------------------------------------------------
# Batches of distinct questions (METHOD 11.6)

def unique_batches(groups, batch_size, seed, epoch):
    """One epoch's batches as index lists: every example once, no two examples of one question in a batch. Questions
    are visited in a random order, one unused example each per pass (the official UniqueQuestionSampler); a batch is
    closed early when the next question is already in it. Drawn from (seed, epoch) alone: a resumed run rebuilds it."""
    rng = triplet.draw(seed, "epoch", epoch)
    queues = [rng.sample(g, len(g)) for g in groups]
    order = rng.sample(range(len(groups)), len(groups))
    batches, batch, members = [], [], set()
    while any(queues):
        for g in order:
            if not queues[g]:
                continue
            if g in members:
                batches.append(batch)
                batch, members = [], set()
            batch.append(queues[g].pop())
            members.add(g)
            if len(batch) == batch_size:
                batches.append(batch)
                batch, members = [], set()
    return batches + ([batch] if batch else [])


class Plan:
    """The optimizer steps of a round for tinythinker.fit: plan[step] = (step, example indices)."""

    def __init__(self, groups, batch_size, epochs, seed):
        per_epoch = [unique_batches(groups, batch_size, seed, epoch) for epoch in range(epochs)]
        self.batches = [b for epoch in per_epoch for b in epoch]
        self.cycle = len(per_epoch[0])  # validation once per epoch unless eval_every says otherwise

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, step):
        return step, self.batches[step]


# ----------------------------------------------------------------------------------------------------------------
# The rounds

def train_round(cfg, k, model, tokenizer, texts, questions, valid, runtime):
    """Round k in {out}/round_k: fine-tune on the anchors of texts = (anchors [(question id, rationale)], positives
    {question id: teacher rationales}, negatives {question id: wrong student rationales}) with L_LM + lam * L_SR.
    Returns the best validation accuracy and the number of optimizer steps."""
    anchors, positives, negatives = texts
    device = runtime.device
    encode = lambda q, text: tokenizer.encode(data.cot_target(text, q))
    examples = [(i, tokenizer.encode(data.cot_input(questions[i])), encode(questions[i], t)) for i, t in anchors]
    pos = {i: [encode(questions[i], t) for t in texts] for i, texts in positives.items()}
    neg = {i: [tokenizer.encode(t) for t in texts] for i, texts in negatives.items()}  # as sampled, nothing appended
    groups = defaultdict(list)
    for n, (i, _, _) in enumerate(examples):
        groups[i].append(n)
    if k > 1:
        cfg = dataclasses.replace(cfg, epochs=cfg.later_epochs or cfg.epochs, lr=cfg.later_lr or cfg.lr)
    plan = Plan(list(groups.values()), cfg.batch_size, cfg.epochs, cfg.seed * 100 + k)
    use_sr = cfg.lam > 0 and k > 1
    print(f"round {k}: {len(examples)} rationales of {len(groups)} questions, {len(plan)} steps"
          + (f", L_SR weight {cfg.lam}" if use_sr else ""))

    def train_step(trained, scaler, step, indices):
        rows = [examples[n] for n in indices]
        input_ids, attention_mask, labels = (t.to(device) for t in data.collate([(x, y) for _, x, y in rows]))
        _, loss = trained(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        metrics = dict(lm=loss.item())
        if use_sr:
            kept, p, n = triplet.triplets([y for _, _, y in rows], [pos.get(i, []) for i, _, _ in rows],
                                          [neg.get(i, []) for i, _, _ in rows], triplet.draw(cfg.seed, k, step))
            metrics["triplets"] = len(kept)
            if kept:
                sr = triplet.self_reflection_loss(trained, input_ids[kept], attention_mask[kept],
                                                  [rows[r][2] for r in kept], p, n, cfg.margin, cfg.sr_max_length)
                loss = loss + cfg.lam * sr
                metrics["sr"] = sr.item()
        scaler.scale(loss).backward()
        return dict(loss=loss.item(), **metrics)

    validate = lambda m: evaluate.accuracy(m, tokenizer, valid, "cot", batch_size=cfg.eval_batch_size,
                                           max_new_tokens=cfg.max_new_tokens)[0]
    best = tinythinker.fit(cfg, os.path.join(cfg.out, f"round_{k}"), model, tokenizer, plan, train_step=train_step,
                           validate=validate, runtime=runtime, desc=f"round {k}")
    return best, len(plan)


def main(cfg):
    runtime = tinythinker.setup_device(cfg)
    device = runtime.device
    if runtime.world_size > 1:
        raise SystemExit("tailored.py runs on one device: the exam and the teacher's feedback are sequential")
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), "method": "tailored", "stages": "cot", "decisions": DECISIONS}, f,
                  indent=1)
    if cfg.data == "world":
        print("demo: Tailored Learning on the embedded world with a T5 from scratch; a real run: "
              "python tailored.py --data csqa")
    train, valid = (evaluate.questions(cfg.data, split, cfg.data_dir) for split in ("train", "valid"))
    by_id = {q.id: q for q in train}
    ask = Teacher(cfg)
    os.makedirs(os.path.join(cfg.out, "round_1"), exist_ok=True)
    first = rationales_file(os.path.join(cfg.out, "round_1", "teacher.jsonl"), lambda: {
        q.id: texts for q, texts in zip(train, ask([(q, None) for q in train], "round 1 teacher")) if texts})
    positives = {i: list(texts) for i, texts in first.items()}
    previous, results = None, {}
    for k in range(1, cfg.rounds + 1):
        round_dir = os.path.join(cfg.out, f"round_{k}")
        os.makedirs(round_dir, exist_ok=True)
        if k == 1:
            anchors, negatives, requests = [(i, t) for i, ts in first.items() for t in ts], {}, len(train)
        else:
            model, tokenizer = T5.from_pretrained(previous, device=device), Tokenizer.from_pretrained(previous)
            model.amp_dtype = runtime.amp
            torch.manual_seed(cfg.seed * 1000 + k)  # the exam's samples: --seed reproduces a round
            negatives = rationales_file(os.path.join(round_dir, "mistakes.jsonl"), lambda: exam(
                cfg, model, tokenizer, train, f"round {k} exam"))
            jobs = [(by_id[i], wrong) for i, texts in negatives.items() for wrong in texts]
            corrections = rationales_file(os.path.join(round_dir, "corrections.jsonl"), lambda: {
                q.id: list(dict.fromkeys(ts)) for (q, _), ts in zip(jobs, ask(jobs, f"round {k} feedback")) if ts})
            anchors, requests = [(i, t) for i, ts in corrections.items() for t in ts], len(jobs)
            for i, texts in corrections.items():
                positives[i] = list(dict.fromkeys(positives.get(i, []) + texts))
        done_path = os.path.join(round_dir, "done.json")
        if os.path.isfile(done_path):
            results[k] = tinythinker.read_jsonl(done_path)[0]
            previous = os.path.join(round_dir, "best")
            continue
        if not anchors:
            print(f"round {k}: no corrected mistakes to learn from; stopping")
            break
        if k == 1:
            texts = [data.cot_input(by_id[i]) + " " + data.cot_target(t, by_id[i]) for i, t in anchors]
            model, tokenizer = tinythinker.student(cfg, cfg.out, texts)
            model.to(device).amp_dtype = runtime.amp
        best, steps = train_round(cfg, k, model, tokenizer, (anchors, positives, negatives), by_id, valid, runtime)
        results[k] = dict(best=best, steps=steps, requests=requests, rationales=len(anchors),
                          mistakes=sum(map(len, negatives.values())))
        tinythinker.write_jsonl([results[k]], done_path)
        previous = os.path.join(round_dir, "best")
    with open(os.path.join(cfg.out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("tailored: " + "; ".join(f"round {k}: validation {r['best']:.2f}%, {r['steps']} steps, {r['requests']} "
                                   f"teacher requests" for k, r in results.items()))
    print(f"next: python evaluate.py {cfg.out}")


def check(cfg):
    """One clear line for a setting that cannot work, before anything is loaded or written."""
    if cfg.data not in ("world", *data.FILES):
        raise SystemExit(f"--data must be world or one of {', '.join(data.FILES)}, not {cfg.data!r}")
    for name in ("rounds", "epochs", "batch_size", "exam_samples", "eval_batch_size", "max_new_tokens", "workers"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    if not (cfg.lr > 0 and cfg.lam >= 0 and cfg.exam_temperature > 0):
        raise SystemExit("--lr and --exam-temperature must be above 0, --lam at least 0")


if __name__ == "__main__":
    try:
        config = parse_config()
        check(config)
        main(config)
    except data.DataError as e:  # a data set or teacher file that cannot be read: it is named in the message
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume", file=sys.stderr)
        sys.exit(130)
