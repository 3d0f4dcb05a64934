"""What the README claims about the code is measured, not typed: the core's line count and the module table."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CORE = ("recalibrator.py", "losses.py", "stages.py")


def core_lines() -> int:
    return sum(len((ROOT / "minigenrecal" / f).read_text().splitlines()) for f in CORE)


def test_core_line_count_in_readme_is_current():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"Core size \(`recalibrator.py` \+ `losses.py` \+ `stages.py`\): (\d+) lines", readme)
    assert m, "README must state the core's size"
    n = core_lines()
    assert abs(int(m.group(1)) - n) <= 10, f"README says {m.group(1)} lines, the core has {n}"
    assert n < 500  # "a few hundred lines"


def test_every_module_in_the_readme_table_exists():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| module | what it holds |", 1)[1].split("\n\n", 1)[0]
    for name in re.findall(r"`(\w+\.py)`", table):
        assert (ROOT / "minigenrecal" / name).exists(), name
