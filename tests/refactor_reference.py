"""Loss histories of a short run of every training path on the tiny pair, for `tests/test_numbers_unchanged.py`.

`python tests/refactor_reference.py` rewrites tests/data/loss_histories.json: run it only when a change is MEANT
to move numbers, and say so in the commit. The test reruns the same calls and compares every float exactly."""
import json
import sys
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "data" / "loss_histories.json"


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
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(histories(), indent=0) + "\n")
    print(f"wrote {OUT}")
