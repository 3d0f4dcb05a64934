"""Every family of `families.FAMILIES`, built tiny, random-init and offline, through the uniform view and stages 1-3.

Per family: head(body(x)) equals the logits and the spans decode; the question equals the family's own processor +
chat-template rendering for generation (one BOS); the image-token count is checked; per-token processor outputs
are collated with the family's meaning and no token attends forward. Also: the stand-ins, loading a model from a
local directory (`--teacher` / `--student`), and the README's family table.
"""
from dataclasses import replace
from functools import lru_cache

import pytest
import torch

from minigenrecal.data.synthetic import make_split
from minigenrecal.models.families import FAMILIES, images_only, load_processor, markdown_table
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.loop import PairData, train_stage
from minigenrecal.stages import StageConfig, student_groups
from minigenrecal.models.tiny import ROOT, load_teacher
from minigenrecal.models.vlm import VLMView

torch.set_num_threads(1)
KEYS = list(FAMILIES)


@lru_cache(maxsize=None)
def view_of(key: str) -> VLMView:
    f = FAMILIES[key]
    model, proc = f.build(seed=0, d=f.width or 48, layers=2)
    return VLMView(model, proc, name=key)


@lru_cache(maxsize=None)
def _picked() -> tuple:
    """3 samples whose questions have 3, 5 and 8 words; the second's image is 64 x 40 (tiles, grids, rows differ)."""
    pool = make_split(0, "train", 60)
    picked = [next(s for s in pool if len(s.question.split()) == n) for n in (3, 5, 8)]
    picked[1] = replace(picked[1], image=picked[1].image.resize((64, 40)))
    return tuple(picked)


def samples() -> list:
    return list(_picked())


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k not in ("q_lens", "a_lens")}


def reference_question(view: VLMView, s) -> dict:
    """The family's own processor + chat template, rendering for generation (what inference sends)."""
    msgs = [{"role": "user", "content": [{"type": "image", "image": s.image}, {"type": "text", "text": s.question}]}]
    proc = view.processor
    if hasattr(proc, "apply_chat_template"):
        return dict(proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                             return_tensors="pt"))
    # a SimpleProcessor (Mistral3): Pixtral's rows written out by hand from the processed image size
    text = proc.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    vis = dict(proc.image_processor([s.image], return_tensors="pt"))
    h, w = (int(x) // 16 for x in vis["image_sizes"][0])  # 8-px patches merged 2 x 2
    rows = ["[IMG]" * w + "[IMG_BREAK]"] * (h - 1) + ["[IMG]" * w + "[IMG_END]"]
    ids = proc.tokenizer(text.replace("[IMG]", "".join(rows)), add_special_tokens=False, return_tensors="pt")
    return {**dict(ids), **vis}


# -- the uniform view, per family -----------------------------------------------------------------------------
@pytest.mark.parametrize("key", KEYS)
def test_head_of_body_is_logits_and_spans_decode(key):
    view = view_of(key)
    assert type(view.model).__name__ == FAMILIES[key].model_class and view.family is FAMILIES[key]
    encs = [view.encode(s) for s in samples()]
    assert len({e.q_len for e in encs}) == 3  # different question lengths: real padding
    batch = view.collate(encs)
    with torch.no_grad():
        z = view.body(batch)
        logits = view.model(**model_inputs(batch)).logits  # the forward also checks image tokens vs features
    assert z.shape == (3, batch["input_ids"].shape[1], view.d)
    torch.testing.assert_close(view.head(z), logits)
    tok = view.tokenizer
    for s, e in zip(samples(), encs):
        q_text = tok.decode(e.input_ids[: e.q_len]).replace("▁", " ")
        a_ids = e.input_ids[e.q_len:]
        assert s.question in q_text
        assert tok.decode(a_ids, skip_special_tokens=True).strip() == s.answer
        assert int(a_ids[-1]) in view.eot_ids and all(int(t) not in view.eot_ids for t in a_ids[:-1])


@pytest.mark.parametrize("key", KEYS)
def test_question_is_the_familys_own_rendering_with_one_bos(key):
    view = view_of(key)
    bos = view.tokenizer.bos_token_id
    for s in samples():
        e, ref = view.encode(s), reference_question(view, s)
        q = e.input_ids[: e.q_len]
        assert q.tolist() == ref["input_ids"][0].tolist()
        assert set(ref) - {"input_ids", "attention_mask"} == set(e.vision)
        for k, v in e.vision.items():  # pixels per image; per-token outputs over the question
            torch.testing.assert_close(v, ref[k][0] if k in view.per_token else ref[k], rtol=0, atol=0)
        assert q.tolist().count(bos) == (1 if bos is not None else 0)


def test_a_tokenizer_that_adds_bos_itself_gets_one():
    """Gemma3's template writes BOS and its tokenizer adds one: the rendered question has it once, first."""
    view = view_of("gemma3")
    tok = view.tokenizer
    assert tok("x")["input_ids"][0] == tok.bos_token_id and view.prompt(samples()[0]).startswith(tok.bos_token)
    q = view.encode(samples()[0]).input_ids
    assert q[0] == tok.bos_token_id and int((q == tok.bos_token_id).sum()) == 1


@pytest.mark.parametrize("key", KEYS)
def test_image_token_count_is_checked(key):
    view = view_of(key)
    for s in samples():
        e = view.encode(s)
        n_img = int((e.input_ids[: e.q_len] == view.image_token_id).sum())
        expected = view.expected_image_tokens(e.vision)
        assert expected is not None and n_img == expected > 0


def test_gemma3_image_token_is_the_soft_token_not_start_of_image():
    view = view_of("gemma3")
    tok = view.tokenizer
    assert view.image_token_id == tok.image_token_id == view.model.config.image_token_id != tok.boi_token_id
    assert view.expected_image_tokens(view.encode(samples()[0]).vision) == 4  # mm_tokens_per_image


# -- per-token outputs and attention ------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [k for k, f in FAMILIES.items() if f.per_token])
def test_per_token_outputs_are_padded_per_token_with_the_familys_meaning(key):
    view = view_of(key)
    encs = [view.encode(s) for s in samples()]
    batch = view.collate(encs)
    ids = batch["input_ids"]
    for k, spec in view.per_token.items():
        assert batch[k].shape == ids.shape, k
        for b, e in enumerate(encs):
            q, a = e.q_len, e.a_len
            assert batch[k][b, :q].tolist() == e.vision[k].tolist()
            want = ids[b, q: q + a] if spec.answer is None else torch.full((a,), spec.answer)
            assert batch[k][b, q: q + a].tolist() == want.tolist()
            assert (batch[k][b, q + a:] == spec.pad).all()


def test_paligemma_prefix_is_the_question_and_labels_the_answer():
    view = view_of("paligemma")
    encs = [view.encode(s) for s in samples()]
    batch = view.collate(encs)
    for b, e in enumerate(encs):
        tt, labels = batch["token_type_ids"][b], batch["labels"][b]
        assert (tt[: e.q_len] == 0).all() and (tt[e.q_len:] == 1).all()
        real = labels != -100
        assert real.sum() == e.a_len and torch.equal(labels[real], e.input_ids[e.q_len:])


def _body(view, batch):
    with torch.no_grad():
        return view.body(batch)


def _last_answer_changed(view, batch, b, e):
    """The batch with sample b's last answer token (its end of turn) replaced by another token."""
    out = {k: v.clone() for k, v in batch.items()}
    j = e.q_len + e.a_len - 1
    out["input_ids"][b, j] = e.input_ids[e.q_len]  # the first answer token instead
    if "labels" in out:
        out["labels"][b, j] = e.input_ids[e.q_len]
    return out


@pytest.mark.parametrize("key", KEYS)
def test_no_token_attends_forward_and_padding_changes_nothing(key):
    view = view_of(key)
    encs = [view.encode(s) for s in samples()]
    batch = view.collate(encs)
    z = _body(view, batch)
    for b, e in enumerate(encs):
        n = e.q_len + e.a_len
        alone = _body(view, view.collate([e]))[0]  # no padding at all
        torch.testing.assert_close(z[b, :n], alone, rtol=1e-4, atol=1e-5)
        z2 = _body(view, _last_answer_changed(view, batch, b, e))
        torch.testing.assert_close(z2[b, : n - 1], z[b, : n - 1], rtol=0, atol=1e-6)  # nothing before it moved
        assert not torch.allclose(z2[b, n - 1], z[b, n - 1])


def test_the_attention_check_catches_an_answer_in_paligemmas_prefix():
    """Control: marking the answer 0 (prefix, bidirectional) lets earlier answer tokens see the last one."""
    view = view_of("paligemma")
    encs = [view.encode(s) for s in samples()]
    batch = view.collate(encs)
    batch["token_type_ids"] = torch.zeros_like(batch["token_type_ids"])
    e = encs[0]
    z, z2 = _body(view, batch), _body(view, _last_answer_changed(view, batch, 0, e))
    assert not torch.allclose(z2[0, e.q_len: e.q_len + e.a_len - 1], z[0, e.q_len: e.q_len + e.a_len - 1])


# -- stages 1-3 ------------------------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def teacher() -> VLMView:
    model, proc = load_teacher()
    return VLMView(model.requires_grad_(False), proc, name="teacher")


TRAINS = {1: {"recal"}, 2: {"recal", "llm"}, 3: {"llm"}}  # what each stage moves; the teacher never


@pytest.mark.parametrize("key", KEYS)
def test_stages_1_to_3_one_step_each_at_batch_3(key):
    f = FAMILIES[key]
    model, proc = f.build(seed=0, d=f.width or 48, layers=2)  # a fresh student: it trains
    student, t = VLMView(model, proc, name=key), teacher()
    data = PairData([student.encode(s) for s in samples()], [t.encode(s) for s in samples()])
    torch.manual_seed(0)
    recal = Recalibrator(t.d, student.text_config)
    groups = {"recal": list(recal.parameters()), "llm": student_groups(student.model)["llm"],
              "teacher": list(t.model.parameters())}
    for stage, trains in TRAINS.items():
        before = {name: [p.detach().clone() for p in ps] for name, ps in groups.items()}
        hist = train_stage(stage, student, data, StageConfig(steps=1, batch_size=3, lr=1e-3), teacher=t,
                           recal=recal, progress=False)
        assert len(hist) == 1 and torch.isfinite(torch.tensor(hist[0]["loss"]))
        moved = {name for name, ps in groups.items() if any(not torch.equal(a, p) for a, p in zip(before[name], ps))}
        assert moved == trains, (stage, moved)


# -- stand-ins and loading from a directory ---------------------------------------------------------------------
def test_simple_processor_renders_like_qwen2vls_own_processor():
    """tiny.py's Qwen2-VL stand-in and Qwen2VLProcessor (without its video processor) give the same inputs."""
    from transformers import Qwen2VLProcessor
    from minigenrecal.models.families import build_tiny_vlm
    model, simple = build_tiny_vlm("qwen2vl")
    own = images_only(Qwen2VLProcessor)(image_processor=simple.image_processor, tokenizer=simple.tokenizer,
                                        chat_template=simple.chat_template)
    a, b = VLMView(model, simple), VLMView(model, own)
    for s in samples():
        ea, eb = a.encode(s), b.encode(s)
        assert ea.input_ids.tolist() == eb.input_ids.tolist() and ea.vision.keys() == eb.vision.keys()
        for k in ea.vision:
            torch.testing.assert_close(ea.vision[k], eb.vision[k], rtol=0, atol=0)
    assert type(own).__name__ == "Qwen2VLProcessor" and not hasattr(own, "video_processor")


@pytest.mark.parametrize("key", ["qwen2vl", "internvl", "gemma3", "mistral3"])
def test_a_saved_model_loads_from_its_directory_as_preset_student(key, tmp_path):
    """`--student DIR`: the preset carries the directory, and the model loads with its processor (or the stand-in
    where the family's processor needs torchvision) and renders exactly as before."""
    import json
    from minigenrecal.cli import build_parser
    from minigenrecal.models.presets import get_preset
    from minigenrecal.models.loading import load_student_only
    view = view_of(key)
    view.model.save_pretrained(tmp_path)
    if hasattr(view.processor, "save_pretrained"):
        view.processor.save_pretrained(tmp_path)
    else:  # what a real PixtralProcessor writes: tokenizer, image processor, patch size and merge
        view.processor.tokenizer.save_pretrained(tmp_path)
        view.processor.image_processor.save_pretrained(tmp_path)
        (tmp_path / "processor_config.json").write_text(json.dumps(
            {"processor_class": "PixtralProcessor", "patch_size": 8, "spatial_merge_size": 2, "image_token": "[IMG]"}))
    a = build_parser().parse_args(["train", "--student", str(tmp_path), "--preset", "tiny"])
    preset = get_preset(a.preset)
    assert (preset.name, preset.teacher, preset.student) == ("tiny", "tiny", str(tmp_path))
    loaded = load_student_only(preset, tiny_random=False)
    assert type(loaded.model).__name__ == FAMILIES[key].model_class
    for s in samples():
        e, e2 = view.encode(s), loaded.encode(s)
        assert e.input_ids.tolist() == e2.input_ids.tolist()
        for k in e.vision:
            torch.testing.assert_close(e.vision[k], e2.vision[k], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded.body(loaded.collate([e2])), view.body(view.collate([e])))


def test_teacher_and_student_options_override_the_preset_in_any_order():
    from minigenrecal.cli import build_parser
    from minigenrecal.models.presets import get_preset
    p = build_parser()
    for argv in (["demo", "--teacher", "org/big", "--preset", "smolvlm-256m<-qwen2-vl-2b", "--student", "dir/s"],
                 ["demo", "--preset", "smolvlm-256m<-qwen2-vl-2b", "--student", "dir/s", "--teacher", "org/big"]):
        preset = get_preset(p.parse_args(argv).preset)
        assert (preset.name, preset.teacher, preset.student) == ("smolvlm-256m<-qwen2-vl-2b", "org/big", "dir/s")
        assert preset.max_length == 2048  # the preset's other settings stay
    plain = get_preset(p.parse_args(["demo"]).preset)
    assert (plain.teacher, plain.student) == ("tiny", "tiny")


def test_tiny_random_builds_a_local_directorys_family(tmp_path):
    from minigenrecal.models.presets import get_preset
    from minigenrecal.models.tiny_pairs import build_tiny_pair, family_of
    view_of("paligemma").model.config.save_pretrained(tmp_path)
    assert family_of(str(tmp_path), "student") == "paligemma"
    assert family_of("google/gemma-3-4b-it", "teacher") == "gemma3"
    _, student = build_tiny_pair(get_preset("tiny", student=str(tmp_path)))
    assert type(student.model).__name__ == "PaliGemmaForConditionalGeneration"


def test_load_processor_without_a_stand_in_raises_the_original_error(tmp_path):
    """No stand-in for a family whose own processor always builds: transformers' own error comes through."""
    view_of("llava").model.config.save_pretrained(tmp_path)  # a config, and no processor files
    with pytest.raises((OSError, ValueError), match="(Can't load|Unrecognized)"):
        load_processor(str(tmp_path))


# -- the README's family table ------------------------------------------------------------------------------------
def test_readme_family_table_is_rendered_from_the_tested_families():
    table = markdown_table()
    assert [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")] == KEYS
    assert table in (ROOT / "README.md").read_text(), "regenerate it: python -m minigenrecal.models.families --markdown"


def test_demo_pair_takes_the_student_from_a_directory(tmp_path):
    from minigenrecal.models.presets import get_preset
    from minigenrecal.study.pipeline import load_pair
    view = view_of("gemma3")
    view.model.save_pretrained(tmp_path)
    view.processor.save_pretrained(tmp_path)
    teacher, student = load_pair(get_preset("tiny", student=str(tmp_path)))
    assert type(teacher.model).__name__ == "LlavaForConditionalGeneration"  # the preset's tiny teacher stays
    assert type(student.model).__name__ == "Gemma3ForConditionalGeneration"
