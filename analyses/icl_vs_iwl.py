"""Study: in-context vs in-weight learning on synthetic data (Chan et al. 2022, 2024), part (a).

Trains the gated model f = a g + (1 - a) h of `iclgd_lens.worlds.chan` on fixed data sets of N
sequences for a sweep of N, and measures, per class-frequency group (high / low), the error of
f, of the in-weight predictor g alone, of the in-context predictor h alone, and the mean gate
a(x) (1 = all in-weight, 0 = all in-context), on three evaluations:

- `in_distribution`: fresh sequences from the training generator (clean labels);
- `shifted_labels`: every class takes the label of the next class in its frequency group and
  the context always holds the query's class: only reading the context gives the answer;
- `context_irrelevant`: original labels, the context never holds the query's class: only
  in-weight knowledge gives the answer.

No language model is involved. Part (b), a conflict probe on a loaded LLM, needs the GD engine
and is not part of this study (see docs/studies/icl-vs-iwl.md).
"""

from __future__ import annotations

import time
from typing import Sequence

import pandas as pd
import plotly.express as px
import torch

from iclgd_lens.worlds import chan
from iclgd_lens import IclgdError
from iclgd_lens import StudyResult

EVALUATIONS = ("in_distribution", "shifted_labels", "context_irrelevant")
QUESTION = (
    "As the training set grows, does the gated model answer from its weights or from the context, "
    "and does that differ between frequent and rare classes?"
)


def _as_sizes(n_train: int | str | Sequence[int]) -> list[int]:
    """Accept 256, "256,1024" or [256, 1024] (the CLI passes strings)."""
    if isinstance(n_train, str):
        try:
            n_train = [int(part) for part in n_train.replace(" ", "").split(",") if part]
        except ValueError:
            raise IclgdError(f"n_train must be integers separated by commas, got {n_train!r}") from None
    sizes = [int(n_train)] if isinstance(n_train, int) else [int(n) for n in n_train]
    if not sizes or min(sizes) < 1:
        raise IclgdError(f"n_train must be one or more sizes >= 1, got {n_train!r}")
    return sorted(set(sizes))


def run(
    *,
    n_train: int | str | Sequence[int] = (2**6, 2**8, 2**10, 2**12, 2**14),
    n_classes: int = 200,
    n_high: int = 20,
    p_high: float = 0.9,
    zipf_exponent: float | None = None,
    dim: int = 64,
    sigma: float = 0.2,
    context_len: int = 8,
    p_relevant: float = 0.9,
    n_relevant: int | None = None,
    label_noise: float = 0.0,
    gate_input: str = "query",
    steps: int = 500,
    batch_size: int = 128,
    learning_rate: float = 1e-2,
    weight_decay: float = 0.0,
    hidden: int = 128,
    n_eval: int = 400,
    seed: int = 0,
) -> StudyResult:
    """Sweep the training-set size N; return errors and gate values per frequency group.

    `n_eval` queries are drawn per group and evaluation. One seed is used for the class
    centres, the data, the initialisation and the minibatches; the global RNG is untouched.
    The defaults run in well under a minute on one CPU thread.
    """
    sizes = _as_sizes(n_train)
    if n_eval < 1:
        raise IclgdError(f"n_eval must be >= 1, got {n_eval}")
    setting = chan.ChanSetting(
        n_classes=n_classes, n_high=n_high, p_high=p_high, zipf_exponent=zipf_exponent, dim=dim, sigma=sigma,
        context_len=context_len, p_relevant=p_relevant, n_relevant=n_relevant, label_noise=label_noise,
    )
    world = chan.make_world(setting, seed=seed)
    started = time.perf_counter()
    rows = []
    for n in sizes:
        model = chan.train_gated_model(
            world, n, seed=seed, steps=steps, batch_size=batch_size, learning_rate=learning_rate,
            hidden=hidden, gate_input=gate_input, weight_decay=weight_decay,
        )
        for evaluation in EVALUATIONS:
            rows += [dict(n_train=n, seed=seed, **row) for row in chan.evaluate_by_group(model, world, evaluation, n_eval, seed=seed)]
    table = pd.DataFrame(rows, columns=["n_train", "seed", "evaluation", "group", "metric", "value"])
    config = dict(
        setting=setting.__dict__, n_train=sizes, gate_input=gate_input, steps=steps, batch_size=batch_size,
        learning_rate=learning_rate, weight_decay=weight_decay, hidden=hidden, n_eval=n_eval, seed=seed,
        chance=1.0 / n_classes, torch=torch.__version__, run_time_s=round(time.perf_counter() - started, 2),
    )
    return StudyResult(
        name="icl-vs-iwl", question=QUESTION, table=table, figures=_figures(table, n_classes),
        findings=_findings(table, n_classes), config=config,
    )


def _figures(table: pd.DataFrame, n_classes: int) -> list:
    """Error of f by N (one panel per evaluation), and the gate a(x) by N, per frequency group."""
    errors = table[table.metric == "error"]
    fig_error = px.line(
        errors, x="n_train", y="value", color="group", facet_col="evaluation", markers=True, log_x=True,
        labels={"n_train": "training sequences N", "value": "error of f", "group": "class frequency"},
        title="Error of the gated model by training-set size and class frequency",
        category_orders={"evaluation": list(EVALUATIONS)},
    )
    fig_error.add_hline(y=1 - 1 / n_classes, line_dash="dot", annotation_text="chance")
    gate = table[(table.metric == "gate") & (table.evaluation == "in_distribution")]
    fig_gate = px.line(
        gate, x="n_train", y="value", color="group", markers=True, log_x=True, range_y=[0, 1],
        labels={"n_train": "training sequences N", "value": "mean gate a(x)  (1 = in-weight g)", "group": "class frequency"},
        title="Gate a(x): weight on the in-weight predictor (in-distribution queries)",
    )
    return [fig_error, fig_gate]


def _value(table: pd.DataFrame, n: int, evaluation: str, group: str, metric: str) -> float:
    sel = table[(table.n_train == n) & (table.evaluation == evaluation) & (table.group == group) & (table.metric == metric)]
    return float(sel.value.mean())


def _findings(table: pd.DataFrame, n_classes: int) -> str:
    """Plain sentences computed from the table: gate and errors at the smallest and largest N."""
    small, large = int(table.n_train.min()), int(table.n_train.max())
    lines = []
    for group in ("high", "low"):
        a0, a1 = _value(table, small, "in_distribution", group, "gate"), _value(table, large, "in_distribution", group, "gate")
        direction = "towards the in-weight predictor g" if a1 > a0 else "towards the in-context predictor h"
        lines.append(f"{group}-frequency classes: mean gate a(x) {a0:.2f} at N={small} -> {a1:.2f} at N={large} ({direction}).")
    for evaluation, meaning in (
        ("in_distribution", "in distribution"),
        ("shifted_labels", "with shifted labels (only the context can answer)"),
        ("context_irrelevant", "with the query's class absent from the context (only the weights can answer)"),
    ):
        parts = [
            f"{group} {_value(table, small, evaluation, group, 'error'):.2f} -> {_value(table, large, evaluation, group, 'error'):.2f}"
            for group in ("high", "low")
        ]
        lines.append(f"Error {meaning}, N={small} -> N={large}: " + "; ".join(parts) + ".")
    h_shift = _value(table, large, "shifted_labels", "high", "error_in_context")
    lines.append(
        f"At N={large} the in-context predictor h alone errs {h_shift:.2f} on shifted high-frequency labels, "
        f"the gated model {_value(table, large, 'shifted_labels', 'high', 'error'):.2f} (chance error {1 - 1 / n_classes:.2f}): "
        "the gap is what the gate gives up by trusting the weights."
    )
    return "\n".join(lines)
