"""The committed study plots are what the code draws now: results/transfer*/{transfer,diagnosis,by_type}.png equal a fresh
render from the committed transfer.json (notebook 06 draws the diagnosis with the same `plot_diagnosis`)."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minigenrecal.study import transfer

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("folder", ["transfer", "transfer_long"])
def test_committed_plots_match_a_fresh_render(folder, tmp_path):
    out = ROOT / "results" / folder
    transfer.write_plot(json.loads((out / "transfer.json").read_text()), tmp_path)
    for name in ("transfer.png", "diagnosis.png", "by_type.png"):
        new = np.asarray(Image.open(tmp_path / name).convert("RGB"), dtype=float)
        old = np.asarray(Image.open(out / name).convert("RGB"), dtype=float)
        assert new.shape == old.shape, (folder, name, new.shape, old.shape)
        # identical on the same matplotlib; a little anti-aliasing may differ across versions
        assert np.abs(new - old).mean() < 2.0, (folder, name, np.abs(new - old).mean())
