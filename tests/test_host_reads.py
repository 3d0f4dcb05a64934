"""The step reads nothing back from the device: lengths and indices stay on the host through the loader, and the loss
terms of stages 1 and 2 (unfused and fused) build and backpropagate with every other tensor on the `meta` device,
where any `.item()`, `.tolist()`, `.cpu()` or `bool()` of a tensor raises. On a GPU each such read is a host sync."""
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from transformers import LlamaConfig

from minigenrecal.data.synthetic import make_split
from minigenrecal.loop import PairData, make_collate, on_device, on_host
from minigenrecal.losses import answer_rows, split_teacher
from minigenrecal.recalibrator import Recalibrator
from minigenrecal.stages import GenRecal, StageConfig


def test_lengths_and_indices_come_back_on_the_host(tiny_pair):
    teacher, make_student = tiny_pair
    student = make_student()
    train = make_split(0, "train", 4)
    data = PairData([student.encode(s) for s in train], [teacher.encode(s) for s in train])
    loader = on_device(DataLoader(data, batch_size=3, collate_fn=make_collate(student, teacher)), torch.device("meta"))
    s, t, idx = on_host(*next(iter(loader)))
    assert s["input_ids"].is_meta and t["input_ids"].is_meta  # the batch did move
    for b, encs in ((s, data.s), (t, data.t)):
        assert b["q_lens"].device.type == b["a_lens"].device.type == "cpu"
        assert b["q_lens"].tolist() == [e.q_len for e in encs[:3]] and b["a_lens"].tolist() == [e.a_len for e in encs[:3]]
    assert idx.device.type == "cpu" and idx.tolist() == [0, 1, 2]


class _MetaStudent:
    """A student view on the meta device: its body is a (B, T, d_s) tensor, its CE a sum over its answer rows."""

    def __init__(self, z):
        self.model, self.z = nn.Identity(), z

    def body(self, batch):
        return self.z

    def student_ce(self, z, batch):
        return answer_rows(z, batch["q_lens"], batch["a_lens"]).float().pow(2).mean()


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("chunk", [None, 3])
def test_the_loss_terms_read_nothing_from_the_device(stage, chunk):
    d_s, d_l, V = 16, 24, 40
    q_s, q_l, a = [5, 3], [6, 4], [3, 2]  # host lengths, as the loop passes them
    with torch.device("meta"):
        recal = Recalibrator(d_l, LlamaConfig(hidden_size=d_s, intermediate_size=32, num_attention_heads=4,
                                              num_key_value_heads=2))
        head = nn.Linear(d_l, V).requires_grad_(False)
        z_s = torch.randn(2, 8, d_s, requires_grad=True)
        z_l = torch.randn(2, 9, d_l)
        ids = torch.randint(0, V, (2, 9))
    t = split_teacher(z_l, ids, torch.tensor(q_l), torch.tensor(a)).to("meta")
    s_batch = {"q_lens": torch.tensor(q_s), "a_lens": torch.tensor(a)}
    terms = GenRecal(_MetaStudent(z_s), recal, head)(stage, s_batch, t, StageConfig(chunk_size=chunk))
    assert set(terms) == {"ce_main", "kl_main", "ce_reg", "kl_reg", "loss"} | ({"ce_student"} if stage == 2 else set())
    assert terms["loss"].is_meta and t.a_lens.device.type == "cpu"
    terms["loss"].backward()
    assert recal.proj_post.weight.grad is not None and recal.proj_post.weight.grad.is_meta
