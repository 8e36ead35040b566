"""Episode-level statistics: intervals and paired tests whose unit is the episode.

The queries of one episode share its demonstrations, its ICL prompt prefix and its GD weight
deltas, so their values are not independent samples: pooling every query into one t-interval
counts one demonstration set many times and makes the interval too narrow. Here every value is
first averaged within its episode (NaNs dropped); intervals and tests then run over the
episode means, one number per independent demonstration set. See docs/statistics.md.

    t_interval(values)                       # plain t-interval, for values that are independent
    t_interval(values, bounds=(0, 1))        # the same, clipped to the range of a rate
    episode_interval(values, episodes)       # mean per episode first, then a t-interval over them
    sign_flip_pvalue(diffs)                  # two-sided paired sign-flip permutation test
    min_p_value(n_episodes)                  # the smallest p that test can give (2 / 2^n exact)
    holm_adjust(p_values)                    # Holm's step-down adjusted p-values of one family
    paired_test(headline, baseline)          # diff of per-episode values: interval and p-value
    episode_summary(table, by)               # episode_interval per group of a tidy table, clipped to
                                             # the metric's range (`ranges.METRIC_RANGES`)
    paired_tests(table, by)                  # icl~gd against each baseline, per group, paired by episode

Pure functions of numpy arrays and pandas frames; nothing here touches a model.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _scipy_stats

from iclgd_lens.engine.ranges import metric_range

CONFIDENCE = 0.95
"""Coverage of every interval unless a caller asks for another."""
EXACT_MAX_EPISODES = 16
"""Up to this many paired episodes the sign-flip test enumerates all 2^n flips exactly."""
N_RESAMPLES = 20_000
"""Random sign flips drawn above `EXACT_MAX_EPISODES` (Monte Carlo, seeded)."""
SEED = 0
"""Seed of the Monte Carlo sign flips (the same flips for every test with the same n)."""
HEADLINE = "icl~gd"
"""The comparison the baselines are tested against."""
BASELINES: dict[str, str] = {
    "icl~random": "random",
    "icl~random_update": "random_update",
    "untrained:icl~gd": "untrained",
    "icl~icl_perm": "icl_perm",
}
"""Baseline comparisons of the headline -> the short name used in `p_vs_<name>` columns.
`icl~random` / `icl~random_update` / `untrained:icl~gd` are floors, `icl~icl_perm` a ceiling."""

_REL_TOL = 1e-9  # flips whose |sum| is within this (relative to sum |d|) of the observed one count as ties


class Interval(NamedTuple):
    """Mean and two-sided t-interval of independent values; `n` values (NaNs dropped)."""

    mean: float
    ci_low: float
    ci_high: float
    n: int


class EpisodeInterval(NamedTuple):
    """Mean of the episode means and the t-interval over them; `n` = values behind them."""

    mean: float
    ci_low: float
    ci_high: float
    n_episodes: int
    n: int


class PairedTest(NamedTuple):
    """Headline minus baseline over paired episodes: mean difference, its t-interval, and the
    two-sided sign-flip p-value; `n_episodes` pairs with both values defined."""

    diff_mean: float
    diff_ci_low: float
    diff_ci_high: float
    p_value: float
    n_episodes: int


# ---- intervals ---------------------------------------------------------------------------------
def _half_width(sd, n, confidence: float):
    """Half-width of the two-sided t-interval for sample sd `sd` of `n` values (arrays work).

    NaN where n < 2 (one number says nothing of its spread); 0 where sd is 0.
    """
    sd = np.asarray(sd, dtype=float)
    n = np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = _scipy_stats.t.ppf(0.5 + confidence / 2, np.where(n >= 2, n - 1, np.nan))
        half = np.where(sd == 0, 0.0, t * sd / np.sqrt(n))
    return np.where(n >= 2, half, np.nan)


def t_interval(
    values: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
    *,
    bounds: tuple[float, float] | None = None,
) -> Interval:
    """Mean and two-sided t-interval (scipy.stats.t, sd with ddof=1) of independent values.

    For numbers that are already one per independent unit: one per episode, per fact, per
    training run. NaNs are dropped; no value -> all NaN, n = 0; one value -> (value, NaN, NaN,
    1); identical values -> a zero-width interval. `bounds`: the (lowest, highest) value the
    quantity can take (a rate's (0, 1)); the interval is clipped to it, never past the mean,
    which keeps its coverage (docs/statistics.md). None leaves it as it is.
    """
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    sd = 0.0 if x.min() == x.max() else float(x.std(ddof=1))
    half = float(_half_width(sd, n, confidence))
    low, high = mean - half, mean + half
    if bounds is not None and n >= 2:
        low, high = max(low, min(bounds[0], mean)), min(high, max(bounds[1], mean))
    return Interval(mean, low, high, n)


def episode_means(values: Sequence[float] | np.ndarray, episodes: Sequence | np.ndarray) -> pd.Series:
    """The mean of each episode's values (NaNs dropped), indexed by episode, sorted.

    Episodes without any defined value are left out.
    """
    frame = pd.DataFrame(
        {"episode": np.asarray(episodes).ravel(), "value": np.asarray(values, dtype=float).ravel()}
    )
    return frame.groupby("episode", sort=True)["value"].mean().dropna()


def episode_interval(
    values: Sequence[float] | np.ndarray, episodes: Sequence | np.ndarray, confidence: float = CONFIDENCE
) -> EpisodeInterval:
    """Interval for values that come in episodes (queries sharing a demonstration set).

    Each episode's values are averaged first; the result is the mean of those episode means and
    a two-sided t-interval over them (`n_episodes - 1` degrees of freedom), whatever the number
    of queries. `n` counts the non-NaN values. 0 or 1 episode -> NaN interval.
    """
    means = episode_means(values, episodes)
    n = int(np.count_nonzero(~np.isnan(np.asarray(values, dtype=float))))
    mean, low, high, n_episodes = t_interval(means.to_numpy(), confidence)
    return EpisodeInterval(mean, low, high, n_episodes, n)


# ---- the paired sign-flip test --------------------------------------------------------------------
@lru_cache(maxsize=32)
def _all_signs(m: int) -> np.ndarray:
    """Every vector of m signs (+1/-1): [2^m, m] (one row of no columns for m = 0)."""
    bits = (np.arange(2**m)[:, None] >> np.arange(m)[None, :]) & 1
    return (1 - 2 * bits).astype(float)


@lru_cache(maxsize=4)
def _random_signs(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """`n_resamples` random sign vectors of length n from numpy's Generator seeded with `seed`."""
    rng = np.random.default_rng(seed)
    signs = 1.0 - 2.0 * rng.integers(0, 2, size=(n_resamples, n))
    signs.flags.writeable = False
    return signs


def sign_flip_pvalue(
    diffs: Sequence[float] | np.ndarray,
    *,
    exact_max: int = EXACT_MAX_EPISODES,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> float:
    """Two-sided p-value of the paired sign-flip permutation test of mean(diffs) = 0.

    `diffs`: one difference per episode (headline minus baseline; NaNs dropped). Under the null
    each difference is as likely to have either sign, so the test statistic mean(d) is compared
    with mean(s * d) over sign vectors s: p = fraction of flips with |mean| >= |observed| (minus
    a tiny tolerance for rounding). Up to `exact_max` differences all 2^n flips are enumerated
    (split in two halves: 2 * 2^(n/2) sums, then counted by sorting); above that
    `n_resamples` random flips from a Generator seeded with `seed`, p = (hits + 1) /
    (n_resamples + 1). The smallest exact p is 2 / 2^n (0.125 for 4 episodes). No difference ->
    NaN; all differences 0 -> 1.
    """
    d = np.asarray(diffs, dtype=float).ravel()
    d = d[~np.isnan(d)]
    n = int(d.size)
    if n == 0:
        return math.nan
    scale = float(np.abs(d).sum())
    threshold = abs(float(d.sum())) - _REL_TOL * scale  # mean(d) scaled by n: the same test on sums
    if threshold <= 0:
        return 1.0
    if n <= exact_max:
        half = n // 2
        a = _all_signs(half) @ d[:half]
        b = np.sort(_all_signs(n - half) @ d[half:])
        hits = (b.size - np.searchsorted(b, threshold - a, side="left")).sum()
        hits += np.searchsorted(b, -threshold - a, side="right").sum()
        return float(hits) / 2.0**n
    sums = _random_signs(n, int(n_resamples), int(seed)) @ d
    hits = int(np.count_nonzero(np.abs(sums) >= threshold))
    return (hits + 1) / (int(n_resamples) + 1)


def min_p_value(
    n_episodes: int, *, exact_max: int = EXACT_MAX_EPISODES, n_resamples: int = N_RESAMPLES
) -> float:
    """The smallest p-value `sign_flip_pvalue` can return for `n_episodes` differences.

    Exact test: 2 / 2^n (only the observed signs and their mirror image are as extreme), e.g.
    0.125 for 4 episodes, 0.03125 for 6, 0.0078 for 8; Monte Carlo: 1 / (n_resamples + 1), the
    test's resolution (its seeded draws may hold the observed signs or their mirror image, so
    the smallest p it returns for some n is a few times that).
    NaN for no episode.
    """
    if n_episodes < 1:
        return math.nan
    if n_episodes <= exact_max:
        return min(1.0, 2.0 / 2.0**n_episodes)
    return 1.0 / (n_resamples + 1)


def holm_adjust(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm's step-down adjusted p-values of one family of tests (same order as given).

    With the m p-values sorted ascending, p_(1) <= ... <= p_(m), the adjusted value of the i-th
    is max over j <= i of min(1, (m - j + 1) * p_(j)); rejecting every hypothesis whose adjusted
    p is below alpha keeps the chance of any false rejection in the family at most alpha, under
    any dependence between the tests (Holm 1979). NaNs stay NaN and do not count in m.
    """
    p = np.asarray(p_values, dtype=float).ravel()
    out = np.full(p.shape, np.nan)
    defined = np.flatnonzero(~np.isnan(p))
    m = defined.size
    if m == 0:
        return out
    order = defined[np.argsort(p[defined], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def _diff_test(d: np.ndarray, confidence: float, exact_max: int, n_resamples: int, seed: int) -> PairedTest:
    d = d[~np.isnan(d)]
    mean, low, high, n = t_interval(d, confidence)
    return PairedTest(
        mean, low, high, sign_flip_pvalue(d, exact_max=exact_max, n_resamples=n_resamples, seed=seed), n
    )


def paired_test(
    headline: Sequence[float] | np.ndarray | pd.Series,
    baseline: Sequence[float] | np.ndarray | pd.Series,
    *,
    confidence: float = CONFIDENCE,
    exact_max: int = EXACT_MAX_EPISODES,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
) -> PairedTest:
    """Is the headline different from the baseline on the same episodes?

    `headline`, `baseline`: one value per episode (e.g. `episode_means`), in the same episode
    order; two pandas Series are paired by their index (the episode) instead. Pairs where
    either is NaN are dropped. Returns the mean difference d = headline - baseline with its
    t-interval over episodes and the two-sided sign-flip p-value (`sign_flip_pvalue`).
    """
    if isinstance(headline, pd.Series) and isinstance(baseline, pd.Series):
        a, b = headline.align(baseline, join="inner")
        a, b = a.to_numpy(dtype=float), b.to_numpy(dtype=float)
    else:
        a, b = np.asarray(headline, dtype=float).ravel(), np.asarray(baseline, dtype=float).ravel()
        if a.shape != b.shape:
            raise ValueError(
                f"paired values need one baseline value per headline value, got {a.size} and {b.size}"
            )
    return _diff_test(a - b, confidence, exact_max, n_resamples, seed)


# ---- tidy tables ---------------------------------------------------------------------------------
SUMMARY_COLUMNS = ("mean", "ci_low", "ci_high", "n_episodes", "n")
TEST_COLUMNS = ("comparison", "baseline", "diff_mean", "diff_ci_low", "diff_ci_high", "p_value", "n_episodes")


def episode_summary(
    table: pd.DataFrame,
    by: Iterable[str],
    *,
    confidence: float = CONFIDENCE,
    episode: str = "episode",
    sort: bool = True,
    clip: bool = True,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> pd.DataFrame:
    """`episode_interval` of `value` for each group of a tidy table: [*by, mean, ci_low,
    ci_high, n_episodes, n].

    Within a group, the values of one `episode` are averaged first (over queries, and over
    whatever else the group spans: layers, heads); `mean` is the mean of the episode means, the
    interval a t-interval over them. `sort=False` keeps the groups in order of appearance.

    When the table has a `metric` column and `clip` is true, ci_low and ci_high are clipped to
    the group's metric range (`ranges.metric_range`; the widest one if a group spans several
    metrics; never past the mean, which float rounding can put just outside). The true mean lies
    in that range, so clipping keeps the interval's coverage. `ranges` adds the ranges of a
    study's own metrics (those of `ranges.METRIC_RANGES` stand). Metrics without a known range,
    the mean and NaN ends are left as they are.
    """
    by = list(by)
    if not by:
        out = episode_summary(
            table.assign(_all=0), ["_all"], confidence=confidence, episode=episode, clip=clip, ranges=ranges
        )
        return out.drop(columns="_all")
    per_episode = (
        table.groupby(by + ([] if episode in by else [episode]), dropna=False, sort=sort)["value"]
        .agg(["mean", "count"])
        .reset_index()
    )
    groups = per_episode.groupby(by, dropna=False, sort=sort)
    out = groups.agg(
        mean=("mean", "mean"),
        sd=("mean", "std"),
        lo=("mean", "min"),
        hi=("mean", "max"),
        n_episodes=("mean", "count"),
        n=("count", "sum"),
    ).reset_index()
    sd = np.where(out["lo"] == out["hi"], 0.0, out["sd"].to_numpy(dtype=float))
    half = _half_width(sd, out["n_episodes"].to_numpy(), confidence)
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    if clip and "metric" in table.columns and len(out):
        low, high = _group_ranges(table, out, by, sort, ranges or {})
        mean = out["mean"].to_numpy(dtype=float)
        out["ci_low"] = np.maximum(out["ci_low"].to_numpy(dtype=float), np.minimum(low, mean))
        out["ci_high"] = np.minimum(out["ci_high"].to_numpy(dtype=float), np.maximum(high, mean))
    out = out.astype({"n_episodes": "int64", "n": "int64"})
    return out[by + list(SUMMARY_COLUMNS)]


def _group_ranges(
    table: pd.DataFrame, groups: pd.DataFrame, by: list[str], sort: bool, extra: dict
) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) range of each row of `groups` (the groups of `by` in `table`): its metric's
    range, the widest over the metrics a group spans; -inf / inf where a metric's is unknown."""
    bounds = {m: metric_range(m) or extra.get(m) or (-math.inf, math.inf) for m in table["metric"].unique()}
    lows, highs = {m: b[0] for m, b in bounds.items()}, {m: b[1] for m, b in bounds.items()}
    if "metric" in by:
        names = groups["metric"].astype(object)
        return (
            names.map(lows).fillna(-math.inf).to_numpy(dtype=float),
            names.map(highs).fillna(math.inf).to_numpy(dtype=float),
        )
    if len(bounds) == 1:
        ((low, high),) = bounds.values()
        return np.full(len(groups), low), np.full(len(groups), high)
    names = table["metric"].astype(object)
    spans = (
        table[by]
        .assign(_low=names.map(lows).fillna(-math.inf), _high=names.map(highs).fillna(math.inf))
        .groupby(by, dropna=False, sort=sort)
        .agg(_low=("_low", "min"), _high=("_high", "max"))
        .reset_index()
    )
    spans = groups[by].merge(spans, on=by, how="left")
    return spans["_low"].to_numpy(dtype=float), spans["_high"].to_numpy(dtype=float)


def p_column(baseline: str) -> str:
    """The summary column holding the headline's p-value against `baseline`: `p_vs_<name>`."""
    name = BASELINES.get(baseline) or "".join(c if c.isalnum() else "_" for c in baseline)
    return f"p_vs_{name}"


def paired_tests(
    table: pd.DataFrame,
    by: Iterable[str] = ("metric", "layer", "head"),
    *,
    headline: str = HEADLINE,
    baselines: Iterable[str] | None = None,
    confidence: float = CONFIDENCE,
    exact_max: int = EXACT_MAX_EPISODES,
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    episode: str = "episode",
) -> pd.DataFrame:
    """The headline comparison against each baseline present, per group, paired by episode.

    For every group of `by` (default: metric, layer, head) in which `headline` and a baseline
    (default: the keys of `BASELINES`) both have values, the values of each comparison are
    averaged per episode, and the differences d_e = headline_e - baseline_e over the episodes
    both have are tested with `paired_test`. Tidy result, one row per (group, baseline):
    [*by, comparison, baseline, diff_mean, diff_ci_low, diff_ci_high, p_value, n_episodes].
    The p-values are not corrected for the many tests a table holds (layers x metrics).
    """
    by = list(by)
    if "comparison" in by:
        raise ValueError("paired_tests pairs comparisons: 'comparison' cannot be one of the groups")
    baselines = list(BASELINES) if baselines is None else [b for b in baselines if b != headline]
    columns = by + list(TEST_COLUMNS)
    sub = table[table["comparison"].isin([headline, *baselines])]
    if sub.empty or not (sub["comparison"] == headline).any():
        return pd.DataFrame(columns=columns)
    if not by:
        out = paired_tests(
            sub.assign(_all=0),
            ["_all"],
            headline=headline,
            baselines=baselines,
            confidence=confidence,
            exact_max=exact_max,
            n_resamples=n_resamples,
            seed=seed,
            episode=episode,
        )
        return out.drop(columns="_all")
    keys = by + ["comparison"] + ([] if episode in by else [episode])
    wide = sub.groupby(keys, dropna=False, sort=True)["value"].mean().unstack("comparison")
    rows = []
    for baseline in baselines:
        if baseline not in wide.columns:
            continue
        diffs = (wide[headline] - wide[baseline]).dropna()
        for key, d in diffs.groupby(level=by, dropna=False, sort=True):
            test = _diff_test(d.to_numpy(dtype=float), confidence, exact_max, n_resamples, seed)
            rows.append((*(key if isinstance(key, tuple) else (key,)), headline, baseline, *test))
    out = pd.DataFrame(rows, columns=columns)
    if out.empty:
        return out
    order = {b: i for i, b in enumerate(baselines)}
    out = out.sort_values(
        by + ["baseline"], key=lambda c: c.map(order) if c.name == "baseline" else c, kind="stable"
    )
    return out.astype({"n_episodes": "int64"}).reset_index(drop=True)


def p_value_columns(
    tests: pd.DataFrame, by: Sequence[str], baselines: Iterable[str] | None = None
) -> pd.DataFrame:
    """`paired_tests` output as one row per group with a `p_vs_<name>` column per baseline
    (NaN where a baseline is absent): [*by, comparison, p_vs_...]."""
    by = list(by)
    names = [p_column(b) for b in (list(BASELINES) if baselines is None else baselines)]
    for b in tests["baseline"].unique() if len(tests) else []:
        if p_column(b) not in names:
            names.append(p_column(b))
    if tests.empty:
        return pd.DataFrame(columns=by + ["comparison"] + names)
    wide = (
        tests.assign(column=tests["baseline"].map(p_column))
        .set_index(by + ["comparison", "column"])["p_value"]
        .unstack("column")
        .reindex(columns=names)
    )
    wide.columns.name = None
    return wide.reset_index()
