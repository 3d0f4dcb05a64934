"""Where the models live in a launch: the backends, the sharded frozen teacher, and gathered saving.

`accelerate launch --config_file configs/<name>.yaml -m minigenrecal train ...` picks the backend:

| launch config | backend | student + Recalibrator (one module, `loop.Engine`) | frozen teacher |
|---|---|---|---|
| single_gpu / ddp / none | `accelerate` | accelerate's `prepare` (DDP across processes) | replicated on every process |
| fsdp.yaml | `fsdp` | FSDP2 `fully_shard` per decoder layer + root, fp32 master, bf16 compute on CUDA | FSDP2-sharded for inference, no optimizer |
| zero3.yaml | `deepspeed` | `deepspeed.initialize` with the launch's ZeRO stage | its own ZeRO-3 inference engine (no optimizer), loaded under `zero.Init` |

Following accelerate's multiple-model guide and TRL's distillation trainers, the teacher is placed apart from the
student: it never enters an optimizer, and under ZeRO-3 its DeepSpeed config is alive before its
`from_pretrained`, so every rank materialises only its own partition. The FSDP and DeepSpeed backends talk to
torch.distributed and DeepSpeed directly (accelerate only launches): accelerate keeps one DeepSpeed engine per
process and has no CPU FSDP, and the run needs one student engine plus one teacher engine, on CPU in tests too.
They expose the small accelerate-like surface the training loop uses (`prepare` for loaders, `accumulate`,
`autocast`, `backward`, `sync_gradients`, `reduce`, `wait_for_everyone`, `device`, process indices).

The teacher head is gathered once into a replicated frozen `nn.Linear` (loop.py gives the arithmetic).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from accelerate.data_loader import prepare_data_loader
from transformers import PretrainedConfig
from transformers.integrations import HfDeepSpeedConfig
from transformers.models.auto.configuration_auto import model_type_to_module_name

from minigenrecal.loop import AccelerateBackend
from minigenrecal.models.vlm import VLMView

BACKENDS = ("accelerate", "fsdp", "deepspeed")


def launch_backend() -> str:
    """The backend `accelerate launch` asked for (its environment), else 'accelerate'."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    return "accelerate"


_BACKEND = None


def get_backend(name: str | None = None):
    """One backend per process (like accelerate's one Accelerator): `name`, or the launch's."""
    global _BACKEND
    name = name or launch_backend()
    if _BACKEND is None or _BACKEND.name != name:
        _BACKEND = {"accelerate": ReplicatedBackend, "fsdp": FSDPBackend, "deepspeed": DeepSpeedBackend}[name]()
    return _BACKEND


def end_launch() -> bool:
    """The end of a launch: a sharded backend tears down (its engines, then the process group) and is forgotten;
    returns whether it did. The accelerate backend stays: one process's Accelerator may serve more runs (notebooks,
    tests)."""
    global _BACKEND
    if _BACKEND is None or _BACKEND.name == "accelerate":
        return False
    _BACKEND.close()
    _BACKEND = None
    return True


# -- accelerate (one process, or DDP): the loop's own backend, plus where its teacher goes -----------------------
class ReplicatedBackend(AccelerateBackend):
    """accelerate's `prepare` for the student module (DDP across processes); the teacher whole on every process."""

    def place_teacher(self, load: Callable[[bool], tuple], max_length: int) -> tuple[PlacedTeacher, nn.Linear]:
        model, proc = load(False)
        model.requires_grad_(False).to(self.acc.device)
        teacher = PlacedTeacher(VLMView(model, proc, max_length, name="teacher"))
        return teacher, teacher.head


@contextlib.contextmanager
def gathered(weight: torch.Tensor, bias: torch.Tensor | None):
    """A sharded head, read outside its module's forward, gathered whole for the call: yields (weight, bias).

    The training run never needs this: it keeps a replicated copy of the head (loop.py says why). It is here
    so that a head still inside a sharded teacher can be read by the chunked losses: a ZeRO-3 partitioned parameter is
    gathered in place, an FSDP2 DTensor shard with `full_tensor()` (both are collectives: every rank calls).
    """
    if hasattr(weight, "ds_id"):  # a ZeRO-3 partitioned parameter
        import deepspeed  # heavy, optional: only the ZeRO-3 backend needs it
        with deepspeed.zero.GatheredParameters([p for p in (weight, bias) if p is not None], modifier_rank=None):
            yield weight, bias
        return
    full = lambda t: t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t  # noqa: E731
    yield full(weight), full(bias)


# -- the shared surface of the two sharded backends ---------------------------------------------------------
def _layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: every module whose class is a decoder or encoder layer."""
    return [m for m in model.modules() if type(m).__name__.endswith(("DecoderLayer", "EncoderLayer"))]


class _TeacherBody(nn.Module):
    """The frozen teacher's body as one module, so a sharding wrapper's forward hooks run around every call.
    forward(batch) -> (B, T_l, d_l) features; forward(batch, "embed") -> its input embeddings of batch['input_ids']."""

    def __init__(self, view):
        super().__init__()
        self.model = view.model
        object.__setattr__(self, "view", view)

    def forward(self, batch: dict, what: str = "body"):
        return self.view.body(batch) if what == "body" else self.view.embed(batch["input_ids"])


@dataclass
class PlacedTeacher:
    """The frozen teacher as a backend placed it: `body` and `embed` run through `root` (the sharding wrapper that
    owns its parameters; None when the model is whole on this process). Everything else is the view's."""

    view: VLMView
    root: nn.Module | None = None

    def body(self, batch: dict) -> torch.Tensor:
        return self.view.body(batch) if self.root is None else self.root(batch)  # (B, T_l, d_l)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.view.embed(input_ids) if self.root is None else self.root({"input_ids": input_ids}, "embed")

    def to(self, device) -> "PlacedTeacher":
        return self  # placed already: the loop does not move it

    def __getattr__(self, name):  # model, head, d, processor, tokenizer, encode, collate: the view's
        return getattr(self.view, name)


def _linear_like(weight: torch.Tensor, bias: torch.Tensor | None, device) -> nn.Linear:
    """A frozen nn.Linear holding copies of (weight, bias), replicated on this rank."""
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    head.weight = nn.Parameter(weight.detach().to(device).clone(), requires_grad=False)
    if bias is not None:
        head.bias = nn.Parameter(bias.detach().to(device).clone(), requires_grad=False)
    return head


class _Distributed:
    """torch.distributed set up by hand (gloo on CPU, nccl on CUDA) and the accelerate-like loop surface."""

    name = "?"

    def __init__(self):
        cuda = torch.cuda.is_available()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cuda", self.local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.process_index, self.num_processes = dist.get_rank(), dist.get_world_size()
        self.is_main_process, self.is_local_main_process = self.process_index == 0, self.local_rank == 0
        self.bf16 = cuda and os.environ.get("ACCELERATE_MIXED_PRECISION", "bf16") == "bf16"
        self.gradient_accumulation_steps, self._micro, self.sync_gradients = 1, 0, True
        self.acc = self

    # the loop's surface
    def prepare(self, loader):
        return prepare_data_loader(loader, self.device, num_processes=self.num_processes,
                                   process_index=self.process_index, put_on_device=True)

    @contextlib.contextmanager
    def accumulate(self, module):
        self._micro += 1
        self.sync_gradients = self._micro % self.gradient_accumulation_steps == 0
        self._sync(module)
        yield

    def autocast(self):
        return contextlib.nullcontext()  # FSDP2's MixedPrecisionPolicy / DeepSpeed's bf16 cast instead

    def reduce(self, t: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        t = t.clone()
        dist.all_reduce(t)
        return t / self.num_processes if reduction == "mean" else t

    def wait_for_everyone(self) -> None:
        dist.barrier()

    def unwrap_model(self, module):
        return module

    def close(self) -> None:
        """Tear down in order at the end of a launch (engines, then the process group), so no communication
        thread outlives the interpreter: left to exit, one can abort the process after the work is done."""
        for engine in getattr(self, "engines", []):
            engine.destroy()
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def set_grad_accum(self, n: int) -> None:
        launch = int(os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "1"))
        if launch not in (1, n):
            raise ValueError(f"the launch config fixes gradient_accumulation_steps at {launch}, but this stage asks "
                             f"for {n} (StageConfig.grad_accum): remove it from the launch config, the stages set it")
        self.gradient_accumulation_steps, self._micro = n, 0


# -- FSDP2 ----------------------------------------------------------------------------------------------------
class FSDPBackend(_Distributed):
    """FSDP2 (`fully_shard`): the student module and, apart from it, the frozen teacher, both sharded.

    Student + Recalibrator: fp32 sharded master weights (frozen parts too: FSDP2 wants one dtype per group),
    bf16 compute and fp32 gradient reduction on CUDA (MixedPrecisionPolicy). The teacher: sharded in its own dtype,
    no optimizer, forward under no_grad. Every rank builds it on the meta device and materialises only its shards;
    rank 0 alone reads the weights, into host memory, and broadcasts them (`set_model_state_dict(...,
    broadcast_from_rank0=True)`).
    """

    name = "fsdp"

    def _policy(self):
        from torch.distributed.fsdp import MixedPrecisionPolicy  # only the FSDP2 backend needs it
        if self.bf16:
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()

    def _shard(self, root: nn.Module, inner: nn.Module) -> None:
        from torch.distributed.fsdp import fully_shard  # only the FSDP2 backend needs it
        for m in _layers(inner):
            fully_shard(m, mp_policy=self._policy())
        fully_shard(root, mp_policy=self._policy())

    def wrap(self, module: nn.Module) -> nn.Module:
        module.float().to(self.device)
        self._shard(module, module)
        return module

    def prepare_module(self, module, opt):
        return module, opt, opt

    def _sync(self, module) -> None:
        module.set_requires_gradient_sync(self.sync_gradients)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.gradient_accumulation_steps).backward()

    def full_state_dict(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The whole state dict on rank 0 (CPU), {} elsewhere; every rank must call it."""
        # only the FSDP2 backend needs it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save_shards(self, module: nn.Module, opt, path) -> None:
        """Write the module's and AdamW's state as they are sharded: each rank its own shards (one file per rank),
        rank 0 the metadata (torch.distributed.checkpoint, as accelerate saves FSDP2 state); a collective."""
        import torch.distributed.checkpoint as dcp  # only the FSDP2 backend needs it
        from torch.distributed.checkpoint.state_dict import get_state_dict  # only the FSDP2 backend needs it
        model, optim = get_state_dict(module, opt)
        dcp.save({"model": model, "optim": optim}, checkpoint_id=str(path))

    def load_shards(self, module: nn.Module, opt, path) -> None:
        """Load what `save_shards` wrote into this rank's shards; a collective. AdamW state that the checkpoint lacks
        (parameters without a gradient yet, e.g. the student in stage 1) keeps the zeros that the state-dict API
        initialises it with; AdamW never reads it while those parameters get no gradient."""
        import torch.distributed.checkpoint as dcp  # only the FSDP2 backend needs it
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner  # only the FSDP2 backend needs it
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict  # only FSDP2 needs it
        model, optim = get_state_dict(module, opt)
        dcp.load({"model": model}, checkpoint_id=str(path))
        sd = {"optim": optim}
        dcp.load(sd, checkpoint_id=str(path), planner=DefaultLoadPlanner(allow_partial_load=True))
        set_state_dict(module, opt, model_state_dict=model, optim_state_dict=sd["optim"])

    def place_teacher(self, load: Callable[[bool], tuple], max_length: int):
        """Every rank builds the teacher on the meta device, shards it, and materialises only its own shards on its
        device; rank 0 alone reads the weights (to host memory) and broadcasts each shard's part."""
        # only the FSDP2 backend needs it
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        full, buffers = {}, {}
        if self.is_main_process:
            whole, _ = load(False)  # host memory of rank 0 only; never on a GPU whole
            full, buffers = whole.state_dict(), dict(whole.named_buffers())
            del whole
        model, proc = load(True)
        model.requires_grad_(False)
        view = VLMView(model, proc, max_length, name="teacher")
        body = _TeacherBody(view)
        self._shard(body, model)
        body.to_empty(device=self.device)
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        for n, bf in model.named_buffers():  # non-persistent buffers (rotary tables) are not in the state dict
            if self.is_main_process:
                bf.copy_(buffers[n])
            dist.broadcast(bf, 0)
        body.eval()
        head = view.head  # sharded with the root: gathered once into the replica (a collective)
        return PlacedTeacher(view, body), _linear_like(head.weight.full_tensor(), None if head.bias is None else head.bias.full_tensor(),
                                  self.device)


# -- DeepSpeed ------------------------------------------------------------------------------------------------
def import_modeling_modules(config) -> list[str]:
    """Import the transformers modeling module of `config` and of every sub-config (text, vision, LLM) BEFORE the
    teacher is built under `deepspeed.zero.Init`; returns the module names.

    Why: from transformers 5.25 (with the `kernels` package) attention classes are decorated by
    `use_kernelized_func`, whose new `__init__` gives each instance `_kernel_funcs` and whose new `forward` reads it.
    `zero.Init` patches `nn.Module.__init_subclass__`, so a class first *created* inside it has its `__init__`
    recorded before the decorator runs, and at exit that undecorated `__init__` is put back while the decorated
    `forward` stays. Every instance built afterwards then fails with "'LlamaAttention' object has no attribute
    '_kernel_funcs'". Classes that already exist when `zero.Init` starts are recorded with their decorated
    `__init__` and restored intact, so importing the modules first is the whole fix. The hub kernels themselves stay
    off: nothing here calls `kernelize` or passes `use_kernels`, so no kernel code is downloaded."""
    names, todo, seen = [], [config], set()
    while todo:
        c = todo.pop()
        if id(c) in seen:
            continue
        seen.add(id(c))
        todo += [v for v in vars(c).values() if isinstance(v, PretrainedConfig)]
        kind = getattr(c, "model_type", "") or ""
        mod = f"transformers.models.{model_type_to_module_name(kind)}.modeling_{model_type_to_module_name(kind)}"
        if kind and importlib.util.find_spec(mod.rsplit(".", 1)[0]) and importlib.util.find_spec(mod):
            importlib.import_module(mod)
            names.append(mod)
    return sorted(set(names))


def zero3_tuning(zero_stage: int, hidden: int | None) -> dict:
    """ZeRO-3 communication sizes from the LLM's hidden size d, as TRL's `prepare_deepspeed` sets them: reduce bucket
    d^2, prefetch bucket 0.9 d^2, parameters under 10 d elements kept whole (norms, biases); plus overlapped
    communication, and a live-parameter limit of two 72B decoder layers (about 0.88B parameters each) instead of
    DeepSpeed's 1e9, so the next layer is fetched while one runs. Nothing for other stages, an unknown d, or a CPU
    launch (the gloo tests keep DeepSpeed's defaults: the sizes are for NCCL on GPUs)."""
    if zero_stage != 3 or not hidden or not torch.cuda.is_available():
        return {}
    return {"overlap_comm": True, "reduce_bucket_size": hidden * hidden,
            "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden), "stage3_param_persistence_threshold": 10 * hidden,
            "stage3_max_live_parameters": 2 * 10 ** 9, "stage3_max_reuse_distance": 2 * 10 ** 9}


def _hidden_size(config) -> int | None:
    """The LLM's hidden size of a VLM config (InternVL's remote config keeps its LLM's under `llm_config`)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(getattr(config, "llm_config", None) or text, "hidden_size", None)


class DeepSpeedBackend(_Distributed):
    """DeepSpeed: one training engine for the student module (the launch's ZeRO stage, from accelerate's
    environment), and one ZeRO-3 inference engine for the teacher. Under ZeRO-3 both load while a DeepSpeed config is
    alive (`HfDeepSpeedConfig`), so transformers builds them under `deepspeed.zero.Init`: no rank ever holds either
    whole (a random-init student excepted, see `load_student`)."""

    name = "deepspeed"

    def __init__(self):
        import deepspeed  # heavy, optional: only the ZeRO-3 backend needs it
        if not dist.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        super().__init__()
        self.zero_stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3"))
        self.clip = float(os.environ.get("ACCELERATE_GRADIENT_CLIPPING", "0") or 0)
        self.engine, self.engines = None, []
        self.teacher_loaded_partitioned = self.student_loaded_partitioned = None  # recorded for the load checks

    def config(self, zero_stage: int, train: bool = True, hidden: int | None = None) -> dict:
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": zero_stage, **zero3_tuning(zero_stage, hidden)},
               "bf16": {"enabled": self.bf16}, "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}
        if train and self.clip > 0:
            cfg["gradient_clipping"] = self.clip
        return cfg

    def wrap(self, module: nn.Module) -> nn.Module:
        """A module with a student partitioned by `zero.Init` is in DeepSpeed's dtype already, and DeepSpeed then
        casts nothing: the rest (Recalibrator, head) is cast here as DeepSpeed casts a whole module (bf16 on CUDA).
        The loop's fp32 upcast reached only the empty placeholder of a partitioned parameter: its dtype is put back,
        since DeepSpeed's optimizer keeps the fp32 masters of the partitions itself."""
        parts = {p.ds_tensor.dtype for p in module.parameters() if hasattr(p, "ds_tensor")}
        if parts:
            (dtype,) = parts
            for p in module.parameters():
                if hasattr(p, "ds_tensor") and p.dtype != dtype:
                    p.data = torch.empty(0, dtype=dtype, device=p.data.device)
                elif not hasattr(p, "ds_tensor") and p.is_floating_point():
                    p.data = p.data.to(dtype)
        return module.to(self.device)

    def load_student(self, load: Callable[[], VLMView]) -> VLMView:
        """Under ZeRO-3, the student's `from_pretrained` runs while the training engine's config is alive, so each
        rank materialises only its partition, in the engine's dtype (fp32 on CPU, bf16 on CUDA, as DeepSpeed would
        cast it). A random-init student (`load.pretrained` false: the tiny ones) is built whole and partitioned by
        the engine: under `zero.Init` transformers skips its weight init, so the weights would change."""
        if self.zero_stage != 3 or not load.pretrained:
            return load()
        config = load.config()
        self.student_modeling_modules = import_modeling_modules(config)  # before zero.Init: see its docstring
        alive = HfDeepSpeedConfig(self.config(3, hidden=_hidden_size(config)))  # from_pretrained then uses zero.Init
        student = load()
        del alive
        self.student_loaded_partitioned = all(hasattr(p, "ds_id") for p in student.model.parameters())
        return student

    def prepare_module(self, module, opt):
        import deepspeed  # heavy, optional: only the ZeRO-3 backend needs it
        hidden = getattr(getattr(module, "student_view", None), "text_config", None)
        cfg = self.config(self.zero_stage, hidden=getattr(hidden, "hidden_size", None))
        self.engine, ds_opt, _, _ = deepspeed.initialize(model=module, optimizer=opt, config=cfg)
        self.engines.append(self.engine)
        return self.engine, _EngineOptimizer(self.engine, self), ds_opt.optimizer

    def _sync(self, module) -> None:
        self.engine.set_gradient_accumulation_boundary(self.sync_gradients)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss / self.gradient_accumulation_steps, scale_wrt_gas=False)

    def unwrap_model(self, module):
        return getattr(module, "module", module)

    def global_grad_norm(self, module) -> torch.Tensor:
        """The gradient's global L2 norm at the accumulation boundary (the loop's non-finite guard reads it). Under
        ZeRO-3 `p.grad` is None: each rank reads its own fp32 partition of each gradient (`safe_get_local_grad`) and
        the squares are summed over ranks; under ZeRO-1/2 `safe_get_full_grad` gives each whole gradient."""
        # heavy, optional: only the ZeRO-3 backend needs it
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad
        sq, partitioned = torch.zeros((), dtype=torch.float32, device=self.device), False
        for p in self.unwrap_model(module).parameters():
            if not p.requires_grad:
                continue
            partitioned |= hasattr(p, "ds_id")
            g = safe_get_local_grad(p) if hasattr(p, "ds_id") else safe_get_full_grad(p)
            if g is not None:
                sq = sq + g.float().pow(2).sum()
        if partitioned:
            dist.all_reduce(sq)
        return sq.sqrt()

    def scale_grads(self, module, c: torch.Tensor) -> None:
        """Multiply the gradient by `c` (the loop's token normalisation) where DeepSpeed holds it: each rank's ZeRO-3
        partitions, or the whole gradients under ZeRO-1/2."""
        # heavy, optional: only the ZeRO-3 backend needs it
        from deepspeed.utils import safe_get_full_grad, safe_get_local_grad, safe_set_full_grad, safe_set_local_grad
        for p in self.unwrap_model(module).parameters():
            if not p.requires_grad:
                continue
            get, put = (safe_get_local_grad, safe_set_local_grad) if hasattr(p, "ds_id") else (safe_get_full_grad, safe_set_full_grad)
            g = get(p)
            if g is not None:
                put(p, g * c.to(g.dtype))

    def clip_in_step(self, max_norm: float) -> None:
        """DeepSpeed clips inside its optimizer step, from the ZeRO optimizer's `clip_grad` (a launch config's
        gradient_clipping sets the same attribute at start and applies where a stage sets none)."""
        self.engine.optimizer.clip_grad = max_norm or self.clip

    def full_state_dict(self, module) -> dict[str, torch.Tensor]:
        """The whole state dict on rank 0 (CPU), {} elsewhere; every rank must call it (ZeRO-3 gathers)."""
        import deepspeed  # heavy, optional: only the ZeRO-3 backend needs it
        inner = self.unwrap_model(module)
        out = {}
        for name, t in inner.state_dict(keep_vars=True).items():
            gather = deepspeed.zero.GatheredParameters([t], modifier_rank=None) if hasattr(t, "ds_id") else contextlib.nullcontext()
            with gather:
                if self.is_main_process:
                    out[name] = t.detach().cpu().clone()
        return out

    def save_shards(self, module, opt, path) -> None:
        """Write the engine's state as DeepSpeed partitions it (`save_checkpoint`): each rank its own fp32 partition
        and AdamW moments (`zero_pp_rank_{r}_*optim_states.pt`), rank 0 the module's unpartitioned rest; a
        collective. The LR schedule is not the engine's: the checkpoint saves it beside."""
        path = Path(path)
        self.engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False)

    def load_shards(self, module, opt, path) -> None:
        """Load what `save_shards` wrote into this rank's partitions; a collective."""
        path = Path(path)
        loaded, _ = self.engine.load_checkpoint(str(path.parent), tag=path.name, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        if loaded is None:
            raise FileNotFoundError(f"DeepSpeed found no checkpoint in {path}")

    def place_teacher(self, load: Callable[[bool], tuple], max_length: int):
        import deepspeed  # heavy, optional: only the ZeRO-3 backend needs it
        config = load.config()
        cfg = self.config(3, train=False, hidden=_hidden_size(config))
        self.teacher_modeling_modules = import_modeling_modules(config)  # before zero.Init: see its docstring
        alive = HfDeepSpeedConfig(cfg)  # must exist before from_pretrained: transformers then uses zero.Init
        model, proc = load(False)
        self.teacher_loaded_partitioned = all(hasattr(p, "ds_id") for p in model.parameters())
        del alive  # the student loads under its own engine's config (`load_student`)
        model.requires_grad_(False)
        view = VLMView(model, proc, max_length, name="teacher")
        head = view.head
        params = [p for p in (head.weight, head.bias) if p is not None]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            replica = _linear_like(head.weight, head.bias, self.device)
        engine, *_ = deepspeed.initialize(model=_TeacherBody(view), config=cfg)
        self.engines.append(engine)
        engine.eval()
        return PlacedTeacher(view, engine), replica


class _EngineOptimizer:
    """What the loop calls `opt`: step() steps the DeepSpeed engine at the accumulation boundary."""

    def __init__(self, engine, backend: DeepSpeedBackend):
        self.engine, self.backend = engine, backend

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self) -> None:
        if self.backend.sync_gradients:
            self.engine.zero_grad()

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups
