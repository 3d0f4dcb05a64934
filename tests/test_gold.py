"""TRL's GOLD as a transfer-study row (minigenrecal/study/gold.py): what it trains on, what it trains, its schedule."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("trl")

from minigenrecal.data.synthetic import make_split  # noqa: E402
from minigenrecal.loop import decay_fn  # noqa: E402
from minigenrecal.stages import StageConfig, param_kind  # noqa: E402
from minigenrecal.study.gold import choose_gold, train_gold  # noqa: E402
from minigenrecal.study.transfer import TEACHER_DIR  # noqa: E402
from minigenrecal.study.warmstart import WARM_DIR, load_warm_start  # noqa: E402


@pytest.fixture(scope="module")
def gold_run():
    samples = make_split(0, "train", 8)
    cfg = StageConfig(steps=3, batch_size=8, lr=1e-3, lr_end=1e-4, seed=0)
    seen = {}

    def hook(trainer):
        seen["trainer"] = trainer
        loss = trainer.compute_loss

        def capture(model, inputs, *a, **k):
            seen.setdefault("inputs", inputs)
            return loss(model, inputs, *a, **k)
        trainer.compute_loss = capture
    view, log = train_gold(WARM_DIR / "cross_tokenizer", TEACHER_DIR, samples, cfg, hybrid=False, trainer_hook=hook)
    return samples, cfg, view, log, seen


def test_gold_trains_on_the_kits_own_prompt_and_answer_tokens(gold_run):
    samples, _, view, _, seen = gold_run
    b = seen["inputs"]
    gold = set()
    for ids, mask, labels in zip(b["input_ids"], b["attention_mask"], b["labels"]):
        ids, labels = ids[mask.bool()].tolist(), labels[mask.bool()].tolist()
        assert view.tokenizer.decode(ids[-1:]) == "\n" and labels[-1] == ids[-1]  # TRL trains the template's newline
        gold.add(tuple(ids[:-1]))
    kit = {tuple(view.encode(s).input_ids.tolist()) for s in samples}
    assert len(kit) == len(samples) and gold == kit


def test_gold_trains_the_llm_and_projector_not_the_vision_encoder(gold_run):
    _, _, view, log, _ = gold_run
    warm = dict(load_warm_start("cross_tokenizer")[0].named_parameters())
    moved = {param_kind(n) for n, p in view.model.named_parameters() if not torch.equal(p.detach(), warm[n])}
    assert moved == {"llm", "projector"}
    assert [h["step"] for h in log if "loss" in h][-1] == 3


def test_gold_schedule_is_the_kits(gold_run):
    _, cfg, _, _, seen = gold_run
    sched = seen["trainer"].lr_scheduler
    ours = decay_fn(cfg)
    assert [sched.lr_lambdas[0](s) for s in range(cfg.steps + 1)] == pytest.approx([ours(s) for s in range(cfg.steps + 1)])
    assert seen["trainer"].args.max_grad_norm == 0 and seen["trainer"].args.weight_decay == 0


def test_choose_gold_takes_the_larger_gap_to_sft():
    comps = [{"a": "noise0.5|gold_uld", "b": "noise0.5|sft", "diff": 0.01},
             {"a": "noise0.5|gold_hybrid", "b": "noise0.5|sft", "diff": 0.03},
             {"a": "noise0.5|gold_hybrid", "b": "noise0.5|genrecal", "diff": 0.09}]
    assert choose_gold({"analysis": {"comparisons": comps}}) == "gold_hybrid"
    assert choose_gold({"analysis": {"comparisons": comps[2:]}}) is None
