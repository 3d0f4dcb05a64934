"""Teacher-feature cache: run the frozen teacher body once, then train stages 1-2 from disk with only its head.

What is stored per sample (the fields of `losses.TeacherOut`, in bf16 safetensors shards):
    z_seq   (Lq_l + La - 1, d_l)   the teacher's features at positions 0 .. Lq_l+La-2, from which
            z_q    = z_seq[:Lq_l]                   (the regularization path's question features)
            z_pred = z_seq[Lq_l-1:]                 (the answer-predicting positions; head(z_pred) = target logits)
            z_a    = z_seq[Lq_l:] = z_pred[1:]      (the Recalibrator's answer input, answer_input='features')
    z_a     (La - 1, d_l)          only with answer_input='embeddings' (then z_a is the answer word embeddings)
    labels  (La,)                  a_0 .. a_{La-1} in the teacher's vocabulary
Storing z_seq once instead of z_q, z_a and z_pred separately is lossless and saves the overlap.
Files: shard-00000.safetensors ... (concatenated rows + per-sample lengths), head.safetensors (the frozen
head's weight and bias, in the teacher's own dtype) and meta.json (sample ids in order, dims, how it was made).

    python -m minigenrecal cache-teacher --preset tiny --n 1000 --out runs/cache
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from .data import Sample
from .losses import TeacherOut
from .vlm import VLMView

FORMAT = 1


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.replace("torch.", ""))


@torch.no_grad()
def build_cache(teacher: VLMView, samples: list[Sample], out: str | Path, batch_size: int = 32,
                shard_size: int = 4096, dtype: str = "bfloat16", answer_input: str = "features",
                info: dict | None = None, progress: bool = False) -> dict:
    """Run `stages.teacher_forward` over `samples` in order and write the cache to `out`; returns meta."""
    from .stages import teacher_forward
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = next(teacher.model.parameters()).device
    dt = _dtype(dtype)
    shards, rows, n_in_shard, ids = [], {"z_seq": [], "z_a": [], "labels": [], "q_lens": [], "a_lens": []}, 0, []

    def flush():
        nonlocal rows, n_in_shard
        if n_in_shard == 0:
            return
        name = f"shard-{len(shards):05d}.safetensors"
        tensors = {k: torch.cat(v).contiguous() for k, v in rows.items() if v}
        save_file(tensors, str(out / name))
        shards.append({"file": name, "n": n_in_shard})
        rows, n_in_shard = {k: [] for k in rows}, 0

    bar = range(0, len(samples), batch_size)
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(bar, desc="teacher cache")
    for i in bar:
        chunk = samples[i: i + batch_size]
        batch = {k: v.to(dev) for k, v in teacher.collate([teacher.encode(s) for s in chunk]).items()}
        t = teacher_forward(teacher, batch, answer_input)
        starts = torch.cumsum(t.a_lens, 0) - t.a_lens
        for b, s in enumerate(chunk):
            La, st = int(t.a_lens[b]), int(starts[b])
            z_pred = t.z_pred[st: st + La]  # (La, d_l)
            rows["z_seq"].append(torch.cat([t.z_q[b], z_pred[1:]]).to("cpu", dt))  # z at 0 .. Lq_l+La-2
            if answer_input == "embeddings":
                rows["z_a"].append(t.z_a[b].to("cpu", dt))
            rows["labels"].append(t.labels[st: st + La].cpu())
            rows["q_lens"].append(torch.tensor([len(t.z_q[b])]))
            rows["a_lens"].append(torch.tensor([La]))
            ids.append(s.id)
            n_in_shard += 1
            if n_in_shard == shard_size:
                flush()
    flush()
    head = teacher.head
    save_file({"weight": head.weight.detach().cpu().contiguous(),
               **({"bias": head.bias.detach().cpu().contiguous()} if head.bias is not None else {})},
              str(out / "head.safetensors"))
    meta = {"format": FORMAT, "n": len(ids), "d_l": teacher.d, "V_l": teacher.V, "dtype": dtype,
            "answer_input": answer_input, "shards": shards, "sample_ids": ids, **(info or {})}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


class TeacherCache:
    """A cache on disk, read lazily (memory-mapped safetensors). `teacher_fn(t_batch, idx)` gives the TeacherOut."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            raise FileNotFoundError(f"no teacher cache at {self.path}; build it with `python -m minigenrecal "
                                    "cache-teacher --out DIR`")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{self.path}: cache format {self.meta.get('format')}, this code reads {FORMAT}")
        self.dtype = dtype  # features are returned in this dtype (CPU fp32 training cannot read bf16 directly)
        self.files, self.where = [], []  # where[i] = (shard, seq row start, a row start, label start, Lq, La)
        for k, sh in enumerate(self.meta["shards"]):
            f = safe_open(str(self.path / sh["file"]), framework="pt")
            self.files.append(f)
            q, a = f.get_tensor("q_lens").tolist(), f.get_tensor("a_lens").tolist()
            seq = lab = ans = 0
            for Lq, La in zip(q, a):
                self.where.append((k, seq, ans, lab, Lq, La))
                seq, ans, lab = seq + Lq + La - 1, ans + La - 1, lab + La
        if len(self.where) != self.meta["n"]:
            raise ValueError(f"{self.path}: meta says {self.meta['n']} samples, shards hold {len(self.where)}")

    def __len__(self):
        return len(self.where)

    @property
    def sample_ids(self) -> list[str]:
        return self.meta["sample_ids"]

    def check(self, samples: list[Sample]) -> None:
        """Raise unless `samples` are exactly the cached ones, in the same order (the dataset index is the key)."""
        ids = [s.id for s in samples]
        if ids != self.sample_ids[: len(ids)]:
            bad = next(i for i, (a, b) in enumerate(zip(ids, self.sample_ids)) if a != b) if len(ids) <= len(self) else len(self)
            raise ValueError(f"{self.path}: the training samples do not match the cache (first mismatch at index {bad})")

    def head(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """The teacher's frozen head, rebuilt from head.safetensors (its stored dtype unless `dtype`)."""
        with safe_open(str(self.path / "head.safetensors"), framework="pt") as f:
            w = f.get_tensor("weight")
            b = f.get_tensor("bias") if "bias" in f.keys() else None
        dtype = dtype or w.dtype
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = nn.Parameter(w.to(dtype), requires_grad=False)
        if b is not None:
            lin.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        return lin

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z_q (Lq_l, d_l), z_a (La-1, d_l), z_pred (La, d_l), labels (La,)) of cached sample i."""
        k, seq, ans, lab, Lq, La = self.where[i]
        f = self.files[k]
        z = f.get_slice("z_seq")[seq: seq + Lq + La - 1].to(self.dtype)  # (Lq + La - 1, d_l)
        labels = f.get_slice("labels")[lab: lab + La]
        if self.meta["answer_input"] == "features":
            return z[:Lq], z[Lq:], z[Lq - 1:], labels
        return z[:Lq], f.get_slice("z_a")[ans: ans + La - 1].to(self.dtype), z[Lq - 1:], labels

    def teacher_out(self, idx: torch.Tensor | list[int]) -> TeacherOut:
        """The TeacherOut of a batch of dataset indices, as `stages.teacher_forward` would give it."""
        parts = [self.sample(int(i)) for i in idx]
        return TeacherOut(z_q=[p[0] for p in parts], z_a=[p[1] for p in parts],
                          z_pred=torch.cat([p[2] for p in parts]), labels=torch.cat([p[3] for p in parts]),
                          a_lens=torch.tensor([len(p[3]) for p in parts]))

    def teacher_fn(self, t_batch: dict | None, idx: torch.Tensor) -> TeacherOut:
        """For `stages.train_stage(teacher_fn=...)`: ignores the (absent) teacher batch, reads the cache."""
        return self.teacher_out(idx.tolist())


# -- command line -----------------------------------------------------------------------------------------
def cmd_cache_teacher(a):
    from .config import get_preset
    from .data import make_split
    preset = get_preset(a.preset)
    if preset.teacher == "tiny":
        from .tiny import TEACHER_DIR, load_teacher
        model, proc = load_teacher(a.teacher_dir or TEACHER_DIR)
    else:
        from .hub import load_hub_vlm
        model, proc = load_hub_vlm(preset.teacher, preset.dtype, preset.remote_code)
    if torch.cuda.is_available():
        model.cuda()
    teacher = VLMView(model.eval(), proc, preset.max_length, name="teacher")
    samples = make_split(a.data_seed, "train", a.n)
    meta = build_cache(teacher, samples, a.out, batch_size=a.batch_size, shard_size=a.shard_size, dtype=a.dtype,
                       answer_input=a.answer_input, progress=True,
                       info={"preset": preset.name, "teacher": preset.teacher, "data_seed": a.data_seed, "split": "train"})
    print(json.dumps({k: v for k, v in meta.items() if k != "sample_ids"}))


def add_command(sub) -> None:
    from .cli import add_preset_option
    c = sub.add_parser("cache-teacher", help="run the frozen teacher once over the train split and store its features")
    add_preset_option(c)
    c.add_argument("--n", type=int, default=None, help="samples (default: the preset's n_train)")
    c.add_argument("--out", required=True, help="cache directory to write")
    c.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic train split")
    c.add_argument("--batch-size", type=int, default=32, help="samples per teacher forward")
    c.add_argument("--shard-size", type=int, default=4096, help="samples per shard file")
    c.add_argument("--dtype", default="bfloat16", help="stored feature dtype (bfloat16, float16, float32)")
    c.add_argument("--answer-input", default="features", choices=["features", "embeddings"],
                   help="what the Recalibrator reads at answer positions: teacher features or answer embeddings")
    c.add_argument("--teacher-dir", default=None, help="tiny preset: a teacher checkpoint other than the shipped one")

    def run(a):
        if a.n is None:
            from .config import get_preset
            a.n = get_preset(a.preset).n_train
        cmd_cache_teacher(a)
    c.set_defaults(fn=run)
