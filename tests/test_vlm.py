"""The uniform VLM view: head(body(x)) equals the model's logits, and spans decode back to question and answer."""
import pytest
import torch

from minigenrecal.data.synthetic import make_split
from minigenrecal.models.families import build_tiny_vlm
from minigenrecal.models.vlm import VLMView

FAMILIES = {"llava": "LlavaForConditionalGeneration", "idefics3": "Idefics3ForConditionalGeneration",
            "qwen2vl": "Qwen2VLForConditionalGeneration", "internvl": "InternVLForConditionalGeneration"}
# image tokens per image, by hand from the tiny configs: Llava 64 px / 32-px patches = 2x2; Idefics3 48 px / 8-px
# patches = 6x6, pixel shuffle x2 -> 9; Qwen2-VL 32x32 px / 8-px patches = 4x4, 2x2 merge -> 4; InternVL 32 px /
# 8-px patches = 4x4, downsample 0.5 -> 4
IMAGE_TOKENS = {"llava": 4, "idefics3": 9, "qwen2vl": 4, "internvl": 4}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_head_of_body_is_logits_and_spans_decode(family):
    model, proc = build_tiny_vlm(family)
    assert type(model).__name__ == FAMILIES[family]
    view = VLMView(model, proc, name=family)
    samples = make_split(3, "train", 4)
    encs = [view.encode(s) for s in samples]
    batch = view.collate(encs)
    with torch.no_grad():
        z = view.body(batch)
        ref = model(**{k: v for k, v in batch.items() if k not in ("q_lens", "a_lens")}).logits
    assert z.shape == (4, batch["input_ids"].shape[1], view.d)
    torch.testing.assert_close(view.head(z), ref)
    tok = view.tokenizer
    for s, e in zip(samples, encs):
        q_text = tok.decode(e.input_ids[: e.q_len], skip_special_tokens=False)
        a_ids = e.input_ids[e.q_len:]
        assert s.question in q_text.replace("▁", " ")
        assert tok.decode(a_ids, skip_special_tokens=True).strip() == s.answer
        assert int(a_ids[-1]) in view.eot_ids  # the answer span ends with the end-of-turn token
        assert all(int(t) not in view.eot_ids for t in a_ids[:-1])
        n_img = int((e.input_ids[: e.q_len] == view.image_token_id).sum())
        assert n_img == IMAGE_TOKENS[family] == view.expected_image_tokens(e.vision)


def test_qwen2vl_batch_carries_mm_token_type_ids():
    model, proc = build_tiny_vlm("qwen2vl")
    view = VLMView(model, proc)
    batch = view.collate([view.encode(s) for s in make_split(0, "train", 2)])
    # reference: the positions whose token STRING is Qwen2-VL's image placeholder, 4 per sample (IMAGE_TOKENS)
    for ids, mm in zip(batch["input_ids"], batch["mm_token_type_ids"]):
        is_image = [t == "<|image_pad|>" for t in view.tokenizer.convert_ids_to_tokens(ids.tolist())]
        assert mm.tolist() == [int(x) for x in is_image]
        assert sum(is_image) == IMAGE_TOKENS["qwen2vl"]


def test_tiny_pair_differs_in_every_way(tiny_pair):
    teacher, make_student = tiny_pair
    student = make_student()
    assert type(teacher.model).__name__ != type(student.model).__name__
    assert teacher.d > student.d and teacher.V != student.V
    assert type(teacher.tokenizer.backend_tokenizer.model).__name__ == "BPE"
    assert type(student.tokenizer.backend_tokenizer.model).__name__ == "Unigram"
    s = make_split(0, "train", 1)[0]
    et, es = teacher.encode(s), student.encode(s)
    n_img_t = int((et.input_ids == teacher.image_token_id).sum())
    n_img_s = int((es.input_ids == student.image_token_id).sum())
    assert (n_img_t, n_img_s) == (4, 9)
    assert et.a_len != es.a_len or not torch.equal(et.input_ids[et.q_len:], es.input_ids[es.q_len:])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_no_kv_cache_on_teacher_or_student_forwards(family):
    """The teacher's forward and stage 1's no-grad student forward build no KV cache (every config says
    use_cache=True; at 72B x 8 x 3,468 tokens the unused cache is about 8.5 GiB)."""
    from minigenrecal.recalibrator import Recalibrator
    from minigenrecal.stages import GenRecal, StageConfig, teacher_forward
    model, proc = build_tiny_vlm(family)
    view = VLMView(model, proc, name=family)
    batch = view.collate([view.encode(s) for s in make_split(3, "train", 2)])
    caches = []
    model.model.register_forward_hook(lambda m, args, out: caches.append(
        [k for k in ("cache", "past_key_values") if getattr(out, k, None) is not None]))
    t = teacher_forward(view, batch)
    GenRecal(view, Recalibrator(view.d, view.text_config), view.head)(1, batch, t, StageConfig())
    assert caches == [[], []]
