"""Results: the tidy table of one comparison, its configuration, and what the report draws.

`compare()` returns a `Results`; the report, the CLI and notebooks read it. The table has one
row per number (see docs/architecture.md, "Results — the tidy table"):

    metric | comparison | layer | head | episode | query | value     (+ optional `k`, ...)

`summary()` gives episode-level 95% t-intervals (queries averaged within their episode first)
and, for the headline comparison, paired sign-flip p-values against each baseline
(`paired_tests()`; both from `iclgd_lens.engine.stats`, see docs/statistics.md); `save()` writes
`results.json` (table records + config + artifacts) and `results.parquet` (the table, with
config and artifacts in its metadata); `Results.load()` reads either file, or the folder.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from iclgd_lens.engine import stats
from iclgd_lens.errors import IclgdError

TABLE_COLUMNS: tuple[str, ...] = ("metric", "comparison", "layer", "head", "episode", "query", "value")
"""The columns every results table has, in this order. Extra columns (e.g. `k`) are kept."""

_INT_COLUMNS = ("layer", "head", "episode", "query")
_STR_COLUMNS = ("metric", "comparison")
JSON_NAME = "results.json"
PARQUET_NAME = "results.parquet"
_PARQUET_META_KEY = b"iclgd_lens"


PROVENANCE_PACKAGES = (
    "iclgd-lens",
    "torch",
    "transformer-lens",
    "transformers",
    "numpy",
    "pandas",
    "scipy",
    "plotly",
    "circuitsvis",
)
"""The packages whose versions are recorded with every result (those that change numbers or pages)."""


def versions() -> dict[str, str | None]:
    """Python and package versions, for the provenance of a result or a page."""
    import importlib.metadata as md
    import platform

    import iclgd_lens

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in PROVENANCE_PACKAGES:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    # the code's own version, not the one an editable install recorded when it was made
    out["iclgd-lens"] = iclgd_lens.__version__
    return out


def _validated_table(table: Any) -> pd.DataFrame:
    """A copy of `table` with the required columns and their dtypes, or an IclgdError."""
    if not isinstance(table, pd.DataFrame):
        raise IclgdError(f"Results.table must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise IclgdError(
            f"results table lacks column(s) {', '.join(missing)}; expected {', '.join(TABLE_COLUMNS)}"
        )
    table = table.copy()  # never change the caller's frame
    try:
        for col in _STR_COLUMNS:
            table[col] = table[col].astype(str)
        for col in _INT_COLUMNS:
            table[col] = table[col].astype("int64")
        table["value"] = table["value"].astype(float)
        if "k" in table.columns:
            table["k"] = table["k"].astype("int64")
    except (TypeError, ValueError, OverflowError) as err:
        raise IclgdError(
            f"results table has a column of the wrong type: {str(err).splitlines()[0]}"
        ) from None
    extra = [c for c in table.columns if c not in TABLE_COLUMNS]
    return table[list(TABLE_COLUMNS) + extra].reset_index(drop=True)


def checked_artifacts(artifacts: dict, where: str) -> dict:
    """`artifacts` read from a file, if they have the shapes the report draws (the class
    docstring); otherwise one line saying which entry is wrong. Unknown entries are kept."""

    def refuse(entry: str, expected: str) -> None:
        raise IclgdError(f"{where}: artifacts entry {entry} is not {expected}")

    def layer_keys(mapping: Any, entry: str) -> None:
        if not isinstance(mapping, dict):
            refuse(entry, "an object of layers")
        for key in mapping:
            if not str(key).isdigit() or int(key) > 100_000:
                refuse(f"{entry}[{key!r}]", "keyed by a layer number")

    def numbers(value: Any, ndim: int, entry: str) -> np.ndarray:
        try:
            array = np.asarray(value, dtype=float)
        except (TypeError, ValueError):
            array = None
        if array is None or array.ndim != ndim:
            refuse(entry, f"a {ndim}-dimensional array of numbers")
        return array

    dw = artifacts.get("dw")
    if dw is not None:
        layer_keys(dw, "dw")
        for layer, entry in dw.items():
            if not isinstance(entry, dict):
                refuse(f"dw[{layer!r}]", "an object with 'icl', 'gd' and 'cos'")
            for part, ndim in (("icl", 3), ("gd", 3), ("cos", 1)):
                if part in entry:
                    numbers(entry[part], ndim, f"dw[{layer!r}][{part!r}]")
    attention = artifacts.get("attention")
    if attention is not None:
        if not isinstance(attention, dict):
            refuse("attention", "an object of conditions")
        for condition, per_layer in attention.items():
            layer_keys(per_layer, f"attention[{condition!r}]")
            for layer, entry in per_layer.items():
                name = f"attention[{condition!r}][{layer!r}]"
                if not isinstance(entry, dict) or not isinstance(entry.get("tokens"), list):
                    refuse(name, "an object with a list of 'tokens' and a 'pattern'")
                pattern = numbers(entry.get("pattern"), 3, f"{name}['pattern']")
                if pattern.shape[1:] != (len(entry["tokens"]),) * 2:
                    refuse(f"{name}['pattern']", f"[heads][{len(entry['tokens'])}][{len(entry['tokens'])}]")
    top = artifacts.get("top_tokens")
    if top is not None:
        lists = top.values() if isinstance(top, dict) else [top]
        for items in lists:
            if not isinstance(items, list) or not all(
                isinstance(t, dict) and {"token", "d_icl", "d_gd"} <= set(t) for t in items
            ):
                refuse("top_tokens", "a list of objects with 'token', 'd_icl' and 'd_gd'")
    example = artifacts.get("example")
    if example is not None and not isinstance(example, dict):
        refuse("example", "an object of names and texts")
    return artifacts


def _jsonable(obj: Any) -> Any:
    """`obj` with tensors/arrays turned into lists and NaN/inf into None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "detach"):  # torch tensor, without importing torch
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def _atomic_write(path: Path, write) -> None:
    """Write a file through a temporary file beside it, so no half-written file is left."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _short_name(value: Any) -> str:
    """A config entry (a name, or a dict such as the model info) as a short name."""
    if isinstance(value, dict):
        return str(value.get("name", "?"))
    return str(value)


@dataclass
class Results:
    """One comparison's numbers (`table`), how they were made (`config`), and drawables (`artifacts`).

    `config`: settings, package versions, seed, run time. `artifacts` (JSON-serialisable):
    `dw[layer] = {"icl": [kv_head][d_head][d_head], "gd": ...}`, `attention[condition][layer] =
    {"tokens": [...], "pattern": [head][q][k]}`, `top_tokens = [{"token", "d_icl", "d_gd"}]`.
    """

    table: pd.DataFrame
    config: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.table = _validated_table(self.table)
        if not isinstance(self.config, dict):
            raise IclgdError(f"Results.config must be a dict, got {type(self.config).__name__}")
        if not isinstance(self.artifacts, dict):
            raise IclgdError(f"Results.artifacts must be a dict, got {type(self.artifacts).__name__}")

    # ---- aggregation -------------------------------------------------------------------
    @property
    def metrics(self) -> list[str]:
        """The metric names present in the table, in order of first appearance."""
        return [str(m) for m in pd.unique(self.table["metric"])]  # pd.unique keeps that order

    @property
    def k_values(self) -> list[int]:
        """The numbers of demonstrations in the table (empty when it has no `k` column)."""
        return sorted(self.table["k"].unique().tolist()) if "k" in self.table.columns else []

    def _by_with_k(self, by: Sequence[str]) -> list[str]:
        """`by` checked against the columns, with `k` added when the table holds several k."""
        by = list(by)
        unknown = [c for c in by if c not in self.table.columns]
        if unknown:
            raise IclgdError(
                f"cannot group by {', '.join(unknown)}; columns are {', '.join(self.table.columns)}"
            )
        if len(self.k_values) > 1 and "k" not in by:
            by.append("k")
        return by

    def summary(
        self, by: Sequence[str] = ("metric", "comparison", "layer", "head"), *, p_values: bool = True
    ) -> pd.DataFrame:
        """Episode-level mean and 95% t-interval of `value` per group of `by`, with paired p-values.

        Columns: [*by, mean, ci_low, ci_high, n_episodes, n] (see `stats.episode_summary`): within
        a group each episode's values (its queries; NaNs dropped) are averaged first, `mean` is
        the mean of the episode means and the interval a t-interval over them, since queries of
        one episode share its demonstrations and GD deltas. `n` counts the values. One episode
        -> NaN interval. The interval's ends are clipped to the metric's range (cosines to
        [-1, 1], KL to [0, inf), ...; `ranges.METRIC_RANGES`), which keeps its coverage. When
        the table has a `k` column with several values, `k` is added to the grouping: numbers
        from different k are never averaged together.

        When `by` includes `comparison` and `p_values` is true, columns `p_vs_random`,
        `p_vs_random_update`, `p_vs_untrained`, `p_vs_icl_perm` (`stats.p_column`) hold, on the
        rows of the headline comparison `icl~gd`, the two-sided sign-flip p-value of icl~gd
        against that baseline in the same group (`paired_tests`); NaN on every other row and
        where the baseline is absent.
        """
        by = self._by_with_k(by)
        summ = stats.episode_summary(self.table, by)
        if not p_values or "comparison" not in by:
            return summ
        groups = [c for c in by if c != "comparison"]
        wide = stats.p_value_columns(stats.paired_tests(self.table, groups), groups)
        wide = wide.astype({c: summ[c].dtype for c in by})
        out = summ.merge(wide, on=by, how="left")
        p_cols = [c for c in wide.columns if c not in by]
        return out.astype({c: float for c in p_cols})

    def paired_tests(
        self,
        by: Sequence[str] = ("metric", "layer", "head"),
        *,
        headline: str = stats.HEADLINE,
        baselines: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """The headline comparison (`icl~gd`) against each baseline present, paired by episode.

        One row per group of `by` (plus `k` when the table sweeps k) and baseline: [*by,
        comparison, baseline, diff_mean, diff_ci_low, diff_ci_high, p_value, n_episodes], where
        diff = headline - baseline of the per-episode means, its 95% t-interval over episodes,
        and the two-sided paired sign-flip permutation p-value (exact up to 16 episodes).
        Baselines default to `stats.BASELINES`: icl~random, icl~random_update,
        untrained:icl~gd, icl~icl_perm. See `stats.paired_tests` and docs/statistics.md.
        """
        by = self._by_with_k(by)
        if "comparison" in by:
            raise IclgdError("paired_tests pairs comparisons with each other: leave 'comparison' out of `by`")
        return stats.paired_tests(self.table, by, headline=headline, baselines=baselines)

    def layer_curve(self, metric: str, comparison: str = "icl~gd") -> pd.DataFrame:
        """Layer-level summary of one metric and comparison: layer, mean, ci_low, ci_high, n_episodes, n.

        Rows with `head == -1` (layer-level values) and `layer >= 0`, sorted by layer (and k).
        """
        rows = self.table[(self.table["metric"] == metric) & (self.table["comparison"] == comparison)]
        if rows.empty:
            have = self.table.loc[self.table["metric"] == metric, "comparison"].unique().tolist()
            if not have:
                raise IclgdError(f"no metric {metric!r} in the results; metrics: {', '.join(self.metrics)}")
            raise IclgdError(f"metric {metric!r} has no comparison {comparison!r}; it has {', '.join(have)}")
        sub = Results(rows[(rows["layer"] >= 0) & (rows["head"] == -1)], self.config, {})
        by = ["layer"] + (["k"] if len(self.k_values) > 1 else [])
        return sub.summary(by=by).sort_values(by[::-1]).reset_index(drop=True)

    @classmethod
    def concat(cls, parts: Sequence["Results"]) -> "Results":
        """Results of several runs (e.g. one per k) as one: tables stacked (each keeps its `k`),
        the first run's config with every run's k and the summed run time, the last run's
        artifacts (the report draws those of the largest k)."""
        if not parts:
            raise IclgdError("Results.concat needs at least one Results")
        if len(parts) == 1:
            return parts[0]
        table = pd.concat([p.table for p in parts], ignore_index=True)
        config = dict(parts[0].config)
        config["k"] = [p.config.get("k") for p in parts]
        config["run_time_s"] = round(sum(float(p.config.get("run_time_s") or 0) for p in parts), 2)
        return cls(table, config, parts[-1].artifacts)

    def verdict(self, alpha: float = 0.05, correction: str = "holm"):
        """The answer first (`engine/verdict.py`): a `Verdict(text, table)`, the table marking
        each (similarity metric, layer) above all baselines / not distinguishable / below one,
        Holm-corrected across each metric's layers (`correction="none"`: per layer at `alpha`),
        with ICL~GD's share of the ICL~ICL ceiling."""
        from iclgd_lens.engine.verdict import verdict

        return verdict(self, alpha, correction)

    def undefined(self) -> pd.DataFrame:
        """Where the table holds undefined values (NaN), and why: metric, comparison, layers,
        n_undefined, n, because (`metrics.UNDEFINED_BECAUSE`; "no defined value" otherwise)."""
        from iclgd_lens.engine.metrics import UNDEFINED_BECAUSE

        nan = self.table[self.table["value"].isna()]
        rows = []
        for (metric, comparison), group in nan.groupby(["metric", "comparison"], sort=True):
            total = int(((self.table["metric"] == metric) & (self.table["comparison"] == comparison)).sum())
            layers = ", ".join(str(layer) for layer in sorted(group["layer"].unique()))
            because = UNDEFINED_BECAUSE.get(metric, "no defined value")
            rows.append((metric, comparison, layers, len(group), total, because))
        return pd.DataFrame(rows, columns=["metric", "comparison", "layers", "n_undefined", "n", "because"])

    # ---- files -------------------------------------------------------------------------
    def to_json_dict(self) -> dict:
        """The whole result as a strict-JSON dict: table records, config, artifacts."""
        return {
            "table": _jsonable(self.table.to_dict(orient="records")),
            "config": _jsonable(self.config),
            "artifacts": _jsonable(self.artifacts),
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `results.json` and `results.parquet` into `directory` (created); return the folder."""
        out = Path(directory)
        if out.exists() and not out.is_dir():
            raise IclgdError(f"cannot save results into {out}: it is a file, not a folder")
        out.mkdir(parents=True, exist_ok=True)
        payload = self.to_json_dict()
        text = json.dumps(payload, allow_nan=False)
        _atomic_write(out / JSON_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(self.table, preserve_index=False)
        meta = dict(arrow.schema.metadata or {})
        meta[_PARQUET_META_KEY] = json.dumps(
            {"config": payload["config"], "artifacts": payload["artifacts"]}
        ).encode()
        arrow = arrow.replace_schema_metadata(meta)
        _atomic_write(out / PARQUET_NAME, lambda tmp: pq.write_table(arrow, tmp))
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Results":
        """Read results saved by `save`: a folder, its `results.json`, or its `results.parquet`."""
        path = Path(path)
        if path.is_dir():
            for name in (JSON_NAME, PARQUET_NAME):
                if (path / name).is_file():
                    return cls.load(path / name)
            raise IclgdError(f"no {JSON_NAME} or {PARQUET_NAME} in {path}")
        if not path.is_file():
            raise IclgdError(f"results file not found: {path}")
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            try:
                arrow = pq.read_table(path)
            except Exception as err:  # pyarrow raises several types for a bad file
                raise IclgdError(f"cannot read {path} as Parquet: {str(err).splitlines()[0]}") from None
            meta = json.loads((arrow.schema.metadata or {}).get(_PARQUET_META_KEY, b"{}"))
            artifacts = checked_artifacts(meta.get("artifacts") or {}, str(path))
            return cls(arrow.to_pandas(), meta.get("config", {}), artifacts)
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise IclgdError(f"cannot read {path} as results JSON: {err}") from None
        if not isinstance(payload, dict) or "table" not in payload:
            raise IclgdError(f"{path} is not an iclgd-lens results file (no 'table' key)")
        rows = payload["table"]
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise IclgdError(f"{path} is not an iclgd-lens results file ('table' must be a list of rows)")
        for key in ("config", "artifacts"):
            if not isinstance(payload.get(key) or {}, dict):
                raise IclgdError(f"{path} is not an iclgd-lens results file ({key!r} must be an object)")
        table = pd.DataFrame.from_records(rows, columns=None)
        if table.empty:
            table = pd.DataFrame(columns=list(TABLE_COLUMNS))
        if "value" in table.columns:
            bad = next(
                (i for i, v in enumerate(table["value"]) if v is not None and type(v) not in (int, float)),
                None,
            )  # (bool, a str, a list ...: JSON's numbers load as int or float)
            if bad is not None:
                raise IclgdError(
                    f"{path}: row {bad} of 'table' has value {repr(table['value'][bad])[:80]}; "
                    "values are numbers or null"
                )
            table["value"] = pd.to_numeric(table["value"], errors="coerce")  # None -> NaN
        return cls(
            table, payload.get("config") or {}, checked_artifacts(payload.get("artifacts") or {}, str(path))
        )

    # ---- notebooks ---------------------------------------------------------------------
    def headline(self) -> dict[str, float]:
        """A few numbers worth seeing first (absent ones are left out).

        Layer metrics are averaged over layers (of the layer-level means); model-level ones
        (accuracy, Rec2FTP, ...) are their mean over episodes.
        """
        out: dict[str, float] = {}
        summ = self.summary(by=("metric", "comparison", "layer", "head"), p_values=False)
        if "k" in summ.columns:  # the largest k is the headline
            summ = summ[summ["k"] == summ["k"].max()]
        summ = summ[summ["head"] == -1]
        for metric, comparison in [
            ("accuracy", "zsl"),
            ("accuracy", "icl"),
            ("accuracy", "gd"),
            ("rec2ftp", "icl~gd"),
            ("simaou", "icl~gd"),
            ("simaou", "icl~random"),
            ("simaou", "icl~random_update"),
            ("simam_delta", "icl~gd"),
            ("dw_cos", "icl~gd"),
            ("token_overlap", "icl~gd"),
        ]:
            rows = summ[(summ["metric"] == metric) & (summ["comparison"] == comparison)]
            if not rows.empty:
                out[f"{metric} {comparison}"] = float(rows["mean"].mean())
        return out

    def _repr_html_(self) -> str:
        """The notebook view, answer first: the verdict paragraph and its layer x metric marks, the
        headline numbers beside their baselines with episode-level intervals, the similarities by
        layer as an inline figure (plotly.js embedded once per session, no network), and every
        metric x comparison mean. Uses the report's components (imported here, not at module level)."""
        from iclgd_lens.engine.verdict import SIMILARITY_METRICS
        from iclgd_lens.report import headline_table, verdict_table
        from iclgd_lens.report.figures import layer_panels_figure
        from iclgd_lens.report.notebook import figure_html
        from iclgd_lens.report.templates import table, visible_controls

        model, task = (_short_name(self.config.get(key, "?")) for key in ("model", "task"))
        title = html.escape(f"iclgd-lens Results: model={model}, task={task}, {len(self.table)} rows")
        found = self.verdict()
        marks = verdict_table(self)
        head = headline_table(self)
        panels = layer_panels_figure(self, [m for m in SIMILARITY_METRICS if m in self.metrics])
        by = self._by_with_k(("metric", "comparison"))  # numbers of different k stay apart
        layer_level = self.table[self.table["head"] == -1]  # per-head rows would be counted twice
        summ = stats.episode_summary(layer_level, by)
        rows = [c for c in by if c != "comparison"]
        pivot = summ.pivot_table(index=rows, columns="comparison", values="mean", aggfunc="first")
        text = visible_controls(  # (the figure's own JSON is made safe by figure_html)
            f"<div><b>{title}</b>"
            f"<p>{html.escape(found.text)}</p>"
            + (table(marks) if len(marks) else "")
            + (
                "<p><b>Headline numbers</b> (mean [95% interval over episodes]; similarities averaged "
                "over layers)</p>" + table(head)
                if len(head)
                else ""
            )
        )
        means = pivot.to_html(float_format=lambda v: f"{v:.3f}", na_rep="n/a", escape=True)
        return (
            text
            + (figure_html(panels) if panels is not None else "")
            + visible_controls(
                "<details><summary>mean of every metric x comparison at the layer level (head -1 "
                "rows; over layers, episodes, queries; n/a: no number for that pair)"
                f"</summary>{means}</details></div>"
            )
        )

    def __repr__(self) -> str:
        return (
            f"Results({len(self.table)} rows, metrics={self.metrics}, "
            f"config keys={sorted(self.config)}, artifacts={sorted(self.artifacts)})"
        )
