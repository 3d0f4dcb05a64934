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
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from minigenrecal.data.synthetic import text_corpus

ROOT = Path(__file__).resolve().parents[2]
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
