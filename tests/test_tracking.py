"""`--report_to tensorboard`: a run writes event files that read back, offline, with the values the run logged."""
import json

import pytest

pytest.importorskip("tensorboard")  # in pyproject and the lock; skipped only in an environment without it
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from minigenrecal.scale.tracking import Tracking
from minigenrecal.stages import StageConfig


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series under `folder` (each events file on its own), as {tag: [(step, value), ...]}."""
    out = {}
    for f in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(f))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_a_tensorboard_run_reads_back_with_the_logged_values(tmp_path):
    from minigenrecal.cli import main
    out = tmp_path / "run"
    main(["train", "--preset", "tiny", "--stages", "1,2", "--max_steps", "3", "--n", "8",
          "--per_device_train_batch_size", "4", "--save_steps", "0", "--quiet", "--output_dir", str(out),
          "--report_to", "tensorboard", "--logging_steps", "2", "--run_name", "rn"])
    assert list((out / "runs").iterdir()) == [out / "runs" / "rn"]
    got = _scalars(out / "runs" / "rn")
    log = json.loads((out / "train_log.json").read_text())
    for stage, offset in (("1", 0), ("2", 3)):
        hist = log["stages"][stage]["history"]
        terms = [k for k in hist[0] if k not in ("stage", "step", "lr", "skipped", "stage_seconds")]
        assert "loss" in terms and len(terms) >= 3, terms  # every loss term, not only the total
        for term in terms:  # windows of 2 steps, then the stage's last step alone; one step axis for the run
            want = [(offset + 2, (hist[0][term] + hist[1][term]) / 2), (offset + 3, hist[2][term])]
            series = got[f"stage{stage}/{term}"]
            assert [s for s, _ in series] == [s for s, _ in want], term
            assert [v for _, v in series] == pytest.approx([v for _, v in want], rel=1e-6), term
        assert got[f"stage{stage}/lr"] == [(offset + 2, pytest.approx(hist[1]["lr"])),
                                           (offset + 3, pytest.approx(hist[2]["lr"]))]
        assert [v for _, v in got[f"stage{stage}/skipped_steps"]] == [0, 0]


def test_an_evaluation_is_logged_at_its_stages_last_step(tmp_path):
    plan = {1: StageConfig(steps=3), 2: StageConfig(steps=4)}
    t = Tracking(["tensorboard"], tmp_path, "ev", plan=plan, config={"a": {"b": 1}, "c": [1, 2]})
    t.log_eval(None, {"exact_match": 0.25})
    t.log_eval(2, {"exact_match": 0.5})
    t.finish()
    got = _scalars(tmp_path / "runs" / "ev")
    assert got["eval/exact_match"] == [(0, 0.25), (7, 0.5)]


def test_report_to_none_opens_nothing_and_a_bad_logging_steps_is_refused(tmp_path):
    t = Tracking(["none"], tmp_path, plan={1: StageConfig(steps=2)})
    assert t.trackers == [] and not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="--logging_steps must be at least 1"):
        Tracking(["none"], tmp_path, plan={}, logging_steps=0)
