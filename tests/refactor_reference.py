"""Loss histories of a short run of every training path on the tiny pair, for `tests/test_numbers_unchanged.py`.

`python tests/refactor_reference.py` rewrites this processor's reference: run it only when a change is MEANT to move
numbers (and say so in the commit), or to add a processor, from a commit whose numbers are known to be the
reference's (say which). The test reruns the same calls and compares every float exactly.

One reference per processor (`tests/data/loss_histories_<family>-<model>.json`, /proc/cpuinfo's cpu family and model
number, as the run manifests record them): the math libraries pick their kernels per microarchitecture, so the same
code, torch build and thread count give other last bits on another CPU (45 of the 135 floats differ between the
Intel family 6 model 207 and the AMD family 25 model 17 references; the AMD one was written by the code of commit
1fec5c8, which matched the Intel one bit for bit)."""
import json
import sys
from pathlib import Path

import torch

from minigenrecal.scale.manifest import cpu_model

DATA = Path(__file__).resolve().parent / "data"


def reference_path(cpu: dict | None = None) -> Path:
    """This processor's reference file (it may not exist: see the module docstring)."""
    c = cpu_model() if cpu is None else cpu
    return DATA / f"loss_histories_{c.get('cpu_family', 'unknown')}-{c.get('cpu_model_number', 'unknown')}.json"


def histories() -> dict:
    import minigenrecal as mg
    from minigenrecal.study.baselines import build_same_tokenizer_student, train_baseline
    from minigenrecal.models.tiny import build_student, load_teacher
    torch.manual_seed(0)
    t_model, t_proc = load_teacher()
    teacher = mg.VLMView(t_model, t_proc, name="teacher")
    train = mg.make_split(0, "train", 24)
    cfg = mg.StageConfig(steps=3, batch_size=8, lr=1e-3, lr_end=1e-4)
    out = {}
    for answer_input in ("features", "embeddings"):
        student = mg.VLMView(*build_student(0), name="student")
        run = mg.run_genrecal(teacher, student, train, {1: cfg, 2: cfg, 3: cfg}, depth=1, answer_input=answer_input,
                              progress=False)
        out[f"genrecal_{answer_input}"] = {s: [{k: v for k, v in h.items() if k != "stage_seconds"} for h in hs]
                                           for s, hs in run["histories"].items()}
    for method in ("uld", "linear_projector"):
        student = mg.VLMView(*build_student(0), name="student")
        data = mg.encode_pairs(teacher, student, train)
        out[method] = train_baseline(method, student, data, cfg, teacher)
    student = mg.VLMView(*build_same_tokenizer_student(0), name="teacher")
    data = mg.encode_pairs(teacher, student, train)
    out["same_tokenizer_kd"] = train_baseline("same_tokenizer_kd", student, data, cfg, teacher)
    return json.loads(json.dumps(out))


if __name__ == "__main__":
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
    out = reference_path()
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(histories(), indent=0) + "\n")
    print(f"wrote {out}")
