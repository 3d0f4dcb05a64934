"""The flat training loop: rendered pairs, one engine per run, `train_stage`, and `run_stages` over a plan.

Decision (one engine per run): a run prepares ONE module (student + Recalibrator) and ONE AdamW for all its stages;
a stage prepares nothing new (a second `prepare` would leave DeepSpeed stepping the first engine). It switches what
trains: every parameter that trains in SOME stage of the run gets `requires_grad=True` once, before preparing, so
DDP's reducer, FSDP2 and DeepSpeed all know it; what a stage does not train receives no gradient (stage 1 runs the
student body under `no_grad`; stage 3 never calls the Recalibrator) and its optimizer group runs at lr 0, which
leaves AdamW's update and its decoupled weight decay exactly zero. `begin(stage)` sets each group's lr and weight
decay, clears AdamW's moments (each stage starts fresh, as the paper's three separate runs do), starts the stage's
LR schedule and its gradient accumulation. Trainable parameters are fp32 master weights whatever dtype they loaded
in; compute runs in bf16 under autocast on CUDA.

The teacher's head is never in the module: a replicated frozen `nn.Linear` (2.5 GB at 72B, never gathered per chunk).

What is not the method plugs in from outside: a `Backend` (how the module is prepared: one process or DDP here;
FSDP2 and ZeRO-3 in `scale.backends`), `Callback`s (checkpoints and resume, evaluation after a stage, a launch's
probes), as minGPT's trainer callbacks do, and a data set's own loader (`data.make_loader`: render workers).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from minigenrecal.losses import TeacherOut
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.stages import GROUPS, GenRecal, StageConfig, group_of, teacher_forward, trains


# -- data -----------------------------------------------------------------------------------------------
class PairData(torch.utils.data.Dataset):
    """Pre-rendered samples: (student Encoded, teacher Encoded or None, index)."""

    def __init__(self, student_encs: list, teacher_encs: list | None = None):
        self.s, self.t = student_encs, teacher_encs

    def __len__(self):
        return len(self.s)

    def __getitem__(self, i):
        return self.s[i], (self.t[i] if self.t is not None else None), i

    def sample_id(self, i: int) -> str:
        return self.s[i].id


class RankLocal(torch.utils.data.Dataset):
    """A map-style dataset that already holds only this process's share: shuffled, never split again."""


LENGTHS = ("q_lens", "a_lens")  # index rows on the host: read from a device, each would make the host wait


def make_collate(student, teacher):
    """(student batch, teacher batch or None, indices, host): `host` holds the indices and each side's lengths as
    Python lists, which any loader's device move (accelerate's included) leaves where they are."""
    def collate(items):
        s = student.collate([it[0] for it in items])
        t = teacher.collate([it[1] for it in items]) if teacher is not None and items[0][1] is not None else None
        idx = [it[2] for it in items]
        host = {"idx": idx, "s": {k: s[k].tolist() for k in LENGTHS},
                "t": None if t is None else {k: t[k].tolist() for k in LENGTHS}}
        return s, t, torch.tensor(idx), host
    return collate


def on_host(s, t, idx, host):
    """The batches with their lengths, and the indices, as host tensors again (after the loader moved them)."""
    put = lambda b, lens: None if b is None else {**b, **{k: torch.tensor(v) for k, v in lens.items()}}  # noqa: E731
    return put(s, host["s"]), put(t, host["t"]), torch.tensor(host["idx"])


class on_device:
    """A loader whose (student batch, teacher batch, indices, host) come out on `device`, as accelerate's prepared
    loaders."""

    def __init__(self, loader, device):
        self.loader, self.device = loader, device

    def __iter__(self):
        move = lambda b: None if b is None else {k: v.to(self.device) for k, v in b.items()}  # noqa: E731
        for s, t, idx, host in self.loader:
            yield move(s), move(t), idx, host


def make_loader(data, cfg: StageConfig, acc, g: torch.Generator, collate):
    """A stream in order; a process's own share shuffled; anything else shuffled and split by accelerate."""
    if isinstance(data, torch.utils.data.IterableDataset):
        return on_device(DataLoader(data, batch_size=cfg.batch_size, collate_fn=collate), acc.device)
    loader = DataLoader(data, batch_size=cfg.batch_size, shuffle=True, generator=g,
                        drop_last=len(data) >= cfg.batch_size, collate_fn=collate)
    return on_device(loader, acc.device) if isinstance(data, RankLocal) else acc.prepare(loader)


class Batches:
    """Endless batches from a loader. Its position (the sampler generator's state when the current epoch began, and
    the batches drawn since) is enough to rebuild the same iterator and continue from the same batch (a checkpoint
    saves and restores it: `scale.checkpoint`)."""

    def __init__(self, loader, generator: torch.Generator):
        self.loader, self.g = loader, generator
        self.restart()

    def restart(self):
        self.epoch_state, self.drawn = self.g.get_state(), 0
        self.it = iter(self.loader)

    def __next__(self):
        try:
            batch = next(self.it)
        except StopIteration:
            self.restart()
            batch = next(self.it)
        self.drawn += 1
        return batch


# -- the backend: how the module is prepared (one process or DDP here; FSDP2 and ZeRO-3 in scale.backends) --------
class Backend(Protocol):
    name: str
    acc: object  # what the loop talks to: prepare, accumulate, autocast, backward, sync_gradients, reduce, device

    def wrap(self, module: nn.Module) -> nn.Module: ...
    def prepare_module(self, module: nn.Module, opt) -> tuple: ...  # (module, optimizer to step, inner optimizer)
    def set_grad_accum(self, n: int) -> None: ...


_ACCELERATOR = None


def get_accelerator(grad_accum: int = 1):
    """One Accelerator per process: bf16 autocast on CUDA, fp32 on CPU; DDP tolerates frozen/unused params."""
    global _ACCELERATOR
    if not torch.cuda.is_available():  # accelerate imports DeepSpeed when installed; it would warn on every run
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from accelerate import Accelerator, DistributedDataParallelKwargs  # imported here: after DS_ACCELERATOR is set
    from accelerate.utils import GradientAccumulationPlugin  # imported here: after DS_ACCELERATOR is set
    if _ACCELERATOR is None:
        _ACCELERATOR = Accelerator(mixed_precision="bf16" if torch.cuda.is_available() else "no",
                                   cpu=not torch.cuda.is_available(),
                                   # a window is exactly grad_accum micro-batches, also across an epoch's end
                                   gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=1,
                                                                                           sync_with_dataloader=False),
                                   kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    _ACCELERATOR.gradient_accumulation_steps = grad_accum
    # every Accelerator of a process shares one GradientState, and the last one built (a Trainer's, lmms-eval's) sets it
    _ACCELERATOR.gradient_state.plugin_kwargs["sync_with_dataloader"] = False
    _ACCELERATOR.step = 0  # each stage starts a fresh accumulation window
    return _ACCELERATOR


def reset_accelerator() -> None:
    """Forget this process's Accelerator and accelerate's per-process state, which every Accelerator shares (a
    Trainer's too, with its own settings); the next `get_accelerator` builds a fresh one. Single-process use only."""
    global _ACCELERATOR
    from accelerate.state import AcceleratorState, GradientState  # imported here: after DS_ACCELERATOR is set
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    _ACCELERATOR = None


class AccelerateBackend:
    """The student module through accelerate's `prepare` (DDP across processes); the teacher is replicated."""

    name = "accelerate"

    def __init__(self):
        self.acc = get_accelerator()

    def wrap(self, module: nn.Module) -> nn.Module:
        return module

    def prepare_module(self, module, opt):
        module, prepared = self.acc.prepare(module, opt)
        return module, prepared, opt

    def set_grad_accum(self, n: int) -> None:
        self.acc.gradient_accumulation_steps = n
        self.acc.step = 0  # each stage starts a fresh accumulation window

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.acc.unwrap_model(module).state_dict().items()}


# -- the engine: one module and one AdamW of three groups for a run ----------------------------------------------
def decay_fn(cfg: StageConfig):
    """LR multiplier per step: optional linear warmup (0 by default, as in the paper), then linear lr -> lr_end."""
    def decay(s):
        if s < cfg.warmup_steps:
            return (s + 1) / cfg.warmup_steps
        return 1.0 - (1.0 - cfg.lr_end / cfg.lr) * min(s, cfg.steps) / max(cfg.steps, 1)
    return decay


class Engine:
    """`module` (default: student + Recalibrator + the frozen teacher head beside them) prepared once for `plan`.
    After `begin(stage, cfg)`: `acc`, `module`, `opt`, `sched`. A baseline passes its own module (a loss of its own)."""

    def __init__(self, student, recal: nn.Module | None, teacher_head: nn.Linear | None,
                 plan: dict[int, StageConfig], backend: Backend | None = None, module: nn.Module | None = None):
        self.backend = backend or AccelerateBackend()
        module = module if module is not None else GenRecal(student, recal, teacher_head)
        on = {g: any(trains(g, s, c) for s, c in plan.items()) for g in GROUPS}
        for name, p in module.named_parameters():
            p.requires_grad_(on[group_of(name)])
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()  # fp32 master weights (AdamW's 1e-5-scale updates vanish in bf16)
        module = self.backend.wrap(module)  # FSDP2 shards here, before the optimizer sees the parameters
        groups = [{"params": [p for n, p in module.named_parameters() if p.requires_grad and group_of(n) == g],
                   "lr": 0.0, "name": g} for g in GROUPS]
        opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0)
        self.acc = self.backend.acc
        self.module, self.opt, self.inner = self.backend.prepare_module(module, opt)
        self.sched = None

    def begin(self, stage: int, cfg: StageConfig):
        """Switch to `stage`: per-group lr and weight decay, fresh AdamW moments, the stage's LR schedule (returned)
        and gradient accumulation."""
        self.backend.set_grad_accum(cfg.grad_accum)
        for g in self.inner.param_groups:
            lr = (cfg.lr * (cfg.vision_lr_scale if g["name"] == "vision" else 1.0)) if trains(g["name"], stage, cfg) else 0.0
            g["lr"] = g["initial_lr"] = lr
            g["weight_decay"] = cfg.weight_decay
        self.inner.state.clear()
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.inner, decay_fn(cfg))
        return self.sched


# -- the non-finite guard ------------------------------------------------------------------------------------
class NonFiniteError(RuntimeError):
    """Too many optimizer steps in a row had a non-finite loss or gradient."""


def skips_message(st, loss: float, ids: list[int], process: int) -> str:
    return (f"stage {st.stage}, step {st.step}: {st.in_row} steps in a row had a non-finite loss or gradient (last "
            f"loss {loss}); the last batch's sample ids: {[st.data.sample_id(i) for i in ids]} (dataset indices "
            f"{ids}, process {process})")


def grad_norm(acc, module: nn.Module) -> torch.Tensor | None:
    """The (synchronized) gradient's global L2 norm: the backend's own where it holds the gradients itself (ZeRO-3
    partitions them: `p.grad` is None there), else over `p.grad` (an FSDP2 DTensor norm is made whole)."""
    own = getattr(acc, "global_grad_norm", None)
    if own is not None:
        return own(module)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not grads:
        return None
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def all_finite(acc, finite: torch.Tensor, module: nn.Module) -> bool:
    """Were the losses finite (`finite`), and is the (synchronized) gradient? One verdict on every process."""
    ok = finite.to(acc.device)
    norm = grad_norm(acc, module)
    if norm is not None:
        ok = ok & torch.isfinite(norm)
    if acc.num_processes > 1:
        ok = acc.reduce((~ok).float(), "sum") == 0
    return bool(ok)


def total(acc, t: torch.Tensor) -> torch.Tensor:
    """`t` summed over processes."""
    return acc.reduce(t, "sum") if acc.num_processes > 1 else t


def scale_gradients(acc, module: nn.Module, c: torch.Tensor) -> None:
    """Multiply the (synchronized) gradient by `c`; a backend that holds it itself (ZeRO-3) scales its partitions.

    How the loss is normalised (TRL's rule, and the paper's token-level losses): by the answer tokens of the whole
    window, all its micro-batches on all processes, so a long answer weighs as many tokens as it has. Each micro-batch
    backpropagates its token-mean loss times its token count n_i; the backends divide by grad_accum and average over
    processes; at the window's end, with the global count N known, the gradient is scaled by grad_accum x processes / N.
    The unit is the student's answer tokens (known before any forward): exact for stage 3; for the teacher-head terms
    of stages 1-2 the teacher's own answer tokens are proportional to it up to the two tokenizers' ratio."""
    own = getattr(acc, "scale_grads", None)
    if own is not None:
        own(module, c)
        return
    for p in module.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad  # an FSDP2 shard scales in place
            g.mul_(c.to(g.dtype))


def per_token(acc, cfg: StageConfig) -> bool:
    """Is the loss normalised over a window (`scale_gradients`)? Not for one micro-batch on one process: its token
    mean already is, and the loss histories stay bit-identical."""
    return cfg.grad_accum > 1 or acc.num_processes > 1


def close_window(acc, module: nn.Module, opt, sched, cfg: StageConfig, finite: torch.Tensor, tokens) -> bool:
    """The accumulation window's end: normalise by its answer tokens, then clip and step unless the loss or the
    gradient is non-finite (the step is skipped); returns whether it stepped."""
    if per_token(acc, cfg):
        scale_gradients(acc, module, cfg.grad_accum * acc.num_processes / total(acc, tokens))
    if not all_finite(acc, finite, module):
        return False
    clip_gradients(acc, module, cfg.max_grad_norm)
    opt.step()
    sched.step()
    return True


def clip_gradients(acc, module: nn.Module, max_norm: float) -> None:
    """Scale the gradient to a global L2 norm of at most `max_norm` (0: off). A backend that clips inside its own
    optimizer step (DeepSpeed: `clip_in_step`) is told the limit instead."""
    own = getattr(acc, "clip_in_step", None)
    if own is not None:
        own(max_norm)
    elif max_norm > 0:
        torch.nn.utils.clip_grad_norm_([p for p in module.parameters() if p.grad is not None], max_norm)


# -- callbacks: what plugs into the loop -------------------------------------------------------------------------
@dataclass
class LoopState:
    """What a callback sees: the stage, its engine and batches, and the progress so far (a resume may set it)."""

    stage: int
    cfg: StageConfig
    engine: Engine
    batches: Batches
    data: object
    tokenizer: object
    recal: Recalibrator | None = None
    riders: list = field(default_factory=list)  # modules saved beside the trained one (stage 3's Recalibrator)
    history: list = field(default_factory=list)
    step: int = 0
    in_row: int = 0  # non-finite steps in a row


class Callback:
    """Hooks of `train_stage`; override what you need."""

    def done(self, stage: int) -> list[dict] | None:
        """A finished stage's history (the stage is then not run), or None."""
        return None

    def on_stage_begin(self, state: LoopState) -> None: ...
    def on_step_end(self, state: LoopState) -> None: ...
    def on_stage_end(self, state: LoopState) -> None: ...


class AfterStage(Callback):
    """Calls `fn(state)` when a stage has run (not for a stage a resume skips): evaluation, a diagnosis."""

    def __init__(self, fn: Callable[[LoopState], None]):
        self.fn = fn

    def on_stage_end(self, state: LoopState) -> None:
        self.fn(state)


# -- the loop -------------------------------------------------------------------------------------------
def train_stage(stage: int, student, data, cfg: StageConfig, teacher=None, recal: Recalibrator | None = None,
                teacher_head: nn.Linear | None = None,
                teacher_fn: Callable[[dict | None, torch.Tensor], TeacherOut] | None = None,
                progress: bool = True, answer_input: str = "features", *, callbacks=(), max_skips: int = 3,
                engine: Engine | None = None) -> list[dict]:
    """Train one stage for `cfg.steps` optimizer steps; returns a per-step history (every loss term, lr, skipped).

    `teacher_fn(t_batch, idx)` gives the TeacherOut (default: the live teacher's forward; a cache passes its own);
    stages 1-2 use it, and so does a stage-3 run given one (a baseline's module with a loss of its own).
    `engine` carries one prepared module and optimizer across a run's stages (default: a one-stage engine).
    A non-finite loss or gradient skips the step; `max_skips` in a row raise NonFiniteError naming the batch.
    """
    for cb in callbacks:
        if (history := cb.done(stage)) is not None:
            return history
    distil = stage in (1, 2) or teacher_fn is not None
    if distil:
        teacher_head = teacher_head if teacher_head is not None else teacher.head
        teacher_fn = teacher_fn or (lambda tb, idx: teacher_forward(teacher, tb, answer_input))
        teacher_head.requires_grad_(False)
    if teacher is not None:
        teacher.model.requires_grad_(False)
    riders = [recal] if engine is None and stage == 3 and recal is not None else []
    engine = engine or Engine(student, recal if distil else None, teacher_head if distil else None, {stage: cfg})
    sched = engine.begin(stage, cfg)
    acc, module, opt = engine.acc, engine.module, engine.opt
    g = torch.Generator().manual_seed(cfg.seed + stage)
    own = getattr(data, "make_loader", lambda *a: make_loader(data, *a))  # a lazy data set's own (data/feed.py)
    loader = own(cfg, acc, g, make_collate(student, teacher if distil else None))
    if teacher is not None and distil:
        teacher.to(acc.device)
    st = LoopState(stage, cfg, engine, Batches(loader, g), data, student.tokenizer, recal, riders)
    for cb in callbacks:
        cb.on_stage_begin(st)  # a checkpoint resumes here: history, step, in_row
    bar = tqdm(total=cfg.steps, initial=st.step, desc=f"stage {stage}", leave=False,
               disable=not progress or not acc.is_local_main_process)
    module.train()
    while st.step < cfg.steps:
        # 1. grad_accum micro-batches: the teacher's targets, the stage's loss terms, backward
        skipped, ids, finite, tokens = False, [], torch.tensor(True, device=acc.device), 0  # tokens: the window's answers
        for _ in range(cfg.grad_accum):
            s_batch, t_batch, idx = on_host(*next(st.batches))
            ids += idx.tolist()
            with acc.accumulate(module), acc.autocast():
                t = teacher_fn(t_batch, idx).to(acc.device) if distil else None
                terms = module(stage, s_batch, t, cfg)
                finite = finite & torch.isfinite(terms["loss"].detach())
                n = s_batch["a_lens"].sum()
                tokens = tokens + n
                acc.backward(terms["loss"] * n if per_token(acc, cfg) else terms["loss"])
                # 2. the optimizer steps where the accumulation window closes, unless something is non-finite
                if acc.sync_gradients:
                    skipped |= not close_window(acc, module, opt, sched, cfg, finite, tokens)
                    finite, tokens = torch.tensor(True, device=acc.device), 0
                opt.zero_grad()
        # 3. record the step (the stage's LR: groups it does not train run at 0), guard, callbacks
        rec = dict(zip(terms, torch.stack([v.detach().float() for v in terms.values()]).tolist()))  # one device read
        st.history.append({"stage": stage, "step": st.step, "lr": max(sched.get_last_lr()), **rec, "skipped": skipped})
        st.in_row = st.in_row + 1 if skipped else 0
        if st.in_row >= max_skips:
            raise NonFiniteError(skips_message(st, rec["loss"], ids, acc.process_index))
        bar.update(1)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        st.step += 1
        for cb in callbacks:
            cb.on_step_end(st)
    bar.close()
    module.eval()
    for cb in callbacks:
        cb.on_stage_end(st)
    return st.history


def run_stages(plan: dict[int, StageConfig], student, data, teacher=None, recal: Recalibrator | None = None, *,
               depth: int = 2, seed: int = 0, d_l: int | None = None, engine: Engine | None = None,
               teacher_head: nn.Linear | None = None, teacher_fn=None, answer_input: str = "features",
               progress: bool = True, callbacks=(), max_skips: int = 3) -> tuple[Recalibrator | None, dict[int, list[dict]]]:
    """The one orchestration: seed, build the Recalibrator (unless given), run the plan's stages in order.
    Returns (Recalibrator, {stage: history}); a stage that actually ran records its wall time as `stage_seconds`."""
    if recal is None and any(s in (1, 2) for s in plan):
        torch.manual_seed(seed)
        recal = Recalibrator(d_l or teacher.d, student.text_config, depth)
    histories = {}
    for stage, cfg in plan.items():
        t0, done = time.time(), any(cb.done(stage) is not None for cb in callbacks)
        histories[stage] = train_stage(stage, student, data, cfg, teacher, recal, teacher_head,
                                       teacher_fn if stage in (1, 2) else None, progress, answer_input,
                                       callbacks=callbacks, max_skips=max_skips, engine=engine)
        if not done:
            histories[stage][-1]["stage_seconds"] = time.time() - t0
    return recal, histories
