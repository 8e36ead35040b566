"""The notebook tutorial runs end to end on the embedded model."""

import runpy
from pathlib import Path

from iclgd_lens.hooks import PROBES

TUTORIAL = Path(__file__).resolve().parents[1] / "docs" / "tutorial.py"


def test_tutorial_runs():
    try:
        runpy.run_path(str(TUTORIAL), run_name="__main__")
    finally:
        PROBES.pop("mlp_out", None)  # the tutorial registers a probe: keep other tests unaffected
