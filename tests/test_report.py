"""Tests of the HTML report: files, assets once, escaping, sections, atomic replacement, figures."""

from __future__ import annotations

import html
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
from iclgd_lens.analyses import ANALYSES, analysis
from test_results import EVIL_TOKEN, make_results

from iclgd_lens.engine.results import Results
from iclgd_lens.errors import IclgdError
from iclgd_lens.report import figures, render_report
from iclgd_lens.report.assets import plotly_js
from iclgd_lens.report.attention import attention_patterns_html
from iclgd_lens.study import StudyResult

CIRCUITSVIS_MARK = "var CircuitsVis="
PLOTLY_MARK = "plotly.js v"  # the bundle's licence banner


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("r") / "report"
    path = render_report(make_results(), out, analyses={})
    return out, path


def html_files(folder):
    return sorted(folder.glob("*.html"))


def test_folder_layout(report):
    out, path = report
    assert path == out / "index.html"
    assert [p.name for p in html_files(out)] == ["glossary.html", "index.html"] + [
        f"layer_{l:02d}.html" for l in range(4)
    ]
    assert sorted(p.name for p in (out / "assets").iterdir()) == ["circuitsvis.js", "plotly.min.js"]
    assert (out / "results.json").is_file() and (out / "results.parquet").is_file()
    pd.testing.assert_frame_equal(Results.load(out).table, make_results().table)
    assert not list(out.parent.glob(".report.*"))  # no temporary folder left


def test_assets_are_the_installed_libraries_and_pages_only_link_them(report):
    out, _ = report
    assert (out / "assets" / "plotly.min.js").read_text() == plotly_js()
    assert CIRCUITSVIS_MARK in (out / "assets" / "circuitsvis.js").read_text()
    for page in html_files(out):
        text = page.read_text()
        assert len(text) < 400_000, f"{page.name} seems to inline a library"
        assert CIRCUITSVIS_MARK not in text and PLOTLY_MARK not in text
        assert '<script src="assets/plotly.min.js"></script>' in text
        assert '<script src="assets/circuitsvis.js"></script>' in text
        srcs = re.findall(r'<script[^>]*src="([^"]+)"', text)
        assert set(srcs) == {"assets/plotly.min.js", "assets/circuitsvis.js"}
        assert not re.search(r"https?://(cdn|unpkg)", text)


def test_tokens_are_escaped_never_raw(report):
    out, _ = report
    layer_page = (out / "layer_00.html").read_text()
    assert "alert(1)" in layer_page  # the token is there (as data)...
    for page in html_files(out):
        assert EVIL_TOKEN not in page.read_text()  # ...but never as markup


def test_widget_props_cannot_close_their_script():
    html = attention_patterns_html(
        ["a", "</script><script>alert(2)</script>"], np.full((1, 2, 2), 0.5).tolist()
    )
    assert html.count("</script>") == 1 and html.endswith("</script>")
    # the token reaches circuitsvis as look-alikes: no <, >, & left to interpret
    assert "\u2039/script\u203a\u2039script\u203aalert(2)" in html.encode().decode("unicode_escape")


def test_widget_tokens_read_the_same_as_html_and_as_canvas_text():
    """circuitsvis reads tokens as HTML in its token lists and draws them as text on canvases:
    the look-alikes are neither markup nor entities, so both show the same readable string."""
    from iclgd_lens.report.attention import inert_token

    for token in (EVIL_TOKEN, "<s>", "a & b", 'it\'s "x"'):
        shown = inert_token(token)
        assert not set("<>&\"'") & set(shown)
        assert html.unescape(shown) == shown  # nothing an HTML parser would change
        assert shown.translate({0x2039: "<", 0x203A: ">", 0xFF06: "&", 0x201D: '"', 0x2019: "'"}) == token


def test_layer_page_sections(report):
    out, _ = report
    text = (out / "layer_02.html").read_text()
    for heading in (
        "Per-head similarities",
        "Implicit weight updates",
        "Per-query SimAOU",
        "Attention on the example",
        "Tokens whose probabilities",
    ):
        assert heading in text
    assert text.count('class="circuitsvis-widget"') == 3  # ZSL, ICL, GD
    assert 'href="layer_01.html"' in text and 'href="layer_03.html"' in text and 'href="index.html"' in text


def test_index_has_a_curve_for_every_layer_metric_and_links(report):
    out, _ = report
    text = (out / "index.html").read_text()
    for metric in ("simaou", "simaou_norm", "simam_before", "simam_after", "simam_delta", "dw_cos"):
        assert f"{metric} by layer" in text
    assert "Probe mlp_out" in text and "probe:mlp_out by layer" in text
    assert "Metrics as a function of k" not in text
    for l in range(4):
        assert f'href="layer_{l:02d}.html"' in text
    assert "tiny-llama-icl" in text and '"run_time_s": 1.5' in html.unescape(text)


def test_unknown_metrics_get_a_curve_without_code(tmp_path):
    base = make_results(n_layers=2, n_episodes=2, n_queries=2)
    extra = base.table[base.table.metric == "simaou"].assign(metric="my_new_metric")
    results = Results(pd.concat([base.table, extra]), base.config, base.artifacts)
    text = render_report(results, tmp_path / "r", analyses={}).read_text()
    assert "my_new_metric by layer" in text


def test_k_sweep_section(tmp_path):
    results = make_results(ks=(2, 4, 8), n_layers=2, n_episodes=2, n_queries=2)
    text = render_report(results, tmp_path / "r", analyses={}).read_text()
    assert "Metrics as a function of k" in text and "simaou as a function of k" in text
    fig = figures.k_curve_figure(results, "simaou")
    headline = [t for t in fig.data if t.name == "icl~gd" and t.mode == "lines+markers"][0]
    assert list(headline.x) == [2, 4, 8]
    assert headline.y[0] < headline.y[-1]  # built to rise by 0.01 per demonstration


def test_model_metrics_table(report):
    out, _ = report
    text = (out / "index.html").read_text()
    results = make_results()
    acc = results.summary().query("metric == 'accuracy' and comparison == 'icl'")["mean"].iloc[0]
    assert "Accuracy and output-distribution metrics" in text and f"{acc:.3f}" in text
    for metric in ("rec2ftp", "token_overlap", "overlap_cosine", "kl", "js"):
        assert f'href="glossary.html#m-{metric}"' in text  # linked to its glossary entry
    assert "<td>%</td>" in text and "<td>nats</td>" in text  # units: rec2ftp in percent, KL/JS in nats


def test_intervals_are_clipped_to_the_metric_range_and_the_report_says_so(report):
    """The notes of the tables with intervals say they are clipped; with 2 episodes (t = 12.7)
    every interval in the headline table still lies in its metric's range."""
    from iclgd_lens.engine.ranges import metric_range
    from iclgd_lens.report import CLIPPED, headline_table

    out, _ = report
    assert html.unescape((out / "index.html").read_text()).count(CLIPPED) == 2  # headline, model metrics
    assert CLIPPED in html.unescape((out / "layer_02.html").read_text())
    head = headline_table(make_results(n_layers=2, n_episodes=2))
    shown = 0
    for row in head.to_dict("records"):
        low, high = metric_range(row["metric"])
        for cell in row.values():
            for a, b in re.findall(r"\[(-?[\d.]+), (-?[\d.]+)\]", str(cell)):
                assert low <= float(a) <= float(b) <= high, (row["metric"], cell)
                shown += 1
    assert shown >= 5


def test_index_has_the_paired_tests_of_the_headline(report):
    out, _ = report
    text = (out / "index.html").read_text()
    assert "Paired tests: icl~gd against its baselines" in text
    assert "the smallest p attainable with 3 episodes is 0.25" in text
    tests = make_results().paired_tests()
    row = tests.query(
        "metric == 'simaou' and layer == 2 and head == -1 and baseline == 'untrained:icl~gd'"
    ).iloc[0]
    assert f"<td>{row.diff_mean:+.3f} (p={row.p_value:.3g})</td>" in text
    assert "<th>vs untrained:icl~gd</th>" in text and "<th>vs icl~random_update</th>" in text


def test_single_file_inlines_each_library_once(tmp_path):
    path = render_report(make_results(n_layers=2), tmp_path / "single", single_file=True, analyses={})
    assert path.name == "report.html"
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".iclgd-lens-files.json",  # the files iclgd-lens wrote (a later report may replace only those)
        "report.html",
        "results.json",
        "results.parquet",
    ]
    text = path.read_text()
    assert text.count(CIRCUITSVIS_MARK) == 1 and text.count(PLOTLY_MARK) == 1
    assert "<script src=" not in text and EVIL_TOKEN not in text
    assert 'id="layer-01"' in text and 'href="#layer-01"' in text
    assert 'href="#m-simaou"' in text and 'id="m-simaou"' in text and "glossary.html" not in text


def test_failed_render_keeps_the_old_report(tmp_path, monkeypatch):
    out = tmp_path / "report"
    render_report(make_results(n_layers=2), out, analyses={})
    before = {p.name: p.read_bytes() for p in out.glob("*.html")}

    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(figures, "dw_figure", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        render_report(make_results(n_layers=3), out, analyses={})
    assert {p.name: p.read_bytes() for p in out.glob("*.html")} == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folders left


def test_a_failed_render_removes_the_folders_it_made(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(figures, "dw_figure", broken)
    (tmp_path / "a").mkdir()
    with pytest.raises(RuntimeError, match="disk on fire"):
        render_report(make_results(n_layers=2), tmp_path / "a" / "b" / "c" / "report", analyses={})
    assert [p.name for p in tmp_path.rglob("*")] == ["a"]  # "a" was there before; b and c are gone


def test_an_out_that_is_a_symbolic_link_is_named_as_one(tmp_path):
    real = tmp_path / "real"
    render_report(make_results(n_layers=2), real, analyses={})
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(IclgdError, match="link is a symbolic link; name the folder itself"):
        render_report(make_results(n_layers=2), tmp_path / "link", analyses={})
    assert (tmp_path / "link").is_symlink()


def test_existing_report_is_replaced_on_success(tmp_path):
    out = tmp_path / "report"
    render_report(make_results(n_layers=4), out, analyses={})
    render_report(make_results(n_layers=2), out, analyses={})
    assert [p.name for p in html_files(out)] == [
        "glossary.html",
        "index.html",
        "layer_00.html",
        "layer_01.html",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_a_folder_with_an_index_html_of_its_own_is_never_replaced(tmp_path):
    """A user's site (index.html, photos) is not a report, and a report the user added notes to
    is not only a report: neither is replaced (files are never deleted that iclgd-lens did not
    write); the refusal says which files and changes nothing."""
    site = tmp_path / "site"
    (site / "img").mkdir(parents=True)
    (site / "index.html").write_text("my homepage")
    (site / "img" / "photo.jpg").write_text("x")
    with pytest.raises(IclgdError, match="holds no record of the files iclgd-lens wrote") as info:
        render_report(make_results(n_layers=2), site, analyses={})
    assert "\n" not in str(info.value) and "the new report is at" not in str(info.value)  # refused up front
    assert sorted(p.relative_to(site).as_posix() for p in site.rglob("*")) == [
        "img",
        "img/photo.jpg",
        "index.html",
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["site"]

    report = tmp_path / "report"
    render_report(make_results(n_layers=2), report, analyses={})
    (report / "notes.txt").write_text("mine")
    with pytest.raises(IclgdError, match=r"holds files iclgd-lens did not write \(notes.txt\)"):
        render_report(make_results(n_layers=3), report, analyses={})
    assert (report / "notes.txt").read_text() == "mine" and not (report / "layer_02.html").exists()
    (report / "notes.txt").unlink()
    render_report(make_results(n_layers=3), report, analyses={})  # only its own files: replaced
    assert (report / "layer_02.html").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_file_added_while_the_report_is_written_is_kept_and_so_is_the_new_report(tmp_path, monkeypatch):
    """The check before the work is repeated at the swap: a file that appeared meanwhile stays,
    the new report is left beside the folder, and the one-line error says where."""
    report = tmp_path / "report"
    render_report(make_results(n_layers=2), report, analyses={})
    real = figures.dw_figure

    def add_a_file_meanwhile(*args, **kwargs):
        (report / "notes.txt").write_text("mine")
        return real(*args, **kwargs)

    monkeypatch.setattr(figures, "dw_figure", add_a_file_meanwhile)
    with pytest.raises(IclgdError, match="the new report is at") as info:
        render_report(make_results(n_layers=3), report, analyses={})
    beside = Path(str(info.value).rsplit(" at ", 1)[1])
    assert (report / "notes.txt").read_text() == "mine" and not (report / "layer_02.html").exists()
    assert (beside / "layer_02.html").is_file() and beside.parent == tmp_path


def test_a_report_folder_that_cannot_be_moved_aside_is_one_line(tmp_path, monkeypatch):
    """A failing swap (an immutable or busy folder) leaves the earlier report as it was."""
    import os as os_module

    from iclgd_lens import folders

    report = tmp_path / "report"
    render_report(make_results(n_layers=2), report, analyses={})
    before = sorted(p.name for p in report.iterdir())
    real = os_module.replace

    def refuse_to_move_the_report(src, dst):
        if Path(src) == report:
            raise PermissionError(1, "Operation not permitted")
        return real(src, dst)

    monkeypatch.setattr(folders.os, "replace", refuse_to_move_the_report)
    with pytest.raises(IclgdError, match="cannot put the report at .*: Operation not permitted"):
        render_report(make_results(n_layers=3), report, analyses={})
    assert sorted(p.name for p in report.iterdir()) == before
    assert [p.name for p in tmp_path.iterdir()] == ["report"]


def test_refuses_to_overwrite_a_folder_that_is_not_a_report(tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    with pytest.raises(IclgdError, match="not empty"):
        render_report(make_results(n_layers=2), folder, analyses={})
    assert (folder / "chapter1.tex").read_text() == "precious"
    assert [p.name for p in folder.iterdir()] == ["chapter1.tex"]
    with pytest.raises(IclgdError, match="Results"):
        render_report(make_results().table, tmp_path / "x")


def test_registered_analyses_and_studies_become_sections(tmp_path):
    @analysis("test-spread")
    def spread(results):
        summ = results.summary().query("metric == 'simaou'")
        return [go.Figure(go.Bar(x=summ["comparison"], y=summ["mean"])), summ.head(3)]

    @analysis("test-broken")
    def broken(results):
        raise ValueError("no such thing")

    study = StudyResult(
        name="order-sensitivity",
        question="Is ICL more order-sensitive than GD?",
        table=pd.DataFrame({"method": ["icl", "gd"], "sen": [0.12, 0.015]}),
        figures=[go.Figure(go.Bar(x=["icl", "gd"], y=[0.12, 0.015]))],
        findings=f"ICL Sen 0.12 > GD 0.015 {EVIL_TOKEN}",
    )
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = render_report(make_results(n_layers=2), tmp_path / "r", study_results=[study])
        text = path.read_text()
    finally:
        ANALYSES.pop("test-spread", None)
        ANALYSES.pop("test-broken", None)
    assert "Analysis: test-spread" in text and "Analysis: test-broken" in text
    assert "analysis failed: ValueError: no such thing" in text
    assert any("test-broken" in str(w.message) for w in caught)
    assert "Study: order-sensitivity" in text and "Is ICL more order-sensitive than GD?" in text
    assert "<td>0.015</td>" in text and EVIL_TOKEN not in text
    assert text.count('class="plotly-graph-div"') >= 2 + len(figures.layer_metrics(make_results(n_layers=2)))


def test_study_only_report_from_empty_results(tmp_path):
    empty = Results(
        pd.DataFrame(columns=["metric", "comparison", "layer", "head", "episode", "query", "value"]), {}, {}
    )
    study = StudyResult(name="k-sweep", question="q?", table=pd.DataFrame({"k": [1, 2], "v": [0.1, 0.2]}))
    path = render_report(empty, tmp_path / "s", study_results=[study], analyses={})
    assert "Study: k-sweep" in path.read_text()
    assert [p.name for p in html_files(path.parent)] == ["glossary.html", "index.html"]


# ---- figure builders ------------------------------------------------------------------------
def test_layer_curve_figure_matches_the_summary():
    results = make_results()
    fig = figures.layer_curve_figure(results, "simaou")
    lines = {t.name: t for t in fig.data if t.mode == "lines+markers"}
    assert list(lines)[0] == "icl~gd"  # the headline first
    assert set(lines) == {"icl~gd", "icl~random", "icl~random_update", "untrained:icl~gd"}
    curve = results.layer_curve("simaou", "icl~random_update")
    np.testing.assert_allclose(lines["icl~random_update"].y, curve["mean"])
    bands = [t for t in fig.data if t.fill == "toself"]
    assert len(bands) == 4
    band = [t for t in bands if t.legendgroup == "icl~random_update"][0]  # the episode-level interval
    np.testing.assert_allclose(band.y, list(curve["ci_high"]) + list(curve["ci_low"])[::-1])
    assert set(curve["n_episodes"]) == {3} and set(curve["n"]) == {15}
    assert figures.layer_curve_figure(results, "accuracy") is None  # model-level: no layer curve


def test_a_figure_of_something_the_results_lack_is_one_line_not_none():
    """A typo (metric, layer, comparison) is said in one line with what the results have; None
    stays the answer for what exists but has nothing to draw; notebook.show(None) says why."""
    from iclgd_lens.report import notebook

    results = make_results()
    layers = sorted(results.table.loc[results.table["layer"] >= 0, "layer"].unique())
    cases = [
        (lambda: figures.layer_curve_figure(results, "nope"), "no metric 'nope' in the results; metrics: "),
        (lambda: figures.k_curve_figure(results, "nope"), "no metric 'nope' in the results"),
        (lambda: figures.head_heatmap_figure(results, layer=99), "no layer 99 in the results; layers: 0, "),
        (lambda: figures.head_heatmap_figure(results, 0, "icl~nope"), "no comparison 'icl~nope'"),
        (lambda: figures.query_distribution_figure(results, 99), "no layer 99"),
        (lambda: notebook.show(None), "nothing to show: expected a plotly Figure, got None"),
    ]
    for build, fragment in cases:
        with pytest.raises(IclgdError) as info:
            build()
        assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)
    assert figures.head_heatmap_figure(results, layer=int(layers[-1])) is not None


def test_dw_figure_shows_the_stored_cosine():
    """The cosine in the titles is the artifact's (computed on the full matrices), not one
    recomputed from the rounded, pooled matrices drawn: here the drawn ones would give -1 and +1."""
    rng = np.random.default_rng(1)
    icl = rng.standard_normal((3, 4, 4))
    gd = -icl
    gd[1] = icl[1]
    fig = figures.dw_figure({"icl": icl.tolist(), "gd": gd.tolist(), "cos": [0.25, -0.5, None]}, layer=3)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == [
        "kv head 0: dW_ICL",
        "kv head 0: dW_GD (cos = 0.250)",
        "kv head 1: dW_ICL",
        "kv head 1: dW_GD (cos = -0.500)",
        "kv head 2: dW_ICL",
        "kv head 2: dW_GD (cos = n/a)",
    ]
    np.testing.assert_allclose(fig.data[0].z, icl[0])
    older = figures.dw_figure(
        {"icl": icl.tolist(), "gd": gd.tolist()}, layer=3
    )  # saved before "cos" was stored
    assert [a.text for a in older.layout.annotations][1] == "kv head 0: dW_GD"
    assert figures.dw_figure({}, 0) is None


def test_head_heatmap_matches_per_head_means():
    results = make_results()
    fig = figures.head_heatmap_figure(results, 1)
    t = results.table
    rows = t[(t.metric == "simam_after") & (t.layer == 1) & (t["head"] == 2)]
    row = list(fig.data[0].y).index("simam_after")
    assert fig.data[0].z[row][2] == pytest.approx(rows["value"].mean())


def test_top_tokens_are_shown_as_text():
    fig = figures.top_tokens_figure(
        [{"token": EVIL_TOKEN, "d_icl": 0.1, "d_gd": 0.2}, {"token": "a", "d_icl": 0, "d_gd": 0}]
    )
    assert fig.data[0].y[0] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert list(fig.data[1].x) == [0.2, 0.0]


def test_undefined_values_are_listed_with_their_reason(tmp_path):
    """SimAM-delta at layer 0 is undefined by construction: the index says so, with the reason."""
    results = make_results(n_layers=2)
    table = results.table
    table.loc[(table.metric == "simam_delta") & (table.layer == 0), "value"] = float("nan")
    undefined = Results(table, results.config, results.artifacts).undefined()
    row = undefined[undefined.metric == "simam_delta"].iloc[0]
    assert row["layers"] == "0" and "rotary" in row["because"]
    index = render_report(
        Results(table, results.config, results.artifacts), tmp_path / "r", analyses={}
    ).read_text()
    assert "Undefined values" in index and "a zero update" in index


def test_the_verdict_comes_first_in_the_index_and_the_notebook_view(tmp_path):
    """A clear ICL~GD signal over enough episodes is marked "above all baselines" per layer, in
    Results.verdict(), at the top of the index, and in the notebook view; with 3 episodes the
    verdict says that no p-value can reach 0.05 (and with 6, that Holm's correction over the 2
    layers asks for less than the 0.031 they allow)."""
    from iclgd_lens.engine.verdict import ABOVE, UNDECIDED

    six = make_results(n_layers=2, n_episodes=6).verdict()
    tested = six.table[six.table["floors"] != ""]
    assert len(tested) and (tested["mark"] == UNDECIDED).all() and "use at least 7 episodes" in six.text
    results = make_results(n_layers=2, n_episodes=8)
    found = results.verdict()
    simaou = found.table[found.table.metric == "simaou"]
    assert (simaou["mark"] == ABOVE).all() and (simaou["floors_beaten"] == "3/3").all()
    assert "simaou: ICL~GD is above every baseline at layer(s) 0, 1 of 2" in found.text
    index = render_report(results, tmp_path / "r", analyses={}).read_text()
    assert index.index("Verdict") < index.index("Headline") and ABOVE in index
    assert "above every baseline" in results._repr_html_()
    assert "no p-value can fall below 0.25" in make_results(n_layers=2, n_episodes=3).verdict().text
    table = results.table.copy()
    table.loc[(table.metric == "simaou") & (table.layer == 0), "value"] = float("nan")
    marks = Results(table, results.config, {}).verdict().table.set_index(["metric", "layer"])["mark"]
    assert marks[("simaou", 0)] == "undefined" and marks[("simaou", 1)] == ABOVE


# ---- one visual language ----------------------------------------------------------------------
def _line_colours(fig):
    return {t.name: t.line.color for t in fig.data if t.type == "scatter" and t.fill is None and t.name}


def test_a_comparison_has_one_colour_in_every_figure():
    """The same comparison is drawn in the same colour and dash in the layer curves, the small
    multiples, the k curves and the box plots; the headline is the widest solid line, the floors
    dashed, the ceiling dotted."""
    from iclgd_lens.report import style

    results = make_results(ks=(2, 4, 8), n_layers=2, n_episodes=2, n_queries=2)
    seen: dict[str, set] = {}
    figs = [
        figures.layer_curve_figure(results, "simaou"),
        figures.layer_curve_figure(results, "simaou_norm"),
        figures.k_curve_figure(results, "simaou"),
        figures.layer_panels_figure(results, ["simaou", "simaou_norm", "dw_cos"]),
    ]
    for fig in figs:
        for name, colour in _line_colours(fig).items():
            seen.setdefault(name, set()).add(colour)
    box = figures.query_distribution_figure(results, 0, "simaou")
    for trace in box.data:
        seen.setdefault(trace.name, set()).add(trace.marker.color)
    assert set(seen) >= {"icl~gd", "icl~random", "icl~random_update", "untrained:icl~gd"}
    assert all(len(colours) == 1 for colours in seen.values()), seen
    assert len({next(iter(c)) for c in seen.values()}) == len(seen)  # and no two share one
    lines = {t.name: t.line for t in figs[0].data if t.fill is None}
    assert lines["icl~gd"].dash == "solid" and lines["icl~gd"].width > max(
        lines[b].width for b in style.FLOORS if b in lines
    )
    assert all(lines[b].dash not in (None, "solid") for b in style.FLOORS if b in lines)
    assert style.line(style.CEILING)["dash"] == "dot"


def test_log2_k_axis_labels_every_k_and_nothing_else():
    from iclgd_lens.report import style

    axis = style.log2_k_axis([64, 1, 2, 4, 8, 16, 32, 4])
    assert axis["type"] == "log" and axis["tickvals"] == [1, 2, 4, 8, 16, 32, 64]
    assert axis["ticktext"] == ["1", "2", "4", "8", "16", "32", "64"]
    assert axis["range"][0] < 0 < np.log10(64) < axis["range"][1]


def test_restyle_gives_a_study_figure_the_reports_colours_and_axes():
    """A plotly-express figure of a study: traces named after comparisons get their colours,
    a log k axis every k labelled, a layer axis whole layers; the data are unchanged."""
    import plotly.express as px

    from iclgd_lens.report import style

    df = pd.DataFrame(
        {"k": [1, 2, 4, 16, 64] * 2, "v": np.arange(10.0), "comparison": ["icl~gd"] * 5 + ["icl~random"] * 5}
    )
    fig = style.restyle(px.line(df, x="k", y="v", color="comparison", log_x=True))
    assert _line_colours(fig) == {"icl~gd": style.colour("icl~gd"), "icl~random": style.colour("icl~random")}
    assert list(fig.layout.xaxis.tickvals) == [1, 2, 4, 16, 64]
    np.testing.assert_array_equal(fig.data[0].y, np.arange(5.0))
    layers = style.restyle(px.line(pd.DataFrame({"layer": [0, 1], "v": [0, 1]}), x="layer", y="v"))
    assert layers.layout.xaxis.dtick == 1


def _k_sweep_table(ks=(1, 2, 4, 8, 16, 32, 64), gd_only=(128,)):
    rows = []
    for k in (*ks, *gd_only):
        for ep in range(3):
            for comparison in ("zsl", "gd") + (() if k in gd_only else ("icl",)):
                rows.append(("accuracy", comparison, -1, -1, ep, 0, 0.5 + 0.001 * k, k))
            if k not in gd_only:
                for comparison, v in (("icl~gd", 0.3), ("icl~random_update", 0.0)):
                    rows.append(("simaou", comparison, 0, -1, ep, 0, v + 0.01 * ep, k))
    table = pd.DataFrame(
        rows, columns=["metric", "comparison", "layer", "head", "episode", "query", "value", "k"]
    )
    return table.assign(model="m", task="t")


def test_k_sweep_figures_label_every_k_and_mark_gd_only_points():
    from iclgd_lens.analyses import k_sweep

    from iclgd_lens.report import style

    figs = k_sweep.figures(_k_sweep_table())
    assert figs
    for fig in figs:
        assert list(fig.layout.xaxis.tickvals) == [1, 2, 4, 8, 16, 32, 64, 128]
        assert list(fig.layout.xaxis.ticktext) == ["1", "2", "4", "8", "16", "32", "64", "128"]
        marks = [a.text for a in fig.layout.annotations if a.text == "GD only"]
        assert len(marks) == 1 and fig.layout.shapes[0].x0 == 128  # a shape takes the value...
        assert [a.x for a in fig.layout.annotations if a.text == "GD only"] == [pytest.approx(np.log10(128))]
    simaou = figures.study_figure([f for f in figs if "simaou" in f.layout.title.text][0])  # as on its page
    colours = {t.name.split(",")[0]: t.line.color for t in simaou.data}
    assert colours["icl~gd"] == style.colour("icl~gd")


def _order_table(gd_outlier: float):
    """Sen per (method, episode, query): ICL about 0.02 everywhere, GD batch 1 about 0.005 except
    one episode at `gd_outlier`."""
    rows = []
    for ep in range(4):
        for q in range(3):
            rows.append(("sen", "icl", 8, -1, ep, q, 0.02 + 0.001 * q))
            rows.append(("sen", "gd_b1", 1, -1, ep, q, gd_outlier if ep == 3 else 0.005 + 0.001 * q))
            rows.append(("sen", "gd_full", 8, -1, ep, q, 1e-7))
            for method in ("icl", "gd_b1", "gd_full"):
                rows.append(("order_overlap", method, 1, -1, ep, q, 0.8))
                rows.append(("attn_sen", method, 1, 0, ep, q, 0.1))
                rows.append(("attn_sen", method, 1, 1, ep, q, 0.2))
    return pd.DataFrame(
        rows, columns=["metric", "method", "batch_size", "layer", "episode", "query", "value"]
    )


def test_order_sensitivity_shows_means_and_medians_and_says_why_they_differ():
    from iclgd_lens.analyses import order_sensitivity as osens

    table = _order_table(gd_outlier=0.6)
    text = osens.findings(table, k=8)
    med = table[table.metric == "sen"].groupby("method")["value"].median()
    assert f"icl: {med['icl']:.4f}" in text and f"gd_b1: {med['gd_b1']:.4f}" in text
    mean_ratio = 0.021 / table[(table.metric == "sen") & (table.method == "gd_b1")]["value"].mean()
    assert f"By the means ICL is {mean_ratio:.2g}x" in text
    assert f"by the medians {med['icl'] / med['gd_b1']:.2g}x" in text
    assert "disagree because the mean of gd_b1 is pulled up" in text
    assert "disagree" not in osens.findings(_order_table(gd_outlier=0.006), k=8)
    fig_sen = osens.figures(table)[0]
    by_name = {t.name: t for t in fig_sen.data}
    np.testing.assert_allclose(
        by_name["median over (episode, query)"].y, [med["icl"], med["gd_b1"], med["gd_full"]]
    )
    assert len(by_name["each episode's mean"].y) == 12


# ---- glossary, units, gaps ----------------------------------------------------------------------
def test_every_metric_the_engine_writes_has_a_glossary_entry():
    """Each metric id named in docs/metrics.md's table of what compare() feeds (and every id in
    the synthetic results) has a definition, a range, a GD-like direction and a paper."""
    from pathlib import Path

    from iclgd_lens.report import glossary

    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    section_text = doc[doc.index("## What `compare()` feeds each metric") :]
    first_cells = [line.split("|")[1] for line in section_text.splitlines() if line.startswith("| `")]
    documented = {m for cell in first_cells for m in re.findall(r"`([a-z_]+)`", cell)}
    ids = documented | set(make_results().metrics) - {"probe:mlp_out"}
    assert {"simaou", "dw_action_cos", "kendall_example_per_head", "js"} <= ids
    for metric in ids:
        found = glossary.entry(metric)
        assert found is not None, metric
        assert all(found[:4]), metric
    assert glossary.entry("probe:mlp_out") is glossary.PROBE
    assert glossary.unit("rec2ftp") == "%" and glossary.unit("kl") == "nats"


def test_every_glossary_link_of_a_study_report_has_its_entry(tmp_path):
    """A study's own metrics (weight-properties: near_zero_fraction, rank, ...) have no glossary
    entry: their names carry the tooltip and no link (they linked to entries that did not exist)."""
    from typer.testing import CliRunner

    from iclgd_lens.cli import app

    out = tmp_path / "wp"
    result = CliRunner().invoke(
        app, ["study", "weight-properties", "--out", str(out), "--no-progress", "--threads", "1"]
    )
    assert result.exit_code == 0, result.output
    ids = set(re.findall(r'id="(m-[^"]+)"', (out / "glossary.html").read_text()))
    for page in html_files(out):
        text = page.read_text()
        for target in re.findall(r'href="(?:[^"#]*glossary\.html)?#(m-[^"]+)"', text):
            assert target in ids, (page.name, target)
    assert '<abbr title="no glossary entry' in (out / "index.html").read_text()


def test_the_glossary_ranges_agree_with_the_engine_ranges():
    """Every glossary metric has numeric bounds in `ranges.METRIC_RANGES` and every metric there
    has a glossary entry; the text "[a, b]" / "[a, b)" reads as those bounds. The one bound given
    only as text is sen's upper one, which depends on the study (not clipped: inf)."""
    from iclgd_lens.engine import ranges
    from iclgd_lens.report import glossary

    words = {"inf": math.inf, "ln 2": math.log(2), "sqrt(n_permutations - 1)": math.inf}

    def bounds(text: str) -> tuple[float, float]:
        match = re.fullmatch(r"\[([^,]+), (.+)[\])]", text)
        assert match, text
        return tuple(words[b] if b in words else float(b) for b in match.groups())

    assert set(glossary.METRICS) == set(ranges.METRIC_RANGES)
    for metric, found in glossary.METRICS.items():
        assert bounds(found.range) == pytest.approx(ranges.METRIC_RANGES[metric]), metric
        assert ranges.metric_range(metric) == ranges.METRIC_RANGES[metric]
    assert bounds(glossary.PROBE.range) == ranges.PROBE_RANGE == ranges.metric_range("probe:mlp_out")
    assert glossary.entry("my_plugin_metric") is None and ranges.metric_range("my_plugin_metric") is None


def test_every_metric_name_in_a_table_links_to_the_glossary(report):
    """No metric id sits in a table cell as bare text, on any page; each link points at an entry
    the glossary page has, and carries its one-line definition."""
    out, _ = report
    glossary_page = (out / "glossary.html").read_text()
    metrics = set(make_results().metrics)
    for page in html_files(out):
        text = page.read_text()
        for metric in metrics:
            assert f"<td>{html.escape(metric)}</td>" not in text, (page.name, metric)
        for target in re.findall(r'href="glossary\.html#([^"]+)"', text):
            assert f'id="{target}"' in glossary_page, target
    index = (out / "index.html").read_text()
    assert '<abbr title="cos(h_ICL - h_ZSL, h_GD - h_ZSL)' in index  # the definition on hover
    assert 'href="glossary.html#m-simaou"' in index.split('id="headline"')[0]  # linked in the verdict


def test_gaps_say_why_they_are_empty(tmp_path):
    """dw_cos has one value per kv head: the heatmap's empty cells are named with the reason;
    a layer where the headline is undefined is written 'undefined' on its curve; a comparison
    a metric does not have reads 'not measured', never an empty cell."""
    results = make_results(n_layers=2)
    t = results.table
    heads = sorted(t.loc[t["head"] >= 0, "head"].unique())
    kv_heads = sorted(t.loc[(t.metric == "dw_cos") & (t["head"] >= 0), "head"].unique())
    assert len(kv_heads) < len(heads)  # built with grouped-query attention
    t.loc[(t.metric == "simam_delta") & (t.layer == 0), "value"] = float("nan")
    results = Results(t, results.config, results.artifacts)
    notes = figures.head_gaps(results, 0)
    missing = ", ".join(str(h) for h in heads if h not in kv_heads)
    assert notes == [
        f"dw_cos (icl~gd) at head(s) {missing}: it has one value per key/value head (column h is key/value "
        "head h, which query heads h*G to h*G+G-1 share, G = heads per key/value head), and this model has "
        "fewer key/value heads than heads.",
        f"simam_delta (icl~gd) at head(s) {', '.join(map(str, heads))}: at layer 0 of a rotary model ICL "
        "cannot change the query's own pre-softmax scores (a zero update).",
    ]
    fig = figures.layer_curve_figure(results, "simam_delta")
    assert [(a.x, a.text) for a in fig.layout.annotations] == [(0, "undefined")]
    out = render_report(results, tmp_path / "r", analyses={})
    layer = (out.parent / "layer_00.html").read_text()
    assert "Cells marked n/a:" in layer and "fewer key/value heads" in layer
    assert "<td>not measured</td>" in layer and "<td></td>" not in layer.split('id="l0-heads"')[0]


def test_a_study_page_draws_its_figures_in_the_reports_style(tmp_path):
    """A study's own plotly-express figure (log k axis, comparisons by colour) reaches its page
    restyled: every k labelled, icl~gd in the headline colour; the page has no empty report
    sections and no layer pages even when the study's config names a layer count."""
    import plotly.express as px

    from iclgd_lens.report import style

    df = pd.DataFrame({"k": [1, 2, 4, 16, 64], "v": [0.1, 0.2, 0.3, 0.4, 0.5], "comparison": "icl~gd"})
    study = StudyResult("k-sweep", "q?", df, [px.line(df, x="k", y="v", color="comparison", log_x=True)])
    empty = Results(
        pd.DataFrame(columns=["metric", "comparison", "layer", "head", "episode", "query", "value"]),
        {"study": "k-sweep", "n_layers": 4},
        {},
    )
    path = render_report(empty, tmp_path / "s", study_results=[study], analyses={})
    text = path.read_text()
    assert '"tickvals":[1,2,4,16,64]' in text and f'"color":"{style.colour("icl~gd")}"' in text
    for heading in ("Verdict", "Headline", "Layer-wise", "Layers</h2>"):
        assert heading not in text
    assert [p.name for p in html_files(path.parent)] == ["glossary.html", "index.html"]


BIDI = "\u202eevil\u200djoin"  # U+202E would show everything after it backwards


def test_bidirectional_controls_from_data_are_shown_not_obeyed(tmp_path):
    """A right-to-left override in a prompt, a token or a task name reaches every page (HTML text,
    figure data, widget props) and the notebook view only as a visible [U+202E], raw nowhere and
    not as a \\u202e escape either; the libraries' own code is left as shipped."""
    results = make_results()
    results.config["task"] = f"task {BIDI}"
    results.artifacts["example"]["icl_prompt"] = f"cow = {BIDI} moo\nhorse ="
    results.artifacts["top_tokens"][0]["token"] = BIDI
    for layers in results.artifacts["attention"].values():
        for view in layers.values():
            view["tokens"] = [BIDI if t == "good" else t for t in view["tokens"]]
    for single_file in (False, True):
        out = tmp_path / f"r{single_file}"
        render_report(results, out, analyses={}, single_file=single_file)
        pages = html_files(out)
        assert pages
        shown = 0
        for page in pages:
            text = page.read_text()
            data = text if not single_file else text.split("</head>", 1)[1]  # after the libraries
            assert "\u202e" not in data and "\\u202e" not in data.lower(), page.name
            shown += data.count("[U+202E]")
        assert shown >= 3
    assert "\u202e" not in results._repr_html_() and "[U+202E]" in results._repr_html_()
    from iclgd_lens.report.templates import page

    titled = page(f"sweep {BIDI}", "h", "b", "")  # a sweep's or a study's name reaches the title
    assert "\u202e" not in titled and "<title>sweep [U+202E]evil" in titled
    assert (tmp_path / "rFalse" / "assets" / "plotly.min.js").read_text() == plotly_js()


def test_a_headline_resting_on_fewer_episodes_says_how_many():
    """Rec2FTP is undefined in an episode where ICL fixes no query: the headline cell names the
    episodes it rests on instead of passing for the whole run's number."""
    from iclgd_lens.report import headline_table

    base = make_results(n_episodes=3)
    t = base.table.copy()
    rec = t["metric"] == "rec2ftp"
    assert rec.any()
    t.loc[rec & (t["episode"] == 0), "value"] = float("nan")
    head = headline_table(Results(t, base.config, base.artifacts)).set_index("metric")
    assert head.loc["rec2ftp"].str.contains(r"\(2 of 3 episodes\)").any()
    assert (
        not head.drop(index="rec2ftp").apply(lambda c: c.str.contains("episodes)", regex=False)).any().any()
    )
