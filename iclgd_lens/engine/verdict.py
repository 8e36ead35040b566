"""The answer first: per layer and overall, is ICL~GD above each baseline and how close to the
ICL~ICL ceiling, from the paired tests over episodes (`stats.paired_tests`).

A layer's mark for a similarity metric is "above all baselines" when ICL~GD exceeds every floor
present (random vector, random update of equal norm, untrained model) with p < ALPHA in the paired
sign-flip test over episodes, "below a baseline" when some floor is significantly higher, and "not
distinguishable" otherwise. The ceiling is ICL under another demonstration order (icl~icl_perm).
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
CEILING = "icl~icl_perm"
ALPHA = 0.05
ABOVE, UNDECIDED, BELOW = "above all baselines", "not distinguishable", "below a baseline"
NO_BASELINE, UNDEFINED = "no baseline", "undefined"


class Verdict(NamedTuple):
    """`text`: one generated paragraph; `table`: one row per (metric, layer) with its mark."""

    text: str
    table: pd.DataFrame


def verdict(results: "Results", alpha: float = ALPHA) -> Verdict:
    """The verdict of `results` (at its largest k when it holds several)."""
    table = results.table
    if "k" in table.columns and table["k"].nunique() > 1:
        table = table[table["k"] == table["k"].max()]
    table = table[(table["metric"].isin(SIMILARITY_METRICS)) & (table["head"] == -1) & (table["layer"] >= 0)]
    columns = ["metric", "layer", "icl_gd", "mark", "floors_beaten", "ceiling", "of_ceiling"]
    if table.empty or not (table["comparison"] == stats.HEADLINE).any():
        return Verdict(
            "No layer-level similarity of ICL and GD in these results.", pd.DataFrame(columns=columns)
        )
    tests = stats.paired_tests(table, by=("metric", "layer"), baselines=[*FLOORS, CEILING])
    means = stats.episode_summary(table, by=("metric", "comparison", "layer")).set_index(
        ["metric", "comparison", "layer"]
    )
    rows = []
    for (metric, layer), group in table[table["comparison"] == stats.HEADLINE].groupby(["metric", "layer"]):
        floors = tests[
            (tests["metric"] == metric) & (tests["layer"] == layer) & tests["baseline"].isin(FLOORS)
        ]
        beaten = int(((floors["diff_mean"] > 0) & (floors["p_value"] < alpha)).sum())
        lost = bool(((floors["diff_mean"] < 0) & (floors["p_value"] < alpha)).any())
        mark = (
            NO_BASELINE if floors.empty else BELOW if lost else ABOVE if beaten == len(floors) else UNDECIDED
        )
        icl_gd = float(means.loc[(metric, stats.HEADLINE, layer), "mean"])
        if np.isnan(icl_gd):
            mark = UNDEFINED  # e.g. SimAM-delta at layer 0 of a rotary model (Results.undefined says why)
        ceiling = (
            float(means.loc[(metric, CEILING, layer), "mean"])
            if (metric, CEILING, layer) in means.index
            else np.nan
        )
        of_ceiling = icl_gd / ceiling if ceiling and not np.isnan(ceiling) else np.nan
        rows.append((metric, int(layer), icl_gd, mark, f"{beaten}/{len(floors)}", ceiling, of_ceiling))
    marks = pd.DataFrame(rows, columns=columns)
    n_episodes = int(table["episode"].nunique())
    return Verdict(_paragraph(marks, n_episodes, alpha), marks)


def _paragraph(marks: pd.DataFrame, n_episodes: int, alpha: float) -> str:
    """One paragraph: per metric, at how many layers ICL~GD beats every baseline, how close it
    comes to the ceiling, and what the number of episodes allows."""
    parts = []
    for metric, group in marks.groupby("metric", sort=False):
        if group["mark"].isin([NO_BASELINE, UNDEFINED]).all():
            parts.append(f"{metric}: no baseline recorded")
            continue
        group = group[group["mark"] != UNDEFINED]  # layers where the metric is undefined say nothing
        above = group.loc[group["mark"] == ABOVE, "layer"].tolist()
        below = group.loc[group["mark"] == BELOW, "layer"].tolist()
        where = f"at layer(s) {', '.join(map(str, above))}" if above else "at no layer"
        text = f"{metric}: ICL~GD is above every baseline {where} of {len(group)}"
        if below:
            text += f", below one at layer(s) {', '.join(map(str, below))}"
        ratio = group["of_ceiling"].dropna()
        if len(ratio):
            text += f"; on average {ratio.mean():.0%} of the ICL~ICL ceiling"
        parts.append(text)
    floor = stats.min_p_value(n_episodes)
    note = (
        f" With {n_episodes} episodes no p-value can fall below {floor:.3g}, so no layer can be above "
        f"its baselines at p < {alpha}; use more episodes."
        if floor >= alpha
        else ""
    )
    return (
        f"Paired sign-flip tests over {n_episodes} episodes (p < {alpha}, not corrected for multiple tests). "
        + "; ".join(parts)
        + "."
        + note
    )
