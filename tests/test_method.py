"""Every "METHOD x.y" the code cites resolves to a heading of the repository's METHOD.md (a reader of a clone can
follow it), and every decision the runs record is explained there."""
import ast
import re
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
