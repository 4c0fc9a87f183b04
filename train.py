"""The loop both methods train with, minGPT's small Trainer: a plan of steps, the learning-rate schedule, AdamW, and
`fit`, which owns backward, loss scaling, clipping, DDP, checkpoints, resume and logging.

tinythinker.py and tailored.py each supply a plan of steps, the loss of a micro-batch and a validation.
"""
import contextlib
import json
import math
import os
import pickle
import random
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import cli
import data
from files import atomic_write, read_json


# ----------------------------------------------------------------------------------------------------------------
# The schedule: which examples each optimizer step trains on (METHOD 5.2)

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


class Step(NamedTuple):
    """One optimizer step of a plan: its number (from 0), the stage it trains and the indices of its examples (the
    step's whole batch, before fit deals it over ranks and micro-batches)."""
    number: int
    stage: str
    indices: list


class Plan:
    """plan[step] = Step(step, stage, example indices), computed from (seed, epoch, stage) alone (data.batch_order):
    a resumed run recomputes it and carries on at its step, so no data-loader state needs saving."""

    def __init__(self, sizes, batch, epochs, seed, quotas=None, max_steps=None, cycle=None):
        """sizes: {stage: number of examples}; batch: examples per step; quotas: batches per stage and cycle; cycle:
        the steps between validations (default: the batches of one cycle of the schedule)."""
        self.sizes, self.batch, self.seed = sizes, batch, seed
        batches = {s: -(-n // batch) for s, n in sizes.items()}
        epoch_order = stage_schedule(batches, quotas or batches)  # no quotas: one pass per stage in turn
        if max_steps:  # as many epochs as max_steps needs, the last one cut short
            epochs = -(-max_steps // len(epoch_order))
        self.steps = []
        for epoch in range(epochs):
            seen = dict.fromkeys(sizes, 0)
            for stage in epoch_order:
                self.steps.append((epoch, stage, seen[stage]))
                seen[stage] += 1
        self.steps = self.steps[:max_steps]
        self.cycle = cycle or sum(min((quotas or batches)[s], n) for s, n in batches.items())

    def __len__(self):
        return len(self.steps)

    def __getitem__(self, step):
        epoch, stage, b = self.steps[step]
        seed = self.seed * 10 + list(self.sizes).index(stage)  # each stage has its own shuffle
        return Step(step, stage, data.batch_order(self.sizes[stage], self.batch, seed, epoch)[b])


# ----------------------------------------------------------------------------------------------------------------
# The loop

class Loop(NamedTuple):
    """fit's settings, each method's built from its own: the peak learning rate, the share of the steps that warm
    up, the gradient-norm clip, the examples of a micro-batch (a rank's share of a step is cut into them) and the
    steps between validations."""
    lr: float
    warmup: float
    grad_clip: float
    micro_batch: int
    eval_every: int


def learning_rate(loop, step, total):
    """Linear warm-up over loop.warmup of the steps, then cosine decay to zero (METHOD 5.3, A3)."""
    warm = int(loop.warmup * total)
    if step < warm:
        return loop.lr * (step + 1) / warm
    return loop.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def adamw(model, lr):
    """AdamW without weight decay (METHOD 5.3), fused: every parameter's update in a few kernel launches on a GPU,
    one vectorised loop on the CPU; the unfused updates within float rounding (tests/test_train.py)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)


def rng_state(device):
    """This process's generators as tensors and plain data (numpy's key as a list): torch's CPU one, this rank's
    CUDA one, Python's and numpy's."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), cuda=torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                python=random.getstate(), numpy=(kind, key.tolist(), pos, has_gauss, gauss))


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    random.setstate(state["python"])
    kind, key, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), pos, has_gauss, gauss))


def rank_rng_states(runtime):
    """[rng_state of rank 0, of rank 1, ...], gathered on every rank: each rank draws its own dropout masks."""
    mine = rng_state(runtime.device)
    if not dist.is_initialized():
        return [mine]
    states = [None] * runtime.world_size
    dist.all_gather_object(states, mine)
    return states


def save_state(path, model, optimizer, scaler, rngs, step, best):
    """state.pt: tensors and plain data only, every rank's generators (rngs) in the one file with the weights, so
    that a kill never leaves them from different steps."""
    state = dict(model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), rng=rngs,
                 step=step, best=best)
    atomic_write(path, lambda f: torch.save(state, f))


def load_state(path, model, optimizer, scaler, runtime):
    """Restore state.pt (weights_only: a copied run folder runs no code) and this rank's generators; (step, best).
    Saved by N ranks and resumed on another number, rank r takes saved rank r mod N's generators (README, "Several
    GPUs"). Anything else in the file is one line naming it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        saved_ranks = len(state["rng"])
        set_rng_state(state["rng"][runtime.rank % saved_ranks], runtime.device)
        step, best = state["step"], state["best"]
    except Exception as e:  # truncated, garbage, another format, a pickle that would run code
        reason = "not tensors and plain data alone, so it was not unpickled" if isinstance(
            e, pickle.UnpicklingError) else f"{type(e).__name__}: {' '.join(str(e).split()).split('. ')[0][:200]}"
        raise data.DataError(f"{path}: not a training state this code can resume ({reason})") from None
    if saved_ranks != runtime.world_size and runtime.rank == 0:
        print(f"{path}: saved by {saved_ranks} processes, resumed on {runtime.world_size}: weights, optimizer and "
              f"step carry over; rank r continues the generators of saved rank r mod {saved_ranks}")
    return step, best


def backward(trained, scaler, step, step_loss, weight, micro_batch, runtime):
    """One step's gradient: the mean loss over the whole batch however it is split. The batch is dealt over the
    ranks, then cut into micro-batches; each piece's loss is weighted by its share weight(piece) / weight(batch)
    (target tokens or examples) and times world_size, as DDP averages over ranks. Gradients are all-reduced once,
    on the last micro-batch. A rank left without examples joins the all-reduce with one example at weight 0.
    Returns the batch's metrics (step_loss's, the same names on every rank), weighted alike."""
    world_size = runtime.world_size
    mine = step.indices[runtime.rank::world_size]
    pieces = cli.chunks(mine, micro_batch) or [step.indices[:1]]
    total = weight(step, step.indices)
    sums = {}
    for k, piece in enumerate(pieces):
        share = weight(step, piece) / total if mine else 0.0
        with trained.no_sync() if world_size > 1 and k < len(pieces) - 1 else contextlib.nullcontext():
            loss, metrics = step_loss(trained, step, piece)
            scaler.scale(loss * (share * world_size)).backward()
        for name, value in {"loss": loss.item(), **metrics}.items():
            sums[name] = sums.get(name, 0.0) + share * value
    if world_size > 1:
        values = torch.tensor([sums[name] for name in sorted(sums)], dtype=torch.float64, device=runtime.device)
        dist.all_reduce(values)
        sums = dict(zip(sorted(sums), values.tolist()))
    return sums


def log_lines_until(log_path, step):
    """The lines of log.jsonl up to `step` (those of the state a run resumes from), without a torn last line; a line
    that is not a log record is named."""
    with open(log_path, "rb") as f:
        lines = f.read().split(b"\n")[:-1]  # the piece after the last newline is torn or empty
    kept = []
    for number, line in enumerate(lines, 1):
        try:
            text = line.decode("utf-8")
            record_step = read_json(text)["step"]
            if not isinstance(record_step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):  # UnicodeDecodeError is a ValueError
            raise data.DataError(f"{log_path}:{number}: not a log record; remove the line to resume") from None
        if record_step <= step:
            kept.append(text + "\n")
    return kept


def append_line(path, line):
    """Append a line to a log, opened for it alone: never through a link (a copied run folder's log.jsonl could
    point at a file elsewhere), and a failure (a full disk) names the file."""
    try:
        with open(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a",
                  encoding="utf-8") as f:
            f.write(line + "\n")
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def fit(loop, run_dir, model, tokenizer, plan, *, step_loss, validate, runtime, desc, weight=None, dropout=True):
    """AdamW over `plan` (len(plan) steps, plan[i] a Step) with warm-up + cosine learning rate, clipping and, every
    loop.eval_every steps and at the end, a validation on every rank that keeps the best model in {run_dir}/best and
    {run_dir}/state.pt, from which a started run continues. `step_loss(trained, step, micro_batch)` is a
    micro-batch's (mean loss, {metric: float}), micro_batch a list of the step's indices, and `weight(step,
    micro_batch)` its share of the step's batch (default: its examples; target tokens for a token mean). Returns the
    best validation accuracy."""
    weight = weight or (lambda step, indices: len(indices))
    optimizer = adamw(model, loop.lr)
    # fp16 gradients underflow without loss scaling
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp == torch.float16)
    state_path, log_path = os.path.join(run_dir, "state.pt"), os.path.join(run_dir, "log.jsonl")
    lead = runtime.rank == 0
    start, best = 0, -1.0
    if os.path.isfile(state_path):  # whether a started run may continue is the command's to say (cli.start_run)
        start, best = load_state(state_path, model, optimizer, scaler, runtime)
        if lead and os.path.isfile(log_path):
            atomic_write(log_path, "".join(log_lines_until(log_path, start)).encode())
    cli.barrier()  # every rank has read the state before rank 0 may write the next one
    trained = DistributedDataParallel(model) if runtime.world_size > 1 else model
    if lead and not start:  # a fresh start drops the lines of a run killed before its first saved state
        atomic_write(log_path, b"")
    model.train(dropout)
    bar = tqdm(range(start, len(plan)), desc=desc, initial=start, total=len(plan), disable=not lead)
    for step in bar:
        lr = learning_rate(loop, step, len(plan))
        for group in optimizer.param_groups:
            group["lr"] = lr
        current = plan[step]
        metrics = backward(trained, scaler, current, step_loss, weight, loop.micro_batch, runtime)
        scaler.unscale_(optimizer)
        metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), loop.grad_clip).item()
        # fp16's scaler skips a step whose scaled gradients overflowed and tries a smaller scale; any other NaN or inf
        # would be trained into the weights
        if not (math.isfinite(metrics["loss"]) and (scaler.is_enabled() or math.isfinite(metrics["grad_norm"]))):
            raise SystemExit(f"{desc} step {step + 1}: loss {metrics['loss']}, gradient norm {metrics['grad_norm']}; "
                             "the run stops before this step changes the weights (state.pt and best/ hold the last "
                             "validation's); a lower --lr or --precision fp32 may help")
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if lead:
            append_line(log_path, json.dumps(dict(step=step + 1, lr=lr, stage=current.stage, **metrics)))
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", stage=current.stage)
        if (step + 1) % loop.eval_every == 0 or step + 1 == len(plan):
            if not torch.stack([p.isfinite().all() for p in model.parameters()]).all():  # never saved
                raise SystemExit(f"{desc} step {step + 1}: the weights hold NaN or inf; the run stops before saving "
                                 "them (state.pt and best/ hold the last validation's); a lower --lr may help")
            accuracy = validate(model)  # on every rank: its generation is sharded
            rngs = rank_rng_states(runtime)  # every rank's own generators, for rank 0 to save
            if accuracy > best:
                best = accuracy
                if lead:
                    model.save_pretrained(os.path.join(run_dir, "best"))
                    tokenizer.save_pretrained(os.path.join(run_dir, "best"))
            if lead:
                append_line(log_path, json.dumps(dict(step=step + 1, valid_accuracy=accuracy, best=best)))
                tqdm.write(f"{desc} step {step + 1}/{len(plan)}: loss {metrics['loss']:.4f}, "
                           f"validation accuracy {accuracy:.2f}% (best {best:.2f}%)")
                save_state(state_path, model, optimizer, scaler, rngs, step + 1, best)
            cli.barrier()
    return best
