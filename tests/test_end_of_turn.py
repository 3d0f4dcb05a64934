"""A chat template whose end-of-turn is not the tokenizer's EOS: the end-of-turn token is adopted and a warning
says so (answers end with it, not with end-of-turn, newline, EOS); an end that is not one token is warned about."""
import logging

from minigenrecal.data.synthetic import make_split
from minigenrecal.models.tiny import load_teacher
from minigenrecal.models.vlm import VLMView


def _teacher_with_eos(token: str):
    model, proc = load_teacher()
    proc.tokenizer.eos_token = token
    model.generation_config.eos_token_id = proc.tokenizer.convert_tokens_to_ids(token)
    return model, proc


def test_an_end_of_turn_that_is_not_eos_is_taken_as_end_of_turn_with_a_warning(caplog):
    s = make_split(0, "train", 1)[0]
    model, proc = load_teacher()  # ChatML: '<|im_end|>' ends a turn and is the EOS
    with caplog.at_level(logging.WARNING):
        ref = VLMView(model, proc).answer_ids(s)
    assert not caplog.records
    model, proc = _teacher_with_eos("<|endoftext|>")
    tok = proc.tokenizer
    with caplog.at_level(logging.WARNING):
        view = VLMView(model, proc, name="teacher")
    [rec] = caplog.records
    assert "teacher: the chat template ends a turn with '<|im_end|>', not the EOS '<|endoftext|>'" in rec.message
    ids = view.answer_ids(s)
    assert ids == ref and tok.convert_ids_to_tokens(ids[-1]) == "<|im_end|>"  # not '<|im_end|>', '\n', EOS
    assert tok.convert_tokens_to_ids("<|im_end|>") in view.eot_ids  # generation stops there too


def test_an_end_of_turn_of_several_tokens_is_warned_about(caplog):
    model, proc = _teacher_with_eos("<|endoftext|>")
    proc.chat_template = proc.chat_template.replace("<|im_end|>\n{% endfor %}", "\n### end\n{% endfor %}")
    with caplog.at_level(logging.WARNING):
        view = VLMView(model, proc, name="teacher")
    [rec] = caplog.records
    assert "ends a turn with '### end', which is not the EOS '<|endoftext|>' nor one special token" in rec.message
    ids = view.answer_ids(make_split(0, "train", 1)[0])
    assert proc.tokenizer.convert_ids_to_tokens(ids[-1]) == "<|endoftext|>"
