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

import importlib
import importlib.util
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from iclgd_lens import IclgdError
from iclgd_lens.userfiles import import_python_file

if TYPE_CHECKING:
    from iclgd_lens import Results

AnalysisFn = Callable[["Results"], list[Any]]
ENTRY_POINT_GROUP = "iclgd_lens.analyses"

ANALYSES: dict[str, AnalysisFn] = {}
"""Report analyses registered in this process, by name."""

STUDIES: dict[str, str] = {
    "order-sensitivity": "iclgd_lens.analyses.order_sensitivity:run",
    "k-sweep": "iclgd_lens.analyses.k_sweep:run",
    "gd-trajectories": "iclgd_lens.analyses.gd_trajectories:run",
    "weight-properties": "iclgd_lens.analyses.weight_properties:run",
    "iclobj-vs-emergent": "iclgd_lens.analyses.iclobj_vs_emergent:run",
    "icl-vs-iwl": "iclgd_lens.analyses.icl_vs_iwl:run",
    "conflict-probe": "iclgd_lens.analyses.conflict_probe:run",
}
"""Study name -> "module:function" of its `run(...) -> StudyResult`, imported lazily."""


def analysis(name: str) -> Callable[[AnalysisFn], AnalysisFn]:
    """Register `fn(results) -> list[Figure | DataFrame]` as a report section called `name`."""
    if not isinstance(name, str) or not name.strip():
        raise IclgdError("an analysis needs a non-empty name, e.g. @analysis('my-analysis')")

    def register(fn: AnalysisFn) -> AnalysisFn:
        if not callable(fn):
            raise IclgdError(f"@analysis({name!r}) must decorate a function")
        ANALYSES[name] = fn
        return fn

    return register


def load_entry_point_analyses() -> dict[str, AnalysisFn]:
    """Import the analyses other packages declare under the entry-point group `iclgd_lens.analyses`.

    An entry point names either a function (registered under the entry point's name) or a
    module whose `@analysis` decorators register themselves on import.
    """
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin is the plugin's fault: say which one
            raise IclgdError(f"cannot load analysis entry point {ep.name!r} ({ep.value}): {err}") from None
        if callable(obj) and ep.name not in ANALYSES:
            ANALYSES[ep.name] = obj
    return dict(ANALYSES)


def load_analyses_file(path: str | Path) -> dict[str, AnalysisFn]:
    """Import a user's Python file so that its `@analysis` functions register; return the registry."""
    import_python_file(path, "analyses")
    return dict(ANALYSES)


def registered_analyses() -> dict[str, AnalysisFn]:
    """Every report analysis known now: registered in-process plus the entry-point ones."""
    return load_entry_point_analyses()


def load_study(name: str) -> Callable[..., Any]:
    """The `run` function of study `name`; IclgdError if unknown or its module is not installed."""
    if name not in STUDIES:
        raise IclgdError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    module_name, _, func_name = STUDIES[name].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):  # the study module itself is missing
            raise IclgdError(f"study {name!r} is not available: module {module_name} is not installed") from None
        raise IclgdError(f"study {name!r} needs a missing module: {err}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise IclgdError(f"study {name!r}: {module_name} has no function {func_name}()")
    return fn
