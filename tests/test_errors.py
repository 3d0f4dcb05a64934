"""Bad input gets a clear error naming the sample and the problem."""
import json

import pytest
from PIL import Image

from minigenrecal.data.synthetic import Sample, make_sample
from minigenrecal.data.llava import read_llava_json
from minigenrecal.data.llava import SampleError
from minigenrecal.models.vlm import VLMView


def _ok():
    return make_sample(0, "train", 0)


def test_sample_with_no_image(tiny_pair):
    teacher, _ = tiny_pair
    s = _ok()
    with pytest.raises(SampleError, match=r"sample noimg-1: no image"):
        teacher.encode(Sample(None, s.question, s.answer, id="noimg-1"))


def test_llava_record_with_no_image(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([{"id": "r7", "conversations": [
        {"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ValueError, match=r"sample r7: no image"):
        read_llava_json(tmp_path / "d.json")


@pytest.mark.parametrize("answer", ["", "   "])
def test_empty_answer(tiny_pair, answer):
    _, make_student = tiny_pair
    s = _ok()
    with pytest.raises(SampleError, match=r"sample empty-a: empty answer"):
        make_student().encode(Sample(s.image, s.question, answer, id="empty-a"))


def test_too_long_sample_is_rejected_not_truncated(tiny_pair):
    teacher, _ = tiny_pair
    s = _ok()
    short = VLMView(teacher.model, teacher.processor, max_length=teacher.encode(s).q_len + 1, name="teacher")
    with pytest.raises(SampleError, match=r"sample train-0-0: rejected, too long for max_length=\d+ \(teacher: "
                                          r"question \d+ \+ answer \d+ tokens\)"):
        short.encode(s)


def test_image_token_count_mismatch(tiny_pair):
    teacher, make_student = tiny_pair
    s = _ok()
    bad = Sample(s.image, "<image> " + s.question, s.answer, id="two-tags")
    for view in (teacher, make_student()):
        with pytest.raises(SampleError, match=r"sample two-tags: 2 image placeholders .* but the sample has 1 image"):
            view.encode(bad)


def test_llava_json_with_extra_image_placeholder(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "d.json").write_text(json.dumps([{"id": "r9", "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\n<image>\nq"}, {"from": "gpt", "value": "a"}]}]))
    with pytest.raises(ValueError, match=r"sample r9: turn 0 has more <image> placeholders"):
        read_llava_json(tmp_path / "d.json")


def test_tokenizer_without_chat_template(tiny_pair):
    teacher, _ = tiny_pair
    import copy
    proc = copy.deepcopy(teacher.processor)
    proc.chat_template = None
    proc.tokenizer.chat_template = None
    with pytest.raises(ValueError, match=r"teacher: the tokenizer has no chat template"):
        VLMView(teacher.model, proc, name="teacher")
