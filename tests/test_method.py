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


# The modules in reading order: each imports only modules of the layers before its own (README "Imports").
LAYERS = [["t5"], ["data"], ["world", "dpo", "triplet"], ["train"], ["teacher", "evaluate"],
          ["tinythinker", "tailored"]]


def test_imports_point_one_way():
    """train.py sits below both methods and tailored.py never imports tinythinker.py: a reader can read the modules
    in LAYERS order, each using only the files before it."""
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    for name in layer:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        upward = sorted(m for m in imported if m in layer and layer[m] >= layer[name])
        assert not upward, f"{name}.py imports {upward}, which are not below it"
