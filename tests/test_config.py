"""`--config FILE`: a preset's shipped recipe builds what `--preset` builds, flags win over the file, bad keys are
named; the top-level help lists every subcommand; a teacher cache of other data is refused by name."""
import json
from dataclasses import replace
from pathlib import Path

import pytest

from minigenrecal.cli import build_parser
from minigenrecal.cli.config import CONFIG_COMMANDS, parse_with_config, recipe_file, recipe_text
from minigenrecal.models.presets import PRESETS, get_preset

ROOT = Path(__file__).resolve().parent.parent
REQUIRED = {"cache-teacher": ["--output_dir", "c"]}  # flags a subcommand needs besides the recipe


def _parse(argv):
    return vars(parse_with_config(build_parser(), argv))


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_presets_recipe_builds_what_preset_builds(name):
    path = ROOT / "configs" / recipe_file(name)
    assert path.read_text() == recipe_text(PRESETS[name]), f"{path.name} is stale: rewrite it with write_recipes"
    for cmd in CONFIG_COMMANDS:
        extra = REQUIRED.get(cmd, [])
        by_file = _parse([cmd, "--config", str(path), *extra])
        by_flag = _parse([cmd, "--preset", name, *extra])
        assert by_file.pop("config") == str(path) and by_flag.pop("config") is None
        for key in ("fn", "teacher", "student"):  # the flags' raw values: `preset` holds the pair they name
            by_file.pop(key), by_flag.pop(key)
        assert by_file == by_flag, cmd
        assert by_file["preset"] == PRESETS[name]  # every field, the three stages' knobs included


def test_flags_win_over_the_file_and_the_file_over_the_defaults(tmp_path):
    cfg = tmp_path / "r.yaml"
    cfg.write_text("preset: tiny\noutput_dir: runs/from_file\nmax_steps: 5\nlearning_rate: 2e-3\nreport_to: tensorboard\n"
                   "image_root: imgs\nstrict: true\nstage2: {steps: 7, lr_end: 1e-5}\n")
    a = _parse(["train", "--config", str(cfg), "--max_steps", "2"])
    assert (a["output_dir"], a["max_steps"], a["learning_rate"], a["report_to"]) == ("runs/from_file", 2, 2e-3,
                                                                                      ["tensorboard"])
    assert a["image_root"] == "imgs" and a["strict"] is True
    tiny = get_preset("tiny")
    assert a["preset"] == replace(tiny, stage2=replace(tiny.stage2, steps=7, lr_end=1e-5))
    # JSON too, and --student on the command line replaces the file's pair member
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"preset": "tiny", "save_steps": 0, "seed": 3}))
    a = _parse(["demo", "--config", str(js), "--output_dir", "x", "--student", "some/dir"])
    assert (a["save_steps"], a["seed"], a["output_dir"], a["preset"].student) == (0, 3, "x", "some/dir")


def test_the_learning_rate_flag_keeps_each_stages_decay_ratio(tmp_path):
    from argparse import Namespace
    from dataclasses import replace
    from minigenrecal.scale.launch import stage_overrides, with_learning_rate
    cfg = get_preset("tiny").stage1  # 1e-3 -> 1e-4
    a = Namespace(max_steps=None, per_device_train_batch_size=4, gradient_accumulation_steps=None, learning_rate=2e-3)
    assert stage_overrides(a) == {"batch_size": 4}
    out = with_learning_rate(replace(cfg, **stage_overrides(a)), a)
    assert (out.lr, out.batch_size, out.steps) == (2e-3, 4, cfg.steps)
    assert out.lr_end == pytest.approx(2e-4)


@pytest.mark.parametrize("text, message", [
    ("outptu_dir: x\n", "unknown key 'outptu_dir'"),
    ("distributed_type: DEEPSPEED\n", "looks like an accelerate config"),
    ("stage1: {stpes: 3}\n", "stage1: unknown knob(s) ['stpes']"),
    ("stage1: {steps: 2.5}\n", "stage1.steps: expected a whole number"),
    ("strict: 1\n", "'strict' is a switch"),
    ("- a\n- b\n", "expected a mapping"),
])
def test_a_bad_config_is_refused_naming_the_file_and_the_key(tmp_path, text, message):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(SystemExit) as e:
        _parse(["train", "--config", str(cfg)])
    assert str(cfg) in str(e.value) and message in str(e.value)


def test_train_runs_from_a_recipe_with_the_fields_names(tmp_path):
    from minigenrecal.cli import main
    out = tmp_path / "x"
    main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--output_dir", str(out), "--stages", "1",
          "--max_steps", "2", "--n", "8", "--per_device_train_batch_size", "4", "--save_steps", "0", "--quiet"])
    log = json.loads((out / "train_log.json").read_text())
    assert [h["step"] for h in log["stages"]["1"]["history"]] == [0, 1]
    assert log["manifest"]["config"]["stage_configs"]["1"]["batch_size"] == 4
    assert (out / "student" / "config.json").is_file()


def test_the_top_level_help_lists_every_subcommand(capsys):
    p = build_parser()
    with pytest.raises(SystemExit):
        p.parse_args(["--help"])
    text = capsys.readouterr().out
    listed = [line.split()[0] for line in text.split("positional arguments:")[1].splitlines()[2:]
              if line.startswith("    ") and not line.startswith("     ")]
    assert listed == list(p.subcommands), (listed, list(p.subcommands))
    assert len(listed) == 12
    for name in p.subcommands:  # and the module's description names each one
        assert f" {name}" in " ".join(build_parser().description.split())


def test_a_cache_of_other_data_is_refused_naming_both_sources(tmp_path):
    from minigenrecal.cli import main
    from minigenrecal.data.llava import write_llava_json
    from minigenrecal.data.synthetic import make_split
    cache = tmp_path / "cache"
    main(["cache-teacher", "--preset", "tiny", "--n", "4", "--output_dir", str(cache),
          "--per_device_eval_batch_size", "4"])
    other = write_llava_json(make_split(5, "test", 4), tmp_path / "other")  # ids test-* vs the cache's train-*
    with pytest.raises(ValueError) as e:
        main(["train", "--preset", "tiny", "--data", str(other), "--cache", str(cache), "--stages", "1",
              "--max_steps", "1", "--per_device_train_batch_size", "2", "--quiet", "--output_dir", str(tmp_path / "r")])
    msg = str(e.value)
    assert f"the teacher cache {cache} holds none of the 4 training samples" in msg
    assert "the synthetic train split, --data-seed 0" in msg and f"--data {other}" in msg
