"""The command line: `evaluate` prints one JSON line whose accuracy matches the library's exact match."""
import json
import subprocess
import sys

from minigenrecal.data.synthetic import make_split
from minigenrecal.evaluation.exact_match import exact_match
from minigenrecal.data.synthetic import normalize


def test_evaluate_prints_one_json_line(tmp_path):
    from minigenrecal.models.tiny import load_teacher
    from minigenrecal.models.vlm import VLMView
    model, proc = load_teacher()  # the shipped teacher: a real, non-trivial accuracy to reproduce
    model.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    out = subprocess.run([sys.executable, "-m", "minigenrecal", "evaluate", "--student", str(tmp_path),
                          "--data-seed", "4", "--n", "20"], capture_output=True, text=True, check=True)
    lines = [l for l in out.stdout.splitlines() if l.strip()]
    assert len(lines) == 1, out.stdout
    res = json.loads(lines[0])
    ref = exact_match(VLMView(model, proc), make_split(4, "test", 20))
    assert res["n"] == 20 and res["data_seed"] == 4
    assert abs(res["accuracy"] - ref["accuracy"]) < 1e-9
    assert res["accuracy"] > 0.5  # the shipped teacher knows the task


def test_normalize_is_lenient_only_about_case_space_and_final_period():
    assert normalize("  Two  Shapes. ") == "two shapes"
    assert normalize("two shape") != normalize("two shapes")


def _subcommands():
    import argparse
    from minigenrecal.cli import build_parser
    p = build_parser()
    [sub] = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return p, sub.choices


def test_every_option_of_every_subcommand_has_help():
    import argparse
    p, subs = _subcommands()
    assert {"demo", "evaluate", "make-teacher", "train", "cache-teacher", "bench", "reproduce"} <= set(subs)
    missing = [f"{name} {a.option_strings or a.dest}" for name, sp in [("", p), *subs.items()] for a in sp._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not a.help]
    assert not missing, f"options without help text: {missing}"


def test_preset_option_lists_and_checks_the_preset_names(capsys):
    import pytest
    from minigenrecal.models.presets import PRESETS
    _, subs = _subcommands()
    with_preset = {name: sp for name, sp in subs.items() if "--preset" in sp._option_string_actions}
    assert {"demo", "train", "cache-teacher", "bench"} <= set(with_preset)
    for name, sp in with_preset.items():
        action = sp._option_string_actions["--preset"]
        assert list(action.choices) == list(PRESETS), name
        assert all(p in action.help for p in PRESETS), (name, action.help)
        with pytest.raises(SystemExit):
            sp.parse_args(["--preset", "no-such-preset"])
        assert "invalid choice: 'no-such-preset'" in capsys.readouterr().err
