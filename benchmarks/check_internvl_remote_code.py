"""Does InternVL2.5's remote modeling code build and run on the installed transformers, through minigenrecal's hub
loading? Fully offline, on tiny random-init models.

    python benchmarks/check_internvl_remote_code.py --code DIR [--stub-missing] [--json OUT]

DIR holds InternVL's remote-code files as a hub snapshot has them: configuration_internvl_chat.py,
modeling_internvl_chat.py, configuration_intern_vit.py, modeling_intern_vit.py, conversation.py and, for the 8B,
configuration_internlm2.py and modeling_internlm2.py (pass the snapshot of the revision a preset pins).

Two variants: InternLM2 as the LLM (as InternVL2.5-8B) and Qwen2 (as the 78B). Each is a tiny InternVLChatModel
built from DIR's classes (a 2-layer ViT on 448-px tiles of 14-px patches, a 2-layer LLM, the 8B's / 78B's ViT and
RoPE settings), written with a tiny tokenizer to a temporary directory laid out as a hub snapshot, then loaded by
`hub.load_hub_vlm(dir, remote_code=True, attn="sdpa")` as a launch loads a hub checkpoint. Checks, each printed
PASS or FAIL with the error:
  a1. the classes import and the model builds on this transformers;
  a2. `load_hub_vlm` returns an `InternVLChatAdapter` whose weights and buffers are the ones written;
  a3. the same, loading the same checkpoint a second time in the process (`hub.for_transformers5` gives each
      load what the remote code, written for transformers 4, lacks on transformers 5);
  b. `VLMView.body` on two rendered samples (the kit's `InternVLTileProcessor`: 1 tile, and 2 x 1 tiles + a
     thumbnail) gives finite (B, T, d) features and builds no KV cache; head(body) equals the remote forward's logits;
  c. the LLM runs the attention the kit expects: sdpa for Qwen2; InternLM2's remote code has only eager and
     flash_attention_2, so flash_attention_2 where flash-attn is installed, else eager;
  d. `loading.checkpoint_activations` keeps the stage-3 loss and every gradient bit-identical, and the LLM layers
     are recomputed in the backward;
  e. the adapter's `save_pretrained` (a launch's state dict, keys renamed) reloads with
     `AutoModel.from_pretrained(dir, trust_remote_code=True)`: no key missing, none unexpected, the same values;
  f. `VLMView.generate` (the remote `generate`) answers.
A failed a1, a2 or a3 skips the later checks of its variant. `--stub-missing` stands in for packages the remote code
imports but these configs never use (timm, for DropPath at drop_path_rate > 0; peft, for LoRA) where they are not
installed; without it their absence fails a1, as it does on a machine without them. Exit status 0 if all pass.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import traceback
import types
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator
from unittest import mock

os.environ["HF_HUB_OFFLINE"] = "1"
if "HF_MODULES_CACHE" not in os.environ:  # transformers copies the remote code here: a fresh folder, removed at exit
    os.environ["HF_MODULES_CACHE"] = tempfile.mkdtemp(prefix="hf_modules_")
    atexit.register(shutil.rmtree, os.environ["HF_MODULES_CACHE"], True)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import AutoConfig, AutoModel  # noqa: E402
from transformers.dynamic_module_utils import get_class_from_dynamic_module  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minigenrecal.data.synthetic import Sample, make_split  # noqa: E402
from minigenrecal.models.families import CHATML_INTERNVL  # noqa: E402
from minigenrecal.models.hub import InternVLChatAdapter, load_hub_vlm  # noqa: E402
from minigenrecal.models.loading import checkpoint_activations  # noqa: E402
from minigenrecal.models.tiny import train_tokenizer  # noqa: E402
from minigenrecal.models.vlm import VLMView  # noqa: E402
from minigenrecal.stages import set_trainable  # noqa: E402

Report = Callable[[str, bool, str], None]
LLM_ARCH = {"internlm2": "InternLM2ForCausalLM", "qwen2": "Qwen2ForCausalLM"}
VIT = {  # InternViT-300M (the 8B's) and InternViT-6B (the 78B's) layouts
    "internlm2": dict(qkv_bias=True, qk_normalization=False, norm_type="layer_norm"),
    "qwen2": dict(qkv_bias=False, qk_normalization=True, norm_type="rms_norm"),
}
INTERNLM2 = dict(bias=False, attn_implementation="eager", rope_scaling={"type": "dynamic", "factor": 2.0},
                 auto_map={"AutoConfig": "configuration_internlm2.InternLM2Config",
                           "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                           "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"})
CHAT_AUTO_MAP = {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                 "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                 "AutoModelForCausalLM": "modeling_internvl_chat.InternVLChatModel"}


def stand_in_missing() -> list[str]:
    """Inert modules for timm (DropPath) and peft (LoraConfig, get_peft_model) where they are not installed;
    calling anything in them raises. Returns the packages stood in for."""
    def unused(name: str) -> Callable:
        def fail(*_, **__):
            raise RuntimeError(f"{name} is a stand-in (--stub-missing): this config must not use it")
        return fail

    stood = []
    for pkg, names in {"timm.models.layers": ["DropPath"], "peft": ["LoraConfig", "get_peft_model"]}.items():
        parts = pkg.split(".")
        if importlib.util.find_spec(parts[0]) is not None:
            continue
        for i in range(len(parts)):
            name = ".".join(parts[:i + 1])
            mod = sys.modules.setdefault(name, types.ModuleType(name))
            mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=i < len(parts) - 1)
        for n in names:
            setattr(sys.modules[pkg], n, unused(f"{parts[0]}.{n}"))
        stood.append(parts[0])
    return stood


def write_tiny_checkpoint(code: Path, out: Path, llm: str) -> nn.Module:
    """Code files, config.json, random weights and a tiny tokenizer in `out`, laid out as a hub snapshot; returns
    the model written (built from the class itself: through the Auto classes, their registry would hand
    `load_hub_vlm` the class as registered here)."""
    for f in code.glob("*.py"):
        shutil.copy(f, out / f.name)
    tok = train_tokenizer("bpe", 320, ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                                       "<IMG_CONTEXT>"], CHATML_INTERNVL, eos="<|im_end|>", pad="<|endoftext|>")
    tok.save_pretrained(out)
    text = dict(architectures=[LLM_ARCH[llm]], model_type=llm, vocab_size=len(tok), hidden_size=64,
                intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=4096, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, **(INTERNLM2 if llm == "internlm2" else {}))
    vision = dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=448, patch_size=14,
                  drop_path_rate=0.0, use_flash_attn=False, **VIT[llm])
    cfg = dict(architectures=["InternVLChatModel"], model_type="internvl_chat", auto_map=CHAT_AUTO_MAP,
               vision_config=vision, llm_config=text, template="internvl2_5", downsample_ratio=0.5,
               force_image_size=448, select_layer=-1, ps_version="v2", dynamic_image_size=True, use_thumbnail=True,
               min_dynamic_patch=1, max_dynamic_patch=12, use_backbone_lora=0, use_llm_lora=0)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    torch.manual_seed(0)
    model = get_class_from_dynamic_module(CHAT_AUTO_MAP["AutoModel"], str(out))(config)
    with torch.no_grad():  # every weight random, so that one left unloaded shows
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    return model


def samples() -> list[Sample]:
    """Two samples: a 64-px image (1 tile) and a 2:1 one (2 x 1 tiles + a thumbnail)."""
    a, b = make_split(0, "train", 2)
    return [a, replace(b, image=b.image.resize((896, 448)))]


def attn(layer: nn.Module) -> nn.Module:
    """A decoder layer's attention (`self_attn`, InternLM2's `attention`). It runs inside the checkpointed part; the
    layer's own hooks may not (transformers 5 checkpoints a layer's `forward`, not its `__call__`)."""
    return next(m for n, m in layer.named_children() if "att" in n and "norm" not in n)


@contextlib.contextmanager
def counting(module, name: str) -> Iterator[list]:
    """Count the calls of `module.name` (a function looked up at call time)."""
    real, calls = getattr(module, name), []

    def wrapped(*a, **k):
        calls.append(1)
        return real(*a, **k)
    with mock.patch.object(module, name, wrapped):
        yield calls


def run_step(name: str, fn: Callable[[], str], report: Report) -> bool:
    """Run one check; report PASS with its detail or FAIL with the error, and the warnings that bear on it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            detail, ok = fn(), True
        except Exception as e:  # a check's failure is its result
            where = " <- ".join(f"{Path(f.filename).name}:{f.lineno}"
                                for f in reversed(traceback.extract_tb(e.__traceback__)[-3:]))
            detail, ok = f"{type(e).__name__}: {e} (at {where})", False
    keys = ("use_reentrant", "eager", "attention", "deprecat")
    notes = sorted({str(w.message).split("\n")[0][:150] for w in caught if any(k in str(w.message) for k in keys)})
    report(name, ok, detail + "".join(f"\n      warning: {n}" for n in notes))
    return ok


def check_variant(code: Path, llm: str, report: Report) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f"internvl_{llm}_"))
    try:
        _check_variant(code, tmp, llm, lambda name, ok, detail: report(f"{llm}: {name}", ok, detail))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _check_variant(code: Path, tmp: Path, llm: str, report: Report) -> None:
    def step(name: str, fn: Callable[[], str]) -> bool:
        return run_step(name, fn, report)

    ckpt = tmp / f"InternVL2_5-tiny-{llm}"  # its own name: transformers caches remote classes by directory name
    ckpt.mkdir()
    st: dict = {}

    def build() -> str:
        st["built"] = chat = write_tiny_checkpoint(code, ckpt, llm)
        return f"{type(chat).__name__}({type(chat.vision_model).__name__}, {type(chat.language_model).__name__})"
    if not step("a1. import, build", build):
        return

    def load() -> str:
        st["adapter"], st["proc"] = load_hub_vlm(str(ckpt), "float32", remote_code=True, attn="sdpa")
        want = dict(st["built"].named_parameters()) | dict(st["built"].named_buffers())
        got = dict(st["adapter"].chat.named_parameters()) | dict(st["adapter"].chat.named_buffers())
        differ = sorted(k for k in want if k not in got or not torch.equal(want[k], got[k]))
        extra = sorted(set(got) - set(want))
        if differ or extra:
            raise AssertionError(f"{len(differ)} of {len(want)} weights and buffers differ from the model written "
                                 f"(e.g. {differ[:4]}), {len(extra)} not in it {extra[:3]}")
        return f"{len(want)} weights and buffers as written, num_image_token={st['adapter'].chat.num_image_token}"
    loaded = step("a2. load_hub_vlm", load)
    if not (step("a3. load_hub_vlm again in the same process", load) and loaded):
        return
    adapter, proc = st["adapter"], st["proc"]
    view = VLMView(adapter, proc, max_length=2048, name=llm)
    batch = view.collate([view.encode(s) for s in samples()])
    lm = adapter.chat.language_model
    layers = lm.model.layers

    def body() -> str:
        caches = []
        hook = lm.model.register_forward_hook(lambda m, a, out: caches.append(getattr(out, "past_key_values", None)))
        tiles = batch["pixel_values"].shape[0]
        try:
            with torch.no_grad():
                z = view.body(batch)
                logits = adapter.chat(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                      pixel_values=batch["pixel_values"],
                                      image_flags=torch.ones(tiles, 1, dtype=torch.long)).logits
        finally:
            hook.remove()
        B, T = batch["input_ids"].shape
        if z.shape != (B, T, view.d) or not torch.isfinite(z).all():
            raise AssertionError(f"features {tuple(z.shape)} (finite: {bool(torch.isfinite(z).all())}), "
                                 f"expected ({B}, {T}, {view.d})")
        if caches[0] is not None:
            raise AssertionError(f"the body's LLM forward built a KV cache ({type(caches[0]).__name__})")
        diff = (view.head(z) - logits).abs().max().item()
        if diff > 1e-4:
            raise AssertionError(f"head(body) differs from the remote forward's logits by {diff:.3g}")
        return f"features {tuple(z.shape)}, {tiles} tiles, no KV cache, |head(body) - logits| = {diff:.1e}"
    step("b. body forward", body)

    def attention() -> str:
        want = "sdpa" if llm == "qwen2" else "flash_attention_2" if importlib.util.find_spec("flash_attn") else "eager"
        said = lm.config.attn_implementation if llm == "internlm2" else lm.config._attn_implementation
        with counting(F, "scaled_dot_product_attention") as calls, torch.no_grad():
            view.body(batch)
        ran = "sdpa" if len(calls) >= len(layers) else said
        detail = (f"config says {said!r}, attention modules {sorted({type(attn(x)).__name__ for x in layers})}, "
                  f"{len(calls)} SDPA calls in {len(layers)} LLM layers")
        if said != want or ran != want:
            raise AssertionError(f"expected {want!r}: {detail}")
        return detail
    step("c. attention implementation", attention)

    def checkpointing() -> str:
        def loss_and_grads(on: bool):
            model = InternVLChatAdapter(copy.deepcopy(adapter.chat), adapter.chat.img_context_token_id)
            names = checkpoint_activations(model) if on else []
            v = VLMView(model, proc, max_length=2048)
            set_trainable(3, model, None)
            model.train()
            runs = []
            attn(model.chat.language_model.model.layers[0]).register_forward_pre_hook(lambda *_: runs.append(1))
            loss = v.student_ce(v.body(batch), batch)
            loss.backward()
            return names, loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, runs
        names, loss, grads, runs = loss_and_grads(True)
        _, loss0, grads0, runs0 = loss_and_grads(False)
        worst = max([(g - grads0[n]).abs().max().item() for n, g in grads.items() if n in grads0] or [0.0])
        detail = (f"switched on: {names}; LLM layer 0's attention ran {len(runs)} times (without: {len(runs0)}); "
                  f"loss {loss.item():.6f} vs {loss0.item():.6f}; {len(grads)} vs {len(grads0)} gradients, "
                  f"max |diff| {worst:.1e}")
        if len(runs) != 2 * len(runs0) or not torch.equal(loss, loss0) or grads.keys() != grads0.keys() \
                or not grads or worst != 0:
            raise AssertionError(detail)
        return detail
    step("d. activation checkpointing", checkpointing)

    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.5)  # "trained": unlike the checkpoint it was loaded from

    def save_reload() -> str:
        out = tmp / "student"
        adapter.save_pretrained(out, state_dict={k: v.detach().clone() for k, v in adapter.state_dict().items()})
        reloaded, info = AutoModel.from_pretrained(out, trust_remote_code=True, output_loading_info=True,
                                                   dtype=torch.float32)
        missing, unexpected = sorted(info["missing_keys"]), sorted(info["unexpected_keys"])
        mine, back = adapter.chat.state_dict(), reloaded.state_dict()
        differ = [k for k in mine if k not in back or not torch.equal(mine[k], back[k])]
        detail = (f"{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, "
                  f"{len(differ)} of {len(mine)} weights differ {differ[:3]}; files: "
                  f"{sorted(p.name for p in out.iterdir())}")
        if missing or unexpected or differ:
            raise AssertionError(detail)
        return detail
    step("e. save_pretrained + reload", save_reload)

    def generate() -> str:
        return f"answered {view.generate(samples()[:1], max_new_tokens=4)!r}"
    step("f. generate", generate)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", required=True, type=Path, help="directory of InternVL's remote-code .py files")
    ap.add_argument("--llm", choices=sorted(LLM_ARCH), nargs="+", default=["internlm2", "qwen2"])
    ap.add_argument("--stub-missing", action="store_true", help="stand in for timm / peft where not installed")
    ap.add_argument("--json", type=Path, help="write the results here")
    a = ap.parse_args()
    import transformers
    print(f"transformers {transformers.__version__}, torch {torch.__version__}; "
          f"code: {sorted(p.name for p in a.code.glob('*.py'))}")
    stood = stand_in_missing() if a.stub_missing else []
    if stood:
        print(f"stand-ins for: {stood}")
    results = []

    def report(name: str, ok: bool, detail: str) -> None:
        results.append({"check": name, "pass": ok, "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    for llm in a.llm:
        check_variant(a.code, llm, report)
    if a.json:
        a.json.write_text(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                                      "stand_ins": stood, "results": results}, indent=2) + "\n")
    return 0 if results and all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
