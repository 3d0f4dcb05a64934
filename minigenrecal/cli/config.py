"""`--config FILE` (YAML or JSON) for `train`, `demo` and `cache-teacher`, with flags on the command line winning.

A config file is a mapping. Its keys are of two kinds:
- **flags**, spelled as on the command line without the dashes (`output_dir: runs/x`, `max_steps: 2`,
  `report_to: tensorboard`; a kit flag such as `--image-root` may be written `image_root`). The file's flags are
  put in front of the command line's, so a flag given on both wins from the command line, as with TRL's
  `TrlParser`. A switch (`strict: true`) can be turned on by the file, not off by the command line.
- **the preset's fields**: `dtype`, `max_length`, `n_train`, `depth`, `remote_code`, `accelerate_config`, and
  `stage1` / `stage2` / `stage3`, each a mapping of `stages.StageConfig` knobs (`steps`, `batch_size`, `lr`, ...).
  They replace the fields of the named `preset` (the file's, the command line's, or `tiny`); a stage's knobs not
  named keep the preset's values. `configs/<recipe>.yaml` spells every shipped preset this way (`recipe_of`).

A key that is neither, or that this subcommand does not take, is refused with the file's name and the key.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

import yaml

from minigenrecal.models.presets import PRESETS, Preset, get_preset
from minigenrecal.stages import StageConfig

CONFIG_COMMANDS = ("train", "demo", "cache-teacher")  # the subcommands that take --config
STAGE_KEYS = ("stage1", "stage2", "stage3")
PRESET_KEYS = ("dtype", "max_length", "n_train", "depth", "remote_code", "accelerate_config", *STAGE_KEYS)


def add_config_option(p) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="a YAML or JSON file of this command's flags (output_dir: ..., max_steps: ...) and of the "
                        "preset's fields (stage1: {steps: ...}); flags on the command line win. Recipes for every "
                        "preset: configs/*.yaml")


def load_config(path: str | Path) -> dict:
    """The file's mapping; JSON for a .json file, YAML otherwise (YAML reads JSON too)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"--config {path}: no such file")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise SystemExit(f"--config {path}: not valid {'JSON' if path.suffix.lower() == '.json' else 'YAML'} ({e})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of keys to values, got a {type(data).__name__}")
    return data


def _option(parser: argparse.ArgumentParser, key: str) -> argparse.Action | None:
    """The action of `--key` (or `--key` with '_' as '-'), if the parser has it."""
    for spelling in (f"--{key}", f"--{key.replace('_', '-')}"):
        action = parser._option_string_actions.get(spelling)  # argparse keeps no public map of its options
        if action is not None:
            return action
    return None


def config_argv(data: dict, parser: argparse.ArgumentParser, path: str) -> list[str]:
    """The file's flags as command-line words (the preset's fields are left to `apply_preset_fields`)."""
    words = []
    for key, value in data.items():
        if key in PRESET_KEYS:
            continue
        action = _option(parser, key) if key not in ("config", "help") else None
        if action is None:
            hint = (" (it looks like an accelerate config: pass it to `accelerate launch --config_file`)"
                    if key in ("compute_environment", "distributed_type") else "")
            flags = sorted(s[2:] for s in parser._option_string_actions if s.startswith("--") and s != "--help")
            raise SystemExit(f"--config {path}: unknown key {key!r} for `{parser.prog}`{hint}; keys are the "
                             f"flags without dashes ({', '.join(flags)}) and the preset's fields "
                             f"({', '.join(PRESET_KEYS)})")
        flag = action.option_strings[-1] if len(action.option_strings) > 1 else action.option_strings[0]
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise SystemExit(f"--config {path}: {key!r} is a switch: true or false, got {value!r}")
            if value:
                words.append(flag)
        elif value is None:
            continue
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        elif isinstance(value, dict):
            raise SystemExit(f"--config {path}: {key!r} takes a value, not a mapping")
        else:
            words += [flag, str(value)]
    return words


def _coerce(value, default, where: str):
    """A YAML value as the type of the field's default (YAML reads `1e-3` as a string)."""
    kind = type(default)
    if default is None or value is None:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise SystemExit(f"{where}: expected true or false, got {value!r}")
        return value
    try:
        out = kind(value)
    except (TypeError, ValueError):
        raise SystemExit(f"{where}: expected a {kind.__name__}, got {value!r}")
    if kind is int and out != value:
        raise SystemExit(f"{where}: expected a whole number, got {value!r}")
    return out


def apply_preset_fields(preset: Preset, data: dict, path: str) -> Preset:
    """The preset with the file's preset fields in place (a stage's knobs not named keep the preset's values)."""
    over = {}
    knobs = {f.name: getattr(StageConfig(), f.name) for f in fields(StageConfig)}
    for key in (k for k in PRESET_KEYS if k in data):
        value = data[key]
        if key in STAGE_KEYS:
            if not isinstance(value, dict):
                raise SystemExit(f"--config {path}: {key!r} must be a mapping of stage knobs, got {value!r}")
            unknown = sorted(set(value) - set(knobs))
            if unknown:
                raise SystemExit(f"--config {path}: {key}: unknown knob(s) {unknown}; knobs are {', '.join(knobs)}")
            stage = getattr(preset, key)
            over[key] = replace(stage, **{k: _coerce(v, knobs[k] if knobs[k] is not None else 0, f"--config {path}: "
                                                     f"{key}.{k}") for k, v in value.items()})
        else:
            default = getattr(preset, key)
            over[key] = _coerce(value, default if default is not None else "", f"--config {path}: {key}")
    return replace(preset, **over) if over else preset


def parse_with_config(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """Parse `argv`; when a subcommand of CONFIG_COMMANDS names `--config FILE`, the file's flags go in front of
    the command line's (so the command line wins) and its preset fields replace the preset's."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = next((w for w in argv if not w.startswith("-")), None)
    if cmd not in CONFIG_COMMANDS:
        return parser.parse_args(argv)
    find = argparse.ArgumentParser(add_help=False)
    find.add_argument("--config", default=None)
    rest = argv[argv.index(cmd) + 1:]
    path = find.parse_known_args(rest)[0].config
    if not path:
        return parser.parse_args(argv)
    data = load_config(path)
    a = parser.parse_args([cmd, *config_argv(data, parser.subcommands[cmd], path), *rest])
    if any(k in data for k in PRESET_KEYS):
        a.preset = apply_preset_fields(get_preset(a.preset), data, path)
    return a


# -- the shipped recipes: configs/<recipe>.yaml, one per preset ----------------------------------------------
def recipe_file(name: str) -> str:
    """The recipe's file name: the preset's name with '<-' as '_from_' ('smolvlm-256m_from_qwen2-vl-2b.yaml')."""
    return name.replace("<-", "_from_") + ".yaml"


def recipe_of(preset: Preset) -> dict:
    """A preset spelled as a config file: its name, its pair and every field a recipe may set."""
    base = asdict(StageConfig())
    core = ("steps", "batch_size", "grad_accum", "lr", "lr_end")  # always written; other knobs when not the default
    stage = lambda c: {k: v for k, v in asdict(c).items() if k in core or v != base[k]}
    return {"preset": preset.name, "teacher": preset.teacher, "student": preset.student,
            **{k: getattr(preset, k) for k in PRESET_KEYS if k not in STAGE_KEYS},
            **{k: stage(getattr(preset, k)) for k in STAGE_KEYS}}


def recipe_text(preset: Preset) -> str:
    """configs/<recipe>.yaml as shipped: a comment saying how to use it, then `recipe_of(preset)`."""
    head = (f"# The {preset.name!r} preset as a recipe ({preset.note}).\n"
            f"#   python -m minigenrecal train --config configs/{recipe_file(preset.name)} --output_dir runs/x\n"
            "# Flags given on the command line win over this file. Add any flag of `train` here without its dashes\n"
            "# (output_dir, max_steps, per_device_train_batch_size, gradient_accumulation_steps, learning_rate,\n"
            "# save_steps, report_to, logging_steps, seed, data, ...). Written by `recipe_text`; tests check that\n"
            "# this file and `--preset` build the same configuration.\n")
    return head + yaml.safe_dump(recipe_of(preset), sort_keys=False, width=120)


def write_recipes(folder: str | Path) -> list[Path]:
    """Write every preset's recipe under `folder`; returns the paths."""
    paths = []
    for preset in PRESETS.values():
        path = Path(folder) / recipe_file(preset.name)
        path.write_text(recipe_text(preset))
        paths.append(path)
    return paths
