"""The saved student carries a Hub model card (README.md: YAML front matter, then prose) and still loads with
AutoModelForImageTextToText."""
import json
from dataclasses import replace

import yaml

from minigenrecal.models.presets import PRESETS, get_preset
from minigenrecal.scale.model_card import model_card


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_a_hub_pair_card_names_base_model_teacher_stages_data_and_the_score():
    preset = PRESETS["smolvlm-256m<-qwen2-vl-2b"]
    text = model_card(student=preset.student, teacher=preset.teacher, stages=preset.stages(), data="`train.jsonl`",
                      evaluation={"dataset": "the test split", "n": 500, "value": 0.524}, preset=preset.name)
    meta = _front_matter(text)
    assert meta["base_model"] == "HuggingFaceTB/SmolVLM-256M-Instruct"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "image-text-to-text"
    [result] = meta["model-index"][0]["results"]
    assert result["metrics"] == [{"type": "exact_match", "value": 0.524}]
    assert "**Teacher:** [Qwen/Qwen2-VL-2B-Instruct](https://huggingface.co/Qwen/Qwen2-VL-2B-Instruct)" in text
    assert "| 2 | distillation (student + Recalibrator) | 1000 | 8 | 4 | 0.0001 -> 1e-05 |" in text
    assert "**Data:** `train.jsonl`" in text and "Exact match 0.524 on the test split (500 items" in text


def test_the_demo_writes_the_card_with_its_score_and_the_directory_still_loads(tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForImageTextToText
    from minigenrecal.study.pipeline import demo
    tiny = get_preset("tiny")
    preset = replace(tiny, n_train=8, **{f"stage{s}": replace(getattr(tiny, f"stage{s}"), steps=1, batch_size=4)
                                         for s in (1, 2, 3)})
    res = demo(preset, str(tmp_path / "run"), n_test=4, progress=False, log=lambda *_: None)
    student = tmp_path / "run" / "student"
    card = ModelCard.load(student / "README.md")
    assert card.data.base_model is None  # a random-init tiny student has no base model on the Hub
    assert card.data.eval_results[0].metric_value == res["student_after"]
    assert "| 1 | alignment (Recalibrator, teacher head) | 1 | 4 | 1 | 0.001 -> 0.0001 |" in card.text
    assert "train split (seed 0, 8 samples)" in card.text
    model = AutoModelForImageTextToText.from_pretrained(student)
    assert type(model).__name__ == "Idefics3ForConditionalGeneration"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["student_after"] == res["student_after"]


def test_a_train_launch_writes_the_card(tmp_path):
    from minigenrecal.cli import main
    out = tmp_path / "x"
    main(["train", "--preset", "tiny", "--stages", "1,3", "--max_steps", "1", "--n", "4",
          "--per_device_train_batch_size", "2", "--save_steps", "0", "--quiet", "--output_dir", str(out)])
    text = (out / "student" / "README.md").read_text()
    assert _front_matter(text)["pipeline_tag"] == "image-text-to-text"
    assert "| 1 | alignment" in text and "| 3 | SFT (student) | 1 | 2 | 1 |" in text and "\n| 2 |" not in text
    assert "train split (seed 0, 4 samples)" in text and "Not evaluated by this run" in text
