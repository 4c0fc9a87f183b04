"""The README's "A real run" commands, run as a user types them, on CommonsenseQA, OpenBookQA and StrategyQA fixtures
in their official formats (tests/fixtures/real), against stand-ins on 127.0.0.1 for the teacher (an OpenAI-compatible
chat-completions server) and for the Hugging Face Hub (serving google-t5/t5-small as a tiny T5). The commands change
only by size flags, --base-url and --data-dir.

CSQA runs the whole chain (dry run, teacher, acquire, reflect, evaluate); OBQA runs teacher and a two-process
torchrun acquire; StrategyQA runs teacher, acquire and evaluate. Reflect on one data set is enough: what it reads
from a run (config.json, teacher records, questions) is the same for the three, while it costs the most time.
Tailored Learning's math block runs on GSM8K (dry run, two rounds, evaluate) against a math teacher stand-in, and
SVAMP's and MultiArith's dry runs check their loaders and demos, all that differs between the three."""
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import zlib
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sentencepiece as spm
import torch

import data
import tailored
import teacher
import tinythinker
from t5 import T5, T5Config, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures" / "real"
OWN = Path(__file__).resolve().parent / "fixtures" / "own"
SIZE = {  # the only changes to the README's commands, besides --base-url and --data-dir
    "teacher.py": ["--limit", "20"],
    "acquire": ["--epochs", "2", "--max-new-tokens", "16"],
    "reflect": ["--iterations", "1", "--samples", "2", "--epochs", "1", "--max-new-tokens", "16"],
    "evaluate.py": [],
    "tailored.py": ["--rounds", "1", "--epochs", "1", "--max-new-tokens", "16"],
}
TORCHRUN = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2")


def readme_commands(heading="## A real run", start="python "):
    """The command lines of the first ```bash block under a README heading, without their comments."""
    section = (ROOT / "README.md").read_text().split(heading + "\n", 1)[1]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.startswith(start)]


# ---------------------------------------------------------------------------------------------- the stand-ins

class Teacher(BaseHTTPRequestHandler):
    """POST /v1/chat/completions: n well-formed rationales built from the user scaffold (gold option first). The very
    first request gets a 429 with Retry-After; the question whose stem is in `wrong` always gets rationales that call
    another option correct, so it ends in the failed list."""
    log, models, wrong, lock = [], [], set(), threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        user = payload["messages"][1]["content"]
        with self.lock:
            self.log.append(user)
            self.models.append(payload["model"])
            first = len(self.log) == 1
        if first:
            return self.answer(429, b'{"error": "rate limited"}', {"Retry-After": "1"})
        stem, options = user.split("\n")[:2]
        texts = dict(re.findall(r"([A-E])\. (.*?)(?=, [A-E]\. |$)", options.removeprefix("Options: ")))
        order = re.findall(r"([A-E]) is (?:in)?correct\. Because$", user, re.M)  # gold first
        if stem in self.wrong:
            order = [order[1], order[0], *order[2:]]
        lines = [f"{order[0]} is correct. Because {texts[order[0]]} fits the question."]
        lines += [f"{x} is incorrect. Because {texts[x]} does not fit." for x in order[1:]]
        completion = f"Key Information: {stem.split('?')[0][:60]} is about {texts[order[0]]}.\nExplanations: " \
                     + "\n".join(lines)
        body = {"choices": [{"index": i, "message": {"role": "assistant", "content": completion},
                             "finish_reason": "stop"} for i in range(payload["n"])],
                "usage": {"prompt_tokens": len(user) // 4, "completion_tokens": payload["n"] * len(completion) // 4}}
        self.answer(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def answer(self, status, content, headers):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)


class MathTeacher(BaseHTTPRequestHandler):
    """POST /v1/chat/completions for tailored.py's math requests, in the official "Reasoning ... Answer: N" format.
    Round 1 (n = 4): GSM8K's worked solution (calculator annotations and all), two other right rationales and a wrong
    one. Feedback: an "Error:" line and a correction of its own for each wrong rationale, right but for every third
    request. `golds` maps a question to (gold number, worked solution); `sent` logs the right corrections."""
    log, sent, golds, lock = [], [], {}, threading.Lock()

    def log_message(self, *args):
        pass

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = payload["messages"][-1]["content"]
        question = content.split("\n\nQuestion: ")[-1].split("\nReasoning:")[0]
        gold, solution = self.golds[question]
        with self.lock:
            self.log.append(payload)
            count = len(self.log)
        if "\nStudent: " in content:
            student = content.split("\nStudent: ", 1)[1].split("\nFirst point out", 1)[0]
            number = gold if count % 3 else str(int(gold) + 1)
            correction = f"The slip is at {zlib.crc32(student.encode()):08x}; done right, it comes to {number}."
            if number == gold:
                with self.lock:
                    self.sent.append((question, correction))
            texts = [f"Error: a step is wrong.\nReasoning: {correction}\nAnswer: {number}"]
        else:
            texts = [f"{solution}\nAnswer: {gold}", f"Adding it all up gives {gold}.\nAnswer: {gold}",
                     f"Step by step, the total is {gold}. Therefore, the answer is {gold}.",
                     f"It is {int(gold) + 1}.\nAnswer: {int(gold) + 1}"]
        body = {"choices": [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
                            for i, t in enumerate(texts)]}
        raw = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


class Hub(BaseHTTPRequestHandler):
    """GET /{repo}/resolve/main/{file}, with the git-blob ETag the Hub sends for small files."""
    files = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        content = self.files.get(self.path.removeprefix("/").replace("/resolve/main/", "/", 1))
        if content is None:
            return self.send_error(404)
        self.send_response(200)
        self.send_header("Content-Length", str(len(content)))
        self.send_header("ETag", '"%s"' % hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest())
        self.end_headers()
        self.wfile.write(content)


def serve(handler):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A user's directory with the fixtures as downloaded data sets, the two stand-ins, and the environment."""
    root = tmp_path_factory.mktemp("real")
    shutil.copytree(FIXTURES, root / "data", ignore=shutil.ignore_patterns("README.md"))
    # google-t5/t5-small as a tiny T5: a unigram tokenizer trained on the fixtures' questions and options.
    texts = [f"{q.question} {' '.join(q.choices)} is about fits the question does not fit Answer: Reasoning:"
             for name in ("csqa", "obqa", "strategyqa", *data.MATH) for split in ("train", "valid", "test")
             for q in data.load(name, split, root / "data")]
    hub = root / "hub"
    hub.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(hub / "spiece"), vocab_size=400,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2)
    torch.manual_seed(0)
    config = T5Config(vocab_size=Tokenizer(hub / "spiece.model").vocab_size, d_model=32, d_kv=8, d_ff=64,
                      num_layers=2, num_heads=4)
    T5(config).save_pretrained(hub)
    Hub.files = {f"google-t5/t5-small/{f}": (hub / f).read_bytes()
                 for f in ("config.json", "model.safetensors", "spiece.model")}
    Teacher.wrong = {data.load(name, "train", root / "data")[0].question for name in ("csqa", "obqa", "strategyqa")}
    servers = [serve(Teacher), serve(Hub)]
    (root / "work").mkdir()
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "HF_ENDPOINT": servers[1][1],
           "TINYTHINKER_CACHE": str(root / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    yield dict(root=root, data=root / "data", teacher=servers[0][1] + "/v1", env=env)
    for server, _ in servers:
        server.shutdown()
        server.server_close()


def command(line, name, site, launcher=(sys.executable,)):
    """A README command line for data set `name`, with its size flags, --base-url and --data-dir."""
    words = [w.replace("csqa", name) for w in shlex.split(line)]
    words = words[words.index(next(w for w in words if w.endswith(".py"))):]  # without "python" or "torchrun ..."
    script = words[0]
    phase = words[words.index("--phase") + 1] if "--phase" in words else script
    extra = {"teacher.py": ["--base-url", site["teacher"], "--data-dir", str(site["data"])],
             "acquire": ["--data-dir", str(site["data"])]}.get(phase, [])
    if "--dry-run" in words:
        extra = extra[2:]
    return [*launcher, str(ROOT / script), *words[1:], *SIZE[phase], *extra]


def run(cmd, site):
    result = subprocess.run(cmd, cwd=site["root"] / "work", env=site["env"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"{shlex.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def check_teacher(name, site, out):
    folder = site["data"] / name
    records = teacher.read_records(folder / "teacher_train.jsonl")
    failed = [json.loads(line) for line in (folder / "teacher_train.failed.jsonl").read_text().splitlines()]
    first = data.load(name, "train", site["data"])[0]
    assert [f["id"] for f in failed] == [first.id]  # the rationale that called the wrong option correct
    assert {r["id"] for r in records} == {q.id for q in data.load(name, "train", site["data"])[1:20]}
    summary = json.loads(out[out.index("{"):])
    assert summary["questions"] == 20 and summary["failed_questions"] == 1


def check_report(name, site, split_size):
    rows = json.loads((site["root"] / "work" / "runs" / name / "report.json").read_text())
    for row in rows:
        assert (row["data"], row["split"], row["questions"]) == (name, "test", split_size)
    return rows


# ---------------------------------------------------------------------------------------------- the runs

def test_readme_real_run_on_csqa(site):
    lines = readme_commands()
    assert [shlex.split(line)[1] for line in lines] == ["teacher.py"] * 2 + ["tinythinker.py"] * 2 + ["evaluate.py"]
    dry, teach, acquire, reflect, evaluate = (command(line, "csqa", site) for line in lines)
    before = len(Teacher.log)
    out = run(dry, site)
    assert len(Teacher.log) == before  # the dry run sent nothing
    bill = json.loads(out[out.index("{"):])
    assert bill["questions"] == bill["requests"] == 20 and bill["completions"] == 160 and bill["cost_usd_est"] > 0

    check_teacher("csqa", site, run(teach, site))
    run(acquire, site)
    out = run(reflect, site)
    assert "sampling the 19 training questions with teacher records, of 28" in out  # failed and beyond --limit
    reflected = site["root"] / "work" / "runs" / "csqa" / "reflect"
    config = json.loads((reflected / "config.json").read_text())
    method = dict(lr=5e-6, temperature=0.7, batch_size=32, samples=2, max_new_tokens=16, precision="fp32",
                  data="csqa", data_dir=str(site["data"]), pairs="recall_analyze")
    assert {k: config[k] for k in method} == method
    assert {k: config["sources"][k] for k in ("lr", "temperature", "batch_size", "samples", "data")} == dict(
        lr="method (reflect)", temperature="method (reflect)", batch_size="method (reflect)",
        samples="command line", data="acquire run")
    assert "A19 reflect schedule" in config["decisions"] and "A20 precision" in config["decisions"]
    assert config["decisions"] == tinythinker.decisions("reflect", "csqa")  # every one METHOD 9 gives it
    assert (config["model"], config["sources"]["model"]) == ("google-t5/t5-small", "acquire run")
    assert "grad_accum" not in config and "interval" not in config  # acquire's alone
    pairs = (reflected / "iter_1" / "recall_pairs.jsonl").read_text().splitlines()
    log = [json.loads(line) for line in (reflected / "iter_1" / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert pairs and len(steps) == len(pairs) // 32 + 1  # one cycle of S = RI steps (no analyze pairs here)
    # Policy and reference are the same weights at step 1, scored in batches of 32 and of 256: the margin is 0.
    assert abs(steps[0]["rewards/margins"]) < 1e-4 and abs(steps[0]["rewards/chosen"]) < 1e-4

    run(evaluate, site)
    rows = check_report("csqa", site, 8)
    assert [r["phase"] for r in rows] == ["acquire", "reflect"]


def test_readme_several_gpus_on_obqa(site):
    """The README's torchrun block on two CPU processes (gloo), after the teacher's single-process run."""
    _, teach, _, _, _ = readme_commands()
    check_teacher("obqa", site, run(command(teach, "obqa", site), site))
    lines = readme_commands("## Several GPUs", start="torchrun --nproc_per_node 4 ")
    assert [shlex.split(line)[3] for line in lines] == ["tinythinker.py"] * 2 + ["evaluate.py", "tailored.py"]
    acquire, reflect, evaluate, tailored = (command(line, "obqa", site, TORCHRUN) for line in lines)
    run(acquire, site)
    obqa = site["root"] / "work" / "runs" / "obqa"
    config = json.loads((obqa / "config.json").read_text())
    assert config["env"]["devices"] == 2 and config["effective_batch_size"] == 128
    run(reflect, site)
    assert json.loads((obqa / "reflect" / "config.json").read_text())["env"]["devices"] == 2
    out = run(evaluate, site)
    assert out.count("| obqa |") == 2  # one table, printed by rank 0 alone: acquire's and reflect's rows
    assert [r["phase"] for r in check_report("obqa", site, 8)] == ["acquire", "reflect"]
    run(tailored, site)  # the embedded world's Tailored, one round
    assert (site["root"] / "work" / "runs" / "tailored_world" / "round_1" / "best" / "model.safetensors").is_file()


def test_readme_own_data(site):
    """The README's "Your own data" block on a data set of 3- and 5-option questions (tests/fixtures/own/mini)."""
    shutil.copytree(OWN / "mini", site["root"] / "work" / "path" / "to" / "mydata")
    lines = readme_commands("## Your own data")
    assert [shlex.split(line)[1] for line in lines] == ["teacher.py"] * 2 + ["tinythinker.py"] * 2 + ["evaluate.py"]
    dry, teach, acquire, reflect, evaluate = (command(line, "csqa", site) for line in lines)
    bill = json.loads((out := run(dry, site))[out.index("{"):])
    assert bill["questions"] == 20 and bill["completions"] == 160  # CSQA's 8 per question
    summary = json.loads((out := run(teach, site))[out.index("{"):])
    assert summary["records"] > 0 and summary["failed_questions"] == 0
    records = teacher.read_records(site["data"] / "mydata" / "teacher_train.jsonl")
    assert {3, 5} <= {len(r["explanations"]) for r in records}  # every option explained, whatever their number
    run(acquire, site)
    run(reflect, site)
    run(evaluate, site)
    rows = json.loads((site["root"] / "work" / "runs" / "mydata" / "report.json").read_text())
    assert [r["phase"] for r in rows] == ["acquire", "reflect"]
    assert all(r["data"].endswith("mydata") and r["questions"] == 3 for r in rows)


def test_readme_real_run_on_strategyqa(site):
    _, teach, acquire, _, evaluate = readme_commands()
    check_teacher("strategyqa", site, run(command(teach, "strategyqa", site), site))
    run(command(acquire, "strategyqa", site), site)
    run(command(evaluate, "strategyqa", site), site)
    check_report("strategyqa", site, 3)


def test_readme_tailored_on_math(site, capsys):
    """The README's math block as typed, on the GSM8K fixture: the dry run's bill (nothing sent), `tailored.py --data
    gsm8k --limit N --rounds 2` against the math teacher and the Hub stand-ins, `evaluate.py runs/tailored_gsm8k
    --split test`. SVAMP and MultiArith take the same code past their loaders and demos: their dry runs check those."""
    lines = readme_commands("### Math word problems and the paper's five tasks")
    assert [shlex.split(line)[1:3] for line in lines] == [["tailored.py", "--data"]] * 2 + [["evaluate.py",
                                                                                            "runs/tailored_gsm8k"]]
    raw = [json.loads(line) for line in (site["data"] / "gsm8k" / "original" / "train.jsonl").read_text().splitlines()]
    solutions = {r["question"].strip(): r["answer"].split("####")[0].strip() for r in raw}
    MathTeacher.golds = {q.question: (q.answer, solutions.get(q.question, "")) for split in data.SPLITS
                         for q in data.load("gsm8k", split, site["data"])}
    server, url = serve(MathTeacher)
    dry, first_look, evaluate = ([sys.executable, str(ROOT / shlex.split(line)[1]), *shlex.split(line)[2:]]
                                 for line in lines)
    try:
        bill = json.loads((out := run(dry + ["--data-dir", str(site["data"])], site))[out.index("{"):])
        assert not MathTeacher.log  # the dry run sent nothing
        assert (bill["questions"], bill["requests"], bill["completions"]) == (23, 23, 92) and bill["cost_usd_est"] > 0
        for name in ("svamp", "multiarith"):  # in this process: the same code as the command, less its start-up
            tailored.main(["--data", name, "--dry-run", "--data-dir", str(site["data"])])
            assert json.loads(capsys.readouterr().out)["questions"] == 19
        run(first_look + ["--limit", "6", "--epochs", "1", "--max-new-tokens", "16", "--base-url", url + "/v1",
                          "--data-dir", str(site["data"])], site)
    finally:
        server.shutdown()
        server.server_close()
    runs = site["root"] / "work" / "runs" / "tailored_gsm8k"
    config = json.loads((runs / "config.json").read_text())
    assert (config["data"], config["limit"], config["max_new_tokens"]) == ("gsm8k", 6, 16)
    assert {"TL10 generation caps", "TL11 splits", "TL12 teacher settings", "TL13 parsers"} <= set(config["decisions"])
    first = MathTeacher.log[0]
    assert (first["model"], first["temperature"], first["max_tokens"], first["n"]) == ("gpt-4o-2024-05-13", 0.8, 512, 4)
    assert first["messages"][0]["content"].startswith("Question: Albert is wondering how much pizza")  # GSM8K's demos
    # round 1: the wrong fourth rationale is filtered out; the worked solution is kept (its annotations go at training)
    teacher_rows = data.read_jsonl(runs / "round_1" / "teacher.jsonl")
    assert [len(row["texts"]) for row in teacher_rows] == [3] * 6
    assert any("<<" in row["texts"][0] for row in teacher_rows)
    # round 2: one feedback request per mistake, its corrections filtered to the gold number, every one trained on
    mistakes = data.read_jsonl(runs / "round_2" / "mistakes.jsonl")
    corrections = data.read_jsonl(runs / "round_2" / "corrections.jsonl")
    assert [(r["id"], r["wrong"]) for r in corrections] == [(m["id"], t) for m in mistakes for t in m["texts"]]
    assert any(not r["texts"] for r in corrections)  # the wrong corrections were dropped
    by_question = {q.question: q.id for q in data.load("gsm8k", "train", site["data"])}
    sent, stored = defaultdict(set), defaultdict(set)
    for question, correction in MathTeacher.sent:
        sent[by_question[question]].add(correction)
    for row in corrections:
        stored[row["id"]].update(row["texts"])
    assert {i: texts for i, texts in stored.items() if texts} == sent
    summary = json.loads((runs / "summary.json").read_text())
    assert summary["2"]["requests"] == len(corrections) == summary["2"]["mistakes"]
    assert summary["2"]["rationales"] == sum(map(len, sent.values())) > 0
    out = run(evaluate, site)
    rows = json.loads((runs / "report.json").read_text())
    assert [(r["phase"], r["data"], r["split"], r["questions"], r["chance"]) for r in rows] == [
        (f"round {k}", "gsm8k", "test", 8, None) for k in (1, 2)]
    assert "| round 2 | gsm8k | cot | test | greedy | 8 |" in out and out.count(" | - |") == 2  # no chance figure


def test_readme_choosing_a_teacher(site, tmp_path):
    """The README's "Choosing a teacher" block as typed, each local server's address pointed at the stand-ins (the
    chat server, the math one for tailored.py) and the data at a copy of the fixtures: the smoke test's dry run sends
    nothing, and each run sends the model its line names (teacher.py's --model, tailored.py's --teacher-model)."""
    lines = readme_commands("## Choosing a teacher")
    assert [shlex.split(line)[1] for line in lines] == ["teacher.py"] * 4 + ["tailored.py"]
    shutil.copytree(FIXTURES, tmp_path / "data", ignore=shutil.ignore_patterns("README.md"))  # no answers cached
    MathTeacher.golds = {q.question: (q.answer, "") for q in data.load("gsm8k", "train", tmp_path / "data")}
    math_server, math_url = serve(MathTeacher)
    try:
        for line in lines:
            words = shlex.split(line)
            local = next((w for w in words if w.startswith("http://localhost:")), None)
            url = (math_url + "/v1") if words[1] == "tailored.py" else site["teacher"]
            cmd = [sys.executable, str(ROOT / words[1]), *[url if w == local else w for w in words[2:]],
                   "--limit", "4", "--data-dir", str(tmp_path / "data")]
            if words[1] == "tailored.py":
                cmd += ["--rounds", "1", "--epochs", "1", "--max-new-tokens", "8", "--out", str(tmp_path / "tl")]
            elif local is None:  # the OpenAI line: the stand-in in place of api.openai.com
                cmd += ["--base-url", site["teacher"]]
            sent = len(Teacher.models) + len(MathTeacher.log)
            out = run(cmd, site)
            if "--dry-run" in words:
                assert len(Teacher.models) + len(MathTeacher.log) == sent  # nothing sent
                assert json.loads(out[out.index("{"):])["questions"] == 4
                continue
            flag = "--teacher-model" if words[1] == "tailored.py" else "--model"
            model = words[words.index(flag) + 1] if flag in words else "gpt-4o-2024-05-13"
            asked = Teacher.models[sent - len(MathTeacher.log):] if words[1] == "teacher.py" else [
                p["model"] for p in MathTeacher.log[sent - len(Teacher.models):]]
            assert asked and set(asked) == {model}
    finally:
        math_server.shutdown()
        math_server.server_close()
    assert (tmp_path / "tl" / "round_1" / "best" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- defaults, failures

def test_teacher_and_tinythinker_share_one_default_data_directory():
    assert tinythinker.Config.data_dir == str(data.DEFAULT_DIR) == str(ROOT / "data")
    assert teacher.TeacherConfig.data_dir is None  # teacher.run falls back on data.DEFAULT_DIR


def test_a_failed_download_is_one_line_naming_the_url(tmp_path):
    env = {**os.environ, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}  # no network
    result = subprocess.run([sys.executable, str(ROOT / "teacher.py"), "--data", "obqa", "--dry-run",
                             "--data-dir", str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"cannot download {data.OBQA_ZIP} (") and "--data-dir" in line


def test_a_moved_file_is_one_line_too(tmp_path, monkeypatch):
    server, url = serve(Hub)  # answers 404 to anything but the Hub files
    monkeypatch.setattr(data, "CSQA_URL", url + "/moved/")
    try:
        with pytest.raises(SystemExit, match=r"cannot download .*/moved/train_rand_split.jsonl \(HTTP 404\)"):
            data.load("csqa", "train", tmp_path)
    finally:
        server.shutdown()
        server.server_close()


def test_reflect_without_an_acquire_run_says_what_to_do(tmp_path):
    with pytest.raises(SystemExit, match="no acquire run to reflect on"):
        tinythinker.parse_config(["--phase", "reflect", "--from", str(tmp_path)])


# ---------------------------------------------------------------------------------------------- reflect's schedule

@pytest.mark.parametrize("recall, analyze, steps", [(5000, 13000, 6280), (3000, 3300, 2820), (40, 0, 20)])
def test_reflect_follows_the_official_schedule(recall, analyze, steps):
    """A19: 10 cycles of S = RI + AI steps, RI = floor(R/32)+1, AI = (floor(A/R)+1)*RI, a validation every S."""
    cfg = tinythinker.parse_config(["--batch-size", "32", "--epochs", "10"])
    pairs = {s: [([5], [6], [7])] * n for s, n in dict(recall=recall, analyze=analyze).items() if n}
    plan = tinythinker.reflect_plan(cfg, pairs, seed=1)
    assert len(plan) == steps and plan.cycle == steps // 10
    # every pass over the pairs is all recall batches, then all analyze batches, passes back to back
    per_pass = -(-recall // 32) + -(-analyze // 32)
    stages = [plan.steps[i][1] for i in range(per_pass)]
    assert stages == ["recall"] * -(-recall // 32) + ["analyze"] * -(-analyze // 32)
    assert plan.steps[per_pass][:2] == (1, "recall")


def test_the_readme_time_projection_runs():
    """python -m tests.real_run_times, as the README cites it, at the smallest sizes: the table comes out."""
    result = subprocess.run([sys.executable, "-m", "tests.real_run_times", "--data-dir", str(FIXTURES), "--batch", "1",
                             "--eval-batch", "1", "--steps", "1"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "| acquire: training |" in result.stdout and "| total |" in result.stdout
