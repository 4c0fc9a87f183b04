"""Tailored Learning (Wang et al., EMNLP 2023, arXiv 2310.13332) on the same T5 student, data and teacher.

    python tailored.py                          # every round on the embedded world, offline, a T5 from scratch
    python tailored.py --data gsm8k --dry-run   # round 1's teacher bill: questions, requests, tokens, cost
    python tailored.py --data gsm8k --rounds 3  # the LLM teacher through client.py's client and cache
    python evaluate.py runs/tailored_world      # every round's model, single-stage chain-of-thought decoding

Round 1: the teacher writes chain-of-thought rationales for every training question (COT_N each); those whose
answer is the gold one are kept and the student is fine-tuned on them (standard distillation). Each later round:
the student takes an exam (4 sampled rationales per training question, T 1.0, top-k 50); each wrong one goes back to
the teacher with the gold answer, which corrects it; the student, from the previous round's model, trains on every
correction with L = L_LM + lam * L_SR (triplet.py). Tasks: the paper's GSM8K, SVAMP, MultiArith (numeric answers),
CSQA and StrategyQA, and OBQA, the world and one's own. METHOD.md section 10 is the method, TL1..TL13 its adaptations.
"""
import argparse
import json
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import cli
import data
import evaluate
import train
import triplet
import world
from client import (Cache, Client, ClientConfig, InvalidCompletion, Meter, RequestFailed, api_key, bill,
                    cached_chat)
from cli import setting
from data import DEFAULT_DIR, Question
from files import atomic_write


@dataclass
class Config:
    data: str = setting("world", "gsm8k, svamp, multiarith, csqa, strategyqa, obqa, world (built in, offline), or a "
                        "directory or .jsonl file of your own questions")
    data_dir: str = setting(str(DEFAULT_DIR), "folder of the data sets (downloaded into DIR/{data set}/original if "
                            "missing) and of the teacher's cache, DIR/{data set}/tailored.cache.jsonl")
    model: str = setting("google-t5/t5-small", "the student to train: a Hugging Face Hub id or a local checkpoint "
                         "folder; scratch = a new small T5 (world.MODEL) with a tokenizer trained on the data")
    out: str = setting("", "run folder (default runs/tailored_{data set})")
    resume: bool = setting(False, "continue a killed round from its last state.pt, on the settings it started with")
    dry_run: bool = setting(False, "print round 1's teacher bill (questions, requests, tokens, cost), as teacher.py "
                            "--dry-run; nothing is sent or written")
    limit: int | None = setting(None, "only the first N training questions, as teacher.py's --limit (default all)")
    seed: int = setting(42, "seed of a model from scratch, the batches' order, dropout and the exams' samples")
    rounds: int = setting(3, "rounds: round 1 on the teacher's rationales, each later one on its corrections of the "
                          "student's exam (Figure 1 shows rounds 1-3, METHOD 10.4)")
    lam: float = setting(0.5, "weight of the self-reflection loss L_SR; 0 = the LM loss alone (the paper's ablation)")
    margin: float = setting(1.0, "margin of the triplet loss L_SR")
    sr_max_length: int = setting(192, "tokens of each triplet continuation (anchor, positive, negative), </s> kept")
    exam_samples: int = setting(4, "sampled rationales per training question in a round's exam")
    exam_temperature: float = setting(1.0, "the exam's sampling temperature (transformers' default, which the "
                                      "official code left in place)")
    exam_top_k: int = setting(50, "the exam's top-k sampling; 0 = off")
    batch_size: int = setting(16, "questions per step, one rationale each (the official effective batch, 8 GPUs x 2)")
    lr: float = setting(3e-4, "peak learning rate of AdamW, re-tuned for T5 (TL8; the official 7e-6 was for "
                        "GPT-J-6B)")
    warmup: float = setting(0.1, "share of the steps with a linear warm-up, then cosine decay to 0")
    epochs: int = setting(10, "epochs per round (METHOD 10.6)")
    later_epochs: int = setting(0, "epochs of rounds 2 and later; 0 = --epochs")
    later_lr: float = setting(0.0, "peak learning rate of rounds 2 and later; 0 = --lr")
    eval_every: int = setting(0, "optimizer steps between validations; 0 = once per epoch")
    grad_clip: float = setting(1.0, "gradient-norm clip")
    precision: str = setting("fp32", "autocast dtype: fp32, bf16, or fp16 with a loss scaler, as tinythinker.py's "
                             "(A20)")
    eval_batch_size: int = setting(256, "questions (or exam samples) per generation batch")
    max_new_tokens: int = setting(0, "tokens generated per rationale in validation and the exam; 0 = the task's "
                                  "official cap (TL10)")
    base_url: str = setting("https://api.openai.com/v1", "the teacher's OpenAI-compatible endpoint, e.g. "
                            "http://localhost:8000/v1 for a local server (real data only: the world's is built in)")
    teacher_model: str = setting("gpt-4o-2024-05-13", "the model name sent to the endpoint; a local server takes "
                                 "the name it serves (TL12)")
    api_key_env: str = setting("OPENAI_API_KEY", "environment variable holding the API key (a local server may need "
                               "none)")
    workers: int = setting(8, "teacher requests in flight at once (mind the endpoint's rate limit)")

DECISIONS = {
    "TL1 prompt": "encoder input = the official prompt without few-shot demos (T5's 512 tokens cannot hold them): "
                 "'Question: {q}\\nReasoning:' for numbers and yes/no, the CSQA layout for multiple choice (OBQA, "
                 "the world and one's own too)",
    "TL2 newlines": "the 'Answer: N' of a number or yes/no target follows a space, T5's vocabulary having no newline; "
                   "so the parsers read the official '\\nAnswer' marker as any whitespace then 'Answer'",
    "TL3 round-1 teacher": "the task's official demos (tailored_demos.json; OBQA, the world and one's own multiple "
                          "choice take CSQA's, one's own numbers GSM8K's), then the question, no gold hint; COT_N = 4 "
                          "completions per question; only rationales reaching the gold answer are kept (the prompt "
                          "and count were not retrievable)",
    "TL4 representation": "decoder final hidden state (after the final layer norm) at the position reading eos, "
                         "decoder input = start + target: GPT-J's last-token state; continuations cut to 192 tokens "
                         "keeping eos",
    "TL5 passes": "prompt encoded once without gradients; anchor, positive, negative in one decoder pass with "
                 "gradients and dropout off (GPT-J has no dropout)",
    "TL6 round data": "round k trains on every gold-reaching correction of round k's mistakes, one feedback request "
                     "per wrong rationale (the README's --teacher_data = the new file); positives come from every "
                     "teacher rationale of the question so far, negatives from round k's exam (positives from the new "
                     "file alone would leave a once-corrected question without one)",
    "TL7 round 1": "LM loss only, no round-0 exam: a T5 has no few-shot ability, so its untrained samples are noise; "
                  "round 1 is then the standard distillation baseline",
    "TL8 optimisation": "the loop TinyThinker uses (train.fit): AdamW without weight decay, warm-up + cosine, "
                       "clip 1.0, best-by-validation model per round; the official: wd 0.01, warm-up then constant",
    "TL9 rounds chain": "round k starts from round k-1's best-validation model",
    "TL10 generation caps": "--max-new-tokens 0 = the task's official cap (GSM8K 256, SVAMP and MultiArith 192, CSQA "
                           "96, StrategyQA 128; OBQA and one's own multiple choice CSQA's, one's own numbers GSM8K's; "
                           "the world 64, its preset), for validation, evaluation and the exam alike: the official "
                           "exam samples 128 tokens for every task, cutting long GSM8K solutions off as wrong",
    "TL11 splits": "validation never on the test set (the official validates on test): GSM8K 6,726/747/1,319 (test "
                  "as published, valid a tenth of train drawn with the seed); SVAMP 630/70/300 and MultiArith "
                  "378/42/180 (test = 3/10 drawn with the seed, the paper's 300 and 180, whose membership is not "
                  "published; valid a tenth of the rest); CSQA 8,520/1,221/1,221 and StrategyQA 80/10/10% as "
                  "TinyThinker's (A11; the official trains on all of CSQA's 9,741); GSM8K golds without thousands "
                  "commas (the official keeps 79 train and 14 test golds like '1,080', which its parser never gives)",
    "TL12 teacher settings": "--teacher-model gpt-4o-2024-05-13 (the paper's ChatGPT snapshot was not retrievable), "
                            "temperature 0.8 (teacher.py's: distinct rationales give positives), max_tokens 512 (room "
                            "for GSM8K's longest solutions after a feedback's Error line), n = 4 per round-1 request "
                            "and 1 per feedback request; the official settings were not retrievable",
    "TL13 parsers": "the official ones, but CSQA's '(x)' and bare letter are read in either case and a letter the "
                   "question does not offer parses as nothing (wrong either way), and TL2's marker",
}

# Settings a resumed run may change: they move no step of a round's schedule.
FREE_ON_RESUME = ("resume", "dry_run", "out", "data_dir", "rounds", "eval_batch_size", "base_url", "api_key_env",
                  "workers")
# The demo's settings on the embedded world: round 1 learns from scratch as acquire does (world.FROM_SCRATCH); later
# rounds refine at 1e-4, as round 1's lr undid it.
WORLD = dict(world.FROM_SCRATCH, later_epochs=10, later_lr=1e-4, max_new_tokens=64)


def world_default(name):
    """A flag's default as --help shows it, with the world's where that differs (WORLD); None where the help itself
    says it (a switch, an empty default)."""
    default = Config.__dataclass_fields__[name].default
    if isinstance(default, bool) or default in ("", None):
        return None
    return f"default {default}" + (f", world {WORLD[name]}" if WORLD.get(name, default) != default else "")


def parse_config(argv=None):
    """Defaults, then the world's presets (WORLD), then the command line."""
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, Config, world_default)
    given = cli.given_flags(parser, argv)
    data.check_name(given.get("data", Config.data), listed=tuple(data.FILES))
    cfg = Config(**{**(WORLD if given.get("data", Config.data) == "world" else {}), **given})
    cfg.out = cfg.out or os.path.join("runs", f"tailored_{data.dataset_name(cfg.data)}")
    cfg.data_dir = os.path.abspath(cfg.data_dir)
    cfg.max_new_tokens = cfg.max_new_tokens or generation_cap(cfg.data)
    return cfg


def check(cfg):
    """One clear line for a setting that cannot work, before anything is loaded or written (--data: parse_config)."""
    cli.check_positive(cfg, ("rounds", "epochs", "batch_size", "exam_samples", "eval_batch_size", "max_new_tokens",
                             "workers", "sr_max_length",
                             *(("limit",) if cfg.limit is not None else ())))
    cli.check_positive(cfg, ("exam_top_k", "later_epochs", "eval_every"), least=0)
    cli.check_seed(cfg.seed)
    if not (cfg.lr > 0 and cfg.lam >= 0 and cfg.exam_temperature > 0 and cfg.margin >= 0 and cfg.later_lr >= 0
            and 0 <= cfg.warmup < 1 and cfg.grad_clip > 0):
        raise SystemExit("--lr, --exam-temperature and --grad-clip must be above 0, --later-lr, --margin and --lam at "
                         "least 0, --warmup in [0, 1)")
    cli.check_learning_rate(cfg.lr)
    cli.check_learning_rate(cfg.later_lr, "--later-lr")


# ----------------------------------------------------------------------------------------------------------------
# The tasks: demos and generation caps

# The official few-shot demonstrations of the five tasks, verbatim as data (tailored_demos.json names the source).
DEMOS = json.loads((Path(__file__).resolve().parent / "tailored_demos.json").read_text(encoding="utf-8"))["demos"]
# The official max_new_tokens of each task (METHOD 10.7, TL10)
CAPS = {"gsm8k": 256, "svamp": 192, "multiarith": 192, "csqa": 96, "strategyqa": 128}


def task(name: str, q: Question) -> str:
    """The official task whose demos a question of data set `name` takes (TL3): its own, else by its layout, CSQA's
    for multiple choice (OBQA, the world, one's own) and GSM8K's for one's own numbers."""
    return name if name in CAPS else {"choice": "csqa", "number": "gsm8k"}[q.kind]


def generation_cap(name: str) -> int:
    """--max-new-tokens 0: the task's official cap (TL10); one's own data set takes the largest of its questions'."""
    if data.is_own(name):
        return max(CAPS[task(name, q)] for q in data.load(name, "train"))
    return CAPS[name if name in CAPS else "csqa"]


# ----------------------------------------------------------------------------------------------------------------
# The teacher's prompts (METHOD 10.3)

COT_N = 4  # round-1 rationales per question (TL3: not retrieved; the positive needs a second one)
TEACHER = dict(temperature=0.8, max_tokens=512)  # request settings (TL12: the official ones were not retrievable)
# RECONSTRUCTION, not the paper's text: the feedback prompt is in the paper's appendix, which could not be retrieved
# (METHOD 10.3). It carries what Figure 1 and the README describe: the question, the student's rationale marked
# wrong, the gold answer, and a request to point out the error and then rationalise correctly in the demos' format.
FEEDBACK = ("A student answered the last question with the rationale below, and it is wrong. The correct answer is "
            "{gold}.\nStudent: {wrong}\nFirst point out the student's error in one line that starts with \"Error:\". "
            "Then write a correct rationale for the last question in exactly the format of the examples.")


def cot_message(q: Question, name: str) -> str:
    """Round 1: the official demos of the question's task, then the question in their layout, for the teacher to
    complete (no gold hint: TL3); the student's prompt of the official code with its demos."""
    return DEMOS[task(name, q)] + "\n" + data.cot_input(q)


def feedback_message(q: Question, wrong: str, name: str) -> str:
    """Feedback (reconstructed, see FEEDBACK): the round-1 prompt, the student's wrong rationale, the gold answer."""
    return cot_message(q, name) + "\n\n" + FEEDBACK.format(gold=data.gold_text(q), wrong=wrong)


def demo_answers(name: str) -> list[str]:
    """The completions a task's demos show: each demo's text after its "Reasoning: " or "Answer: " label."""
    return [re.split(r"\n(?:Reasoning|Answer): ", demo, maxsplit=1)[1] for demo in DEMOS[name].strip().split("\n\n")]


def parse_cot_completion(text: str, q: Question) -> str:
    """The rationale of a teacher completion whose answer is the gold one (METHOD 10.3: only those are kept), as a
    student target's rationale: a feedback's "Error:" line dropped, the text up to its first blank line (where the
    official parser stops), a repeated "Answer:" or "Reasoning:" label dropped, on one line; for multiple choice cut
    right after its first "(x)", otherwise without its "Answer:" line (data.cot_target appends the gold one)."""
    text = "\n".join(line for line in text.strip().split("\n") if not line.strip().startswith("Error:"))
    text = text.strip().split("\n\n")[0].strip()
    for label in ("Answer:", "Reasoning:"):
        text = text.removeprefix(label).strip()
    if data.parse_cot(text, q) != q.answer:
        raise InvalidCompletion("no answer or not the gold answer")
    if q.kind != "choice":
        return " ".join(data.ANSWER_MARKER.split(text)[0].split())
    line = text.split("\n")[0]
    letter = re.search(r"\([a-e]\)", line, re.I)
    if letter is None:  # a bare letter answers, but is no rationale
        raise InvalidCompletion("no rationale")
    return line[:letter.end()] + "."


def ask(messages, n, salt, settings, client, cache):
    """n completions of one chat request, through the cache (client.cached_chat). `salt` keeps Tailored's requests
    apart from TinyThinker's rounds."""
    payload = {"model": settings.model, "messages": messages, "temperature": settings.temperature,
               "max_tokens": settings.max_tokens, "n": n}
    response = cached_chat(payload, salt, client, cache)
    return [c["message"].get("content") or "" for c in response["choices"] if c.get("finish_reason") != "length"]


def gold_rationales(texts, q):
    """(the rationales of the completions whose answer is q's gold one, how many were not): parse_cot_completion."""
    kept = []
    for text in texts:
        try:
            kept.append(parse_cot_completion(text, q))
        except InvalidCompletion:
            pass
    return kept, len(texts) - len(kept)


def ask_all(jobs, name, settings, client, cache, desc):
    """Tailored's requests on data set `name`, in parallel: (q, None) asks for COT_N round-1 rationales of q, (q,
    wrong) for one correction of the student's wrong rationale. Returns the kept rationales of each job (gold answer
    only); a request that still fails after the client's retries gives none and is counted in client.meter."""
    def one(job):
        q, wrong = job
        content = cot_message(q, name) if wrong is None else feedback_message(q, wrong, name)
        try:
            texts = ask([{"role": "user", "content": content}], COT_N if wrong is None else 1,
                        "tailored-cot" if wrong is None else "tailored-feedback", settings, client, cache)
        except RequestFailed:
            client.meter.add(failed=1)
            return []
        kept, invalid = gold_rationales(texts, q)
        if invalid:
            client.meter.add(invalid=invalid)
        return kept

    pool = ThreadPoolExecutor(settings.workers)
    try:
        return list(tqdm(pool.map(one, jobs), total=len(jobs), desc=desc, unit="request"))
    finally:
        pool.shutdown(cancel_futures=True)  # an error stops the run instead of draining the queue


# ----------------------------------------------------------------------------------------------------------------
# The teacher: the world's built-in one, or an LLM through client.py

def teacher_settings(cfg) -> ClientConfig:
    """The client's settings for Tailored's requests: the run's endpoint and model, TEACHER's request settings."""
    return ClientConfig(base_url=cfg.base_url, model=cfg.teacher_model, api_key_env=cfg.api_key_env,
                        workers=cfg.workers, **TEACHER)


def round_one_bill(cfg) -> dict:
    """--dry-run: round 1's requests and their price (client.bill, the estimate of teacher.py --dry-run), sending
    nothing: one request of COT_N completions per training question, a completion as long as its task's demo answers
    on average. Later rounds ask one correction per mistake of the student's exams, unknown before they run."""
    if cfg.data == "world":
        raise SystemExit("the world's teacher is built into world.py: round 1 sends no request and costs nothing")
    questions = data.load(cfg.data, "train", cfg.data_dir)[:cfg.limit]
    answers = {t: demo_answers(t) for t in {task(cfg.data, q) for q in questions}}
    chars = {t: sum(map(len, texts)) / len(texts) for t, texts in answers.items()}
    completion = sum(chars[task(cfg.data, q)] for q in questions) / max(len(questions), 1)
    return bill(teacher_settings(cfg), [len(cot_message(q, cfg.data)) for q in questions], COT_N, completion,
                len(questions), Path(cfg.out) / "round_1" / "teacher.jsonl")


class Teacher:
    """Both of Tailored's requests for a list of jobs: (q, None) asks for round-1 rationales, (q, wrong) for the
    correction of a wrong one. Returns the kept rationales of each job, one request per job."""

    def __init__(self, cfg):
        self.name, self.made, self.client = cfg.data, None, None
        if cfg.data == "world":
            self.made = world.make_world()
            return
        self.settings = teacher_settings(cfg)
        self.client = Client(self.settings, api_key(self.settings), Meter())
        self.cache = Cache(Path(cfg.data_dir) / data.dataset_name(cfg.data) / "tailored.cache.jsonl")

    def __call__(self, jobs, desc):
        if self.client:
            return ask_all(jobs, self.name, self.settings, self.client, self.cache, desc)
        # the built-in teacher's completions go through the LLM parser and gold filter
        return [gold_rationales(world.cot_completions(self.made, q, COT_N) if wrong is None
                                else [world.feedback_completion(self.made, q, wrong)], q)[0] for q, wrong in jobs]


def rationales_file(path, make, everyone=False) -> list[dict]:
    """Rows {"id": question id, "texts": [...], ...} kept in a JSONL file: made once, read back by a resumed run (no
    request repeated). Rank 0 makes it and writes it, or every rank takes part in making it (`everyone`: a sharded
    exam)."""
    if not os.path.isfile(path):
        made = make() if everyone or cli.rank() == 0 else None
        if cli.rank() == 0:
            data.write_jsonl(path, made)
    cli.barrier()
    return data.read_jsonl(path)


def corrected(rows) -> dict[str, list[str]]:
    """{question id: its distinct corrections}, pooled over the question's feedback requests (corrections.jsonl has
    one row per request), in file order; a question none of whose corrections reached the gold answer is absent."""
    pooled = defaultdict(dict)
    for row in rows:
        pooled[row["id"]].update(dict.fromkeys(row["texts"]))
    return {i: list(texts) for i, texts in pooled.items() if texts}


# ----------------------------------------------------------------------------------------------------------------
# The exam (METHOD 10.4)

def exam(cfg, model, tokenizer, questions, k):
    """{question id: the student's distinct wrong rationales}: exam_samples sampled rationales per question (T 1.0,
    top-k 50), of which only those whose parsed answer is not the gold one are kept (a question with none is absent)."""
    prompts = [data.cot_input(q) for q in questions for _ in range(cfg.exam_samples)]
    texts = evaluate.generate_texts(model, tokenizer, prompts, cfg.exam_temperature, cfg.exam_top_k,
                                    batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens,
                                    desc=f"round {k} exam", seed=cfg.seed * 1000 + k)  # --seed reproduces a round
    mistakes = {}
    for i, q in enumerate(questions):
        samples = texts[i * cfg.exam_samples:(i + 1) * cfg.exam_samples]
        wrong = list(dict.fromkeys(t for t in samples if data.parse_cot(t, q) != q.answer))
        if wrong:
            mistakes[q.id] = wrong
    return mistakes


# ----------------------------------------------------------------------------------------------------------------
# Batches of distinct questions (METHOD 10.6)

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


def round_plan(groups, batch_size, epochs, seed):
    """A round's optimizer steps for train.fit, each of stage "cot" (one chain-of-thought target), and the steps of
    one epoch: a validation each unless --eval-every says otherwise."""
    per_epoch = [unique_batches(groups, batch_size, seed, epoch) for epoch in range(epochs)]
    return [train.Step(n, "cot", b) for n, b in enumerate(b for epoch in per_epoch for b in epoch)], len(per_epoch[0])


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
    neg = {i: [encode(questions[i], t) for t in texts] for i, texts in negatives.items()}  # the same formatter (10.5)
    groups = defaultdict(list)
    for n, (i, _, _) in enumerate(examples):
        groups[i].append(n)
    epochs, lr = (cfg.later_epochs or cfg.epochs, cfg.later_lr or cfg.lr) if k > 1 else (cfg.epochs, cfg.lr)
    plan, epoch_steps = round_plan(list(groups.values()), cfg.batch_size, epochs, cfg.seed * 100 + k)
    loop = train.Loop(lr, cfg.warmup, cfg.grad_clip, micro_batch=cfg.batch_size,
                      eval_every=cfg.eval_every or epoch_steps)
    use_sr = cfg.lam > 0 and k > 1
    cli.say(f"round {k}: {len(examples)} rationales of {len(groups)} questions, {len(plan)} steps"
            + (f", L_SR weight {cfg.lam}" if use_sr else ""))

    def step_loss(trained, step, micro_batch):
        rows = [examples[n] for n in micro_batch]
        input_ids, attention_mask, labels = (t.to(device) for t in data.collate([(x, y) for _, x, y in rows]))
        loss = trained(input_ids=input_ids, attention_mask=attention_mask, labels=labels)[1]
        metrics = dict(lm=loss.item())
        if use_sr:  # the same metric names on every rank, as train.fit averages them over ranks
            kept, p, n = triplet.triplets([y for _, _, y in rows], [pos.get(i, []) for i, _, _ in rows],
                                          [neg.get(i, []) for i, _, _ in rows], triplet.draw(cfg.seed, k, step.number))
            metrics.update(triplets=len(kept) / len(rows), sr=0.0)
            if kept:
                sr = triplet.self_reflection_loss(model, input_ids[kept], attention_mask[kept],
                                                  [rows[r][2] for r in kept], p, n, cfg.margin, cfg.sr_max_length)
                loss = loss + cfg.lam * sr
                metrics["sr"] = sr.item()
        return loss, metrics

    best = train.fit(loop, os.path.join(cfg.out, f"round_{k}"), model, tokenizer, plan, step_loss=step_loss,
                     validate=evaluate.validator(cfg, tokenizer, valid, "cot"), runtime=runtime, desc=f"round {k}")
    return best, len(plan)


def teacher_rationales(round_dir, questions, ask_teacher):
    """Round 1's rows {id, texts}: the teacher's kept rationales of each question that has any (METHOD 10.3)."""
    return rationales_file(os.path.join(round_dir, "teacher.jsonl"), lambda: [
        dict(id=q.id, texts=texts)
        for q, texts in zip(questions, ask_teacher([(q, None) for q in questions], "round 1 teacher")) if texts])


def mistakes(cfg, k, round_dir, model, tokenizer, questions):
    """{question id: wrong rationales} of round k's exam, which every rank takes its share of (METHOD 10.4)."""
    rows = rationales_file(os.path.join(round_dir, "mistakes.jsonl"), lambda: [
        dict(id=i, texts=wrong) for i, wrong in exam(cfg, model, tokenizer, questions, k).items()], everyone=True)
    return {row["id"]: row["texts"] for row in rows}


def feedback(k, round_dir, negatives, by_id, ask_teacher):
    """The teacher's corrections of round k's mistakes, pooled by question (corrected), and the number of requests:
    one per wrong rationale, each a row of corrections.jsonl, so that a question with several mistakes keeps the
    correction of each (TL6)."""
    jobs = [(by_id[i], wrong) for i, texts in negatives.items() for wrong in texts]
    rows = rationales_file(os.path.join(round_dir, "corrections.jsonl"), lambda: [
        dict(id=q.id, wrong=wrong, texts=texts)
        for (q, wrong), texts in zip(jobs, ask_teacher(jobs, f"round {k} feedback"))])
    return corrected(rows), len(jobs)


def tailored(cfg):
    """Round 1 distils the teacher's rationales; each later round, from the previous round's best model, examines the
    student, has the teacher correct each of its mistakes and trains on the corrections with L_LM + lam * L_SR
    (METHOD 10.1). A resumed run reads every request's answer and every exam back from the run folder."""
    runtime = cli.setup_device(cfg.precision, cfg.seed)
    cli.hold_run(cfg.out)
    if not cli.start_run(cfg, cfg.out, "config.json", FREE_ON_RESUME):
        cli.write_run_config(cfg, cfg.out, runtime, DECISIONS, method="tailored", stages="cot")
    cli.demo("tailored", cfg.data == "world")
    questions = cli.questions(cfg.data, "train", cfg.data_dir)[:cfg.limit]
    valid = cli.questions(cfg.data, "valid", cfg.data_dir)
    by_id = {q.id: q for q in questions}
    ask_teacher = Teacher(cfg) if runtime.rank == 0 else None  # rank 0 alone talks to the teacher and holds its cache
    previous, results = None, {}
    for k in range(1, cfg.rounds + 1):
        round_dir = os.path.join(cfg.out, f"round_{k}")
        os.makedirs(round_dir, exist_ok=True)
        if k == 1:  # the teacher's rationales, the first positives
            first = teacher_rationales(round_dir, questions, ask_teacher)
            positives = {row["id"]: list(row["texts"]) for row in first}
            anchors, negatives, requests = [(row["id"], t) for row in first for t in row["texts"]], {}, len(questions)
        else:  # the exam's mistakes, and the corrections that become anchors and positives
            model, tokenizer = cli.trained_model(previous, runtime)
            negatives = mistakes(cfg, k, round_dir, model, tokenizer, questions)
            corrections, requests = feedback(k, round_dir, negatives, by_id, ask_teacher)
            anchors = [(i, t) for i, texts in corrections.items() for t in texts]
            for i, texts in corrections.items():
                positives[i] = list(dict.fromkeys(positives.get(i, []) + texts))
        done = cli.done(round_dir)
        if done is None:
            if not anchors:
                cli.say(f"round {k}: no corrected mistakes to learn from; stopping")
                break
            if k == 1:
                texts = [data.cot_input(by_id[i]) + " " + data.cot_target(t, by_id[i]) for i, t in anchors]
                model, tokenizer = cli.student(cfg, cfg.out, texts, runtime)
            best, steps = train_round(cfg, k, model, tokenizer, (anchors, positives, negatives), by_id, valid, runtime)
            done = cli.finish(round_dir, dict(best=best, steps=steps, requests=requests, rationales=len(anchors),
                                              mistakes=sum(map(len, negatives.values()))))
        results[k] = done
        previous = os.path.join(round_dir, "best")
    if runtime.rank == 0:
        atomic_write(os.path.join(cfg.out, "summary.json"), json.dumps(results, indent=1).encode())
    cli.say("tailored: " + "; ".join(f"round {k}: validation {r['best']:.2f}%, {r['steps']} steps, "
                                     f"{r['requests']} teacher requests" for k, r in results.items()))
    cli.say(f"next: python evaluate.py {cfg.out}")
    cli.release_run(cfg.out)


def main(argv=None):
    def run():
        cfg = parse_config(argv)
        check(cfg)
        if cfg.dry_run:
            return print(json.dumps(round_one_bill(cfg), indent=1))
        tailored(cfg)
    cli.command(run)


if __name__ == "__main__":
    main()
