"""teacher.py: prompt strings, the parser on edge cases, the client against a scripted HTTP server on 127.0.0.1,
kill-and-resume through the cache, the API key never reaching a file, and your own data set (tests/fixtures/own)."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import client  # noqa: E402
import teacher  # noqa: E402
from data import LETTERS, Question  # noqa: E402
from make_prompts import make_prompts  # noqa: E402

KEY = "sk-test-DO-NOT-LEAK-4f2a"
Q = Question("q1", "Where do fish live?", ["desert", "water", "sky"], "B")


def completion(letters="ABCD", gold="A", ki="Key Information: fish need water"):
    """A teacher-format completion: gold first, as the scaffold asks."""
    order = [gold] + [x for x in letters if x != gold]
    lines = [f"{x} is {'correct' if x == gold else 'incorrect'}. Because reason for {x}" for x in order]
    return f"{ki}\nExplanations: " + "\n".join(lines)


# ---------------------------------------------------------------- prompt (METHOD 3.1)

def test_user_message_literal():
    assert teacher.user_message(Q) == ("Where do fish live?\nOptions: A. desert, B. water, C. sky\nKey Information:\n"
                                       "Explanations: B is correct. Because\nA is incorrect. Because\n"
                                       "C is incorrect. Because")


def test_system_message_literal():
    shots = [{"Q": "q1?", "Options": "A. yes, B. no", "Key Information": "k1.", "Explanations": ["A is x", "B is y"]},
             {"Q": "q2?", "Options": "A. yes, B. no", "Key Information": "k2.", "Explanations": ["A is z", "B is w"]}]
    assert teacher.system_message("Do this:\n", shots, seed=0) == (
        "Do this:\n\n###\nq2?\nOptions: A. yes, B. no\nKey Information: k2.\nExplanations: A is z\nB is w\n###\n"
        "\n###\nq1?\nOptions: A. yes, B. no\nKey Information: k1.\nExplanations: A is x\nB is y\n###")


def test_prompts_asset_and_its_regeneration(tmp_path):
    shipped = json.loads(teacher.PROMPTS.read_text())
    assert shipped["instruction"].startswith("Reference examples delimited with ###")
    assert {k: len(v) for k, v in shipped["exemplars"].items()} == {"csqa": 8, "obqa": 7, "strategyqa": 8}
    (tmp_path / "request.json").write_text(json.dumps({"Key": "Instr.\n"}))
    for name in teacher.N:
        (tmp_path / name / "prompt").mkdir(parents=True)
        ex = {"Q": name, "Options": "A. yes, B. no", "Key Information": "k", "Explanations": ["A", "B"],
              "Reference": "CoT"}
        (tmp_path / name / "prompt" / f"{name}_cot.json").write_text(json.dumps([ex]))
    make_prompts(tmp_path, tmp_path / "prompts.json")
    made = json.loads((tmp_path / "prompts.json").read_text())
    assert made["instruction"] == "Instr.\n"
    assert made["exemplars"]["obqa"] == [{"Q": "obqa", "Options": "A. yes, B. no", "Key Information": "k",
                                          "Explanations": ["A", "B"]}]


# ---------------------------------------------------------------- parsing (METHOD 3.3, 3.4)

def test_parse_valid_completion_drops_verdicts():
    text = ("Key Information: fish need water Explanations:\n\nB is correct. Because fish breathe in water\n"
            "A is incorrect. Because deserts are dry. Because of the sun.\nC is incorrect. Although fish cannot fly\n"
            "So the answer is B.")  # KI and Explanations on one line; a trailing line beyond k is not read
    ki, explanations, answer = teacher.parse_completion(text, Q)
    assert ki == "fish need water." and answer == "B"
    assert explanations == {"B": "fish breathe in water.", "A": "deserts are dry. Because of the sun.",
                            "C": "fish cannot fly."}
    assert list(explanations) == ["B", "A", "C"]  # the teacher's order is kept in the record


@pytest.mark.parametrize("text, reason", [
    ("fish need water\nExplanations: B is correct. Because x", "no Key Information on line 0"),
    ("Key Information:   \nExplanations: B is correct. Because x", "empty Key Information"),
    (completion("ABC", "B").replace("A is incorrect.", "Option A is incorrect."), "malformed verdict"),
    (completion("ABC", "B").replace("C is incorrect", "A is incorrect"), "option not offered or explained twice"),
    (completion("ABC", "B").replace("C is incorrect", "D is incorrect"), "option not offered or explained twice"),
    (completion("ABC", "B").replace("C is incorrect. Because", "C is incorrect. Since"), "not every option explained"),
    (completion("ABC", "B").replace("A is incorrect.", "A is wrong."), "not every option explained"),  # skipped line
    (completion("AB", "B"), "not every option explained"),
    (completion("ABC", "B").replace("A is incorrect", "A is correct"), "not exactly one option called correct"),
    (completion("ABC", "B").replace("B is correct", "B is incorrect"), "not exactly one option called correct"),
])
def test_parse_failures(text, reason):
    with pytest.raises(client.InvalidCompletion, match=reason):
        teacher.parse_completion(text, Q)


def test_records_keep_gold_and_report_failures():
    failures = []
    records = teacher.records_from_completions(Q, [completion("ABC", "B"), completion("ABC", "A"), "junk"], failures)
    assert failures == ["disagrees with the gold answer", "no Key Information on line 0"]  # A12: no override
    assert records == [{"id": "q1", "question": Q.question, "choices": Q.choices, "answer": "B",
                        "key_information": "fish need water.",
                        "explanations": {"B": "reason for B.", "A": "reason for A.", "C": "reason for C."}}]
    assert teacher.records_from_completions(Q, ["junk"]) == []  # the offline teacher's call, without a failure list


def test_read_records_checks_the_schema(tmp_path):
    good = teacher.records_from_completions(Q, [completion("ABC", "B")])[0]
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(good) + "\n")
    assert teacher.read_records(path) == [good, good]
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, "explanations": {"A": "x."}}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl:2: answer/explanations"):
        teacher.read_records(path)
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "key_information"}) + "\n")
    with pytest.raises(ValueError, match=r"r.jsonl:1: field 'key_information'"):
        teacher.read_records(path)
    path.write_text("{oops\n")
    with pytest.raises(ValueError, match=r"r.jsonl:1: not valid JSON"):
        teacher.read_records(path)


# ---------------------------------------------------------------- a scripted OpenAI-compatible server

STEMS = ["q429", "q500", "qslow", "qbadjson", "qinvalid", "qvalid", "qhopeless", "qdown"]


def write_obqa(folder: Path, stems):
    lines = [json.dumps({"id": s, "question": {"stem": s, "choices": [{"text": t, "label": x} for x, t in
                                                                      zip("ABCD", ["w", "x", "y", "z"])]},
                         "answerKey": "C"}) for s in stems]
    (folder / "obqa" / "original").mkdir(parents=True)
    (folder / "obqa" / "original" / "train.jsonl").write_text("\n".join(lines) + "\n")
    for split in ("dev", "test"):
        (folder / "obqa" / "original" / f"{split}.jsonl").write_text("")


def body(texts, truncated=()):
    choices = [{"index": i, "message": {"role": "assistant", "content": t},
                "finish_reason": "length" if i in truncated else "stop"} for i, t in enumerate(texts)]
    return json.dumps({"choices": choices, "usage": {"prompt_tokens": 100, "completion_tokens": 10}}).encode()


class Server:
    """An OpenAI-compatible endpoint on 127.0.0.1: answers each POST with script(stem, count, payload) and logs every
    request. The script returns (status, headers, body), with a delay in seconds as an optional fourth item (status
    None: answer nothing, as to a killed client), or a function that writes the raw response itself (test_faults: a
    dropped connection, a trickle, a body without Content-Length)."""

    def __init__(self, script):
        self.script, self.log, self.counts, self.lock = script, [], {}, threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                payload = json.loads(raw)
                stem = payload["messages"][1]["content"].split("\n")[0]
                with outer.lock:
                    count = outer.counts.get(stem, 0)
                    outer.counts[stem] = count + 1
                    outer.log.append({"stem": stem, "n": payload["n"], "max_tokens": payload["max_tokens"],
                                      "auth": self.headers.get("Authorization"),
                                      "hash": hashlib.sha256(raw).hexdigest()})
                answer = outer.script(stem, count, payload)
                try:
                    if callable(answer):
                        return answer(self)
                    status, headers, content, *delay = answer
                    threading.Event().wait(delay[0] if delay else 0)
                    if status is None:
                        return
                    self.send_response(status)
                    for k, v in {"Content-Length": str(len(content)), **headers}.items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(content)
                except OSError:  # the client gave up (a timeout) before the answer
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()  # quick to shut down
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def stems(self):
        return [e["stem"] for e in self.log]

    def requests_for(self, stem):
        return [e for e in self.log if e["stem"] == stem]


def scripted(stem, count, payload):
    n, ok = payload["n"], (200, {}, body([completion(gold="C")] * payload["n"]), 0)
    first = count == 0
    if stem == "q429" and first:
        return 429, {"Retry-After": "7"}, b'{"error": "rate"}', 0
    if stem == "q500" and first:
        return 500, {}, b"oops", 0
    if stem == "qslow" and first:
        return (*ok[:3], 2.5)  # slower than the client's timeout
    if stem == "qbadjson" and first:
        return 200, {}, b'{"choices": [', 0
    if stem == "qinvalid" and first:  # valid, disagreeing with gold, truncated
        return 200, {}, body([completion(gold="C"), completion(gold="A"), completion(gold="C")], truncated={2}), 0
    if stem == "qhopeless":
        return 200, {}, body(["no format here"] * n), 0
    if stem == "qdown":
        return 503, {}, b"down", 0
    return ok


def test_client_against_scripted_server(tmp_path, monkeypatch):
    write_obqa(tmp_path, STEMS)
    sleeps = []
    monkeypatch.setattr(client.Meter, "pause", lambda self, seconds: sleeps.append(seconds))  # record, don't wait
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with Server(scripted) as server:
        cfg = teacher.TeacherConfig(data="obqa", data_dir=str(tmp_path), out=str(tmp_path / "t.jsonl"),
                                    base_url=server.url, n=3, rounds=3, max_tokens=64, workers=4, timeout=1.0,
                                    max_attempts=3, backoff=0.001)
        summary = teacher.run(cfg)
    counts = {s: len(server.requests_for(s)) for s in STEMS}
    assert counts == {"q429": 2, "q500": 2, "qslow": 2, "qbadjson": 2, "qinvalid": 2, "qvalid": 1,
                      "qhopeless": 3, "qdown": 3}
    assert 7.0 in sleeps  # Retry-After honoured
    assert all(s < 0.01 for s in sleeps if s != 7.0)  # the other waits are the (tiny) jittered backoff
    retry = server.requests_for("qinvalid")[1]
    assert (retry["n"], retry["max_tokens"]) == (2, 128)  # n = failures, max_tokens doubled after a truncation
    assert [e["n"] for e in server.requests_for("qhopeless")] == [3, 3, 3]
    records = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    per_question = {s: sum(r["id"] == s for r in records) for s in STEMS}
    assert per_question == {"q429": 3, "q500": 3, "qslow": 3, "qbadjson": 3, "qinvalid": 3, "qvalid": 3,
                            "qhopeless": 0, "qdown": 0}
    assert [r["id"] for r in records] == sorted((r["id"] for r in records), key=STEMS.index)  # question order
    failed = [json.loads(line) for line in (tmp_path / "t.failed.jsonl").read_text().splitlines()]
    assert failed == [{"id": "qhopeless", "reasons": ["no Key Information on line 0"] * 3},
                      {"id": "qdown", "reasons": ["request failed: HTTP 503 after 3 attempts"]}]
    assert summary["failed_questions"] == 2 and summary["records"] == 18 and summary["requests_sent"] == 17
    assert summary["errors"] == {"HTTP 429": 1, "HTTP 500": 1, "ReadTimeout": 1, "malformed response": 1,
                                 "HTTP 503": 3}
    assert summary["answered"] == 10 and summary["cost_usd"] == pytest.approx(10 * (100 * 5e-6 + 10 * 15e-6))


def test_api_key_sent_but_never_written(tmp_path, monkeypatch, capsys):
    write_obqa(tmp_path, ["qvalid", "qhopeless"])
    monkeypatch.setenv("MY_KEY", KEY)
    with Server(scripted) as server:
        teacher.main(["--data", "obqa", "--data-dir", str(tmp_path), "--out", str(tmp_path / "o" / "t.jsonl"),
                      "--base-url", server.url, "--api-key-env", "MY_KEY", "--n", "2", "--rounds", "2"])
    assert {e["auth"] for e in server.log} == {f"Bearer {KEY}"}
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) >= 3 and not any(KEY.encode() in p.read_bytes() for p in written)
    out, err = capsys.readouterr()
    assert KEY not in out + err and '"records": 2' in out + err


# ---------------------------------------------------------------- your own data set

MINI = ROOT / "tests" / "fixtures" / "own" / "mini"


def test_dry_run_on_own_data():
    result = subprocess.run([sys.executable, "teacher.py", "--data", "tests/fixtures/own/mini", "--split", "train",
                             "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    bill = json.loads(result.stdout)
    assert (bill["questions"], bill["completions"], bill["max_requests_with_retries"]) == (24, 24 * 8, 24 * 3)
    assert bill["cost_usd_est"] > 0


@pytest.mark.parametrize("name, message", [
    ("world", "the world's teacher is built into world.py"),
    (str(MINI / "train.jsonl.txt"), "--data must be one of world, csqa, obqa, strategyqa or a directory or .jsonl"),
])
def test_teacher_refuses_what_it_cannot_ask(name, message):
    with pytest.raises(SystemExit, match=f"^teacher.py: {message}"):
        teacher.main(["--data", name, "--dry-run"])


def test_run_on_own_data_writes_records_beside_the_built_in_ones(tmp_path, monkeypatch):
    """A 3-option and a 5-option question (the first two of mini's train), CSQA's exemplars and n."""
    systems = []

    def answer(stem, count, payload):  # a valid completion for the options the scaffold lists
        system, user = (m["content"] for m in payload["messages"])
        systems.append(system)
        letters = LETTERS[:user.count(" is incorrect. Because") + 1]
        gold = user.split("Explanations: ")[1][0]
        return 200, {}, body([completion(letters, gold)] * payload["n"]), 0
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with Server(answer) as server:
        summary = teacher.run(teacher.TeacherConfig(data=str(MINI), data_dir=str(tmp_path), base_url=server.url,
                                                    limit=2))
    assert [(e["stem"], e["n"]) for e in sorted(server.log, key=lambda e: e["stem"])] == [
        ("What does a kettle do to water?", 8), ("Where would you keep milk so it stays fresh?", 8)]
    assert all("absorb extra ink from a fountain pen" in s for s in systems)  # a CSQA exemplar
    out = tmp_path / "mini" / "teacher_train.jsonl"
    assert summary["out"] == str(out) and summary["records"] == 16
    records = teacher.read_records(out)
    assert [(r["id"], r["answer"], sorted(r["explanations"])) for r in records[::8]] == [
        ("m01", "B", ["A", "B", "C"]), ("m02", "C", ["A", "B", "C", "D", "E"])]
    assert records[8]["choices"] == ["oven", "bookshelf", "refrigerator", "garden", "sunny window"]
    assert sorted(p.name for p in MINI.iterdir()) == ["test.jsonl", "train.jsonl", "valid.jsonl"]  # left as it was


# ---------------------------------------------------------------- kill and resume

def deterministic(stem, count, payload):
    """The answer depends only on the request, so an interrupted and an uninterrupted run see the same data.
    Odd questions get one invalid completion at n=2, which forces a second round."""
    texts = [completion(gold="C", ki=f"Key Information: {stem} fact {i} at n={payload['n']}") for i in
             range(payload["n"])]
    if payload["n"] == 2 and int(stem[1:]) % 2:
        texts[1] = "garbled"
    return 200, {}, body(texts), 0


def test_kill_and_resume_gives_identical_output(tmp_path):
    stems = [f"s{i}" for i in range(6)]  # 9 requests in all: 6 first rounds + 3 retries
    write_obqa(tmp_path, stems)
    env = {**os.environ, "OPENAI_API_KEY": KEY}

    def command(out, url):
        return [sys.executable, str(ROOT / "teacher.py"), "--data", "obqa", "--data-dir", str(tmp_path),
                "--out", str(out), "--base-url", url, "--n", "2", "--rounds", "2", "--workers", "1"]

    victim = {}

    def killing(stem, count, payload):
        if len(server.log) == 5:  # the 5th request: kill the client before it gets an answer
            os.kill(victim["pid"], signal.SIGKILL)
            return None, {}, b"", 0
        return deterministic(stem, count, payload)

    with Server(killing) as server:
        proc = subprocess.Popen(command(tmp_path / "run" / "t.jsonl", server.url), env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        victim["pid"] = proc.pid
        first_output = proc.communicate(timeout=60)[0]
        assert proc.returncode == -signal.SIGKILL and not (tmp_path / "run" / "t.jsonl").exists()
        answered = {e["hash"] for e in server.log[:4]}
        del server.log[:]
        server.script = deterministic
        second = subprocess.run(command(tmp_path / "run" / "t.jsonl", server.url), env=env, capture_output=True,
                                timeout=60)
        assert second.returncode == 0, second.stderr.decode()
        resumed = {e["hash"] for e in server.log}
        assert len(server.log) == 5 and not answered & resumed  # no answered request is sent again
        server.log.clear()
        teacher.run(teacher.TeacherConfig(data="obqa", data_dir=str(tmp_path), out=str(tmp_path / "ref" / "t.jsonl"),
                                          base_url=server.url, n=2, rounds=2, workers=3))
        assert len(server.log) == 9
    resumed_file = (tmp_path / "run" / "t.jsonl").read_bytes()
    assert resumed_file == (tmp_path / "ref" / "t.jsonl").read_bytes() and resumed_file.count(b"\n") == 12
    for p in tmp_path.rglob("*"):
        assert not p.is_file() or KEY.encode() not in p.read_bytes()
    assert KEY.encode() not in first_output + second.stdout + second.stderr


def test_cache_drops_torn_last_line_and_rejects_corrupt_ones(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"model": "m", "key": "k1", "response": {"choices": []}}) + "\n" + '{"model": "m", "ke')
    cache = client.Cache(path)
    assert list(cache.responses) == ["k1"] and path.read_text().count("\n") == 1
    cache.put("m", "k2", {"choices": []})
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["k1", "k2"]
    cache.close()
    path.write_text("garbage\n" + json.dumps({"model": "m", "key": "k1", "response": {}}) + "\n")
    with pytest.raises(ValueError, match=r"c.jsonl:1: not a cache entry"):
        client.Cache(path)
