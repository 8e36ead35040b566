"""Analyses and studies (installed as `iclgd_lens.analyses`).

Two kinds of things live here:

* **Report analyses**: `fn(results: Results) -> list[plotly Figure | pd.DataFrame]`, registered
  with `@analysis("name")`. The report renders each as a section. External ones come from the
  entry-point group `iclgd_lens.analyses` or from a file (`--analyses path.py`).
* **Studies**: separate experiments (`run(...) -> StudyResult`), one module each, listed in
  `STUDIES` as "module:function" and imported only when asked for.

    from iclgd_lens.analyses import analysis

    @analysis("simaou-spread")
    def simaou_spread(results):
        return [results.summary().query("metric == 'simaou'")]
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from iclgd_lens import IclgdError
from iclgd_lens.plugins import REGISTRY, register

if TYPE_CHECKING:
    from iclgd_lens import Results

AnalysisFn = Callable[["Results"], list[Any]]

ANALYSES: dict[str, AnalysisFn] = REGISTRY["analyses"]
"""Report analyses registered in this process, by name (the plug-in registry's "analyses")."""

STUDIES: dict[str, Any] = REGISTRY["studies"]
"""Study name -> "module:function" of its `run(...) -> StudyResult`, imported lazily (`load_study`)."""
STUDIES.update(
    {
        "order-sensitivity": "iclgd_lens.analyses.order_sensitivity:run",
        "k-sweep": "iclgd_lens.analyses.k_sweep:run",
        "gd-trajectories": "iclgd_lens.analyses.gd_trajectories:run",
        "weight-properties": "iclgd_lens.analyses.weight_properties:run",
        "iclobj-vs-emergent": "iclgd_lens.analyses.iclobj_vs_emergent:run",
        "icl-vs-iwl": "iclgd_lens.analyses.icl_vs_iwl:run",
        "conflict-probe": "iclgd_lens.analyses.conflict_probe:run",
        "causal": "iclgd_lens.analyses.causal:run",
    }
)


def analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    """Register `fn(results) -> list[Figure | DataFrame]` as a report section called `name`."""
    if not isinstance(name, str) or not name.strip():
        raise IclgdError("an analysis needs a non-empty name, e.g. @analysis('my-analysis')")

    def decorate(fn: AnalysisFn) -> AnalysisFn:
        if not callable(fn):
            raise IclgdError(f"@analysis({name!r}) must decorate a function")
        return register("analyses", name, fn)

    return decorate


__all__ = ["analysis", "ANALYSES", "STUDIES"]
