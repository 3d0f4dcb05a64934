"""Teacher-head CE + KL, forward + backward: naive (full (N, V_l) logits), the fused chunked loss and Liger-Kernel's
fused linear JSD, in one run, as ratios to naive. (The "chunked" rows in docs/scaling.md's older tables measured an
earlier two-output chunked loss, 4 head matmuls per path, which the fused loss replaced.)

    python benchmarks/bench_head_loss.py                 # the CUDA size if a GPU is present, else the CPU size
    python benchmarks/bench_head_loss.py --size cpu      # the scaled-down CPU size (--cpu says the same)
    python benchmarks/bench_head_loss.py --paths 2       # two Recalibrator paths on one teacher, as a stage runs them
    python benchmarks/bench_head_loss.py --size dry --json out.json   # a seconds-long CPU smoke size; rows as JSON

Sizes: cuda V_l=152,064, d_l=8192, N=8192, bf16 head (chunks 512, 1024, 2048); cpu V_l=32,000, d_l=256, N=2048,
fp32 head; dry V_l=4096, d_l=128, N=512, fp32 head (chunks scaled by N/16).
Variants (each on `--paths` sets of N rows against one teacher: 1, or 2 for the main and regularization paths):
  naive          `losses.head_losses` unchunked, once per path
  fused C        `chunked.fused_head_loss` over all paths at once (the teacher's logits once, 3 matmuls per path)
  liger          Liger-Kernel's `LigerFusedLinearJSD(jsd_beta=0)`, forward KL only (no CE), the teacher head as both
                 weights, once per path; optional (an import of `liger_kernel`, and Triton on a GPU): skipped with
                 the reason printed where it cannot run, as on CPU
Goal: 0.8x the naive time or less at 3% of its peak extra memory or less (`ok_time`, `ok_memory` in the JSON rows).
Time: median of --reps forward+backward passes (after one warm-up).
Peak extra memory (bytes the loss allocates above what existed before it: inputs and head excluded, h.grad included):
  CUDA: torch.cuda.max_memory_allocated() during the passes minus what was allocated before them.
  CPU:  torch's own allocator, as the profiler records it (`torch.profiler.profile(profile_memory=True)`: one event
        per tensor allocation and free, with its size): the largest running sum of those events over one extra pass.
        This counts torch tensors exactly, like the CUDA figure; Python objects and allocator slack are outside it.
        Beside it, as a check from the operating system, `rss_gib`: each variant runs in a forked child that resets
        its peak resident set (/proc/self/clear_refs) once its inputs exist, and the rise of the peak (VmHWM) over
        the timed passes is printed; it includes the allocator's slack and the libraries' buffers, so it is an upper
        bound, and at small sizes it is mostly noise.
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from minigenrecal.chunked import fused_head_loss  # noqa: E402
from minigenrecal.losses import head_losses  # noqa: E402
from minigenrecal.scale.bench import _cpu_peak, _cpu_peak_reset  # noqa: E402

SIZES = {"cuda": dict(V=152064, d=8192, N=8192, dtype="bfloat16"),
         "cpu": dict(V=32000, d=256, N=2048, dtype="float32"),
         "dry": dict(V=4096, d=128, N=512, dtype="float32")}
CUDA_CHUNKS = (512, 1024, 2048)  # N/16, N/8, N/4
GOAL_TIME, GOAL_MEMORY_PCT = 0.8, 3.0


def make(V, d, N, dtype, device, paths=1):
    """Head (frozen), rows h per path (fp32, as the Recalibrator's LayerNorm gives), teacher features, labels."""
    g = torch.Generator(device=device).manual_seed(0)
    head = nn.Linear(d, V, bias=False, device=device, dtype=getattr(torch, dtype)).requires_grad_(False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, d, generator=g, device=device).mul_(d ** -0.5))
    hs = [torch.randn(N, d, generator=g, device=device).requires_grad_(True) for _ in range(paths)]
    z_t = torch.randn(N, d, generator=g, device=device)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    return head, hs, z_t, labels


def liger_loss():
    """Liger-Kernel's fused linear JSD at jsd_beta=0 (forward KL), or the reason it cannot run here."""
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD  # optional, imported only here
    except ImportError as e:
        return None, f"liger_kernel does not import ({e})"
    if not torch.cuda.is_available():
        return None, "Liger-Kernel's kernels are Triton GPU kernels; there is no GPU here"
    try:  # releases before jsd_beta in [0, 1] refuse 0
        return LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0), None
    except (AssertionError, ValueError) as e:
        return None, f"this liger_kernel refuses jsd_beta=0 (forward KL): {e}"


def one_pass(kind, head, hs, z_t, labels, chunk):
    """Forward + backward of one variant over every path; returns the loss (summed over paths)."""
    for h in hs:
        h.grad = None
    with torch.autocast(z_t.device.type, dtype=torch.bfloat16, enabled=z_t.device.type == "cuda"):
        if kind == "fused":
            loss = fused_head_loss(hs, z_t, labels, head.weight, head.bias, 1.0, 1.0, 1.0, chunk)[0]
        elif kind == "liger":
            jsd = liger_loss()[0]
            W = head.weight  # Liger's matmuls take the rows in the head's dtype
            loss = sum(jsd(h.to(W.dtype), W, z_t.to(W.dtype), W) for h in hs)
        else:
            loss = sum(sum(head_losses(h, z_t, labels, head, tau=1.0)) for h in hs)
    loss.backward()
    return loss.item()


def allocator_peak(fn) -> int:
    """Peak bytes held by torch's CPU allocator during fn(), above the level when it began (profiler memory events)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def run_variant(size, kind, chunk, device, reps, paths):
    head, hs, z_t, labels = make(**size, device=device, paths=paths)
    cuda = device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    one_pass(kind, head, hs, z_t, labels, chunk)  # warm-up
    for h in hs:
        h.grad = None
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        _cpu_peak_reset()
        base = _cpu_peak()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        loss = one_pass(kind, head, hs, z_t, labels, chunk)
        sync()
        times.append(time.perf_counter() - t0)
    if cuda:
        peak, rss = torch.cuda.max_memory_allocated() - base, None
    else:
        rss = _cpu_peak() - base
        for h in hs:
            h.grad = None
        peak = allocator_peak(lambda: one_pass(kind, head, hs, z_t, labels, chunk))
    name = kind if chunk is None else f"{kind} {chunk}"
    return dict(variant=name, kind=kind, chunk=chunk, paths=paths, ms=1e3 * statistics.median(times),
                peak_gib=peak / 2 ** 30, rss_gib=None if rss is None else rss / 2 ** 30, loss=loss)


def _cpu_child(conn, size, kind, chunk, reps, paths, threads):
    torch.set_num_threads(threads)
    conn.send(run_variant(size, kind, chunk, "cpu", reps, paths))
    conn.close()


def run_cpu_variant(size, kind, chunk, reps, paths):
    """One CPU variant in a forked child, so that its peak resident set is its own."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    p = ctx.Process(target=_cpu_child, args=(send, size, kind, chunk, reps, paths, threads))
    p.start()
    send.close()
    row = recv.recv()
    p.join()
    return row


def with_goal(rows):
    """Add each row's % of the naive peak, its time / naive, and whether it meets the goal (all but naive)."""
    naive = rows[0]
    for r in rows:
        r["pct_of_naive_peak"] = 100 * r["peak_gib"] / naive["peak_gib"] if naive["peak_gib"] > 0 else None
        r["time_vs_naive"] = r["ms"] / naive["ms"]
        if r["kind"] != "naive":
            r["ok_memory"] = r["pct_of_naive_peak"] is not None and r["pct_of_naive_peak"] <= GOAL_MEMORY_PCT
            r["ok_time"] = r["time_vs_naive"] <= GOAL_TIME
    return rows


def table(title, size, rows, paths):
    print(f"\n{title}: V_l={size['V']}, d_l={size['d']}, N={size['N']}, head {size['dtype']}, fp32 logits, "
          f"{paths} path(s) on one teacher")
    print("| variant | fwd+bwd ms (median) | time / naive | peak extra GiB | % of naive peak | RSS rise GiB | loss |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        pct = "-" if r["pct_of_naive_peak"] is None else f"{r['pct_of_naive_peak']:.1f}%"
        rss = "-" if r["rss_gib"] is None else f"{r['rss_gib']:.3f}"
        print(f"| {r['variant']} | {r['ms']:.1f} | {r['time_vs_naive']:.2f} | {r['peak_gib']:.3f} | {pct} | {rss} | "
              f"{r['loss']:.5f} |")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--size", choices=["auto", *SIZES], default="auto", help="auto: cuda if a GPU is present, else cpu")
    p.add_argument("--cpu", action="store_true", help="same as --size cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--chunks", default=None, help="comma-separated (default: N/16, N/8, N/4 of the size)")
    p.add_argument("--paths", type=int, default=1, help="Recalibrator paths on one teacher (a stage has 2)")
    p.add_argument("--variants", default="fused,liger", help="besides naive: any of fused, liger")
    p.add_argument("--json", default=None, help="write the rows here (rewritten after each variant)")
    a = p.parse_args(argv)
    name = "cpu" if a.cpu else a.size
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    size = SIZES[name]
    device = "cuda" if name == "cuda" else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--size cuda needs a GPU")
    chunks = [int(c) for c in a.chunks.split(",")] if a.chunks else [size["N"] // k for k in (16, 8, 4)]
    kinds = a.variants.split(",")
    todo = [("naive", None)] + [(k, c) for k in ("fused",) if k in kinds for c in chunks]
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {os.environ.get('OMP_NUM_THREADS', '1')} thread(s)"
    out = dict(size=name, **size, paths=a.paths, device=where, torch=torch.__version__, reps=a.reps,
               goal=f"time <= {GOAL_TIME}x naive, peak <= {GOAL_MEMORY_PCT}% of naive", rows=[], skipped={})
    if "liger" in kinds:
        reason = liger_loss()[1]
        if reason:
            out["skipped"]["liger"] = reason
            print(f"liger: skipped: {reason}")
        else:
            todo.append(("liger", None))
    for kind, c in todo:
        run = run_variant(size, kind, c, "cuda", a.reps, a.paths) if device == "cuda" else \
            run_cpu_variant(size, kind, c, a.reps, a.paths)
        out["rows"].append(run)
        with_goal(out["rows"])
        if device == "cuda":
            torch.cuda.empty_cache()
        if a.json:
            with open(a.json, "w") as f:
                json.dump(out, f, indent=1)
    table(f"{where}, torch {torch.__version__}", size, out["rows"], a.paths)
    met = [r["variant"] for r in out["rows"] if r.get("ok_time") and r.get("ok_memory")]
    print(f"goal ({out['goal']}) met by: {', '.join(met) or 'none'}")
    return out


if __name__ == "__main__":
    main()
