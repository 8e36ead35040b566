"""What a study (an analysis in `analyses/`) returns, and how the CLI finds studies.

A study is a plain function `run(...) -> StudyResult`. It states its question, keeps its
numbers in a tidy table, and its plots as plotly figures; the report renders both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd


@dataclass
class StudyResult:
    """The outcome of one study: a tidy table, figures, and a short text of what it shows."""

    name: str  # e.g. "order-sensitivity"
    question: str  # the question the study answers, one sentence
    table: pd.DataFrame  # tidy: one row per value
    figures: list[Any] = field(default_factory=list)  # plotly.graph_objects.Figure
    findings: str = ""  # what the numbers show, written from the table (never hard-coded)
    config: dict[str, Any] = field(default_factory=dict)  # settings, seed, versions
