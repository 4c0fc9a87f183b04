"""TinyThinker in plain PyTorch: the command line and the two training phases.

    python tinythinker.py --phase acquire     # Phase 1, reasoning acquisition: staged SFT on the teacher's rationales
    python tinythinker.py --phase reflect     # Phase 2, self-reflection: iterative DPO on the student's own chains
    torchrun --nproc_per_node 4 tinythinker.py --phase acquire --data csqa     # several GPUs, same script

With no --data both phases run on the embedded world (world.py), a T5 trained from scratch in minutes on a CPU.
A real run first asks the teacher (python teacher.py --data csqa --split train), then trains google-t5/t5-small.
Every default is the official code's value (METHOD sections 5.3 and 7); the world overrides a few to fit a laptop.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import shutil
import sys
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import data
import dpo
import evaluate
import teacher
import world
from data import DEFAULT_DIR
from t5 import T5, T5Config, Tokenizer


@dataclass
class Config:
    phase: str = "acquire"              # acquire | reflect
    data: str = "world"                 # world | csqa | obqa | strategyqa
    data_dir: str = str(DEFAULT_DIR)    # data set files and teacher records: <repo>/data, where teacher.py writes
    model: str = "google-t5/t5-small"   # Hub id or local directory; "scratch" = a new T5 sized by world.MODEL
    stages: str = "recall_analyze_summarize"  # acquire: a data.STAGES variant; reflect: recall | analyze | recall_analyze
    out: str = ""                       # run directory (default runs/{data}); reflect writes into {out}/reflect
    resume: bool = False                # continue a killed run from its last state.pt
    seed: int = 42
    # optimisation (METHOD 5.3 for acquire, 7.5 for reflect)
    batch_size: int = 64                # per device and micro-batch; effective = batch_size * grad_accum * devices
    grad_accum: int = 1
    lr: float = 5e-4
    warmup: float = 0.1                 # fraction of the steps with a linear warm-up, then cosine decay to 0 (A3)
    epochs: int = 10
    steps: int = 0                      # acquire: stop after this many optimizer steps (0 = all epochs; A23 control)
    interval: int = 100                 # recall batches per cycle of the staged schedule (METHOD 5.2)
    eval_every: int = 0                 # optimizer steps between validations; 0 = once per cycle, as the official code
    grad_clip: float = 1.0
    group_by_length: bool = False       # batches of similar lengths pad less; off = the official random batches
    precision: str = "fp32"             # fp32 | bf16 | fp16 (fp16 with a GradScaler): CUDA autocast; CPUs run fp32 (A20)
    eval_batch_size: int = 256
    max_new_tokens: int = 200           # every stage, as the official max_length 200
    # self-reflection (METHOD 7)
    iterations: int = 5
    samples: int = 10                   # sampled chains per question and per chosen recall (generation_times)
    temperature: float = 0.7            # sampling temperature; the official schedule never changes it (A8)
    beta: float = 0.5                   # DPO beta: the official argparse value (A2)
    alpha: float = 0.5                  # weight of the NLL on chosen responses (DPO + alpha * NLL, A10)
    max_length: int = 200               # prompt and response truncation for DPO (METHOD 7.4)
    sources: dict = dataclasses.field(default_factory=dict)  # where each setting came from (parse_config)


# The method's self-reflection values (run_dpo.sh and scripts/dpo.py, METHOD 7): they replace acquire's values for
# a reflect run, whatever data set it continues; epochs counts cycles of the official schedule (A19, reflect_plan).
REFLECT = dict(batch_size=32, lr=5e-6, warmup=0.1, epochs=10, eval_every=0, grad_clip=1.0, iterations=5, samples=10,
               temperature=0.7, beta=0.5, alpha=0.5, max_length=200, max_new_tokens=200)
# The embedded demo (world.py), sized so that acquire, reflect and evaluate together fit in 10 minutes on 2 CPU cores.
# acquire: stages interleaved batch by batch (interval 1): with blocks of 10/40/10 batches the same model sat at
# chance for 528 steps. Validating every 6-step cycle would cost more than the training, hence eval_every.
# 30 epochs (1,350 steps): acquire leaves chance in a jump, between steps 450 and 750 on seeds 1-3 (one thread), and
# the last 450 steps move validation by 2 points at most; 15 epochs stop in the middle of it. Not every run is past it:
# seed 42 with two threads jumped later and ended at 79% validation (BENCHMARKS.md).
# reflect: lr 5e-5: Adam's first steps move every weight by about lr, and two steps at 2e-4 cost 6 points of
# validation accuracy on a converged student; one epoch at 5e-5 (a few steps) left every prediction unchanged.
# A24: the method's sampling temperature (0.7). The earlier world's demo sampled at 1.2 to get any pairs at all from a
# converged student; chains the student would not write teach it about texts far from its own. Reflect's claim is
# tested instead from a student that still errs (ablation.py --epochs 15: 98-132 steps of pairs against 4-24).
WORLD = {
    "acquire": dict(model="scratch", batch_size=64, lr=3e-3, epochs=30, interval=1, eval_every=150, max_new_tokens=48),
    "reflect": dict(batch_size=32, lr=5e-5, epochs=2, iterations=2, samples=4, max_new_tokens=48),
}
# The method's open questions that move accuracy (METHOD 9), recorded in every run's config.
DECISIONS = {
    "A1 analysis order in summarize inputs": "alphabetical in training and inference (no gold-first shortcut)",
    "A2 beta": "0.5, the official argparse value",
    "A3 learning-rate schedule": "linear warm-up over 10% of the steps, then cosine to 0 (the current official code)",
    "A6 test decoding": "greedy unless evaluate.py --samples N",
    "A7 reported iteration": "reflect/best is the iteration with the best validation accuracy",
    "A9 analyze-pair balancing": "chosen topped up to |rejected| like the recall rule (see dpo.analyze_pairs)",
    "A16 exhausted loaders": "a cycle skips an exhausted loader; every example is seen once per epoch",
    "A18 identical pairs": "a preference pair whose chosen and rejected texts are equal is left out (dpo.recall_pairs)",
    "A19 reflect schedule": "the official one: epochs x S steps, validation every S = RI + AI steps (reflect_plan)",
    "A20 precision": "fp32 unless --precision bf16|fp16, as the official code (DPO compares sums of 200 log-probs)",
    "A21 reflect samples": "only training questions with teacher records, as the official code",
}


def add_flags(parser, config):
    """One --flag per setting of the `config` dataclass (a bool is a switch), None when not given, so that the
    command line can be layered over presets. A field without a plain default (Config.sources) is no setting."""
    for field in dataclasses.fields(config):
        if field.default is dataclasses.MISSING:
            continue
        flags = ["--" + field.name.replace("_", "-")]
        if isinstance(field.default, bool):
            parser.add_argument(*flags, action="store_true", default=None)
        else:
            parser.add_argument(*flags, type=type(field.default), default=None, help=f"default {field.default!r}")


def parse_config(argv=None):
    """Defaults, then the phase's and the world's, then the command line, in that order. A reflect run continues the
    acquire run in --from: its data set, data directory and stage variant come from that run's config.json, then
    the method's reflect values (REFLECT), then the world's if that run was on the world, then the command line.
    cfg.sources records where each setting came from; it is written to config.json."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flags(parser, Config)
    parser.add_argument("--from", dest="out", help="reflect: the acquire run directory (same as --out)")
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    phase, name = given.get("phase", Config.phase), given.get("data", Config.data)
    layers = []
    if phase == "reflect":
        run_dir = given.get("out") or os.path.join("runs", name)
        acquired = acquire_settings(run_dir)
        if "data" in given and given["data"] != acquired["data"]:
            raise SystemExit(f"--data {given['data']}: the run in {run_dir} was acquired on {acquired['data']}")
        name = acquired["data"]
        layers += [("acquire run", acquired), ("method (reflect)", REFLECT)]
    if name == "world":
        layers.append(("world preset", WORLD.get(phase, {})))
    layers.append(("command line", given))
    settings, sources = {}, {}
    for source, values in layers:
        settings.update(values)
        sources.update(dict.fromkeys(values, source))
    cfg = Config(**settings)
    cfg.out = cfg.out or os.path.join("runs", cfg.data)
    cfg.data_dir = os.path.abspath(cfg.data_dir)  # config.json then works from any directory
    cfg.sources = {f.name: sources.get(f.name, "default") for f in dataclasses.fields(Config) if f.name != "sources"}
    return cfg


POSITIVE = ("batch_size", "grad_accum", "epochs", "interval", "eval_batch_size", "max_new_tokens", "iterations",
            "samples", "max_length")


def check(cfg):
    """One clear line for a setting that cannot work, before anything is loaded or written."""
    if cfg.phase not in ("acquire", "reflect"):
        raise SystemExit(f"--phase must be acquire or reflect, not {cfg.phase!r}")
    if cfg.data not in ("world", *data.FILES):
        raise SystemExit(f"--data must be world or one of {', '.join(data.FILES)}, not {cfg.data!r}")
    if cfg.phase == "acquire" and cfg.stages not in data.STAGES:
        raise SystemExit(f"--stages must be one of {', '.join(data.STAGES)}, not {cfg.stages!r}")
    for name in POSITIVE:
        if getattr(cfg, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    if not (cfg.lr > 0 and 0 <= cfg.warmup < 1 and cfg.eval_every >= 0 and cfg.temperature > 0 and cfg.beta > 0
            and cfg.grad_clip > 0 and cfg.alpha >= 0):
        raise SystemExit("--lr, --temperature, --beta and --grad-clip must be above 0, --warmup in [0, 1), "
                         "--eval-every and --alpha at least 0")
    if cfg.phase == "reflect":  # reflect starts from an acquired model (parse_config has read the run's settings)
        if not os.path.isdir(os.path.join(cfg.out, "best")):
            raise SystemExit(f"{cfg.out}: no acquired model ({os.path.join(cfg.out, 'best')}); "
                             f"run python tinythinker.py --phase acquire first (--from names its --out)")


# Settings a resumed run may change: they move no step of the schedule.
FREE_ON_RESUME = ("resume", "out", "data_dir", "eval_batch_size", "sources")


def check_resume(cfg, run_dir, **extra):
    """A started run continues only with --resume and on the settings it started with (its config.json, read before
    anything rewrites it): another batch size, seed or learning rate would silently follow a different schedule."""
    if not cfg.resume:
        raise SystemExit(f"{run_dir} holds a started run: pass --resume to continue it, or --out for a new one")
    saved, now = evaluate.read_run_config(run_dir), {**dataclasses.asdict(cfg), **extra}
    changed = [f"--{k.replace('_', '-')} {now[k]} (the run has {saved[k]})" for k in now
               if k in saved and k not in FREE_ON_RESUME and now[k] != saved[k]]
    if changed:
        raise SystemExit(f"{run_dir}: cannot resume with other settings: {', '.join(changed)}")


def acquire_settings(run_dir):
    """What a reflect run takes from the acquire run it continues. Reflect trains recall and analyze inside the full
    chain (METHOD 7), so it continues only a run of the full recall_analyze_summarize variant."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no acquire run to reflect on; run python tinythinker.py --phase acquire first, "
                         "or pass --from RUN_DIR")
    acquired = evaluate.read_run_config(run_dir)
    if acquired["stages"] != "recall_analyze_summarize":
        raise SystemExit(f"{path}: reflect continues a recall_analyze_summarize run, not a {acquired['stages']} one")
    return dict(data=acquired["data"], data_dir=acquired["data_dir"], stages="recall_analyze")


# ----------------------------------------------------------------------------------------------------------------
# Data: questions, teacher records, tokenized stage examples

def teacher_records(cfg):
    """The teacher's rationales for the training questions (teacher.py's records). The world's teacher is built in
    and goes through the same parser as an LLM's completions."""
    if cfg.data == "world":
        made = world.make_world()
        return [r for q in made.train for r in teacher.records_from_completions(q, [world.teacher_completion(made, q)])]
    path = os.path.join(cfg.data_dir, cfg.data, "teacher_train.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no teacher records; make them with: python teacher.py --data {cfg.data} --split train")
    records = teacher.read_records(path)
    if not records:
        raise SystemExit(f"{path}: no teacher records in the file; see {path[:-len('.jsonl')]}.failed.jsonl")
    return records


def student(cfg, run_dir, texts):
    """The model and tokenizer to train: a public checkpoint, or ("scratch") a new T5 sized by world.MODEL and a
    tokenizer trained on `texts`, kept in the run directory so that a resumed run reuses it."""
    if cfg.model != "scratch":
        return T5.from_pretrained(cfg.model), Tokenizer.from_pretrained(cfg.model)
    tokenizer_dir = os.path.join(run_dir, "tokenizer")
    if os.path.isfile(os.path.join(tokenizer_dir, "spiece.model")):
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
    else:
        tokenizer = Tokenizer.train(texts, world.VOCAB_SIZE, tokenizer_dir)
    torch.manual_seed(cfg.seed)
    return T5(T5Config(vocab_size=tokenizer.vocab_size, **world.MODEL)), tokenizer


# ----------------------------------------------------------------------------------------------------------------
# The staged schedule (METHOD 5.2)

def stage_schedule(batches_per_stage, quotas):
    """One epoch as a list of stage names, one per optimizer step: cycles of quotas["recall"] recall batches,
    quotas["analyze"] analyze batches and quotas["summarize"] summarize batches, until every loader is empty.
    A loader that runs out is skipped and the cycle goes on (A16)."""
    left, order = dict(batches_per_stage), []
    assert all(quotas.get(s, 0) > 0 for s, n in left.items() if n), "a stage with data needs a quota"
    while any(left.values()):
        for stage in ("recall", "analyze", "summarize"):
            take = min(quotas.get(stage, 0), left.get(stage, 0))
            order += [stage] * take
            left[stage] = left.get(stage, 0) - take
    return order


class Plan:
    """Which examples every optimizer step trains on, computed from (seed, epoch, stage) alone (data.batch_order): a
    resumed run recomputes it and carries on at its step, so no data-loader state needs saving."""

    def __init__(self, lengths, batch, epochs, seed, quotas=None, world_size=1, group_by_length=False, max_steps=None):
        self.lengths, self.batch, self.seed, self.group_by_length = lengths, batch, seed, group_by_length
        # A batch smaller than the number of devices is dropped: every rank needs an example, or DDP's all-reduce
        # would wait forever. Only the short last batch of a stage can be that small.
        self.world_size = world_size
        self.batches = {s: len(n) // batch + (len(n) % batch >= world_size) for s, n in lengths.items()}
        epoch_order = stage_schedule(self.batches, quotas or self.batches)  # no quotas: one pass per stage in turn
        if max_steps:  # as many epochs as max_steps needs, the last one cut short
            epochs = -(-max_steps // len(epoch_order))
        self.steps = []
        for epoch in range(epochs):
            seen = dict.fromkeys(lengths, 0)
            for stage in epoch_order:
                self.steps.append((epoch, stage, seen[stage]))
                seen[stage] += 1
        self.steps = self.steps[:max_steps]
        self.cycle = sum(min((quotas or self.batches)[s], n) for s, n in self.batches.items())

    def __len__(self):
        return len(self.steps)

    def __getitem__(self, step):
        """(stage, example indices) of one optimizer step."""
        epoch, stage, b = self.steps[step]
        seed = self.seed * 10 + list(self.lengths).index(stage)  # each stage has its own shuffle
        order = data.batch_order(self.lengths[stage], self.batch, seed, epoch, self.group_by_length)
        return stage, [indices for indices in order if len(indices) >= self.world_size][b]


# ----------------------------------------------------------------------------------------------------------------
# The loop both phases share

class Runtime(NamedTuple):
    """Where a run computes: its device, the CUDA autocast dtype (None = fp32), and its place among DDP processes."""
    device: torch.device
    amp: torch.dtype | None
    rank: int
    world_size: int


def setup_device(cfg):
    """The Runtime of this process. torchrun sets LOCAL_RANK; a plain `python` run is rank 0 of 1."""
    if "LOCAL_RANK" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    torch.manual_seed(cfg.seed)  # dropout masks; a model from scratch is seeded again in student()
    # Precision lives in the model (T5.amp_dtype): its forward and generate autocast to that dtype on CUDA. fp32 is
    # the default (A20): the official code trains in fp32, and DPO compares sums of up to 200 token log-probs whose
    # reference and policy values must agree for equal weights (bf16 rounds them differently per batch shape).
    if cfg.precision not in evaluate.PRECISIONS:
        raise SystemExit(f"--precision {cfg.precision}: expected one of {', '.join(evaluate.PRECISIONS)}")
    amp = evaluate.PRECISIONS[cfg.precision] if device.type == "cuda" else None
    if amp == torch.float16:
        print("warning: T5's feed-forward activations overflow fp16 (transformers#9295); bf16 is the safe choice",
              file=sys.stderr)
    return Runtime(device, amp, rank, world_size)


def learning_rate(cfg, step, total):
    """Linear warm-up over cfg.warmup of the steps, then cosine decay to zero (METHOD 5.3)."""
    warm = int(cfg.warmup * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def rng_state():
    return dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state_all(state["cuda"])


def save_atomic(obj, path):
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def fit(cfg, run_dir, model, tokenizer, plan, *, train_step, validate, runtime, desc, dropout=True):
    """AdamW over `plan`, one `train_step(stage, indices)` per optimizer step, with warm-up + cosine learning rate,
    gradient clipping, and a validation every cfg.eval_every (default plan.cycle) steps and at the end that keeps the
    best model in {run_dir}/best and writes the resumable state {run_dir}/state.pt atomically. Returns the best accuracy.
    Validation and generation put the model back in the mode they found it in, so train(dropout) holds throughout."""
    rank, world_size = runtime.rank, runtime.world_size
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(enabled=runtime.amp == torch.float16)  # fp16 gradients underflow without loss scaling
    state_path, log_path = os.path.join(run_dir, "state.pt"), os.path.join(run_dir, "log.jsonl")
    start, best = 0, -1.0
    if cfg.resume and os.path.isfile(state_path):
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start, best = state["step"], state["best"]
        if rank == 0 and os.path.isfile(log_path):  # drop log lines written after that state, and a torn last line
            with open(log_path) as f:
                kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= start]
            with open(log_path, "w") as f:
                f.writelines(kept)
    elif os.path.isfile(state_path):
        raise SystemExit(f"{state_path} exists: pass --resume to continue that run, or --out for a new one")
    trained = DistributedDataParallel(model) if world_size > 1 else model
    # a fresh start drops the lines of a run killed before its first saved state
    log = open(log_path, "a" if start else "w") if rank == 0 else None
    model.train(dropout)
    bar = tqdm(range(start, len(plan)), desc=desc, initial=start, total=len(plan), disable=rank != 0)
    for step in bar:
        lr = learning_rate(cfg, step, len(plan))
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics = train_step(trained, scaler, *plan[step])
        scaler.unscale_(optimizer)
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        metrics.update(step=step + 1, lr=lr)
        if rank == 0:
            log.write(json.dumps(metrics) + "\n")
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", stage=metrics.get("stage", ""))
        if (step + 1) % (cfg.eval_every or plan.cycle) == 0 or step + 1 == len(plan):
            if rank == 0:
                accuracy = validate(model)
                if accuracy > best:
                    best = accuracy
                    model.save_pretrained(os.path.join(run_dir, "best"))
                    tokenizer.save_pretrained(os.path.join(run_dir, "best"))
                log.write(json.dumps(dict(step=step + 1, valid_accuracy=accuracy, best=best)) + "\n")
                log.flush()
                tqdm.write(f"{desc} step {step + 1}/{len(plan)}: loss {metrics['loss']:.4f}, "
                           f"validation accuracy {accuracy:.2f}% (best {best:.2f}%)")
                save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                 scaler=scaler.state_dict(), rng=rng_state(), step=step + 1, best=best), state_path)
            if world_size > 1:
                dist.barrier()
    if log:
        log.close()
    return best


def write_run_config(cfg, run_dir, world_size, **extra):
    """The resolved config with the library versions and the method's recorded decisions."""
    env = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
               platform=platform.platform(), devices=world_size,
               cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump({**dataclasses.asdict(cfg), **extra, "env": env, "decisions": DECISIONS}, f, indent=1)


# ----------------------------------------------------------------------------------------------------------------
# Phase 1: reasoning acquisition (METHOD 5)

def acquire(cfg):
    runtime = setup_device(cfg)
    device, amp, rank, world_size = runtime
    run_dir = cfg.out
    effective = cfg.batch_size * cfg.grad_accum * world_size
    started = os.path.isfile(os.path.join(run_dir, "state.pt"))
    if started:
        check_resume(cfg, run_dir, effective_batch_size=effective)
    os.makedirs(run_dir, exist_ok=True)
    if cfg.data == "world" and cfg.model == "scratch" and rank == 0:
        print("demo: acquiring on the embedded world with a T5 from scratch; a real run: "
              "python teacher.py --data csqa --split train && python tinythinker.py --phase acquire --data csqa")
    records = teacher_records(cfg)
    valid = evaluate.questions(cfg.data, "valid", cfg.data_dir)
    stage_texts = {stage: pairs for stage, pairs in data.stage_examples(records, cfg.stages).items() if pairs}
    model, tokenizer = student(cfg, run_dir, [x + " " + y for pairs in stage_texts.values() for x, y in pairs])
    model.to(device).amp_dtype = amp
    examples = {stage: [(tokenizer.encode(x), tokenizer.encode(y)) for x, y in pairs]
                for stage, pairs in stage_texts.items()}
    n_options = max(len(r["explanations"]) for r in records)
    quotas = dict(recall=cfg.interval, analyze=cfg.interval * n_options, summarize=cfg.interval)
    lengths = {s: [len(x) for x, _ in e] for s, e in examples.items()}
    # --steps: a budget in steps instead of epochs, the last epoch cut short (ablation.py's control, A23)
    plan = Plan(lengths, effective, cfg.epochs, cfg.seed, quotas, world_size, cfg.group_by_length, cfg.steps or None)
    if rank == 0:
        if not started:  # a resumed run keeps the config.json it started with
            write_run_config(cfg, run_dir, world_size, effective_batch_size=effective, total_steps=len(plan),
                             examples={s: len(e) for s, e in examples.items()})
        print(f"acquire: {', '.join(f'{len(e)} {s}' for s, e in examples.items())} examples; effective batch "
              f"{effective} = {cfg.batch_size} x {cfg.grad_accum} accumulation x {world_size} devices; "
              f"{len(plan)} steps, validation every {cfg.eval_every or plan.cycle}")

    def train_step(trained, scaler, stage, indices):
        """Token-mean cross-entropy over the whole effective batch, however it is split across devices and
        micro-batches: each piece is weighted by its share of the batch's target tokens."""
        batch = [examples[stage][i] for i in indices]
        total_tokens = sum(len(target) for _, target in batch)
        mine = batch[rank::world_size]
        micro = [mine[i:i + cfg.batch_size] for i in range(0, len(mine), cfg.batch_size)]
        loss_sum = torch.zeros((), device=device)
        for k, pairs in enumerate(micro):
            input_ids, attention_mask, labels = (t.to(device) for t in data.collate(pairs))
            share = sum(len(target) for _, target in pairs) / total_tokens
            # Gradients are all-reduced once per step, on the last micro-batch.
            last = k == len(micro) - 1
            with trained.no_sync() if world_size > 1 and not last else contextlib.nullcontext():
                _, loss = trained(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
                scaler.scale(loss * share * world_size).backward()  # DDP averages gradients over ranks
            loss_sum += loss.detach() * share
        if world_size > 1:
            dist.all_reduce(loss_sum)
        return dict(stage=stage, loss=loss_sum.item())

    validate = lambda m: evaluate.accuracy(m, tokenizer, valid, cfg.stages, batch_size=cfg.eval_batch_size,
                                           max_new_tokens=cfg.max_new_tokens)[0]
    best = fit(cfg, run_dir, model, tokenizer, plan, train_step=train_step, validate=validate, runtime=runtime,
               desc="acquire")
    if rank == 0:
        print(f"acquire: best validation accuracy {best:.2f}%, model in {os.path.join(run_dir, 'best')}")
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# Phase 2: self-reflection (METHOD 7)

def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def write_jsonl(rows, path):
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


def self_pairs(cfg, model, tokenizer, train, records, iteration_dir, iteration):
    """Sample the student's own chains on the training questions and turn them into preference pairs (METHOD 7.1-7.3).
    The pairs are saved as JSONL, so a resumed iteration does not sample again and a reader can see what the student
    learned to prefer."""
    recall_path, analyze_path = (os.path.join(iteration_dir, f"{s}_pairs.jsonl") for s in ("recall", "analyze"))
    if os.path.isfile(recall_path) and os.path.isfile(analyze_path):
        return read_jsonl(recall_path), read_jsonl(analyze_path)
    rng = random.Random(cfg.seed * 1000 + iteration)
    torch.manual_seed(cfg.seed * 1000 + iteration)  # the sampled tokens, so --seed reproduces an iteration's pairs
    by_id = {q.id: q for q in train}
    kwargs = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)
    # Recall pass: recall sampled, analyze and summarize greedy, `samples` chains per question.
    repeated = [q for q in train for _ in range(cfg.samples)]
    chains = evaluate.run_chains(model, tokenizer, repeated, recall_temperature=cfg.temperature,
                                 desc=f"iteration {iteration} recall samples", **kwargs)
    recall_pairs, contexts = dpo.recall_pairs(chains, by_id, records, rng)
    analyze_pairs = []
    if "analyze" in cfg.stages:
        # Analyze pass: each chosen recall is fixed and its analyses sampled, `samples` chains per context.
        fixed = [c for c in contexts for _ in range(cfg.samples)]
        chains = evaluate.run_chains(model, tokenizer, [by_id[c.id] for c in fixed], recalls=[c.recall for c in fixed],
                                     analyze_temperature=cfg.temperature,
                                     desc=f"iteration {iteration} analyze samples", **kwargs)
        analyze_pairs = dpo.analyze_pairs(chains, by_id, contexts, rng)
    if "recall" not in cfg.stages:
        recall_pairs = []
    write_jsonl(recall_pairs, recall_path)
    write_jsonl(analyze_pairs, analyze_path)
    return recall_pairs, analyze_pairs


def reflect_plan(cfg, pairs, seed):
    """A19, the official DPO schedule (METHOD 7.5): a cycle of S = RI + AI steps, RI = floor(R/B)+1 recall batches
    and AI = (floor(A/R)+1)*RI analyze batches (R, A = numbers of pairs, B the batch size), cfg.epochs cycles in all
    (10, so 10 validations), validation every S steps. RI and AI are at least the batches of one pass, so each
    pass over the shuffled pairs is every recall batch, then every analyze batch (A16), and a new shuffled pass
    starts where the last one ends, not at a cycle boundary, as the official loop restarts exhausted loaders."""
    n = {s: len(p) for s, p in pairs.items()}
    if "recall" in n:
        ri = n["recall"] // cfg.batch_size + 1
        quotas = dict(recall=ri, analyze=(n.get("analyze", 0) // n["recall"] + 1) * ri)
    else:  # analyze pairs only: S = floor(A/B)+1
        quotas = dict(analyze=n["analyze"] // cfg.batch_size + 1)
    cycle = sum(quotas[s] for s in n)
    plan = Plan({s: [len(p[0]) for p in ps] for s, ps in pairs.items()}, cfg.batch_size, 0, seed, quotas,
                max_steps=cfg.epochs * cycle)
    plan.cycle = cycle
    return plan


def reflect(cfg):
    runtime = setup_device(cfg)
    device, amp, _, world_size = runtime
    if world_size > 1:
        raise SystemExit("reflect runs on one device: its sampling dominates and the pairs are small")
    reflect_dir = os.path.join(cfg.out, "reflect")
    if os.path.isfile(os.path.join(reflect_dir, "iter_1", "state.pt")):  # saved at iteration 1's first validation
        check_resume(cfg, reflect_dir)
    else:
        os.makedirs(reflect_dir, exist_ok=True)
        write_run_config(cfg, reflect_dir, world_size)
    if cfg.data == "world":
        print("demo: self-reflection on the embedded world; a real run: python tinythinker.py --phase reflect "
              "--from runs/csqa")
    train, valid = (evaluate.questions(cfg.data, split, cfg.data_dir) for split in ("train", "valid"))
    records = teacher_records(cfg)
    # Only questions with teacher records are sampled, as in the official code (its training set is the teacher's
    # output): a recall pair may need the teacher's Key Information as its chosen side (METHOD 7.2, step 4), and
    # questions the teacher failed or that --limit left out have none.
    taught = {r["id"] for r in records}
    if len(taught) < len(train):
        print(f"reflect: sampling the {len(taught)} training questions with teacher records, "
              f"of {len(train)} in the split")
    train = [q for q in train if q.id in taught]
    previous, results = os.path.join(cfg.out, "best"), {}
    for iteration in range(1, cfg.iterations + 1):
        iteration_dir = os.path.join(reflect_dir, f"iter_{iteration}")
        done_path = os.path.join(iteration_dir, "done.json")
        os.makedirs(iteration_dir, exist_ok=True)
        if os.path.isfile(done_path):
            results[iteration] = read_jsonl(done_path)[0]["best"]
            previous = os.path.join(iteration_dir, "best")
            continue
        # Policy and reference both start from the previous iteration's best model (METHOD 7, step 3).
        model, tokenizer = T5.from_pretrained(previous, device=device), Tokenizer.from_pretrained(previous)
        model.amp_dtype = amp
        recall_pairs, analyze_pairs = self_pairs(cfg, model, tokenizer, train, records, iteration_dir, iteration)
        pairs = {"recall": dpo.tokenize_pairs(recall_pairs, tokenizer, cfg.max_length),
                 "analyze": dpo.tokenize_pairs(analyze_pairs, tokenizer, cfg.max_length)}
        pairs = {s: p for s, p in pairs.items() if p}
        if not pairs:
            print(f"iteration {iteration}: the student's chains gave no preference pairs; stopping")
            break
        # Dropout stays off in policy and reference (TRL's disable_dropout): the reference log-probs are computed
        # once, before training, by the same weights, and the policy must score its targets the same way.
        model.eval()
        reference = {s: reference_logprobs(model, p, cfg.eval_batch_size, device) for s, p in pairs.items()}
        plan = reflect_plan(cfg, pairs, cfg.seed + iteration)
        print(f"iteration {iteration}: {', '.join(f'{len(p)} {s} pairs' for s, p in pairs.items())}; "
              f"{len(plan)} steps, validation every {plan.cycle}")

        def train_step(trained, scaler, stage, indices):
            batch = [pairs[stage][i] for i in indices]
            ref_chosen, ref_rejected = reference[stage][indices].T.to(device)
            chosen, rejected, nll = dpo.concatenated_logprobs(trained, *dpo.collate_pairs(batch, device))
            loss, metrics = dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, nll, cfg.beta, cfg.alpha)
            scaler.scale(loss).backward()
            return dict(stage=stage, loss=loss.item(), **metrics)

        validate = lambda m: evaluate.accuracy(m, tokenizer, valid, "recall_analyze_summarize",
                                               batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)[0]
        results[iteration] = fit(cfg, iteration_dir, model, tokenizer, plan, train_step=train_step, validate=validate,
                                 runtime=runtime, desc=f"reflect {iteration}", dropout=False)
        write_jsonl([dict(best=results[iteration])], done_path)
        previous = os.path.join(iteration_dir, "best")
    if results:
        chosen = max(results, key=results.get)  # A7: select by validation, never by test
        best_dir = os.path.join(reflect_dir, "best")
        shutil.rmtree(best_dir + ".tmp", ignore_errors=True)
        shutil.copytree(os.path.join(reflect_dir, f"iter_{chosen}", "best"), best_dir + ".tmp")
        shutil.rmtree(best_dir, ignore_errors=True)
        os.replace(best_dir + ".tmp", best_dir)
        print(f"reflect: validation accuracy by iteration {results}; iteration {chosen} -> {best_dir}")


@torch.no_grad()
def reference_logprobs(model, pairs, batch_size, device):
    """log pi_ref(chosen|prompt), log pi_ref(rejected|prompt) for every pair, computed once per iteration."""
    rows = []
    for start in range(0, len(pairs), batch_size):
        chosen, rejected, _ = dpo.concatenated_logprobs(model, *dpo.collate_pairs(pairs[start:start + batch_size], device))
        rows.append(torch.stack([chosen, rejected], 1).float().cpu())
    return torch.cat(rows)


def main(argv=None):
    try:
        cfg = parse_config(argv)
        check(cfg)
        acquire(cfg) if cfg.phase == "acquire" else reflect(cfg)
    except data.DataError as e:  # a data set, teacher or run file that cannot be read: it is named in the message
        raise SystemExit(str(e)) from None
    except KeyboardInterrupt:
        print("\ninterrupted; continue with --resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
