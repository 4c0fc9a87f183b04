"""Every "METHOD x.y" the code cites resolves to a heading of the repository's METHOD.md (a reader of a clone can
follow it), every decision the runs record is explained there and each run records those METHOD says it does, every
flag of every command has a --help line, and no document names a folder of the machine it was written on."""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import tailored
import tinythinker

ROOT = Path(__file__).resolve().parent.parent
# "METHOD 7.4", "METHOD section 3", "METHOD sections 2, 4, 5.1, 6", "METHOD 7.1-7.3", "METHOD 5.3 and 7"
CITATION = re.compile(r"METHOD (?:sections? )?(\d+(?:\.\d+)?(?:(?:, | and |-)\d+(?:\.\d+)?)*)")


def headings():
    text = (ROOT / "METHOD.md").read_text()
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, re.M)), text


def sources():
    """The code a reader opens; this file is left out, since its examples above are not citations."""
    return [p for p in sorted(ROOT.glob("*.py")) + sorted((ROOT / "tests").glob("*.py")) if p.name != "test_method.py"]


def cited():
    for path in sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in CITATION.finditer(line):
                for section in re.split(r", | and |-", match.group(1)):
                    yield f"{path.name}:{number}", section


def test_every_method_citation_resolves_to_a_heading():
    sections, _ = headings()
    citations = list(cited())
    assert len(citations) > 30  # the pattern still finds the code's citations
    missing = [(where, s) for where, s in citations if s not in sections]
    assert not missing, f"citations with no heading in METHOD.md: {missing}"


def test_no_citation_of_documents_outside_the_repository():
    for path in sources():
        text = path.read_text()
        for name in ("T5-NOTES", "TAILORED", "../shared"):
            assert name not in text, f"{path.name} cites {name}, absent from a clone"


def test_every_recorded_decision_is_explained():
    _, text = headings()
    for decision in [*tinythinker.DECISIONS, *tailored.DECISIONS]:
        name = decision.split()[0]
        assert f"**{name} " in text, f"{name} is recorded in runs but not explained in METHOD.md section 9"


def test_each_run_records_the_decisions_method_says_it_does():
    """METHOD 9 marks each decision with the runs that record it ([every run], [real data], [reflect], [world]);
    tinythinker.decisions(phase, data) is what a run writes into its config.json (tests/test_world.py and
    tests/test_real_run.py read it there). Every Tailored run records all of TL1.. (METHOD 10.8)."""
    _, text = headings()
    section = text.split("## 9. Decisions", 1)[1].split("\n## 10.", 1)[0]
    marked = dict(re.findall(r"^- \*\*(A\d+) .*?\*\* \[([a-z ]+)\]", section, re.M))
    assert sorted(marked, key=lambda a: int(a[1:])) == [f"A{i}" for i in range(1, len(marked) + 1)]
    assert marked == {name.split()[0]: scope for name, (scope, _) in tinythinker.DECISIONS.items()}
    scope = {s: {a for a, marking in marked.items() if marking == s} for s in set(marked.values())}
    assert set(scope) == {"every run", "real data", "reflect", "world"}
    recorded = lambda phase, data: {name.split()[0] for name in tinythinker.decisions(phase, data)}  # noqa: E731
    assert recorded("acquire", "world") == scope["every run"] | scope["world"]
    assert recorded("reflect", "world") == scope["every run"] | scope["world"] | scope["reflect"]
    for data in ("csqa", "obqa", "strategyqa", "/path/to/mydata"):
        assert recorded("acquire", data) == scope["every run"] | scope["real data"]
        assert recorded("reflect", data) == scope["every run"] | scope["real data"] | scope["reflect"]
    tailored_section = text.split("### 10.8 ", 1)[1]
    listed = re.findall(r"^- \*\*(TL\d+) ", tailored_section, re.M)
    assert listed == [name.split()[0] for name in tailored.DECISIONS] == [f"TL{i}" for i in range(1, len(listed) + 1)]


COMMANDS = ["tinythinker.py", "tailored.py", "teacher.py", "evaluate.py", "ablation.py", "compare.py", "bench.py"]
# Each command run as `python NAME --help` runs it (as __main__, from the repository), all in one interpreter so that
# torch and transformers are imported once; prints {name: its --help page} as JSON.
HELP_PAGES = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, "")
pages = {}
for name in sys.argv[1:]:
    sys.argv, page = [name, "--help"], io.StringIO()
    with contextlib.redirect_stdout(page):
        try:
            runpy.run_path(name, run_name="__main__")
        except SystemExit as e:
            assert e.code in (0, None), (name, e.code)
    pages[name] = page.getvalue()
print(json.dumps(pages))
"""


def help_entries(page):
    """{an argument as --help shows it ("--lr LR", "runs"): its help text} of an argparse --help page, read from its
    argument sections ("positional arguments:", "options:"), the help on the same line or the lines below."""
    entries, current, in_arguments = {}, None, False
    for line in page.splitlines():
        if re.fullmatch(r"[a-z][\w ]*:", line):  # a section heading
            in_arguments, current = True, None
        elif in_arguments and re.match(r" {2}\S", line):
            current, *text = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            entries[current] = " ".join(text)
        elif in_arguments and current and re.match(r" {3,}\S", line):
            entries[current] = (entries[current] + " " + line.strip()).strip()
        else:
            current = None
    return entries


def test_every_flag_of_every_command_has_a_help_line():
    """Each command's --help, as a user runs it: every option and positional argument says what it does (more than
    argparse's bare "default ..."), and tinythinker.py's says which defaults reflect and the world replace."""
    out = subprocess.run([sys.executable, "-c", HELP_PAGES, *COMMANDS], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "COLUMNS": "120"})
    assert out.returncode == 0, out.stderr[-3000:]
    pages = json.loads(out.stdout)
    for name, page in pages.items():
        entries = help_entries(page)
        assert len(entries) > 3, f"{name}: the --help page was not read ({page[:500]})"
        bare = [flag for flag, text in entries.items() if not text or re.fullmatch(r"\(?default[^)]*\)?", text)]
        assert not bare, f"{name} --help: no help line for {bare}"
    entries = help_entries(pages["tinythinker.py"])
    assert "acquire 0.0005, world 0.003; reflect 5e-06, world 5e-05" in entries["--lr LR"]
    assert "acquire 64; reflect 32" in entries["--batch-size BATCH_SIZE"]
    assert "world scratch; reflect the acquire run's" in entries["--model MODEL"]
    assert "reflect only; default 10, world 4" in entries["--samples SAMPLES"]
    assert "acquire only; default 100, world 1" in entries["--interval INTERVAL"]


# A folder of a machine: /work/, /tmp/, /home/, /root/, /Users/, /mnt/ or /scratch/ where a path starts (not inside a
# URL or another path), so that "https://host/home/x", "runs/world" and the placeholder DIR pass.
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|tmp|home|root|Users|mnt|scratch)/\S*")
# Quoted on purpose: a hostile sharded-index entry that tests/README.md's faults table shows refused.
EXAMPLES = {"/tmp/x.safetensors"}


def test_no_document_names_a_folder_of_a_machine():
    """What a reader of a clone reads (the documents, bench.json's recorded commands, the modules' docstrings and
    --help) names no folder of the machine it was written on: a command is written as a user types it from a clone,
    with a placeholder such as DIR for a folder of their own."""
    files = ["README.md", "BENCHMARKS.md", "METHOD.md", "tests/README.md", "bench.json", *sorted(
        p.name for p in ROOT.glob("*.py"))]
    found = [f"{name}:{number}: {match.group(0).rstrip('`.,;:)')}" for name in files
             for number, line in enumerate((ROOT / name).read_text().splitlines(), 1)
             for match in MACHINE_PATH.finditer(line) if match.group(0).rstrip("`.,;:)|") not in EXAMPLES]
    assert not found, "folders of a machine:\n" + "\n".join(found)


def readme_imports():
    """{module: the modules it imports}, in the order of README "Files"'s import list ("    cli.py  data, files")."""
    files = (ROOT / "README.md").read_text().split("## Files", 1)[1].split("\n## ", 1)[0]
    return {name: set() if imported == "-" else set(imported.split(", "))
            for name, imported in re.findall(r"^    (\w+)\.py +(.+)$", files, re.M)}


def test_imports_point_one_way():
    """README's import list is the code's: every module at the root is listed, imports exactly the project modules
    listed beside it, all of them listed above it (so there is no circle), and none inside a function. train.py
    sits below both methods, evaluate.py and teacher.py import cli.py's plumbing and not the loop, and tailored.py
    imports neither teacher.py nor tinythinker.py."""
    listed = readme_imports()
    order = list(listed)
    assert sorted(order) == sorted(p.stem for p in ROOT.glob("*.py"))
    for name in order:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        modules = {a.name for n in imports if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module for n in imports if isinstance(n, ast.ImportFrom)}
        assert modules & set(order) == listed[name], f"{name}.py imports {sorted(modules & set(order))}"
        assert listed[name] <= set(order[:order.index(name)]), f"{name}.py imports a module listed after it"
        nested = [n.lineno for n in imports if n not in tree.body]
        assert not nested, f"{name}.py imports inside a function or block, lines {nested}"
    assert "train" not in listed["evaluate"] | listed["teacher"]
    assert not {"teacher", "tinythinker"} & listed["tailored"]
