"""Write prompts.json, TinyThinker's teacher instruction and few-shot exemplars per data set (METHOD 3.1), from the
official repository's datasets/ folder, so that a fresh clone needs no copy of the data. Run from the repo root:

    python tests/make_prompts.py TinyThinker/datasets
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import teacher  # noqa: E402
from files import atomic_write  # noqa: E402


def make_prompts(datasets_dir, path=teacher.PROMPTS):
    """prompts.json from datasets_dir/request.json and datasets_dir/{name}/prompt/{name}_cot.json."""
    root = Path(datasets_dir)
    prompts = {"instruction": json.loads((root / "request.json").read_text())["Key"], "exemplars": {}}
    for name in teacher.N:
        exemplars = json.loads((root / name / "prompt" / f"{name}_cot.json").read_text())
        keep = ("Q", "Options", "Key Information", "Explanations")  # "Reference" is not part of the prompt
        prompts["exemplars"][name] = [{k: e[k] for k in keep} for e in exemplars]
    atomic_write(path, (json.dumps(prompts, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


if __name__ == "__main__":
    make_prompts(sys.argv[1])
