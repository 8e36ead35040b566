"""The answer first: per layer and overall, is ICL~GD above each baseline and how close to the
ICL~ICL ceiling, from the paired tests over episodes (`stats.paired_tests`).

Per similarity metric and layer (a cell), against the floors present for that metric (random
vector, random update of equal norm, untrained model; not every metric has all three):

- "above all baselines": ICL~GD's episode mean exceeds every floor's, and the largest of those
  floors' sign-flip p-values passes (an intersection-union test: the claim needs every floor
  beaten, so its p is the largest of theirs);
- "below a baseline": some floor's mean exceeds ICL~GD's, and the smallest of those p-values
  times the number of floors (Bonferroni within the cell) passes;
- "not distinguishable" otherwise.

"Passes" means below `alpha` after Holm's correction across the layers of the metric
(`correction="holm"`, the default: the chance of any false mark among one metric's layers is at
most `alpha`, whatever the dependence between layers); `correction="none"` compares each cell's
p with `alpha` alone. The metrics are separate questions, not corrected against each other. The
ceiling is ICL under another demonstration order (icl~icl_perm); ICL~GD's share of it is given
only where the ceiling's own interval lies above 0 (a ratio to a ceiling near 0 means nothing).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import pandas as pd

from iclgd_lens.engine import stats

if TYPE_CHECKING:
    from iclgd_lens.engine.results import Results

SIMILARITY_METRICS = ("simaou", "simaou_norm", "simam_delta", "kendall_token", "kendall_example", "dw_cos")
"""The layer-level similarities the verdict (and the report's tests table) speak about."""
FLOORS = ("icl~random", "icl~random_update", "untrained:icl~gd")
FLOOR_NAMES = {
    "icl~random": "random vector",
    "icl~random_update": "random update of equal norm",
    "untrained:icl~gd": "untrained model",
}
CEILING = "icl~icl_perm"
ALPHA = 0.05
CORRECTIONS = ("holm", "none")
ABOVE, UNDECIDED, BELOW = "above all baselines", "not distinguishable", "below a baseline"
NO_BASELINE, UNDEFINED = "no baseline", "undefined"
COLUMNS = [
    "metric",
    "layer",
    "icl_gd",
    "mark",
    "floors",
    "floors_beaten",
    "p",
    "p_adjusted",
    "ceiling",
    "of_ceiling",
]
"""One row per (metric, layer): `floors` the floors tested (short names, comma-separated),
`floors_beaten` how many ICL~GD exceeds at p < alpha uncorrected ("2/3"), `p` the cell's p-value
(the largest floor p when ICL~GD is above them all, Bonferroni's smallest when below one),
`p_adjusted` the same after the correction the mark uses."""


class Verdict(NamedTuple):
    """`text`: one generated paragraph; `table`: one row per (metric, layer) with its mark (COLUMNS)."""

    text: str
    table: pd.DataFrame


def verdict(results: "Results", alpha: float = ALPHA, correction: str = "holm") -> Verdict:
    """The verdict of `results` (at its largest k when it holds several); `correction`: "holm"
    across each metric's layers, or "none"."""
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {correction!r}")
    table = results.table
    if "k" in table.columns and table["k"].nunique() > 1:
        table = table[table["k"] == table["k"].max()]
    table = table[(table["metric"].isin(SIMILARITY_METRICS)) & (table["head"] == -1) & (table["layer"] >= 0)]
    if table.empty or not (table["comparison"] == stats.HEADLINE).any():
        return Verdict(
            "No layer-level similarity of ICL and GD in these results.", pd.DataFrame(columns=COLUMNS)
        )
    tests = stats.paired_tests(table, by=("metric", "layer"), baselines=[*FLOORS, CEILING])
    means = stats.episode_summary(table, by=("metric", "comparison", "layer")).set_index(
        ["metric", "comparison", "layer"]
    )
    rows, directions = [], []
    for (metric, layer), _ in table[table["comparison"] == stats.HEADLINE].groupby(["metric", "layer"]):
        floors = tests[
            (tests["metric"] == metric) & (tests["layer"] == layer) & tests["baseline"].isin(FLOORS)
        ]
        icl_gd = float(means.loc[(metric, stats.HEADLINE, layer), "mean"])
        direction, p = _cell_test(floors)
        if np.isnan(icl_gd):
            mark = UNDEFINED  # e.g. SimAM-delta at layer 0 of a rotary model (Results.undefined says why)
        elif floors.empty:
            mark = NO_BASELINE
        else:
            mark = UNDECIDED  # settled below, once the family's p-values are corrected
        if mark != UNDECIDED:
            direction, p = 0, np.nan
        beaten = int(((floors["diff_mean"] > 0) & (floors["p_value"] < alpha)).sum())
        names = ", ".join(stats.BASELINES[b] for b in FLOORS if b in set(floors["baseline"]))
        ceiling, of_ceiling = _ceiling_share(means, metric, layer, icl_gd)
        rows.append(
            (
                metric,
                int(layer),
                icl_gd,
                mark,
                names,
                f"{beaten}/{len(floors)}",
                p,
                np.nan,
                ceiling,
                of_ceiling,
            )
        )
        directions.append(direction)
    marks = pd.DataFrame(rows, columns=COLUMNS)
    for _, index in marks.groupby("metric", sort=False).groups.items():
        p = marks.loc[index, "p"].to_numpy(dtype=float)
        marks.loc[index, "p_adjusted"] = stats.holm_adjust(p) if correction == "holm" else p
    direction = np.asarray(directions)
    passes = (marks["p_adjusted"] < alpha).to_numpy()
    marks.loc[passes & (direction > 0), "mark"] = ABOVE
    marks.loc[passes & (direction < 0), "mark"] = BELOW
    n_episodes = int(table["episode"].nunique())
    present = [b for b in FLOORS if b in set(tests["baseline"])]
    return Verdict(_paragraph(marks, n_episodes, alpha, correction, present), marks)


def _cell_test(floors: pd.DataFrame) -> tuple[int, float]:
    """(direction, p) of one cell from its floors' paired tests: +1 and the largest p when
    ICL~GD's mean is above every floor's; -1 and min(1, n_floors x the smallest p among the
    floors above it) when some floor is higher; (0, 1) when neither (a tie)."""
    if floors.empty:
        return 0, np.nan
    diff = floors["diff_mean"].to_numpy(dtype=float)
    p = floors["p_value"].fillna(1.0).to_numpy(dtype=float)
    if (diff > 0).all():
        return 1, float(p.max())
    if (diff < 0).any():
        return -1, float(min(1.0, len(p) * p[diff < 0].min()))
    return 0, 1.0


def _ceiling_share(means: pd.DataFrame, metric: str, layer: int, icl_gd: float) -> tuple[float, float]:
    """The ceiling's mean at this cell and ICL~GD as a share of it, NaN unless the ceiling's
    interval over episodes lies above 0."""
    if (metric, CEILING, layer) not in means.index:
        return np.nan, np.nan
    ceiling = means.loc[(metric, CEILING, layer)]
    share = icl_gd / ceiling["mean"] if ceiling["ci_low"] > 0 else np.nan
    return float(ceiling["mean"]), float(share)


def _first_step(n_layers: int, alpha: float, correction: str) -> float:
    """The p-value a metric's smallest p must fall below for any of its layers to be marked:
    alpha / n_layers at Holm's first step, alpha without a correction."""
    return alpha / max(1, n_layers) if correction == "holm" else alpha


def min_episodes_to_mark(n_layers: int, alpha: float = ALPHA, correction: str = "holm") -> int:
    """The fewest episodes whose smallest attainable p-value can pass at the first step of the
    correction (below alpha / n_layers with Holm, below alpha without)."""
    needed = _first_step(n_layers, alpha, correction)
    n = 1
    while stats.min_p_value(n) >= needed and n < 64:
        n += 1
    return n


def _paragraph(
    marks: pd.DataFrame, n_episodes: int, alpha: float, correction: str, present: list[str]
) -> str:
    """One paragraph: what was tested against which floors, then per metric at how many layers
    ICL~GD beats every floor, how close it comes to the ceiling, and what the number of episodes
    allows."""
    episodes = f"{n_episodes} episode{'' if n_episodes == 1 else 's'}"
    how = (
        f"p < {alpha} after Holm's correction across the layers of each metric"
        if correction == "holm"
        else f"p < {alpha} per layer, not corrected for multiple tests"
    )
    text = f"Paired sign-flip tests over {episodes} ({how}). " + _floors_sentence(marks, present)
    tested = marks[~marks["mark"].isin([NO_BASELINE, UNDEFINED])]
    n_layers = int(tested.groupby("metric").size().max()) if len(tested) else 0
    floor_p = stats.min_p_value(n_episodes)
    needed = _first_step(n_layers, alpha, correction)
    if n_layers and floor_p >= needed:
        holm = (
            f", and Holm's correction across {n_layers} layers asks for p < {needed:.3g} at the first"
            if correction == "holm" and n_layers > 1
            else ""
        )
        text += (
            f" With {episodes} no p-value can fall below {floor_p:.3g}{holm}, so no layer can be marked "
            f"above or below its baselines; use at least "
            f"{min_episodes_to_mark(n_layers, alpha, correction)} episodes."
        )
    parts = []
    for metric, group in marks.groupby("metric", sort=False):
        if group["mark"].isin([NO_BASELINE, UNDEFINED]).all():
            parts.append(f"{metric}: no baseline recorded")
            continue
        group = group[group["mark"] != UNDEFINED]  # layers where the metric is undefined say nothing
        above = group.loc[group["mark"] == ABOVE, "layer"].tolist()
        below = group.loc[group["mark"] == BELOW, "layer"].tolist()
        where = f"at layer(s) {', '.join(map(str, above))}" if above else "at no layer"
        part = f"{metric}: ICL~GD is above every baseline {where} of {len(group)}"
        if below:
            part += f", below one at layer(s) {', '.join(map(str, below))}"
        ratio = group["of_ceiling"].dropna()
        if len(ratio):
            part += f"; on average {ratio.mean():.0%} of the ICL~ICL ceiling"
        parts.append(part)
    return text + " " + "; ".join(parts) + "."


def _floors_sentence(marks: pd.DataFrame, present: list[str]) -> str:
    """Which floors each metric was tested against, and the floors this run did not have."""
    by_floors: dict[str, list[str]] = {}
    for metric, floors in marks.groupby("metric", sort=False)["floors"]:
        names = max(floors, key=len)  # the fullest set over the metric's layers
        if names:
            by_floors.setdefault(names, []).append(metric)
    short = {v: FLOOR_NAMES[k] for k, v in stats.BASELINES.items() if k in FLOOR_NAMES}
    groups = [
        f"{', '.join(short[n] for n in names.split(', '))} ({', '.join(metrics)})"
        for names, metrics in by_floors.items()
    ]
    text = f"Floors: {'; '.join(groups)}." if groups else ""
    missing = [FLOOR_NAMES[b] for b in FLOORS if b not in present]
    if missing:
        text += (
            f" Not run: {', '.join(missing)}, so 'above all baselines' says nothing about "
            f"{'it' if len(missing) == 1 else 'them'}."
        )
    return text
