"""Time this project's T5 (t5.py) against transformers' T5ForConditionalGeneration: same random weights, same inputs,
same device and precision, in one process.

    python bench.py                                            # everything, t5-small and t5-base shapes
    python bench.py --only train --sizes small --repeats 3     # one benchmark, one size
    python bench.py --sizes base --batch 8 --gen-batch 16      # smaller batches for a CPU run
    python bench.py --only train --sizes small --profile       # + torch.profiler top entries of each side
    python bench.py --only chain --sizes small --data-dir DIR    # three-stage chains on CSQA
    python bench.py --only chain --chain-samples 10 --data-dir DIR   # reflect's recall pass
    python bench.py --only chain --chain-samples 10 --chain-pass analyze --data-dir DIR
    python bench.py --only dpo --sizes small --data-dir DIR      # reflect's DPO step
    python bench.py --only project --data-dir DIR    # the whole method's wall time, projected
    python bench.py --only ranks --repeats 2   # one reflect iteration of runs/world on 1 and 2 processes
    python bench.py --only memory --sizes small --out bench.json --markdown BENCHMARKS.md   # into the repo's files

DIR holds the official files (DIR/csqa/original/*.jsonl, DIR/{csqa,obqa}/prompt/*_cot.json); without --data-dir the
repo's data/ does, the questions downloaded into it, the exemplars copied from the official repository's datasets/.

Method: transformers builds the model (its own random initialisation) and saves it; ours loads those files. Each
measurement runs a warm-up, then alternates ours / theirs (the order flipped every repeat, so load from other processes
hits both alike) and keeps the median. Peak memory is measured in a fresh process per implementation and benchmark.
Precision: fp32 on CPU; on CUDA fp32 weights under bf16 autocast on both sides, training eager and torch.compile'd.
Batches are padded like the method's: row lengths drawn between half and the full length; token counts include the
padding (transformers computes it, ours skips it). `chain` runs evaluate.run_chains on CSQA test questions with each
side's generate, outputs ending with the length spread of the official exemplars' rationales (EndAtRealLengths);
`dpo` runs reflect's step, dpo.concatenated_logprobs on CSQA analyze pairs, with each side's forward.
`project` times ours alone on CSQA-shaped work and scales it by the method's step and chain counts (METHOD_WORK).
Results are merged into the JSON at --out (runs/bench.json) and the results section of the Markdown at --markdown
(runs/BENCHMARKS.md) is rewritten from it, each table under the command that produced it as a user types it from a
clone, a path outside it replaced (typed_command); the projection and ranks have their own sections. The repository's
bench.json and BENCHMARKS.md change only when named: --out bench.json --markdown BENCHMARKS.md. Timings never go into
tests.
"""

import argparse
import json
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import T5ForConditionalGeneration

import data
import dpo
import evaluate
from files import atomic_write
from t5 import T5, Tokenizer

SIZES = {"small": dict(d_model=512, d_ff=2048, num_heads=8, num_layers=6),  # original T5 configs: relu, tied
         "base": dict(d_model=768, d_ff=3072, num_heads=12, num_layers=12)}
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]  # dense, by name
GOALS = {"train": {"cpu": ">= 1.2", "cuda": ">= 1.5"}, "generate": ">= 3", "memory": "<= 1", "chain": ">= 2",
         "dpo": "> 1"}
MARK_BEGIN, MARK_END = "<!-- results: written by bench.py from bench.json -->", "<!-- end of results -->"
PROJECTION_BEGIN = "<!-- projection: written by bench.py --only project -->"
PROJECTION_END = "<!-- end of projection -->"
# The method's work on CSQA (METHOD.md 5.2, 7.5): acquire = 73,120 steps of 64 (1,043 recall + 5,224 analyze +
# 1,045 summarize batches per epoch, 10 epochs) and ~104 greedy validations of 1,221 questions; reflect = 5 iterations
# of: 85,200 sampled chains (10 per training question, recall pass), at most as many again for the analyze pass
# (one chosen recall per question, 10 chains each; recall given), 2,730 DPO steps of 32 pairs (the official CSQA
# t5-base iteration-4 checkpoint-2730 = 10 evaluations x 273 steps), 273 reference forwards, 10 validations;
# test = 1,221 questions.
METHOD_WORK = dict(acquire_steps={"recall": 10430, "analyze": 52240, "summarize": 10450}, validations=104,
                   valid=1221, train=8520, samples=10, iterations=5, dpo_steps=2730, dpo_validations=10, test=1221)


def save_reference(size, directory):
    """transformers' model with its own random initialisation, saved to `directory`; both sides load these files."""
    config = transformers.T5Config(vocab_size=32128, d_kv=64, feed_forward_proj="relu", tie_word_embeddings=True,
                                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **SIZES[size])
    torch.manual_seed(0)
    T5ForConditionalGeneration(config).save_pretrained(directory)


def load(impl, directory, device):
    if impl == "ours":
        return T5.from_pretrained(directory, device=device)
    return T5ForConditionalGeneration.from_pretrained(directory).to(device)


def make_batch(batch, src, tgt, device, seed=0):
    """Random tokens, right-padded: input lengths in [src/2, src], target lengths in [tgt/2, tgt], row 0 full."""
    g = torch.Generator().manual_seed(seed)
    def lengths(n):
        return torch.cat([torch.tensor([n]), torch.randint(n // 2, n + 1, (batch - 1,), generator=g)])
    mask = (torch.arange(src) < lengths(src)[:, None]).long()
    input_ids = torch.randint(3, 32000, (batch, src), generator=g) * mask
    labels = torch.randint(3, 32000, (batch, tgt), generator=g)
    labels = labels.masked_fill(torch.arange(tgt) >= lengths(tgt)[:, None], -100)
    return {k: v.to(device) for k, v in dict(input_ids=input_ids, attention_mask=mask, labels=labels).items()}


def autocast(device):
    return torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")


def train_step(model, batch, device):
    """forward + backward + AdamW step; the same optimiser settings on both sides."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    def step():
        with autocast(device):
            out = model(**batch)
        loss = out[1] if isinstance(out, tuple) else out.loss  # ours: (logits, loss); theirs: Seq2SeqLMOutput
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def generate_call(model, impl, ids, mask, new_tokens, variant):
    """Exactly `new_tokens` greedy tokens per row on both sides, with the same arithmetic: neither side knows an end
    token (ours: eos_token_id -1, an id argmax never returns, so no row finishes; theirs: eos_token_id=None, so only
    the length stops it). No logits processor on either side; in fp32 the two must pick the same tokens. The compile
    variant: ours decodes through its compiled static step (T5.generate(compiled=True)), theirs through its static
    cache, which transformers' generate compiles by itself on CUDA."""
    model.eval()
    if impl == "ours":
        model.config.eos_token_id = -1
        model.amp_dtype = torch.bfloat16 if ids.device.type == "cuda" else None  # generate autocasts by itself
        return lambda: model.generate(ids, mask, max_new_tokens=new_tokens, compiled=variant == "compile")
    static = dict(cache_implementation="static") if variant == "compile" else {}
    def call():
        with autocast(ids.device):
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None,
                                  do_sample=False, **static)[:, 1:]  # drop the decoder start token, which ours omits
    return call


def race(calls, device, warmup, repeats):
    """Median seconds per call of each of calls {name: fn}, alternating names and flipping their order per repeat."""
    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    for _ in range(warmup):
        for fn in calls.values():
            fn()
    times = {name: [] for name in calls}
    for r in range(repeats):
        for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
            times[name].append(timed(calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}, times


def train_flops(size, batch, src, tgt, vocab=32128, d_kv=64):
    """FLOPs of one training step = 3 x forward (backward costs two forwards). Forward: 2 x (weights a token passes
    through) per token, plus 2 x 2 x inner x (query positions x key positions) per attention layer for q k^T and
    probs v (full square, as both sides compute it), where inner = heads x d_kv:
      encoder token: L (4 d inner + 2 d d_ff) + L (2 d inner)  [decoder cross-attention k, v of the encoder output]
      decoder token: L (6 d inner + 2 d d_ff) + d vocab        [self q k v o, cross q o, feed-forward, lm_head]
      attention:     4 inner (L src^2 + L tgt^2 + L tgt src)   per sequence
    so train FLOPs = 6 B (src enc + tgt dec) + 12 B inner (L src^2 + L tgt^2 + L tgt src)."""
    s = SIZES[size]
    d, f, L, inner = s["d_model"], s["d_ff"], s["num_layers"], s["num_heads"] * d_kv
    per_encoder_token = L * (4 * d * inner + 2 * d * f) + L * 2 * d * inner
    per_decoder_token = L * (6 * d * inner + 2 * d * f) + d * vocab
    attention = 4 * inner * L * (src * src + tgt * tgt + tgt * src)
    return 3 * batch * (2 * (src * per_encoder_token + tgt * per_decoder_token) + attention)


def peak_flops(gpu_name):
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in (gpu_name or "")), None)


def peak_memory_child(impl, bench, directory, args):
    """Run in a fresh process: load one implementation and print the peak memory (MiB) of a training step or a
    generate call in the steady state (after one warm-up call, which also creates AdamW's state). CPU: peak RSS
    (VmHWM, reset through /proc/self/clear_refs); CUDA: max allocated. One process per (implementation, benchmark), so
    no high-water mark or allocator cache is shared. Both sides' weights count: transformers maps the checkpoint file
    and its pages enter the RSS as they are read; ours copies it when loading."""
    device = torch.device(args.device)
    model = load(impl, directory, device)
    if bench == "train":
        batch = make_batch(args.batch, args.src, args.tgt, device)
        call = train_step(model, batch, device)
    else:
        gen = make_batch(args.gen_batch, args.src, 1, device, seed=1)
        call = generate_call(model, impl, gen["input_ids"], gen["attention_mask"], args.new_tokens, "eager")
    call()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        call()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        Path("/proc/self/clear_refs").write_text("5")
        call()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024
    print(json.dumps(peak))


def peak_memory(directory, bench, args):
    """{impl: peak MiB} of `bench` ("train" or "generate"), each measured by peak_memory_child in its own process."""
    command = [sys.executable, __file__, "--memory-child", directory, "--device", args.device,
               *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                 ("batch", "src", "tgt", "gen_batch", "new_tokens", "threads")]]
    return {impl: json.loads(subprocess.run(command + [f"--impl={impl}", f"--only={bench}"], check=True,
                                            capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for impl in ("ours", "theirs")}


def profile(calls, device, rows=12):
    """torch.profiler's top operators by self time for one call of each of calls {name: fn} (after a warm-up)."""
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, fn in calls.items():
        fn()
        with torch.profiler.profile() as prof:
            fn()
        print(f"\n--- profile: {name} ---\n{prof.key_averages().table(sort_by=sort, row_limit=rows)}")


def bench_size(size, args, device, variants):
    """Rows {size, bench, variant, shape, ours, theirs, unit, ...} for one model shape."""
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        save_reference(size, directory)
        if "memory" in args.only:  # first, while this process holds no model
            for bench in ("train", "generate"):
                peaks = peak_memory(directory, bench, args)
                shape = (f"{args.batch} x ({args.src} + {args.tgt})" if bench == "train" else
                         f"{args.gen_batch} x {args.new_tokens} new (input {args.src})")
                rows.append(dict(size=size, bench="memory", variant=bench, unit="peak MiB", shape=shape,
                                 ours=peaks["ours"], theirs=peaks["theirs"]))
        if "chain" in args.only:
            rows += bench_chain(size, args, directory)
        if "dpo" in args.only:
            rows += bench_dpo(size, args, directory)
        if not {"generate", "train"} & set(args.only):
            return rows
        models = {impl: load(impl, directory, device) for impl in ("ours", "theirs")}
        for gen_batch in args.gen_batches if "generate" in args.only else []:  # before training moves the weights
            gen = make_batch(gen_batch, args.src, 1, device, seed=1)
            for variant in variants:
                calls = {impl: generate_call(m, impl, gen["input_ids"], gen["attention_mask"], args.new_tokens,
                                             variant) for impl, m in models.items()}
                outputs = {impl: call() for impl, call in calls.items()}  # and each side's compilation
                assert all(o.shape == (gen_batch, args.new_tokens) for o in outputs.values())
                same = (outputs["ours"] == outputs["theirs"]).float().mean().item()
                seconds, times = race(calls, device, args.warmup, args.repeats)
                new_tokens = gen_batch * args.new_tokens
                rows.append(dict(size=size, bench="generate", variant=variant, unit="new tokens/s",
                                 shape=f"{gen_batch} x {args.new_tokens} new (input {args.src})",
                                 ours=new_tokens / seconds["ours"], theirs=new_tokens / seconds["theirs"],
                                 same_tokens=same, seconds=times))
                if args.profile:
                    profile(calls, device)
        if "train" in args.only:
            batch = make_batch(args.batch, args.src, args.tgt, device)
            flops = train_flops(size, args.batch, args.src, args.tgt)
            losses = {}
            for impl, m in models.items():  # dropout off, so the two losses must agree
                m.eval()
                with autocast(device):
                    out = m(**batch)
                losses[impl] = (out[1] if isinstance(out, tuple) else out.loss).item()
            for variant in variants:
                compiled = {k: torch.compile(m) if variant == "compile" else m for k, m in models.items()}
                calls = {impl: train_step(m, batch, device) for impl, m in compiled.items()}
                seconds, times = race(calls, device, args.warmup, args.repeats)
                tokens = args.batch * (args.src + args.tgt)
                rows.append(dict(size=size, bench="train", variant=variant, unit="tokens/s",
                                 shape=f"{args.batch} x ({args.src} + {args.tgt})",
                                 loss_diff=abs(losses["ours"] - losses["theirs"]),
                                 ours=tokens / seconds["ours"], theirs=tokens / seconds["theirs"],
                                 ours_tflops=flops / seconds["ours"] / 1e12,
                                 theirs_tflops=flops / seconds["theirs"] / 1e12, seconds=times))
                if args.profile and variant == "eager":
                    profile(calls, device)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# CSQA-shaped work: a tokenizer of CSQA's words, the official exemplars' texts as what the teacher would write

def csqa_tokenizer(train, directory):
    """A BPE vocabulary of 8,000 pieces trained on the CSQA training prompts (T5's own sentencepiece model is not
    downloaded here); lengths are in its tokens, which split a word about as often as T5's."""
    summarize = [data.summarize_input(q, "Recall.", {x: "analysis." for x in "ABCDE"}) for q in train[:100]]
    return Tokenizer.train([data.recall_input(q) for q in train] + summarize, 8000, Path(directory) / "tokenizer")


def official_exemplars(data_dir):
    """The official few-shot exemplars of CSQA and OBQA (prompt/*_cot.json), in that order."""
    exemplars = []
    for name in ("csqa", "obqa"):
        path = Path(data_dir or data.DEFAULT_DIR) / name / "prompt" / f"{name}_cot.json"
        if not path.exists():
            raise SystemExit(f"{path}: the official few-shot exemplars are needed (chain, dpo and project); copy "
                             "them from the official repository (shengminp/TinyThinker, datasets/) or pass --data-dir")
        exemplars += json.loads(path.read_text())
    return exemplars


def dpo_batch(tokenizer, questions, exemplars, rng):
    """A reflect batch (collate_pairs) of 32 analyze pairs: real CSQA prompts under an exemplar's Key Information, the
    chosen and rejected completions two exemplar explanations, so their lengths (and the padding) are real ones."""
    pairs = [dict(prompt=data.analyze_input(q, data.with_period(rng.choice(exemplars)["Key Information"]), "A"),
                  chosen=rng.choice(rng.choice(exemplars)["Explanations"]),
                  rejected=rng.choice(rng.choice(exemplars)["Explanations"])) for q in rng.sample(questions, 32)]
    return dpo.collate_pairs(dpo.tokenize_pairs(pairs, tokenizer))


@torch.no_grad()
def reference_logprobs(model, batch):
    """(log pi_ref(chosen), log pi_ref(rejected)) of the model as it is, in eval mode: reflect's reference is the
    policy it starts from, so its first steps see margins near 0. A fixed reference far from the policy (zeros, say)
    saturates the sigmoid, and the rejected rows' gradients, ~1e-11 of normal, go denormal in the backward, which is
    slow on a CPU: with a zero reference, `python bench.py --only project --sizes small` measured a DPO step of
    39.8 s on a 2-core Xeon, one thread; with this one, 15.8 s."""
    return dpo.concatenated_logprobs(model.eval(), *batch)[:2]


class TheirsForDPO(torch.nn.Module):
    """transformers' model behind T5.forward's labelled-positions signature, so dpo.concatenated_logprobs drives it
    unchanged: it computes logits at every position of the padded targets (as TRL does) and the labelled ones are
    picked afterwards."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        return out.logits[labels != -100], out.loss


def bench_dpo(size, args, directory):
    """Rows for `dpo`: pairs/s of reflect's step (concatenated log-probs of 32 analyze pairs, DPO + NLL loss against
    the starting model as reference, backward, AdamW step; dropout off, as reflect trains), ours against
    transformers."""
    train = data.load("csqa", "train", args.data_dir)
    batch = dpo_batch(csqa_tokenizer(train, directory), train, official_exemplars(args.data_dir), random.Random(0))
    labels, pairs = batch[2], len(batch[2]) // 2
    models = {"ours": T5.from_pretrained(directory), "theirs": TheirsForDPO(
        T5ForConditionalGeneration.from_pretrained(directory))}
    logprobs = {impl: reference_logprobs(m, batch) for impl, m in models.items()}
    def step(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        def call():
            chosen, rejected, nll = dpo.concatenated_logprobs(model, *batch)
            dpo.dpo_loss(chosen, rejected, *logprobs["ours"], nll)[0].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return call
    seconds, times = race({impl: step(m) for impl, m in models.items()}, torch.device("cpu"), args.warmup,
                          args.repeats)
    diff = max((a - b).abs().max().item() for a, b in zip(logprobs["ours"], logprobs["theirs"]))
    return [dict(size=size, bench="dpo", variant="eager", unit="pairs/s",
                 shape=f"{pairs} CSQA analyze pairs, targets {int((labels != -100).sum(1).min())}-{labels.shape[1]} "
                       f"tokens ({(labels == -100).float().mean():.0%} padding)",
                 ours=pairs / seconds["ours"], theirs=pairs / seconds["theirs"], logprob_diff=diff, seconds=times)]


# --------------------------------------------------------------------------------------------------------------------
# chain: evaluate.run_chains on CSQA questions, our generate against transformers' generate, with real output lengths

STAGE_OF_PROMPT = {"Recall:": "recall", "Summarize:": "summarize"}  # otherwise "...Analyze: For option X,"


def exemplar_lengths(data_dir, tokenizer):
    """{stage: token lengths (</s> included)} of the official few-shot targets of CSQA and OBQA (prompt/*_cot.json):
    recall = Key Information, analyze = each option's explanation, summarize = "So the answer is option X."."""
    lengths = {"recall": [], "analyze": [], "summarize": []}
    for ex in official_exemplars(data_dir):
        lengths["recall"].append(len(tokenizer.encode(ex["Key Information"])))
        lengths["analyze"] += [len(tokenizer.encode(e)) for e in ex["Explanations"]]
        lengths["summarize"] += [len(tokenizer.encode(data.summary_target(letter))) for letter in "ABCDE"]
    return lengths


def hazards(lengths, steps):
    """P(a row ends at step t | it is still running) for lengths spread like `lengths`: a Gaussian kernel of width
    15% around each exemplar's length, cut at `steps` (the last step ends every row)."""
    t = torch.arange(1, steps + 1, dtype=torch.float64)
    x = torch.tensor(lengths, dtype=torch.float64)[:, None]
    p = torch.exp(-0.5 * ((t - x) / (0.15 * x)) ** 2).sum(0)
    p /= p.sum()
    survive = p.flip(0).cumsum(0).flip(0)  # P(length >= t)
    return (p / survive).clamp(max=1).float().index_fill(0, torch.tensor(steps - 1), 1.0)


class EndAtRealLengths(torch.nn.Module):
    """lm_head whose </s> logit is forced up or down at each step so rows end with the hazards of the current stage.
    A row ends at step t when u < hazard[t], where u = |frac(300 r_t.h/|h|)| for a fixed random unit vector r_t per
    step: close to uniform and nearly independent across rows and steps (r_t.h/|h| varies by far more than 1/300,
    even where a random model repeats one hidden state), a function of the row's own hidden state (so the same on
    both sides, whatever the batch holds), and continuous in it, so the ~1e-7 fp32 differences between the two
    implementations flip it about once in 10^5 steps. The step is counted in calls (both sides call lm_head once
    per step); the stage is read from the prompt when generate starts. Pad, unk and the ids past the tokenizer's
    pieces are never chosen: decode drops them, and a random model picks them nearly always (a recall decoded to
    "", the next stage's prompts far shorter than a real chain's), so each output decodes to text of its drawn
    length and the next stage's prompts are as long as a real chain's."""

    def __init__(self, head, stage_hazards, eos, pieces, seed=0):
        super().__init__()
        self.head, self.hazards, self.eos, self.pieces = head, stage_hazards, eos, pieces
        steps = len(next(iter(stage_hazards.values())))
        r = torch.randn(steps, head.weight.shape[1], generator=torch.Generator().manual_seed(seed))
        self.register_buffer("r", r / r.norm(dim=1, keepdim=True))
        self.stage, self.step = None, 0

    @property
    def weight(self):
        return self.head.weight

    def forward(self, h):
        logits = self.head(h)
        logits[..., :3] = logits[..., self.pieces:] = -1e4  # pad, eos (set below), unk, and past the pieces
        u = torch.frac(300 * (h.float() @ self.r[self.step]) / h.float().norm(dim=-1)).abs()
        end = u < self.hazards[self.stage][self.step].to(h.device)
        logits[..., self.eos] = torch.where(end, 1e4, -1e4).to(logits.dtype)
        self.step += 1
        return logits


class TheirsForChains(torch.nn.Module):
    """transformers' model behind our generate's signature, so evaluate.run_chains can drive it unchanged."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def generate(self, input_ids, attention_mask, max_new_tokens, do_sample=False, temperature=1.0, top_k=0,
                 generator=None):  # transformers takes no generator: its samples come from torch's global one
        return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=1.0)[:, 1:]


def chain_setup(model, tokenizer, stage_hazards, log):
    """Install EndAtRealLengths on `model` (ours or TheirsForChains) and wrap its generate to set the stage from the
    prompt, and to log {stage, seconds, encoder (seconds inside the encoder stack), rows, lengths (of the outputs)}
    of every call into `log`."""
    inner = model.model if isinstance(model, TheirsForChains) else model
    head = inner.lm_head = EndAtRealLengths(inner.lm_head, stage_hazards, tokenizer.sp.eos_id(), tokenizer.spm_size)
    generate = model.generate
    encoder = []  # perf_counter at each entry and exit of the encoder stack (ours enters it once per chunk)
    inner.encoder.register_forward_pre_hook(lambda *_: encoder.append(-time.perf_counter()))
    inner.encoder.register_forward_hook(lambda *_: encoder.append(time.perf_counter()))

    def logged(input_ids, attention_mask, **kwargs):
        head.stage = next((v for k, v in STAGE_OF_PROMPT.items() if tokenizer.decode(input_ids[0]).endswith(k)),
                          "analyze")
        head.step = 0
        encoder.clear()
        start = time.perf_counter()
        out = generate(input_ids, attention_mask, **kwargs)
        seconds = time.perf_counter() - start
        ended = (out == head.eos).int()
        lengths = torch.where(ended.any(1), ended.argmax(1) + 1, out.shape[1])
        log.append(dict(stage=head.stage, seconds=seconds, encoder=sum(encoder), rows=len(out),
                        lengths=lengths.tolist()))
        return out
    model.generate = logged


def bench_chain(size, args, directory):
    """Rows for `chain`: questions/s of evaluate.run_chains (greedy, recall -> analyze -> summarize) on the first
    --chain-questions CSQA test questions at --chain-batch, ours against transformers, and the ideal gain."""
    questions = data.load("csqa", "test", args.data_dir)[:args.chain_questions]
    tokenizer = csqa_tokenizer(data.load("csqa", "train", args.data_dir), directory)
    lengths = exemplar_lengths(args.data_dir, tokenizer)
    stage_hazards = {stage: hazards(v, args.chain_max_new_tokens) for stage, v in lengths.items()}
    logs = {"ours": [], "theirs": []}
    models = {"ours": T5.from_pretrained(directory),
              "theirs": TheirsForChains(T5ForConditionalGeneration.from_pretrained(directory).eval())}
    for impl, model in models.items():
        chain_setup(model, tokenizer, stage_hazards, logs[impl])
    # --chain-samples N: one of reflect's sampling passes instead (METHOD 7.1), every question N times; chains then
    # differ between the two sides by their draws. Recall pass: recall sampled at the method's temperature, analyze
    # and summarize greedy. Analyze pass: each question's recall fixed (an official exemplar's Key Information, as
    # reflect fixes a chosen one), analyses sampled, summarize greedy.
    repeated = [q for q in questions for _ in range(args.chain_samples)]
    temperature = 0.7 if args.chain_samples > 1 else 0.0
    rng, exemplars = random.Random(0), official_exemplars(args.data_dir)
    recalls = [data.with_period(rng.choice(exemplars)["Key Information"]) for _ in questions]
    passes = dict(recall=dict(recall_temperature=temperature),
                  analyze=dict(recalls=[r for r in recalls for _ in range(args.chain_samples)],
                               analyze_temperature=temperature))
    def run(impl):
        return evaluate.run_chains(models[impl], tokenizer, repeated, batch_size=args.chain_batch,
                                   max_new_tokens=args.chain_max_new_tokens, **passes[args.chain_pass])
    chains = {}
    def timed(impl):  # no warm-up: nothing is compiled or cached, and one chain takes minutes
        chains[impl] = run(impl)
    seconds, times = race({impl: lambda impl=impl: timed(impl) for impl in models}, torch.device("cpu"), 0,
                          args.repeats)
    same = sum(a == b for a, b in zip(chains["ours"], chains["theirs"])) / len(repeated)
    def gains(calls):
        """The ideal gain of these calls (theirs), the measured one, and the measured one of decoding alone."""
        total = {impl: sum(c["seconds"] for c in cs) for impl, cs in calls.items()}
        encoder = {impl: sum(c["encoder"] for c in cs) for impl, cs in calls.items()}
        decode = {impl: total[impl] - encoder[impl] for impl in calls}
        ideal = sum(c["rows"] * max(c["lengths"]) for c in calls["theirs"]) / \
            sum(sum(c["lengths"]) for c in calls["theirs"])
        return dict(ideal=ideal, gain=total["theirs"] / total["ours"], decode_gain=decode["theirs"] / decode["ours"],
                    encoder_share=encoder["ours"] / total["ours"], encoder_gain=encoder["theirs"] / encoder["ours"])
    per_stage = {}
    for stage in ("recall", "analyze", "summarize"):
        calls = {impl: [c for c in log if c["stage"] == stage] for impl, log in logs.items()}
        if not calls["ours"]:  # the analyze pass's recalls are given
            continue
        drawn = [x for c in calls["ours"] for x in c["lengths"]]
        per_stage[stage] = dict(gains(calls), mean_length=statistics.mean(drawn), max_length=max(drawn),
                                exemplar_mean=statistics.mean(lengths[stage]))
    overall = gains(logs)
    samples = f" x {args.chain_samples} samples ({args.chain_pass} T 0.7)" if args.chain_samples > 1 else ""
    shape = f"{len(questions)} CSQA questions{samples}, batch {args.chain_batch}, <= {args.chain_max_new_tokens} new"
    variant = "greedy" if args.chain_samples == 1 else f"reflect {args.chain_pass} pass"
    return [dict(size=size, bench="chain", variant=variant,
                 unit="questions/s" if args.chain_samples == 1 else "chains/s", shape=shape,
                 ours=len(repeated) / seconds["ours"], theirs=len(repeated) / seconds["theirs"],
                 **{k: overall[k] for k in ("ideal", "decode_gain", "encoder_share", "encoder_gain")},
                 same_chains=same, stages=per_stage, seconds=times)]


# --------------------------------------------------------------------------------------------------------------------
# project: the whole method's wall time on CSQA from measured rates of ours (teacher excluded)

def method_batches(tokenizer, questions, exemplars, rng):
    """{stage: (input_ids, attention_mask, labels)}: one acquire batch of 64 per stage, real CSQA questions with the
    official exemplars' recalls and analyses as the texts the teacher would have written."""
    recalls = [ex["Key Information"] for ex in exemplars]
    analyses = [e for ex in exemplars for e in ex["Explanations"]]
    pick = lambda texts: data.with_period(rng.choice(texts))  # noqa: E731
    examples = {"recall": [], "analyze": [], "summarize": []}
    for q in rng.sample(questions, 64):
        recall, letter = pick(recalls), rng.choice(data.LETTERS)
        examples["recall"].append((data.recall_input(q), recall))
        examples["analyze"].append((data.analyze_input(q, recall, letter), pick(analyses)))
        examples["summarize"].append((data.summarize_input(q, recall, {x: pick(analyses) for x in data.LETTERS}),
                                      data.summary_target(q.answer)))
    return {stage: data.collate([(tokenizer.encode(x), tokenizer.encode(y)) for x, y in ex])
            for stage, ex in examples.items()}


def project(size, args, directory):
    """Measure ours on CSQA-shaped work (acquire steps per stage, a DPO step, greedy chains at batch 256 with real
    output lengths) and scale by METHOD_WORK. Returns (rates, hours by phase)."""
    rng = random.Random(0)
    train = data.load("csqa", "train", args.data_dir)
    exemplars = official_exemplars(args.data_dir)
    tokenizer = csqa_tokenizer(train, directory)
    model = T5.from_pretrained(directory)
    def seconds(fn, warmup=1):
        return race({"ours": fn}, torch.device("cpu"), warmup, args.repeats)[0]["ours"]
    rates = {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for stage, batch in method_batches(tokenizer, train, exemplars, rng).items():
        def step(batch=batch):  # 64 rows as 4 accumulated micro-batches of 16 (t5-base at 64 needs over 15 GB)
            model.train()
            for i in range(0, 64, 16):
                model(batch[0][i:i + 16], batch[1][i:i + 16], labels=batch[2][i:i + 16])[1].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        rates[f"acquire {stage} step"] = seconds(step)
    batch = dpo_batch(tokenizer, train, exemplars, rng)
    reference = reference_logprobs(model, batch)
    def dpo_step():
        model.eval()  # dropout off, as reflect trains
        chosen, rejected, nll = dpo.concatenated_logprobs(model, *batch)
        dpo.dpo_loss(chosen, rejected, *reference, nll)[0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    rates["DPO step"] = seconds(dpo_step)
    questions = data.load("csqa", "test", args.data_dir)[:args.chain_questions]
    stage_hazards = {k: hazards(v, args.chain_max_new_tokens) for k, v in exemplar_lengths(args.data_dir,
                                                                                             tokenizer).items()}
    chain_setup(model, tokenizer, stage_hazards, [])
    rates["chain question"] = seconds(lambda: evaluate.run_chains(
        model, tokenizer, questions, batch_size=args.chain_batch, max_new_tokens=args.chain_max_new_tokens),
        warmup=0) / len(questions)
    w = METHOD_WORK
    hours = {"acquire: training": sum(n * rates[f"acquire {s} step"] for s, n in w["acquire_steps"].items()) / 3600,
             "acquire: validation": w["validations"] * w["valid"] * rates["chain question"] / 3600,
             "reflect: sampling": w["iterations"] * 2 * w["train"] * w["samples"] * rates["chain question"] / 3600,
             # + one reference forward per 10 steps (273 per iteration), a third of a step each
             "reflect: DPO training": w["iterations"] * w["dpo_steps"] * (1 + 1 / 30) * rates["DPO step"] / 3600,
             "reflect: validation": w["iterations"] * w["dpo_validations"] * w["valid"] * rates["chain question"]
             / 3600,
             "test evaluation": w["test"] * rates["chain question"] / 3600}
    return rates, hours


def save_projection(run, out, markdown):
    """Merge this projection run into the JSON at `out` (replacing older ones of the same sizes on the same machine)
    and rewrite BENCHMARKS.md's projection section: per run, its command, the measured rates and the hours by phase."""
    key = lambda run: (run["machine"]["cpu"], run["machine"]["threads"])  # noqa: E731
    saved = json.loads(Path(out).read_text()) if Path(out).exists() else {"runs": []}
    sizes = {size for size, _ in run["rates"]}
    runs = [r for r in saved.get("projections", []) if key(r) != key(run) or not sizes & {s for s, _ in r["rates"]}]
    saved["projections"] = runs = runs + [run]
    atomic_write(out, json.dumps(saved, indent=1).encode())
    out = [PROJECTION_BEGIN]
    for run in runs:
        m = run["machine"]
        out += ["", f"`{run['command']}`", "", f"{m['cpu']} ({m['cpu_count']} cores, {m['threads']} torch threads), "
                f"torch {m['torch']}, fp32, load average {m['load_before'][0]:.2f} before / "
                f"{m['load_after'][0]:.2f} after, {run['date']}", "",
                "| size | " + " | ".join(run["rates"][0][1]) + " |", "|---|" + "---|" * len(run["rates"][0][1])]
        out += [f"| {size} | " + " | ".join(f"{v:.2f} s" for v in rates.values()) + " |"
                for size, rates in run["rates"]]
        phases = list(run["hours"][0][1])
        out += ["", "| size | " + " | ".join(phases) + " | total |", "|---|" + "---|" * (len(phases) + 1)]
        out += [f"| {size} | " + " | ".join(f"{h:,.0f} h" for h in hours.values()) +
                f" | **{sum(hours.values()):,.0f} h = {sum(hours.values()) / 24:,.1f} days** |"
                for size, hours in run["hours"]]
    text = Path(markdown).read_text() if Path(markdown).exists() else "# Benchmarks\n"
    if PROJECTION_BEGIN not in text:
        text += f"\n{PROJECTION_BEGIN}\n{PROJECTION_END}\n"
    head, rest = text.split(PROJECTION_BEGIN, 1)
    text = head + "\n".join(out + ["", PROJECTION_END]) + rest.split(PROJECTION_END, 1)[1]
    atomic_write(markdown, text.encode())


def machine(device):
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"device": device.type, "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "dtype": "bf16 autocast (fp32 weights)" if device.type == "cuda" else "fp32",
            "theirs_attention": T5ForConditionalGeneration(transformers.T5Config(
                vocab_size=8, d_model=8, d_ff=8, d_kv=2, num_layers=1, num_heads=1, decoder_start_token_id=0
            )).config._attn_implementation,  # the attention transformers picks by default
            "load_before": os.getloadavg()}


def render(runs):
    """Markdown: per run, its command, machine line and table of figures."""
    out = [MARK_BEGIN]
    for run in runs:
        m = run["machine"]
        out += ["", f"`{run['command']}`", "",
                f"{m['gpu'] or m['cpu']} ({m['cpu_count']} cores, {m['threads']} torch threads), torch {m['torch']}, "
                f"transformers {m['transformers']} (attention: {m['theirs_attention']}), {m['dtype']}, "
                f"load average {m['load_before'][0]:.2f} before / {m['load_after'][0]:.2f} after, {run['date']}, "
                f"{run['seconds']:.0f} s", "",
                "| size | benchmark | shape | ours | transformers | ours / transformers | goal | notes |",
                "|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            goal = GOALS[r["bench"]]
            goal = goal[m["device"]] if isinstance(goal, dict) else goal
            notes = []
            if "same_tokens" in r:
                notes.append(f"{r['same_tokens']:.1%} of tokens identical")
            # the eager row of the same GPU and shape, from any run: gpu_check.sh times compiled rows on their own
            eager = [e for other in runs if other["machine"]["gpu"] == m["gpu"] for e in other["rows"]
                     if r["variant"] == "compile" and e["variant"] == "eager" and
                     (e["size"], e["bench"], e["shape"]) == (r["size"], r["bench"], r["shape"])]
            if eager:  # the issue's goal for compiled decoding is against transformers' default generate
                notes.append(f"against transformers' eager: {r['ours'] / eager[0]['theirs']:.2f}x")
            if "ideal" in r:
                share = r["ours"] / r["theirs"] / r["ideal"]
                same = f"{r['same_chains']:.0%} of chains identical" if r["variant"] == "greedy" else \
                    "sampled, so chains differ by their draws"
                decoding = (f"; decoding alone {r['decode_gain']:.2f}x ({r['decode_gain'] / r['ideal']:.0%} of the "
                            f"ideal), the encoder {r['encoder_share']:.0%} of ours" if "decode_gain" in r else "")
                decoding += f", {r['encoder_gain']:.2f}x as fast as theirs" if "encoder_gain" in r else ""
                notes.append(f"ideal gain {r['ideal']:.2f}x, measured {share:.0%} of it{decoding}; "
                             f"{same}; per stage, gain / ideal (output length "
                             "mean, max; exemplars' mean): " + ", ".join(
                                 f"{k} {v['gain']:.2f}x / {v['ideal']:.2f}x ({v['mean_length']:.0f}, "
                                 f"{v['max_length']}; {v['exemplar_mean']:.0f})" for k, v in r["stages"].items()))
            if "logprob_diff" in r:
                notes.append(f"largest log-prob difference {r['logprob_diff']:.1e} (sequence sums, dropout off)")
            if "loss_diff" in r:
                notes.append(f"loss difference {r['loss_diff']:.1e} (dropout off)")
            if "ours_tflops" in r:
                peak = peak_flops(m["gpu"])
                notes.append(f"{r['ours_tflops']:.3g} vs {r['theirs_tflops']:.3g} TFLOP/s" + (
                    f", MFU {r['ours_tflops'] * 1e12 / peak:.0%} vs {r['theirs_tflops'] * 1e12 / peak:.0%}"
                    if peak else ""))
            if "seconds" in r:  # the spread of the repeats says how far to trust the ratio
                notes.append("s per call " + " vs ".join(
                    f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f})" for t in r["seconds"].values()))
            notes = "; ".join(notes)
            bench = f"{r['bench']} ({r['variant']})"
            fmt = lambda x: f"{x:,.0f}" if x >= 100 else f"{x:.3g}"  # noqa: E731
            out.append(f"| {r['size']} | {bench} | {r['shape']} | {fmt(r['ours'])} {r['unit']} | "
                       f"{fmt(r['theirs'])} | {r['ours'] / r['theirs']:.2f}x | {goal} | {notes} |")
    return "\n".join(out + ["", MARK_END])


def save(run, out, markdown):
    """Merge this run into the JSON at `out` (a row measured again on the same machine, threads and shape replaces the
    older one) and rewrite BENCHMARKS.md's results section from it."""
    def key(run, row):
        m = run["machine"]
        return m["gpu"] or m["cpu"], m["threads"], row["size"], row["bench"], row["variant"], row["shape"]
    saved = json.loads(Path(out).read_text()) if Path(out).exists() else {"runs": []}
    measured = {key(run, r) for r in run["rows"]}
    for old in saved["runs"]:
        old["rows"] = [r for r in old["rows"] if key(old, r) not in measured]
    saved["runs"] = runs = [r for r in saved["runs"] if r["rows"]] + [run]
    atomic_write(out, json.dumps(saved, indent=1).encode())
    text = Path(markdown).read_text() if Path(markdown).exists() else f"# Benchmarks\n\n{MARK_BEGIN}\n{MARK_END}\n"
    if MARK_BEGIN not in text:
        text += f"\n{MARK_BEGIN}\n{MARK_END}\n"
    head, rest = text.split(MARK_BEGIN, 1)
    atomic_write(markdown, (head + render(runs) + rest.split(MARK_END, 1)[1]).encode())


RANKS_BEGIN, RANKS_END = "<!-- ranks: written by bench.py --only ranks -->", "<!-- end of ranks -->"
# A path outside the clone in a recorded command, as the README writes it: a placeholder, or (--out, --markdown) the
# name of the file written.
PLACEHOLDERS = {"--data-dir": "DIR", "--run": "RUN"}


def typed_command(argv):
    """The command as a user types it from a clone of the repository: python bench.py and its flags, where a path
    outside the current directory (absolute, or above it) is written as PLACEHOLDERS says, else by its file name.
    So no recorded command names a folder of the machine that ran it."""
    def typed(flag, value):
        outside = os.path.isabs(value) or value.startswith("..")
        return PLACEHOLDERS.get(flag) or os.path.basename(value) if outside else value

    words, flag = ["python", "bench.py"], None
    for word in argv[1:]:
        if word.startswith("--") and "=" in word:
            name, value = word.split("=", 1)
            words.append(f"{name}={typed(name, value)}")
        else:
            words.append(word if word.startswith("--") else typed(flag, word))
        flag = word
    return " ".join(words)


def bench_ranks(args):
    """One reflect iteration of a world run (--run, the README's first command makes runs/world) as one process with
    every core's threads, then as two torchrun processes with half each, alternating; median wall seconds of each and
    their ratio, written into BENCHMARKS.md between RANKS_BEGIN and RANKS_END."""
    cores, seconds = os.cpu_count(), {1: [], 2: []}
    launchers = {1: [sys.executable], 2: [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                          "--nproc_per_node", "2"]}
    for repeat in range(args.repeats):
        for procs in (1, 2) if repeat % 2 == 0 else (2, 1):
            with tempfile.TemporaryDirectory() as tmp:
                run_dir = os.path.join(tmp, "run")
                shutil.copytree(args.run, run_dir, ignore=shutil.ignore_patterns("reflect", "state.pt"))
                start = time.perf_counter()
                script = str(Path(__file__).parent / "tinythinker.py")
                subprocess.run([*launchers[procs], script, "--phase", "reflect", "--from", run_dir,
                                "--iterations", "1"], check=True, capture_output=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs))})
                seconds[procs].append(time.perf_counter() - start)
                print(f"{procs} process(es): {seconds[procs][-1]:.1f} s", flush=True)
    one, two = (statistics.median(seconds[p]) for p in (1, 2))
    table = "\n".join([RANKS_BEGIN, f"`{typed_command(sys.argv)}` on {machine(torch.device('cpu'))['cpu']}, "
                        f"{cores} cores, {time.strftime('%Y-%m-%d')}:", "",
                        "| processes | threads each | one reflect iteration (median of %d) |" % args.repeats,
                        "|---|---|---|", f"| 1 | {cores} | {one:.1f} s |",
                        f"| 2 (torchrun, gloo) | {max(1, cores // 2)} | {two:.1f} s ({one / two:.2f}x) |", RANKS_END])
    text = Path(args.markdown).read_text() if Path(args.markdown).exists() else "# Benchmarks\n"
    if RANKS_BEGIN in text:
        text = text.split(RANKS_BEGIN)[0] + table + text.split(RANKS_END, 1)[1]
    else:
        text += f"\n## Several processes\n\n{table}\n"
    atomic_write(args.markdown, text.encode())
    print(table)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="train,generate,memory,chain,dpo",
                   help="comma list of train, generate, memory, chain, dpo; or project alone; or ranks alone "
                   "(default all but project and ranks)")
    p.add_argument("--sizes", default="small,base", help="comma list of the model shapes, small and base (default "
                   "both)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default cuda where there is one)")
    p.add_argument("--batch", type=int, default=32, help="training batch in sequences (default 32)")
    p.add_argument("--src", type=int, default=200, help="input tokens per sequence (default 200)")
    p.add_argument("--tgt", type=int, default=100, help="target tokens per sequence (default 100)")
    p.add_argument("--gen-batch", default="1,8,64", help="comma list of sequences generated at once (memory: the "
                   "last; default 1,8,64)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (default 128)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each side before timing (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed calls of each side, the median kept (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--chain-questions", type=int, default=256, help="chain: CSQA test questions (default 256)")
    p.add_argument("--chain-batch", type=int, default=256, help="chain: prompts per generate call (default 256, the "
                   "method's)")
    p.add_argument("--chain-max-new-tokens", type=int, default=200, help="chain: max_new_tokens per stage (default "
                   "200, the method's)")
    p.add_argument("--chain-samples", type=int, default=1, help="chain: > 1 times one of reflect's passes instead, "
                   "each question that many times (the method's: 10; --chain-pass says which; default 1)")
    p.add_argument("--chain-pass", default="recall", choices=["recall", "analyze"],
                   help="chain: with --chain-samples, which of reflect's passes (analyze: recalls fixed, analyses "
                   "sampled; default recall)")
    p.add_argument("--data-dir", default=None, help="chain, dpo, project: the folder that holds csqa/original/*.jsonl "
                   "and {csqa,obqa}/prompt/*_cot.json (default: the repo's data/, the questions downloaded into it)")
    p.add_argument("--variants", default=None, help="train, generate: comma list of eager, compile (torch.compile, "
                   "CUDA only; default both on CUDA, eager on the CPU)")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top operators of each side")
    p.add_argument("--run", default="runs/world", help="ranks: the acquired world run to reflect on (default "
                   "runs/world, the demo's)")
    p.add_argument("--out", default=os.path.join("runs", "bench.json"), help="the JSON the results are merged into "
                   "(default runs/bench.json; --out bench.json: the repository's)")
    p.add_argument("--markdown", default=os.path.join("runs", "BENCHMARKS.md"), help="the Markdown whose results, "
                   "projection or ranks section is rewritten (default runs/BENCHMARKS.md; --markdown BENCHMARKS.md: "
                   "the repository's)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.only = args.only.split(",")
    args.gen_batches = [int(b) for b in args.gen_batch.split(",")]
    args.gen_batch = args.gen_batches[-1]
    benches = {"train", "generate", "memory", "chain", "dpo", "project", "ranks"}
    if set(args.only) - benches or set(args.sizes.split(",")) - SIZES.keys():
        p.error(f"--only {','.join(args.only)} / --sizes {args.sizes}: expected train, generate, memory, chain, dpo / "
                "small, base")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return peak_memory_child(args.impl, args.only[0], args.memory_child, args)
    device = torch.device(args.device)
    default = "eager,compile" if device.type == "cuda" else "eager"
    variants = (args.variants or default).split(",")
    if set(variants) - {"eager", "compile"} or (device.type == "cpu" and "compile" in variants):
        p.error(f"--variants {args.variants}: expected eager and/or compile, compile on CUDA only")
    for path in (args.out, args.markdown):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    run = {"command": typed_command(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": machine(device), "rows": []}
    start = time.perf_counter()
    if args.only == ["ranks"]:
        return bench_ranks(args)
    if args.only == ["project"]:
        run["rates"], run["hours"] = [], []
        for size in args.sizes.split(","):
            with tempfile.TemporaryDirectory() as directory:
                save_reference(size, directory)
                rates, hours = project(size, args, directory)
            run["rates"].append((size, rates))
            run["hours"].append((size, hours))
            print(size, json.dumps(rates), json.dumps(hours))
        run["machine"]["load_after"] = os.getloadavg()
        return save_projection(run, args.out, args.markdown)
    for size in args.sizes.split(","):
        run["rows"] += bench_size(size, args, device, variants)
    run["seconds"] = time.perf_counter() - start
    run["machine"]["load_after"] = os.getloadavg()
    save(run, args.out, args.markdown)
    print(render([run]))


if __name__ == "__main__":
    main()
