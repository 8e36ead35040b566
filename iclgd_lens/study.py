"""What a study (an analysis in `analyses/`) returns, and how the CLI finds studies.

A study is a plain function `run(...) -> StudyResult`. It states its question, keeps its
numbers in a tidy table, and its plots as plotly figures; the report renders both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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


def as_ints(values: int | str | Sequence[int], what: str) -> list[int]:
    """Accept 8, "1,2,4" or [1, 2, 4] (the CLI passes strings or JSON); sorted, unique."""
    if isinstance(values, str):
        try:
            values = [int(v) for v in values.replace(" ", "").split(",") if v]
        except ValueError:
            raise IclgdError(f"{what} must be integers separated by commas, got {values!r}") from None
    out = [int(values)] if isinstance(values, (int, np.integer)) else [int(v) for v in values]
    return sorted(set(out))


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
