"""Every preset's pair, built at tiny size from the same model classes, runs one step of each stage;
the InternVL2.5 remote-code adapter matches the native InternVL model it is stood in by."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

from minigenrecal.models.presets import PRESETS, get_preset
from minigenrecal.data.synthetic import make_split
from minigenrecal.models.hub import InternVLChatAdapter, InternVLTileProcessor, is_remote_internvl
from minigenrecal.models.tiny_pairs import build_tiny_pair, family_of
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.loop import PairData, train_stage
from minigenrecal.stages import StageConfig, student_groups
from minigenrecal.models.families import build_tiny_vlm
from minigenrecal.models.vlm import VLMView

torch.set_num_threads(1)
EXPECTED = {"tiny": ("llava", "idefics3"), "smolvlm-256m<-qwen2-vl-2b": ("qwen2vl", "idefics3"),
            "qwen2-vl-7b<-qwen2-vl-72b": ("qwen2vl", "qwen2vl"), "internvl2.5-8b<-internvl2.5-78b": ("internvl", "internvl"),
            "qwen2-vl-7b<-internvl2.5-78b": ("internvl", "qwen2vl")}


def test_preset_table():
    assert set(PRESETS) == set(EXPECTED)
    for name, (ft, fs) in EXPECTED.items():
        p = get_preset(name)
        assert (family_of(p.teacher, "teacher"), family_of(p.student, "student")) == (ft, fs)
        assert p.remote_code == ("internvl" in (ft, fs))
        for st in p.stages().values():
            assert st.lr > st.lr_end > 0 and st.batch_size >= 1 and st.grad_accum >= 1
        if name != "tiny":
            assert p.accelerate_config and p.dtype == "bfloat16"
    assert is_remote_internvl("OpenGVLab/InternVL2_5-8B") and not is_remote_internvl("Qwen/Qwen2-VL-7B-Instruct")


def _snap(params):
    return [p.detach().clone() for p in params]


def _changed(before, params):
    return [not torch.equal(a, b) for a, b in zip(before, params)]


def run_three_stages(teacher: VLMView, student: VLMView, n: int = 4):
    samples = make_split(0, "train", n)
    data = PairData([student.encode(s) for s in samples], [teacher.encode(s) for s in samples])
    torch.manual_seed(0)
    recal = Recalibrator(teacher.d, student.text_config)
    llm = student_groups(student.model)["llm"]
    teacher_before = _snap(teacher.model.parameters())
    for stage in (1, 2, 3):
        r0, s0 = _snap(recal.parameters()), _snap(llm)
        cfg = StageConfig(steps=1, batch_size=2, lr=1e-3, chunk_size=3 if stage == 2 else None)
        hist = train_stage(stage, student, data, cfg, teacher=teacher, recal=recal, progress=False)
        assert len(hist) == 1 and torch.isfinite(torch.tensor(hist[0]["loss"]))
        keys = {1: {"ce_main", "kl_main", "ce_reg", "kl_reg"}, 2: {"ce_main", "kl_main", "ce_reg", "kl_reg", "ce_student"},
                3: {"ce_student"}}[stage]
        assert keys <= hist[0].keys()
        assert all(_changed(r0, recal.parameters())) == (stage in (1, 2))
        assert any(_changed(s0, llm)) == (stage in (2, 3))
    assert not any(_changed(teacher_before, teacher.model.parameters()))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_preset_pair_tiny_three_stages(name):
    teacher, student = build_tiny_pair(get_preset(name), d_l=96, d_s=48)
    ft, fs = EXPECTED[name]
    assert (teacher.d, student.d) == (64 if ft == "qwen2vl" else 96, 64 if fs == "qwen2vl" else 48)
    assert type(teacher.model).__name__.lower().startswith(EXPECTED[name][0][:5])
    run_three_stages(teacher, student)


# -- the remote-code InternVL2.5 adapter, against a stand-in with the remote model's attribute layout ------
class RemoteLayoutInternVL(nn.Module):
    """The remote InternVLChatModel's layout (vision_model, mlp1, language_model, extract_feature,
    num_image_token, config.llm_config), built from a native InternVL model's own modules (shared weights)."""

    def __init__(self, native):
        super().__init__()
        from transformers import Qwen2ForCausalLM
        self.vision_model = native.model.vision_tower
        self.mlp1 = native.model.multi_modal_projector
        with torch.device("meta"):
            lm = Qwen2ForCausalLM(native.config.text_config)
        lm.model, lm.lm_head = native.model.language_model, native.lm_head
        self.language_model = lm
        self._native = [native]  # not a submodule: its weights are the ones above
        self.config = SimpleNamespace(llm_config=native.config.text_config, model_type="internvl_chat")
        self.generation_config = native.generation_config
        self.num_image_token = 4

    def extract_feature(self, pixel_values):
        return self._native[0].model.get_image_features(pixel_values=pixel_values, return_dict=True).pooler_output


def _adapted(seed, d, tiles=False):
    native, proc = build_tiny_vlm("internvl", seed=seed, d=d)
    ip = proc.image_processor
    if tiles:
        from transformers import GotOcr2ImageProcessorPil
        ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=True, min_patches=1,
                                      max_patches=4)
    tp = InternVLTileProcessor(proc.tokenizer, ip, image_seq_length=4)
    chat = RemoteLayoutInternVL(native)
    return native, proc, InternVLChatAdapter(chat, proc.image_token_id), tp


def test_internvl_adapter_equals_native():
    native, proc, adapter, tp = _adapted(0, 32)
    nv, av = VLMView(native, proc, name="native"), VLMView(adapter, tp, name="remote")
    samples = make_split(0, "train", 3)
    en, ea = [nv.encode(s) for s in samples], [av.encode(s) for s in samples]
    assert [e.input_ids.tolist() for e in en] == [e.input_ids.tolist() for e in ea]
    bn, ba = nv.collate(en), av.collate(ea)
    torch.testing.assert_close(av.body(ba), nv.body(bn), rtol=0, atol=0)
    assert av.head is native.lm_head and av.text_config is native.config.text_config
    groups = {k: len(v) for k, v in student_groups(adapter).items()}
    assert groups == {k: len(v) for k, v in student_groups(native).items()} and all(groups.values())


def test_internvl_adapter_tiles():
    """With dynamic tiling, <IMG_CONTEXT> is repeated 4 x tiles, and the body splices every tile's features."""
    native, proc, adapter, tp = _adapted(0, 32, tiles=True)
    view = VLMView(adapter, tp, name="remote")
    s = make_split(0, "train", 1)[0]  # a 64-px image -> 2 x 2 tiles of 32 px + a thumbnail
    enc = view.encode(s)
    tiles = enc.vision["pixel_values"].shape[0]
    assert tiles == 5 and int((enc.input_ids == proc.image_token_id).sum()) == 4 * tiles
    z = view.body(view.collate([enc]))
    assert z.shape == (1, len(enc.input_ids), 32) and torch.isfinite(z).all()


def test_internvl_remote_pair_three_stages():
    _, _, t_adapter, t_proc = _adapted(1, 64)
    _, _, s_adapter, s_proc = _adapted(0, 32)
    t_adapter.requires_grad_(False)
    run_three_stages(VLMView(t_adapter, t_proc, name="teacher"), VLMView(s_adapter, s_proc, name="student"))
