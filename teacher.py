"""Teacher rationales from any OpenAI-compatible chat-completions endpoint (METHOD section 3).

    python teacher.py --data csqa --split train [--base-url http://localhost:8000/v1] [--workers 8] [--limit 20]
    python teacher.py --data csqa --split train --dry-run     # questions, requests, tokens and cost; sends nothing
    python teacher.py --data path/to/mydata --split train    # your own questions (data.py's docstring: the layout)

The key is read from the environment variable named by --api-key-env (OPENAI_API_KEY); a local server may need none.

Output, the ONE teacher-records schema (read by `tinythinker.py --phase acquire`): JSONL, one line per accepted
completion (up to n per question), questions in dataset order, completions in the order they were received:
    {"id": str, "question": str, "choices": [str], "answer": "B",
     "key_information": str, "explanations": {"B": str, "A": str, ...}}
key_information and each explanation are student targets: "." appended, the "X is correct/incorrect." verdict
dropped, reason text only. The explanations keep the teacher's order (recorded for A1; data.py sorts them).
Questions that end with no accepted completion are listed in `{out stem}.failed.jsonl` and in the summary.

Decisions:
* Validity: a completion is accepted only when every option is explained exactly once and exactly the gold option
  is called correct (METHOD 3.3 plus the gold filter of 3.4). Invalid and truncated ones are re-requested in rounds
  (n = number of failures, max_tokens doubled after a truncation; 3/3/2 rounds), then counted and reported.
* A12, no gold override: the dataset label stays. The scaffold states the gold answer, so a teacher that calls
  another option correct has ignored its instructions; replacing a human label by such votes would hide teacher
  errors in the training data. Such completions count as invalid (and are re-requested), and the summary counts them.
* A17: the Levenshtein diversity filter is omitted: with n_augment = n it keeps every consistent completion anyway.
* Requests go through client.py, which caches every raw response (salted with the round) before it is used: a killed
  run repeats no answered request, and the output, rebuilt from the cache, is identical. A request that still fails
  after --max-attempts fails its question alone, with its reason.
"""
import json
import math
import os
import random
import re
import sys
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import cli
import data
from cli import setting
from client import (Cache, Client, ClientConfig, Fatal, InvalidCompletion, Meter, RequestFailed, api_key, bill,
                    cached_chat)
from data import LETTERS, DataError, Question, with_period
from files import LoadError

PROMPTS = Path(__file__).resolve().parent / "prompts.json"
N = {"csqa": 8, "obqa": 4, "strategyqa": 4}  # completions per question (METHOD 3.2)
ROUNDS = {"csqa": 3, "obqa": 3, "strategyqa": 2}  # request rounds, the first included (METHOD 3.4)


def prompt_set(name: str) -> str:
    """The key of a data set's exemplars, N and ROUNDS. Your own data set is multiple choice, and gets CSQA's: its
    exemplars are general knowledge, not OBQA's science facts, and show all five letters, so they show the format of
    any question of 2 to 5 options (the scaffold lists the question's own); N and ROUNDS go with the exemplars they
    were set for. --n and --rounds change them, --dry-run shows the bill first."""
    return name if name in N else "csqa"


@dataclass
class TeacherConfig(ClientConfig):
    """The client's settings (endpoint, model, temperature 0.8, max_tokens 256, retries, prices), then TinyThinker's."""
    data: str = setting("", "the data set: csqa, obqa, strategyqa, or a directory or .jsonl file of your own "
                        "questions")
    split: str = setting("train", "the split whose questions the teacher explains: train, valid or test")
    data_dir: str | None = setting(None, "folder of the data sets, downloaded into DIR/{data set}/original if "
                                   "missing; the records are written to DIR/{data set}/teacher_{split}.jsonl unless "
                                   "--out says otherwise (default: the repo's data/)")
    out: str | None = setting(None, "the records file (default DIR/{data set}/teacher_{split}.jsonl); the failed "
                              "questions go beside it, in {its stem}.failed.jsonl")
    cache: str | None = setting(None, "the file every raw response is kept in before use (default {out stem}"
                                ".cache.jsonl); a rerun asks only what it lacks")
    n: int | None = setting(None, "completions per question (default: CSQA and your own 8, OBQA and StrategyQA 4)")
    rounds: int | None = setting(None, "request rounds, the first included: the invalid completions are asked again "
                                 "(default: CSQA, OBQA and your own 3, StrategyQA 2)")
    prompt_seed: int = setting(0, "seed of the few-shot exemplars' order, drawn once per data set")
    limit: int | None = setting(None, "only the first N questions of the split, e.g. a smoke test (default all)")

# ---------------------------------------------------------------- prompt (METHOD 3.1)

def system_message(instruction: str, exemplars: list[dict], seed: int) -> str:
    """The instruction, then every exemplar ###-delimited, in an order drawn once per dataset; stripped."""
    shots = random.Random(seed).sample(exemplars, k=len(exemplars))
    blocks = "".join(f"\n###\n{e['Q']}\nOptions: {e['Options']}\nKey Information: {e['Key Information']}\n"
                     f"Explanations: " + "\n".join(e["Explanations"]) + "\n###\n" for e in shots)
    return (instruction + blocks).strip()


def user_message(q: Question) -> str:
    """The question with the gold answer as a scaffold: the gold option first, then the others in label order.
    Options use the exemplars' "A. x, B. y" form (the teacher sees what the few-shot examples show)."""
    letters = LETTERS[:len(q.choices)]
    options = ", ".join(f"{letter}. {text}" for letter, text in zip(letters, q.choices))
    verdicts = [f"{q.answer} is correct. Because"] + [f"{o} is incorrect. Because" for o in letters if o != q.answer]
    return f"{q.question}\nOptions: {options}\nKey Information:\nExplanations: " + "\n".join(verdicts)


# ---------------------------------------------------------------- parsing (METHOD 3.3, 3.4)

DELIMITERS = ("Because ", "Because, ", "Although ", "While ")  # the first one present splits verdict from reason
VERDICT = re.compile(r"([A-E]) is (correct|incorrect)\.")
ITALIC = re.compile(r"(?<![\w*])\*(\S(?:[^*\n]*\S)?)\*(?![\w*])")  # *x*, but not the * of "2 * 3"


def visible(text: str) -> str | None:
    """The answer a chat model shows: a reasoning model's <think> block and markdown emphasis removed; None for a
    completion cut off inside its thinking. Only the closing tag is certain to be there (a chat template may open
    the block in the prompt), so everything up to the last </think> is thinking."""
    text = text.rsplit("</think>", 1)[-1]
    if "<think>" in text:
        return None
    return ITALIC.sub(r"\1", text.replace("**", "").replace("__", ""))


def parse_completion(text: str, q: Question) -> tuple[str, dict[str, str], str]:
    """(key_information, {letter: reason} in the teacher's order, the letter called correct); METHOD 3.3.

    Line 0 holds "Key Information:"; lines 1..k (k options) are read, those without a verdict or a delimiter
    skipped; a malformed verdict fails the whole completion. Stricter than the official code: each option must be
    explained exactly once and exactly one called correct (the official code kept the last "correct"). A reasoning
    block and markdown emphasis are dropped first (visible); what is validated stays the same."""
    text = visible(text)
    if text is None:
        raise InvalidCompletion("truncated")
    text = re.sub(r"\s*Explanations:\s*", "\nExplanations: ", text)  # "Explanations:" always starts a line
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    if not lines or "Key Information:" not in lines[0]:
        raise InvalidCompletion("no Key Information on line 0")
    key_information = lines[0].split("Key Information:", 1)[1].strip()
    if not key_information:
        raise InvalidCompletion("empty Key Information")
    letters = LETTERS[:len(q.choices)]
    explanations, correct = {}, []
    for line in lines[1:len(letters) + 1]:
        line = line.removeprefix("Explanations: ")
        delimiter = next((d for d in DELIMITERS if d in line), None)
        if ("is correct" not in line and "is incorrect" not in line) or delimiter is None:
            continue
        verdict, reason = line.split(delimiter, 1)  # at the first occurrence: a second "Because " stays in the reason
        match = VERDICT.fullmatch(verdict.strip())
        if not match:
            raise InvalidCompletion("malformed verdict")
        letter = match.group(1)
        if letter not in letters or letter in explanations:
            raise InvalidCompletion("option not offered or explained twice")
        explanations[letter] = with_period(reason)
        if match.group(2) == "correct":
            correct.append(letter)
    if len(explanations) != len(letters):
        raise InvalidCompletion("not every option explained")
    if len(correct) != 1:
        raise InvalidCompletion("not exactly one option called correct")
    return with_period(key_information), explanations, correct[0]


def records_from_completions(q: Question, completions: list[str], failures: list[str] | None = None) -> list[dict]:
    """Teacher records of the valid completions; the reason of each invalid one is appended to `failures` when given
    (A12: a completion that calls another option correct is invalid; the gold label is never overridden)."""
    records = []
    for text in completions:
        try:
            key_information, explanations, answer = parse_completion(text, q)
            if answer != q.answer:
                raise InvalidCompletion("disagrees with the gold answer")
        except InvalidCompletion as e:
            if failures is not None:
                failures.append(str(e))
            continue
        records.append({"id": q.id, "question": q.question, "choices": q.choices, "answer": q.answer,
                        "key_information": key_information, "explanations": explanations})
    return records


RECORD_FIELDS = {"id": str, "question": str, "choices": list, "answer": str, "key_information": str,
                 "explanations": dict}


def read_records(path) -> list[dict]:
    """Teacher records from a JSONL file, each checked against the schema (data.DataError names file, line, field)."""
    records = []
    for number, record in data.jsonl_objects(path):
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: not a JSON object")
        for name, kind in RECORD_FIELDS.items():
            if not isinstance(record.get(name), kind):
                raise DataError(f"{path}:{number}: field {name!r} missing or not a {kind.__name__}")
        letters = LETTERS[:len(record["choices"])]
        if record["answer"] not in letters or sorted(record["explanations"]) != list(letters):
            raise DataError(f"{path}:{number}: answer/explanations do not match the {len(letters)} choices")
        records.append(record)
    return records


# ---------------------------------------------------------------- one question, the whole run


def teach(q: Question, system: str, cfg: TeacherConfig, client: Client, cache: Cache) -> tuple[list[dict], list[str]]:
    """The request rounds of METHOD 3.4 for one question: records of all rounds pooled, and the failure reasons
    of the completions still invalid after the last round."""
    records, n, max_tokens = [], cfg.n, cfg.max_tokens
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user_message(q)}]
    for round_ in range(cfg.rounds):
        payload = {"model": cfg.model, "messages": messages, "temperature": cfg.temperature,
                   "max_tokens": max_tokens, "n": n}
        try:  # the round salts the key: a retry may repeat the previous round's payload and needs fresh samples
            response = cached_chat(payload, round_, client, cache)
        except RequestFailed as e:
            return records, [str(e)]
        choices = response["choices"]
        texts = [c["message"].get("content") or "" for c in choices]
        # truncated: cut off by max_tokens, or (a reasoning model) while still thinking
        done = [t for c, t in zip(choices, texts) if c.get("finish_reason") != "length" and visible(t) is not None]
        failures = []
        new = records_from_completions(q, done, failures)
        # a server that ignores n (some local ones do) returns fewer choices: the missing ones are failures too
        failures += ["truncated"] * (len(choices) - len(done)) + ["missing choice"] * max(0, n - len(choices))
        records += new
        if not failures:
            break
        n = len(failures)
        if len(done) < len(choices):  # truncated: give the retry room to finish
            max_tokens *= 2
    return records, failures


def counts(cfg: TeacherConfig) -> tuple[int, int]:
    """Completions per question and request rounds: the command line's, else the data set's (prompt_set)."""
    return cfg.n or N[prompt_set(cfg.data)], cfg.rounds or ROUNDS[prompt_set(cfg.data)]


def check(cfg: TeacherConfig):
    """One line for a setting that cannot work, before anything is read, written or sent (a dry run too)."""
    for name in ("workers", "max_attempts", "max_tokens", "n", "rounds", "limit"):  # n, rounds, limit may be None
        value = getattr(cfg, name)
        if value is not None and value < 1:
            raise Fatal(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if not 0 < cfg.timeout < math.inf:
        raise Fatal(f"--timeout must be a number of seconds above 0, not {cfg.timeout}")
    for name in ("temperature", "backoff", "max_backoff", "price_in", "price_out"):
        if not 0 <= getattr(cfg, name) < math.inf:
            raise Fatal(f"--{name.replace('_', '-')} must be a number of at least 0, not {getattr(cfg, name)}")
    if not 0 <= cfg.prompt_seed < cli.SEEDS:
        raise Fatal(f"--prompt-seed must be from 0 to {cli.SEEDS - 1}, not {cfg.prompt_seed}")


def output_files(cfg: TeacherConfig) -> tuple[Path, Path, Path]:
    """(records, cache, failed list): --out (default {data_dir}/{data set}/teacher_{split}.jsonl), --cache (default
    {out stem}.cache.jsonl) and {out stem}.failed.jsonl, checked to be files apart from each other, from the cache's
    lock and from every file the run reads: one written over another would lose paid answers or questions."""
    out = Path(cfg.out or Path(cfg.data_dir or data.DEFAULT_DIR) / data.dataset_name(cfg.data) /
               f"teacher_{cfg.split}.jsonl")
    cache = Path(cfg.cache or out.with_suffix(".cache.jsonl"))
    failed = out.with_suffix(".failed.jsonl")
    files = [(out, "--out"), (cache, "--cache"), (failed, "the failed list"),
             (Path(f"{cache}.lock"), "the cache's lock"), (PROMPTS, "the prompts"),
             *((path, "the data set") for path in data.input_files(cfg.data, cfg.data_dir))]
    seen = {}
    for path, role in files:
        other = seen.setdefault(os.path.realpath(path), role)
        if other != role:
            raise Fatal(f"{path} would be both {other} and {role}; pass --out (and --cache) naming other files")
    return out, cache, failed


def prompt_and_questions(cfg: TeacherConfig) -> tuple[str, list[Question]]:
    """The data set's system message and the questions to ask (the split, cut to --limit), for a run or its bill."""
    check(cfg)
    data.check_name(cfg.data)
    if cfg.data == "world":
        raise Fatal("the world's teacher is built into world.py; tinythinker.py --data world needs no teacher.py run")
    data.check_choices(cfg.data)  # the scaffold judges options
    if cfg.split not in data.SPLITS:
        raise Fatal(f"--split must be train, valid or test, not {cfg.split!r}")
    prompts = json.loads(PROMPTS.read_text())
    system = system_message(prompts["instruction"], prompts["exemplars"][prompt_set(cfg.data)], cfg.prompt_seed)
    return system, data.load(cfg.data, cfg.split, cfg.data_dir)[:cfg.limit]


def run(cfg: TeacherConfig) -> dict:
    """Teach every question of the split; write records and failures in question order; return the summary."""
    system, questions = prompt_and_questions(cfg)
    key = api_key(cfg)
    cfg.n, cfg.rounds = counts(cfg)
    name = data.dataset_name(cfg.data)
    out, cache_path, failed_path = output_files(cfg)
    cache = Cache(cache_path)
    meter = Meter()
    client = Client(cfg, key, meter)
    results = [None] * len(questions)
    pool = ThreadPoolExecutor(cfg.workers)
    try:
        futures = {pool.submit(teach, q, system, cfg, client, cache): i for i, q in enumerate(questions)}
        pending = set(futures)
        with tqdm(total=len(questions), unit="q", desc=f"teacher {name}/{cfg.split}") as bar:
            while pending:  # wake every second: the bar shows a long retry wait while it lasts
                done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                for future in done:
                    results[futures[future]] = future.result()
                bar.update(len(done))
                bar.set_postfix(meter.postfix(cfg))  # redraws even when nothing was done (update(0) may not)
    except BaseException as e:
        meter.stop.set()  # waiting workers give up; queued questions are dropped: an error stops the run
        # Ctrl-C returns at once (main exits, every answer is on disk); an error lets the requests in flight end
        pool.shutdown(wait=not isinstance(e, KeyboardInterrupt), cancel_futures=True)
        cache.close()
        raise
    pool.shutdown()
    records = [r for rs, _ in results for r in rs]
    failed = [{"id": q.id, "reasons": reasons} for q, (rs, reasons) in zip(questions, results) if not rs]
    out.parent.mkdir(parents=True, exist_ok=True)
    data.write_jsonl(out, records)
    data.write_jsonl(failed_path, failed)
    c = meter.counts
    summary = {"questions": len(questions), "records": len(records), "failed_questions": len(failed),
               "invalid_left": dict(Counter(reason for _, reasons in results for reason in reasons)),
               "requests_sent": c["sent"], "answered": c["answered"], "cached": c["cached"],
               "errors": {k[6:]: v for k, v in c.items() if k.startswith("error ")},
               "prompt_tokens": c["prompt_tokens"], "completion_tokens": c["completion_tokens"],
               "cost_usd": round(c["prompt_tokens"] * cfg.price_in + c["completion_tokens"] * cfg.price_out, 4),
               "out": str(out)}
    cache.close()  # held until the output is written: a second run waits for this one's
    tqdm.write(json.dumps(summary, indent=1))
    return summary



def estimate(cfg: TeacherConfig) -> dict:
    """The bill before paying it: the questions, requests and tokens of a run's first round (bill), a completion as
    long as the few-shot exemplars' answers (Key Information and explanations). Retry rounds re-request only the
    invalid completions (at most cfg.rounds - 1 more requests per question)."""
    system, questions = prompt_and_questions(cfg)
    n, rounds = counts(cfg)
    answers = [f"Key Information: {e['Key Information']}\nExplanations: " + "\n".join(e["Explanations"])
               for e in json.loads(PROMPTS.read_text())["exemplars"][prompt_set(cfg.data)]]
    return bill(cfg, [len(system) + len(user_message(q)) for q in questions], n, sum(map(len, answers)) / len(answers),
                len(questions) * rounds, output_files(cfg)[0])


def main(argv=None):
    parser = cli.Parser(description="Teacher rationales (METHOD section 3).")
    parser.add_argument("--dry-run", action="store_true", help="print the questions, requests, tokens and cost "
                        "a run would need, and send nothing")
    cli.add_flags(parser, TeacherConfig)
    args = cli.given_flags(parser, argv)
    dry_run = args.pop("dry_run", None)
    try:
        if dry_run:
            return print(json.dumps(estimate(TeacherConfig(**args)), indent=1))
        run(TeacherConfig(**args))
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue (answered requests are cached)",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # at once: a worker may be inside a request, and every answer received is already on disk
    except (DataError, LoadError) as e:  # Fatal too; a cache another run holds
        raise SystemExit(f"teacher.py: {e}") from None
    except OSError as e:  # a file that could not be written: a full disk, a read-only folder
        if e.filename is None:
            raise
        raise SystemExit(f"teacher.py: {e.filename}: {e.strerror}") from None


if __name__ == "__main__":
    main()
