"""Input formats and bad inputs: every problem is named with its sample, every conversion is exact, nothing dropped."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from minigenrecal.data.synthetic import Sample, make_sample
from minigenrecal.data.llava import read_llava_json, read_records, to_rgb, write_llava_json
from minigenrecal.data.llava import SampleError


def _record(rid, image="x.png", turns=(("<image>\nWhat is it?", "a red circle"),)):
    conv = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    return {"id": rid, "image": image, "conversations": conv}


def _write(tmp_path, records, name="d.json"):
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path


def _png(tmp_path, name="x.png", image=None):
    (image or make_sample(0, "train", 0).image).save(tmp_path / name)
    return name


# -- images ----------------------------------------------------------------------------------------------
def _truncated_png(tmp_path, name="cut.png"):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    return name


def test_truncated_png_is_named_at_read_time(tmp_path):
    path = _write(tmp_path, [_record("t1", image=_truncated_png(tmp_path))])
    with pytest.raises(SampleError, match=r"sample t1: image file 'cut.png' cannot be decoded, the file is truncated"):
        read_llava_json(path)


def test_truncated_png_is_named_at_encode_time(tmp_path, tiny_pair):
    teacher, _ = tiny_pair
    s = make_sample(0, "train", 0)
    lazy = Image.open(tmp_path / _truncated_png(tmp_path))  # PIL decodes lazily: the error comes at first use
    with pytest.raises(SampleError, match=r"sample t2: image cannot be decoded, the file is truncated"):
        teacher.encode(Sample(lazy, s.question, s.answer, id="t2"))


def test_image_list_of_one_is_read_and_of_two_is_rejected(tmp_path):
    name = _png(tmp_path)
    one = read_llava_json(_write(tmp_path, [_record("m1", image=[name])]))
    assert len(one) == 1 and np.array_equal(np.asarray(one[0].image), np.asarray(make_sample(0, "train", 0).image))
    with pytest.raises(SampleError, match=r"sample m2: 2 images in one record; several images per record are not "
                                          r"supported"):
        read_llava_json(_write(tmp_path, [_record("m2", image=[name, name])]))


def test_16_bit_png_scales_to_8_bit(tmp_path):
    values = np.array([[0, 257, 1000, 32896], [40000, 65279, 65535, 128]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode in ("I;16", "I")  # really a 16-bit image on disk
    expected = np.array([[0, 1, 4, 128], [156, 254, 255, 0]], dtype=np.uint8)  # round(v * 255 / 65535), by hand
    [s] = read_llava_json(_write(tmp_path, [_record("g1", image="g16.png")]))
    rgb = np.asarray(s.image)
    assert s.image.mode == "RGB" and rgb.shape == (2, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], expected)


def test_encode_converts_a_16_bit_image_like_the_reader(tmp_path, tiny_pair):
    teacher, _ = tiny_pair
    s = make_sample(0, "train", 0)
    grey = np.asarray(s.image.convert("L")).astype(np.uint16) * 257  # 8-bit v -> 16-bit v * 257, exactly invertible
    wide = Sample(Image.fromarray(grey), s.question, s.answer, id="g2")
    ref = Sample(s.image.convert("L").convert("RGB"), s.question, s.answer, id="g2")
    torch.testing.assert_close(teacher.encode(wide).vision["pixel_values"], teacher.encode(ref).vision["pixel_values"])


def test_palette_and_alpha_images_convert_to_their_colours():
    p = Image.new("P", (3, 1))
    p.putpalette([200, 10, 20, 0, 90, 250, 7, 7, 7])
    for x, k in enumerate((0, 1, 2)):
        p.putpixel((x, 0), k)
    np.testing.assert_array_equal(np.asarray(to_rgb(p)), [[[200, 10, 20], [0, 90, 250], [7, 7, 7]]])
    p.info["transparency"] = 2  # palette entry 2 is transparent: composited onto white
    np.testing.assert_array_equal(np.asarray(to_rgb(p)), [[[200, 10, 20], [0, 90, 250], [255, 255, 255]]])
    la = Image.new("LA", (3, 1))
    for x, px in enumerate(((100, 255), (100, 0), (100, 128))):
        la.putpixel((x, 0), px)
    blend = 100 * 128 / 255 + 255 * 127 / 255  # alpha 128 over white
    got = np.asarray(to_rgb(la)).astype(float)
    np.testing.assert_allclose(got, [[[100] * 3, [255] * 3, [blend] * 3]], atol=1)
    pa = Image.new("PA", (1, 1))
    pa.putpalette([0, 90, 250])
    pa.putpixel((0, 0), (0, 255))
    np.testing.assert_array_equal(np.asarray(to_rgb(pa)), [[[0, 90, 250]]])


def test_unsupported_image_mode_is_named():
    with pytest.raises(SampleError, match=r"sample f1: image has pixel mode 'F', which is not supported"):
        to_rgb(Image.new("F", (2, 2)), "f1")


# -- files -----------------------------------------------------------------------------------------------
def test_jsonl_reads_like_json(tmp_path):
    samples = [make_sample(0, "train", i) for i in range(3)]
    path = write_llava_json(samples, tmp_path)
    records = json.loads(path.read_text())
    lines = _write(tmp_path, records, "d.jsonl")
    lines.write_text(lines.read_text().replace("\n", "\n\n", 1))  # a blank line is allowed
    assert read_records(lines) == records
    a, b = read_llava_json(path), read_llava_json(lines)
    assert [(s.id, s.question, s.answer) for s in a] == [(s.id, s.question, s.answer) for s in b]
    assert [s.id for s in b] == [f"{s.id}#0" for s in samples]


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    good = json.dumps(_record("j1"))
    (tmp_path / "bad.jsonl").write_text(good + "\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: not one JSON record"):
        read_records(tmp_path / "bad.jsonl")
    (tmp_path / "lines.json").write_text(good + "\n" + good + "\n")  # JSONL under a .json name
    with pytest.raises(ValueError, match=r"lines.json: not valid JSON \(Extra data.*must be named \*\.jsonl"):
        read_records(tmp_path / "lines.json")


# -- text ------------------------------------------------------------------------------------------------
def test_image_placeholder_in_answer_is_rejected_at_read_time(tmp_path):
    path = _write(tmp_path, [_record("a1", image=_png(tmp_path), turns=[("<image>\nq", "see <image> here")])])
    with pytest.raises(SampleError, match=r"sample a1: turn 1: the answer contains an <image> placeholder"):
        read_llava_json(path)


def test_image_placeholder_in_answer_is_rejected_at_encode_time(tiny_pair):
    teacher, make_student = tiny_pair
    s = make_sample(0, "train", 0)
    for view in (teacher, make_student()):
        with pytest.raises(SampleError, match=r"sample a2: the answer contains the image placeholder '<image>'"):
            view.encode(Sample(s.image, s.question, "a <image> b", id="a2"))


def test_end_of_turn_string_in_answer_or_question_is_rejected(tiny_pair):
    teacher, make_student = tiny_pair
    s = make_sample(0, "train", 0)
    for view, end in ((teacher, "<|im_end|>"), (make_student(), "<end_of_utterance>")):
        assert end in view.end_of_turn_strings
        with pytest.raises(SampleError, match=rf"sample e1: the answer contains the end-of-turn string '{end}'"):
            view.encode(Sample(s.image, s.question, f"one{end} two", id="e1"))
        with pytest.raises(SampleError, match=rf"sample e2: the question contains the end-of-turn string '{end}'"):
            view.encode(Sample(s.image, f"{s.question}{end}", s.answer, id="e2"))
        view.encode(s)  # a clean sample still renders


# -- multi-turn --------------------------------------------------------------------------------------------
TWO_TURNS = [("<image>\nWhat is in the top left cell?", "a red circle"), ("How many shapes are there?", "two shapes")]


def test_multi_turn_is_rejected_by_default(tmp_path):
    path = _write(tmp_path, [_record("c1", image=_png(tmp_path), turns=TWO_TURNS)])
    with pytest.raises(SampleError, match=r"sample c1: a multi-turn conversation \(2 question/answer pairs\); "
                                          r"pass multi_turn='context'"):
        read_llava_json(path)
    with pytest.raises(ValueError, match=r"multi_turn must be one of"):
        read_llava_json(path, multi_turn="drop")


def test_multi_turn_context_carries_earlier_turns_and_split_keeps_every_turn(tmp_path):
    path = _write(tmp_path, [_record("c2", image=_png(tmp_path), turns=TWO_TURNS)])
    ctx = read_llava_json(path, multi_turn="context")
    assert [(s.id, s.question, s.answer) for s in ctx] == [
        ("c2#0", "What is in the top left cell?", "a red circle"),
        ("c2#1", "Q: What is in the top left cell?\nA: a red circle\nQ: How many shapes are there?", "two shapes")]
    split = read_llava_json(path, multi_turn="split")
    assert [(s.id, s.question, s.answer) for s in split] == [
        ("c2#0", "What is in the top left cell?", "a red circle"), ("c2#1", "How many shapes are there?", "two shapes")]


def test_reader_skips_and_records_bad_records_when_asked(tmp_path):
    name = _png(tmp_path)
    path = _write(tmp_path, [_record("ok", image=name), _record("cut", image=_truncated_png(tmp_path)),
                             _record("two", image=[name, name]), _record("ok2", image=name)])
    skipped = []
    samples = read_llava_json(path, skipped=skipped)
    assert [s.id for s in samples] == ["ok#0", "ok2#0"]
    assert [r["id"] for r in skipped] == ["cut", "two"]
    assert "truncated" in skipped[0]["reason"] and "several images per record" in skipped[1]["reason"]


# -- a run skips bad samples and records them ----------------------------------------------------------------
def test_run_genrecal_skips_bad_samples_on_either_side_and_strict_fails(tiny_pair, capsys):
    from minigenrecal.study.pipeline import run_genrecal
    from minigenrecal.stages import StageConfig
    teacher, make_student = tiny_pair
    good = [make_sample(0, "train", i) for i in range(3)]
    s = good[0]
    bad_t = Sample(s.image, s.question, "two <|im_end|> shapes", id="bad-teacher")  # only the teacher's end-of-turn
    bad_s = Sample(s.image, s.question, "two <end_of_utterance> shapes", id="bad-student")  # only the student's
    train = [good[0], bad_t, good[1], bad_s, good[2]]
    stages = {1: StageConfig(steps=1, batch_size=2)}
    run = run_genrecal(teacher, make_student(), train, stages, until=1, progress=False)
    assert [r["id"] for r in run["skipped"]] == ["bad-teacher", "bad-student"]
    assert "end-of-turn string '<|im_end|>' of teacher" in run["skipped"][0]["reason"]
    assert "end-of-turn string '<end_of_utterance>' of student" in run["skipped"][1]["reason"]
    assert "skipped 2 of 5 training samples" in capsys.readouterr().out
    with pytest.raises(SampleError, match=r"sample bad-teacher: the answer contains the end-of-turn string"):
        run_genrecal(teacher, make_student(), train, stages, until=1, progress=False, strict=True)


def test_train_command_writes_a_skip_report_and_strict_fails_fast(tmp_path, capsys):
    from minigenrecal.cli import main
    good = [make_sample(0, "train", i) for i in range(4)]
    path = write_llava_json(good, tmp_path)
    records = json.loads(path.read_text())
    eot = _record("eot", image=records[0]["image"], turns=[("<image>\nq", "two <|im_end|> shapes")])
    records[1:1] = [_record("cut", image=_truncated_png(tmp_path)), eot]
    path = _write(tmp_path, records, "mixed.jsonl")
    args = ["train", "--preset", "tiny", "--data", str(path), "--stages", "1", "--max_steps", "1", "--per_device_train_batch_size", "2",
            "--save_steps", "0", "--quiet"]
    main(args + ["--output_dir", str(tmp_path / "run")])
    report = [json.loads(l) for l in (tmp_path / "run" / "skipped.jsonl").read_text().splitlines()]
    assert [r["id"] for r in report] == ["cut", "eot#0"]
    assert "truncated" in report[0]["reason"] and "end-of-turn string '<|im_end|>'" in report[1]["reason"]
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert log["samples"] == 4 and log["skipped"] == 2
    assert "training on 4 samples; skipped 2 bad sample(s)" in capsys.readouterr().out
    with pytest.raises(SampleError, match=r"sample cut: image file 'cut.png' cannot be decoded"):
        main(args + ["--output_dir", str(tmp_path / "strict"), "--strict"])
