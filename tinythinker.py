"""TinyThinker in plain PyTorch: the command line and the two training phases.

    python tinythinker.py --phase acquire     # Phase 1, reasoning acquisition: staged SFT on the teacher's rationales
    python tinythinker.py --phase reflect     # Phase 2, self-reflection: iterative DPO on the student's own chains
    torchrun --nproc_per_node 4 tinythinker.py --phase acquire --data csqa     # every phase runs on several GPUs

With no --data both phases run on the embedded world (world.py), a T5 trained from scratch in minutes on a CPU.
A real run first asks the teacher (python teacher.py --data csqa --split train), then trains google-t5/t5-small.
Each phase has its own defaults, the official code's values (METHOD sections 5.3 and 7); the world replaces a few to
fit a laptop. A reflect run takes its data set, stages and model from the acquire run it continues (--from). Each
flag's help names the defaults of acquire and reflect where they differ, and "world" the one on the embedded world
where that differs; every run's config.json records each setting it uses with where it came from.
"""
import argparse
import dataclasses
import os
import random
from dataclasses import dataclass

import torch

import cli
import data
import dpo
import evaluate
import teacher
import train
import world
from cli import setting
from data import DEFAULT_DIR


@dataclass
class Config:
    phase: str = setting("acquire", "acquire (phase 1: staged fine-tuning on the teacher's rationales) or reflect "
                         "(phase 2: DPO on the student's own chains)")
    data: str = setting("world", "world (built in, offline), csqa, obqa, strategyqa, or a directory or .jsonl file "
                        "of your own questions")
    data_dir: str = setting(str(DEFAULT_DIR), "folder of the data sets (downloaded into DIR/{data set}/original if "
                            "missing) and of teacher.py's records, which acquire and reflect read from "
                            "DIR/{data set}/teacher_train.jsonl")
    model: str = setting("google-t5/t5-small", "the student to train: a Hugging Face Hub id or a local checkpoint "
                         "folder; scratch = a new small T5 (world.MODEL) with a tokenizer trained on the data")
    stages: str = setting("recall_analyze_summarize", "the stages trained: recall_analyze_summarize, or an ablation "
                          "variant (summarize, recall_summarize, analyze_summarize)")
    pairs: str = setting("recall_analyze", "the preference pairs trained on: recall, analyze or recall_analyze")
    out: str = setting("", "run folder (default runs/{data set}); reflect writes into OUT/reflect")
    resume: bool = setting(False, "continue a killed run from its last state.pt, on the settings it started with")
    seed: int = setting(42, "seed of a model from scratch, the batches' order, dropout and reflect's samples")
    # optimisation (METHOD 5.3 for acquire, 7.5 for reflect)
    batch_size: int = setting(64, "acquire: examples per micro-batch, a step being batch size x grad accumulation x "
                              "devices; reflect: pairs per step, split over the devices")
    grad_accum: int = setting(1, "micro-batches accumulated into one optimizer step")
    lr: float = setting(5e-4, "peak learning rate of AdamW (no weight decay)")
    warmup: float = setting(0.1, "share of the steps with a linear warm-up, then cosine decay to 0 (A3)")
    epochs: int = setting(10, "acquire: passes over the teacher's rationales; reflect: cycles of the official "
                          "schedule per iteration, each ending in a validation (A19)")
    steps: int = setting(0, "stop after this many optimizer steps, 0 = all epochs (ablation.py's control, A23)")
    interval: int = setting(100, "recall batches per cycle of the staged schedule, then interval x options analyze "
                            "and interval summarize batches (METHOD 5.2)")
    eval_every: int = setting(0, "optimizer steps between validations; 0 = once per cycle of the schedule")
    grad_clip: float = setting(1.0, "gradient-norm clip")
    precision: str = setting("fp32", "autocast dtype: fp32, bf16, or fp16 with a loss scaler (A20)")
    eval_batch_size: int = setting(256, "questions (or sampled chains) per generation batch")
    max_new_tokens: int = setting(200, "tokens generated per stage in validation and sampling (the official "
                                  "max_length)")
    # self-reflection (METHOD 7)
    iterations: int = setting(5, "DPO iterations, each from the previous one's best model")
    samples: int = setting(10, "sampled chains per question (recall pass) and per chosen recall (analyze pass)")
    temperature: float = setting(0.7, "sampling temperature of recall and analyze; never changed (A8)")
    beta: float = setting(0.5, "DPO's beta (A2)")
    alpha: float = setting(0.5, "weight of the NLL on chosen responses: DPO + alpha x NLL (A10, A25)")
    max_length: int = setting(200, "tokens kept of each prompt and response, </s> included (METHOD 7.4)")
    sources: dict = dataclasses.field(default_factory=dict)  # where each setting came from (parse_config)


# The method's self-reflection values (run_dpo.sh and scripts/dpo.py, METHOD 7): they replace acquire's values for
# a reflect run, whatever data set it continues; epochs counts cycles of the official schedule (A19, reflect_plan).
REFLECT = dict(batch_size=32, lr=5e-6, warmup=0.1, epochs=10, eval_every=0, grad_clip=1.0, iterations=5, samples=10,
               temperature=0.7, beta=0.5, alpha=0.5, max_length=200, max_new_tokens=200)
# The demo's settings on the embedded world, over each phase's (world.FROM_SCRATCH: how acquire learns it from
# scratch). acquire: stages interleaved batch by batch (interval 1), as longer blocks of one stage kept this model at
# chance. reflect: lr 5e-5, as Adam's first steps move every weight by about lr and 2e-4 undid a converged student;
# the method's temperature 0.7 (A24).
WORLD = {"acquire": dict(world.FROM_SCRATCH, interval=1, max_new_tokens=48),
         "reflect": dict(batch_size=32, lr=5e-5, epochs=2, iterations=2, samples=4, max_new_tokens=48)}
PAIRS = ("recall", "analyze", "recall_analyze")
# The settings one phase alone reads: the other refuses them on its command line and leaves them out of its
# config.json. What reflect takes from the acquire run it continues (acquire_settings) it may not change, but for the
# folder the data sets are in.
ONLY = {"acquire": ("grad_accum", "steps", "interval"),
        "reflect": ("pairs", "iterations", "samples", "temperature", "beta", "alpha", "max_length")}
FROM_ACQUIRE = ("data", "data_dir", "stages", "model")
# Every decision of METHOD 9 with the runs that record it in their config.json (decisions()): "every run", "real data"
# (a data set the teacher LLM answered: not the world), "reflect" (reflect's runs, whose model continues an acquire
# run's and records its decisions too) and "world" (the embedded world's runs). METHOD 9 marks each alike.
DECISIONS = {
    "A1 analysis order in summarize inputs": (
        "every run", "alphabetical in training and inference (no gold-first shortcut)"),
    "A2 beta": ("reflect", "0.5, the official argparse value"),
    "A3 learning-rate schedule": (
        "every run", "linear warm-up over 10% of the steps, then cosine to 0 (the current official code)"),
    "A4 label padding": ("every run", "padded target positions are ignored (-100), as the current official code"),
    "A5 per-model settings": ("every run", "the published t5-small settings, for every model size"),
    "A6 test decoding": ("every run", "greedy unless evaluate.py --samples N"),
    "A7 reported iteration": ("reflect", "reflect/best is the iteration with the best validation accuracy"),
    "A8 temperature schedule": ("reflect", "fixed (0.7): the official temperature_increase defaults to 0"),
    "A9 analyze-pair balancing": (
        "reflect", "chosen topped up to |rejected| like the recall rule (see dpo.analyze_pairs)"),
    "A10 DPO + alpha * NLL": (
        "reflect", "loss = DPO + alpha x NLL, as the official trainer (not TRL 0.9's alpha x DPO + NLL)"),
    "A11 splits": ("real data", "drawn with seed 42 where the official code draws without a seed"),
    "A12 no gold override": (
        "real data", "the data set's label stays; a completion calling another option correct is requested again"),
    "A13 options from the structured choices": ("every run", "options written from the choices, never re-split"),
    "A14 notebook breakage": ("every run", "what the released notebooks intend where they read missing keys"),
    "A15 option letters per question": ("every run", "from each question's own choices"),
    "A16 exhausted loaders": ("every run", "a cycle skips an exhausted loader; every example is seen once per epoch"),
    "A17 diversity filter omitted": (
        "real data", "every valid completion kept (the official filter keeps them all when n_augment = n)"),
    "A18 identical pairs": (
        "reflect", "a preference pair whose chosen and rejected texts are equal is left out (dpo.recall_pairs)"),
    "A19 reflect schedule": (
        "reflect", "the official one: epochs x S steps, validation every S = RI + AI steps (reflect_plan)"),
    "A20 precision": (
        "every run", "fp32 unless --precision bf16|fp16, as the official code (DPO compares sums of 200 log-probs)"),
    "A21 reflect samples": ("reflect", "only training questions with teacher records, as the official code"),
    "A22 the world's Key Information carries the knowledge": (
        "world", "a held-out animal's size is stated only in its Key Information, so recall must retrieve it"),
    "A23 the control the paper lacks": (
        "world", "ablation.py continues acquire for as many steps as reflect took, at reflect's batch size and lr"),
    "A24 the world's reflect temperature": (
        "world", "the method's 0.7; reflect is also tried from a half-trained student (ablation.py --epochs 15)"),
    "A25 NLL normalisation": (
        "reflect", "the NLL is the mean over the batch's real chosen tokens; the official mean also counts every "
                   "padded position, where a real token weighs 0.59-1.00 of ours on the world's pairs "
                   "(python -m tests.nll_weights RUN)"),
    "A26 validation at the last step": (
        "every run", "acquire also validates at its last step when no cycle ends there (105 validations on CSQA, "
                     "the official 104), so the fully trained model is a candidate"),
    "A27 validation cycle on small data": (
        "every run", "a validation per cycle of the schedule as it runs, the sum of min(quota, batches) of the "
                     "stages: once an epoch when a stage has fewer batches than its quota (not interval x (k + 2))"),
}
# Settings a resumed run may change: they move no step of the schedule (more iterations continue a finished run).
FREE_ON_RESUME = ("resume", "out", "data_dir", "eval_batch_size", "iterations", "sources")


def decisions(phase, name):
    """{decision: what was chosen} of every decision of METHOD 9 that a run of `phase` on data set `name` records."""
    scopes = {"every run", "world" if name == "world" else "real data"} | ({"reflect"} if phase == "reflect" else set())
    return {decision: chosen for decision, (scope, chosen) in DECISIONS.items() if scope in scopes}


def unused(phase):
    """The settings a phase does not read: the other phase's ONLY."""
    return {"acquire": ONLY["reflect"], "reflect": ONLY["acquire"]}.get(phase, ())


def phase_defaults(name):
    """A flag's default as --help shows it: acquire's and reflect's where they differ, each with the world's where
    that differs (the layers of parse_config); None where the help itself says it (a switch, an empty default)."""
    default = Config.__dataclass_fields__[name].default
    if isinstance(default, bool) or default == "":
        return None
    if name == "phase":
        return f"default {default}"

    def of(phase):
        if phase == "reflect" and name in FROM_ACQUIRE:
            return "the acquire run's"
        method = REFLECT.get(name, default) if phase == "reflect" else default
        on_world = WORLD[phase].get(name, method)
        return f"{method}" + (f", world {on_world}" if on_world != method else "")

    phases = {phase: of(phase) for phase in ("acquire", "reflect") if name not in unused(phase)}
    if len(phases) == 1:
        [(phase, text)] = phases.items()
        return f"{phase} only; default {text}"
    if phases["acquire"] == phases["reflect"]:
        return f"default {phases['acquire']}"
    return f"default: acquire {phases['acquire']}; reflect {phases['reflect']}"


def parse_config(argv=None):
    """Defaults, then the phase's and the world's, then the command line, in that order. A reflect run continues the
    acquire run in --from: its data set, data directory, stage variant and model come from that run's config.json,
    then the method's reflect values (REFLECT), then the world's if that run was on the world, then the command line.
    cfg.sources records where each setting the phase uses came from; it is written to config.json."""
    parser = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_flags(parser, Config, phase_defaults)
    parser.add_argument("--from", dest="out", help="reflect: the acquire run's folder, as --out (default runs/{data "
                        "set})")
    given = cli.given_flags(parser, argv)
    phase, name = given.get("phase", Config.phase), given.get("data", Config.data)
    for key in unused(phase):
        if key in given:
            raise SystemExit(f"--{key.replace('_', '-')}: --phase {phase} does not use it (a setting of the other "
                             "phase; python tinythinker.py --help says which)")
    layers = []
    if phase == "reflect":
        run_dir = given.get("out") or os.path.join("runs", data.dataset_name(name))
        acquired = acquire_settings(run_dir)
        for key in ("data", "stages", "model"):  # data_dir may be given: the folder may have moved
            if key in given and given[key] != acquired[key]:
                raise SystemExit(f"--{key} {given[key]}: the run in {run_dir} was acquired with {key} "
                                 f"{acquired[key]}; reflect continues it")
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
    cfg.out = cfg.out or os.path.join("runs", data.dataset_name(cfg.data))
    cfg.data_dir = os.path.abspath(cfg.data_dir)
    cfg.sources = {f.name: sources.get(f.name, "default") for f in dataclasses.fields(Config)
                   if f.name != "sources" and f.name not in unused(cfg.phase)}
    return cfg


def check(cfg):
    """One clear line for a setting that cannot work, before anything is loaded or written."""
    if cfg.phase not in ("acquire", "reflect"):
        raise SystemExit(f"--phase must be acquire or reflect, not {cfg.phase!r}")
    data.check_name(cfg.data)
    data.check_choices(cfg.data)
    if cfg.stages not in data.STAGES:
        raise SystemExit(f"--stages must be one of {', '.join(data.STAGES)}, not {cfg.stages!r}")
    if cfg.pairs not in PAIRS:
        raise SystemExit(f"--pairs must be one of {', '.join(PAIRS)}, not {cfg.pairs!r}")
    cli.check_positive(cfg, ("batch_size", "grad_accum", "epochs", "interval", "eval_batch_size", "max_new_tokens",
                             "iterations", "samples", "max_length"))
    cli.check_positive(cfg, ("steps",), least=0)
    cli.check_seed(cfg.seed)
    if not (cfg.lr > 0 and 0 <= cfg.warmup < 1 and cfg.eval_every >= 0 and cfg.temperature > 0 and cfg.beta > 0
            and cfg.grad_clip > 0 and cfg.alpha >= 0):
        raise SystemExit("--lr, --temperature, --beta and --grad-clip must be above 0, --warmup in [0, 1), "
                         "--eval-every and --alpha at least 0")
    cli.check_learning_rate(cfg.lr)
    if cfg.phase == "reflect":  # reflect starts from an acquired model (parse_config has read the run's settings)
        if not os.path.isdir(os.path.join(cfg.out, "best")):
            raise SystemExit(f"{cfg.out}: no acquired model ({os.path.join(cfg.out, 'best')}); "
                             f"run python tinythinker.py --phase acquire first (--from names its --out)")


def acquire_settings(run_dir):
    """What a reflect run takes from the acquire run it continues (FROM_ACQUIRE): its model is that run's best/, so
    its config.json names the model that run trained. Reflect trains recall and analyze inside the full chain
    (METHOD 7), so it continues only a run of the full recall_analyze_summarize variant."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no acquire run to reflect on; run python tinythinker.py --phase acquire first, "
                         "or pass --from RUN_DIR")
    acquired = cli.read_run_config(run_dir)
    if acquired["stages"] != "recall_analyze_summarize":
        raise SystemExit(f"{path}: reflect continues a recall_analyze_summarize run, not a {acquired['stages']} one")
    if not isinstance(acquired.get("model"), str):
        raise data.DataError(f"{path}: not a run config (no model)")
    return {key: acquired[key] for key in FROM_ACQUIRE}


def teacher_records(cfg):
    """The teacher's rationales for the training questions (teacher.py's records). The world's teacher is built in
    and goes through the same parser as an LLM's completions."""
    if cfg.data == "world":
        made = world.make_world()
        return [r for q in made.train for r in teacher.records_from_completions(q, [world.teacher_completion(made, q)])]
    path = os.path.join(cfg.data_dir, data.dataset_name(cfg.data), "teacher_train.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"{path}: no teacher records; make them with: "
                         f"python teacher.py --data {cfg.data} --split train")
    records = teacher.read_records(path)
    if not records:
        raise SystemExit(f"{path}: no teacher records in the file; see {path[:-len('.jsonl')]}.failed.jsonl")
    return records


def loop(cfg, plan):
    """train.fit's settings for a phase: a micro-batch of batch_size examples, a validation every --eval-every steps
    or, by default, every cycle of the plan (METHOD 5.2, 7.5)."""
    return train.Loop(cfg.lr, cfg.warmup, cfg.grad_clip, micro_batch=cfg.batch_size,
                      eval_every=cfg.eval_every or plan.cycle)


# ----------------------------------------------------------------------------------------------------------------
# Phase 1: reasoning acquisition (METHOD 5)

def acquire(cfg):
    """Staged fine-tuning on the teacher's rationales (METHOD 5): the stage formats of data.stage_examples, the
    staged schedule of train.Plan, a token-mean cross-entropy; the best model by validation in {out}/best."""
    runtime = cli.setup_device(cfg.precision, cfg.seed)
    effective = cfg.batch_size * cfg.grad_accum * runtime.world_size
    cli.hold_run(cfg.out)
    resumed = cli.start_run(cfg, cfg.out, "state.pt", FREE_ON_RESUME, effective_batch_size=effective)
    cli.demo("acquire", cfg.data == "world" and cfg.model == "scratch")
    records = teacher_records(cfg)
    valid = cli.questions(cfg.data, "valid", cfg.data_dir)
    texts = {stage: pairs for stage, pairs in data.stage_examples(records, cfg.stages).items() if pairs}
    n_options = max(len(r["explanations"]) for r in records)
    quotas = dict(recall=cfg.interval, analyze=cfg.interval * n_options, summarize=cfg.interval)
    # --steps: a budget in steps instead of epochs, the last epoch cut short (ablation.py's control, A23)
    plan = train.Plan({s: len(p) for s, p in texts.items()}, effective, cfg.epochs, cfg.seed, quotas, cfg.steps or None)
    if not resumed:  # a resumed run keeps the config.json it started with
        cli.write_run_config(cfg, cfg.out, runtime, decisions(cfg.phase, cfg.data), unused(cfg.phase),
                             effective_batch_size=effective, total_steps=len(plan),
                             examples={s: len(p) for s, p in texts.items()})
    model, tokenizer = cli.student(cfg, cfg.out, [x + " " + y for pairs in texts.values() for x, y in pairs], runtime)
    examples = {stage: [(tokenizer.encode(x), tokenizer.encode(y)) for x, y in pairs] for stage, pairs in texts.items()}
    cli.say(f"acquire: {', '.join(f'{len(e)} {s}' for s, e in examples.items())} examples; effective batch "
            f"{effective} = {cfg.batch_size} x {cfg.grad_accum} accumulation x {runtime.world_size} devices; "
            f"{len(plan)} steps, validation every {loop(cfg, plan).eval_every}")

    def step_loss(trained, step, micro_batch):
        input_ids, attention_mask, labels = (t.to(runtime.device) for t in
                                             data.collate([examples[step.stage][i] for i in micro_batch]))
        return trained(input_ids=input_ids, attention_mask=attention_mask, labels=labels)[1], {}

    def target_tokens(step, indices):  # the loss is a token mean over the whole effective batch
        return sum(len(examples[step.stage][i][1]) for i in indices)

    best = train.fit(loop(cfg, plan), cfg.out, model, tokenizer, plan, step_loss=step_loss, weight=target_tokens,
                     validate=evaluate.validator(cfg, tokenizer, valid, cfg.stages), runtime=runtime, desc="acquire")
    cli.say(f"acquire: best validation accuracy {best:.2f}%, model in {os.path.join(cfg.out, 'best')}")
    cli.release_run(cfg.out)


# ----------------------------------------------------------------------------------------------------------------
# Phase 2: self-reflection (METHOD 7)

def with_records(questions, records):
    """The training questions reflect samples: those with teacher records, as in the official code (its training set
    is the teacher's output). A recall pair may need the teacher's Key Information as its chosen side (METHOD 7.2,
    step 4), and questions the teacher failed or that --limit left out have none."""
    taught = {r["id"] for r in records}
    if len(taught) < len(questions):
        cli.say(f"reflect: sampling the {len(taught)} training questions with teacher records, "
                f"of {len(questions)} in the split")
    return [q for q in questions if q.id in taught]


def self_pairs(cfg, model, tokenizer, questions, records, iteration_dir, k):
    """{"recall": pairs, "analyze": pairs}: the student's own chains on the training questions, sampled and turned
    into preference pairs (METHOD 7.1-7.3). Every rank samples its share and builds the same pairs; rank 0 saves them
    as JSONL, so a resumed iteration does not sample again and a reader can see what the student learned to prefer."""
    paths = {kind: os.path.join(iteration_dir, f"{kind}_pairs.jsonl") for kind in ("recall", "analyze")}
    if all(os.path.isfile(path) for path in paths.values()):
        return {kind: data.read_jsonl(path) for kind, path in paths.items()}
    seed = cfg.seed * 1000 + k  # the pairs' draws and the sampled tokens: --seed reproduces an iteration
    rng = random.Random(seed)
    by_id = {q.id: q for q in questions}
    kwargs = dict(batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens)
    # Recall pass: recall sampled, analyze and summarize greedy, `samples` chains per question.
    repeated = [q for q in questions for _ in range(cfg.samples)]
    chains = evaluate.run_chains(model, tokenizer, repeated, recall_temperature=cfg.temperature, seed=f"{seed}/recall",
                                 desc=f"iteration {k} recall samples", **kwargs)
    recall_pairs, contexts = dpo.recall_pairs(chains, by_id, records, rng)
    analyze_pairs = []
    if "analyze" in cfg.pairs:
        # Analyze pass: each chosen recall is fixed and its analyses sampled, `samples` chains per context.
        fixed = [c for c in contexts for _ in range(cfg.samples)]
        chains = evaluate.run_chains(model, tokenizer, [by_id[c.id] for c in fixed], recalls=[c.recall for c in fixed],
                                     analyze_temperature=cfg.temperature, seed=f"{seed}/analyze",
                                     desc=f"iteration {k} analyze samples", **kwargs)
        analyze_pairs = dpo.analyze_pairs(chains, by_id, contexts, rng)
    pairs = {"recall": recall_pairs if "recall" in cfg.pairs else [], "analyze": analyze_pairs}
    if cli.rank() == 0:
        for kind, path in paths.items():
            data.write_jsonl(path, pairs[kind])
    return pairs


def reference_logprobs(model, pairs, batch_size, device):
    """{kind: [pairs, 2]}: log pi_ref of each pair's chosen and rejected sides, scored once by the weights the policy
    starts from, sharded over the ranks (METHOD 7.4). Dropout stays off in reference and policy (TRL's
    disable_dropout; fit(dropout=False)), so the policy scores its targets as the reference did."""
    model.eval()
    return {kind: torch.cat(cli.sharded(cli.chunks(p, batch_size),
                                        lambda batch: dpo.reference_logprobs(model, batch, device)))
            for kind, p in pairs.items()}


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
    return train.Plan(n, cfg.batch_size, 0, seed, quotas, max_steps=cfg.epochs * cycle, cycle=cycle)


def dpo_step_loss(cfg, pairs, reference, device):
    """The step_loss train.fit calls: DPO + alpha * NLL (dpo.dpo_loss) of a micro-batch of one kind's pairs."""
    def step_loss(trained, step, micro_batch):
        ref_chosen, ref_rejected = reference[step.stage][micro_batch].T.to(device)
        chosen, rejected, nll = dpo.concatenated_logprobs(
            trained, *dpo.collate_pairs([pairs[step.stage][i] for i in micro_batch], device))
        # The NLL is a token mean over the whole batch's chosen targets (METHOD 7.4), however fit splits it
        chosen_tokens = lambda rows: sum(len(pairs[step.stage][i][1]) for i in rows)
        nll = nll * chosen_tokens(micro_batch) / chosen_tokens(step.indices) * len(step.indices) / len(micro_batch)
        return dpo.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, nll, cfg.beta, cfg.alpha)
    return step_loss


def reflect(cfg):
    """Iterations of DPO + NLL on preference pairs from the student's own chains (METHOD 7), each from the previous
    iteration's best model; reflect/best is the iteration with the best validation accuracy (A7)."""
    runtime = cli.setup_device(cfg.precision, cfg.seed)
    reflect_dir = os.path.join(cfg.out, "reflect")
    cli.hold_run(cfg.out)  # the acquire run's folder: reflect reads its best/
    if not cli.start_run(cfg, reflect_dir, os.path.join("iter_1", "state.pt"), FREE_ON_RESUME):
        cli.write_run_config(cfg, reflect_dir, runtime, decisions(cfg.phase, cfg.data), unused(cfg.phase))
    cli.demo("reflect", cfg.data == "world")
    questions, valid = (cli.questions(cfg.data, split, cfg.data_dir) for split in ("train", "valid"))
    records = teacher_records(cfg)
    questions = with_records(questions, records)
    previous, results = os.path.join(cfg.out, "best"), {}
    for k in range(1, cfg.iterations + 1):
        iteration_dir = os.path.join(reflect_dir, f"iter_{k}")
        done = cli.done(iteration_dir)
        if done is None:
            os.makedirs(iteration_dir, exist_ok=True)
            # Policy and reference both start from the previous iteration's best model (METHOD 7, step 3).
            model, tokenizer = cli.trained_model(previous, runtime)
            pairs = {kind: dpo.tokenize_pairs(texts, tokenizer, cfg.max_length) for kind, texts in
                     self_pairs(cfg, model, tokenizer, questions, records, iteration_dir, k).items() if texts}
            if not pairs:
                cli.say(f"iteration {k}: the student's chains gave no preference pairs; stopping")
                break
            reference = reference_logprobs(model, pairs, cfg.eval_batch_size, runtime.device)
            plan = reflect_plan(cfg, pairs, cfg.seed + k)
            cli.say(f"iteration {k}: {', '.join(f'{len(p)} {kind} pairs' for kind, p in pairs.items())}; "
                    f"{len(plan)} steps, validation every {loop(cfg, plan).eval_every}")
            best = train.fit(loop(cfg, plan), iteration_dir, model, tokenizer, plan, runtime=runtime,
                             step_loss=dpo_step_loss(cfg, pairs, reference, runtime.device), dropout=False,
                             validate=evaluate.validator(cfg, tokenizer, valid, "recall_analyze_summarize"),
                             desc=f"reflect {k}")
            done = cli.finish(iteration_dir, dict(best=best))
        results[k] = done["best"]
        previous = os.path.join(iteration_dir, "best")
    if results:
        chosen = max(results, key=results.get)  # A7: select by validation, never by test
        cli.copy_best(os.path.join(reflect_dir, f"iter_{chosen}", "best"), os.path.join(reflect_dir, "best"))
        cli.say(f"reflect: validation accuracy by iteration {results}; iteration {chosen} -> "
                f"{os.path.join(reflect_dir, 'best')}")
    cli.release_run(cfg.out)


def main(argv=None):
    def run():
        cfg = parse_config(argv)
        check(cfg)
        acquire(cfg) if cfg.phase == "acquire" else reflect(cfg)
    cli.command(run)


if __name__ == "__main__":
    main()
