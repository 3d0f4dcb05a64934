"""Every figure the notebooks draw, as PNG files at the size JupyterLab shows them, in one folder to look at:
`python benchmarks/render_figures.py [--smoke] [--from DIR] [--out DIR] [notebook ...]`.

Executes the notebooks the way `time_notebooks.py` does (fresh kernel, offline), or reads already executed copies
(`--from DIR`, e.g. what `time_notebooks.py --keep DIR` wrote), and writes each `image/png` output as
`<notebook>_cell<NN>_<k>.png`. JupyterLab shows an image at its own pixel size unless it is wider than the output
area, which it then fills; the file is scaled the same way, so what you see in the folder is what a learner sees
at default zoom. One line per figure: the size drawn, the size shown, and a mark where it was shrunk.
"""
from __future__ import annotations

import argparse
import base64
import io
import sys
import tempfile
from pathlib import Path

import nbformat
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from time_notebooks import ROOT, jupyter_env, run_one  # noqa: E402  (the sibling script: one way to execute)

# JupyterLab's output area at default zoom in a 1280-px-wide browser window, with the file browser closed: about
# 1000 px. A figure of 10 inches at matplotlib's inline 100 dpi fills it; wider ones are shrunk, text with them.
OUTPUT_AREA_PX = 1000


def figures(nb) -> list[tuple[int, int, Image.Image]]:
    """(cell index, k-th image of the cell, image) for every PNG output of an executed notebook."""
    out = []
    for i, cell in enumerate(nb.cells):
        k = 0
        for o in cell.get("outputs", []):
            data = o.get("data", {}) if o.get("output_type") in ("display_data", "execute_result") else {}
            if "image/png" in data:
                out.append((i, k, Image.open(io.BytesIO(base64.b64decode(data["image/png"])))))
                k += 1
    return out


def as_shown(img: Image.Image) -> Image.Image:
    """The image at the size JupyterLab shows it: unchanged, or scaled down to the output area's width."""
    if img.width <= OUTPUT_AREA_PX:
        return img
    return img.resize((OUTPUT_AREA_PX, round(img.height * OUTPUT_AREA_PX / img.width)), Image.LANCZOS)


def render(executed: dict[str, object], out: Path) -> list[dict]:
    """Write every figure of {notebook stem: executed notebook} to `out`; one record per figure."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for stem, nb in executed.items():
        for i, k, img in figures(nb):
            name = f"{stem}_cell{i:02d}_{k}.png"
            shown = as_shown(img)
            shown.save(out / name)
            rows.append({"file": name, "drawn": img.size, "shown": shown.size, "shrunk": shown.size != img.size})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("notebooks", nargs="*", help="default: notebooks/[0-9]*.ipynb")
    p.add_argument("--smoke", action="store_true", help="MINIGENRECAL_SMOKE=1: a minute for all six, same figures")
    p.add_argument("--from", dest="src", type=Path, help="read executed notebooks from here instead of running them")
    p.add_argument("--out", type=Path, default=ROOT / ".cache" / "figures", help="the folder to look at")
    p.add_argument("--timeout", type=int, default=900, help="seconds per cell")
    a = p.parse_args(argv)
    paths = [Path(n).resolve() for n in a.notebooks] or sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))
    executed = {}
    if a.src:
        executed = {path.stem: nbformat.read(a.src / path.name, as_version=4) for path in paths}
    else:
        jupyter_env(a.smoke)
        with tempfile.TemporaryDirectory() as tmp:
            for path in paths:
                run_one(path, Path(tmp), a.timeout)
                executed[path.stem] = nbformat.read(Path(tmp) / path.name, as_version=4)
    rows = render(executed, a.out)
    for r in rows:
        note = f"  SHRUNK to the {OUTPUT_AREA_PX}-px output area" if r["shrunk"] else ""
        print(f"{r['file']:50} drawn {r['drawn'][0]:4d} x {r['drawn'][1]:4d} px, shown {r['shown'][0]:4d} x "
              f"{r['shown'][1]:4d}{note}")
    print(f"{len(rows)} figures in {a.out} ({sum(r['shrunk'] for r in rows)} shrunk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
