"""data.py: loaders on hand-written records in each official layout and on your own data set (tests/fixtures/own),
the downloader against a local HTTP server, the stage text formats against literal strings, the answer parser, and
batching."""
import functools
import http.server
import json
import shutil
import sys
import threading
import zipfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from data import Question  # noqa: E402


REAL = Path(__file__).resolve().parent / "fixtures" / "real"


def csqa_line(i, answer="B", labels="ABCDE"):
    choices = [{"label": letter, "text": f"opt{i}{letter}"} for letter in labels]
    return json.dumps({"answerKey": answer, "id": f"c{i}",
                       "question": {"question_concept": "x", "choices": choices, "stem": f"csqa question {i}?"}})


def obqa_line(i, answer="D"):
    choices = [{"text": t, "label": letter} for letter, t in zip("ABCD", ["red", "a, b and c", "blue", "green"])]
    return json.dumps({"id": f"o{i}", "question": {"stem": f"obqa stem {i}", "choices": choices}, "answerKey": answer})


def strategyqa_items(count):
    return [{"qid": f"s{i}", "term": "t", "description": "d", "question": f"Is {i} even?", "answer": i % 2 == 0,
             "facts": [], "decomposition": [], "evidence": []} for i in range(count)]


def write(folder: Path, name: str, files: dict[str, str]):
    (folder / name / "original").mkdir(parents=True, exist_ok=True)
    for f, text in files.items():
        (folder / name / "original" / f).write_text(text)


# ---------------------------------------------------------------- loaders

def test_csqa_splits_are_seeded_and_disjoint(tmp_path):
    train = "\n".join(csqa_line(i) for i in range(10)) + "\n\n"  # a trailing blank line is not a record
    write(tmp_path, "csqa", {"train_rand_split.jsonl": train,
                             "dev_rand_split.jsonl": "\n".join(csqa_line(i, "E") for i in range(10, 13))})
    tr, va, te = (data.load("csqa", s, tmp_path) for s in ("train", "valid", "test"))
    assert (len(tr), len(va), len(te)) == (7, 3, 3)
    assert {q.id for q in tr} | {q.id for q in va} == {f"c{i}" for i in range(10)}
    assert not {q.id for q in tr} & {q.id for q in va}
    assert [q.id for q in te] == ["c10", "c11", "c12"] and te[0].answer == "E"
    assert data.load("csqa", "valid", tmp_path) == va  # same seed, same split
    assert tr[0].choices == [f"opt{tr[0].id[1:]}{letter}" for letter in "ABCDE"]


def test_obqa_splits_and_option_with_comma(tmp_path):
    write(tmp_path, "obqa", {"train.jsonl": obqa_line(1) + "\n" + obqa_line(2, "A"), "dev.jsonl": obqa_line(3),
                             "test.jsonl": obqa_line(4)})
    tr = data.load("obqa", "train", tmp_path)
    assert [q.id for q in tr] == ["o1", "o2"] and [q.answer for q in tr] == ["D", "A"]
    assert [q.id for q in data.load("obqa", "valid", tmp_path)] == ["o3"]
    assert [q.id for q in data.load("obqa", "test", tmp_path)] == ["o4"]
    # A13: an option containing ", " stays one option
    assert data.option_string(tr[0]) == "(A) red (B) a, b and c (C) blue (D) green"


def test_strategyqa_split_sizes_and_labels(tmp_path):
    write(tmp_path, "strategyqa", {"strategyqa_train.json": json.dumps(strategyqa_items(20))})
    splits = {s: data.load("strategyqa", s, tmp_path) for s in ("train", "valid", "test")}
    assert [len(v) for v in splits.values()] == [16, 2, 2]
    assert sorted(q.id for v in splits.values() for q in v) == sorted(f"s{i}" for i in range(20))
    q = splits["train"][0]
    assert q.choices == ["yes", "no"] and q.answer == ("A" if int(q.id[1:]) % 2 == 0 else "B")


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", r"train.jsonl:2: not valid JSON"),
    (json.dumps({"id": "x", "answerKey": "A"}), r"train.jsonl:2: not a multiple-choice record"),
    (obqa_line(9, "E"), r"train.jsonl:2: answerKey 'E' is not one of the labels ABCD"),
])
def test_malformed_line_names_file_and_line(tmp_path, bad_line, message):
    write(tmp_path, "obqa", {"train.jsonl": obqa_line(1) + "\n" + bad_line + "\n", "dev.jsonl": "",
                             "test.jsonl": ""})
    with pytest.raises(ValueError, match=message):
        data.load("obqa", "train", tmp_path)


def test_malformed_strategyqa_item(tmp_path):
    items = strategyqa_items(3)
    items[2]["answer"] = "yes"
    write(tmp_path, "strategyqa", {"strategyqa_train.json": json.dumps(items)})
    with pytest.raises(ValueError, match=r"strategyqa_train.json: item 2"):
        data.load("strategyqa", "train", tmp_path)


def test_download_from_local_server(tmp_path, monkeypatch):
    """CSQA and the math sets as plain files, OBQA and StrategyQA as zips with their official inner paths."""
    root = tmp_path / "www"
    math_urls = {"gsm8k": "GSM8K_URL", "svamp": "SVAMP_URL", "multiarith": "MULTIARITH_URL"}
    for name in math_urls:
        shutil.copytree(REAL / name / "original", root / name)
    (root / "commensenseqa").mkdir(parents=True)
    (root / "commensenseqa" / "train_rand_split.jsonl").write_text(csqa_line(0) + "\n" + csqa_line(1) + "\n")
    (root / "commensenseqa" / "dev_rand_split.jsonl").write_text(csqa_line(2) + "\n")
    with zipfile.ZipFile(root / "obqa.zip", "w") as z:
        for split in ("train", "dev", "test"):
            z.writestr(f"OpenBookQA-V1-Sep2018/Data/Main/{split}.jsonl", obqa_line(split) + "\n")
        z.writestr("OpenBookQA-V1-Sep2018/Data/Additional/train_complete.jsonl", "decoy")
    with zipfile.ZipFile(root / "sqa.zip", "w") as z:
        z.writestr("strategyqa_train.json", json.dumps(strategyqa_items(10)))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    for name, url in math_urls.items():
        monkeypatch.setattr(data, url, base + name + "/")
    monkeypatch.setattr(data, "CSQA_URL", base + "commensenseqa/")
    monkeypatch.setattr(data, "OBQA_ZIP", base + "obqa.zip")
    monkeypatch.setattr(data, "STRATEGYQA_ZIP", base + "sqa.zip")
    try:
        target = tmp_path / "data"
        assert [q.id for q in data.load("csqa", "test", target)] == ["c2"]
        assert [q.id for q in data.load("obqa", "valid", target)] == ["odev"]
        assert len(data.load("strategyqa", "train", target)) == 8
        assert [len(data.load(name, "test", target)) for name in ("gsm8k", "svamp", "multiarith")] == [8, 9, 9]
        assert (target / "svamp" / "original" / "SVAMP.json").read_bytes() == \
            (REAL / "svamp" / "original" / "SVAMP.json").read_bytes()
        assert (target / "obqa" / "original" / "train.jsonl").read_text() == obqa_line("train") + "\n"
        assert not list(target.rglob("*.tmp"))
    finally:
        server.shutdown()


def test_math_sets_in_their_official_files():
    """Tailored's math tasks on the fixtures cut from the official files: golds as the official preprocessor writes
    them (GSM8K's without the thousands comma, TL11), SVAMP's Body and Question joined, splits drawn with the seed."""
    gsm8k = {s: data.load("gsm8k", s, REAL) for s in data.SPLITS}
    assert [len(v) for v in gsm8k.values()] == [23, 2, 8]  # 25 train lines: a tenth valid; test as published
    assert sorted(q.id for q in gsm8k["train"] + gsm8k["valid"]) == sorted(f"train-{i}" for i in range(1, 26))
    first = gsm8k["test"][0]
    assert (first.id, first.answer, first.kind, first.choices) == ("test-1", "18", "number", [])
    assert first.question.startswith("Janet’s ducks lay 16 eggs per day.")
    assert next(q for q in gsm8k["train"] if q.id == "train-25").answer == "1080"  # "#### 1,080"
    svamp = {s: data.load("svamp", s, REAL) for s in data.SPLITS}
    assert [len(v) for v in svamp.values()] == [19, 2, 9]  # test 3/10 (the paper's 300 of 1,000), valid 1/10 of rest
    chal1 = next(q for v in svamp.values() for q in v if q.id == "chal-1")
    assert chal1.question == ("Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack. "
                              "How much do you have to pay to buy each pack?") and chal1.answer == "51"
    multiarith = {s: data.load("multiarith", s, REAL) for s in data.SPLITS}
    assert [len(v) for v in multiarith.values()] == [19, 2, 9]
    q0 = next(q for v in multiarith.values() for q in v if q.id == "0")
    assert q0.question.startswith("For Halloween Debby") and q0.question.endswith("left?") and q0.answer == "39"
    for name, splits in dict(gsm8k=gsm8k, svamp=svamp, multiarith=multiarith).items():
        ids = [{q.id for q in v} for v in splits.values()]
        assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
        assert splits == {s: data.load(name, s, REAL) for s in data.SPLITS}  # the same on every machine
        assert all(data.NUMBER.fullmatch(q.answer) and q.kind == "number" for v in splits.values() for q in v)


@pytest.mark.parametrize("name, file, text, message", [
    ("gsm8k", "train.jsonl", '{"question": "q", "answer": "no mark"}',
     r"train.jsonl:1: needs a string question and an answer ending \"#### N\""),
    ("gsm8k", "train.jsonl", '{"question": "q", "answer": "#### twelve"}',
     r"train.jsonl:1: the answer after \"####\" is not a number: 'twelve'"),
    ("svamp", "SVAMP.json", '[{"ID": "a", "Body": "b", "Question": "q", "Answer": "3"}]',
     r"SVAMP.json: item 0: the answer must be a number"),
    ("multiarith", "MultiArith.json", '[{"iIndex": 1, "sQuestion": "q", "lSolutions": []}]',
     r"MultiArith.json: item 0: needs an integer iIndex, a string sQuestion and a non-empty lSolutions list"),
])
def test_bad_math_files_name_file_and_line(tmp_path, name, file, text, message):
    write(tmp_path, name, {file: text, **({"test.jsonl": ""} if name == "gsm8k" else {})})
    with pytest.raises(data.DataError, match=message):
        data.load(name, "train", tmp_path)


def test_own_numeric_questions_and_who_takes_them(tmp_path):
    """{"id", "question", "answer": "42"} with no choices is a number question: tailored.py takes it, TinyThinker's
    commands refuse it in one line (its analyze stage explains options); a non-numeric answer is named."""
    lines = [json.dumps({"id": f"n{i}", "question": f"{i} + 1?", "answer": str(i + 1)}) for i in range(9)]
    folder = write_own(tmp_path / "sums", "\n".join(lines + [own_line("c1")]) + "\n")
    questions = data.load(folder, "train") + data.load(folder, "valid") + data.load(folder, "test")
    assert {q.kind for q in questions} == {"number", "choice"}
    n3 = next(q for q in questions if q.id == "n3")
    assert (n3.choices, n3.answer, data.cot_input(n3)) == ([], "4", "Question: 3 + 1?\nReasoning:")
    with pytest.raises(data.DataError, match=r"sums: question 'n\d' has no choices \(a numeric answer\), and "
                                             r"TinyThinker's analyze stage explains each option"):
        data.check_choices(folder)
    data.check_choices(str(OWN / "mini"))
    with pytest.raises(data.DataError, match=r"^--data multiarith: its questions have numeric answers"):
        data.check_choices("multiarith")
    bad = write_own(tmp_path / "bad", GOOD + json.dumps({"id": "x", "question": "?", "answer": "1,000"}) + "\n")
    with pytest.raises(data.DataError, match=r"train.jsonl:3: no field 'choices', and field 'answer' is not a number "
                                             r"such as 42 or -2.5 \(digits, no commas or units\): \"1,000\""):
        data.load(bad, "train")




# ---------------------------------------------------------------- your own data set

OWN = Path(__file__).resolve().parent / "fixtures" / "own"


def own_line(qid, labels="ABC", answer="A", **fields):
    choices = [{"label": letter, "text": f"text {letter}"} for letter in labels]
    return json.dumps({"id": qid, "question": f"question {qid}?", "choices": choices, "answer": answer, **fields})


def test_own_directory_with_its_three_files():
    mini = str(OWN / "mini")
    splits = {s: data.load(mini, s) for s in data.SPLITS}
    assert [len(v) for v in splits.values()] == [24, 3, 3]
    assert [[q.id for q in splits[s]] for s in ("valid", "test")] == [["v1", "v2", "v3"], ["t1", "t2", "t3"]]
    first, second = splits["train"][:2]
    assert first == Question("m01", "What does a kettle do to water?", ["freezes it", "boils it", "colours it"], "B")
    assert len(second.choices) == 5 and second.answer == "C"
    assert {len(q.choices) for q in splits["train"]} == {2, 3, 4, 5}


def test_own_single_file_is_split_with_the_seed():
    path = str(OWN / "single.jsonl")
    splits = {s: [q.id for q in data.load(path, s)] for s in data.SPLITS}
    assert [len(v) for v in splits.values()] == [16, 2, 2]  # 80 / 10 / 10
    every = [json.loads(line)["id"] for line in (OWN / "single.jsonl").read_text().splitlines()]
    assert sorted(splits["train"] + splits["valid"] + splits["test"]) == every  # disjoint, and covers the file
    assert splits["train"] == [i for i in every if i in splits["train"]]  # file order
    assert (splits["valid"], splits["test"]) == (["s01", "s04"], ["s08", "s09"])  # the same on every machine
    assert splits == {s: [q.id for q in data.load(path, s)] for s in data.SPLITS}


def test_own_directory_draws_only_the_missing_split(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n".join(own_line(f"a{i}") for i in range(20)) + "\n")
    (tmp_path / "test.jsonl").write_text(own_line("t0", "ABCDE", "E") + "\n")
    train, valid, test = (data.load(str(tmp_path), s) for s in data.SPLITS)
    assert (len(train), len(valid), [q.id for q in test]) == (18, 2, ["t0"])
    assert sorted(q.id for q in train + valid) == sorted(f"a{i}" for i in range(20))


def write_own(folder: Path, train: str, test: str | None = None) -> str:
    folder.mkdir(exist_ok=True)
    (folder / "train.jsonl").write_text(train)
    if test is not None:
        (folder / "test.jsonl").write_text(test)
    return str(folder)


GOOD = own_line("a1") + "\n" + own_line("a2", "ABCDE", "D") + "\n"


@pytest.mark.parametrize("train, test, message", [
    (GOOD + json.dumps({"id": "x", "question": "?", "answer": "A"}), None, r"train.jsonl:3: no field 'choices'"),
    (GOOD + own_line("x").replace('"choices": [', '"choices": {"A": 1}, "no": ['), None,
     r"train.jsonl:3: field 'choices' must be a non-empty list, not {\"A\": 1}"),
    (GOOD + own_line("x").replace('"answer": "A"', '"oops": 1'), None, r"train.jsonl:3: no field 'answer'"),
    (GOOD + own_line(7), None, r"train.jsonl:3: field 'id' must be a non-empty str, not 7"),
    (GOOD + own_line("x", question=""), None, r"train.jsonl:3: field 'question' must be a non-empty str"),
    (GOOD + own_line("x").replace('"text": "text B"', '"text": 2'), None,
     r"train.jsonl:3: field 'choices' item 1 must be"),
    (GOOD + own_line("x", "ABD"), None, r"train.jsonl:3: choice labels 'ABD' are not A.. without gaps"),
    (GOOD + own_line("x", "ABCDEF"), None, r"train.jsonl:3: 6 options; a question has at most 5"),
    (GOOD + own_line("x", "A"), None, r"train.jsonl:3: 1 option\(s\)"),
    (GOOD + own_line("x", "ABC", "D"), None, r"train.jsonl:3: answer 'D' is not one of the labels ABC"),
    (GOOD + "[1, 2]", None, r"train.jsonl:3: not a JSON object"),
    (GOOD + "{oops", None, r"train.jsonl:3: not valid JSON"),
    (GOOD + own_line("a1"), None, r"train.jsonl:3: field 'id' 'a1' is used already at \S*train.jsonl:1$"),
    (GOOD, own_line("t1") + "\n" + own_line("a2"),
     r"test.jsonl:2: field 'id' 'a2' is used already at \S*train.jsonl:2$"),
    ("\n", None, r"train.jsonl: no questions$"),
    (GOOD, "", r"test.jsonl: no questions$"),
    (GOOD, None, r"train.jsonl: 2 question\(s\) are too few to draw valid and test from; it needs at least 3$"),
], ids=["no-choices", "choices-dict", "no-answer", "id-int", "question-empty", "text-int", "label-gap", "six-options",
        "one-option", "answer-not-label", "not-object", "not-json", "duplicate-id", "id-in-two-splits", "empty",
        "empty-test", "too-few"])
def test_own_data_errors_name_file_line_and_field(tmp_path, train, test, message):
    folder = write_own(tmp_path / "mine", train, test)
    with pytest.raises(data.DataError, match=message) as error:
        data.load(folder, "train")
    assert "\n" not in str(error.value)


def test_own_names(tmp_path, monkeypatch):
    mini, single = str(OWN / "mini"), str(OWN / "single.jsonl")
    assert data.is_own(mini) and data.is_own(mini + "/") and data.is_own(single)
    assert not any(data.is_own(n) for n in ("csqa", "world", str(tmp_path / "none.jsonl"), str(OWN / "README.md")))
    assert [data.dataset_name(n) for n in (mini, mini + "/", single, "csqa", "world")] == [
        "mini", "mini", "single", "csqa", "world"]
    monkeypatch.chdir(OWN / "mini")
    assert data.dataset_name(".") == "mini"
    for name in ("world", "csqa", "obqa", "strategyqa", mini, single):
        data.check_name(name)
    for name in ("x", str(OWN / "README.md"), str(tmp_path / "none.jsonl")):
        with pytest.raises(data.DataError, match=rf"^--data must be one of world, csqa, obqa, strategyqa or a "
                                                 rf"directory or .jsonl file of your own questions, not '{name}'$"):
            data.check_name(name)
    (tmp_path / "csqa").mkdir()
    with pytest.raises(data.DataError, match=r"csqa: your own data set cannot be called 'csqa'"):
        data.dataset_name(str(tmp_path / "csqa"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match=r"empty: no train.jsonl; your own data set holds train.jsonl"):
        data.load(str(tmp_path / "empty"), "train")


def test_jsonl_rows_round_trip_atomically(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [{"id": "é", "n": [1, 2]}, {"ok": True}]
    data.write_jsonl(path, rows)
    assert data.read_jsonl(path) == rows and "é".encode() in path.read_bytes()  # UTF-8, not \u00e9
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]  # no .tmp left behind
    path.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(data.DataError, match=r"rows.jsonl:2: not a JSON object"):
        data.read_jsonl(path)


# ---------------------------------------------------------------- stage formats (METHOD 4)

Q = Question("q1", "Where do fish live?", ["desert", "water", "sky"], "B")
KI = "Fish need water."
ANALYSES = {"B": "fish breathe in water.", "A": "deserts are dry.", "C": "fish cannot fly."}  # teacher's order


def test_stage_inputs_literal():
    qo = "Where do fish live?\n(A) desert (B) water (C) sky"
    assert data.recall_input(Q) == qo + "\nRecall:"
    assert data.analyze_input(Q, KI, "C") == qo + "\nRecall: Fish need water.\nAnalyze: For option C,"
    assert data.summarize_input(Q, KI, ANALYSES) == (
        qo + "\nRecall: Fish need water.\nAnalyze: For option A, deserts are dry. For option B, fish breathe in "
             "water. For option C, fish cannot fly.\nSummarize:")  # alphabetical, not the teacher's order (A1)
    assert data.summarize_input(Q, None, None) == qo + "\nSummarize:"
    assert data.summarize_input(Q, KI, None) == qo + "\nRecall: Fish need water.\nSummarize:"
    assert data.analyze_input(Q, None, "A") == qo + "\nAnalyze: For option A,"
    assert data.summarize_input(Q, None, ANALYSES).startswith(qo + "\nAnalyze: For option A, deserts")
    assert data.summary_target("B") == "So the answer is option B."


def record(ki=KI, analyses=ANALYSES):
    return {"id": Q.id, "question": Q.question, "choices": Q.choices, "answer": Q.answer,
            "key_information": ki, "explanations": analyses}


def test_stage_examples_dedup_and_variants():
    records = [record(), record(), record(ki="Fish swim.")]  # the first two are identical completions
    full = data.stage_examples(records, "recall_analyze_summarize")
    assert full["recall"] == [(data.recall_input(Q), KI), (data.recall_input(Q), "Fish swim.")]
    assert len(full["analyze"]) == 6 and len(full["summarize"]) == 2
    assert full["analyze"][0] == (data.analyze_input(Q, KI, "A"), "deserts are dry.")
    assert full["summarize"][1] == (data.summarize_input(Q, "Fish swim.", ANALYSES), "So the answer is option B.")
    only = data.stage_examples(records, "summarize")
    assert only == {"summarize": [("Where do fish live?\n(A) desert (B) water (C) sky\nSummarize:",
                                   "So the answer is option B.")]}  # one per question
    rs = data.stage_examples(records, "recall_summarize")
    assert set(rs) == {"recall", "summarize"} and rs["summarize"][0][0].endswith("Fish need water.\nSummarize:")
    an = data.stage_examples(records, "analyze_summarize")
    assert set(an) == {"analyze", "summarize"} and len(an["analyze"]) == 3 and len(an["summarize"]) == 1
    with pytest.raises(ValueError, match="stage variant"):
        data.stage_examples(records, "recall")


@pytest.mark.parametrize("text, letter", [
    ("So the answer is option B.", "B"),
    ("so the answer is option E. extra", "E"),
    ("the answer is option D. So the answer is option A.", "D"),  # the first match wins
    ("So the answer is option b.", None),
    ("So the answer is option C", None),  # the period is part of the pattern
    ("So the answer is option (C).", None),
    ("So The Answer Is Option C.", None),
    ("", None),
])
def test_parse_answer(text, letter):
    assert data.parse_answer(text) == letter


@pytest.mark.parametrize("text, expected", [
    ("fish swim", "fish swim."), ("fish swim.", "fish swim."), (' he said "go"', 'he said "go"'),
    ("the 'x'", "the 'x'"), ("ends with ? ", "ends with ?."), ("", "."),
])
def test_with_period(text, expected):
    assert data.with_period(text) == expected


# ---------------------------------------------------------------- batching (METHOD 5.1)

def test_collate_pads_to_longest():
    input_ids, mask, labels = data.collate([([5, 6, 1], [7, 1]), ([5, 1], [8, 9, 10, 1])])
    assert input_ids.tolist() == [[5, 6, 1], [5, 1, 0]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [[7, 1, -100, -100], [8, 9, 10, 1]]


def test_batch_order_is_a_resumable_permutation():
    epoch0 = data.batch_order(230, 8, seed=3, epoch=0)
    assert sorted(i for b in epoch0 for i in b) == list(range(230))
    assert len(epoch0) == 29 and sum(len(b) < 8 for b in epoch0) == 1
    assert epoch0 == data.batch_order(230, 8, seed=3, epoch=0)
    assert epoch0 != data.batch_order(230, 8, seed=3, epoch=1)


