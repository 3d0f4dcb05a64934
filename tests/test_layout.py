"""The package's shape: the method at the top, rooms around it, imports only going down, no cycle.

Levels (an import may name its own level or a lower one; `minigenrecal/__init__.py`, the public list, may name all):
    0 the method: recalibrator, losses, chunked, stages, loop (top-level modules)
    1 data   2 models   3 evaluation   4 scale   5 study   6 teach   7 cli
Every import is read from the source (AST), inside functions too."""
import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "minigenrecal"
ROOMS = ("data", "models", "evaluation", "scale", "study", "teach", "cli")
METHOD = ("recalibrator", "losses", "chunked", "stages", "loop")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def level(mod: str) -> int:
    parts = mod.split(".")
    if len(parts) == 1 or parts[1] == "__main__":
        return -1  # the package itself: its __init__ (the public list) and __main__ (the command line's entry)
    return 0 if parts[1] in METHOD else 1 + ROOMS.index(parts[1])


def imports(path: Path) -> set[str]:
    """Every minigenrecal module `path` imports (absolute or relative, at any depth in the file)."""
    mod, out = module_name(path), set()
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("minigenrecal")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            if not base.startswith("minigenrecal"):
                continue
            for a in node.names:  # `from pkg import submodule` names the submodule
                sub = f"{base}.{a.name}"
                out.add(sub if (PKG.parent / (sub.replace(".", "/") + ".py")).exists()
                        or (PKG.parent / sub.replace(".", "/")).is_dir() else base)
    return {m for m in out if m != mod}


_GRAPH = {}


def graph() -> dict[str, set[str]]:
    if not _GRAPH:
        _GRAPH.update({module_name(p): imports(p) for p in PKG.rglob("*.py")})
    return _GRAPH


def test_top_level_holds_only_the_method_and_rooms():
    files = {p.stem for p in PKG.glob("*.py")} - {"__init__", "__main__"}
    dirs = {p.name for p in PKG.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert files == set(METHOD), files
    assert dirs == set(ROOMS), dirs
    for room in ROOMS:  # each room says what it holds and why
        doc = ast.get_docstring(ast.parse((PKG / room / "__init__.py").read_text()))
        assert doc and len(doc) > 80, room


def test_imports_only_go_down():
    bad = [f"{m} imports {t} (level {level(m)} -> {level(t)})" for m, ts in graph().items() for t in ts
           if level(m) >= 0 and level(t) > level(m)]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    g = {m: {t for t in ts if t in graph()} for m, ts in graph().items() if level(m) >= 0}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if level(t) < 0:
                continue
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2
    for m in sorted(g):
        if m not in state:
            visit(m)


def test_the_checker_finds_a_cycle_and_an_upward_import(tmp_path):
    """The two rules above can fail: a hand-made upward import is found by `imports` and `level`."""
    f = tmp_path / "minigenrecal" / "stages.py"
    f.parent.mkdir()
    f.write_text("def f():\n    from minigenrecal.scale.checkpoint import Checkpointer\n    from .loop import x\n")
    global ROOT
    saved, ROOT = ROOT, tmp_path
    try:
        found = imports(f)
    finally:
        ROOT = saved
    assert "minigenrecal.scale.checkpoint" in found and level("minigenrecal.scale.checkpoint") > level("minigenrecal.stages")


def method_lines() -> dict[str, int]:
    """Lines of the method's top-level files and of every module their imports reach."""
    g, seen, todo = graph(), set(), [f"minigenrecal.{m}" for m in METHOD]
    while todo:
        m = todo.pop()
        if m in seen or level(m) < 0:
            continue
        seen.add(m)
        todo += list(g.get(m, ()))
    count = lambda m: len((PKG.parent / (m.replace(".", "/") + ".py")).read_text().splitlines())  # noqa: E731
    return {m: count(m) for m in sorted(seen)}


def code_lines(source: str) -> int:
    """Lines that hold code: not blank, not a comment, not part of a module's, class's or function's docstring."""
    tree, doc = ast.parse(source), set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and n.body \
                and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant) \
                and isinstance(n.body[0].value.value, str):
            doc.update(range(n.body[0].lineno, n.body[0].end_lineno + 1))
    return sum(1 for i, line in enumerate(source.splitlines(), 1)
               if line.strip() and not line.strip().startswith("#") and i not in doc)


def test_code_lines_counts_by_hand():
    src = '"""Doc\non two lines."""\n\n# a comment\ndef f(x):\n    """Its doc."""\n    return x  # trailing\n'
    assert code_lines(src) == 2  # `def f(x):` and `return x`


def test_the_method_is_a_few_hundred_lines_and_the_readme_says_how_many():
    lines = method_lines()
    assert set(lines) == {f"minigenrecal.{m}" for m in METHOD}, lines  # its import closure is itself
    total = sum(lines.values())
    code = sum(code_lines((PKG.parent / (m.replace(".", "/") + ".py")).read_text()) for m in lines)
    assert code < 650 and total < 950, (code, lines)  # a few hundred lines of code; the rest is its documentation
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"The method is (\d+) lines in (\d+) files, (\d+) of them code", readme)
    assert m and tuple(map(int, m.groups())) == (total, len(lines), code), (m and m.groups(), total, len(lines), code)


def test_train_stage_reads_as_a_loop_of_about_sixty_lines():
    tree = ast.parse((PKG / "loop.py").read_text())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train_stage")
    body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) else fn.body  # without its docstring
    n = body[-1].end_lineno - body[0].lineno + 1
    assert n <= 60, n


def test_nothing_cites_a_file_the_repository_lacks():
    """The method's account is docs/method.md; notebooks, code, tests and docs cite it, never METHOD.md."""
    found = [str(p.relative_to(ROOT)) for ext in ("py", "ipynb", "md") for p in ROOT.glob(f"**/*.{ext}")
             if ".venv" not in p.parts and p.name != "test_layout.py" and "METHOD.md" in p.read_text()]
    assert not found, found


# Imports stand at the top of a module; inside a function only for a heavy or optional dependency, with the reason.
LOCAL_OK = ("deepspeed", "matplotlib", "datasets", "nbclient", "torch.distributed.fsdp", "torch.distributed.checkpoint",
            "accelerate", "trl")  # trl: GOLD's trainer takes about 3 s to import, paid only by the GOLD rows


def local_imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, module, has a comment) for every import inside a function of `path`."""
    src = path.read_text()
    lines = src.splitlines()
    out = []
    for fn in ast.walk(ast.parse(src)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    mod = node.names[0].name if isinstance(node, ast.Import) else "." * node.level + (node.module or "")
                    said = "#" in lines[node.end_lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                    out.append((node.lineno, mod, said))
    return out


def test_function_level_imports_are_only_heavy_optional_ones_each_with_its_reason():
    bad = [f"{p.relative_to(ROOT)}:{line}: {mod}" + ("" if said else " (no comment)")
           for p in sorted(PKG.rglob("*.py")) for line, mod, said in local_imports(p)
           if not said or not any(mod == k or mod.startswith(k + ".") for k in LOCAL_OK)]
    assert not bad, bad


def test_the_local_import_check_sees_one(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def f():\n    import json\n    import deepspeed  # heavy\n")
    assert local_imports(f) == [(2, "json", False), (3, "deepspeed", True)]
