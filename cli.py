"""What every command shares: flags from a settings dataclass and their checks, devices and ranks, run folders
(config.json, resume, the one-writer lock, done.json, the best model's copy), the demo's banners, the entry-point
wrapper that turns a bad file into one line, and the questions and the student a run trains. Whatever writes or
speaks does so on rank 0 alone.

Generation is spread over the ranks torchrun starts by `sharded` (validation, sampling, exams, evaluation), so that
evaluate.py needs nothing of the training loop (train.py).
"""
import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import sys
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import world
from files import HELD, LoadError, atomic_write, hold, read_json, release
from t5 import T5, T5Config, Tokenizer, load_pretrained


# ----------------------------------------------------------------------------------------------------------------
# Flags from a settings dataclass, and their checks

class Parser(argparse.ArgumentParser):
    """argparse, with a flag it cannot read said in one line (argparse prints its whole usage first)."""

    def error(self, message):
        raise SystemExit(f"{self.prog}: {message}")


def finite(text):
    """A float flag's value: float() reads "inf" and "nan" too, which would be trained or sent as they are."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def setting(default, help):
    """A field of a settings dataclass with its one-line --help (add_flags). A default of None or "" is one the help
    describes; any other is shown after it (a switch's is off)."""
    return dataclasses.field(default=default, metadata={"help": help})


def add_flags(parser, config, defaults=None):
    """One --flag per field of the `config` dataclass (a bool is a switch), None when not given, so that the command
    line can be layered over presets. A field without a plain default (a dict) is no setting. Each flag's help is its
    field's, then `defaults(name)` (the command's own account of the default) or the field's default."""
    for field in dataclasses.fields(config):
        if field.default is dataclasses.MISSING:
            continue
        flag = "--" + field.name.replace("_", "-")
        default = defaults(field.name) if defaults else (
            None if isinstance(field.default, bool) or field.default in (None, "") else f"default {field.default}")
        text = field.metadata["help"] + (f" ({default})" if default else "")
        text = text.replace("%", "%%")  # argparse formats help with %
        if field.type is bool or isinstance(field.default, bool):
            parser.add_argument(flag, action="store_true", default=None, help=text)
        else:
            kind = field.type if isinstance(field.type, type) else field.type.__args__[0]  # `int | None` -> int
            parser.add_argument(flag, type=finite if kind is float else kind, default=None, help=text)


def given_flags(parser, argv=None):
    """The settings the command line gave, and only those; a --data path to one's own data set made absolute, so
    that a run's config.json works from any directory."""
    given = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    if data.is_own(given.get("data", "")):
        given["data"] = os.path.abspath(given["data"])
    return given


def check_positive(cfg, names, least=1):
    """One clear line for a count that must be at least `least` (1 unless said)."""
    for name in names:
        if getattr(cfg, name) < least:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least {least}, not {getattr(cfg, name)}")


def check_learning_rate(lr, flag="--lr"):
    """AdamW moves each weight by about lr a step: above 1 a T5's weights (of order 1) are lost in one step, and from
    about 3e37 the step no longer fits a float32 (the optimizer stops with an overflow error)."""
    if lr > 1:
        raise SystemExit(f"{flag} must be at most 1, not {lr}")


SEEDS = 2 ** 32  # numpy's range; the seeds drawn from --seed (seed * 1_000_003 + epoch, ...) stay within torch's


def check_seed(seed, flag="--seed"):
    if not 0 <= seed < SEEDS:
        raise SystemExit(f"{flag} must be from 0 to {SEEDS - 1}, not {seed}")


# ----------------------------------------------------------------------------------------------------------------
# Devices and ranks

# --precision: the autocast dtype of the model (T5.amp_dtype), fp32 unless asked (A20).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Runtime(NamedTuple):
    """Where a process computes: its device, the autocast dtype (None = fp32), and its place among the ranks."""
    device: torch.device
    amp: torch.dtype | None
    rank: int
    world_size: int


def setup_device(precision="fp32", seed=0):
    """This process's Runtime. torchrun sets LOCAL_RANK; a plain `python` run is rank 0 of 1."""
    if precision not in PRECISIONS:
        raise SystemExit(f"--precision {precision}: expected one of {', '.join(PRECISIONS)}")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if "LOCAL_RANK" in os.environ and not dist.is_initialized():
        # Long timeout: rank 0 alone asks the teacher (tailored.py) or writes while the others wait at a barrier.
        # device_id binds NCCL to this rank's GPU from the start, so its barriers never guess the device.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=12),
                                device_id=device if device.type == "cuda" else None)
    torch.manual_seed(seed)  # dropout masks; a model from scratch is seeded again in student()
    return Runtime(device, PRECISIONS[precision], rank(), world_size())


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier():
    """Every rank waits here, so that what rank 0 has written is there for all of them to read."""
    if dist.is_initialized():
        dist.barrier()


def sharded(items, work, desc=None):
    """[work(item) for item in items] on every rank, each rank computing every world_size-th item and the results
    gathered back in item order: an item's result is the one a single process computes (same batch, same seed)."""
    ranks, here = world_size(), rank()
    mine = [work(item) for item in tqdm(items[here::ranks], desc=desc, leave=False, disable=desc is None or here != 0)]
    if ranks == 1:
        return mine
    gathered = [None] * ranks
    dist.all_gather_object(gathered, mine)
    return [gathered[i % ranks][i // ranks] for i in range(len(items))]


def chunks(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def say(text):
    """Print on rank 0 alone."""
    if rank() == 0:
        print(text)


# ----------------------------------------------------------------------------------------------------------------
# Run folders

def read_run_config(run_dir):
    """The settings a run directory was trained with (its config.json); DataError if it is not readable as one."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise data.DataError(f"{run_dir}: no config.json; pass a run directory made by tinythinker.py or tailored.py")
    try:
        with open(path, "rb") as f:
            cfg = read_json(f.read())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting
        raise data.DataError(f"{path}: not a run config ({e})") from None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), str) for k in ("data", "data_dir", "stages")):
        raise data.DataError(f"{path}: not a run config (no data, data_dir or stages)")
    if not (isinstance(cfg.get("max_new_tokens"), int) and cfg["max_new_tokens"] >= 1):
        raise data.DataError(f"{path}: max_new_tokens must be a count of at least 1, not {cfg.get('max_new_tokens')!r}")
    return cfg


def write_run_config(cfg, run_dir, runtime, decisions, leave_out=(), **extra):
    """config.json: the resolved settings but those in `leave_out` (settings the run does not use), the library
    versions and the method's recorded decisions (rank 0)."""
    if runtime.rank != 0:
        return
    env = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
               platform=platform.platform(), devices=runtime.world_size,
               cuda=torch.cuda.get_device_name() if torch.cuda.is_available() else None)
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in leave_out}
    config = {**settings, **extra, "env": env, "decisions": decisions}
    atomic_write(os.path.join(run_dir, "config.json"), json.dumps(config, indent=1).encode())


def check_resume(cfg, run_dir, free, **extra):
    """A started run continues only with --resume and on the settings it started with (its config.json): another
    batch size, seed or learning rate would silently follow a different schedule. `free` moves no step."""
    if not cfg.resume:
        raise SystemExit(f"{run_dir} holds a started run: pass --resume to continue it, or --out for a new one")
    saved, now = read_run_config(run_dir), {**dataclasses.asdict(cfg), **extra}
    changed = [f"--{k.replace('_', '-')} {now[k]} (the run has {saved[k]})" for k in now
               if k in saved and k not in free and now[k] != saved[k]]
    if changed:
        raise SystemExit(f"{run_dir}: cannot resume with other settings: {', '.join(changed)}")


def hold_run(run_dir):
    """Rank 0 makes the run folder and holds it (`hold`, in run_dir/run.lock) until release_run, or the end of the
    process if that comes first: a second process on it (a phase of either method, an evaluation) stops at once,
    naming this one."""
    if rank() == 0:
        os.makedirs(run_dir, exist_ok=True)
        hold(os.path.join(run_dir, "run.lock"), run_dir)


def release_run(run_dir):
    """The end of a phase or an evaluation: another process may use the folder (the next phase, say)."""
    if rank() == 0:
        release(os.path.join(run_dir, "run.lock"))


def start_run(cfg, run_dir, started, free, **compared):
    """Whether the run in run_dir has started (its file `started` exists): a started one continues only as
    check_resume allows; for a new one the folder is made, and its config.json is the caller's to write."""
    if os.path.isfile(os.path.join(run_dir, started)):
        check_resume(cfg, run_dir, free, **compared)
        return True
    os.makedirs(run_dir, exist_ok=True)
    return False


def done(folder):
    """The result a finished part of a run (a reflect iteration, a Tailored round) recorded in folder/done.json, or
    None: a resumed run skips what is done."""
    path = os.path.join(folder, "done.json")
    return data.read_jsonl(path)[0] if os.path.isfile(path) else None


def finish(folder, result):
    """Record a part's result in folder/done.json, there for every rank to read once this returns it."""
    if rank() == 0:
        data.write_jsonl(os.path.join(folder, "done.json"), [result])
    barrier()
    return result


def copy_best(source, best_dir):
    """Copy the chosen model folder to best_dir by way of best_dir.tmp, so that a kill leaves the old copy or the
    new one."""
    if rank() == 0:
        shutil.rmtree(best_dir + ".tmp", ignore_errors=True)
        shutil.copytree(source, best_dir + ".tmp")
        shutil.rmtree(best_dir, ignore_errors=True)
        os.replace(best_dir + ".tmp", best_dir)


# ----------------------------------------------------------------------------------------------------------------
# The command

# What each command says first on the embedded world: what it does, and the command of a real run.
DEMO = {
    "acquire": "acquiring on the embedded world with a T5 from scratch; a real run: "
               "python teacher.py --data csqa --split train && python tinythinker.py --phase acquire --data csqa",
    "reflect": "self-reflection on the embedded world; a real run: python tinythinker.py --phase reflect "
               "--from runs/csqa",
    "tailored": "Tailored Learning on the embedded world with a T5 from scratch; a real run: "
                "python tailored.py --data csqa",
    "evaluate": "evaluating on the embedded world's held-out questions; for a real run: "
                "python evaluate.py runs/csqa --split test",
}


def demo(name, on_the_world):
    """The line a command prints first when it runs on the embedded world (rank 0)."""
    if on_the_world:
        say(f"demo: {DEMO[name]}")


def command(run, interrupted="interrupted; continue with --resume"):
    """A command's entry point: a file, folder or model it cannot use is one line naming it (DataError, LoadError,
    an OSError about a file: a full disk, a read-only folder); Ctrl-C exits 130."""
    try:
        run()
    except (data.DataError, LoadError) as e:
        raise SystemExit(str(e)) from None
    except OSError as e:
        if e.filename is None:  # not about a file: a bug to see whole
            raise
        raise SystemExit(f"{e.filename}: {e.strerror or e}") from None
    except KeyboardInterrupt:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(130)
    finally:
        for path in list(HELD):  # a command's locks end with it (as the kernel would end them with the process)
            release(path)
        if dist.is_initialized():
            dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------------
# The student and its questions

def questions(name, split, data_dir=None):
    """The questions of one split: the embedded world's, or a data set's (data.load: a known one or one's own)."""
    if name == "world":
        return getattr(world.make_world(), split)
    return data.load(name, split, data_dir)


def student(cfg, run_dir, texts, runtime):
    """The model and tokenizer to train, on this process's device in its precision: a public checkpoint, or
    ("scratch") a new T5 sized by world.MODEL and a tokenizer trained on `texts`, kept in the run directory so that a
    resumed run (and every rank) reuses it."""
    if cfg.model != "scratch":  # rank 0 downloads first; the others then read its cache
        if rank() > 0:
            barrier()
        model, tokenizer = load_pretrained(cfg.model)
        if rank() == 0:
            barrier()
    else:
        tokenizer_dir = os.path.join(run_dir, "tokenizer")
        if rank() == 0 and not os.path.isfile(os.path.join(tokenizer_dir, "spiece.model")):
            Tokenizer.train(texts, world.VOCAB_SIZE, tokenizer_dir)
        barrier()
        tokenizer = Tokenizer.from_pretrained(tokenizer_dir)
        torch.manual_seed(cfg.seed)
        model = T5(T5Config(vocab_size=tokenizer.vocab_size, **world.MODEL))
    model.to(runtime.device).amp_dtype = runtime.amp
    return model, tokenizer


def trained_model(path, runtime):
    """A saved model and its tokenizer, on this process's device in its precision."""
    model, tokenizer = load_pretrained(path, device=runtime.device)
    model.amp_dtype = runtime.amp
    return model, tokenizer
