"""Tests of iclgd_lens.engine.results.Results, and `make_results`, the synthetic Results other tests use."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from iclgd_lens.engine import stats as episode_stats
from iclgd_lens.engine.results import TABLE_COLUMNS, Results
from iclgd_lens.errors import IclgdError

EVIL_TOKEN = "<script>alert(1)</script>"
EVIL_IMG_TOKEN = '<img/src="x"onerror=alert(1)>'  # runs under innerHTML, unlike <script>
BOS_LIKE_TOKEN = "<s>"


def make_results(
    n_layers: int = 4,
    n_heads: int = 4,
    n_kv: int = 2,
    d_head: int = 8,
    n_episodes: int = 3,
    n_queries: int = 5,
    ks: tuple[int, ...] = (8,),
    seed: int = 0,
) -> Results:
    """A realistic synthetic comparison: layer, head, query and model-level rows, dW and attention
    artifacts."""
    rng = np.random.default_rng(seed)
    rows = []

    def add(metric, comparison, layer, head, episode, query, value, k):
        rows.append(
            dict(
                metric=metric,
                comparison=comparison,
                layer=layer,
                head=head,
                episode=episode,
                query=query,
                value=float(value),
                k=k,
            )
        )

    for k in ks:
        for ep in range(n_episodes):
            for q in range(n_queries):
                for layer in range(n_layers):
                    base = 0.2 + 0.1 * layer + 0.01 * k
                    add("simaou", "icl~gd", layer, -1, ep, q, base + 0.05 * rng.standard_normal(), k)
                    add("simaou", "icl~random", layer, -1, ep, q, 0.02 * rng.standard_normal(), k)
                    add("simaou", "icl~random_update", layer, -1, ep, q, 0.03 * rng.standard_normal(), k)
                    add(
                        "simaou", "untrained:icl~gd", layer, -1, ep, q, 0.05 + 0.03 * rng.standard_normal(), k
                    )
                    add(
                        "simaou_norm",
                        "icl~gd",
                        layer,
                        -1,
                        ep,
                        q,
                        0.25 + 0.5 * base + 0.02 * rng.standard_normal(),
                        k,
                    )
                    add("simaou_norm", "icl~random", layer, -1, ep, q, 0.25 + 0.02 * rng.standard_normal(), k)
                    add(
                        "probe:mlp_out",
                        "icl~gd",
                        layer,
                        -1,
                        ep,
                        q,
                        0.1 * layer + 0.05 * rng.standard_normal(),
                        k,
                    )
                    for metric in ("simam_before", "simam_after", "simam_delta"):
                        per_head = 0.3 + 0.1 * rng.standard_normal(n_heads)
                        for h in range(n_heads):
                            add(metric, "icl~gd", layer, h, ep, q, per_head[h], k)
                        add(metric, "icl~gd", layer, -1, ep, q, per_head.mean(), k)
                for layer in range(n_layers):
                    for h in range(n_kv):
                        add("dw_cos", "icl~gd", layer, h, ep, -1, 0.4 + 0.1 * rng.standard_normal(), k)
                    add("dw_cos", "icl~gd", layer, -1, ep, -1, 0.4 + 0.05 * rng.standard_normal(), k)
                for cond, p in (("zsl", 0.4), ("icl", 0.8), ("gd", 0.7)):
                    add("accuracy", cond, -1, -1, ep, q, float(rng.random() < p), k)
                for comparison, shift in (("icl~gd", 0.0), ("icl~icl_perm", 0.2)):
                    add(
                        "token_overlap",
                        comparison,
                        -1,
                        -1,
                        ep,
                        q,
                        min(1.0, 0.6 + shift + 0.1 * rng.random()),
                        k,
                    )
                    add(
                        "overlap_cosine",
                        comparison,
                        -1,
                        -1,
                        ep,
                        q,
                        min(1.0, 0.7 + shift + 0.1 * rng.random()),
                        k,
                    )
                    add("kl", comparison, -1, -1, ep, q, 0.5 - shift + 0.1 * rng.random(), k)
                    add("js", comparison, -1, -1, ep, q, 0.1 - shift / 4 + 0.02 * rng.random(), k)
            add("rec2ftp", "icl~gd", -1, -1, ep, -1, 100 * rng.random(), k)
    table = pd.DataFrame(rows)
    if len(ks) == 1:
        table = table.drop(columns="k")

    dw = {}
    for layer in range(n_layers):
        icl = rng.standard_normal((n_kv, d_head, d_head))
        gd = 0.5 * icl + 0.5 * rng.standard_normal((n_kv, d_head, d_head))
        cos = (icl * gd).sum((1, 2)) / (np.linalg.norm(icl, axis=(1, 2)) * np.linalg.norm(gd, axis=(1, 2)))
        dw[layer] = {
            "icl": icl.tolist(),
            "gd": gd.tolist(),
            "cos": cos.tolist(),
        }  # as example_artifacts stores
    tokens = [BOS_LIKE_TOKEN, "Sentence", ":", EVIL_TOKEN, EVIL_IMG_TOKEN, "good", "Label", ":"]
    attention = {}
    for cond in ("zsl", "icl", "gd"):
        attention[cond] = {}
        for layer in range(n_layers):
            scores = rng.standard_normal((n_heads, len(tokens), len(tokens)))
            scores = np.where(np.tril(np.ones((len(tokens), len(tokens)))) > 0, scores, -np.inf)
            pattern = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
            attention[cond][layer] = {"tokens": tokens, "pattern": pattern.tolist()}
    top_tokens = [
        {"token": t, "d_icl": float(rng.normal()) / 10, "d_gd": float(rng.normal()) / 10}
        for t in ["Positive", "Negative", EVIL_TOKEN, EVIL_IMG_TOKEN, " the", "\n"]
    ]
    config = {  # hostile strings wherever a model, a task or data can put one
        "model": f"tiny-llama-icl {EVIL_IMG_TOKEN}",
        "task": f"synthetic {EVIL_IMG_TOKEN}",
        "gd": "dai",
        "k": list(ks),
        "seed": seed,
        "n_layers": n_layers,
        "versions": {"torch": "x"},
        "run_time_s": 1.5,
    }
    example = {
        "icl_prompt": f"cow = {EVIL_IMG_TOKEN}\nhorse =",
        "zsl_prompt": "horse =",
        "label": EVIL_IMG_TOKEN,
    }
    return Results(
        table, config, {"dw": dw, "attention": attention, "top_tokens": top_tokens, "example": example}
    )


# ---- construction ------------------------------------------------------------------------
def test_missing_column_is_a_clear_error():
    table = make_results().table.drop(columns="episode")
    with pytest.raises(IclgdError, match="episode"):
        Results(table, {}, {})


def test_wrong_column_type_is_a_clear_error():
    table = make_results().table
    table["layer"] = "first"
    with pytest.raises(IclgdError, match="wrong type"):
        Results(table, {}, {})


def test_not_a_dataframe_is_a_clear_error():
    with pytest.raises(IclgdError, match="DataFrame"):
        Results([{"metric": "simaou"}], {}, {})


def test_construction_does_not_change_the_callers_table():
    table = make_results().table.iloc[:, ::-1].copy()  # columns reversed
    before = table.copy()
    results = Results(table, {}, {})
    pd.testing.assert_frame_equal(table, before)
    assert tuple(results.table.columns[: len(TABLE_COLUMNS)]) == TABLE_COLUMNS


# ---- summary ------------------------------------------------------------------------------
def test_summary_matches_an_episode_level_t_interval_computed_by_hand():
    results = make_results()
    t = results.table
    rows = t[(t.metric == "simaou") & (t.comparison == "icl~gd") & (t.layer == 2) & (t["head"] == -1)]
    means = rows.groupby("episode")["value"].mean()  # queries of one episode share its demonstrations
    e = len(means)
    half = stats.t.ppf(0.975, e - 1) * means.std(ddof=1) / math.sqrt(e)
    row = results.summary().query(
        "metric == 'simaou' and comparison == 'icl~gd' and layer == 2 and head == -1"
    )
    assert (
        len(row) == 1
        and int(row["n"].iloc[0]) == len(rows) == 15
        and int(row["n_episodes"].iloc[0]) == e == 3
    )
    assert row["mean"].iloc[0] == pytest.approx(means.mean())
    assert row["ci_low"].iloc[0] == pytest.approx(means.mean() - half)
    assert row["ci_high"].iloc[0] == pytest.approx(means.mean() + half)
    assert list(results.summary().columns[4:9]) == ["mean", "ci_low", "ci_high", "n_episodes", "n"]


def test_summary_drops_nans_and_gives_no_interval_for_one_value():
    results = make_results()
    table = results.table.copy()
    mask = (table.metric == "simaou") & (table.comparison == "icl~gd") & (table.layer == 0)
    idx = table.index[mask]
    table.loc[idx[1:], "value"] = np.nan  # leave one value
    summ = (
        Results(table, {}, {}).summary().query("metric == 'simaou' and comparison == 'icl~gd' and layer == 0")
    )
    assert int(summ["n"].iloc[0]) == 1 and int(summ["n_episodes"].iloc[0]) == 1
    assert summ["mean"].iloc[0] == pytest.approx(table.loc[idx[0], "value"])
    assert math.isnan(summ["ci_low"].iloc[0]) and math.isnan(summ["ci_high"].iloc[0])
    assert episode_stats.t_interval([np.nan, np.nan])[3] == 0


def test_summary_never_averages_across_k():
    results = make_results(ks=(2, 8), n_episodes=2, n_queries=2)
    summ = results.summary()
    assert "k" in summ.columns
    sel = summ.query("metric == 'simaou' and comparison == 'icl~gd' and layer == 1 and head == -1")
    assert sorted(sel["k"]) == [2, 8]
    # the synthetic mean rises by 0.01 per demonstration
    diff = float(sel.set_index("k")["mean"][8] - sel.set_index("k")["mean"][2])
    assert 0.0 < diff < 0.15


def test_summary_rejects_unknown_grouping():
    with pytest.raises(IclgdError, match="nonsense"):
        make_results().summary(by=("metric", "nonsense"))


def test_layer_curve_is_sorted_per_layer_and_rises_as_built():
    results = make_results()
    curve = results.layer_curve("simaou", "icl~gd")
    assert curve["layer"].tolist() == [0, 1, 2, 3]
    assert (curve["ci_low"] <= curve["mean"]).all() and (curve["mean"] <= curve["ci_high"]).all()
    assert curve["mean"].is_monotonic_increasing  # 0.1 per layer against noise sd 0.05 / sqrt(15)
    with pytest.raises(IclgdError, match="no metric 'nope'"):
        results.layer_curve("nope", "icl~gd")
    with pytest.raises(IclgdError, match="icl~random"):
        results.layer_curve("simaou", "zsl")


# ---- files ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["folder", "results.json", "results.parquet"])
def test_save_load_round_trip(tmp_path, target):
    results = make_results()
    table = results.table.copy()
    table.loc[0, "value"] = np.nan
    results = Results(table, results.config, results.artifacts)
    folder = results.save(tmp_path / "out")
    assert (folder / "results.json").is_file() and (folder / "results.parquet").is_file()
    json.loads((folder / "results.json").read_text())  # strict JSON (NaN written as null)
    loaded = Results.load(folder if target == "folder" else folder / target)
    pd.testing.assert_frame_equal(loaded.table, results.table)
    assert loaded.config == results.config
    assert loaded.artifacts["dw"]["2"]["gd"] == results.artifacts["dw"][2]["gd"]  # JSON keys are strings
    assert loaded.artifacts["top_tokens"] == results.artifacts["top_tokens"]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(IclgdError, match="not found"):
        Results.load(tmp_path / "missing.json")
    with pytest.raises(IclgdError, match="no results.json"):
        Results.load(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(IclgdError, match="cannot read") as info:
        Results.load(bad)
    assert "\n" not in str(info.value)
    other = tmp_path / "other.json"
    other.write_text('{"a": 1}')
    with pytest.raises(IclgdError, match="not an iclgd-lens results file"):
        Results.load(other)


@pytest.mark.parametrize(
    "artifacts, fragment",
    [
        ({"dw": 5}, "artifacts entry dw is not an object of layers"),
        ({"dw": {"junk": {}}}, "dw['junk'] is not keyed by a layer number"),
        ({"dw": {"0": {"icl": "x"}}}, "dw['0']['icl'] is not a 3-dimensional array of numbers"),
        ({"attention": "junk"}, "entry attention is not an object of conditions"),
        ({"attention": {"icl": {"0": {"tokens": ["a"], "pattern": [[[1.0, 0.0]]]}}}}, "[heads][1][1]"),
        ({"top_tokens": None, "example": [1]}, "entry example is not an object of names and texts"),
        ({"top_tokens": [{"token": "a"}]}, "entry top_tokens is not a list of objects"),
    ],
)
def test_damaged_artifacts_in_a_file_are_one_line(tmp_path, artifacts, fragment):
    """A results file whose artifacts lack the shapes the report draws is refused on load, in one
    line naming the entry (not a TypeError deep in the report)."""
    folder = make_results().save(tmp_path / "out")
    payload = json.loads((folder / "results.json").read_text())
    payload["artifacts"] = artifacts
    (folder / "results.json").write_text(json.dumps(payload))
    with pytest.raises(IclgdError) as info:
        Results.load(folder / "results.json")
    assert fragment in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_layer_number_beyond_int64_is_one_line(tmp_path):
    folder = make_results().save(tmp_path / "out")
    payload = json.loads((folder / "results.json").read_text())
    payload["table"][0]["layer"] = 10**30
    (folder / "results.json").write_text(json.dumps(payload))
    with pytest.raises(IclgdError, match="results table has a column of the wrong type"):
        Results.load(folder / "results.json")


def test_save_refuses_a_file_as_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(IclgdError, match="is a file"):
        make_results().save(f)
    assert f.read_text() == "x"


# ---- notebook view -------------------------------------------------------------------------
def test_repr_html_shows_headline_numbers_escaped():
    results = make_results()
    table = results.table.copy()
    table.loc[table.metric == "kl", "metric"] = EVIL_TOKEN
    results = Results(table, {"model": "<b>m</b>"}, {})
    out = results._repr_html_()
    assert EVIL_TOKEN not in out and "&lt;script&gt;" in out and "<b>m</b>" not in out
    expected = (
        results.summary().query("metric == 'simaou' and comparison == 'icl~gd' and head == -1")["mean"].mean()
    )
    assert f"{expected:.3f}" in out
    assert results.headline()["simaou icl~gd"] == pytest.approx(expected)
