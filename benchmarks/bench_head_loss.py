"""Teacher-head CE + KL, forward + backward: naive (full (N, V_l) logits) against chunked.

    python benchmarks/bench_head_loss.py                 # the CUDA size if a GPU is present, else the CPU size
    python benchmarks/bench_head_loss.py --size cpu      # the scaled-down CPU size (--cpu says the same)
    python benchmarks/bench_head_loss.py --size dry --json out.json   # a seconds-long CPU smoke size; rows as JSON

Sizes: cuda V_l=152,064, d_l=8192, N=8192, bf16 head (chunks 512, 1024, 2048); cpu V_l=32,000, d_l=256, N=2048,
fp32 head; dry V_l=4096, d_l=128, N=512, fp32 head (chunks scaled by N/16).
Goal at the CUDA size: each chunked variant's peak extra memory <= 4% of the naive peak, in no more than the naive
time (`ok_memory`, `ok_time` in the JSON rows).
Time: median of --reps forward+backward passes (after one warm-up).
Peak extra memory:
  CUDA: torch.cuda.max_memory_allocated() during the passes minus what was allocated before them (inputs, head).
  CPU:  each variant runs in a forked child that resets its peak resident set (/proc/self/clear_refs) once its
        inputs exist; the rise of the peak (VmHWM) over the passes counts everything the process touched, the
        allocator's slack included, so it is an upper bound on the loss's own working memory.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minigenrecal.scale.bench import _cpu_peak, _cpu_peak_reset  # noqa: E402
from minigenrecal.losses import head_losses  # noqa: E402

SIZES = {"cuda": dict(V=152064, d=8192, N=8192, dtype="bfloat16"),
         "cpu": dict(V=32000, d=256, N=2048, dtype="float32"),
         "dry": dict(V=4096, d=128, N=512, dtype="float32")}
CUDA_CHUNKS = (512, 1024, 2048)  # N/16, N/8, N/4


def make(V, d, N, dtype, device):
    """Head (frozen), h (fp32, as the Recalibrator's LayerNorm gives), teacher features, labels; drawn on `device`."""
    g = torch.Generator(device=device).manual_seed(0)
    head = nn.Linear(d, V, bias=False, device=device, dtype=getattr(torch, dtype)).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g, device=device).mul_(d ** -0.5))
    h = torch.randn(N, d, generator=g, device=device).requires_grad_(True)
    z_t = torch.randn(N, d, generator=g, device=device)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    return head, h, z_t, labels


def one_pass(head, h, z_t, labels, chunk):
    h.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=h.device.type == "cuda"):
        ce, kl = head_losses(h, z_t, labels, head, tau=1.0, chunk_size=chunk)
    (ce + kl).backward()
    return ce.item() + kl.item()


def run_variant(size, chunk, device, reps):
    head, h, z_t, labels = make(**size, device=device)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        one_pass(head, h, z_t, labels, chunk)  # warm-up
        h.grad = None
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _cpu_peak_reset()
        base = _cpu_peak()
    times = []
    for _ in range(reps + (not cuda)):  # CPU: the first pass is the warm-up, memory is measured over all
        sync()
        t0 = time.perf_counter()
        loss = one_pass(head, h, z_t, labels, chunk)
        sync()
        times.append(time.perf_counter() - t0)
    times = times if cuda else times[1:]
    peak = (torch.cuda.max_memory_allocated() if cuda else _cpu_peak()) - base
    return dict(variant="naive" if chunk is None else f"chunked {chunk}", chunk=chunk, ms=1e3 * statistics.median(times),
                peak_gib=peak / 2 ** 30, loss=loss)


def _cpu_child(conn, size, chunk, reps, threads):
    torch.set_num_threads(threads)
    conn.send(run_variant(size, chunk, "cpu", reps))
    conn.close()


def run_cpu_variant(size, chunk, reps):
    """One CPU variant in a forked child, so that its peak memory is its own."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_cpu_child, args=(send, size, chunk, reps, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    p.start()
    send.close()
    row = recv.recv()
    p.join()
    return row


def with_goal(rows):
    """Add % of the naive peak, and whether the goal (<= 4% of its memory, <= its time) is met, to chunked rows."""
    naive = rows[0]
    for r in rows:
        r["pct_of_naive_peak"] = 100 * r["peak_gib"] / naive["peak_gib"] if naive["peak_gib"] > 0 else None
        r["time_vs_naive"] = r["ms"] / naive["ms"]
        if r["chunk"] is not None:
            r["ok_memory"] = r["pct_of_naive_peak"] is not None and r["pct_of_naive_peak"] <= 4.0
            r["ok_time"] = r["ms"] <= naive["ms"]
    return rows


def table(title, size, rows):
    print(f"\n{title}: V_l={size['V']}, d_l={size['d']}, N={size['N']}, head {size['dtype']}, fp32 logits")
    print("| variant | fwd+bwd ms (median) | peak extra GiB | % of naive peak | loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        pct = "-" if r["pct_of_naive_peak"] is None else f"{r['pct_of_naive_peak']:.1f}%"
        print(f"| {r['variant']} | {r['ms']:.1f} | {r['peak_gib']:.3f} | {pct} | {r['loss']:.5f} |")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["auto", *SIZES], default="auto", help="auto: cuda if a GPU is present, else cpu")
    p.add_argument("--cpu", action="store_true", help="same as --size cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunks", default=None, help="comma-separated (default: N/16, N/8, N/4 of the size)")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after each variant)")
    a = p.parse_args(argv)
    name = "cpu" if a.cpu else a.size
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    size = SIZES[name]
    device = "cuda" if name == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--size cuda needs a GPU")
    chunks = [None] + ([int(c) for c in a.chunks.split(",")] if a.chunks else [size["N"] // k for k in (16, 8, 4)])
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.environ.get('OMP_NUM_THREADS', '1')} thread(s)"
    out = dict(size=name, **size, device=where, torch=torch.__version__, reps=a.reps, rows=[])
    for c in chunks:
        out["rows"].append(run_variant(size, c, "cuda", a.reps) if device == "cuda" else run_cpu_variant(size, c, a.reps))
        with_goal(out["rows"])
        if device == "cuda":
            torch.cuda.empty_cache()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    table(f"{where}, torch {torch.__version__}", size, out["rows"])
    return out


if __name__ == "__main__":
    main()
