"""Every preset's pair, built at tiny size from the same model classes, runs one step of each stage;
the InternVL2.5 remote-code adapter matches the native InternVL model it is stood in by."""
from dataclasses import replace
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


# -- what a real launch needs from the presets and the hub loading (docs/scaling.md, "8-GPU checklist") ------
def test_internvl_saved_student_reloads_with_its_own_class(tmp_path):
    """A launch saves the InternVL2.5 student through the adapter: the keys are InternVLChatModel's own, so the
    family's class loads every one of them (none missing, none unexpected), and the tiling processor comes back."""
    from safetensors.torch import load_file, save_file
    from minigenrecal.loop import AccelerateBackend
    from minigenrecal.models.hub import TILE_PROCESSOR_FILE
    from minigenrecal.scale.launch import save_outputs
    from minigenrecal.stages import GenRecal

    def save_pretrained(self, path, state_dict=None, **_):  # what PreTrainedModel.save_pretrained writes: the keys
        path.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        save_file({k: v.detach().clone().contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))

    _, _, adapter, tp = _adapted(0, 32, tiles=True)
    type(adapter.chat).save_pretrained = save_pretrained
    student = VLMView(adapter, tp, name="student")
    recal = Recalibrator(64, student.text_config)
    module = GenRecal(student, recal, None)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5)  # "trained" weights, unlike any fresh build
    save_outputs(AccelerateBackend(), module, student, recal, tmp_path, True)
    saved = load_file(str(tmp_path / "student" / "model.safetensors"))
    _, _, fresh, _ = _adapted(1, 32)
    missing, unexpected = fresh.chat.load_state_dict(saved, strict=False)
    assert (missing, unexpected) == ([], []) and len(saved) == len(fresh.chat.state_dict())
    for k, v in fresh.chat.state_dict().items():
        torch.testing.assert_close(v, adapter.chat.state_dict()[k], rtol=0, atol=0)
    assert (tmp_path / "student" / TILE_PROCESSOR_FILE).is_file()
    back = InternVLTileProcessor.from_saved(tmp_path / "student", tp.tokenizer)
    s = make_split(0, "train", 1)[0]
    assert VLMView(adapter, back).encode(s).input_ids.tolist() == student.encode(s).input_ids.tolist()
    with pytest.raises(ValueError, match="not the chat model's"):
        adapter.chat_state_dict({"recal.proj_pre.weight": torch.zeros(1)})


def test_paper_global_batches_on_any_world_size():
    """The cluster presets train at the paper's global batches 8,192 / 4,096 / 8,192 (batch x accum x processes)."""
    for name, p in PRESETS.items():
        if p.accelerate_config != "configs/zero3.yaml":
            continue
        for world in (8, 16, 32, 128):
            cfgs = p.stage_configs(world)
            assert [c.batch_size * c.grad_accum * world for c in cfgs.values()] == [8192, 4096, 8192], (name, world)
        # the per-GPU numbers as written are the paper's on its 128 GPUs
        assert [c.batch_size * c.grad_accum * 128 for c in p.stages().values()] == [8192, 4096, 8192], name
        assert p.stage_configs(8, grad_accum=2)[2].grad_accum == 2  # an explicit accumulation wins
        assert p.stage_configs(8, batch_size=2)[2].grad_accum == 4096 // 16
        with pytest.raises(ValueError, match="stage 1's global batch 8192 is not a multiple of batch_size 8 x 3"):
            p.stage_configs(3)
    tiny = get_preset("tiny")
    assert tiny.stage_configs(8) == tiny.stages()  # no global batch: the table as written


def _stand_in_hub(monkeypatch, attn_impl="eager"):
    """transformers' AutoModel / AutoTokenizer replaced by the stand-in InternVL (its LLM built with `attn_impl`);
    returns the keywords each was called with."""
    import copy
    import transformers
    native, proc = build_tiny_vlm("internvl", seed=0, d=32)
    native.config.text_config._attn_implementation = attn_impl
    chat = RemoteLayoutInternVL(native)
    calls = {}

    calls["chat"] = chat

    def model_from_pretrained(name, **kw):
        calls["model"] = kw
        return chat

    def tok_from_pretrained(name, **kw):
        calls["tokenizer"] = kw
        return copy.deepcopy(proc.tokenizer)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", model_from_pretrained)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_from_pretrained)
    return calls


def test_remote_code_loads_pinned_and_off_eager_attention(monkeypatch):
    """A remote-code hub id needs a pinned revision, which reaches every from_pretrained; the loaded LLM runs SDPA
    where InternVL's remote code would leave it eager, and flash-attn is asked for where it is installed."""
    from minigenrecal.models.hub import load_hub_vlm
    calls = _stand_in_hub(monkeypatch)
    with pytest.raises(ValueError, match="pin the commit"):
        load_hub_vlm("OpenGVLab/InternVL2_5-8B", "float32", remote_code=True, attn="sdpa")
    adapter, proc = load_hub_vlm("OpenGVLab/InternVL2_5-8B", "float32", remote_code=True, attn="sdpa", revision="0123abc")
    assert calls["model"]["revision"] == calls["tokenizer"]["revision"] == "0123abc"
    assert calls["model"]["use_flash_attn"] is True and calls["model"]["trust_remote_code"] is True
    assert adapter.chat.language_model.config._attn_implementation == "sdpa"
    assert isinstance(proc, InternVLTileProcessor)


def test_real_presets_load_with_sdpa_and_activation_checkpointing(tmp_path):
    """The real presets' loading defaults reach the model (the memory they save shows on a GPU only)."""
    from minigenrecal.models.loading import load_student_only
    native, proc = build_tiny_vlm("llava", seed=0, d=32)
    native.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    for name, p in PRESETS.items():
        if name != "tiny":
            assert p.attn == "sdpa" and p.checkpointing, name
    preset = get_preset("smolvlm-256m<-qwen2-vl-2b", student=str(tmp_path), attn="eager")
    loaded = load_student_only(preset, tiny_random=False)
    assert loaded.text_config._attn_implementation == "eager"  # the preset's choice reaches the build
    loaded = load_student_only(replace(preset, attn="sdpa"), tiny_random=False)
    assert loaded.text_config._attn_implementation == "sdpa" and loaded.model.is_gradient_checkpointing


@pytest.mark.parametrize("internvl", [False, True])
def test_activation_checkpointing_keeps_loss_and_gradients(internvl):
    """Checkpointed layers recompute the same forward: the student's loss and every gradient are bit-identical."""
    from minigenrecal.models.loading import checkpoint_activations

    def loss_and_grads(checkpointed):
        if internvl:
            _, _, model, p = _adapted(0, 32)
        else:
            model, p = build_tiny_vlm("llava", seed=0, d=32)
        names = checkpoint_activations(model) if checkpointed else []
        view = VLMView(model, p)
        model.train()
        batch = view.collate([view.encode(s) for s in make_split(0, "train", 2)])
        loss = view.student_ce(view.body(batch), batch)
        loss.backward()
        return names, loss.detach(), {n: q.grad for n, q in model.named_parameters() if q.grad is not None}
    names, loss, grads = loss_and_grads(True)
    _, loss0, grads0 = loss_and_grads(False)
    assert names and all(".language_model" in n or n.startswith("model") for n in names)
    assert loss == loss0 and grads.keys() == grads0.keys() and len(grads) > 0
    for n in grads:
        torch.testing.assert_close(grads[n], grads0[n], rtol=0, atol=0)


def test_internvl_adapter_builds_no_kv_cache():
    _, _, adapter, tp = _adapted(0, 32)
    view = VLMView(adapter, tp)
    caches = []
    adapter.chat.language_model.model.register_forward_hook(lambda m, a, out: caches.append(out.get("cache")))
    with torch.no_grad():
        view.body(view.collate([view.encode(s) for s in make_split(0, "train", 2)]))
    assert caches == [None]


class _Rope(nn.Module):
    """InternLM2's rotary embedding as transformers 5 leaves it: tables not in the checkpoint, never initialised."""

    def __init__(self):
        super().__init__()
        self.register_buffer("inv_freq", torch.full((4,), float("nan")), persistent=False)

    def _init_rope(self):
        self.inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))


class _ListTied(nn.Module):
    _tied_weights_keys = ["output.weight"]  # transformers 4's form, as InternLM2ForCausalLM has it

    def __init__(self, tied: bool):
        super().__init__()
        self.config = SimpleNamespace(tie_word_embeddings=tied)


def test_remote_code_written_for_transformers_4_loads_on_transformers_5(monkeypatch):
    """What InternVL2.5's remote code needs on transformers 5 (benchmarks/check_internvl_remote_code.py found each on
    tiny models built from it): a generation_config where a second load of the class gets none, InternLM2's rotary
    tables rebuilt (they load uninitialised), a list `_tied_weights_keys` made the dict transformers 5 saves with."""
    import copy
    from minigenrecal.models.hub import load_hub_vlm
    calls = _stand_in_hub(monkeypatch, "sdpa")
    chat = calls["chat"]
    chat.generation_config = None
    chat.language_model.rope = _Rope()
    chat.tied = _ListTied(tied=False)
    adapter, proc = load_hub_vlm("OpenGVLab/InternVL2_5-8B", "float32", remote_code=True, attn="sdpa", revision="0123abc")
    assert adapter.generation_config.eos_token_id == proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    torch.testing.assert_close(chat.language_model.rope.inv_freq, torch.tensor([1.0, 0.1, 0.01, 0.001]))
    assert chat.tied._tied_weights_keys == {} and _ListTied._tied_weights_keys == ["output.weight"]
    assert copy.deepcopy(adapter.config).get_text_config() is not None  # no endless __getattr__ recursion
    chat.tied = _ListTied(tied=True)
    with pytest.raises(ValueError, match="ties its embeddings"):
        load_hub_vlm("OpenGVLab/InternVL2_5-8B", "float32", remote_code=True, attn="sdpa", revision="0123abc")
