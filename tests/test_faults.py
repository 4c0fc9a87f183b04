"""Faults and bad input (tests/README.md, "Faults and bad input"): what real endpoints do to the teacher client,
broken data files, and user mistakes on the command line. Each README row names the test here that backs it."""
import ctypes
import dataclasses
import errno
import io
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import cli
import client
import data
import evaluate
import files
import tailored
import teacher
import tinythinker
import train
from data import Question
from t5 import T5, T5Config
from test_teacher import Server, body, completion, write_obqa
from test_tinythinker import args, read_log, world  # noqa: F401  (world: the handful fixture)

ROOT = Path(__file__).resolve().parents[1]


# -------------------------------------------------- how real endpoints misbehave (test_teacher.Server serves them)

def dropped_mid_body(handler):
    """Chunked transfer, connection closed inside a chunk: requests raises ChunkedEncodingError."""
    handler.send_response(200)
    handler.send_header("Transfer-Encoding", "chunked")
    handler.end_headers()
    handler.wfile.write(b"400\r\n" + b'{"choices": [' + b" " * 50)


def trickle(content):
    def answer(handler):  # a byte every 50 ms: each read is quick, the whole answer would take minutes
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(content)))
        handler.end_headers()
        for i in range(len(content)):
            handler.wfile.write(content[i:i + 1])
            handler.wfile.flush()
            time.sleep(0.05)
    return answer


def trickled_headers(handler):
    """The status line and headers a byte every 50 ms, before requests has a response to hand over."""
    content = body([completion(gold="C")])
    head = f"HTTP/1.0 200 OK\r\nContent-Length: {len(content)}\r\n\r\n".encode()
    for i in range(len(head)):
        handler.wfile.write(head[i:i + 1])
        handler.wfile.flush()
        time.sleep(0.05)
    handler.wfile.write(content)


def huge(handler):
    """1 MB of valid JSON, no Content-Length: only counting the bytes read can stop it."""
    handler.send_response(200)
    handler.end_headers()
    handler.wfile.write(body([completion(gold="C", ki="Key Information: " + "x" * (1 << 20))]))


def markdown(text):
    """A chat model's emphasis: **Key Information:**, **C is correct.**, *italic*."""
    for letter in "ABCD":
        for verdict in ("correct", "incorrect"):
            text = text.replace(f"{letter} is {verdict}.", f"**{letter} is {verdict}.**")
    return text.replace("Key Information:", "**Key Information:**").replace("reason", "*reason*")


def choice(content, finish="stop", **message):
    return {"index": 0, "message": {"role": "assistant", "content": content, **message}, "finish_reason": finish}


def answer_with(choices):
    return 200, {}, json.dumps({"choices": choices, "usage": {"prompt_tokens": 100, "completion_tokens": 10}}).encode()


FIRST_TRY = {  # each fault once, on the first request of its question; then a normal answer
    "qdropped": dropped_mid_body,
    "qmessage_str": answer_with([{"index": 0, "message": "C is correct", "finish_reason": "stop"}]),
    "qmessage_null": answer_with([{"index": 0, "message": None, "finish_reason": "stop"}]),
    "qcontent_list": answer_with([choice([{"type": "text", "text": completion(gold="C")}])]),
    "qretry_inf": (429, {"Retry-After": "inf"}, b"{}"),
    "qretry_hour": (503, {"Retry-After": "3600"}, b"{}"),
    "qtrickle": trickle(body([completion(gold="C")])),
    "qtrickle_headers": trickled_headers,
    "qhuge": huge,
    # cut off inside its thinking: by max_tokens, and with a "stop" that left <think> open
    "qthink_cut": answer_with([choice("<think>\nFirst, A is correct. Because", "length"),
                               choice("<think>\nHmm, C is correct. Because", "stop"),
                               choice(completion(gold="C"))]),
}
STEMS = [*FIRST_TRY, "q400", "qthink", "qreasoning"]


def misbehaving(stem, count, payload):
    n = payload["n"]
    if stem == "q400":  # about this request alone, every time
        refusal = {"error": {"message": "This model's maximum context length is 8192 tokens."}}
        return 400, {}, json.dumps(refusal).encode()
    if stem == "qthink":  # a reasoning model thinking in content, with markdown emphasis
        text = "<think>\nThe scaffold says C.\nA is correct. Because no\n</think>\n\n" + markdown(completion(gold="C"))
        return answer_with([choice(text)] * n)
    if stem == "qreasoning":  # thinking served apart, as vLLM's reasoning parser does
        return answer_with([choice(markdown(completion(gold="C")), reasoning_content="Let me think.")] * n)
    if count == 0 and stem in FIRST_TRY:
        return FIRST_TRY[stem]
    return 200, {}, body([completion(gold="C")] * n)


def test_teacher_survives_misbehaving_endpoints_and_a_rerun_is_identical(tmp_path, monkeypatch):
    write_obqa(tmp_path, STEMS)
    pauses = []
    monkeypatch.setattr(client.Meter, "pause", lambda self, seconds: pauses.append(seconds))
    monkeypatch.setattr(client, "MAX_RESPONSE_BYTES", 256 << 10)
    with Server(misbehaving) as server:
        cfg = dict(data="obqa", data_dir=str(tmp_path), out=str(tmp_path / "t.jsonl"), base_url=server.url, n=3,
                   rounds=3, max_tokens=64, workers=4, timeout=1.0, max_attempts=3, backoff=0.001, max_backoff=5.0)
        summary = teacher.run(teacher.TeacherConfig(**cfg))
        first = server.stems()
        output = {p: (tmp_path / p).read_bytes() for p in ("t.jsonl", "t.failed.jsonl")}
        server.log.clear()
        teacher.run(teacher.TeacherConfig(**cfg))
        assert server.stems() == ["q400"]  # the rerun asks only the failed question again: nothing bad was cached
    assert {p: (tmp_path / p).read_bytes() for p in output} == output

    assert {s: first.count(s) for s in STEMS} == {**{s: 2 for s in FIRST_TRY}, "q400": 1, "qthink": 1, "qreasoning": 1}
    assert summary["errors"] == {"ChunkedEncodingError": 1, "malformed response": 3, "HTTP 429": 1, "HTTP 503": 1,
                                 "deadline exceeded": 2, "response too large": 1, "HTTP 400": 1}
    assert pauses.count(5.0) == 2 and all(p < 0.01 for p in pauses if p != 5.0)  # inf and 3600 capped at 5 s
    records = [json.loads(line) for line in output["t.jsonl"].splitlines()]
    assert {s: sum(r["id"] == s for r in records) for s in STEMS} == {**{s: 3 for s in STEMS}, "q400": 0}
    assert [json.loads(line) for line in output["t.failed.jsonl"].splitlines()] == [
        {"id": "q400", "reasons": ["HTTP 400: This model's maximum context length is 8192 tokens."]}]
    assert summary["invalid_left"] == {"HTTP 400: This model's maximum context length is 8192 tokens.": 1}
    thinking = next(r for r in records if r["id"] == "qthink")
    assert thinking["key_information"] == "fish need water." and thinking["explanations"]["C"] == "reason for C."
    cache = (tmp_path / "t.cache.jsonl").read_text().splitlines()
    assert all(client.usable(json.loads(line)["response"]) for line in cache) and len(cache) == 13
    assert (tmp_path / "t.cache.jsonl").stat().st_size < 64 << 10  # the 1 MB answer was never stored


def test_a_cut_off_thinking_is_retried_with_room_to_finish(tmp_path):
    write_obqa(tmp_path, ["qthink_cut"])
    with Server(misbehaving) as server:
        summary = teacher.run(teacher.TeacherConfig(data="obqa", data_dir=str(tmp_path), out=str(tmp_path / "t.jsonl"),
                                                    base_url=server.url, n=3, max_tokens=64, rounds=3))
    assert [(e["n"], e["max_tokens"]) for e in server.log] == [(3, 64), (2, 128)]  # both cut ones count as truncated
    assert summary["records"] == 3


def test_a_bad_cached_response_counts_as_absent(tmp_path):
    path = tmp_path / "c.jsonl"
    bad = {"choices": [{"message": "text", "finish_reason": "stop"}]}
    good = json.loads(body([completion(gold="C")]))
    path.write_text("".join(json.dumps({"model": "m", "key": k, "response": r}) + "\n"
                            for k, r in [("k1", bad), ("k2", good), ("k1", {"choices": [choice(None)]})]))
    cache = client.Cache(path)
    assert cache.responses == {"k2": good, "k1": {"choices": [choice(None)]}}  # a later good answer still counts
    cache.close()


@pytest.mark.parametrize("status", [401, 403, 404])
def test_an_error_about_every_request_stops_at_once(tmp_path, status):
    write_obqa(tmp_path, ["q1", "q2", "q3"])
    with Server(lambda stem, count, payload: (status, {}, b'{"error": {"message": "Incorrect API key provided"}}')) \
            as server:
        with pytest.raises(SystemExit, match=f"HTTP {status}: Incorrect API key provided"):
            teacher.main(["--data", "obqa", "--data-dir", str(tmp_path), "--out", str(tmp_path / "t.jsonl"),
                          "--base-url", server.url, "--workers", "1"])
    assert len(server.log) == 1 and not (tmp_path / "t.jsonl").exists()


def events(handler):
    """A 200 that streams server-sent events, as to "stream": true, and does not end."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/event-stream")
    handler.end_headers()
    handler.wfile.write(b'data: {"choices": [{"delta": {"content": "Key"}}]}\n\n')


TOOL_CALL = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
    "role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
        "name": "answer", "arguments": "{}"}}]}}]}


@pytest.mark.parametrize("answer, message", [
    (events, "the endpoint streams server-sent events, which the request does not ask for"),
    ((200, {}, b'data: {"choices": []}\n\ndata: [DONE]\n\n'), "the endpoint streams server-sent events"),  # untyped
    *[((status, {"Location": "https://api.example.com/v1/chat/completions"}, b""),
       f"HTTP {status} redirects to https://api.example.com/v1/chat/completions; pass the --base-url it points to")
      for status in (301, 302, 307, 308)],
    ((200, {}, json.dumps(TOOL_CALL).encode()), "the model answered with a tool call"),
], ids=["events", "events-untyped", "301", "302", "307", "308", "tool-call"])
def test_an_endpoint_answering_in_another_form_stops_at_once(tmp_path, answer, message):
    """Each would be met by every request: one line naming the cause, one request paid, nothing cached (a redirected
    POST is not resent as a GET: requests would do that for a 301 or 302)."""
    write_obqa(tmp_path, ["q1", "q2", "q3"])
    with Server(lambda stem, count, payload: answer) as server:
        with pytest.raises(SystemExit, match=f"^teacher.py: {server.url}/chat/completions: {re.escape(message)}"):
            teacher.main(["--data", "obqa", "--data-dir", str(tmp_path), "--out", str(tmp_path / "t.jsonl"),
                          "--base-url", server.url, "--workers", "1"])
    assert len(server.log) == 1 and (tmp_path / "t.cache.jsonl").read_text() == ""
    assert not (tmp_path / "t.jsonl").exists()


def test_no_api_key_for_the_official_endpoint_is_said_before_any_request(tmp_path, monkeypatch):
    write_obqa(tmp_path, ["q1"])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(client.requests, "post", None)  # any request would fail loudly
    with pytest.raises(SystemExit, match="OPENAI_API_KEY is not set: https://api.openai.com/v1 needs an API key"):
        teacher.main(["--data", "obqa", "--data-dir", str(tmp_path), "--out", str(tmp_path / "t.jsonl")])
    assert list(tmp_path.glob("t.*")) == []


@pytest.mark.parametrize("flags, message", [
    (["--data", "foo"], "--data must be one of"), (["--split", "habitat"], "--split must be train, valid or test"),
    (["--workers", "0"], "--workers must be at least 1, not 0"),
    (["--timeout", "0"], "--timeout must be a number of seconds above 0, not 0.0"),
    (["--data", "foo", "--dry-run"], "--data must be one of"),
    (["--split", "habitat", "--dry-run"], "--split must be train, valid or test"),
    (["--data", "svamp", "--dry-run"], "--data svamp: its questions have numeric answers and no options"),
    (["--limit", "-1"], "--limit must be at least 1, not -1"), (["--n", "0"], "--n must be at least 1, not 0"),
    (["--rounds", "0", "--dry-run"], "--rounds must be at least 1, not 0"), (["--n", "-3"], "--n must be at least 1"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1, not 0"),
    (["--temperature", "-5"], "--temperature must be a number of at least 0, not -5.0"),
    (["--timeout", "inf"], "argument --timeout: not a finite number: 'inf'"),
    (["--price-in", "nan", "--dry-run"], "argument --price-in: not a finite number: 'nan'"),
    (["--max-backoff", "-1"], "--max-backoff must be a number of at least 0, not -1.0"),
    (["--prompt-seed", "-1"], "--prompt-seed must be from 0 to 4294967295, not -1"),
    (["--workers", "many"], "argument --workers: invalid int value: 'many'"),
])
def test_teacher_argument_mistakes_get_one_line(tmp_path, flags, message):
    """Before anything is read, written or sent: a count of 0 no longer means the default, a negative --limit no
    longer drops the last question."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        teacher.main(["--data", "obqa", "--data-dir", str(tmp_path), "--base-url", "http://127.0.0.1:9/v1", *flags])
    assert list(tmp_path.iterdir()) == []


def interruptible(command, **kwargs):
    """A child that gets KeyboardInterrupt on SIGINT even where this process ignores SIGINT (a background job)."""
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), **kwargs)


def test_one_ctrl_c_stops_the_teacher_while_a_worker_waits_on_retry_after(tmp_path):
    write_obqa(tmp_path, ["q1", "q2"])
    with Server(lambda stem, count, payload: (429, {"Retry-After": "30"}, b"{}")) as server:
        proc = interruptible([sys.executable, "teacher.py", "--data", "obqa", "--data-dir", str(tmp_path), "--out",
                              str(tmp_path / "t.jsonl"), "--base-url", server.url, "--workers", "2"])
        deadline = time.monotonic() + 30
        while len(server.log) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)  # both workers asleep on Retry-After; the bar refreshes once a second
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130 and time.monotonic() - sent < 5
    err = err.decode()
    assert "interrupted; run the same command again" in err and "Traceback" not in err
    assert "wait=" in err  # the capped Retry-After wait was on the bar


# ---------------------------------------------------------------- data files

def csqa_line(i, **changes):
    obj = {"answerKey": "B", "id": f"c{i}", "question": {"stem": f"question {i}?", "choices": [
        {"label": letter, "text": f"opt{i}{letter}"} for letter in "ABC"]}}
    obj.update(changes)
    return json.dumps(obj)


def write_csqa(folder, train, dev=None):
    original = folder / "csqa" / "original"
    original.mkdir(parents=True, exist_ok=True)
    (original / "train_rand_split.jsonl").write_bytes(train.encode() if isinstance(train, str) else train)
    (original / "dev_rand_split.jsonl").write_text(dev if dev is not None else csqa_line(99) + "\n")
    return original


TRAIN = "".join(csqa_line(i) + "\n" for i in range(6))
ONE_OPTION = json.dumps({"answerKey": "A", "id": "c9", "question": {"stem": "?", "choices": [{"label": "A",
                                                                                                "text": "x"}]}})


@pytest.mark.parametrize("train, message", [
    (TRAIN + csqa_line(1) + "\n" + csqa_line(3) + "\n",
     r"train_rand_split.jsonl: duplicate question ids: c1 \(line 2, line 7\); c3 \(line 4, line 8\)"),
    (TRAIN.encode() + b'{"id": "c\xe9"}\n', r"train_rand_split.jsonl:7: not UTF-8 \(byte 0xe9 at column 10\)"),
    (TRAIN + csqa_line(7, answerKey=None) + "\n", r"train_rand_split.jsonl:7: answerKey None is not one of the labels"),
    (TRAIN + csqa_line(7, answerKey=1) + "\n", r"train_rand_split.jsonl:7: answerKey 1 is not one of the labels ABC"),
    (TRAIN + ONE_OPTION + "\n", r"train_rand_split.jsonl:7: 1 option\(s\); a question needs at least two"),
    ("", r"train_rand_split.jsonl: no questions"),
    ("\n\n", r"train_rand_split.jsonl: no questions"),
    (csqa_line(1) + "\n", r"csqa/original: train_rand_split.jsonl needs more questions than dev_rand_split.jsonl"),
], ids=["duplicate-ids", "not-utf8", "answerkey-null", "answerkey-int", "one-option", "empty", "blank", "small-train"])
def test_bad_data_file_names_file_and_line(tmp_path, train, message):
    write_csqa(tmp_path, train)
    with pytest.raises(data.DataError, match=message):
        data.load("csqa", "train", tmp_path)


@pytest.mark.parametrize("content, message", [
    (b"", r"strategyqa_train.json: empty file"),
    (b'[\n{"qid": "s1", "question": "Is it?", "answer": true},\n\xff]', r"strategyqa_train.json:3: not UTF-8"),
    (json.dumps([{"qid": "s1", "question": "?", "answer": True}] * 2).encode(),
     r"strategyqa_train.json: duplicate question ids: s1 \(item 0, item 1\)"),
    (b"[]", r"strategyqa_train.json: no questions"),
], ids=["empty", "not-utf8", "duplicate-ids", "no-items"])
def test_bad_strategyqa_file_names_file(tmp_path, content, message):
    (tmp_path / "strategyqa" / "original").mkdir(parents=True)
    (tmp_path / "strategyqa" / "original" / "strategyqa_train.json").write_bytes(content)
    with pytest.raises(data.DataError, match=message):
        data.load("strategyqa", "train", tmp_path)


# ---------------------------------------------------------------- the parsers on random mutations

def mutate_text(text, rng, pieces):
    """One to three random edits: delete, duplicate or move a span, insert a piece, swap two lines."""
    for _ in range(rng.randint(1, 3)):
        i, j = sorted(rng.randrange(len(text) + 1) for _ in range(2))
        kind = rng.randrange(5)
        if kind == 0:
            text = text[:i] + text[j:]
        elif kind == 1:
            text = text[:j] + text[i:j] + text[j:]
        elif kind == 2:
            text = text[:i] + rng.choice(pieces) + text[i:]
        elif kind == 3:
            text = text[:i] + text[j:] + text[i:j]
        else:
            lines = text.split("\n")
            a, b = rng.randrange(len(lines)), rng.randrange(len(lines))
            lines[a], lines[b] = lines[b], lines[a]
            text = "\n".join(lines)
    return text


ODD_VALUES = [None, 0, 1, -1, 2.5, True, "", "A", "E", "Z", "x" * 50, [], {}, [1], {"label": "A"}, [None], "\ud800"]


def mutate_json(value, rng):
    """Replace, delete or duplicate one random node of a JSON value."""
    nodes = []

    def walk(v, parent, key):
        nodes.append((parent, key))
        for k, child in (v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()):
            walk(child, v, k)
    value = json.loads(json.dumps(value))
    walk(value, None, None)
    parent, key = rng.choice(nodes)
    if parent is None:
        return rng.choice(ODD_VALUES)
    kind = rng.randrange(3)
    if kind == 0:
        parent[key] = rng.choice(ODD_VALUES)
    elif kind == 1:
        del parent[key]
    elif isinstance(parent, list):
        parent.insert(key, parent[key])
    else:
        parent[key + "_"] = parent[key]
    return value


PIECES = ["<think>", "</think>", "**", "*", "__", "\n", "\n\n", "Because ", "Although ", " is correct.",
          " is incorrect.", "Key Information:", "Explanations:", "A", "E", "F", ".", "C is correct. Because ", "\x00",
          "é", " "]


def test_parse_completion_returns_or_raises_invalid_completion_on_mutations():
    rng = random.Random(0)
    q4, q3 = Question("q", "?", ["w", "x", "y", "z"], "C"), Question("q", "?", ["a", "b", "c"], "B")
    bases = [(completion(gold="C"), q4), (markdown(completion(gold="C")), q4), (completion("ABC", "B"), q3),
             ("<think>hmm</think>\n" + completion("ABC", "B"), q3)]
    outcomes = {"parsed": 0, "invalid": 0}
    for _ in range(3000):
        text, q = rng.choice(bases)
        text = mutate_text(text, rng, PIECES)
        try:
            ki, explanations, answer = teacher.parse_completion(text, q)
        except client.InvalidCompletion:
            outcomes["invalid"] += 1
            continue
        outcomes["parsed"] += 1  # what is accepted still holds every rule
        assert sorted(explanations) == list(data.LETTERS[:len(q.choices)]) and answer in explanations
        assert ki.endswith((".", '"', "'")) and all(r.endswith((".", '"', "'")) for r in explanations.values())
    assert min(outcomes.values()) > 300, outcomes


def test_parse_answer_returns_a_letter_or_none_on_mutations():
    rng = random.Random(1)
    for _ in range(3000):
        text = mutate_text("So the answer is option B.", rng, ["option ", "C", ".", "the answer is", "\n", "b"])
        letter = data.parse_answer(text)
        assert letter is None or (len(letter) == 1 and letter.isupper())


def obqa_line(i):
    return {"id": f"o{i}", "question": {"stem": f"stem {i}", "choices": [
        {"text": t, "label": x} for x, t in zip("ABCD", ["red", "a, b", "blue", "green"])]}, "answerKey": "D"}


def check_loaded(questions):
    for q in questions:
        assert isinstance(q.id, str) and isinstance(q.question, str) and len(q.choices) >= 2
        assert all(isinstance(c, str) for c in q.choices) and q.answer in data.LETTERS[:len(q.choices)]
    assert len({q.id for q in questions}) == len(questions)


def test_loaders_return_questions_or_raise_data_error_on_mutations(tmp_path):
    """OBQA and CSQA lines, StrategyQA lists and teacher records, mutated as text and as JSON."""
    rng = random.Random(2)
    obqa = tmp_path / "obqa" / "original"
    obqa.mkdir(parents=True)
    for name in ("dev.jsonl", "test.jsonl"):
        (obqa / name).write_text("")
    sqa = tmp_path / "strategyqa" / "original"
    sqa.mkdir(parents=True)
    records = tmp_path / "records.jsonl"
    good = teacher.records_from_completions(Question("q", "?", ["a", "b", "c"], "B"), [completion("ABC", "B")])[0]
    pieces = ['"', "{", "}", "[", "]", ",", ":", "null", "0", "\n", '"answerKey"', '"label": "A"', "\\u00e9"]
    files = [  # (file, its loader, valid items, one JSON line per item or one JSON list)
        (obqa / "train.jsonl", lambda: data.load("obqa", "train", tmp_path), [obqa_line(i) for i in range(4)], True),
        (sqa / "strategyqa_train.json", lambda: data.load("strategyqa", "train", tmp_path),
         [{"qid": f"s{i}", "question": "Is it?", "answer": i % 2 == 0} for i in range(4)], False),
        (records, lambda: teacher.read_records(records), [good] * 3, True),
    ]
    outcomes = {"loaded": 0, "error": 0}
    for trial in range(1000):
        path, load, items, per_line = files[trial % 3]
        items = list(items)
        k = rng.randrange(len(items))
        items[k] = mutate_json(items[k], rng)
        text = "\n".join(map(json.dumps, items)) if per_line else json.dumps(items, indent=1)
        if rng.random() < 0.5:
            text = mutate_text(text, rng, pieces)
        raw = text.encode()
        if rng.random() < 0.3:  # a stray byte, not always UTF-8, in place of a span
            i, j = sorted(rng.randrange(len(raw) + 1) for _ in range(2))
            raw = raw[:i] + rng.choice([b"\xff", b"\xc3", b"]", b"\n"]) + raw[j:]
        path.write_bytes(raw)
        try:
            result = load()
        except data.DataError as e:
            assert str(e).startswith(str(path)), e
            outcomes["error"] += 1
            continue
        outcomes["loaded"] += 1
        if path != records:
            check_loaded(result)
    assert min(outcomes.values()) > 50, outcomes


# ---------------------------------------------------------------- the command line

def as_typed(*argv, cwd=ROOT):
    result = subprocess.run([sys.executable, *map(str, argv)], capture_output=True, text=True, cwd=cwd, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    return result.returncode, result.stderr


def run_dir(tmp_path, name, config=None, best=True):
    """A run directory as tinythinker.py leaves it, as far as the checks look: config.json and best/."""
    path = tmp_path / name
    path.mkdir()
    if config is not None:
        (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if best:
        (path / "best").mkdir()
    return path


def test_command_line_mistakes_get_one_line(tmp_path):
    """Both scripts, each mistake in its own process (run a few at a time): non-zero exit, the problem named on
    stderr, no traceback."""
    acquired = dataclasses.asdict(tinythinker.parse_config([]))
    runs = {
        "nobest": run_dir(tmp_path, "nobest", acquired, best=False),
        "garbage": run_dir(tmp_path, "garbage", "{not json"),
        "good": run_dir(tmp_path, "good", acquired),
        "empty": run_dir(tmp_path, "empty", {**acquired, "data": "strategyqa", "data_dir": str(tmp_path / "d")}),
    }
    (tmp_path / "d" / "strategyqa" / "original").mkdir(parents=True)  # 5 questions: a valid split of none
    (tmp_path / "d" / "strategyqa" / "original" / "strategyqa_train.json").write_text(
        json.dumps([{"qid": f"s{i}", "question": "?", "answer": True} for i in range(5)]))
    write_obqa(tmp_path / "d", ["q1", "q2"])
    (tmp_path / "d" / "obqa" / "teacher_train.jsonl").write_text("")
    nan_model = tmp_path / "nan_model"  # a checkpoint whose config.json holds a NaN that json reads
    shutil.copytree(ROOT / "tests" / "fixtures" / "t5_relu", nan_model)
    config = (nan_model / "config.json").read_text()
    (nan_model / "config.json").write_text(re.sub(r'"layer_norm_epsilon": [^,]*', '"layer_norm_epsilon": NaN', config))
    tt, ev = "tinythinker.py", "evaluate.py"
    cases = [
        ((tt, "--phase", "foo"), "--phase must be acquire or reflect, not 'foo'"),
        ((tt, "--data", "foo"), "--data must be one of world, csqa, obqa, strategyqa or a directory or .jsonl file of "
                                  "your own questions, not 'foo'"),
        ((tt, "--data", "gsm8k"), "--data gsm8k: its questions have numeric answers and no options, and TinyThinker's "
                                  "analyze stage explains each option; Tailored Learning trains on them: "
                                  "python tailored.py --data gsm8k"),
        ((tt, "--phase", "reflect", "--from", runs["nobest"]), f"{runs['nobest']}: no acquired model"),
        ((tt, "--phase", "reflect", "--from", runs["garbage"]), "garbage/config.json: not a run config"),
        ((tt, "--phase", "reflect", "--from", runs["good"], "--samples", "0"), "--samples must be at least 1, not 0"),
        ((tt, "--phase", "reflect", "--from", runs["good"], "--pairs", "summarize"),
         "--pairs must be one of recall, analyze, recall_analyze, not 'summarize'"),
        ((tt, "--epochs", "0"), "--epochs must be at least 1, not 0"),
        ((tt, "--samples", "4"), "--samples: --phase acquire does not use it"),  # a reflect setting, not silently lost
        ((tt, "--phase", "reflect", "--from", runs["good"], "--model", "t5-base"),
         "--model t5-base: the run in " + str(runs["good"]) + " was acquired with model scratch"),
        ((tt, "--model", nan_model, "--out", tmp_path / "nan_run"),
         f"{nan_model / 'config.json'}: field layer_norm_epsilon must be a finite number above 0, got nan"),
        ((tt, "--data", "obqa", "--data-dir", tmp_path / "d", "--out", tmp_path / "r"),
         "teacher_train.jsonl: no teacher records in the file"),
        ((ev, runs["nobest"]), f"{runs['nobest']}: no trained model"),
        ((ev, runs["garbage"]), "garbage/config.json: not a run config"),
        ((ev, runs["good"], "--samples", "0"), "--samples must be at least 1, not 0"),
        ((ev, runs["good"], "--split", "habitat"), "--split must be train, valid or test, not 'habitat'"),
        ((ev, runs["good"], "--samples", "3", "--temperature", "-1"), "--temperature must be above 0 to sample 3"),
        ((ev, runs["empty"], "--split", "valid"), "the valid split of strategyqa has no questions"),
    ]
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda case: as_typed(*case[0]), cases))
    for (argv, message), (code, stderr) in zip(cases, results):
        assert code != 0 and message in stderr and "Traceback" not in stderr, (argv, stderr)


def test_resume_refuses_changed_settings_naming_them(tmp_path):
    """A started run (a state.pt) continues only with --resume and with the settings it started with."""
    flags = ["--data", "obqa", "--out", str(tmp_path / "run")]
    cfg = tinythinker.parse_config(flags)
    (tmp_path / "run").mkdir()
    cpu = cli.Runtime(torch.device("cpu"), None, 0, 1)
    cli.write_run_config(cfg, str(tmp_path / "run"), cpu, tinythinker.decisions(cfg.phase, cfg.data),
                         effective_batch_size=cfg.batch_size)
    (tmp_path / "run" / "state.pt").write_bytes(b"")
    code, stderr = as_typed("tinythinker.py", *flags, "--resume", "--epochs", "3", "--seed", "1", "--batch-size", "8",
                       "--lr", "0.1", "--eval-batch-size", "8")
    assert code != 0 and "Traceback" not in stderr
    assert ("cannot resume with other settings: --seed 1 (the run has 42), --batch-size 8 (the run has 64), "
            "--lr 0.1 (the run has 0.0005), --epochs 3 (the run has 10), --effective-batch-size 8 (the run has 64)"
            in stderr)  # --eval-batch-size moves no step: it may change
    with pytest.raises(SystemExit, match="holds a started run: pass --resume"):
        tinythinker.main(flags)


class RunsCode:
    """Pickled as a call of open(marker, "w"): unpickling it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_damaged_or_hostile_state_pt_is_one_line_and_runs_nothing(world, tmp_path):  # noqa: F811
    """--resume on a state.pt whose pickle creates a file (issue #30's reproduction), on one cut short and on one of
    garbage bytes: one line naming the file, and the pickle's code never runs (state.pt loads with weights_only),
    though torch.load without it would run it."""
    marker, whole, hostile = tmp_path / "marker", io.BytesIO(), io.BytesIO()
    torch.save({"step": 3, "model": {"shared.weight": torch.zeros(1000)}}, whole)
    torch.save({"step": 3, "model": RunsCode(marker)}, hostile)
    contents = {"hostile": hostile.getvalue(), "truncated": whole.getvalue()[:len(whole.getvalue()) // 2],
                "garbage": b"\x80\x02garbage" * 100}
    flags = {}
    for name, content in contents.items():
        run = tmp_path / name
        run.mkdir()
        flags[name] = [*args(world, run), "--resume"]
        cfg = tinythinker.parse_config(flags[name])
        cpu = cli.Runtime(torch.device("cpu"), None, 0, 1)
        cli.write_run_config(cfg, str(run), cpu, tinythinker.decisions(cfg.phase, cfg.data),
                             effective_batch_size=cfg.batch_size)
        (run / "state.pt").write_bytes(content)
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(flags, pool.map(lambda name: as_typed("tinythinker.py", *flags[name]), flags)))
    for name, (code, stderr) in results.items():
        [line] = stderr.strip().splitlines()
        assert code != 0 and line.startswith(f"{tmp_path / name / 'state.pt'}: not a training state this code can "
                                             "resume ("), stderr
    assert not marker.exists()
    torch.load(tmp_path / "hostile" / "state.pt", weights_only=False)
    assert marker.exists()


def test_a_restart_before_the_first_validation_logs_each_step_once(world, tmp_path, monkeypatch):  # noqa: F811
    def killed(*a, **k):
        raise KeyboardInterrupt  # at the first validation, before any state is saved
    monkeypatch.setattr(evaluate, "accuracy", killed)
    with pytest.raises(KeyboardInterrupt):
        tinythinker.acquire(tinythinker.parse_config(args(world, tmp_path / "run", "--epochs", "2")))
    assert len(read_log(tmp_path / "run")) == 5  # one cycle of steps logged, no state.pt
    monkeypatch.undo()
    tinythinker.acquire(tinythinker.parse_config(args(world, tmp_path / "run", "--epochs", "2")))
    steps = [r["step"] for r in read_log(tmp_path / "run") if "loss" in r]
    assert steps == list(range(1, 11))


def test_ctrl_c_in_training_says_how_to_continue(world, tmp_path):  # noqa: F811
    proc = interruptible([sys.executable, "tinythinker.py", *args(world, tmp_path / "run", "--epochs", "500")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while not (tmp_path / "run" / "config.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # inside the training loop
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    err = err.decode()
    assert proc.returncode == 130 and "interrupted; continue with --resume" in err and "Traceback" not in err


# ---------------------------------------------------------------- shared run folders, full disks, non-finite values

HOLDER = ("import sys, time, cli, files; cli.hold_run(sys.argv[1]); "
          "files.hold(sys.argv[2] + '.lock', sys.argv[2]); print('held', flush=True); time.sleep(300)")


def acquired_run(path):
    """A run folder as acquire leaves it, as far as reflect and evaluate look before they start: config.json, best/."""
    cfg = tinythinker.parse_config(["--out", str(path)])
    path.mkdir()
    cli.write_run_config(cfg, str(path), cli.Runtime(torch.device("cpu"), None, 0, 1),
                         tinythinker.decisions(cfg.phase, cfg.data), effective_batch_size=cfg.batch_size)
    (path / "best").mkdir()
    return path


def test_one_writer_per_run_folder_and_a_crashed_holder_blocks_nothing(tmp_path):
    """A process holds a run folder and a teacher cache (files.hold, as a running phase does); every command that
    would write there stops at once naming it; once it is killed (-9: nothing of ours runs), the folder is free."""
    run, cache = acquired_run(tmp_path / "run"), tmp_path / "t.cache.jsonl"
    write_obqa(tmp_path, ["q1"])
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(run), str(cache)], cwd=ROOT, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        in_use = f" is in use by pid {holder.pid} on {socket.gethostname()}, started "
        code, stderr = as_typed("evaluate.py", run)  # as typed, before any model is loaded
        assert code != 0 and f"{run}{in_use}" in stderr and "Traceback" not in stderr, stderr
        for main, argv, folder in [
            (tinythinker.main, ["--out", str(run)], run),  # acquire
            (tinythinker.main, ["--phase", "reflect", "--from", str(run)], run),
            (tailored.main, ["--out", str(run)], run),
            (teacher.main, ["--data", "obqa", "--data-dir", str(tmp_path), "--out", str(tmp_path / "t.jsonl"),
                            "--base-url", "http://127.0.0.1:9/v1"], cache),
        ]:
            with pytest.raises(SystemExit, match=re.escape(f"{folder}{in_use}")):
                main(argv)
        assert sorted(p.name for p in run.iterdir()) == ["best", "config.json", "run.lock"]  # nothing else written
    finally:
        holder.kill()
        holder.communicate()
    cli.hold_run(str(run))
    assert (run / "run.lock").read_text().startswith(f"pid {os.getpid()} on ")
    cli.release_run(str(run))


def file_modes_bind_root():
    """Run in the child before it starts: as root, give up CAP_DAC_OVERRIDE (prctl PR_CAPBSET_DROP), which lets root
    write into a folder whatever its mode; the child then meets chmod a-w as any user does."""
    if os.geteuid() == 0 and ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE)")


def test_evaluate_finds_a_read_only_run_folder_before_any_chain(tmp_path):
    """best/ is empty: a model loaded before the check would fail on its missing config.json instead."""
    run = acquired_run(tmp_path / "run")
    for folder in (run / "best", run):
        folder.chmod(0o555)
    try:
        result = subprocess.run([sys.executable, "evaluate.py", str(run)], cwd=ROOT, capture_output=True, text=True,
                                timeout=120, preexec_fn=file_modes_bind_root)
    except subprocess.SubprocessError as e:  # a container that does not let root drop a capability
        pytest.skip(f"cannot make a folder read-only for this user: {e}")
    finally:
        for folder in (run / "best", run):
            folder.chmod(0o755)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert f"{run}: cannot be written to (missing or read-only)" in result.stderr
    assert sorted(p.name for p in run.iterdir()) == ["best", "config.json"]


def tiny_fit(run, amp, scale, step_loss=None):
    """train.fit on a tiny T5 and a plan of 5 one-example steps, validated after each; its loss times
    scale.get(step, 1); validations score 10, 20, ..."""
    torch.manual_seed(0)
    model = T5(T5Config(vocab_size=40, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2, dropout_rate=0.0))
    loop = train.Loop(lr=1e-2, warmup=0.0, grad_clip=1.0, micro_batch=1, eval_every=1)
    ids, labels = torch.tensor([[5, 6, 1]]), torch.tensor([[7, 1]])
    scores = iter(range(10, 100, 10))
    plan = [train.Step(number, "tiny", [0]) for number in range(5)]
    return train.fit(loop, str(run), model, types.SimpleNamespace(save_pretrained=lambda directory: None), plan,
                     step_loss=step_loss or (lambda trained, step, micro_batch: (
                         trained(input_ids=ids, labels=labels)[1] * scale.get(step.number, 1.0), {})),
                     validate=lambda model: next(scores), runtime=cli.Runtime(torch.device("cpu"), amp, 0, 1),
                     desc="tiny")


def test_a_non_finite_loss_stops_training_naming_the_step(tmp_path):
    """fp16: step 1's scaled gradients overflow (its loss times 1e35, finite), which the GradScaler skips; step 3's
    loss is NaN, which stops the run before that step changes anything. A garbage line in log.jsonl then stops a
    --resume in one line; without it the run resumes at step 3."""
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit, match=r"^tiny step 3: loss nan, gradient norm nan; the run stops before"):
        tiny_fit(run, torch.float16, {0: 1e35, 2: math.nan})
    log = read_log(run)
    assert [r["step"] for r in log] == [1, 1, 2, 2] and not math.isfinite(log[0]["grad_norm"])  # skipped, went on
    best = files.read_safetensors(run / "best" / "model.safetensors")
    assert all(t.isfinite().all() for t in best.values())
    lines = (run / "log.jsonl").read_text().splitlines(keepends=True)
    (run / "log.jsonl").write_text(lines[0] + '{"step": 1, "lo\n' + "".join(lines[1:]))
    with pytest.raises(data.DataError, match=r"log\.jsonl:2: not a log record; remove the line to resume$"):
        tiny_fit(run, torch.float16, {})  # resumes from state.pt
    (run / "log.jsonl").write_text("".join(lines))
    assert tiny_fit(run, torch.float16, {}) == 30  # its validations score 10, 20, 30 (best was 20)
    assert [r["step"] for r in read_log(run)] == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_weights_made_non_finite_are_never_saved(tmp_path):
    """However a weight became NaN or inf while the loss and gradient stayed finite (here a row of the position-bias
    table that three tokens never read, set to inf), the validation that would save best/ and state.pt stops."""
    def planted(model, step, micro_batch):
        if step.number == 0:
            with torch.no_grad():
                model.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight[31] = math.inf
        return model(input_ids=torch.tensor([[5, 6, 1]]), labels=torch.tensor([[7, 1]]))[1], {}

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(SystemExit, match=r"^tiny step 1: the weights hold NaN or inf; the run stops before saving"):
        tiny_fit(run, None, {}, step_loss=planted)
    assert [r["step"] for r in read_log(run)] == [1] and math.isfinite(read_log(run)[0]["loss"])
    assert sorted(p.name for p in run.iterdir()) == ["log.jsonl"]


def test_a_full_disk_is_one_line_naming_the_file_and_loses_nothing(tmp_path):
    """ENOSPC while a file is written: atomic_write keeps the old file, a log line is named, and a teacher cache
    takes back the part of an entry that reached the disk, so the answers before it stay readable."""
    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    path = tmp_path / "state.pt"
    path.write_bytes(b"the last state")
    with pytest.raises(SystemExit, match=f"^{re.escape(str(path))}: No space left on device$"):
        cli.command(lambda: files.atomic_write(path, lambda f: (f.write(b"half"), full_disk())))
    assert path.read_bytes() == b"the last state" and not Path(f"{path}.tmp").exists()
    if os.path.exists("/dev/full"):  # a device whose every write fails with ENOSPC
        with pytest.raises(SystemExit, match="^/dev/full: No space left on device$"):
            cli.command(lambda: train.append_line("/dev/full", '{"step": 1}'))

    class HalfWritten:  # the disk fills up halfway through a line
        def __init__(self, file):
            self.file = file

        def write(self, line):
            self.file.write(line[:len(line) // 2])
            full_disk()

        def __getattr__(self, name):
            return getattr(self.file, name)

    cache = client.Cache(tmp_path / "t.cache.jsonl")
    cache.put("m", "k1", {"choices": []})
    cache.file = HalfWritten(cache.file)
    with pytest.raises(client.Fatal, match=r"t\.cache\.jsonl: No space left on device$"):
        cache.put("m", "k2", {"choices": []})
    cache.close()
    reread = client.Cache(tmp_path / "t.cache.jsonl")
    assert reread.responses == {"k1": {"choices": []}}
    reread.close()


# ---------------------------------------------------------------- one's own data, outputs, names, flags

def own(tmp_path, *lines, name="mine.jsonl", raw=None):
    """Your own data set as one .jsonl file: four good questions and `lines` (or `raw` bytes in place of it all)."""
    path = tmp_path / name
    good = [json.dumps({"id": f"g{i}", "question": f"question {i}?", "choices": [
        {"label": "A", "text": "yes"}, {"label": "B", "text": "no"}], "answer": "A"}) for i in range(4)]
    path.write_bytes(raw if raw is not None else "\n".join(good + list(lines)).encode() + b"\n")
    return path


@pytest.mark.parametrize("line, message", [
    ('{"id": "s", "question": "\\ud800?", "choices": [{"label": "A", "text": "a"}, {"label": "B", "text": "b"}], '
     '"answer": "A"}', r":5: text holds '\\ud800', a lone surrogate that UTF-8 cannot encode"),
    ('{"id": ' + "9" * 5000 + "}", r":5: not valid JSON \(Exceeds the limit \(4300 digits\) for integer string "
                                  r"conversion: value has 5000 digits\)$"),
    ("[" * 100_000 + "]" * 100_000, r":5: not valid JSON \(nested too deeply\)$"),
    (json.dumps({"id": "big", "question": "x" * (10 << 20), "choices": [{"label": "A", "text": "a"},
                                                                       {"label": "B", "text": "b"}], "answer": "A"}),
     r":5: the question and its options hold 10485762 characters, more than the 2048 that fit T5's 512-token "
     r"input$"),
], ids=["lone-surrogate", "5000-digits", "deep-nesting", "10-MB-question"])
def test_own_data_that_no_run_could_use_is_refused_at_load(tmp_path, line, message):
    """One line naming file:line, from the loader and from teacher.py's dry run, before any request or bill."""
    path = own(tmp_path, line)
    with pytest.raises(data.DataError, match=re.escape(str(path)) + message):
        data.load(str(path), "train")
    with pytest.raises(SystemExit, match=f"^teacher.py: {re.escape(str(path))}{message}"):
        teacher.main(["--data", str(path), "--dry-run"])


def test_a_lone_surrogate_is_refused_before_any_request_and_a_bom_is_read(tmp_path):
    path = own(tmp_path, '{"id": "s", "question": "q?", "choices": [{"label": "A", "text": "\\udfff"}, '
                         '{"label": "B", "text": "b"}], "answer": "B"}')
    code, stderr = as_typed("teacher.py", "--data", path, "--dry-run")  # as typed
    assert code != 0 and f"{path}:5: text holds '\\udfff', a lone surrogate" in stderr and "Traceback" not in stderr
    with Server(lambda stem, count, payload: (200, {}, body([completion(gold="A")]))) as server:
        with pytest.raises(SystemExit, match=":5: text holds"):
            teacher.main(["--data", str(path), "--data-dir", str(tmp_path), "--base-url", server.url])
    assert server.log == [] and sorted(p.name for p in tmp_path.iterdir()) == ["mine.jsonl"]
    good = own(tmp_path, name="bom.jsonl").read_bytes()
    bom = own(tmp_path, name="bom.jsonl", raw=b"\xef\xbb\xbf" + good)  # a byte-order mark, as Notepad writes
    assert sorted(q.id for split in data.SPLITS for q in data.load(str(bom), split)) == ["g0", "g1", "g2", "g3"]


@pytest.mark.parametrize("flags, message", [
    (["--cache", "{out}"], "{out} would be both --out and --cache"),
    (["--cache", "{tmp}/t.failed.jsonl"], "{tmp}/t.failed.jsonl would be both --cache and the failed list"),
    (["--cache", "{tmp}/c.jsonl", "--out", "{tmp}/c.jsonl.lock"], "c.jsonl.lock would be both --out and the cache's"),
    (["--out", "{data}"], "{data} would be both --out and the data set"),
    (["--cache", "{data}"], "{data} would be both --cache and the data set"),
    (["--out", "{prompts}"], "prompts.json would be both --out and the prompts"),
], ids=["cache-is-out", "cache-is-failed", "out-is-lock", "out-is-data", "cache-is-data", "out-is-prompts"])
def test_teacher_outputs_never_overwrite_an_input_or_each_other(tmp_path, flags, message):
    path = own(tmp_path)
    before = path.read_bytes()
    names = dict(out=tmp_path / "t.jsonl", tmp=tmp_path, data=path, prompts=teacher.PROMPTS)
    flags = [f.format(**names) for f in flags]
    if "--out" not in flags:
        flags += ["--out", str(names["out"])]
    for dry_run in ([], ["--dry-run"]):
        with pytest.raises(SystemExit, match=re.escape(message.format(**names))):
            teacher.main(["--data", str(path), "--base-url", "http://127.0.0.1:9/v1", *flags, *dry_run])
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine.jsonl"]


@pytest.mark.parametrize("name", ["..jsonl", "...jsonl", ".hidden.jsonl", ".hidden"])
def test_a_data_set_name_that_is_empty_or_starts_with_a_dot_is_refused(tmp_path, name):
    """Named by its stem or folder: "..jsonl" would put runs in runs/. and records in the data folder itself."""
    path = tmp_path / name
    if name.endswith(".jsonl"):
        own(tmp_path, name=name)
    else:
        path.mkdir()
        own(path, name="train.jsonl")
    named = re.escape(path.stem if path.suffix else name)
    for main in (teacher.main, tinythinker.main, tailored.main):
        with pytest.raises(SystemExit, match=f"your own data set is named '{named}'.*cannot be empty or start with"):
            main(["--data", str(path), *(["--dry-run"] if main is teacher.main else [])])
    with pytest.raises(data.DataError, match="named '' .*cannot be empty"):
        data.check_name("/")
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


@pytest.mark.parametrize("main, flags, message", [
    (tinythinker.main, ["--steps", "-5"], "--steps must be at least 0, not -5"),
    (tinythinker.main, ["--lr", "inf"], "argument --lr: not a finite number: 'inf'"),
    (tinythinker.main, ["--lr", "nan"], "argument --lr: not a finite number: 'nan'"),
    (tinythinker.main, ["--temperature", "inf"], "argument --temperature: not a finite number: 'inf'"),
    (tinythinker.main, ["--seed", "-1"], "--seed must be from 0 to 4294967295, not -1"),
    (tinythinker.main, ["--seed", str(2 ** 70)], f"--seed must be from 0 to 4294967295, not {2 ** 70}"),
    (tinythinker.main, ["--seed", "1e20"], "argument --seed: invalid int value: '1e20'"),
    (tailored.main, ["--lam", "nan"], "argument --lam: not a finite number: 'nan'"),
    (tailored.main, ["--seed", "4294967296"], "--seed must be from 0 to 4294967295, not 4294967296"),
    (tailored.main, ["--exam-top-k", "-1"], "--exam-top-k must be at least 0, not -1"),
    (tailored.main, ["--margin", "-1"], "--later-lr, --margin and --lam at least 0, --warmup in [0, 1)"),
    (tailored.main, ["--later-lr", "2"], "--later-lr must be at most 1, not 2.0"),
    (tinythinker.main, ["--lr", "1e37"], "--lr must be at most 1, not 1e+37"),
    (evaluate.main, ["--temperature", "nan"], "argument --temperature: not a finite number: 'nan'"),
    (evaluate.main, ["--seed", "-3"], "--seed must be from 0 to 4294967295, not -3"),
])
def test_numbers_out_of_range_get_one_line(tmp_path, capsys, main, flags, message):
    """Parsed (argparse's own errors in one line too, without its usage) and checked before anything is read or
    written."""
    with pytest.raises(SystemExit, match=re.escape(message) + "$"):
        main([*flags, "--out", str(tmp_path / "run")])
    assert list(tmp_path.iterdir()) == [] and capsys.readouterr().err == ""
