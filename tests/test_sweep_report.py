"""The sweep report: Dai's table against a plain pandas + scipy computation from the store's
Parquet files, links to every cell's own report, local scripts only, escaped strings, and
`render` of a store, of a spec and of several runs."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from sweep_pages import make_sweep_report, tiny_sweep_spec
from typer.testing import CliRunner

from iclgd_lens.cli import app
from iclgd_lens.report.sweep import combined_table, dai_table, render_sweep, store_cells
from iclgd_lens.sweep import Store, run_sweep


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return make_sweep_report(tmp_path_factory.mktemp("pages"))


def test_dai_table_matches_a_plain_computation_over_episodes(report):
    store = report.parent.parent / "store"
    rows = pd.concat(pd.read_parquet(f) for f in sorted((store / "cells").glob("*/results.parquet")))
    # by hand: tiny-llama-icl, dai lr=0.03, k = 2 (its largest k), SimAOU ICL~GD averaged over layers
    pick = rows[
        (rows.model == "tiny-llama-icl")
        & (rows.gd == "dai lr=0.03")
        & (rows.k == 2)
        & (rows.metric == "simaou")
        & (rows.comparison == "icl~gd")
        & (rows["head"] == -1)
        & (rows.layer >= 0)
    ]
    per_episode = pick.groupby(["seed", "episode"])["value"].mean().to_numpy()
    n = len(per_episode)
    mean = per_episode.mean()
    half = scipy_stats.t.ppf(0.975, n - 1) * per_episode.std(ddof=1) / np.sqrt(n)
    low, high = max(mean - half, -1.0), min(mean + half, 1.0)  # clipped to the cosine's range
    expected = f"{mean:.3f} [{low:.3f}, {high:.3f}]"

    table = dai_table(combined_table(store_cells(store)))
    row = table[(table.model == "tiny-llama-icl") & (table.gd == "dai lr=0.03")].iloc[0]
    assert row["simaou icl~gd"] == expected and row["k"] == 2 and row["episodes"] == n
    accuracy = rows[
        (rows.model == "tiny-llama-icl")
        & (rows.gd == "dai lr=0.03")
        & (rows.k == 2)
        & (rows.metric == "accuracy")
        & (rows.comparison == "icl")
    ]
    assert row["accuracy icl"] == f"{accuracy['value'].mean():.3f}"
    assert len(table) == 3  # (task, model, GD setting) rows
    html = report.read_text()
    assert expected in html


def test_the_page_links_every_cell_report_and_loads_local_scripts_only(report):
    html = report.read_text()
    store = Store(report.parent.parent / "store")
    links = re.findall(r'href="(cells/[0-9a-f]+/index\.html)"', html)
    assert sorted(links) == sorted(f"cells/{k}/index.html" for k in store.done_keys())
    for link in links:
        page = (report.parent / link).read_text()
        for src in re.findall(r'<script src="([^"]+)"', page):
            assert (report.parent / link).parent.joinpath(src).resolve().is_file(), src
    assert not re.search(r'<script src="(https?:)?//', html)
    for section in (
        "Tasks x models",
        "Against k",
        "Against the GD learning rate",
        "Layer profiles side by side",
    ):
        assert section in html
    assert html.count("js-plotly-plot") == 0 and html.count("Plotly.newPlot") >= 3


def test_the_page_shares_the_reports_glossary(report):
    """Metric ids on the sweep page link to a glossary page beside it, with the reports' entries."""
    from iclgd_lens.report import glossary

    html = report.read_text()
    page = (report.parent / glossary.GLOSSARY_PAGE).read_text()
    for metric in ("simaou", "simam_delta", "rec2ftp"):
        assert f'href="{glossary.GLOSSARY_PAGE}#{glossary.anchor(metric)}"' in html
        assert f'id="{glossary.anchor(metric)}"' in page
    assert glossary.entry("simaou").definition.split()[0] in page


def test_model_and_task_strings_are_escaped(tmp_path):
    from iclgd_lens.models import embedded_model_path

    hostile = tmp_path / "<img src=x onerror=alert(1)>"
    shutil.copytree(embedded_model_path("tiny-llama-icl"), hostile)
    spec = tiny_sweep_spec(models=[str(hostile)], k=[1], gd=["dai"], exclude=[])
    run_sweep(spec, tmp_path / "store")
    index = cli("render", tmp_path / "store", "--out", tmp_path / "page")
    assert index.exit_code == 0, index.output
    html = Path(index.stdout.strip()).read_text()
    assert "<img src=x" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_render_a_spec_and_several_runs_side_by_side(tmp_path, report):
    store = report.parent.parent / "store"
    spec = tmp_path / "pages.toml"
    spec.write_text(
        'models = ["tiny-llama-icl"]\nk = [2]\ngd = [{preset = "dai", lr = 3e-2}]\nn_episodes = 2\n'
        f'n_queries = 2\nbaselines = ["random", "random_update"]\nartifacts = false\nstore = "{store}"\n'
    )
    out = cli("render", spec, "--out", tmp_path / "spec-page")
    assert out.exit_code == 0, out.output
    assert "<div>1 cell</div>" in Path(out.stdout.strip()).read_text()

    keys = Store(store).done_keys()[:2]
    runs = cli("render", *(store / "cells" / k / "results.json" for k in keys), "--out", tmp_path / "runs")
    assert runs.exit_code == 0, runs.output
    html = Path(runs.stdout.strip()).read_text()
    assert "2 runs" in html and html.count('href="cells/run') == 2


def test_a_second_render_reuses_the_pages_of_cells_drawn_before(tmp_path, report):
    """Rendering into the same folder again copies each unchanged cell's page instead of drawing
    it (a cell's key names its content); a page from another version of the code is redrawn."""
    import time

    store = report.parent.parent / "store"
    out = tmp_path / "again"
    render_sweep(store, out)
    first = {p: p.read_bytes() for p in sorted(out.rglob("*.html"))}
    key = Store(store).done_keys()[0]
    stamp = out / "cells" / key / ".drawn-by.json"
    stamp.write_text("{}")  # as if drawn by other versions
    page = out / "cells" / key / "index.html"
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/index.html")}
    time.sleep(0.01)
    render_sweep(store, out)
    assert {p: p.read_bytes() for p in sorted(out.rglob("*.html"))}.keys() == first.keys()
    again = {p.parent.name: p.stat().st_mtime_ns for p in out.glob("cells/*/index.html")}
    assert again[key] != mtimes[key] and page.is_file()  # redrawn
    assert all(again[k] == mtimes[k] for k in again if k != key)  # copied as they were


def test_one_setting_per_figure_takes_the_comparisons_own_colours():
    """A layer profile with a single GD setting draws ICL~GD and the random update in the colours
    they have on every other page; several settings get a colour each (dash keeps the comparison)."""
    import numpy as np

    from iclgd_lens.report import style
    from iclgd_lens.report.sweep import layer_profiles

    rows = [
        dict(
            task="t", model="m", gd=gd, k=4, metric="simaou", comparison=c, layer=l, head=-1, unit=u, value=v
        )
        for gd in ("dai", "shen")
        for c in ("icl~gd", "icl~random_update")
        for l in range(2)
        for u, v in enumerate(np.linspace(0.1, 0.3, 4))
    ]
    table = pd.DataFrame(rows)
    one = layer_profiles(table[table.gd == "dai"])[0]
    colours = {t.name.split(" · ")[1]: t.line.color for t in one.data}
    assert colours == {c: style.line(c)["color"] for c in ("icl~gd", "icl~random_update")}
    two = layer_profiles(table)[0]
    by_gd = {t.name.split(" · ")[0]: t.line.color for t in two.data}
    assert len(set(by_gd.values())) == 2
    assert {t.line.dash for t in two.data} == {
        style.line("icl~gd")["dash"],
        style.line("icl~random_update")["dash"],
    }


def test_the_dai_table_says_how_many_episodes_rec2ftp_rests_on():
    """Rec2FTP is undefined in an episode where ICL fixes no query: the Dai table's cell says how
    many of the row's episodes it rests on, as the single-run report does (it showed 100.000 over
    one episode in a row of six, with no count)."""
    from iclgd_lens.report.sweep import dai_table

    rows = []
    for unit, (seed, episode) in enumerate([(0, 0), (0, 1), (1, 0)]):
        common = dict(layer=-1, head=-1, episode=episode, k=2, task="default", model="m", gd="dai", seed=seed)
        rows.append(
            dict(
                common, metric="rec2ftp", comparison="icl~gd", query=-1, value=100.0 if unit == 0 else np.nan
            )
        )
        for q in range(2):
            rows.append(dict(common, metric="accuracy", comparison="icl", query=q, value=1.0))
    table = pd.DataFrame(rows).assign(cell="c")
    table["unit"] = table["seed"].astype(str) + ":" + table["episode"].astype(str)
    out = dai_table(table)
    assert out["rec2ftp icl~gd"].iloc[0] == "100.000 (1 of 3 episodes)"
    assert out["accuracy icl"].iloc[0] == "1.000" and out["episodes"].iloc[0] == 3
