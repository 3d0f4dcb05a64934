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


def test_readme_results_match_the_committed_reproduction():
    """Every 'method | mean ± std' row quoted in the README equals the mean over seeds in results/tiny.json."""
    import json
    import statistics
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Results at toy scale", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (\d+\.\d) ± (\d+\.\d) \|", section, re.M)
    assert len(rows) >= 6, "the README should quote the headline rows"
    data = json.loads((ROOT / "results" / "tiny.json").read_text())
    n = data["budgets"]["n_train"]
    for method, mean, std in rows:
        xs = [100 * r["accuracy"] for r in data["rows"] if r["method"] == method
              and (r["train_size"] in (n, None))]
        assert xs, method
        assert abs(statistics.fmean(xs) - float(mean)) < 0.051, (method, statistics.fmean(xs), mean)
        sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
        assert abs(sd - float(std)) < 0.051, (method, sd, std)
