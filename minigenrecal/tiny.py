"""The offline tiny pair: a Llava teacher and an Idefics3 student that differ in every way GenRecal cares about.

|                | teacher (large, l)            | student (small, s)                 |
|----------------|-------------------------------|------------------------------------|
| model class    | LlavaForConditionalGeneration | Idefics3ForConditionalGeneration   |
| tokenizer      | byte-level BPE, 384 tokens    | Unigram, 165 tokens (trainer stops there) |
| chat template  | ChatML (<|im_start|> ...)     | Idefics3 ("User:...<end_of_utterance>") |
| image pipeline | CLIP, 64 px, 32-px patches    | SigLIP, 48 px, 8-px patches, pixel shuffle x2 |
| image tokens   | 4 (one per grid cell)         | 9 (+3 wrapper tokens)              |
| hidden size    | d_l = 192                     | d_s = 96                           |

The teacher is shipped as a small checkpoint in `data_samples/tiny_teacher` (made by
`python -m minigenrecal make-teacher`; the one for the posterior task in `data_samples/tiny_teacher_posterior`,
`load_teacher(TEACHER_POSTERIOR_DIR)`); the student is random-initialised from a seed, as "untrained".
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, Idefics3Config, Idefics3ForConditionalGeneration,
                          Idefics3ImageProcessorPil, Idefics3Processor, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

from .data import text_corpus

ROOT = Path(__file__).resolve().parent.parent
TEACHER_DIR = ROOT / "data_samples" / "tiny_teacher"
TEACHER_POSTERIOR_DIR = ROOT / "data_samples" / "tiny_teacher_posterior"  # trained on make_split(task="posterior")

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
          "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
          "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IDEFICS3 = ("<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
            "{% if m['content'] is string %}{{ ' ' + m['content'] }}{% else %}{% for c in m['content'] %}"
            "{% if c['type'] == 'image' %}<image>{% elif m['role'] == 'assistant' %}{{ ' ' + c['text'] }}"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")


def train_tokenizer(kind: str, vocab_size: int, special: list[str], chat_template: str, eos: str, pad: str) -> PreTrainedTokenizerFast:
    """Train a tokenizer on the synthetic task's text in ~20 ms; `kind` is 'bpe' or 'unigram'."""
    corpus = text_corpus() + ["user\nassistant\nUser:Assistant: \n"] * 50
    if kind == "bpe":
        tk = Tokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        tr = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif kind == "unigram":
        tk = Tokenizer(models.Unigram())
        tk.normalizer = normalizers.NFKC()
        tk.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tk.decoder = decoders.Metaspace(prepend_scheme="first")
        tr = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>",
                                     initial_alphabet=[chr(c) for c in range(32, 127)] + ["\n"])
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    tk.train_from_iterator(corpus, tr)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, pad_token=pad,
                                  unk_token="<unk>" if "<unk>" in special else None)
    tok.chat_template = chat_template
    return tok


def teacher_processor() -> LlavaProcessor:
    tok = train_tokenizer("bpe", 384, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], CHATML,
                          eos="<|im_end|>", pad="<|endoftext|>")
    ip = CLIPImageProcessorPil(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=32, vision_feature_select_strategy="default",
                          chat_template=CHATML, num_additional_image_tokens=1)


STUDENT_TOKENIZER = ROOT / "data_samples" / "tiny_student_tokenizer.json"


def student_tokenizer(retrain: bool = False) -> PreTrainedTokenizerFast:
    """The student's Unigram tokenizer, read from the shipped file. Unigram training is not deterministic (the
    same corpus gives the same pieces but ids and scores that differ from run to run), so the kit trains it once
    (`retrain=True`, which rewrites the file) and every student built from a seed then has the same vocabulary."""
    special = ["<unk>", "<|im_start|>", "<pad>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
               "<global-img>"]
    if retrain or not STUDENT_TOKENIZER.exists():
        tok = train_tokenizer("unigram", 256, special, IDEFICS3, eos="<end_of_utterance>", pad="<pad>")
        tok.backend_tokenizer.save(str(STUDENT_TOKENIZER))
    tok = PreTrainedTokenizerFast(tokenizer_file=str(STUDENT_TOKENIZER), eos_token="<end_of_utterance>",
                                  pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = IDEFICS3
    return tok


def student_processor() -> Idefics3Processor:
    tok = student_tokenizer()
    ip = Idefics3ImageProcessorPil(do_image_splitting=False, size={"longest_edge": 48},
                                   max_image_size={"longest_edge": 48})
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=9, chat_template=IDEFICS3)


def teacher_config(tok) -> LlavaConfig:
    text = LlamaConfig(vocab_size=len(tok), hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    vision = CLIPVisionConfig(hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                              image_size=64, patch_size=32, projection_dim=96)
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-1, vision_feature_select_strategy="default", projector_hidden_act="gelu")


def student_config(tok) -> Idefics3Config:
    text = LlamaConfig(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    vision = dict(hidden_size=48, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=48, patch_size=8)
    return Idefics3Config(vision_config=vision, text_config=text.to_dict(), scale_factor=2,
                          image_token_id=tok.convert_tokens_to_ids("<image>"), pad_token_id=tok.pad_token_id)


def _finish(model, tok):
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def build_teacher(seed: int = 0):
    """A fresh random-init teacher and its processor (used by `make-teacher`)."""
    proc = teacher_processor()
    torch.manual_seed(seed)
    return _finish(LlavaForConditionalGeneration(teacher_config(proc.tokenizer)), proc.tokenizer), proc


def build_student(seed: int = 0):
    """The random-init ("untrained") tiny student and its processor; same seed, same weights."""
    proc = student_processor()
    torch.manual_seed(seed)
    return _finish(Idefics3ForConditionalGeneration(student_config(proc.tokenizer)), proc.tokenizer), proc


def load_teacher(path: str | Path = TEACHER_DIR):
    """The shipped, trained tiny teacher (offline)."""
    path = Path(path)
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no tiny teacher at {path}; build it with `python -m minigenrecal make-teacher`")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
        proc = LlavaProcessor.from_pretrained(path)
    return model.eval(), proc


def _manifest(threads: int) -> dict:
    """What a rebuild needs to match: thread count, CPU kernels, package versions and the code's git commit."""
    import importlib.metadata as md
    import platform
    import subprocess

    versions = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "accelerate", "numpy", "pillow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    git = lambda *args: subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    try:
        commit = git("rev-parse", "HEAD").stdout.strip() or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", "minigenrecal").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    cpu = torch.backends.cpu.get_cpu_capability()  # the kernels' instruction set: it also changes the exact floats
    return {"threads": threads, "cpu_capability": cpu, "versions": versions, "git_commit": commit,
            "package_code_modified": dirty}


def weights_digest(model) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) in state-dict order: equal iff bit-identical."""
    import hashlib

    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def posterior_report(view, train: list, n_test: int = 500, data_seed: int = 0) -> dict:
    """Task 'posterior': the model vs the prior (image-blind) and the Bayes-optimal predictor (the posterior itself)
    on `n_test` test items: `metrics.posterior_scores` plus greedy exact match against the most likely answer."""
    from dataclasses import replace

    from .data import make_split
    from .evaluate import exact_match
    from .metrics import posterior_metrics, prior_dists, true_posterior

    test = make_split(data_seed, "test", n_test, task="posterior")
    mode = [replace(s, answer=max(s.posterior, key=s.posterior.get)) for s in test]
    out = {"model": posterior_metrics(view, test), "prior": posterior_metrics(None, test, prior_dists(train, test)),
           "bayes_optimal": posterior_metrics(None, test, [true_posterior(s) for s in test])}
    out["model"]["exact_match_mode"] = exact_match(view, mode)["accuracy"]
    out["model"]["exact_match_label"] = exact_match(view, test)["accuracy"]
    return out


def seed_everything(seed: int) -> None:
    """Seed every RNG a build touches (Python, NumPy, torch); the thread count is fixed by `fixed_threads`."""
    import os
    import random

    import numpy as np

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def fixed_threads(threads: int):
    """Run with `threads` torch threads (they set the reduction order, hence the exact floats), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_teacher(out: str | Path = TEACHER_DIR, steps: int = 3000, n_train: int = 20000, batch_size: int = 32,
                  lr: float = 7e-4, lr_end: float = 5e-5, warmup: int = 200, vision_lr_scale: float = 0.3,
                  seed: int = 0, n_val: int = 500, n_test: int = 500, threads: int = 1, task: str = "shapes",
                  log=print) -> dict:
    """Train the tiny teacher with its own CE on the synthetic train split and save it (fp16 weights, < 10 MB).

    This is what `python -m minigenrecal make-teacher` runs. The same arguments and thread count give bit-identical
    weights (`weights_sha256`, over the fp32 weights before the fp16 save); the arguments, the thread count,
    package versions, git commit, and val/test exact match (data seed 0) are saved beside the weights.
    `task` is 'shapes' (the synthetic task) or 'posterior' (blended colours, labels sampled from a known posterior).
    """
    import json
    import time

    from .data import make_split
    from .evaluate import exact_match
    from .stages import PairData, StageConfig, train_stage
    from .vlm import VLMView

    t0, cpu0 = time.time(), time.process_time()
    with fixed_threads(threads):
        seed_everything(seed)
        model, proc = build_teacher(seed)
        view = VLMView(model, proc, name="teacher")
        train = make_split(seed, "train", n_train, task=task)
        data = PairData([view.encode(s) for s in train])
        cfg = StageConfig(steps=steps, batch_size=batch_size, lr=lr, lr_end=lr_end, seed=seed, train_vision=True,
                          warmup_steps=warmup, vision_lr_scale=vision_lr_scale)
        hist = train_stage(3, view, data, cfg, progress=False)
        digest = weights_digest(model)
        val = exact_match(view, make_split(0, "val", n_val, task=task))["accuracy"]
        test = exact_match(view, make_split(0, "test", n_test, task=task))["accuracy"]
        extra = {"posterior_test": posterior_report(view, train, n_test)} if task == "posterior" else {}
    log(f"teacher ({task}) exact match: val {val:.3f}, test {test:.3f} after {steps} steps "
        f"(final loss {hist[-1]['loss']:.4f}, {time.time() - t0:.0f} s on {threads} thread(s))")
    out = Path(out)
    model.half().save_pretrained(out)
    proc.save_pretrained(out)
    model.float()
    where = out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    command = (f"python -m minigenrecal make-teacher --out {where} --steps {steps} --n-train {n_train} "
               f"--seed {seed} --threads {threads}" + (f" --task {task}" if task != "shapes" else ""))
    info = {"command": command, "task": task, "val_accuracy": val, "test_accuracy": test,
            "eval": f"exact match on {n_val} val and {n_test} test items of data seed 0, before the fp16 save",
            "steps": steps, "n_train": n_train, "batch_size": batch_size, "lr": lr, "lr_end": lr_end,
            "warmup": warmup, "vision_lr_scale": vision_lr_scale, "seed": seed, "final_loss": hist[-1]["loss"],
            "weights_sha256": digest, "seconds": round(time.time() - t0, 1),
            "cpu_seconds": round(time.process_time() - cpu0, 1), **_manifest(threads), **extra}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


# -- tiny random-init instances of other VLM families (for tests and preset smoke runs) -------------------
CHATML_QWEN = CHATML.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")
CHATML_INTERNVL = CHATML.replace("<image>\n", "<img><IMG_CONTEXT></img>\n")


def build_tiny_vlm(family: str, seed: int = 0, d: int = 64, layers: int = 2):
    """A random-init tiny VLM of `family` ('llava', 'idefics3', 'qwen2vl', 'internvl') and its processor."""
    from transformers import (GotOcr2ImageProcessorPil, InternVLConfig, InternVLForConditionalGeneration,
                              Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil)

    from .vlm import SimpleProcessor
    torch.manual_seed(seed)
    if family == "llava":
        proc = teacher_processor()
        cfg = teacher_config(proc.tokenizer)
        cfg.text_config.update(dict(hidden_size=d, num_hidden_layers=layers, intermediate_size=2 * d))
        return _finish(LlavaForConditionalGeneration(cfg), proc.tokenizer), proc
    if family == "idefics3":
        proc = student_processor()
        cfg = student_config(proc.tokenizer)
        cfg.text_config.update(dict(hidden_size=d, num_hidden_layers=layers, intermediate_size=2 * d))
        return _finish(Idefics3ForConditionalGeneration(cfg), proc.tokenizer), proc
    text = dict(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None)
    if family == "qwen2vl":
        tok = train_tokenizer("bpe", 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                           "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"], CHATML_QWEN,
                              eos="<|im_end|>", pad="<|endoftext|>")
        ip = Qwen2VLImageProcessorPil(patch_size=8, merge_size=2, temporal_patch_size=2,
                                      min_pixels=32 * 32, max_pixels=32 * 32)
        proc = SimpleProcessor(tok, ip, "qwen2vl", "<|image_pad|>")
        ids = {k: tok.convert_tokens_to_ids(v) for k, v in [("image_token_id", "<|image_pad|>"),
               ("video_token_id", "<|video_pad|>"), ("vision_start_token_id", "<|vision_start|>"),
               ("vision_end_token_id", "<|vision_end|>")]}
        cfg = Qwen2VLConfig(text_config=dict(vocab_size=len(tok), **text, eos_token_id=tok.eos_token_id,
                                             rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                              "rope_theta": 10000.0}),
                            vision_config=dict(depth=2, embed_dim=32, hidden_size=d, num_heads=4, patch_size=8,
                                               spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                                               mlp_ratio=2),
                            **ids)
        return _finish(Qwen2VLForConditionalGeneration(cfg), tok), proc
    if family == "internvl":
        tok = train_tokenizer("bpe", 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                                           "<IMG_CONTEXT>"], CHATML_INTERNVL, eos="<|im_end|>", pad="<|endoftext|>")
        ip = GotOcr2ImageProcessorPil(size={"height": 32, "width": 32}, crop_to_patches=False)
        proc = SimpleProcessor(tok, ip, "internvl", "<IMG_CONTEXT>", image_seq_length=4)
        cfg = InternVLConfig(text_config=dict(model_type="qwen2", vocab_size=len(tok), **text,
                                                         eos_token_id=tok.eos_token_id),
                             vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, image_size=[32, 32], patch_size=[8, 8]),
                             image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), downsample_ratio=0.5,
                             projector_hidden_act="gelu", vision_feature_layer=-1)
        return _finish(InternVLForConditionalGeneration(cfg), tok), proc
    raise ValueError(f"unknown family {family!r}")
