"""Time this project's T5 (t5.py) against transformers' T5ForConditionalGeneration: same random weights, same inputs,
same device and precision, in one process.

    python bench.py                                            # everything, t5-small and t5-base shapes
    python bench.py --only train --sizes small --repeats 3     # one benchmark, one size
    python bench.py --sizes base --batch 8 --gen-batch 16      # smaller batches for a CPU run
    python bench.py --only train --sizes small --profile       # + torch.profiler top entries of each side

Method: transformers builds the model (its own random initialisation) and saves it; ours loads those files. Each
measurement runs a warm-up, then alternates ours / theirs (the order flipped every repeat, so load from other processes
hits both alike) and keeps the median. Peak memory is measured in a fresh process per implementation and benchmark.
Precision: fp32 on CPU; on CUDA fp32 weights under bf16 autocast on both sides, training eager and torch.compile'd.
Batches are padded like the method's: row lengths drawn between half and the full length; token counts include the
padding, since both sides compute it. Results are merged into bench.json (--out) and BENCHMARKS.md's results section
is rewritten from it, each table under the command that produced it. Timings never go into tests.
"""

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import T5ForConditionalGeneration

from t5 import T5

SIZES = {"small": dict(d_model=512, d_ff=2048, num_heads=8, num_layers=6),  # original T5 configs: relu, tied
         "base": dict(d_model=768, d_ff=3072, num_heads=12, num_layers=12)}
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]  # dense, by name
GOALS = {"train": {"cpu": ">= 1.2", "cuda": ">= 1.5"}, "generate": ">= 3", "memory": "<= 1"}
MARK_BEGIN, MARK_END = "<!-- results: written by bench.py from bench.json -->", "<!-- end of results -->"


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


def generate_call(model, impl, ids, mask, new_tokens):
    """Exactly `new_tokens` greedy tokens per row on both sides, with the same arithmetic: neither side knows an end
    token (ours: eos_token_id -1, an id argmax never returns, so no row finishes; theirs: eos_token_id=None, so only
    the length stops it). No logits processor on either side; in fp32 the two must pick the same tokens."""
    model.eval()
    if impl == "ours":
        model.config.eos_token_id = -1
        return lambda: model.generate(ids, mask, max_new_tokens=new_tokens)
    def call():
        with autocast(ids.device):
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, eos_token_id=None,
                                  do_sample=False)[:, 1:]  # drop the decoder start token, which ours omits
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
        call = generate_call(model, impl, gen["input_ids"], gen["attention_mask"], args.new_tokens)
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
        models = {impl: load(impl, directory, device) for impl in ("ours", "theirs")}
        if "generate" in args.only:  # before training, which moves the two models' weights apart
            gen = make_batch(args.gen_batch, args.src, 1, device, seed=1)
            calls = {impl: generate_call(m, impl, gen["input_ids"], gen["attention_mask"], args.new_tokens)
                     for impl, m in models.items()}
            outputs = {impl: call() for impl, call in calls.items()}
            assert all(o.shape == (args.gen_batch, args.new_tokens) for o in outputs.values())
            same = (outputs["ours"] == outputs["theirs"]).float().mean().item()
            seconds, times = race(calls, device, args.warmup, args.repeats)
            new_tokens = args.gen_batch * args.new_tokens
            rows.append(dict(size=size, bench="generate", variant="eager", unit="new tokens/s",
                             shape=f"{args.gen_batch} x {args.new_tokens} new (input {args.src})",
                             ours=new_tokens / seconds["ours"], theirs=new_tokens / seconds["theirs"],
                             same_tokens=same, seconds=times))
            if args.profile:
                profile(calls, device)
        if "train" in args.only:
            batch = make_batch(args.batch, args.src, args.tgt, device)
            flops = train_flops(size, args.batch, args.src, args.tgt)
            for variant in variants:
                compiled = {k: torch.compile(m) if variant == "compile" else m for k, m in models.items()}
                calls = {impl: train_step(m, batch, device) for impl, m in compiled.items()}
                seconds, times = race(calls, device, args.warmup, args.repeats)
                tokens = args.batch * (args.src + args.tgt)
                rows.append(dict(size=size, bench="train", variant=variant, unit="tokens/s",
                                 shape=f"{args.batch} x ({args.src} + {args.tgt})",
                                 ours=tokens / seconds["ours"], theirs=tokens / seconds["theirs"],
                                 ours_tflops=flops / seconds["ours"] / 1e12,
                                 theirs_tflops=flops / seconds["theirs"] / 1e12, seconds=times))
                if args.profile and variant == "eager":
                    profile(calls, device)
    return rows


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
            out.append(f"| {r['size']} | {bench} | {r['shape']} | {r['ours']:,.0f} {r['unit']} | "
                       f"{r['theirs']:,.0f} | {r['ours'] / r['theirs']:.2f}x | {goal} | {notes} |")
    return "\n".join(out + ["", MARK_END])


def save(run, out, markdown):
    """Merge this run into the JSON at `out` (a row measured again on the same machine, threads and shape replaces the
    older one) and rewrite BENCHMARKS.md's results section from it."""
    def key(run, row):
        m = run["machine"]
        return m["gpu"] or m["cpu"], m["threads"], row["size"], row["bench"], row["variant"], row["shape"]
    runs = json.loads(Path(out).read_text())["runs"] if Path(out).exists() else []
    measured = {key(run, r) for r in run["rows"]}
    for old in runs:
        old["rows"] = [r for r in old["rows"] if key(old, r) not in measured]
    runs = [r for r in runs if r["rows"]] + [run]
    Path(f"{out}.tmp").write_text(json.dumps({"runs": runs}, indent=1))
    os.replace(f"{out}.tmp", out)
    text = Path(markdown).read_text() if Path(markdown).exists() else f"# Benchmarks\n\n{MARK_BEGIN}\n{MARK_END}\n"
    if MARK_BEGIN not in text:
        text += f"\n{MARK_BEGIN}\n{MARK_END}\n"
    head, rest = text.split(MARK_BEGIN, 1)
    Path(f"{markdown}.tmp").write_text(head + render(runs) + rest.split(MARK_END, 1)[1])
    os.replace(f"{markdown}.tmp", markdown)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="train,generate,memory", help="comma list of train, generate, memory")
    p.add_argument("--sizes", default="small,base", help="comma list of small, base")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=32, help="training batch (sequences)")
    p.add_argument("--src", type=int, default=200, help="input tokens per sequence")
    p.add_argument("--tgt", type=int, default=100, help="target tokens per sequence")
    p.add_argument("--gen-batch", type=int, default=64, help="sequences generated at once")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--no-compile", action="store_true", help="CUDA: skip the torch.compile rows")
    p.add_argument("--profile", action="store_true", help="print torch.profiler top operators of each side")
    p.add_argument("--out", default="bench.json")
    p.add_argument("--markdown", default="BENCHMARKS.md")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.only = args.only.split(",")
    if set(args.only) - {"train", "generate", "memory"} or set(args.sizes.split(",")) - SIZES.keys():
        p.error(f"--only {','.join(args.only)} / --sizes {args.sizes}: expected train, generate, memory / small, base")
    torch.set_num_threads(args.threads)
    if args.memory_child:
        return peak_memory_child(args.impl, args.only[0], args.memory_child, args)
    device = torch.device(args.device)
    variants = ["eager"] if device.type == "cpu" or args.no_compile else ["eager", "compile"]
    run = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
           "machine": machine(device), "rows": []}
    start = time.perf_counter()
    for size in args.sizes.split(","):
        run["rows"] += bench_size(size, args, device, variants)
    run["seconds"] = time.perf_counter() - start
    run["machine"]["load_after"] = os.getloadavg()
    save(run, args.out, args.markdown)
    print(render([run]))


if __name__ == "__main__":
    main()
