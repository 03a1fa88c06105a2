"""The committed notebooks stay small and clean: no stored widget state (megabytes of
plotly FigureWidget models that nbconvert --execute saves by default) and no error outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_has_no_widget_state_and_no_errors(path: Path) -> None:
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert "widgets" not in nb.get("metadata", {}), f"{path.name}: strip metadata.widgets (stored widget state)"
    errors = [i for i, c in enumerate(nb["cells"]) for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: error outputs in cells {errors}"
    assert path.stat().st_size < 2 * 2**20, f"{path.name}: {path.stat().st_size:,} bytes"
