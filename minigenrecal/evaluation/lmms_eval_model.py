"""lmms-eval on a saved student: `StudentHuggingface` (registered as the model `minigenrecal_hf`) and a launcher,
`python -m minigenrecal.evaluation.lmms_eval_model ARGS` (ARGS as for `python -m lmms_eval`).

Why not lmms-eval's own `huggingface` model as it is (lmms-eval 0.7.3, transformers 5):
- it picks the class to load with `config.model_type in AutoModelForImageTextToText._model_mapping.keys()` (and
  the same for AutoModelForCausalLM); those keys are config classes, not model-type strings, so the test never
  holds and it loads `AutoModel`: for the student, `Idefics3Model`, the body without its LM head, which cannot
  generate. `StudentHuggingface` changes only that choice: it loads `AutoModelForImageTextToText`, as
  `python -m minigenrecal evaluate` does;
- it always loads in bfloat16; `evaluate` scores in float32, so `dtype` (default float32) is a model argument here;
- it calls the processor with `audios=[]`, which transformers 5 rejects (the processor is wrapped to leave out empty
  media lists);
- `simple_evaluate` patches `filelock._api`, which filelock 4 (the locked version) no longer has; the patch only
  guards nested `load_dataset` calls, which a local JSON task does not make, so it is marked done beforehand.
Everything else (chat template with `add_generation_prompt=True`, the processor, greedy decoding, decoding with
`skip_special_tokens`) is upstream's code. The task is `lmms_eval_tasks/minigenrecal_synth` beside this file.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from PIL import ImageFile

_TRUNCATED = ImageFile.LOAD_TRUNCATED_IMAGES  # before lmms-eval's import turns it on for every PIL user (below)

import lmms_eval.evaluator as lmms_evaluator  # noqa: E402
import lmms_eval.models.chat.huggingface as upstream  # noqa: E402
import torch  # noqa: E402
from lmms_eval.__main__ import cli_evaluate  # noqa: E402
from lmms_eval.models import MODEL_REGISTRY_V2  # noqa: E402
from lmms_eval.models.registry_v2 import ModelManifest  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

# lmms_eval.api.task sets PIL's LOAD_TRUNCATED_IMAGES at import, which would let a truncated image through the
# kit's readers (they name it as bad input instead): restored here, for every importer of this module
ImageFile.LOAD_TRUNCATED_IMAGES = _TRUNCATED

MODEL_NAME = "minigenrecal_hf"
TASKS_DIR = Path(__file__).with_name("lmms_eval_tasks")  # pass as --include_path


class _ImageTextToText:
    """Stands in for `AutoModel` inside the upstream loader: the image-text-to-text class, in the asked dtype."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def from_pretrained(self, path, torch_dtype=None, **kw):  # torch_dtype: upstream's fixed bfloat16, replaced
        return AutoModelForImageTextToText.from_pretrained(path, dtype=self.dtype, **kw)


class _MediaKwargs:
    """The processor, called as transformers 5 wants: upstream passes `videos=[]` and `audios=[]` with every
    request, and transformers 5 processors reject `audios` (renamed `audio`); empty lists are left out."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, *args, videos=None, audios=None, **kw):
        if videos:
            kw["videos"] = videos
        if audios:
            kw["audio"] = audios
        return self.processor(*args, **kw)

    def __getattr__(self, name):  # apply_chat_template, batch_decode, ...: the processor's own
        return getattr(self.processor, name)


class StudentHuggingface(upstream.Huggingface):
    """lmms-eval's `huggingface` chat model, loading the model class that generates, in `dtype`, on CPU when
    there is no GPU (model args: pretrained=DIR[,dtype=float32][,device=cpu][,batch_size=1])."""

    def __init__(self, pretrained: str, dtype: str = "float32", device: str | None = None,
                 device_map: str | None = None, **kwargs):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        want = getattr(torch, dtype)
        saved = upstream.AutoModel
        upstream.AutoModel = _ImageTextToText(want)  # the fallback that the model-type test always reaches
        try:
            super().__init__(pretrained=pretrained, device=device, device_map=device_map or device, **kwargs)
        finally:
            upstream.AutoModel = saved
        if self.model.dtype != want:  # upstream found the class itself (its test fixed): our dtype did not apply
            raise RuntimeError(f"{pretrained} loaded in {self.model.dtype}, not {want}; lmms-eval's loader changed, "
                               "revisit minigenrecal/evaluation/lmms_eval_model.py")
        self.processor = _MediaKwargs(self.processor)


def register() -> None:
    """Make `minigenrecal_hf` a model name lmms-eval resolves, and skip its filelock-3-only patch (see above)."""
    path = f"{__name__}.StudentHuggingface"  # `__main__.` under the launcher: the class already loaded, not twice
    MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id=MODEL_NAME, chat_class_path=path), overwrite=True)
    if importlib.util.find_spec("filelock._api") is None:  # filelock 3 has it: there lmms-eval patches as it means to
        lmms_evaluator._enable_reentrant_filelocks._patched = True


register()


if __name__ == "__main__":  # `python -m lmms_eval`, with `minigenrecal_hf` registered
    cli_evaluate()
