import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_pair():
    """(teacher view, student view factory): a random-init tiny teacher (same classes as the shipped one) and student."""
    from minigenrecal.models.tiny import build_student, build_teacher
    from minigenrecal.models.vlm import VLMView
    t_model, t_proc = build_teacher(seed=1)
    t_model.requires_grad_(False)

    def student(seed=0):
        m, p = build_student(seed)
        return VLMView(m, p, name="student")
    return VLMView(t_model, t_proc, name="teacher"), student


@pytest.fixture(scope="session")
def samples():
    from minigenrecal.data.synthetic import make_split
    return make_split(0, "train", 8)
