"""lmms-eval scores a saved model on the shipped task `minigenrecal_synth` exactly as `python -m minigenrecal
evaluate` does: the same answer for every item, hence the same accuracy. Run through the documented command
(`python -m minigenrecal.evaluation.lmms_eval_model ...`, lmms-eval's own CLI with the kit's model registered), on
CPU, for a student saved by `demo` (Idefics3, the class lmms-eval's `huggingface` model would load headless) and
for the shipped teacher saved as a plain directory (Llava, a real accuracy)."""
import json
import sys
from dataclasses import replace

import pytest

lmms_eval_model = pytest.importorskip("minigenrecal.evaluation.lmms_eval_model",
                                     reason="lmms-eval (and its dependencies) not installed")

from minigenrecal.cli import main as kit_main  # noqa: E402
from minigenrecal.data.synthetic import make_split, normalize  # noqa: E402
from minigenrecal.evaluation.exact_match import exact_match  # noqa: E402
from minigenrecal.models.hub import load_hub_vlm  # noqa: E402
from minigenrecal.models.presets import get_preset  # noqa: E402
from minigenrecal.models.tiny import load_teacher  # noqa: E402
from minigenrecal.models.vlm import VLMView  # noqa: E402
from minigenrecal.study.pipeline import demo  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.lmms_eval]
N = 32
TASK = lmms_eval_model.TASKS_DIR / "minigenrecal_synth"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> directory of a saved model: a quickly trained demo student, and the shipped teacher."""
    root = tmp_path_factory.mktemp("saved")
    tiny = get_preset("tiny")  # stages 1-2 one step each, stage 3 long enough to answer some questions right
    preset = replace(tiny, n_train=256, stage1=replace(tiny.stage1, steps=1, batch_size=4),
                     stage2=replace(tiny.stage2, steps=1, batch_size=4), stage3=replace(tiny.stage3, steps=80))
    demo(preset, str(root / "demo"), n_test=4, progress=False, log=lambda *_: None)
    model, proc = load_teacher()
    model.save_pretrained(root / "teacher")
    proc.save_pretrained(root / "teacher")
    return {"student": root / "demo" / "student", "teacher": root / "teacher"}


def test_the_shipped_items_are_the_test_split_of_evaluate_defaults():
    rows = [json.loads(line) for line in (TASK / "test.jsonl").read_text().splitlines()]
    samples = make_split(1, "test", len(rows))  # `evaluate`'s default --data-seed and --split
    assert len(rows) == 500
    assert [(r["id"], r["question"], r["answer"]) for r in rows] == [(s.id, s.question, s.answer) for s in samples]


def test_the_upstream_class_check_still_misses_image_text_to_text_models():
    """Why `minigenrecal_hf` exists: lmms-eval's `huggingface` model tests a model-type string against mapping keys
    that are config classes, so it falls back to AutoModel. If this fails, upstream or transformers changed; the
    shim's class choice may no longer be needed."""
    from transformers import AutoModelForImageTextToText, Idefics3Config
    assert "idefics3" not in AutoModelForImageTextToText._model_mapping.keys()
    assert Idefics3Config in AutoModelForImageTextToText._model_mapping.keys()


@pytest.mark.parametrize("name", ["student", "teacher"])
def test_lmms_eval_scores_each_item_as_evaluate_does(saved, name, tmp_path, monkeypatch, capsys):
    path = saved[name]
    monkeypatch.setenv("LMMS_EVAL_DATASETS_CACHE", str(tmp_path / "datasets"))  # nothing written outside tmp_path
    monkeypatch.setattr(sys, "argv", [
        "lmms_eval", "--model", lmms_eval_model.MODEL_NAME, "--model_args", f"pretrained={path},device=cpu",
        "--tasks", "minigenrecal_synth", "--include_path", str(lmms_eval_model.TASKS_DIR), "--limit", str(N),
        "--batch_size", "1", "--log_samples", "--output_path", str(tmp_path / "out"), "--verbosity", "DEBUG"])
    lmms_eval_model.cli_evaluate()  # DEBUG: an error inside the evaluation is raised, not only logged
    [results] = (tmp_path / "out").rglob("*_results.json")
    [samples] = (tmp_path / "out").rglob("*_samples_minigenrecal_synth.jsonl")
    lmms = json.loads(results.read_text())["results"]["minigenrecal_synth"]
    rows = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    answers = [r["filtered_resps"][0] if isinstance(r["filtered_resps"], list) else r["filtered_resps"] for r in rows]

    capsys.readouterr()
    kit_main(["evaluate", "--student", str(path), "--n", str(N)])  # data seed 1, test split: the shipped items
    kit = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    model, proc = load_hub_vlm(str(path), dtype="float32")
    ref = exact_match(VLMView(model, proc), make_split(1, "test", N))

    assert len(rows) == kit["n"] == N
    assert [a.strip() for a in answers] == ref["predictions"]  # greedy answers equal, word for word
    items = make_split(1, "test", N)
    assert [r["exact_match"] for r in rows] == [float(normalize(p) == normalize(s.answer))
                                                for p, s in zip(ref["predictions"], items)]
    assert lmms["exact_match,none"] == kit["accuracy"] == ref["accuracy"]
    assert 0 < kit["accuracy"] < 1 if name == "student" else kit["accuracy"] > 0.9  # a real score, both ways


def test_importing_the_lmms_eval_model_leaves_truncated_images_refused():
    """lmms-eval turns on PIL's LOAD_TRUNCATED_IMAGES at import; the kit's module restores it, so a truncated image
    is still named as bad input by every reader in the same process (tests/test_inputs.py)."""
    from PIL import ImageFile
    assert lmms_eval_model.ImageFile is ImageFile and ImageFile.LOAD_TRUNCATED_IMAGES is False
