"""Tests of iclgd_lens.engine.stats (episode-level intervals, the paired sign-flip test) and of the
Results methods built on it, against scipy and against numbers computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sp

from iclgd_lens.engine import stats
from iclgd_lens.engine.results import Results
from iclgd_lens.errors import IclgdError


def scipy_sign_flip(diffs) -> float:
    """scipy's paired permutation test of mean(x - y), all 2^n sign flips (exact)."""
    d = np.asarray(diffs, dtype=float)
    x, y = d, np.zeros_like(d)  # swapping x_i and y_i flips the sign of d_i
    res = sp.permutation_test(
        (x, y),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=np.inf,
        alternative="two-sided",
    )
    return float(res.pvalue)


# ---- t-intervals --------------------------------------------------------------------------------
def test_t_interval_matches_scipy_and_drops_nans():
    values = np.array([0.3, 0.1, np.nan, 0.5, 0.25, 0.4])
    x = values[~np.isnan(values)]
    low, high = sp.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=sp.sem(x))
    mean, lo, hi, n = stats.t_interval(values)
    assert n == 5 and mean == pytest.approx(x.mean())
    assert (lo, hi) == pytest.approx((low, high), rel=1e-12)
    lo90, hi90 = sp.t.interval(0.9, len(x) - 1, loc=x.mean(), scale=sp.sem(x))
    assert stats.t_interval(values, confidence=0.9)[1:3] == pytest.approx((lo90, hi90), rel=1e-12)


def test_t_interval_edge_cases():
    empty = stats.t_interval([np.nan])
    assert empty.n == 0 and all(math.isnan(v) for v in empty[:3])
    one = stats.t_interval([0.3])
    assert one.n == 1 and one.mean == 0.3 and math.isnan(one.ci_low) and math.isnan(one.ci_high)
    flat = stats.t_interval([0.2, 0.2, 0.2])
    assert flat.ci_low == flat.mean == flat.ci_high and flat.n == 3


def test_episode_summary_clips_a_studys_own_metrics_to_the_ranges_it_gives():
    table = pd.DataFrame({"metric": "agreement", "episode": [0, 1], "value": [0.2, 1.0]})
    raw = stats.episode_summary(table, ["metric"]).iloc[0]  # not a metric the engine knows
    assert raw["ci_low"] < 0 and raw["ci_high"] > 1
    got = stats.episode_summary(table, ["metric"], ranges={"agreement": (0.0, 1.0)}).iloc[0]
    assert (got["ci_low"], got["ci_high"], got["mean"]) == (0.0, 1.0, raw["mean"])
    kl = pd.DataFrame({"metric": "kl", "episode": [0, 1], "value": [0.0, 2.0]})  # the engine's range stands
    assert stats.episode_summary(kl, [], ranges={"kl": (-5.0, 5.0)}).iloc[0]["ci_low"] == 0.0


def test_t_interval_clipped_to_bounds_keeps_the_mean():
    rates = [0.0, 1.0, 1.0]  # three runs' error rates: the raw interval reaches past [0, 1]
    raw = stats.t_interval(rates)
    assert raw.ci_low < 0 and raw.ci_high > 1
    got = stats.t_interval(rates, bounds=(0.0, 1.0))
    assert (got.mean, got.ci_low, got.ci_high, got.n) == (raw.mean, 0.0, 1.0, 3)
    inside = stats.t_interval([0.4, 0.5, 0.6], bounds=(0.0, 1.0))  # an interval inside is left alone
    assert tuple(inside) == tuple(stats.t_interval([0.4, 0.5, 0.6]))
    over = stats.t_interval([1 + 1e-7, 1 + 1e-7], bounds=(-1.0, 1.0))  # rounding past the range
    assert over.ci_low == over.mean == over.ci_high == 1 + 1e-7
    one = stats.t_interval([0.3], bounds=(0.0, 1.0))
    assert math.isnan(one.ci_low) and math.isnan(one.ci_high)
    norms = stats.t_interval([0.1, 5.0], bounds=(0.0, math.inf))
    assert norms.ci_low == 0.0 and norms.ci_high == stats.t_interval([0.1, 5.0]).ci_high


def test_episode_interval_is_a_t_interval_over_episode_means():
    rng = np.random.default_rng(3)
    episodes = np.repeat([0, 1, 2, 3, 4], [3, 7, 2, 5, 4])  # unequal numbers of queries
    values = rng.normal(size=episodes.size) + 0.5 * episodes
    values[[1, 10]] = np.nan
    means = pd.Series(values).groupby(episodes).mean()  # pandas skips the NaNs
    low, high = sp.t.interval(0.95, len(means) - 1, loc=means.mean(), scale=sp.sem(means))
    got = stats.episode_interval(values, episodes)
    assert got.n_episodes == 5 and got.n == episodes.size - 2
    assert got.mean == pytest.approx(means.mean()) and got.mean != pytest.approx(np.nanmean(values))
    assert (got.ci_low, got.ci_high) == pytest.approx((low, high), rel=1e-12)
    pd.testing.assert_series_equal(
        stats.episode_means(values, episodes), means, check_names=False, check_index_type=False
    )


def test_the_interval_is_over_episodes_not_queries():
    """2 episodes x 50 queries whose means differ a lot: 100 values, but only 2 demonstration sets."""
    rng = np.random.default_rng(0)
    episodes = np.repeat([0, 1], 50)
    values = np.where(episodes == 0, 0.0, 1.0) + 0.01 * rng.standard_normal(100)
    pooled = stats.t_interval(values)  # what pooling the queries would claim
    got = stats.episode_interval(values, episodes)
    assert got.n_episodes == 2 and got.n == 100
    assert got.ci_high - got.ci_low > 10.0  # t(0.975, df=1) = 12.7: two episodes say little
    assert pooled.ci_high - pooled.ci_low < 0.25
    assert got.ci_low < 0.0 and got.ci_high > 1.0
    table = pd.DataFrame(
        {
            "metric": "simaou",
            "comparison": "icl~gd",
            "layer": 0,
            "head": -1,
            "episode": episodes,
            "query": np.tile(np.arange(50), 2),
            "value": values,
        }
    )
    raw = stats.episode_summary(table, ["metric"], clip=False).iloc[0]
    assert (raw["ci_low"], raw["ci_high"], raw["n_episodes"], raw["n"]) == pytest.approx(
        (got.ci_low, got.ci_high, 2, 100)
    )
    row = Results(table, {}, {}).summary().iloc[0]  # simaou is a cosine: clipped to [-1, 1]
    assert (row["ci_low"], row["ci_high"], row["n_episodes"], row["n"]) == (-1.0, 1.0, 2, 100)


def test_summary_clips_the_interval_to_the_metric_range():
    """3 episodes (t(0.975, 2) = 4.3): the raw t-interval of KL reaches below 0, of overlap_cosine
    and a probe's delta cosine above 1; the summary cuts each exactly at its bound and keeps the
    mean. A metric without a known range, and a metric with one episode (NaN), are unchanged."""
    from iclgd_lens.engine.ranges import METRIC_RANGES, metric_range

    episode_means = {
        "kl": [0.05, 0.9, 0.1],
        "overlap_cosine": [0.99, 0.6, 0.98],
        "probe:resid_out": [0.95, 0.2, 0.9],
        "plugin_metric": [0.05, 0.9, 0.1],  # same numbers as kl, no range
    }
    rows = [
        {"metric": m, "comparison": "icl~gd", "episode": e, "query": q, "value": v + 0.01 * (q - 0.5)}
        for m, vs in episode_means.items()
        for e, v in enumerate(vs)
        for q in (0, 1)  # two queries an episode, averaged to the episode mean first
    ]
    rows += [{"metric": "js", "comparison": "icl~gd", "episode": 0, "query": 0, "value": 0.5}]
    table = pd.DataFrame(rows)
    summ = stats.episode_summary(table, ["metric"]).set_index("metric")
    raw = stats.episode_summary(table, ["metric"], clip=False).set_index("metric")
    for metric, vs in episode_means.items():  # raw = the t-interval over the episode means
        assert tuple(raw.loc[metric, ["mean", "ci_low", "ci_high"]]) == pytest.approx(
            tuple(stats.t_interval(vs))[:3]
        )
    assert raw.loc["kl", "ci_low"] < 0 and raw.loc["overlap_cosine", "ci_high"] > 1
    assert raw.loc["probe:resid_out", "ci_high"] > 1
    pd.testing.assert_series_equal(summ["mean"], raw["mean"])
    assert summ.loc["kl", "ci_low"] == 0.0 and summ.loc["kl", "ci_high"] == raw.loc["kl", "ci_high"]
    assert summ.loc["overlap_cosine", "ci_high"] == 1.0
    assert summ.loc["overlap_cosine", "ci_low"] == raw.loc["overlap_cosine", "ci_low"]
    assert summ.loc["probe:resid_out", "ci_high"] == 1.0 == metric_range("probe:resid_out")[1]
    pd.testing.assert_series_equal(summ.loc["plugin_metric"], raw.loc["plugin_metric"])
    assert summ.loc["js", "mean"] == 0.5 and math.isnan(summ.loc["js", "ci_low"])
    assert math.isnan(summ.loc["js", "ci_high"])
    assert METRIC_RANGES["kl"] == (0.0, math.inf) and metric_range("plugin_metric") is None

    # a group of one metric without `metric` in `by` (a layer curve) is clipped too; a group that
    # spans several metrics gets the widest of their ranges (js and accuracy: [0, 1], not [0, ln 2])
    kl = stats.episode_summary(table[table.metric == "kl"], ["comparison"]).iloc[0]
    assert kl["ci_low"] == 0.0 and kl["ci_high"] == raw.loc["kl", "ci_high"]
    mixed = pd.DataFrame(
        {
            "metric": ["js", "accuracy"] * 3,
            "episode": [0, 0, 1, 1, 2, 2],
            "value": [0.0, 0.0, 0.6, 1.0, 0.1, 0.1],
        }
    )
    unclipped = stats.episode_summary(mixed, [], clip=False).iloc[0]
    assert unclipped["ci_low"] < 0 and unclipped["ci_high"] > 1
    assert tuple(stats.episode_summary(mixed, [])[["ci_low", "ci_high"]].iloc[0]) == (0.0, 1.0)
    # float rounding can put a cosine's mean just above 1: the interval still holds the mean
    over = pd.DataFrame({"metric": "simaou", "episode": [0, 1], "value": [1 + 1e-7, 1 + 1e-7]})
    got = stats.episode_summary(over, ["metric"]).iloc[0]
    assert got["ci_low"] == got["mean"] == got["ci_high"] == 1 + 1e-7
    # the paired differences are not clipped (a difference of cosines lies in [-2, 2])
    pair = pd.DataFrame(
        {
            "metric": "simaou",
            "comparison": ["icl~gd"] * 3 + ["icl~random"] * 3,
            "episode": [0, 1, 2] * 2,
            "value": [0.9, 0.1, 0.8, -0.1, 0.0, 0.1],
        }
    )
    test = stats.paired_tests(pair, ["metric"]).iloc[0]
    assert test["diff_ci_high"] > 1.0


def test_one_episode_gives_no_interval_and_none_gives_nan():
    one = stats.episode_interval([0.1, 0.5, 0.9], [7, 7, 7])
    assert one.n_episodes == 1 and one.n == 3 and one.mean == pytest.approx(0.5) and math.isnan(one.ci_low)
    none = stats.episode_interval([np.nan, np.nan], [0, 1])
    assert none.n_episodes == 0 and none.n == 0 and math.isnan(none.mean)
    flat = stats.episode_interval([0.2, 0.4, 0.3, 0.3], [0, 0, 1, 1])  # both episodes mean 0.3
    assert (
        flat.ci_low == pytest.approx(0.3)
        and flat.ci_high == pytest.approx(0.3)
        and flat.ci_low <= flat.ci_high
    )


# ---- the sign-flip test ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [2, 3, 4, 5, 8, 13, 16])
def test_sign_flip_matches_scipy_permutation_test(n):
    rng = np.random.default_rng(n)
    headline = rng.normal(0.3, 1.0, size=n)
    baseline = rng.normal(0.0, 1.0, size=n)
    d = headline - baseline
    assert stats.sign_flip_pvalue(d) == pytest.approx(scipy_sign_flip(d), abs=1e-12)
    res = sp.permutation_test(
        (headline, baseline),
        lambda a, b, axis: np.mean(a - b, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=np.inf,
    )
    assert stats.paired_test(headline, baseline).p_value == pytest.approx(res.pvalue, abs=1e-12)


@pytest.mark.parametrize(
    "d", [[1, 1, 2, -1, 0, 3], [0.5, -0.5, 0.5, -0.5, 0.5], [0.1, 0.2, 0.3, 0.4], [0.0, 0.0, 0.1, -0.1, 0.2]]
)
def test_sign_flip_counts_ties_like_scipy(d):
    assert stats.sign_flip_pvalue(d) == pytest.approx(scipy_sign_flip(d), abs=1e-12)


def test_sign_flip_smallest_p_and_edge_cases():
    for n in (1, 2, 4, 5, 8):
        assert (
            stats.sign_flip_pvalue(np.arange(1.0, n + 1)) == pytest.approx(2 / 2**n) == stats.min_p_value(n)
        )
    assert stats.min_p_value(4) == 0.125  # the default 4 episodes can never give p < 0.125
    assert stats.min_p_value(17) == 1 / (stats.N_RESAMPLES + 1) and math.isnan(stats.min_p_value(0))
    assert math.isnan(stats.sign_flip_pvalue([])) and math.isnan(stats.sign_flip_pvalue([np.nan]))
    assert stats.sign_flip_pvalue([0.0, 0.0, 0.0]) == 1.0
    assert stats.sign_flip_pvalue([-3.0, -1.0, -2.0]) == stats.sign_flip_pvalue([3.0, 1.0, 2.0]) == 0.25


def test_monte_carlo_above_sixteen_episodes_is_seeded_and_close_to_exact():
    rng = np.random.default_rng(7)
    d = rng.normal(0.25, 1.0, size=20)
    exact = stats.sign_flip_pvalue(d, exact_max=20)  # the exact path, checked against scipy above
    mc = stats.sign_flip_pvalue(d)
    assert mc == stats.sign_flip_pvalue(d, seed=stats.SEED)  # reproducible
    assert abs(mc - exact) < 4 * math.sqrt(exact * (1 - exact) / stats.N_RESAMPLES) + 1e-4
    assert stats.sign_flip_pvalue(d, seed=1) != mc or exact in (0.0, 1.0)
    # +1 smoothing: never 0, the smallest value is 1 / (n_resamples + 1)
    assert stats.sign_flip_pvalue(np.arange(1.0, 41.0)) == 1 / (stats.N_RESAMPLES + 1)
    assert stats.sign_flip_pvalue(np.arange(1.0, 41.0), n_resamples=999) == 1 / 1000


def test_paired_test_pairs_series_by_episode_and_drops_missing_pairs():
    headline = pd.Series([0.5, 0.7, 0.6, 0.9], index=[0, 1, 2, 3])
    baseline = pd.Series(
        [0.1, np.nan, 0.2, 0.3, 0.0], index=[3, 1, 0, 2, 9]
    )  # another order, a NaN, an extra episode
    got = stats.paired_test(headline, baseline)
    d = np.array([0.5 - 0.2, 0.6 - 0.3, 0.9 - 0.1])  # episodes 0, 2, 3
    assert got.n_episodes == 3 and got.diff_mean == pytest.approx(d.mean())
    assert (got.diff_ci_low, got.diff_ci_high) == pytest.approx(
        sp.t.interval(0.95, 2, loc=d.mean(), scale=sp.sem(d))
    )
    assert got.p_value == pytest.approx(scipy_sign_flip(d)) == 0.25
    with pytest.raises(ValueError, match="one baseline value per headline value"):
        stats.paired_test([1.0, 2.0], [1.0])


# ---- tables and Results ---------------------------------------------------------------------------
def hand_table(n_episodes: int = 5, n_queries: int = 3, seed: int = 0) -> pd.DataFrame:
    """Two layers of simaou with every baseline but icl~icl_perm (one missing episode in
    icl~random_update), dw_cos one value per episode (query -1), and accuracy (no headline)."""
    rng = np.random.default_rng(seed)
    rows = []
    shift = {"icl~gd": 0.4, "icl~random": 0.0, "icl~random_update": 0.05, "untrained:icl~gd": 0.38}
    for e in range(n_episodes):
        ep_effect = 0.3 * rng.standard_normal()  # shared by the queries of one episode
        for layer in (0, 1):
            for comparison, mu in shift.items():
                if comparison == "icl~random_update" and e == 0:
                    continue
                for q in range(n_queries):
                    rows.append(
                        ("simaou", comparison, layer, -1, e, q, mu + ep_effect + 0.05 * rng.standard_normal())
                    )
            rows.append(("dw_cos", "icl~gd", layer, -1, e, -1, 0.2 + 0.1 * rng.standard_normal()))
            rows.append(("dw_cos", "icl~random", layer, -1, e, -1, 0.1 * rng.standard_normal()))
        for q in range(n_queries):
            rows.append(("accuracy", "icl", -1, -1, e, q, float(rng.random() < 0.8)))
    return pd.DataFrame(rows, columns=["metric", "comparison", "layer", "head", "episode", "query", "value"])


def by_hand(table, metric, layer, baseline):
    rows = table[(table.metric == metric) & (table.layer == layer)]
    means = rows.groupby(["comparison", "episode"])["value"].mean().unstack("comparison")
    d = (means["icl~gd"] - means[baseline]).dropna().to_numpy()
    low, high = sp.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=sp.sem(d))
    return d, low, high


def test_paired_tests_on_a_hand_made_table():
    table = hand_table()
    tests = stats.paired_tests(table)
    assert list(tests.columns) == [
        "metric",
        "layer",
        "head",
        "comparison",
        "baseline",
        "diff_mean",
        "diff_ci_low",
        "diff_ci_high",
        "p_value",
        "n_episodes",
    ]
    simaou = tests[(tests.metric == "simaou") & (tests.layer == 1)]
    assert simaou["baseline"].tolist() == [
        "icl~random",
        "icl~random_update",
        "untrained:icl~gd",
    ]  # no icl_perm rows
    assert set(tests["comparison"]) == {"icl~gd"} and "accuracy" not in set(tests.metric)
    for metric, layer, baseline in [
        ("simaou", 1, "icl~random"),
        ("simaou", 0, "icl~random_update"),
        ("simaou", 1, "untrained:icl~gd"),
        ("dw_cos", 0, "icl~random"),
    ]:
        d, low, high = by_hand(table, metric, layer, baseline)
        row = tests[(tests.metric == metric) & (tests.layer == layer) & (tests.baseline == baseline)].iloc[0]
        assert row["n_episodes"] == len(d) == (4 if baseline == "icl~random_update" else 5)
        assert row["diff_mean"] == pytest.approx(d.mean())
        assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((low, high))
        assert row["p_value"] == pytest.approx(scipy_sign_flip(d), abs=1e-12)
    # a difference the same sign in all 5 episodes: the smallest p 5 episodes allow
    assert (
        tests[(tests.metric == "simaou") & (tests.baseline == "icl~random")]["p_value"].tolist()
        == [2 / 2**5] * 2
    )
    assert stats.paired_tests(table[table.metric == "accuracy"]).empty
    with pytest.raises(ValueError, match="comparison"):
        stats.paired_tests(table, by=("metric", "comparison"))


def test_summary_carries_the_paired_p_values_on_the_headline_rows():
    results = Results(hand_table(), {}, {})
    summ = results.summary()
    assert list(summ.columns) == [
        "metric",
        "comparison",
        "layer",
        "head",
        "mean",
        "ci_low",
        "ci_high",
        "n_episodes",
        "n",
        "p_vs_random",
        "p_vs_random_update",
        "p_vs_untrained",
        "p_vs_icl_perm",
    ]
    tests = results.paired_tests()
    head = summ[summ.comparison == "icl~gd"].set_index(["metric", "layer"])
    for r in tests.itertuples():
        assert head.loc[(r.metric, r.layer), stats.p_column(r.baseline)] == pytest.approx(r.p_value)
    assert summ.loc[summ.comparison != "icl~gd", ["p_vs_random", "p_vs_untrained"]].isna().all().all()
    assert summ["p_vs_icl_perm"].isna().all()  # the table has no icl~icl_perm
    assert math.isnan(head.loc[("dw_cos", 0), "p_vs_untrained"])  # dw_cos has no untrained baseline
    # dw_cos has one row per episode (query -1): the summary is the plain interval over them
    dw = results.table.query("metric == 'dw_cos' and comparison == 'icl~gd' and layer == 0")["value"]
    row = summ.query("metric == 'dw_cos' and comparison == 'icl~gd' and layer == 0").iloc[0]
    assert row["n_episodes"] == row["n"] == 5
    assert (row["mean"], row["ci_low"], row["ci_high"]) == pytest.approx(tuple(stats.t_interval(dw))[:3])
    assert set(results.summary(p_values=False).columns) == {
        "metric",
        "comparison",
        "layer",
        "head",
        "mean",
        "ci_low",
        "ci_high",
        "n_episodes",
        "n",
    }
    coarse = results.summary(by=("metric", "comparison"))
    d, _, _ = by_hand(results.table.assign(layer=0), "simaou", 0, "icl~random")
    assert coarse.query("metric == 'simaou' and comparison == 'icl~gd'")["p_vs_random"].iloc[
        0
    ] == pytest.approx(scipy_sign_flip(d))


def test_results_paired_tests_keep_k_apart_and_refuse_comparison():
    table = pd.concat([hand_table(seed=1).assign(k=2), hand_table(seed=2).assign(k=8)], ignore_index=True)
    results = Results(table, {}, {})
    tests = results.paired_tests()
    assert "k" in tests.columns and sorted(tests.k.unique()) == [2, 8]
    only_k8 = stats.paired_tests(table[table.k == 8])
    pd.testing.assert_frame_equal(tests[tests.k == 8].drop(columns="k").reset_index(drop=True), only_k8)
    with pytest.raises(IclgdError, match="comparison"):
        results.paired_tests(by=("metric", "comparison"))
    assert results.paired_tests(baselines=["icl~random"])["baseline"].unique().tolist() == ["icl~random"]
