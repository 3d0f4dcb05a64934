"""The GPU check: every CUDA test and GPU figure of docs/scaling.md in one run of 7 minutes or less.

    bash benchmarks/gpu_check.sh OUT                 # on the GPU machine; it runs:
    python benchmarks/gpu_check.py OUT               # needs only torch, transformers and accelerate importable
    python benchmarks/gpu_check.py OUT --dry-run     # every step on CPU at reduced sizes (well under a minute)

Nothing is installed: the package is imported from this checkout (the script puts the repository root first on
sys.path). Each step runs in a child process of its own, under its own timeout (capped by what is left of
--budget-s), and writes its results to OUT/<step>.json; a step that times out or crashes still leaves a JSON file
saying so, with whatever rows it had written. OUT/summary.json lists every step's status and time.

Steps:
  env        versions (python, torch + its CUDA, transformers, accelerate), whether torchvision and pytest import,
             whether Idefics3's PIL image processor builds, the GPU and its memory
  tests      tests/test_gpu.py: with pytest if it imports, else its CASES called directly (a skipped case says why);
             in the dry run the cases run directly on CPU (pytest would skip them all there)
  head_loss  benchmarks/bench_head_loss.py: the teacher-head CE + KL, naive and fused at chunks 512/1024/2048
             and Liger-Kernel's fused linear JSD where it imports, at V_l=152,064, d_l=8192, N=8192, bf16: time and
             peak extra memory as ratios to naive; goal <= 3% of the naive peak in <= 0.8x the naive time
  bench      `minigenrecal.scale.bench` stages 1 and 2 of smolvlm-256m<-qwen2-vl-2b at random weights: tokens/s, peak
             memory, MFU against 989 TFLOP/s
  fit        the largest preset pair that trains on this GPU from a teacher cache: presets in decreasing order of
             their memory estimate (batch 1 x 1024 tokens, chunk 512), each stage 1 then 2 until one runs both;
             an estimate above the GPU's memory is refused without building anything
Dry run: sizes shrink (models to 3% of their widths and depths, the loss to V_l=4096, d_l=128, N=512); children are
forked from this process, which imports torch and transformers once. On a GPU they are spawned (fresh interpreters,
so no CUDA state crosses a fork) and this process never touches CUDA.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PAIR = "smolvlm-256m<-qwen2-vl-2b"
# qwen2-vl-7b<-internvl2.5-78b is left out: same student and teacher width as qwen2-vl-7b<-qwen2-vl-72b (its head has
# 390 fewer rows), so it fits exactly when that one does
FIT_CANDIDATES = ("internvl2.5-8b<-internvl2.5-78b", "qwen2-vl-7b<-qwen2-vl-72b", "smolvlm-256m<-qwen2-vl-2b")
TIMEOUTS = {"env": 60, "tests": 100, "head_loss": 90, "bench": 120, "fit": 150}  # seconds; fit: per candidate
GPU = dict(scale=1.0, batch=4, lq=768, la=256, steps=5, fit_batch=1, fit_steps=2, reps=5)
DRY = dict(scale=0.03, batch=1, lq=24, la=8, steps=1, fit_batch=1, fit_steps=1, reps=1)


def write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _first_words(e: BaseException, n: int = 240) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


def _probe(module: str) -> dict:
    try:
        m = __import__(module)
        return {"importable": True, "version": getattr(m, "__version__", "?")}
    except Exception as e:  # ImportError, or a broken install raising anything else
        return {"importable": False, "error": _first_words(e)}


# -- steps (each runs in its own child process; `o` is the step's options, `path` its JSON file) --------------
def step_env(o: dict, path: Path) -> str:
    import accelerate
    import torch
    import transformers
    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "torchvision": _probe("torchvision"), "pytest": _probe("pytest"),
            "cuda_available": torch.cuda.is_available(), "dry_run": o["dry_run"], "gpus": []}
    try:
        transformers.Idefics3ImageProcessorPil()
        info["idefics3_pil_processor"] = "builds"
    except Exception as e:
        info["idefics3_pil_processor"] = _first_words(e)
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            info["gpus"].append({"name": p.name, "total_gib": p.total_memory / 2 ** 30,
                                 "capability": f"{p.major}.{p.minor}"})
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        info["nvidia_smi"] = f"not run: {type(e).__name__}"
    for k in ("python", "torch", "torch_cuda", "transformers", "accelerate"):
        print(f"  {k:13s} {info[k]}")
    for k in ("torchvision", "pytest"):
        v = info[k]
        print(f"  {k:13s} {'imports, ' + str(v['version']) if v['importable'] else 'does not import (' + v['error'] + ')'}")
    print(f"  idefics3 PIL  {info['idefics3_pil_processor']}")
    print(f"  GPUs          {info['gpus'] or 'none'}")
    write_json(path, {"status": "ok", **info})
    return "ok"


def _load_gpu_tests():
    spec = importlib.util.spec_from_file_location("gpu_cases", ROOT / "tests" / "test_gpu.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tests_direct(device: str) -> list[dict]:
    mod = _load_gpu_tests()
    cases = []
    for name, fn, kw in mod.CASES:
        t0 = time.perf_counter()
        try:
            fn(**kw, device=device)
            status, msg = "passed", ""
        except mod.CaseSkipped as e:
            status, msg = "skipped", str(e)
        except Exception as e:
            status, msg = "failed", "".join(traceback.format_exception(e)[-6:])
        cases.append({"name": name, "status": status, "seconds": time.perf_counter() - t0, "message": msg})
        print(f"  {status:7s} {name} ({cases[-1]['seconds']:.1f} s){': ' + msg.splitlines()[-1] if msg else ''}")
    return cases


def _tests_pytest(out: Path) -> tuple[list[dict], int, str]:
    junit = out / "tests_junit.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "tests/test_gpu.py",
                        "-p", "no:cacheprovider", f"--junitxml={junit}"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    print(r.stdout[-4000:], r.stderr[-2000:], sep="\n")
    cases = []
    if junit.exists():
        for tc in ET.parse(junit).getroot().iter("testcase"):
            status, msg = "passed", ""
            for tag in ("failure", "error", "skipped"):
                el = tc.find(tag)
                if el is not None:
                    status = "skipped" if tag == "skipped" else "failed"
                    msg = (el.get("message") or "") + "\n" + (el.text or "")[-1500:]
            cases.append({"name": tc.get("name"), "status": status, "seconds": float(tc.get("time") or 0),
                          "message": msg.strip()})
    return cases, r.returncode, (r.stdout + r.stderr)[-6000:]


def step_tests(o: dict, path: Path) -> str:
    runner = o["tests_runner"]
    if runner == "auto":
        runner = "direct" if o["dry_run"] or not _probe("pytest")["importable"] else "pytest"
    if runner == "pytest":
        cases, rc, tail = _tests_pytest(path.parent)
        extra = {"returncode": rc, "output_tail": tail}
    else:
        if not o["dry_run"] and not _probe("pytest")["importable"]:
            print("  pytest does not import here: running tests/test_gpu.py's CASES directly")
        cases, extra = _tests_direct("cpu" if o["dry_run"] else "cuda"), {}
    counts = {s: sum(c["status"] == s for c in cases) for s in ("passed", "failed", "skipped")}
    failed = counts["failed"] or (runner == "pytest" and extra["returncode"] not in (0, 5)) or not cases
    status = "failed" if failed else "ok" if counts["passed"] else "skipped"
    write_json(path, {"status": status, "runner": runner, "device": "cpu" if o["dry_run"] else "cuda",
                      "counts": counts, "cases": cases, **extra})
    return status


def step_head_loss(o: dict, path: Path) -> str:
    spec = importlib.util.spec_from_file_location("bench_head_loss", ROOT / "benchmarks" / "bench_head_loss.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    size = "dry" if o["dry_run"] else "cuda"
    chunks = None if o["dry_run"] else ",".join(map(str, mod.CUDA_CHUNKS))
    res = mod.main(["--size", size, "--reps", str(o["sizes"]["reps"]), "--json", str(path)]
                   + (["--chunks", chunks] if chunks else []))
    met = [r["variant"] for r in res["rows"] if r.get("ok_memory") and r.get("ok_time")]
    write_json(path, {"status": "ok", **res, "goal_met_by": met})
    return "ok"


def _bench_rows(o: dict, path: Path, preset: str, use_cache: bool, batch: int, steps: int, stages) -> str:
    import torch

    from minigenrecal.scale.bench import WillNotFit, bench
    from minigenrecal.models.presets import get_preset
    s = o["sizes"]
    chunk = get_preset(preset).stage1.chunk_size
    doc = {"status": "running", "preset": preset, "cache": use_cache, "chunk": chunk, "peak_tflops": 989.0,
           "rows": []}

    def on_row(row):
        doc["rows"].append(row)
        write_json(path, doc)

    try:
        bench(preset, scale=s["scale"], batch=batch, lq=s["lq"], la=s["la"], steps=steps, chunk=chunk,
              use_cache=use_cache, stages=stages, on_row=on_row, verbose=True, capacity_gib=o.get("capacity_gib"))
        doc["status"] = "ok"
    except torch.OutOfMemoryError as e:
        doc["status"], doc["error"] = "oom", str(e).splitlines()[0]
    except WillNotFit as e:
        doc["status"], doc["error"] = "refused", str(e)
    for r in doc["rows"]:
        print(f"  stage {r['stage']}: {r['tokens_per_s']:.0f} tokens/s, step {r['step_s']:.3f} s, peak "
              f"{r['peak_gib']:.2f} GiB (estimate {r['estimate_gib']:.2f}), MFU {100 * r['mfu']:.1f}%")
    write_json(path, doc)
    return doc["status"]


def step_bench(o: dict, path: Path) -> str:
    s = o["sizes"]
    return _bench_rows(o, path, PAIR, False, s["batch"], s["steps"], (1, 2))


def step_fit_one(o: dict, path: Path) -> str:
    s = o["sizes"]
    return _bench_rows(o, path, o["preset"], True, s["fit_batch"], s["fit_steps"], o["stages"])


STEPS = {"env": step_env, "tests": step_tests, "head_loss": step_head_loss, "bench": step_bench,
         "fit_one": step_fit_one}


# -- running a step in a child, under a timeout ---------------------------------------------------------
def _child(name: str, o: dict, path: str) -> None:
    os.setpgrp()  # its own process group, so a timeout also ends what it started (pytest)
    if o["dry_run"]:
        import torch
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        status = STEPS[name](o, Path(path))
    except BaseException as e:
        doc = read_json(Path(path))
        doc.update(status="error", error="".join(traceback.format_exception(e)[-8:]))
        write_json(Path(path), doc)
        print(doc["error"], file=sys.stderr)
        sys.exit(1)
    sys.exit(0 if status in ("ok", "skipped") else 2)


def run_step(name: str, o: dict, path: Path, timeout: float, ctx) -> dict:
    print(f"\n== {name} ({path.name}, timeout {timeout:.0f} s) ==", flush=True)
    if path.exists():
        path.unlink()
    t0 = time.perf_counter()
    p = ctx.Process(target=_child, args=(name, o, str(path)))
    p.start()
    p.join(timeout)
    timed_out = p.is_alive()
    if timed_out:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            p.kill()
        p.join()
    seconds = time.perf_counter() - t0
    doc = read_json(path)
    if timed_out:
        doc["status"] = "timeout"
        doc["error"] = f"killed after {timeout:g} s"
    elif not doc:
        doc = {"status": "error", "error": f"the step's process exited with code {p.exitcode} and wrote nothing"}
    doc["seconds"] = seconds
    write_json(path, doc)
    print(f"-- {name}: {doc['status']} in {seconds:.1f} s", flush=True)
    return doc


def fit_candidates(o: dict) -> list[tuple[str, dict]]:
    """(preset, {stage: estimate GiB}) in decreasing order of the stage-2 estimate."""
    from minigenrecal.scale.bench import estimate_memory
    from minigenrecal.models.presets import get_preset
    s = o["sizes"]
    out = []
    for name in FIT_CANDIDATES:
        kw = dict(batch=s["fit_batch"], lq=s["lq"], la=s["la"], use_cache=True, scale=s["scale"],
                  chunk=get_preset(name).stage1.chunk_size, weight_bytes=4 if o["dry_run"] else 2)
        out.append((name, {st: estimate_memory(name, st, **kw)["total"] for st in (1, 2)}))
    return sorted(out, key=lambda c: -c[1][2])


def run_fit(o: dict, out: Path, deadline: float, ctx) -> dict:
    env = read_json(out / "env.json")
    capacity = env["gpus"][0]["total_gib"] if env.get("gpus") else None
    doc = {"status": "running", "capacity_gib": capacity, "batch": o["sizes"]["fit_batch"],
           "tokens": o["sizes"]["lq"] + o["sizes"]["la"], "candidates": [], "largest_fit": None,
           "largest_stage1_fit": None}
    print(f"\n== fit (fit.json): presets from a teacher cache, largest first; GPU memory "
          f"{'unknown (no limit)' if capacity is None else f'{capacity:.1f} GiB'} ==", flush=True)
    for name, est in fit_candidates(o):
        c = {"preset": name, "estimate_gib": est}
        left = deadline - time.time()
        stages = [st for st in (1, 2) if capacity is None or est[st] <= capacity]
        if not stages or stages == [2]:
            c.update(status="refused", note=f"estimate {est[1]:.1f} GiB > {capacity:.1f} GiB: not built")
        elif left < 20:
            c.update(status="not run", note="out of time")
        else:
            if stages == [1]:
                c["note"] = f"stage 2 refused: estimate {est[2]:.1f} GiB > {capacity:.1f} GiB"
            file = out / f"fit_{len(doc['candidates'])}.json"
            r = run_step("fit_one", {**o, "preset": name, "stages": stages, "capacity_gib": capacity}, file,
                         min(o["timeouts"]["fit"], left), ctx)
            c.update(status=r["status"], file=file.name, seconds=r["seconds"], rows=r.get("rows", []),
                     error=r.get("error"))
        print(f"  {name}: {c['status']} (estimate stage 1 {est[1]:.1f} GiB, stage 2 {est[2]:.1f} GiB)")
        doc["candidates"].append(c)
        stages_run = {r["stage"]: r["peak_gib"] for r in c.get("rows", [])}
        if 1 in stages_run and doc["largest_stage1_fit"] is None:
            doc["largest_stage1_fit"] = {"preset": name, "peak_gib": stages_run[1]}
        if {1, 2} <= set(stages_run):
            doc["largest_fit"] = {"preset": name, "peak_gib": stages_run}
            break
        write_json(out / "fit.json", doc)
    doc["status"] = "ok" if doc["largest_fit"] else "failed"
    write_json(out / "fit.json", doc)
    return doc


def print_figures(out: Path) -> None:
    """The figures docs/scaling.md asks for, from the step files (whatever exists)."""
    env, hl, b, fit = (read_json(out / f) for f in ("env.json", "head_loss.json", "bench.json", "fit.json"))
    gpu = (env.get("gpus") or [{}])[0]
    print(f"\n== figures: {gpu.get('name', 'no GPU')} ({gpu.get('total_gib', 0):.1f} GiB), torch {env.get('torch')} "
          f"(CUDA {env.get('torch_cuda')}), transformers {env.get('transformers')}, accelerate {env.get('accelerate')} ==")
    tests = read_json(out / "tests.json")
    if tests.get("cases"):
        print(f"tests ({tests.get('runner')}): {tests.get('counts')}")
        for c in tests["cases"]:
            print(f"  {c['status']:7s} {c['name']}{'  ' + c['message'].splitlines()[0] if c['message'] else ''}")
    if hl.get("rows"):
        print(f"head loss V_l={hl.get('V')} d_l={hl.get('d')} N={hl.get('N')} {hl.get('dtype')}: "
              f"goal met by {hl.get('goal_met_by')}")
        for r in hl["rows"]:
            pct = r.get("pct_of_naive_peak")
            print(f"  {r['variant']:13s} {r['ms']:9.1f} ms  {r['peak_gib']:8.3f} GiB  "
                  f"{'-' if pct is None else f'{pct:.1f}%':>7s} of naive peak  x{r['time_vs_naive']:.2f} naive time")
    for r in b.get("rows", []):
        print(f"bench {r['preset']} stage {r['stage']} (B {r['batch']} x {r['T_s']}): {r['tokens_per_s']:.0f} tokens/s, "
              f"MFU {100 * r['mfu']:.1f}%, peak {r['peak_gib']:.2f} GiB (estimate {r['estimate_gib']:.2f})")
    for c in fit.get("candidates", []):
        peaks = ", ".join(f"stage {r['stage']} {r['peak_gib']:.2f} GiB" for r in c.get("rows", []))
        print(f"fit {c['preset']}: {c['status']}{' (' + peaks + ')' if peaks else ''}"
              f"{'  ' + c['note'] if c.get('note') else ''}")
    if "candidates" in fit:
        print(f"largest pair that trains from the cache (stages 1 and 2): {fit.get('largest_fit')}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", help="directory for the JSON files")
    p.add_argument("--dry-run", action="store_true", help="every step on CPU at reduced sizes")
    p.add_argument("--budget-s", type=float, default=400.0, help="the whole check ends within this (seconds)")
    p.add_argument("--only", default=None, help="comma-separated steps (env is always run): tests,head_loss,bench,fit")
    p.add_argument("--tests-runner", choices=["auto", "pytest", "direct"], default="auto")
    p.add_argument("--start-method", choices=["auto", "fork", "spawn"], default="auto",
                   help="how step processes start (auto: fork for the dry run, spawn on a GPU)")
    p.add_argument("--timeout", action="append", default=[], metavar="STEP=SECONDS",
                   help=f"override a step's timeout (defaults: {TIMEOUTS}; fit: per candidate)")
    a = p.parse_args(argv)
    timeouts = dict(TIMEOUTS)
    for t in a.timeout:
        k, v = t.split("=")
        if k not in timeouts:
            raise SystemExit(f"--timeout {t}: no step {k!r}; steps: {', '.join(timeouts)}")
        timeouts[k] = float(v)
    t_start = time.time()
    deadline = t_start + a.budget_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # a step killed at its timeout has still shown what it printed
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    ctx = mp.get_context(a.start_method if a.start_method != "auto" else "fork" if a.dry_run else "spawn")
    if ctx.get_start_method() == "fork":  # children are forked from here: import what they all need once
        import torch  # noqa: F401
        import minigenrecal.scale.bench  # noqa: F401
        import minigenrecal.stages  # noqa: F401
        import minigenrecal.models.tiny  # noqa: F401
    o = {"dry_run": a.dry_run, "sizes": DRY if a.dry_run else GPU, "tests_runner": a.tests_runner,
         "timeouts": timeouts}
    wanted = ["env"] + [s for s in ("tests", "head_loss", "bench", "fit") if a.only is None or s in a.only.split(",")]
    print(f"GPU check{' (DRY RUN: CPU, reduced sizes)' if a.dry_run else ''}: steps {', '.join(wanted)}; "
          f"results in {out}; budget {a.budget_s:.0f} s", flush=True)
    summary = {"dry_run": a.dry_run, "budget_s": a.budget_s, "steps": []}
    for name in wanted:
        left = deadline - time.time()
        if left < 10:
            write_json(out / f"{name}.json", {"status": "not run", "error": "out of time"})
            summary["steps"].append({"name": name, "status": "not run", "seconds": 0.0, "file": f"{name}.json"})
            continue
        if name != "env" and not a.dry_run and not read_json(out / "env.json").get("cuda_available"):
            doc = {"status": "not run", "error": "no CUDA device here: run on a GPU, or use --dry-run"}
            write_json(out / f"{name}.json", doc)
            print(f"-- {name}: not run (no CUDA device; --dry-run runs the steps on CPU)")
        elif name == "fit":
            doc = run_fit(o, out, deadline, ctx)
            doc["seconds"] = sum(c.get("seconds", 0.0) for c in doc["candidates"])
        else:
            doc = run_step(name, o, out / f"{name}.json", min(timeouts[name], left), ctx)
        summary["steps"].append({"name": name, "status": doc["status"], "seconds": doc.get("seconds", 0.0),
                                 "file": f"{name}.json"})
    env = read_json(out / "env.json")
    summary.update(total_s=time.time() - t_start, versions={k: env.get(k) for k in
                   ("python", "torch", "torch_cuda", "transformers", "accelerate")},
                   torchvision=env.get("torchvision"), pytest=env.get("pytest"),
                   gpu=(env.get("gpus") or [{}])[0].get("name", "cpu"))
    write_json(out / "summary.json", summary)
    print_figures(out)
    print(f"\n== summary ({summary['total_s']:.0f} s; {out / 'summary.json'}) ==")
    for s in summary["steps"]:
        print(f"  {s['name']:10s} {s['status']:8s} {s['seconds']:6.1f} s  {s['file']}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
