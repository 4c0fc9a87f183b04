"""Datasets, the stage text formats and batching (METHOD sections 2, 4, 5.1, 6).

Files live in the TinyThinker layout `{data_dir}/{name}/original/{file}` (so `data_dir` may point at a copy of the
official repo's `datasets/` folder); missing files are fetched from the datasets' official public locations.

Your own data set: `--data DIR` or `--data FILE.jsonl` in place of csqa/obqa/strategyqa.
* JSONL, one question per line: {"id": str, "question": str, "choices": [{"label": "A", "text": str}, ...],
  "answer": "B"}, with 2 to 5 options labelled A.. without gaps and the answer one of the labels; or, for a question
  with a numeric answer (tailored.py only: TinyThinker's analyze stage explains options), {"id": str, "question": str,
  "answer": "42"} with no choices and the answer a number as the official math parser writes one (NUMBER).
* DIR holds train.jsonl and, if you have them, valid.jsonl and test.jsonl; FILE.jsonl is a train.jsonl alone.
* A split without its file is drawn from train (A11's seed): a permutation by random.Random(SPLIT_SEED) gives valid
  its first tenth (at least one question) and test the next, whichever are missing; train keeps the rest in order.
* An id is used once across the files: a question in two splits would be tested on what it was trained on.
* UTF-8 (a byte-order mark is skipped); text UTF-8 cannot encode and questions over MAX_QUESTION_CHARS are refused.
* It is named by dataset_name (DIR's basename, FILE's stem): teacher records go to {data_dir}/{that}/ and runs to
  runs/{that}/, not into your folder.

Decisions recorded here (METHOD section 9):
* A11 splits: the official code draws the CSQA valid sample and the StrategyQA shuffle with no seed, so its splits
  cannot be reproduced; ours are drawn with `random.Random(SPLIT_SEED)` so they are the same on every machine.
* A13 options: "(A) x (B) y" is built from the structured choices, not by splitting "A. x, B. y" on ", ", so the
  OBQA options whose text contains ", " are kept intact instead of garbled.
* A1 order: the summarize input joins the analyses in alphabetical order at training time too, as inference does
  (METHOD 6); the teacher's order (gold option first) would let the student learn "the first analysis is the answer",
  a shortcut that is absent at test time.
"""
import io
import json
import os
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import requests
import torch

from files import atomic_write, read_json

LETTERS = "ABCDE"
SPLITS = ("train", "valid", "test")
SPLIT_SEED = 42
DEFAULT_DIR = Path(__file__).resolve().parent / "data"

# Official public locations. CSQA and the math sets serve plain files; OBQA and StrategyQA are published only as zips.
CSQA_URL = "https://s3.amazonaws.com/commensenseqa/"
GSM8K_URL = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/"
SVAMP_URL = "https://raw.githubusercontent.com/arkilpatel/SVAMP/main/"
# MultiArith (Roy & Roth, 2015) as the zero-shot-CoT repository keeps it, the copy its successors load
MULTIARITH_URL = "https://raw.githubusercontent.com/kojima-takeshi188/zero_shot_cot/main/dataset/MultiArith/"
# (the OBQA zip is also at s3-us-west-2.amazonaws.com/ai2-website/data/, the address in AI2's OpenBookQA repo)
OBQA_ZIP = "https://ai2-public-datasets.s3.amazonaws.com/open-book-qa/OpenBookQA-V1-Sep2018.zip"
STRATEGYQA_ZIP = "https://storage.googleapis.com/ai2i/strategyqa/data/strategyqa_dataset.zip"
# local file name -> path suffix of that file inside the download (the zip's top folder is not relied on)
FILES = {
    "csqa": {"train_rand_split.jsonl": "train_rand_split.jsonl", "dev_rand_split.jsonl": "dev_rand_split.jsonl"},
    "obqa": {"train.jsonl": "Data/Main/train.jsonl", "dev.jsonl": "Data/Main/dev.jsonl",
             "test.jsonl": "Data/Main/test.jsonl"},
    "strategyqa": {"strategyqa_train.json": "strategyqa_train.json"},
    "gsm8k": {"train.jsonl": "train.jsonl", "test.jsonl": "test.jsonl"},
    "svamp": {"SVAMP.json": "SVAMP.json"},
    "multiarith": {"MultiArith.json": "MultiArith.json"},
}
MATH = ("gsm8k", "svamp", "multiarith")  # numeric answers: Tailored Learning's math tasks, no options
# A gold number as the official math parser writes one: digits, a sign, a decimal point, no commas
NUMBER = re.compile(r"-?\d+(\.\d+)?")


@dataclass
class Question:
    id: str
    question: str
    choices: list[str]  # choices[i] is option LETTERS[i]; none for a number question
    answer: str  # gold letter ("A" yes, "B" no for yes_no), or the gold number as a string (NUMBER)
    kind: str = "choice"  # "choice" | "yes_no" (StrategyQA, options yes and no) | "number" (math)


@dataclass
class Chain:
    """One recall -> analyze -> summarize pass for one question; stages absent from the variant stay None."""
    id: str
    answer: str
    recall: str | None
    analyses: dict[str, str] | None
    summary: str
    prediction: str | None


# ---------------------------------------------------------------- download and load (METHOD 2)

def _get(url: str, folder: Path) -> bytes:
    """The file at `url`; a failed download (no network, a moved URL) ends the run with one line saying so."""
    try:
        response = requests.get(url, timeout=120)
        response.raise_for_status()
    except requests.RequestException as e:
        reason = f"HTTP {e.response.status_code}" if e.response is not None else type(e).__name__
        raise SystemExit(f"cannot download {url} ({reason}); with no network or a moved file, put the official "
                         f"files ({', '.join(FILES[folder.parent.name])}) in {folder}, or pass --data-dir to a "
                         "folder that holds them as {name}/original/{file}") from None
    return response.content


def download(name: str, data_dir=None) -> Path:
    """Fetch the official files of `name` that are not yet in `{data_dir}/{name}/original/`; return that folder."""
    folder = Path(data_dir or DEFAULT_DIR) / name / "original"
    missing = [f for f in FILES[name] if not (folder / f).exists()]
    if not missing:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    plain = {"csqa": CSQA_URL, "gsm8k": GSM8K_URL, "svamp": SVAMP_URL, "multiarith": MULTIARITH_URL}.get(name)
    if plain:
        for f in missing:
            atomic_write(folder / f, _get(plain + FILES[name][f], folder))
        return folder
    url = OBQA_ZIP if name == "obqa" else STRATEGYQA_ZIP
    with zipfile.ZipFile(io.BytesIO(_get(url, folder))) as archive:
        for f in missing:
            members = [m for m in archive.namelist() if m == FILES[name][f] or m.endswith("/" + FILES[name][f])]
            if len(members) != 1:
                raise FileNotFoundError(f"{url}: expected one member ending in {FILES[name][f]}, found {members}")
            atomic_write(folder / f, archive.read(members[0]))
    return folder


class DataError(ValueError):
    """A data set or teacher file that cannot be read as one; the message names the file and the line."""


def text_lines(path: Path):
    """(line number, text) of a UTF-8 text file, without the byte-order mark some editors write first; a byte that
    is not UTF-8 is named with its line."""
    for number, raw in enumerate(Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{number}: not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None


def jsonl_objects(path: Path):
    """(line number, parsed value) of every non-blank line of a JSONL file. A line is named when it is not JSON
    (5,000-digit integers and deep nesting included), or when it holds text that UTF-8 cannot encode: a lone
    surrogate such as "\\ud800", which JSON's escapes allow and which no output file could hold."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            value = read_json(line)
        except ValueError as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e).split(";")[0]
            raise DataError(f"{path}:{number}: not valid JSON ({reason})") from None
        if "\\u" in line:  # a surrogate can only come from an escape
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"{path}:{number}: text holds {e.object[e.start:e.end]!r}, a lone surrogate that "
                                "UTF-8 cannot encode") from None
        yield number, value


def _multiple_choice(obj, where: str) -> Question:
    """CSQA / OBQA record: {"id", "question": {"stem", "choices": [{"label", "text"}]}, "answerKey"}."""
    try:
        qid, stem, key, choices = obj["id"], obj["question"]["stem"], obj["answerKey"], obj["question"]["choices"]
        labels, texts = tuple(c["label"] for c in choices), tuple(c["text"] for c in choices)
    except KeyError as e:
        raise DataError(f"{where}: not a multiple-choice record (no {e})") from None
    except TypeError:
        raise DataError(f"{where}: not a multiple-choice record (a field of the wrong type)") from None
    if not (isinstance(qid, (str, int)) and isinstance(stem, str) and all(isinstance(x, str) for x in labels + texts)):
        raise DataError(f"{where}: id, stem and choice labels and texts must be strings")
    return Question(str(qid), stem, _lettered(labels, texts, key, "answerKey", where), key)


def _lettered(labels: tuple, texts: tuple, key, key_field: str, where: str) -> list[str]:
    """The option texts in label order, once the labels are checked to be A.. without gaps and the key one of them."""
    if len(labels) < 2:
        raise DataError(f"{where}: {len(labels)} option(s); a question needs at least two")
    if len(labels) > len(LETTERS):
        raise DataError(f"{where}: {len(labels)} options; a question has at most {len(LETTERS)} ({LETTERS[0]} to "
                        f"{LETTERS[-1]})")
    if "".join(sorted(labels)) != LETTERS[:len(labels)]:
        raise DataError(f"{where}: choice labels {''.join(labels)!r} are not A.. without gaps")
    if not isinstance(key, str) or key not in labels:
        raise DataError(f"{where}: {key_field} {key!r} is not one of the labels {''.join(sorted(labels))}")
    return [texts[i] for i in sorted(range(len(labels)), key=labels.__getitem__)]


def _unique(questions: list[Question], where: list[str], path: Path) -> list[Question]:
    """The questions of one file, checked to be some and to have distinct ids: reflect pairs chains by id, so a
    repeated id would pair one question's chain with the other's prompt."""
    if not questions:
        raise DataError(f"{path}: no questions")
    seen = {}
    for q, w in zip(questions, where):
        seen.setdefault(q.id, []).append(w)
    repeated = [f"{qid} ({', '.join(ws)})" for qid, ws in seen.items() if len(ws) > 1]
    if repeated:
        raise DataError(f"{path}: duplicate question ids: {'; '.join(repeated[:5])}"
                        + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""))
    return questions


def _read_jsonl(path: Path) -> list[Question]:
    questions, lines = [], []
    for number, obj in jsonl_objects(path):
        questions.append(_multiple_choice(obj, f"{path}:{number}"))
        lines.append(f"line {number}")
    return _unique(questions, lines, path)


def _json_list(path: Path) -> list:
    """A file holding one JSON list (StrategyQA, SVAMP, MultiArith); a file that is not one is named."""
    text = "\n".join(line for _, line in text_lines(path))
    if not text.strip():
        raise DataError(f"{path}: empty file")
    try:
        items = read_json(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except ValueError as e:  # a 5,000-digit integer, deep nesting
        raise DataError(f"{path}: not valid JSON ({str(e).split(';')[0]})") from None
    if not isinstance(items, list):
        raise DataError(f"{path}: expected a JSON list of questions")
    return items


def _read_strategyqa(path: Path) -> list[Question]:
    """A JSON list of {qid, question, answer: bool, ...}; options are "yes" (A, answer true) and "no" (B)."""
    items, questions = _json_list(path), []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("qid"), str) and isinstance(item.get("question"), str)
                and isinstance(item.get("answer"), bool)):
            raise DataError(f"{path}: item {i}: needs a string qid and question and a boolean answer")
        questions.append(Question(item["qid"], item["question"], ["yes", "no"], "A" if item["answer"] else "B",
                                  "yes_no"))
    return _unique(questions, [f"item {i}" for i in range(len(items))], path)


def _gold_number(value, where: str) -> str:
    """A JSON number as the gold string: the official str(int(x)) for a whole number (every answer of the official
    SVAMP and MultiArith files is one); a fractional one keeps its decimals instead of being truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise DataError(f"{where}: the answer must be a number, not {json.dumps(value)[:40]}")
    return str(int(value)) if value == int(value) else str(value)


def _read_gsm8k(path: Path) -> list[Question]:
    """openai/grade-school-math JSONL: {"question", "answer": a worked solution ending "#### N"}. The gold is N
    without its thousands commas (TL11): the official keeps "1,080", which its parser, dropping commas, never gives."""
    questions, lines = [], []
    for number, obj in jsonl_objects(path):
        where = f"{path}:{number}"
        if not (isinstance(obj, dict) and isinstance(obj.get("question"), str) and isinstance(obj.get("answer"), str)
                and "####" in obj["answer"]):
            raise DataError(f"{where}: needs a string question and an answer ending \"#### N\"")
        gold = obj["answer"].split("####")[-1].strip().replace(",", "")
        if not NUMBER.fullmatch(gold):
            raise DataError(f"{where}: the answer after \"####\" is not a number: {gold[:40]!r}")
        questions.append(Question(f"{path.stem}-{number}", obj["question"].strip(), [], gold, "number"))
        lines.append(f"line {number}")
    return _unique(questions, lines, path)


def _read_svamp(path: Path) -> list[Question]:
    """SVAMP.json: a JSON list of {ID, Body, Question, Answer (float), ...}. The question is the official
    preprocessor's text: Body, a period appended if it lacks one, then Question."""
    items, questions = _json_list(path), []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not (isinstance(item, dict) and all(isinstance(item.get(f), str) for f in ("ID", "Body", "Question"))):
            raise DataError(f"{where}: needs a string ID, Body and Question and a numeric Answer")
        body = item["Body"] if item["Body"].endswith(".") else item["Body"] + "."
        questions.append(Question(item["ID"], f"{body} {item['Question']}".strip(), [],
                                  _gold_number(item.get("Answer"), where), "number"))
    return _unique(questions, [f"item {i}" for i in range(len(items))], path)


def _read_multiarith(path: Path) -> list[Question]:
    """MultiArith.json: a JSON list of {iIndex, sQuestion, lSolutions: [float], ...}; the gold is the first solution
    (every problem has one)."""
    items, questions = _json_list(path), []
    for i, item in enumerate(items):
        where = f"{path}: item {i}"
        if not (isinstance(item, dict) and isinstance(item.get("iIndex"), int)
                and isinstance(item.get("sQuestion"), str) and isinstance(item.get("lSolutions"), list)
                and item["lSolutions"]):
            raise DataError(f"{where}: needs an integer iIndex, a string sQuestion and a non-empty lSolutions list")
        questions.append(Question(str(item["iIndex"]), item["sQuestion"].strip(), [],
                                  _gold_number(item["lSolutions"][0], where), "number"))
    return _unique(questions, [f"item {i}" for i in range(len(items))], path)


OWN_FIELDS = {"id": str, "question": str, "choices": list, "answer": str}
# The most characters a question and its options may hold together: T5 reads 512 tokens (its checkpoints'
# n_positions), about 4 characters each (teacher.CHARS_PER_TOKEN). The official code truncates nothing (METHOD 5.1),
# so a longer question is refused at load, before the teacher is paid for it or a batch is sized by it.
MAX_QUESTION_CHARS = 512 * 4


def _own_question(obj, where: str) -> Question:
    """A line of your own data set (layout in the module docstring), each field checked and named when wrong; a line
    without "choices" is a number question."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: not a JSON object")
    for field, kind in OWN_FIELDS.items():
        if field == "choices" and field not in obj:
            continue
        if field not in obj:
            raise DataError(f"{where}: no field {field!r}")
        if not isinstance(obj[field], kind) or not obj[field]:
            raise DataError(f"{where}: field {field!r} must be a non-empty {kind.__name__}, not "
                            f"{json.dumps(obj[field], ensure_ascii=False)[:40]}")
    if "choices" not in obj:
        if not NUMBER.fullmatch(obj["answer"]):
            raise DataError(f"{where}: no field 'choices', and field 'answer' is not a number such as 42 or -2.5 "
                            f"(digits, no commas or units): {json.dumps(obj['answer'])[:40]}; a question has 2 to 5 "
                            "choices, or none and a numeric answer")
        return Question(obj["id"], obj["question"], [], obj["answer"], "number")
    for i, choice in enumerate(obj["choices"]):
        if not (isinstance(choice, dict) and isinstance(choice.get("label"), str)
                and isinstance(choice.get("text"), str) and choice["text"]):
            raise DataError(f"{where}: field 'choices' item {i} must be {{\"label\": str, \"text\": non-empty str}}")
    labels, texts = tuple(c["label"] for c in obj["choices"]), tuple(c["text"] for c in obj["choices"])
    return Question(obj["id"], obj["question"], _lettered(labels, texts, obj["answer"], "answer", where), obj["answer"])


def _read_own(path: Path, seen: dict[str, str]) -> list[Question]:
    """The questions of one file of your own data set; `seen` maps the ids of the files read before (and of this
    file's lines read so far) to their file:line, so that an id used twice names both places."""
    questions = []
    for number, obj in jsonl_objects(path):
        q = _own_question(obj, f"{path}:{number}")
        length = len(q.question) + sum(map(len, q.choices))
        if length > MAX_QUESTION_CHARS:
            raise DataError(f"{path}:{number}: the question and its options hold {length} characters, more than the "
                            f"{MAX_QUESTION_CHARS} that fit T5's 512-token input")
        if q.id in seen:
            raise DataError(f"{path}:{number}: field 'id' {q.id!r} is used already at {seen[q.id]}")
        seen[q.id] = f"{path}:{number}"
        questions.append(q)
    if not questions:
        raise DataError(f"{path}: no questions")
    return questions


def _load_own(path: Path, split: str) -> list[Question]:
    """One split of your own data set: its file, or else drawn from train (the module docstring says how)."""
    files = {s: path / f"{s}.jsonl" for s in SPLITS} if path.is_dir() else {"train": path}
    if not files["train"].is_file():
        raise DataError(f"{path}: no train.jsonl; your own data set holds train.jsonl, and valid.jsonl and test.jsonl "
                        "if you have them")
    seen = {}
    splits = {s: _read_own(f, seen) for s, f in files.items() if f.is_file()}
    train, missing = splits["train"], [s for s in SPLITS if s not in splits]
    k = max(1, len(train) // 10)
    if len(train) <= k * len(missing):
        raise DataError(f"{files['train']}: {len(train)} question(s) are too few to draw {' and '.join(missing)} "
                        f"from; it needs at least {k * len(missing) + 1}")
    return {**splits, **_drawn(train, {s: k for s in missing})}[split]


def _drawn(questions: list[Question], sizes: dict[str, int]) -> dict[str, list[Question]]:
    """Splits of the given sizes drawn from `questions`, in the order of `sizes`, from one permutation by
    random.Random(SPLIT_SEED); each keeps file order, and "train" is the rest."""
    order = random.Random(SPLIT_SEED).sample(range(len(questions)), k=len(questions))
    splits, start = {}, 0
    for name, size in sizes.items():
        splits[name] = [questions[j] for j in sorted(order[start:start + size])]
        start += size
    taken = set(order[:start])
    return {**splits, "train": [q for j, q in enumerate(questions) if j not in taken]}


def is_own(name: str) -> bool:
    """Whether --data names your own data set: no built-in name, and an existing directory or .jsonl file."""
    path = Path(name)
    own = path.is_dir() or path.suffix == ".jsonl" and path.is_file()
    return bool(name) and name not in (*FILES, "world") and own


def _short_name(path: str) -> str:
    """Your own data set's directory basename or file stem."""
    path = Path(os.path.abspath(path))  # abspath, not resolve: a symlinked folder keeps the name it was given
    return path.name if path.is_dir() else path.stem


def check_name(name: str, listed=tuple(n for n in FILES if n not in MATH)):
    """One line for a --data that names no data set, your own named like a built-in one (their teacher records and
    runs would mix), or named "" or ".x" (they would land in runs/ and the data folder themselves, or hidden); "world"
    passes (its callers build it, it has no files). The line lists the built-in sets of `listed`: TinyThinker's
    commands take the multiple-choice ones (check_choices refuses the others), tailored.py every one."""
    if name == "world" or name in FILES:
        return
    if not is_own(name):
        raise DataError(f"--data must be one of world, {', '.join(listed)} or a directory or .jsonl file of your own "
                        f"questions, not {name!r}")
    if not _short_name(name) or _short_name(name).startswith("."):  # "/", "..jsonl": runs/{name} would be runs/
        raise DataError(f"{name}: your own data set is named {_short_name(name)!r} (its folder's name or its file's "
                        "stem); a name cannot be empty or start with '.'; rename it")
    if _short_name(name) in (*FILES, "world"):
        raise DataError(f"{name}: your own data set cannot be called {_short_name(name)!r}, a built-in data set's "
                        "name; rename it")


def check_choices(name: str):
    """One line for a data set with questions without options, which TinyThinker cannot take: its analyze stage
    explains every option. A built-in one is named by its name, your own is read (it is local) to find one."""
    if name in MATH:
        raise DataError(f"--data {name}: its questions have numeric answers and no options, and TinyThinker's "
                        f"analyze stage explains each option; Tailored Learning trains on them: "
                        f"python tailored.py --data {name}")
    if is_own(name):
        for split in SPLITS:
            number = next((q for q in load(name, split) if q.kind == "number"), None)
            if number:
                raise DataError(f"{name}: question {number.id!r} has no choices (a numeric answer), and TinyThinker's "
                                f"analyze stage explains each option; Tailored Learning trains on such questions: "
                                f"python tailored.py --data {name}")


def dataset_name(name: str) -> str:
    """The folder name of a data set's teacher records ({data_dir}/{it}/) and runs (runs/{it}/): a built-in name
    as it is, your own data set's directory basename or file stem."""
    check_name(name)
    return _short_name(name) if is_own(name) else name


def load(name: str, split: str, data_dir=None) -> list[Question]:
    """The splits of METHOD 2 (train/valid/test), drawn with SPLIT_SEED where the official code drew unseeded.

    csqa: valid = a random sample of official train the size of official dev, train = the rest (file order),
    test = official dev. obqa: official train/dev/test. strategyqa: shuffle, then 80% / 10% / the rest.
    gsm8k: official test; valid = a tenth of official train drawn with the seed, train the rest. svamp, multiarith
    (one file each): test = 3/10 drawn with the seed (the paper's 300 of 1,000 and 180 of 600), valid = a tenth of
    the rest, train what remains (TL11: the official code validates on test; ours never does).
    Your own data set (a path; data_dir is not used): its files, the missing splits drawn from train.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be train, valid or test, not {split!r}")
    if is_own(name):
        return _load_own(Path(name), split)
    if name not in FILES:
        check_name(name)
        raise ValueError("the world is built by world.py; data.load reads the data sets that have files")
    folder = download(name, data_dir)
    rng = random.Random(SPLIT_SEED)
    if name == "csqa":
        train, dev = _read_jsonl(folder / "train_rand_split.jsonl"), _read_jsonl(folder / "dev_rand_split.jsonl")
        if len(dev) >= len(train):  # valid is drawn from train, the size of dev, and train keeps the rest
            raise DataError(f"{folder}: train_rand_split.jsonl needs more questions than dev_rand_split.jsonl")
        if split == "test":
            return dev
        valid = set(rng.sample(range(len(train)), k=len(dev)))
        return [q for i, q in enumerate(train) if (i in valid) == (split == "valid")]
    if name == "obqa":
        return _read_jsonl(folder / {"train": "train.jsonl", "valid": "dev.jsonl", "test": "test.jsonl"}[split])
    if name == "gsm8k":
        if split == "test":
            return _read_gsm8k(folder / "test.jsonl")
        train = _read_gsm8k(folder / "train.jsonl")
        return _drawn(train, {"valid": max(1, len(train) // 10)})[split]
    if name in MATH:
        read, file = {"svamp": (_read_svamp, "SVAMP.json"), "multiarith": (_read_multiarith, "MultiArith.json")}[name]
        questions = read(folder / file)
        test = len(questions) * 3 // 10
        return _drawn(questions, {"test": test, "valid": max(1, (len(questions) - test) // 10)})[split]
    questions = _read_strategyqa(folder / "strategyqa_train.json")
    rng.shuffle(questions)
    n_train, n_valid = len(questions) * 8 // 10, len(questions) // 10
    bounds = {"train": (0, n_train), "valid": (n_train, n_train + n_valid), "test": (n_train + n_valid, None)}[split]
    return questions[slice(*bounds)]


def input_files(name: str, data_dir=None) -> list[Path]:
    """The files `load` reads for a data set (or would download): what no output file may be."""
    if is_own(name):
        path = Path(name)
        return [path / f"{s}.jsonl" for s in SPLITS] if path.is_dir() else [path]
    return [Path(data_dir or DEFAULT_DIR) / name / "original" / f for f in FILES.get(name, ())]


def read_jsonl(path) -> list[dict]:
    """The rows of a JSONL file, each a JSON object (DataError names the file and line of one that is not)."""
    rows = []
    for number, row in jsonl_objects(path):
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows


def write_jsonl(path, rows: list[dict]):
    """Rows as JSONL in UTF-8, written atomically (files.atomic_write): a killed run leaves the old file or the new."""
    atomic_write(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))


# ---------------------------------------------------------------- stage text formats (METHOD 4, 6)

def option_string(q: Question) -> str:
    """'(A) x (B) y ...' from the structured choices (A13)."""
    return " ".join(f"({letter}) {text}" for letter, text in zip(LETTERS, q.choices))


def with_period(text: str) -> str:
    """Strip, then append '.' unless the text ends with . " or ' (METHOD 3.4 targets, METHOD 6 generated pieces)."""
    text = text.strip()
    return text if text.endswith((".", '"', "'")) else text + "."


def _context(q: Question, recall: str | None) -> str:
    """{QO}, followed by the recall when the stage variant has one."""
    qo = f"{q.question}\n{option_string(q)}"
    return qo if recall is None else f"{qo}\nRecall: {recall}"


def recall_input(q: Question) -> str:
    return f"{_context(q, None)}\nRecall:"


def analyze_input(q: Question, recall: str | None, letter: str) -> str:
    """recall=None gives the analyze_summarize variant's input (no recall stage)."""
    return f"{_context(q, recall)}\nAnalyze: For option {letter},"


def summarize_input(q: Question, recall: str | None, analyses: dict[str, str] | None) -> str:
    """Analyses keyed by letter, joined by spaces in ALPHABETICAL order at training and inference alike (A1).

    recall=None drops the recall part, empty analyses drop the analyze part (the ablation variants of METHOD 4).
    """
    text = _context(q, recall)
    if analyses:
        text += "\nAnalyze: " + " ".join(f"For option {letter}, {analyses[letter]}" for letter in sorted(analyses))
    return text + "\nSummarize:"


def summary_target(letter: str) -> str:
    return f"So the answer is option {letter}."


def parse_answer(text: str) -> str | None:
    """The predicted letter of a summary (METHOD 6); None when the sentence is absent (counted wrong)."""
    match = re.search(r"the answer is option ([A-Z])\.", text)
    return match.group(1) if match else None


STAGES = ("summarize", "recall_summarize", "analyze_summarize", "recall_analyze_summarize")


def _check_stages(stages: str):
    if stages not in STAGES:
        raise ValueError(f"stage variant {stages!r} is not one of {STAGES}")


def record_question(record: dict) -> Question:
    return Question(record["id"], record["question"], record["choices"], record["answer"])


def stage_examples(records: list[dict], stages: str) -> dict[str, list[tuple[str, str]]]:
    """(input, target) pairs per stage of the variant `stages`, from teacher records (METHOD 4).

    Exact duplicate pairs are dropped, first occurrence kept: this is the dedup by (input, target) of recall,
    analyze and summarize, and, because the target depends only on the question, also the by-input dedup of the
    `summarize` variant (one example per question). recall_summarize is deduplicated too, as its notebook intended.
    """
    _check_stages(stages)
    names = [s for s in ("recall", "analyze", "summarize") if s in stages]
    pairs: dict[str, dict[tuple[str, str], None]] = {s: {} for s in names}
    for record in records:
        q, ki = record_question(record), record["key_information"]
        recall = ki if "recall" in names else None
        if recall is not None:
            pairs["recall"][(recall_input(q), ki)] = None
        analyses = record["explanations"] if "analyze" in names else None
        for letter in sorted(analyses or {}):
            pairs["analyze"][(analyze_input(q, recall, letter), analyses[letter])] = None
        pairs["summarize"][(summarize_input(q, recall, analyses), summary_target(q.answer))] = None
    return {s: list(p) for s, p in pairs.items()}


# ---------------------------------------------------------------- batching (METHOD 5.1)

def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch of n examples as index lists: a permutation drawn from (seed, epoch) alone, so a
    resumed run can rebuild the epoch and skip to batch k."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [order[s:s + batch_size] for s in range(0, n, batch_size)]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int = 0):
    """Pad to the longest in the batch: inputs with pad_id (mask 0), labels with -100 (ignored by the loss)."""
    width_in, width_out = max(len(x) for x, _ in examples), max(len(y) for _, y in examples)
    input_ids = torch.tensor([x + [pad_id] * (width_in - len(x)) for x, _ in examples])
    attention_mask = torch.tensor([[1] * len(x) + [0] * (width_in - len(x)) for x, _ in examples])
    labels = torch.tensor([y + [-100] * (width_out - len(y)) for _, y in examples])
    return input_ids, attention_mask, labels


# ---------------------------------------------------------------- chain of thought (Tailored Learning, METHOD 10.2)

# The official parsers read the answer after "\nAnswer"; T5 writes a space where they have a newline (TL2), so any
# whitespace before "Answer" marks it here.
ANSWER_MARKER = re.compile(r"\sAnswer")
CALCULATOR = re.compile(r"<<[^>]*>>")  # GSM8K's calculator annotations: "48/2 = <<48/2=24>>24"


def gold_text(q: Question) -> str:
    """The gold answer as the official demos write it: the number, "Yes"/"No", or the option's text and "(x)"."""
    if q.kind == "number":
        return q.answer
    if q.kind == "yes_no":
        return "Yes" if q.answer == "A" else "No"
    return f"{q.choices[LETTERS.index(q.answer)]} ({q.answer.lower()})"


def cot_input(q: Question) -> str:
    """The official prompt of the question without its few-shot demos (TL1): the CSQA layout for multiple choice
    (options lettered (a), (b), ...), the "Reasoning:" layout for yes/no and number questions."""
    if q.kind != "choice":
        return f"Question: {q.question}\nReasoning:"
    options = "\n".join(f"({letter.lower()}) {text}" for letter, text in zip(LETTERS, q.choices))
    return f"Question: {q.question}\nAnswer Choices:\n{options}\nAnswer:"


def cot_target(rationale: str, q: Question) -> str:
    """The one formatter of anchors, positives and negatives alike (METHOD 10.5): GSM8K's calculator annotations
    dropped, and for yes/no and number questions the gold "Answer: N" the official preprocessor appends (TL2: after
    a space, not a newline: T5's vocabulary has no newline). A multiple-choice rationale ends in its own "(x)"."""
    rationale = CALCULATOR.sub("", rationale)
    return rationale if q.kind == "choice" else f"{rationale} Answer: {gold_text(q)}"


def _answer_part(text: str) -> tuple[str, bool]:
    """(where the official parsers look, whether an answer marker was found): the text up to its first blank line,
    and of that the part between the first answer marker and the next one when there is a marker."""
    text = text.strip().split("\n\n")[0]
    parts = ANSWER_MARKER.split(text)
    return (parts[1], True) if len(parts) > 1 else (text, False)


def parse_cot(text: str, q: Question) -> str | None:
    """The answer a chain-of-thought text gives, as q.answer writes it; None when nothing parses (counted wrong, as the
    official's sentinel). The official parsers (METHOD 10.2), each difference a part of TL13:
    number: the first number after the answer marker or else after "Therefore, the answer is", else the last number;
    commas removed, a trailing "." dropped, compared as strings ("18.0" is not "18").
    yes/no: of the whitespace-separated words (lower-cased, "." stripped), the first yes/no after the marker, else the
    last one. Multiple choice: on the first line, the first "(x)" (either case), else the line being a bare letter;
    a letter the question does not offer is None."""
    if q.kind == "number":
        part, marked = _answer_part(text)
        if not marked and "Therefore, the answer is" in part:
            part, marked = part.split("Therefore, the answer is")[1], True
        numbers = [n.strip(".") for n in re.findall(r"-?\d+\.?\d*", part.replace(",", ""))]
        return (numbers[0] if marked else numbers[-1]) if numbers else None
    if q.kind == "yes_no":
        part, marked = _answer_part(text)
        words = [w for w in (w.lower().strip(".") for w in part.split()) if w in ("yes", "no")]
        return ("A" if (words[0] if marked else words[-1]) == "yes" else "B") if words else None
    line = text.strip().split("\n")[0].strip()
    match = re.search(r"\(([a-e])\)", line, re.I)
    letter = match.group(1).upper() if match else line.upper()
    return letter if letter in LETTERS[:len(q.choices)] and (match or len(line) == 1) else None
