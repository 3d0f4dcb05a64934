"""The bench's config dimensions reproduce the paper's Recalibrator sizes; a scaled-down bench runs on CPU."""
import math

import pytest
import torch

from minigenrecal.scale.bench import DIMS, bench, build_lm
from minigenrecal.recalibrator import count_parameters

torch.set_num_threads(1)


@pytest.mark.parametrize("student,exact,millions", [("Qwen/Qwen2-VL-7B-Instruct", 524_864_000, 524.8),
                                                    ("OpenGVLab/InternVL2_5-8B", 503_361_536, 503.3)])
def test_dims_give_paper_recalibrator_size(student, exact, millions):
    with torch.device("meta"):
        cfg = build_lm(DIMS[student], torch.float32, "meta").config
    n = count_parameters(DIMS["OpenGVLab/InternVL2_5-78B"].d, cfg)
    assert n == exact and abs(n / 1e6 - millions) < 0.1  # the paper's figure, truncated to 0.1M


def test_bench_cpu_scaled():
    rows = bench("smolvlm-256m<-qwen2-vl-2b", scale=0.03, batch=2, lq=24, la=8, steps=1, chunk=4)
    assert [r["stage"] for r in rows] == [1, 2]
    for r in rows:
        assert math.isfinite(r["loss"]) and r["step_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu"] < 1
    assert rows[1]["tflops"] * rows[1]["step_s"] > rows[0]["tflops"] * rows[0]["step_s"]  # stage 2 trains more
    cached = bench("smolvlm-256m<-qwen2-vl-2b", scale=0.03, batch=2, lq=24, la=8, steps=1, chunk=None,
                   use_cache=True, stages=(1,))
    assert cached[0]["tflops"] * cached[0]["step_s"] < rows[0]["tflops"] * rows[0]["step_s"]  # no teacher body
    assert all(0 < r["estimate_gib"] and 0 < r["peak_gib"] for r in rows + cached)


def test_bench_refuses_before_building_when_the_estimate_does_not_fit(monkeypatch):
    import minigenrecal.scale.bench as b
    monkeypatch.setattr(b, "build_lm", lambda *a, **k: pytest.fail("built a model despite the estimate"))
    with pytest.raises(b.WillNotFit, match="qwen2-vl-7b<-qwen2-vl-72b.*needs about"):
        bench("qwen2-vl-7b<-qwen2-vl-72b", batch=1, lq=768, la=256, chunk=512, capacity_gib=80.0)  # 72B body: ~150 GiB


def test_memory_estimate_parts():
    from minigenrecal.scale.bench import estimate_memory
    live = estimate_memory("qwen2-vl-7b<-qwen2-vl-72b", 2, batch=1, lq=768, la=256, chunk=512)
    cached = estimate_memory("qwen2-vl-7b<-qwen2-vl-72b", 2, batch=1, lq=768, la=256, chunk=512, use_cache=True)
    assert 130 < live["teacher body"] < 140 and cached["teacher body"] == 0  # 72.7B parameters less the head, bf16
    assert abs(cached["teacher head"] - 152064 * 8192 * 2 / 2 ** 30) < 1e-9
    assert 42 < cached["grads + AdamW"] < 48  # 3 x 2 bytes x (7.6B student + 0.52B Recalibrator)
    sharded = estimate_memory("qwen2-vl-7b<-qwen2-vl-72b", 2, batch=1, lq=768, la=256, chunk=512, gpus=8)
    assert abs(sharded["student"] * 8 - live["student"]) < 1e-9 and sharded["activations"] == live["activations"]
    s1 = estimate_memory("qwen2-vl-7b<-qwen2-vl-72b", 1, batch=1, lq=768, la=256, chunk=512, use_cache=True)
    assert s1["total"] < cached["total"] - 40  # stage 1 trains only the Recalibrator


def test_docs_memory_table_is_the_one_bench_prints():
    """docs/scaling.md's training memory table is `bench --memory-table`'s output, and its arithmetic adds up."""
    from pathlib import Path
    from minigenrecal.scale.bench import estimate_memory, training_memory_table
    lines = training_memory_table()
    docs = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    assert "\n".join(lines) in docs
    assert len(lines) == 2 + 2 * (3 + 3 * 4)  # header; stages 1-2 x (the one-GPU pair x 3 counts + 3 pairs x 4)
    # the 72B teacher body sharded 8 ways, in bf16: its parameters x 2 bytes / 8
    e = estimate_memory("qwen2-vl-7b<-qwen2-vl-72b", 2, batch=4, gpus=8, master_fp32=True)
    e16 = estimate_memory("qwen2-vl-7b<-qwen2-vl-72b", 2, batch=4, gpus=16, master_fp32=True)
    assert abs(e["teacher body"] / e16["teacher body"] - 2) < 1e-9 and e["teacher head"] == e16["teacher head"]
    assert abs(e["teacher head"] - 152064 * 8192 * 2 / 2 ** 30) < 1e-6  # replicated on every GPU
    # fp32 master + grad + two AdamW states: 16 bytes per trainable parameter, sharded, from stage 1 on
    e1 = estimate_memory("qwen2-vl-7b<-qwen2-vl-72b", 1, batch=4, gpus=8, master_fp32=True)
    assert e1["grads + AdamW"] == e["grads + AdamW"]
    assert abs(e["grads + AdamW"] / (e["student"] + e["recalibrator"]) - 8) < 1e-9  # 16 bytes vs 2


def test_real_length_table_and_what_activation_checkpointing_keeps():
    """docs/scaling.md's stage-2 table at the presets' real lengths is the one bench prints; with checkpointing the
    student keeps one (T, d_s) input per layer plus one layer's activations, by hand for InternVL2.5-8B."""
    from pathlib import Path
    from minigenrecal.scale.bench import GiB, dims_of, estimate_memory, real_length_memory_table
    lines = real_length_memory_table()
    docs = (Path(__file__).resolve().parent.parent / "docs" / "scaling.md").read_text()
    assert "\n".join(lines) in docs and len(lines) == 2 + 3 * 3  # header; 3 cluster presets x 3 GPU counts
    assert "| `internvl2.5-8b<-internvl2.5-78b` | 3468 / 3468 | 8 | 4 |" in lines[5]
    kw = dict(batch=4, lq=3468, la=256, lq_l=3468, chunk=1024, gpus=8, master_fp32=True)
    name = "internvl2.5-8b<-internvl2.5-78b"
    off, on = estimate_memory(name, 2, **kw), estimate_memory(name, 2, checkpointing=True, **kw)
    sd, T = dims_of("OpenGVLab/InternVL2_5-8B"), 4 * (3468 + 256)
    layer = T * (18 * sd.d + 4 * sd.ffn) * 2  # bytes of one layer's kept activations, bf16
    assert abs((off["activations"] - on["activations"]) * GiB - (sd.layers * layer - (T * sd.layers * sd.d * 2 + layer))) < 1
    assert {k: v for k, v in off.items() if k not in ("activations", "total")} == \
        {k: v for k, v in on.items() if k not in ("activations", "total")}
    assert estimate_memory(name, 1, checkpointing=True, **kw) == estimate_memory(name, 1, **kw)  # stage 1: no grad


def test_bench_names_a_checkpoint_it_has_no_dimensions_for():
    import pytest
    from minigenrecal.scale.bench import DIMS, dims_of
    assert dims_of(next(iter(DIMS))) is DIMS[next(iter(DIMS))]
    with pytest.raises(ValueError, match=r"no dimensions for 'someone/new-vlm'.*add its TextDims"):
        dims_of("someone/new-vlm")
