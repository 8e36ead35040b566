"""A study's results are saved with its report, and `iclgd-lens render` rebuilds the page from them."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from typer.testing import CliRunner

from iclgd_lens.cli import app
from iclgd_lens.engine.results import TABLE_COLUMNS, Results
from iclgd_lens.errors import IclgdError
from iclgd_lens.report import load_studies, render_report
from iclgd_lens.study import StudyResult


def _study() -> StudyResult:
    table = pd.DataFrame(
        {
            "k": np.array([1, 2, 4], dtype=np.int64),
            "metric": ["accuracy"] * 3,
            "value": [0.5, np.nan, 0.875],
            "note": ["<b>inert</b>", "x", "y"],
        }
    )
    fig = go.Figure(go.Scatter(x=[1, 2, 4], y=[0.5, 0.6, 0.875], name="icl"))
    return StudyResult(
        "demo-study", "Does <i>this</i> survive a round trip?", table, [fig], "It does.", {"seed": 3}
    )


def test_study_result_round_trip_keeps_table_dtypes_figures_and_text(tmp_path):
    study = _study()
    path = study.save(tmp_path)
    back = StudyResult.load(path.parent)
    pd.testing.assert_frame_equal(back.table, study.table)
    assert [f.to_plotly_json() for f in back.figures] == [f.to_plotly_json() for f in study.figures]
    assert (back.name, back.question, back.findings, back.config) == (
        study.name,
        study.question,
        study.findings,
        study.config,
    )
    assert not list(tmp_path.glob(".study-*"))  # no temporary file left behind


def test_loading_something_else_is_one_line(tmp_path):
    with pytest.raises(IclgdError, match="no saved study"):
        StudyResult.load(tmp_path)
    (tmp_path / "study.json").write_text('{"kind": "other"}')
    with pytest.raises(IclgdError, match="not a saved study"):
        StudyResult.load(tmp_path)


def test_render_rebuilds_a_study_page_from_its_saved_results(tmp_path):
    empty = Results(pd.DataFrame(columns=list(TABLE_COLUMNS)), {"study": "demo-study"}, {})
    first = render_report(empty, tmp_path / "a", study_results=[_study()], analyses={})
    assert len(load_studies(first.parent)) == 1
    result = CliRunner().invoke(app, ["render", str(first.parent), "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    rebuilt = (tmp_path / "b" / "index.html").read_text(encoding="utf-8")
    original = first.read_text(encoding="utf-8")
    for page in (original, rebuilt):
        assert "survive a round trip" in page and "It does." in page
        assert "<i>this</i>" not in page  # strings from studies are escaped
    assert rebuilt.count("plotly-graph-div") == original.count("plotly-graph-div") >= 1


def test_preset_option_is_refused_by_a_study_without_presets():
    result = CliRunner().invoke(app, ["study", "order-sensitivity", "--preset", "chan2024"])
    assert result.exit_code == 2
    assert "has no presets" in result.output and "Traceback" not in result.output
