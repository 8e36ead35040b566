"""What a study returns (`StudyResult`) and the small helpers studies share.

A study is a plain function `run(...) -> StudyResult` in `analyses/` (registered in
iclgd_lens.plugins). It states its question, keeps its numbers in a tidy table, and its plots
as plotly figures; the report renders both. The helpers: `as_bridge` (a name or a loaded
model), `model_name`, `device_of`, `parse_numbers` (the one comma-list parser of CLI and
studies), `layer_mean` (episode-level means over layers), `check_study_args` / `checked_args`
(a study's int, float, bool and str parameters checked before any work, one line each).
"""

from __future__ import annotations

import inspect
import io
import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from iclgd_lens.engine import stats
from iclgd_lens.errors import IclgdError


@dataclass
class StudyResult:
    """The outcome of one study: a tidy table, figures, and a short text of what it shows."""

    name: str  # e.g. "order-sensitivity"
    question: str  # the question the study answers, one sentence
    table: pd.DataFrame  # tidy: one row per value
    figures: list[Any] = field(default_factory=list)  # plotly.graph_objects.Figure
    findings: str = ""  # what the numbers show, written from the table (never hard-coded)
    config: dict[str, Any] = field(default_factory=dict)  # settings, seed, versions

    def to_json_dict(self) -> dict[str, Any]:
        """Everything the study's page needs, as JSON types (the table keeps its dtypes)."""
        import plotly.io as pio

        return {
            "kind": "iclgd-lens study",
            "name": self.name,
            "question": self.question,
            "findings": self.findings,
            "config": json.loads(json.dumps(self.config, default=str)),
            "table": json.loads(self.table.to_json(orient="table", index=False)),
            "figures": [json.loads(pio.to_json(fig)) for fig in self.figures],
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write `directory/study.json` atomically (a temporary file renamed into place), so that
        `iclgd-lens render DIR` rebuilds the study's page without rerunning it. Returns the path."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / STUDY_JSON
        handle, tmp = tempfile.mkstemp(dir=folder, prefix=".study-", suffix=".json")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as f:
                json.dump(self.to_json_dict(), f)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StudyResult":
        """Read a StudyResult saved by `save` (the file or its folder); one-line error otherwise."""
        import plotly.io as pio

        path = Path(path)
        if path.is_dir():
            path = path / STUDY_JSON
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("kind") != "iclgd-lens study":
                raise ValueError("not a saved study")
            table = pd.read_json(io.StringIO(json.dumps(data["table"])), orient="table")
            figures = [pio.from_json(json.dumps(fig)) for fig in data["figures"]]
            return cls(data["name"], data["question"], table, figures, data["findings"], data["config"])
        except FileNotFoundError:
            raise IclgdError(f"no saved study at {path}") from None
        except (OSError, ValueError, KeyError, TypeError) as error:
            first = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise IclgdError(f"{path} is not a saved study ({first})") from None


STUDY_JSON = "study.json"
"""The file a saved study lives in (`StudyResult.save`), beside the report's results.json."""


# ---- small helpers the studies share ------------------------------------------------------
def as_bridge(model):
    """A model name (embedded, folder or hub id: `load_model`) or an already loaded bridge."""
    if isinstance(model, str):
        from iclgd_lens.models import load_model

        return load_model(model)
    if not (hasattr(model, "hooks") and hasattr(model, "cfg") and hasattr(model, "tokenizer")):
        raise IclgdError(f"model must be a model name or a TransformerBridge, got {type(model).__name__}")
    return model


def model_name(bridge) -> str:
    """A short label for a loaded bridge (its model_name, or the class name)."""
    return str(getattr(bridge.cfg, "model_name", None) or type(bridge).__name__)


def queries_that_ran(table) -> int:
    """How many queries a study's episodes asked, from its tidy table (its `query` column; -1 marks
    rows of no query): a task may hold fewer test examples than were asked for, and a study's
    config records what ran beside what was asked."""
    return int(table.loc[table["query"] >= 0, "query"].nunique())


def parse_numbers(
    values: int | float | str | Sequence[int | float | str],
    what: str,
    *,
    kind: type = int,
    minimum: int | float | None = None,
    strict_minimum: bool = False,
) -> list:
    """Numbers from what a caller or the CLI passes: 8, 1e-3, "1,2,4" (spaces allowed), or a
    sequence of numbers and strings, each string itself comma-separated (the CLI's repeated
    `--k 1 --k 2,4`). `kind` is int (whole numbers; 2.0 counts, 2.5 does not) or float.
    Returns the values sorted and distinct, at least one.

    Raises a one-line IclgdError naming `what` for something that is not a number, for no
    number at all, and for a value below `minimum` (at or below it if `strict_minimum`).
    """
    if kind not in (int, float):
        raise TypeError(f"kind must be int or float, got {kind!r}")
    noun, example = ("whole numbers", "8 or 1,2,4") if kind is int else ("numbers", "0.01 or 1e-3,1e-2")

    def bad(value) -> IclgdError:
        return IclgdError(f"{what} takes {noun} separated by commas (e.g. {example}), got {value!r}")

    def one(value) -> int | float:
        if isinstance(value, str):
            try:
                number = kind(value)
            except ValueError:
                raise bad(value) from None
        elif isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
            number = value
        else:
            raise bad(value)
        if not math.isfinite(number):
            raise bad(value)
        if kind is int:
            if number != int(number):
                raise bad(value)
            return int(number)
        return float(number)

    try:
        items = [values] if isinstance(values, (str, numbers.Real)) else list(values)
    except TypeError:
        raise bad(values) from None
    out = []
    for item in items:
        parts = [p.strip() for p in item.split(",")] if isinstance(item, str) else [item]
        out.extend(one(p) for p in parts if not (isinstance(p, str) and not p))
    if not out:
        raise IclgdError(f"{what} needs at least one number, got {values!r}")
    if minimum is not None:
        low = min(out)
        if low < minimum or (strict_minimum and low == minimum):
            raise IclgdError(f"{what} must be {'>' if strict_minimum else '>='} {minimum}, got {low!r}")
    return sorted(set(out))


_SIMPLE_TYPES = {"int": int, "float": float, "bool": bool, "str": str, "None": type(None)}


def _simple_types(annotation) -> set[str] | None:
    """The names of a parameter annotation made only of int, float, bool, str and None
    ("int", "float | None", or those types themselves); None for anything else (Task, GDConfig,
    Sequence[...], unannotated), which the study checks itself."""
    import typing

    if isinstance(annotation, str):
        text = annotation.strip()
        optional = text.startswith("Optional[") and text.endswith("]")
        parts = {p.strip() for p in (text[9:-1] if optional else text).split("|")} | (
            {"None"} if optional else set()
        )
    elif annotation is inspect.Parameter.empty:
        return None
    else:
        members = typing.get_args(annotation) if typing.get_origin(annotation) else (annotation,)
        parts = {getattr(m, "__name__", repr(m)) for m in members}
        parts = {"None" if p == "NoneType" else p for p in parts}
    if not parts <= set(_SIMPLE_TYPES) or parts <= {"None"}:
        return None
    return parts


def check_study_args(fn, kwargs: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    """Check the values given to a study's `run` (the CLI's --set, a sweep's [study] table, a
    Python call) against the parameters annotated int, float, bool or str (optionally `| None`),
    before any work: a whole number for int (2.0 counts, True and 1.5 do not), a finite number
    for float, true/false for bool, text for str. Returns the values with whole floats turned
    into ints where an int is asked for. One-line IclgdError naming the study (`name`, else the
    function's module) and the parameter; parameters the function does not take and other
    annotations are left to it."""
    if name is None:  # a built-in study is named after its module (order_sensitivity: order-sensitivity)
        name = str(getattr(fn, "__module__", None) or "study").rsplit(".", 1)[-1].replace("_", "-")
    where = f"study {name!r}: "
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return dict(kwargs)
    out = dict(kwargs)
    for key, value in kwargs.items():
        param = params.get(key)
        types = _simple_types(param.annotation) if param is not None else None
        if types is None:
            continue
        if value is None and "None" in types:
            continue
        is_bool = isinstance(value, (bool, np.bool_))
        if "bool" in types and is_bool:
            out[key] = bool(value)
            continue
        if "str" in types and isinstance(value, str):
            continue
        if not is_bool and isinstance(value, numbers.Real) and math.isfinite(value):
            if "int" in types and (isinstance(value, numbers.Integral) or float(value).is_integer()):
                out[key] = int(value)
                continue
            if "float" in types:
                out[key] = float(value) if not isinstance(value, numbers.Integral) else value
                continue
        wanted = {
            "int": "a whole number",
            "float": "a finite number",
            "bool": "true or false",
            "str": "text",
            "None": "null",
        }
        order = [t for t in ("int", "float", "bool", "str", "None") if t in types]
        if "int" in order and "float" in order:
            order.remove("int")
        raise IclgdError(f"{where}{key} must be {' or '.join(wanted[t] for t in order)}, got {value!r}")
    return out


def checked_args(fn):
    """Decorate a study's `run` so that `check_study_args` checks every call (Python, CLI, sweep)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        try:
            bound = inspect.signature(fn).bind_partial(*args, **kwargs)
        except TypeError:
            return fn(*args, **kwargs)  # Python's own error for a wrong call
        checked = check_study_args(fn, bound.arguments)
        bound.arguments.update(checked)
        return fn(*bound.args, **bound.kwargs)

    return run


def device_of(model) -> torch.device:
    return next(model.parameters()).device


def layer_mean(table: pd.DataFrame) -> pd.DataFrame:
    """Per-(model, task, k, metric, comparison) mean: layer-level metrics averaged over layers
    first (head -1 rows), model-level ones (layer -1) as they are; then per episode (its
    queries share the demonstrations), with a 95% t-interval over the episode means.

    Columns: keys + [mean, ci_low, ci_high, n_episodes, n] (`stats.episode_summary`; `n`
    counts the (episode, query) values).
    """
    keys = [c for c in ("model", "task", "k", "metric", "comparison") if c in table.columns]
    rows = table[table["head"] == -1]
    per_query = rows.groupby(keys + ["episode", "query"], as_index=False)["value"].mean()
    return stats.episode_summary(per_query, keys)
