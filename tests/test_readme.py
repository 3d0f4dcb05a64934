"""What the README claims about the code is measured, not typed: the core's line count and the module table."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
def test_every_module_in_the_readme_table_exists():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| module | what it holds |", 1)[1].split("\n\n", 1)[0]
    rooms = re.findall(r"^\| `(\w+)/` \| (.*) \|$", table, re.M)
    for name in re.findall(r"^\| `(\w+\.py)` \|", table, re.M):  # the method's files, at the top
        assert (ROOT / "minigenrecal" / name).exists(), name
    for room, text in rooms:
        for name in re.findall(r"`(\w+\.py)`", text):
            assert (ROOT / "minigenrecal" / room / name).exists(), (room, name)
    listed = {r for r, _ in rooms}
    assert listed == {p.name for p in (ROOT / "minigenrecal").iterdir() if p.is_dir() and p.name != "__pycache__"}


def test_readme_results_match_the_committed_reproduction():
    """Every 'method | mean ± std' row quoted in the README equals the mean over seeds in results/tiny.json."""
    import json
    import statistics
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results at toy scale", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\d+\.\d) ± (\d+\.\d) \|", section, re.M)
    assert len(rows) >= 6, "the README should quote the headline rows"
    data = json.loads((ROOT / "results" / "tiny.json").read_text())
    n = data["budgets"]["n_train"]
    for method, mean, std in rows:
        xs = [100 * r["accuracy"] for r in data["rows"] if r["method"] == method
              and (r["train_size"] in (n, None))]
        assert xs, method
        assert abs(statistics.fmean(xs) - float(mean)) < 0.051, (method, statistics.fmean(xs), mean)
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        assert abs(sd - float(std)) < 0.051, (method, sd, std)


def _table_after(readme: str, marker: str) -> list[list[str]]:
    """The cells of the first markdown table after `marker`, header and separator rows dropped."""
    lines = readme.split(marker, 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows[2:]


def test_readme_demo_table_equals_the_committed_demo_summary():
    """'What `make demo` prints' equals results/demo_summary.json, written by `python -m minigenrecal demo` with
    the teacher that ships."""
    import hashlib
    import json
    readme = (ROOT / "README.md").read_text()
    summary = json.loads((ROOT / "results" / "demo_summary.json").read_text())
    assert summary["preset"] == "tiny" and summary["data_seed"] == 0
    shipped = ROOT / "data_samples" / "tiny_teacher" / "model.safetensors"
    assert summary["teacher_file_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest(), \
        "the shipped teacher changed since the demo summary was made: rerun `python -m minigenrecal demo`"
    intro = readme.split("What `make demo` prints", 1)[1].split("\n", 1)[0]
    assert f"on {summary['threads']} CPU threads" in intro and f"{summary['n_test']} fresh test samples" in intro
    keys = {"teacher": "teacher", "student before": "student_before", **{
        f"student after stage {k}": f"student_after_stage{k}" for k in (1, 2, 3)}}
    rows = _table_after(readme, "What `make demo` prints")
    seen = set()
    for label, value in rows:
        key = next(v for k, v in keys.items() if label.startswith(k))
        assert value == f"{summary[key]:.3f}", (label, value, summary[key])
        seen.add(key)
    assert seen == set(keys.values())


def test_readme_tiny_pair_table_matches_the_models():
    """Every figure of the tiny-pair table, measured on the shipped teacher and a fresh student."""
    import json
    from minigenrecal.data.synthetic import make_split
    from minigenrecal.models.tiny import TEACHER_DIR, build_student, load_teacher
    from minigenrecal.models.vlm import VLMView
    readme = (ROOT / "README.md").read_text()
    table = {r[0]: r[1:] for r in _table_after(readme, "The tiny pair differs in every way")}
    teacher = VLMView(*load_teacher(), name="teacher")
    student = VLMView(*build_student(0), name="student")
    sample = make_split(0, "train", 1)[0]
    num = lambda cell, pattern: float(re.search(pattern, cell).group(1))
    for view, cell in zip((teacher, student), table["class"]):
        assert cell == f"`{type(view.model).__name__}`"
    # tokenizers
    t_tok, s_tok = table["tokenizer"]
    assert t_tok.startswith("byte-level BPE") and s_tok.startswith("Unigram")
    assert type(teacher.tokenizer.backend_tokenizer.model).__name__ == "BPE"
    assert type(teacher.tokenizer.backend_tokenizer.pre_tokenizer).__name__ == "ByteLevel"
    assert type(student.tokenizer.backend_tokenizer.model).__name__ == "Unigram"
    assert (num(t_tok, r"V_l = (\d+)"), num(s_tok, r"V_s = (\d+)")) == (teacher.V, student.V)
    # chat templates
    t_chat, s_chat = table["chat template"]
    assert t_chat == "ChatML" and "<|im_start|>" in teacher.chat_template and "<|im_end|>" in teacher.chat_template
    assert "`User:`" in s_chat and "<end_of_utterance>" in s_chat and "<end_of_utterance>" in student.chat_template
    # image pipelines
    t_img, s_img = table["image pipeline"]
    tv, sv = teacher.model.config.vision_config, student.model.config.vision_config
    assert t_img.startswith("CLIP") and tv.model_type.startswith("clip")
    assert s_img.startswith("SigLIP") and sv.model_type == "idefics3_vision"  # Idefics3's tower is SigLIP's
    assert (num(t_img, r"(\d+) px"), num(t_img, r"(\d+)-px patches")) == (tv.image_size, tv.patch_size)
    assert (num(s_img, r"(\d+) px"), num(s_img, r"(\d+)-px patches")) == (sv.image_size, sv.patch_size)
    assert num(s_img, r"pixel shuffle x(\d+)") == student.model.config.scale_factor
    for view, cell in ((teacher, t_img), (student, s_img)):
        e = view.encode(sample)
        assert num(cell, r"(\d+) image tokens") == int((e.input_ids[: e.q_len] == view.image_token_id).sum())
    wrappers = sum(t in ("<fake_token_around_image>", "<global-img>")
                   for t in student.tokenizer.convert_ids_to_tokens(student.encode(sample).input_ids.tolist()))
    assert num(s_img, r"\(\+(\d+) wrappers\)") == wrappers
    # sizes
    t_dim, s_dim = table["hidden size, layers"]
    for view, cell, name in ((teacher, t_dim, "d_l"), (student, s_dim, "d_s")):
        assert (num(cell, name + r" = (\d+)"), num(cell, r", (\d+)$")) == (view.d, view.text_config.num_hidden_layers)
    t_par, s_par = table["parameters"]
    for view, cell in ((teacher, t_par), (student, s_par)):
        assert num(cell, r"^(\d+\.\d)M") == round(sum(p.numel() for p in view.model.parameters()) / 1e6, 1)
    info = json.loads((TEACHER_DIR / "training.json").read_text())
    assert num(t_par, r"trained to (\d+\.\d)% val") == round(100 * info["val_accuracy"], 1)
    assert num(t_par, r"\((\d+\.\d) MB fp16\)") == round((TEACHER_DIR / "model.safetensors").stat().st_size / 1e6, 1)
    assert "random init" in s_par


def test_readme_timings_equal_the_committed_timing_runs():
    """The notebook tour's seconds and the demo's wall time are the ones `benchmarks/time_notebooks.py --json` and
    `benchmarks/time_demo.py --json` wrote to results/timings/ (no figure is typed in by hand)."""
    import json
    readme = (ROOT / "README.md").read_text()
    timings = ROOT / "results" / "timings"
    learner = json.loads((timings / "notebooks_learner.json").read_text())
    smoke = json.loads((timings / "notebooks_smoke.json").read_text())
    assert (learner["mode"], smoke["mode"]) == ("learner", "smoke")
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("[0-9]*.ipynb"))
    assert sorted(learner["median_s"]) == sorted(smoke["median_s"]) == notebooks
    table = readme.split("| notebook | what it teaches | learner mode (s) | smoke mode (s) |", 1)[1].split("\n\n", 1)[0]
    rows = [r.strip().strip("|").split("|") for r in table.strip().splitlines()[1:]]
    assert len(rows) == len(notebooks)
    for cells in rows:
        name = cells[0].strip().strip("`") + ".ipynb"
        assert cells[-2].strip() == f"{learner['median_s'][name]:.0f}", name
        assert cells[-1].strip() == f"{smoke['median_s'][name]:.0f}", name
    assert f"learner mode {sum(learner['median_s'].values()):.0f} s for all six" in readme
    assert f"smoke mode (`MINIGENRECAL_SMOKE=1`, what CI runs) {sum(smoke['median_s'].values()):.0f} s" in readme
    assert all(t < 300 for t in learner["median_s"].values())  # "each under 5 min"
    demo = json.loads((timings / "demo.json").read_text())
    runs = ", ".join(f"{r:.0f}" for r in demo["runs_s"])
    assert f"median {demo['median_s']:.0f} s over {len(demo['runs_s'])} runs ({runs} s)" in readme
    assert demo["median_s"] < 600  # "well inside the 10-minute target"
