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


def run_cli(argv: list[str]) -> str:
    """`python -m minigenrecal ARGV` in this process; its stdout (`from conftest import run_cli`)."""
    import contextlib
    import io
    from minigenrecal.cli import main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(argv)
    return buf.getvalue()


@pytest.fixture(scope="module")
def cache_pair():
    """(teacher view, student view, 10 samples): the tiny teacher (seed 3) and student (seed 0) the cache tests use."""
    from minigenrecal.data.synthetic import make_split
    from minigenrecal.models.tiny import build_student, build_teacher
    from minigenrecal.models.vlm import VLMView
    t_model, t_proc = build_teacher(seed=3)
    s_model, s_proc = build_student(seed=0)
    teacher = VLMView(t_model.requires_grad_(False), t_proc, name="teacher")
    return teacher, VLMView(s_model, s_proc, name="student"), make_split(0, "train", 10)


def kill_when_written(monkeypatch, cache_module, name: str) -> None:
    """An interrupted cache build: `cache_module._write_json` raises when asked to write the file `name`."""
    write_json = cache_module._write_json

    def killed(path, obj):
        if path.name == name:
            raise RuntimeError("killed")
        write_json(path, obj)
    monkeypatch.setattr(cache_module, "_write_json", killed)
