"""Teacher rationales from any OpenAI-compatible chat-completions endpoint (METHOD section 3).

    python teacher.py --data csqa --split train [--base-url http://localhost:8000/v1] [--workers 8] [--limit 20]
    python teacher.py --data csqa --split train --dry-run     # questions, requests, tokens and cost; sends nothing
    python teacher.py --data path/to/mydata --split train    # your own questions (data.py's docstring: the layout)
    python teacher.py --make-prompts TinyThinker/datasets   # regenerate prompts.json from the official repo's datasets/

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
* Every raw response is appended to a JSONL cache, keyed by sha256 of (round, request incl. model), and fsync'd
  before use, so a killed run repeats no answered request; the output is rebuilt from the cache and is identical.
  Only a response of the expected shape is cached (a bad one is retried), and one run at a time holds the cache.
* Faults: a dropped connection, a timeout, 408/429/5xx and a malformed or oversized body are retried (Retry-After
  capped at --max-backoff); another 4xx fails that question alone, with its reason; 401/403/404 stop the run.
"""
import errno
import hashlib
import json
import math
import os
import random
import re
import socket
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests
from tqdm import tqdm

import cli
import data
from data import LETTERS, DataError, Question, with_period
from files import LoadError, atomic_write, hold, read_json, release

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
class TeacherConfig:
    data: str = ""
    split: str = "train"
    data_dir: str | None = None
    out: str | None = None  # default {data_dir}/{data.dataset_name(data)}/teacher_{split}.jsonl
    cache: str | None = None  # default {out stem}.cache.jsonl
    base_url: str = "https://api.openai.com/v1"
    api_key_env: str = "OPENAI_API_KEY"
    model: str = "gpt-4o-2024-05-13"
    temperature: float = 0.8
    max_tokens: int = 256
    n: int | None = None  # default N[prompt_set(data)]
    rounds: int | None = None  # default ROUNDS[prompt_set(data)]
    prompt_seed: int = 0  # draws the few-shot order, once per dataset
    workers: int = 8
    timeout: float = 120.0  # seconds per HTTP request, all of it (connecting, waiting, reading)
    max_attempts: int = 6  # HTTP tries per request before the question is reported failed
    backoff: float = 1.0  # first backoff cap in seconds, doubled per attempt
    max_backoff: float = 60.0
    price_in: float = 5e-6  # $ per prompt token (gpt-4o-2024-05-13 list price)
    price_out: float = 15e-6  # $ per completion token
    limit: int | None = None  # only the first `limit` questions


# ---------------------------------------------------------------- prompt (METHOD 3.1)

def make_prompts(datasets_dir, path=PROMPTS):
    """Write prompts.json (instruction + few-shot exemplars per dataset) from the official repo's datasets/ folder,
    so that a fresh clone needs no copy of the data."""
    root = Path(datasets_dir)
    prompts = {"instruction": json.loads((root / "request.json").read_text())["Key"], "exemplars": {}}
    for name in N:
        exemplars = json.loads((root / name / "prompt" / f"{name}_cot.json").read_text())
        keep = ("Q", "Options", "Key Information", "Explanations")  # "Reference" is not part of the prompt
        prompts["exemplars"][name] = [{k: e[k] for k in keep} for e in exemplars]
    atomic_write(path, (json.dumps(prompts, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


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

class InvalidCompletion(ValueError):
    """A completion that breaks the teacher format; its message is the failure reason counted in the summary."""


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


# ---------------------------------------------------------------- HTTP client, cache, meter

class Meter:
    """Thread-safe running totals and retry waits for the bar and the summary; `stop` cuts every wait short."""

    def __init__(self):
        self.counts, self.lock, self.start = Counter(), threading.Lock(), time.monotonic()
        self.waits, self.stop = {}, threading.Event()

    def add(self, **amounts):
        with self.lock:
            self.counts.update(amounts)

    def pause(self, seconds: float):
        """Sleep before a retry, shown on the bar (a capped Retry-After can still be a minute)."""
        me = threading.get_ident()
        with self.lock:
            self.waits[me] = time.monotonic() + seconds
        self.stop.wait(seconds)
        with self.lock:
            del self.waits[me]

    def postfix(self, cfg: TeacherConfig) -> dict:
        c, now = self.counts, time.monotonic()
        cost = c["prompt_tokens"] * cfg.price_in + c["completion_tokens"] * cfg.price_out
        shown = dict(req_s=f"{c['sent'] / (now - self.start):.1f}", cost=f"${cost:.2f}")
        with self.lock:
            if self.waits:
                shown["wait"] = f"{max(self.waits.values()) - now:.0f}s"
        return shown


class TransientError(Exception):
    """Worth retrying (408, 429, 5xx, connection error, timeout, malformed or oversized body); carries Retry-After."""

    def __init__(self, kind, retry_after=None):
        super().__init__(kind)
        self.kind, self.retry_after = kind, retry_after


class RequestFailed(Exception):
    """A question's request that did not succeed: still transient-failing after max_attempts, or refused for this
    request alone (HTTP 400: context length, content filter). Its question is reported, not cached: a rerun asks."""


class Fatal(DataError):
    """A fault that concerns every request (key, permission, URL, model, an endpoint that answers in another form):
    the run stops at once, with one line (DataError, as a file that cannot be used)."""


MAX_RESPONSE_BYTES = 8 << 20  # a full answer (8 completions of a few thousand tokens) is well under 1 MB
FATAL_STATUS = (401, 403, 404)


def usable(body) -> bool:
    """Whether a response has the shape teach() reads: checked before it is cached and when the cache is read, so a
    malformed answer is retried, never stored or trusted."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return False
    optional_str = (str, type(None))
    for choice in body["choices"]:
        if not isinstance(choice, dict) or not isinstance(choice.get("message"), dict):
            return False
        message = choice["message"]  # reasoning_content: the thinking of a reasoning model, when served apart
        if not all(isinstance(message.get(k), optional_str) for k in ("content", "reasoning_content")):
            return False
        if not utf8((message.get("content") or "") + (message.get("reasoning_content") or "")):
            return False  # a lone surrogate ("\\ud800" in the JSON): the records could never be written
        if not isinstance(choice.get("finish_reason"), optional_str):
            return False
    usage = body.get("usage")
    return usage is None or isinstance(usage, dict) and all(
        isinstance(usage.get(k, 0), int) for k in ("prompt_tokens", "completion_tokens"))


def utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def read_body(response: requests.Response, deadline: float) -> bytes:
    """The body of a streamed response, at most MAX_RESPONSE_BYTES, read before the deadline. --timeout alone bounds
    each socket read, which a server trickling a byte at a time never trips: a watchdog shuts the socket at the
    deadline, which ends the blocked read."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > MAX_RESPONSE_BYTES:
        raise TransientError("response too large")
    try:  # our own handle on the connection's socket, for the watchdog (the response may close its own)
        sock = socket.socket(fileno=os.dup(response.raw.fileno()))
    except (OSError, AttributeError):  # no body left to read (http.client drops the file of an empty one)
        sock = None

    def cut():
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except (AttributeError, OSError):  # no socket, or closed already
            pass
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), cut)
    watchdog.start()
    try:
        body = bytearray()
        for chunk in response.iter_content(1 << 16):
            body += chunk
            if len(body) > MAX_RESPONSE_BYTES:
                raise TransientError("response too large")
    except requests.RequestException:
        if time.monotonic() >= deadline:
            raise TransientError("deadline exceeded") from None
        raise
    finally:
        watchdog.cancel()
        if sock:
            sock.close()
    if time.monotonic() >= deadline:  # a body cut off by the watchdog may still look complete
        raise TransientError("deadline exceeded")
    return bytes(body)


def error_message(raw: bytes) -> str:
    """The reason an endpoint gives for refusing a request (OpenAI's {"error": {"message"}}, else the text)."""
    try:
        message = read_json(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = raw.decode("utf-8", "replace")
    return " ".join(str(message).split())[:200]


class Client:
    """POST /chat/completions with capped retries: exponential backoff with full jitter, Retry-After honoured up to
    max_backoff."""

    def __init__(self, cfg: TeacherConfig, api_key: str | None, meter: Meter):
        self.url = cfg.base_url.rstrip("/") + "/chat/completions"
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}  # kept in memory only
        self.cfg, self.meter = cfg, meter

    def _post(self, payload: dict) -> dict:
        self.meter.add(sent=1)
        deadline = time.monotonic() + self.cfg.timeout
        try:
            status, headers, raw = self._exchange(payload, deadline)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                requests.exceptions.ContentDecodingError) as e:  # dropped mid-body: ChunkedEncodingError
            raise TransientError(type(e).__name__) from None
        except requests.RequestException as e:  # an invalid URL or the like: no request can succeed
            raise Fatal(f"{self.url}: {e}") from None
        if status in (408, 429) or status >= 500:
            raise TransientError(f"HTTP {status}", headers.get("Retry-After"))
        if 300 <= status < 400:  # not followed: requests would resend a 301/302's POST as a GET
            self.stop(f"HTTP {status} redirects to {headers.get('Location')}; pass the --base-url it points to")
        if status in FATAL_STATUS:  # the key, the permissions, the URL or the model: no request can succeed
            self.stop(f"HTTP {status}: {error_message(raw)}")
        if status != 200:  # about this request alone (context length, content filter): its question fails
            self.meter.add(**{f"error HTTP {status}": 1})
            raise RequestFailed(f"HTTP {status}: {error_message(raw)}")
        if headers.get("Content-Type", "").startswith("text/event-stream") or raw.lstrip().startswith(b"data:"):
            self.stop("the endpoint streams server-sent events, which the request does not ask for (no \"stream\"); "
                      "it needs a setting to answer with one JSON body")
        try:
            body = read_json(raw)
        except ValueError:
            raise TransientError("malformed response") from None
        if not usable(body):
            raise TransientError("malformed response")
        if any(c["message"].get("content") is None and c["message"].get("tool_calls") for c in body["choices"]):
            self.stop("the model answered with a tool call (content null), though the request offers no tools: the "
                      "endpoint adds them; it needs to answer with text")
        return body

    def stop(self, cause: str):
        """A Fatal for the way the endpoint answers every request: the other workers send nothing more."""
        self.meter.stop.set()
        raise Fatal(f"{self.url}: {cause}")

    def _exchange(self, payload: dict, deadline: float):
        """(status, headers, body) of one POST, or its exception, by the deadline. read_body's watchdog ends a
        trickling body; headers trickled before requests hands over the socket cannot be cut, so at the deadline
        their daemon thread is left behind (it dies with the process) and the request counts as timed out."""
        outcome = {}

        def send():
            try:
                with requests.post(self.url, json=payload, headers=self.headers, timeout=self.cfg.timeout,
                                   stream=True, allow_redirects=False) as response:
                    events = response.headers.get("Content-Type", "").startswith("text/event-stream")  # may not end
                    outcome["value"] = (response.status_code, response.headers,
                                        b"" if events else read_body(response, deadline))
            except Exception as e:  # re-raised in the caller's thread
                outcome["error"] = e
        thread = threading.Thread(target=send, daemon=True)
        thread.start()
        thread.join(max(0.0, deadline - time.monotonic()) + 1.0)  # the extra second lets the watchdog report first
        if thread.is_alive():
            raise TransientError("deadline exceeded")
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def _delay(self, error: TransientError, attempt: int) -> float:
        try:
            delay = float(error.retry_after)
            if math.isnan(delay):
                raise ValueError
        except (TypeError, ValueError):  # absent, or an HTTP date: fall back to our own backoff
            delay = random.uniform(0, self.cfg.backoff * 2 ** attempt)
        return min(max(delay, 0.0), self.cfg.max_backoff)  # "Retry-After: 3600" (or inf) waits max_backoff

    def chat(self, payload: dict) -> dict:
        for attempt in range(1, self.cfg.max_attempts + 1):
            if self.meter.stop.is_set():
                raise RequestFailed("stopped")
            try:
                return self._post(payload)
            except TransientError as e:
                self.meter.add(**{f"error {e.kind}": 1})
                if attempt == self.cfg.max_attempts:
                    raise RequestFailed(f"request failed: {e.kind} after {attempt} attempts") from None
                self.meter.pause(self._delay(e, attempt - 1))


class Cache:
    """Append-only JSONL {"model", "key", "response"}; each line is fsync'd before its response is used. A run holds
    `{cache}.lock` (files.hold: released when the process ends, however it ends) until it closes the cache."""

    def __init__(self, path: Path):
        self.lock, self.responses = threading.Lock(), {}
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.holder = path, path.with_name(path.name + ".lock")
        hold(self.holder, path)
        try:
            self._load(path)
            self.file = open(path, "ab", buffering=0)  # unbuffered: put knows what reached the disk
        except BaseException:
            release(self.holder)
            raise

    def _load(self, path: Path):
        if not path.exists():
            return
        raw = path.read_bytes()
        if not raw.endswith(b"\n"):  # a run killed mid-write left a torn last line: drop it
            raw = raw[:raw.rfind(b"\n") + 1]
            os.truncate(path, len(raw))
        for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), 1):
            try:
                entry = read_json(line)
            except ValueError:
                entry = None
            if not (isinstance(entry, dict) and isinstance(entry.get("key"), str) and "response" in entry):
                raise DataError(f"{path}:{number}: not a cache entry")
            if usable(entry["response"]):  # an entry from before responses were checked is asked again
                self.responses[entry["key"]] = entry["response"]

    def put(self, model: str, key: str, response: dict):
        line = (json.dumps({"model": model, "key": key, "response": response}) + "\n").encode()
        with self.lock:
            end = self.file.seek(0, os.SEEK_END)
            try:
                if self.file.write(line) != len(line):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                os.fsync(self.file.fileno())
            except OSError as e:  # a full disk: the part written is taken back (the entries before stay readable),
                self.file.truncate(end)  # and the run stops, naming the file; the answer is not used
                raise Fatal(f"{self.path}: {e.strerror}") from None
            self.responses[key] = response

    def close(self):
        with self.lock:  # after a write in progress
            self.file.close()
            release(self.holder)


# ---------------------------------------------------------------- one question, the whole run

def cached_chat(payload: dict, salt, client: Client, cache: Cache) -> dict:
    """The response to `payload`, from the cache or else from the endpoint and then on disk before it is used, so a
    resumed run pays for no answered request twice. `salt` keeps apart requests whose payloads are equal."""
    key = hashlib.sha256(json.dumps([salt, payload], sort_keys=True).encode()).hexdigest()
    response = cache.responses.get(key)
    if response is not None:
        client.meter.add(cached=1)
        return response
    response = client.chat(payload)
    cache.put(payload["model"], key, response)
    usage = response.get("usage") or {}
    client.meter.add(answered=1, prompt_tokens=usage.get("prompt_tokens", 0),
                     completion_tokens=usage.get("completion_tokens", 0))
    return response


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
    api_key = os.environ.get(cfg.api_key_env)
    if not api_key and urlparse(cfg.base_url).hostname == "api.openai.com":  # say so before any request goes out
        raise Fatal(f"{cfg.api_key_env} is not set: {cfg.base_url} needs an API key (export {cfg.api_key_env}=..., "
                    f"or --base-url for a local server)")
    cfg.n, cfg.rounds = counts(cfg)
    name = data.dataset_name(cfg.data)
    out, cache_path, failed_path = output_files(cfg)
    cache = Cache(cache_path)
    meter = Meter()
    client = Client(cfg, api_key, meter)
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


CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text: the estimate needs no tokenizer


def bill(cfg: TeacherConfig, prompt_chars: list[int], n: int, completion_chars: float, max_requests: int) -> dict:
    """The bill of one request per prompt of n completions, at cfg.price_in/price_out, sending nothing (tailored.py's
    dry run too). Prompt tokens are billed once per request whatever n is; a completion is estimated at
    completion_chars characters, capped at max_tokens."""
    completion = min(cfg.max_tokens, completion_chars / CHARS_PER_TOKEN)
    prompt_tokens = round(sum(prompt_chars) / CHARS_PER_TOKEN)
    completion_tokens = round(len(prompt_chars) * n * completion)
    return {"dry_run": "nothing was sent", "questions": len(prompt_chars), "requests": len(prompt_chars),
            "completions": len(prompt_chars) * n, "max_requests_with_retries": max_requests,
            "prompt_tokens_est": prompt_tokens, "completion_tokens_est": completion_tokens,
            "cost_usd_est": round(prompt_tokens * cfg.price_in + completion_tokens * cfg.price_out, 2),
            "prices_per_token": {"prompt": cfg.price_in, "completion": cfg.price_out}, "model": cfg.model,
            "out": str(output_files(cfg)[0]),
            "tokens": f"estimated at {CHARS_PER_TOKEN} characters per token; the first round only"}


def estimate(cfg: TeacherConfig) -> dict:
    """The bill before paying it: the questions, requests and tokens of a run's first round (bill), a completion as
    long as the few-shot exemplars' answers (Key Information and explanations). Retry rounds re-request only the
    invalid completions (at most cfg.rounds - 1 more requests per question)."""
    system, questions = prompt_and_questions(cfg)
    n, rounds = counts(cfg)
    answers = [f"Key Information: {e['Key Information']}\nExplanations: " + "\n".join(e["Explanations"])
               for e in json.loads(PROMPTS.read_text())["exemplars"][prompt_set(cfg.data)]]
    return bill(cfg, [len(system) + len(user_message(q)) for q in questions], n, sum(map(len, answers)) / len(answers),
                len(questions) * rounds)


def main(argv=None):
    parser = cli.Parser(description="Teacher rationales (METHOD section 3).")
    parser.add_argument("--make-prompts", metavar="DATASETS_DIR", help="regenerate prompts.json and exit")
    parser.add_argument("--dry-run", action="store_true", help="print the questions, requests, tokens and cost "
                        "a run would need, and send nothing")
    cli.add_flags(parser, TeacherConfig)
    args = cli.given_flags(parser, argv)
    datasets_dir, dry_run = args.pop("make_prompts", None), args.pop("dry_run", None)
    if datasets_dir:
        return make_prompts(datasets_dir)
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
