"""Teacher-head CE + KL, forward + backward: naive (full (N, V_l) logits) against chunked.

    python benchmarks/bench_head_loss.py            # CUDA size if a GPU is present, else the CPU size
    python benchmarks/bench_head_loss.py --cpu      # the scaled-down CPU size only

Time: median of --reps forward+backward passes (after one warm-up).
Peak extra memory:
  CUDA: torch.cuda.max_memory_allocated() during the pass minus what was allocated before it (inputs, head).
  CPU:  each variant runs in a fresh subprocess; the increase of the process's peak resident set size
        (ru_maxrss) from just before the first pass to after the last. It counts everything the process touched,
        the allocator's slack included, so it is an upper bound on the loss's own working memory.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minigenrecal.losses import head_losses  # noqa: E402

CUDA_SIZE = dict(V=152064, d=8192, N=8192, dtype="bfloat16")
CPU_SIZE = dict(V=32000, d=256, N=2048, dtype="float32")


def make(V, d, N, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    head = nn.Linear(d, V, bias=False).to(device=device, dtype=getattr(torch, dtype))
    with torch.no_grad():
        head.weight.copy_((torch.randn(V, d, generator=g) * d ** -0.5).to(head.weight.dtype))
    head.requires_grad_(False)
    h = torch.randn(N, d, generator=g).to(device).requires_grad_(True)  # fp32, as the Recalibrator's LayerNorm gives
    z_t = torch.randn(N, d, generator=g).to(device)
    labels = torch.randint(0, V, (N,), generator=g).to(device)
    return head, h, z_t, labels


def one_pass(head, h, z_t, labels, chunk):
    h.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=h.device.type == "cuda"):
        ce, kl = head_losses(h, z_t, labels, head, tau=1.0, chunk_size=chunk)
    (ce + kl).backward()
    return ce.item() + kl.item()


def run_variant(size, chunk, device, reps):
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    head, h, z_t, labels = make(**size, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    if device == "cuda":
        one_pass(head, h, z_t, labels, chunk)  # warm-up
        h.grad = None
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    for _ in range(reps + (device == "cpu")):  # CPU: first pass is the warm-up, memory is measured over all
        sync()
        t0 = time.perf_counter()
        loss = one_pass(head, h, z_t, labels, chunk)
        sync()
        times.append(time.perf_counter() - t0)
    times = times[1:] if device == "cpu" else times
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return dict(chunk=chunk, ms=1e3 * statistics.median(times), peak_gib=peak / 2 ** 30, loss=loss)


def table(title, size, rows):
    print(f"\n{title}: V_l={size['V']}, d_l={size['d']}, N={size['N']}, head {size['dtype']}, fp32 logits")
    naive = rows[0]
    print(f"| variant | fwd+bwd ms (median) | peak extra GiB | % of naive peak | loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = "naive" if r["chunk"] is None else f"chunked {r['chunk']}"
        print(f"| {name} | {r['ms']:.1f} | {r['peak_gib']:.3f} | {100 * r['peak_gib'] / naive['peak_gib']:.1f}% "
              f"| {r['loss']:.5f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--cpu", action="store_true", help="the scaled-down CPU size only")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunks", default="1024,512,256")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:  # one CPU variant in this fresh process
        size, chunk = json.loads(a.worker)
        print(json.dumps(run_variant(size, chunk, "cpu", a.reps)))
        return
    chunks = [None] + [int(c) for c in a.chunks.split(",")]
    if torch.cuda.is_available() and not a.cpu:
        rows = []
        for c in chunks:
            rows.append(run_variant(CUDA_SIZE, c, "cuda", a.reps))
            torch.cuda.empty_cache()
        table(f"CUDA ({torch.cuda.get_device_name()}, torch {torch.__version__})", CUDA_SIZE, rows)
    else:
        print("no CUDA (or --cpu): the CUDA size is not run")
    rows = []
    for c in chunks:
        out = subprocess.run([sys.executable, __file__, "--reps", str(a.reps), "--worker", json.dumps([CPU_SIZE, c])],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table(f"CPU ({os.environ.get('OMP_NUM_THREADS', '1')} thread(s), torch {torch.__version__})", CPU_SIZE, rows)


if __name__ == "__main__":
    main()
