"""docs/extending.md's worked example: a user hook file on the command line ends up as its own
section of the generated report (and in the results table), with no other code."""

import re
from pathlib import Path

from iclgd_lens.hooks import PROBES
from tiny import tiny_model_folder
from typer.testing import CliRunner

from iclgd_lens.cli import app
from iclgd_lens.engine.results import Results

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_hook_file_from_the_docs_gets_a_report_section(tmp_path):
    probe_code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert '@probe("mlp_out"' in probe_code
    hook_file = tmp_path / "mlp_probe.py"
    hook_file.write_text(probe_code)
    model = tiny_model_folder(tmp_path / "model")
    try:
        result = CliRunner().invoke(
            app,
            [
                "report",
                "--model",
                str(model),
                "--hooks",
                str(hook_file),
                "--k",
                "2",
                "--episodes",
                "1",
                "--queries",
                "4",
                "--out",
                str(tmp_path / "rep"),
                "--no-progress",
                "--threads",
                "1",
            ],
        )
    finally:
        PROBES.pop("mlp_out", None)
    assert result.exit_code == 0, result.output
    table = Results.load(tmp_path / "rep").table
    rows = table[(table.metric == "probe:mlp_out") & (table.comparison == "icl~gd")]
    assert sorted(rows.layer.unique()) == [0, 1] and rows.value.notna().all()
    index = (tmp_path / "rep" / "index.html").read_text()
    assert "probe:mlp_out" in index
