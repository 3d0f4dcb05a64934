"""The committed notebooks: exactly the six, outputs stripped, thin (no cell redefines package code), and shaped
for learners (opens with what you will learn, ends with exercises). Executing them is nbmake's job."""
import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
EXPECTED = ["01_tokenizer_mismatch.ipynb", "02_embedding_alignment.ipynb", "03_stage1_losses.ipynb",
            "04_stage2.ipynb", "05_scaled_down_run.ipynb", "06_evaluation_and_ablations.ipynb"]


def load(name: str) -> dict:
    return json.loads((NOTEBOOKS / name).read_text())


def code_of(cell: dict) -> str:
    src = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
    return "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))


def text_of(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def defined_names(tree: ast.AST) -> set[str]:
    """Every function and class name defined anywhere in a tree, plus names bound to a lambda."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Lambda):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def package_names() -> set[str]:
    names = set()
    for path in (ROOT / "minigenrecal").rglob("*.py"):
        names |= {n for n in defined_names(ast.parse(path.read_text())) if not n.startswith("__")}
    return names


def test_exactly_the_six_notebooks():
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == EXPECTED


@pytest.mark.parametrize("name", EXPECTED)
def test_outputs_are_stripped(name):
    for i, cell in enumerate(load(name)["cells"]):
        if cell["cell_type"] == "code":
            assert cell.get("outputs") == [], f"{name} cell {i} has outputs; strip them before committing"
            assert cell.get("execution_count") is None, f"{name} cell {i} has an execution count"


@pytest.mark.parametrize("name", EXPECTED)
def test_no_cell_redefines_package_code(name):
    pkg = package_names()
    assert {"Recalibrator", "recal_path", "train_stage", "answer_rows"} <= pkg  # the scan itself works
    for i, cell in enumerate(load(name)["cells"]):
        if cell["cell_type"] != "code":
            continue
        clash = defined_names(ast.parse(code_of(cell))) & pkg
        assert not clash, f"{name} cell {i} redefines {sorted(clash)} from minigenrecal; import it instead"


def test_the_scan_catches_a_redefinition():
    cell = {"cell_type": "code", "source": "import torch\nclass Recalibrator(torch.nn.Module):\n    pass\n"}
    assert "Recalibrator" in defined_names(ast.parse(code_of(cell))) & package_names()
    cell = {"cell_type": "code", "source": "answer_rows = lambda x: x\n"}
    assert "answer_rows" in defined_names(ast.parse(code_of(cell))) & package_names()


@pytest.mark.parametrize("name", EXPECTED)
def test_learner_shape(name):
    cells = load(name)["cells"]
    assert cells[0]["cell_type"] == "markdown" and "what you will learn" in text_of(cells[0]).lower()
    ex = max(i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and "## Exercises" in text_of(c))
    # after the exercises come only the coding exercises: markdown, and code cells that carry nbgrader metadata
    assert all(c["cell_type"] == "markdown" or "nbgrader" in c["metadata"] for c in cells[ex + 1:]), name
    exercises = text_of(cells[ex]).split("## Exercises", 1)[1]
    n = sum(1 for line in exercises.splitlines() if line[:3] in ("1. ", "2. ", "3. ", "4. "))
    assert 2 <= n <= 3, f"{name}: {n} exercises"
    assert "import minigenrecal" in "".join(code_of(c) for c in cells if c["cell_type"] == "code").replace(
        "from minigenrecal", "import minigenrecal")
    assert all(c["metadata"].get("kernelspec") is None for c in cells)
    assert load(name)["metadata"]["kernelspec"]["name"] == "python3"


def test_only_the_logit_mismatch_cell_may_raise():
    tagged = {(name, i) for name in EXPECTED for i, c in enumerate(load(name)["cells"])
              if "raises-exception" in c.get("metadata", {}).get("tags", [])}
    assert len(tagged) == 1
    name, i = tagged.pop()
    assert name == EXPECTED[0] and "kl_div" in code_of(load(name)["cells"][i])


@pytest.mark.parametrize("name", EXPECTED)
def test_hub_ids_only_in_comments_or_guarded_branches(name):
    """No cell loads a hub checkpoint unless it sits behind the `preset.teacher == "tiny"` guard."""
    for i, cell in enumerate(load(name)["cells"]):
        src = code_of(cell) if cell["cell_type"] == "code" else ""
        if "from_pretrained(" in src and "TemporaryDirectory" not in src:
            assert "gguf_file" in src, f"{name} cell {i} loads from_pretrained outside a temp dir"
        if "load_pair(" in src:
            assert 'preset.teacher == "tiny"' in src and "HF_HUB_OFFLINE" in src, f"{name} cell {i}: unguarded"
