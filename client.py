"""A client for any OpenAI-compatible chat-completions endpoint that pays for no answer twice: what TinyThinker's
teacher (teacher.py) and Tailored Learning's (tailored.py) send their requests through.

* Every raw response is appended to a JSONL cache, keyed by sha256 of (salt, request incl. model), and fsync'd
  before use, so a killed run repeats no answered request. Only a response of the expected shape is cached (a bad
  one is retried), and one run at a time holds the cache.
* Faults: a dropped connection, a timeout, 408/429/5xx and a malformed or oversized body are retried (Retry-After
  capped at --max-backoff); another 4xx fails that request alone, with its reason; 401/403/404, a redirect, an
  event stream or a tool call stop the run.
* The bill of a dry run is estimated at CHARS_PER_TOKEN characters per token, with no tokenizer.
"""
import errno
import hashlib
import json
import math
import os
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import requests

from data import DataError
from files import hold, read_json, release


@dataclass
class ClientConfig:
    """The endpoint, the model and its request settings, the retries and the prices; TeacherConfig adds TinyThinker's
    settings, tailored.py fills it from its own. Each field's help is its --help line (cli.add_flags; written out
    here as cli.setting writes it, client.py being below cli.py in the imports)."""
    base_url: str = field(default="https://api.openai.com/v1", metadata={
        "help": "the teacher's OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 for a local server"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={
        "help": "environment variable holding the API key (a local server may need none)"})
    model: str = field(default="gpt-4o-2024-05-13", metadata={
        "help": "the model name sent to the endpoint; a local server takes the name it serves"})
    temperature: float = field(default=0.8, metadata={"help": "sampling temperature of the teacher's completions"})
    max_tokens: int = field(default=256, metadata={
        "help": "tokens per completion; a cut-off one is requested again with twice as many"})
    workers: int = field(default=8, metadata={"help": "requests in flight at once (mind the endpoint's rate limit)"})
    timeout: float = field(default=120.0, metadata={
        "help": "seconds per HTTP request, all of it (connecting, waiting, reading)"})
    max_attempts: int = field(default=6, metadata={
        "help": "HTTP tries per request before its question is reported failed"})
    backoff: float = field(default=1.0, metadata={"help": "seconds of the first retry's backoff cap, doubled per try"})
    max_backoff: float = field(default=60.0, metadata={
        "help": "longest wait before a retry in seconds, a server's Retry-After included"})
    price_in: float = field(default=5e-6, metadata={
        "help": "US dollars per prompt token, for the bill (gpt-4o-2024-05-13's list price)"})
    price_out: float = field(default=15e-6, metadata={"help": "US dollars per completion token, for the bill"})


class InvalidCompletion(ValueError):
    """A completion that breaks the format a method's parser reads; its message is the failure reason counted in the
    summary."""


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

    def postfix(self, cfg: ClientConfig) -> dict:
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


def api_key(cfg: ClientConfig) -> str | None:
    """The key in the environment variable cfg.api_key_env; a local server may need none, the official endpoint says
    so before any request goes out."""
    key = os.environ.get(cfg.api_key_env)
    if not key and urlparse(cfg.base_url).hostname == "api.openai.com":
        raise Fatal(f"{cfg.api_key_env} is not set: {cfg.base_url} needs an API key (export {cfg.api_key_env}=..., "
                    f"or --base-url for a local server)")
    return key


MAX_RESPONSE_BYTES = 8 << 20  # a full answer (8 completions of a few thousand tokens) is well under 1 MB
FATAL_STATUS = (401, 403, 404)


def usable(body) -> bool:
    """Whether a response has the shape the methods read (each choice's message content and finish_reason): checked
    before it is cached and when the cache is read, so a malformed answer is retried, never stored or trusted."""
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

    def __init__(self, cfg: ClientConfig, api_key: str | None, meter: Meter):
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


CHARS_PER_TOKEN = 4  # OpenAI's rule of thumb for English text: the estimate needs no tokenizer


def bill(cfg: ClientConfig, prompt_chars: list[int], n: int, completion_chars: float, max_requests: int,
         out: Path) -> dict:
    """The bill of one request per prompt of n completions, at cfg.price_in/price_out, sending nothing: a dry run's,
    whose records would go to `out`. Prompt tokens are billed once per request whatever n is; a completion is
    estimated at completion_chars characters, capped at max_tokens."""
    completion = min(cfg.max_tokens, completion_chars / CHARS_PER_TOKEN)
    prompt_tokens = round(sum(prompt_chars) / CHARS_PER_TOKEN)
    completion_tokens = round(len(prompt_chars) * n * completion)
    return {"dry_run": "nothing was sent", "questions": len(prompt_chars), "requests": len(prompt_chars),
            "completions": len(prompt_chars) * n, "max_requests_with_retries": max_requests,
            "prompt_tokens_est": prompt_tokens, "completion_tokens_est": completion_tokens,
            "cost_usd_est": round(prompt_tokens * cfg.price_in + completion_tokens * cfg.price_out, 2),
            "prices_per_token": {"prompt": cfg.price_in, "completion": cfg.price_out}, "model": cfg.model,
            "out": str(out),
            "tokens": f"estimated at {CHARS_PER_TOKEN} characters per token; the first round only"}
