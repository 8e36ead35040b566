"""The range of every built-in metric as two numbers, for the engine to use (no torch here).

`stats.episode_summary` clips each interval to its metric's range: the true mean of a metric
lies inside the metric's range, so intersecting an interval with that range never lowers its
coverage (docs/statistics.md). The glossary (`iclgd_lens.report.glossary`) gives the same ranges
as text for readers; tests/test_report.py checks that the two agree.

    METRIC_RANGES["kl"]           # (0.0, inf)
    metric_range("probe:mlp_out") # (-1.0, 1.0): a probe is compared as a delta cosine
    metric_range("my_metric")     # None: an unknown metric is not clipped
"""

from __future__ import annotations

import math

_COS = (-1.0, 1.0)
_SHARE = (0.0, 1.0)
_NONNEGATIVE = (0.0, math.inf)

METRIC_RANGES: dict[str, tuple[float, float]] = {
    "simaou": _COS,
    "simaou_norm": _COS,
    "simam_before": _COS,
    "simam_after": _COS,
    "simam_delta": _COS,
    "kendall_token": _COS,
    "kendall_example": _COS,
    "kendall_token_per_head": _COS,
    "kendall_example_per_head": _COS,
    "dw_cos": _COS,
    "dw_action_cos": _COS,
    "dual_form_cos": _COS,
    "dual_form_rel_err": _SHARE,
    "accuracy": _SHARE,
    "accuracy_vocab": _SHARE,
    "rec2ftp": (0.0, 100.0),
    "token_overlap": _SHARE,
    "overlap_cosine": _SHARE,
    "kl": _NONNEGATIVE,
    "js": (0.0, math.log(2.0)),
    "sen": _NONNEGATIVE,
    "order_overlap": _SHARE,
    "attn_sen": _NONNEGATIVE,
    "icl_gd_overlap": _SHARE,
}
"""(lowest, highest) value of each built-in metric id, inf where unbounded. Cosines and Kendall's
tau-b are in [-1, 1]; shares in [0, 1]; rec2ftp in percent; KL >= 0; JS <= ln 2. `sen` is at most
sqrt(n_permutations - 1), which depends on the study's setting, so only its lower bound is given."""

PROBE_PREFIX = "probe:"
PROBE_RANGE = _COS
"""The range of every `probe:<name>` metric: a user probe's vectors are compared as a delta cosine
(and against a random vector as a cosine), `engine/table.py`."""


def metric_range(metric: str) -> tuple[float, float] | None:
    """(lowest, highest) value of a metric id, probes included; None for an id not known here."""
    if metric in METRIC_RANGES:
        return METRIC_RANGES[metric]
    if str(metric).startswith(PROBE_PREFIX):
        return PROBE_RANGE
    return None
