"""Study: in-context vs in-weight learning on synthetic data (Chan et al. 2022, 2024), part (a).

Trains the gated model f = a g + (1 - a) h of `iclgd_lens.worlds.chan` on fixed data sets of N
sequences for a sweep of N and several seeds, and measures the error of f, of the in-weight
predictor g alone, of the in-context predictor h alone, and the mean gate a (1 = all in-weight,
0 = all in-context) on the evaluation grid of the published code (chanb/simple_icl):

- `labels`: `original`, or `shifted` (every class takes the label of the next class of its
  frequency group: only reading the context can give the answer);
- `context`: `default` (the training p_relevant), `always` or `never` holding the query's class;
- `group`: queries from the `high`- or `low`-frequency classes, or `all` (the class distribution).

`preset` picks the protocol (`PRESETS`). `chan2024` follows the code that produced the published
figures (chanb/simple_icl): g, h and the gate trained together by the NLL of f on one fixed data
set, checkpoints every 500 steps, each run read at its checkpoint of lowest training loss, at
fewer optimiser steps (stated in the config and the findings). The variants change one thing each,
to answer another question: `staged` trains g and h first, freezes them and then trains the gate
(the main branch's templates), `query-gate` lets the gate see the query alone. Every other
keyword, when given, overrides the preset. docs/studies/icl-vs-iwl.md lists what still differs
from the published code. Intervals are 95% t-intervals over seeds (independent training runs,
each with its own class centres, data, initialisation and minibatches). Besides the table, the
config holds `trajectory` (per run and checkpoint: the training loss and, on fresh sequences, the
mean gate and error of f per query group) and `selected_steps` (the checkpoint each run is read at).

No language model is involved. Part (b), a conflict probe on a loaded LLM, is the study
`conflict-probe` (docs/studies/conflict-probe.md).
"""

from __future__ import annotations

import time
from typing import Sequence

import pandas as pd
import plotly.express as px
import torch

from iclgd_lens import IclgdError, StudyResult, stats
from iclgd_lens.study import checked_args, parse_numbers
from iclgd_lens.worlds import chan

QUESTION = (
    "As the training set grows, does the gated model answer from its weights or from the context, "
    "and does that differ between frequent and rare classes?"
)
PUBLISHED_STEPS = 50_000  # per stage, in the published code
KEYS = ["n_train", "labels", "context", "group", "metric"]
COLUMNS = ["n_train", "seed", "labels", "context", "group", "metric", "value"]
RANGE = (0.0, 1.0)
"""Every metric of this study (the error rates and the mean gate) lies in [0, 1]: the intervals of
`summary` are clipped to it."""

_CHAN2024 = dict(
    n_train=(2**6, 2**8, 2**10, 2**12, 2**14, 2**16),
    n_high=5,
    n_low=5,
    p_high=0.9,
    zipf_exponent=None,
    dim=64,
    sigma=0.2,
    context_len=1,
    p_relevant=0.9,
    n_relevant=None,
    label_noise=0.0,
    gate_input="sequence",
    training="joint",
    steps=10_000,
    batch_size=32,
    learning_rate=3e-4,
    weight_decay=0.0,
    hidden=(64, 64),
    checkpoint_every=500,
    select="min-train-loss",
    n_pretrain=2000,
    n_seeds=5,
    n_eval=1000,
)
PRESETS: dict[str, dict] = {
    # the code behind the published figures (chanb/simple_icl, branch iclr_2025:
    # cc_utils/templates/synthetic-alpha-*.json with mask_names [], so g, h and the gate learn
    # together by the NLL of f; experiments/evaluation-e2e.py; plot_utils/plot_*-alpha.ipynb, which
    # read each run at its checkpoint of lowest training loss), with 10,000 steps instead of 50,000,
    # N up to 2^16 instead of 2^20 and 2,000 training sequences instead of 10,000 for the loss that
    # picks the checkpoint (docs/studies/icl-vs-iwl.md)
    "chan2024": _CHAN2024,
    # the main branch's templates: g and h trained first (5,000 steps each by its own NLL), frozen,
    # then the gate (5,000 steps): what does the gate do when the predictors it chooses between are
    # already fit to the data it is trained on?
    "staged": {**_CHAN2024, "training": "staged", "steps": _CHAN2024["steps"] // 2},
    # can the gate tell from the query alone when to trust the context (the old default of this study)?
    "query-gate": {**_CHAN2024, "gate_input": "query"},
}


def _as_hidden(hidden: int | str | Sequence[int]) -> tuple[int, ...]:
    """Hidden widths in order: 64, "64,64" or [64, 64]."""
    parts = (
        hidden.replace(" ", "").split(",")
        if isinstance(hidden, str)
        else [hidden]
        if isinstance(hidden, int)
        else list(hidden)
    )
    try:
        widths = tuple(int(p) for p in parts if p != "")
    except (TypeError, ValueError):
        raise IclgdError(
            f"hidden takes layer widths separated by commas (e.g. 64,64), got {hidden!r}"
        ) from None
    if not widths or min(widths) < 1:
        raise IclgdError(f"hidden needs one or more widths >= 1, got {hidden!r}")
    return widths


def resolve(preset: str = "chan2024", **given) -> dict:
    """The preset's settings with every keyword that is not None put over them."""
    if preset not in PRESETS:
        raise IclgdError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    unknown = set(given) - set(PRESETS[preset])
    if unknown:
        raise IclgdError(
            f"unknown setting {sorted(unknown)[0]!r}; the settings are {', '.join(PRESETS[preset])}"
        )
    out = {**PRESETS[preset], **{k: v for k, v in given.items() if v is not None}}
    out["n_train"] = parse_numbers(out["n_train"], "n_train", minimum=1)
    out["hidden"] = _as_hidden(out["hidden"])
    for name in ("n_high", "n_low", "steps", "batch_size", "n_seeds", "n_eval", "n_pretrain"):
        if int(out[name]) < 1:
            raise IclgdError(f"{name} must be >= 1, got {out[name]}")
    return out


@checked_args
def run(
    *,
    preset: str = "chan2024",
    n_train: int | str | Sequence[int] | None = None,
    n_high: int | None = None,
    n_low: int | None = None,
    p_high: float | None = None,
    zipf_exponent: float | None = None,
    dim: int | None = None,
    sigma: float | None = None,
    context_len: int | None = None,
    p_relevant: float | None = None,
    n_relevant: int | None = None,
    label_noise: float | None = None,
    gate_input: str | None = None,
    training: str | None = None,
    steps: int | None = None,
    batch_size: int | None = None,
    learning_rate: float | None = None,
    weight_decay: float | None = None,
    hidden: int | str | Sequence[int] | None = None,
    checkpoint_every: int | None = None,
    select: str | None = None,
    n_pretrain: int | None = None,
    n_seeds: int | None = None,
    n_eval: int | None = None,
    seed: int = 0,
) -> StudyResult:
    """Sweep the training-set size N over seeds `seed .. seed + n_seeds - 1`; return errors and
    gate values on the published evaluation grid.

    `preset` ("chan2024", "staged", "query-gate": `PRESETS`) sets every option; a keyword that
    is given overrides it. `steps` counts optimiser steps in all (joint) or per stage (staged:
    g and h, then the gate). `checkpoint_every`, `select` ("min-train-loss" or "final") and
    `n_pretrain` say which checkpoint each run is read at (`chan.train_gated_models`). `n_eval`
    sequences per evaluation cell. All models of a
    run are trained side by side (`chan.train_gated_models`), which is what makes 5 seeds x 6
    sizes fit in about a minute on one CPU thread.
    """
    cfg = resolve(
        preset,
        n_train=n_train,
        n_high=n_high,
        n_low=n_low,
        p_high=p_high,
        zipf_exponent=zipf_exponent,
        dim=dim,
        sigma=sigma,
        context_len=context_len,
        p_relevant=p_relevant,
        n_relevant=n_relevant,
        label_noise=label_noise,
        gate_input=gate_input,
        training=training,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        hidden=hidden,
        checkpoint_every=checkpoint_every,
        select=select,
        n_pretrain=n_pretrain,
        n_seeds=n_seeds,
        n_eval=n_eval,
    )
    setting = chan.ChanSetting(
        n_classes=int(cfg["n_high"]) + int(cfg["n_low"]),
        n_high=int(cfg["n_high"]),
        p_high=float(cfg["p_high"]),
        zipf_exponent=None if cfg["zipf_exponent"] is None else float(cfg["zipf_exponent"]),
        dim=int(cfg["dim"]),
        sigma=float(cfg["sigma"]),
        context_len=int(cfg["context_len"]),
        p_relevant=float(cfg["p_relevant"]),
        n_relevant=None if cfg["n_relevant"] is None else int(cfg["n_relevant"]),
        label_noise=float(cfg["label_noise"]),
    )
    seeds = list(range(int(seed), int(seed) + int(cfg["n_seeds"])))
    worlds = {s: chan.make_world(setting, seed=s) for s in seeds}
    started = time.perf_counter()
    runs = [(s, n) for s in seeds for n in cfg["n_train"]]
    models = chan.train_gated_models(
        [worlds[s] for s, _ in runs],
        [n for _, n in runs],
        [s for s, _ in runs],
        steps=int(cfg["steps"]),
        batch_size=int(cfg["batch_size"]),
        learning_rate=float(cfg["learning_rate"]),
        hidden=cfg["hidden"],
        gate_input=cfg["gate_input"],
        training=cfg["training"],
        weight_decay=float(cfg["weight_decay"]),
        checkpoint_every=int(cfg["checkpoint_every"]),
        select=str(cfg["select"]),
        n_pretrain=int(cfg["n_pretrain"]),
    )
    rows = []
    for (s, n), model in zip(runs, models):
        rows += [
            dict(n_train=n, seed=s, **row)
            for row in chan.evaluate_grid(model, worlds[s], int(cfg["n_eval"]), seed=s)
        ]
    table = pd.DataFrame(rows, columns=COLUMNS)
    config = dict(
        preset=preset,
        **{k: v for k, v in cfg.items() if k not in ("n_train", "hidden")},
        n_train=cfg["n_train"],
        hidden=list(cfg["hidden"]),
        seeds=seeds,
        setting=setting.__dict__,
        published_steps=PUBLISHED_STEPS,
        selected_steps=[dict(n_train=n, seed=s, step=m.selected_step) for (s, n), m in zip(runs, models)],
        trajectory=[dict(n_train=n, seed=s, **r) for (s, n), m in zip(runs, models) for r in m.trajectory],
        chance_error=1 - 1 / setting.n_classes,
        torch=torch.__version__,
        run_time_s=round(time.perf_counter() - started, 2),
    )
    return StudyResult(
        name="icl-vs-iwl",
        question=QUESTION,
        table=table,
        figures=figures(table, config),
        findings=findings(table, config),
        config=config,
    )


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t-interval over seeds per (n_train, labels, context, group, metric).

    Each seed is an independent training run (own centres, data, initialisation, batches), so
    one value per seed and a plain t-interval over them (`stats.t_interval`), clipped to
    `RANGE`; the `n_eval` sequences behind each value only make that value precise.
    """
    out = [
        (*key, *stats.t_interval(g["value"].to_numpy(), bounds=RANGE))
        for key, g in table.groupby(KEYS, sort=True)
    ]
    return pd.DataFrame(out, columns=[*KEYS, "mean", "ci_low", "ci_high", "n_seeds"])


def figures(table: pd.DataFrame, config: dict) -> list:
    """Gate by N per query group (in distribution); error of f by N over the evaluation grid."""
    s = summary(table)
    s = s.assign(err_plus=s.ci_high - s["mean"], err_minus=s["mean"] - s.ci_low)
    gate = s[(s.metric == "gate") & (s.labels == "original") & (s.context == "default")]
    fig_gate = px.line(
        gate,
        x="n_train",
        y="mean",
        color="group",
        error_y="err_plus",
        error_y_minus="err_minus",
        markers=True,
        log_x=True,
        range_y=[0, 1.02],
        labels={
            "n_train": "training sequences N",
            "mean": "mean gate a  (1 = in-weight g, 0 = in-context h)",
            "group": "queries",
        },
        title=(
            f"Gate by training-set size and class frequency ({config['preset']}, "
            f"{len(config['seeds'])} seeds, 95% intervals)"
        ),
    )
    errors = s[s.metric == "error"]
    fig_error = px.line(
        errors,
        x="n_train",
        y="mean",
        color="group",
        facet_row="labels",
        facet_col="context",
        error_y="err_plus",
        error_y_minus="err_minus",
        markers=True,
        log_x=True,
        range_y=[0, 1.02],
        labels={"n_train": "training sequences N", "mean": "error of f", "group": "queries"},
        category_orders={"labels": list(chan.LABELINGS), "context": list(chan.CONTEXTS)},
        title="Error of the gated model over the evaluation grid (labels x context relevance)",
    )
    fig_error.add_hline(y=config["chance_error"], line_dash="dot", annotation_text="chance")
    traj = trajectory(config)
    curves = traj.groupby(["n_train", "step"], as_index=False)[["gate_high", "gate_low"]].mean()
    curves = curves.melt(["n_train", "step"], var_name="group", value_name="gate")
    curves["group"] = curves["group"].str.removeprefix("gate_")
    fig_steps = px.line(
        curves,
        x="step",
        y="gate",
        color="group",
        facet_col="n_train",
        facet_col_wrap=3,
        range_y=[0, 1.02],
        labels={"step": "optimiser step", "gate": "mean gate a on fresh queries", "group": "queries"},
        title=(
            f"Gate over training, per N (checkpoints every {config['checkpoint_every']} steps, "
            "mean over seeds)"
        ),
    )
    return [fig_gate, fig_error, fig_steps]


def trajectory(config: dict) -> pd.DataFrame:
    """The checkpoints of a run's config: one row per (n_train, seed, step) with the training
    loss and, on fresh sequences, the mean gate and error of f per query group."""
    return pd.DataFrame(config["trajectory"])


def _cell(s: pd.DataFrame, n: int, labels: str, context: str, group: str, metric: str) -> pd.Series:
    return s.loc[(n, labels, context, group, metric)]


def _ci(row: pd.Series) -> str:
    if row.isna()[["ci_low", "ci_high"]].any():
        return f"{row['mean']:.2f}"
    return f"{row['mean']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"


def crossing(s: pd.DataFrame, group: str, threshold: float = 0.5) -> int | None:
    """The smallest N from which on the mean in-distribution gate of `group` stays above `threshold`."""
    gate = s.xs(("original", "default", group, "gate"), level=("labels", "context", "group", "metric"))[
        "mean"
    ].sort_index()
    above = gate > threshold
    for n in gate.index:
        if above.loc[n:].all():
            return int(n)
    return None


def findings(table: pd.DataFrame, config: dict) -> str:
    """Plain sentences from the table: gates and errors at the smallest and largest N, with
    intervals over seeds."""
    s = summary(table).set_index(KEYS)
    small, large = int(table.n_train.min()), int(table.n_train.max())
    seeds = config["seeds"]
    steps_note = (
        f"{config['steps']} optimiser steps{' per stage' if config['training'] == 'staged' else ''} "
        f"(the published code: {config['published_steps']})"
    )
    lines = [
        f"Preset {config['preset']}: {config['training']} training, gate on the {config['gate_input']}, "
        f"{config['n_high']} + {config['n_low']} classes, L = {config['context_len']}, {steps_note}; "
        f"{len(seeds)} seeds ({seeds[0]}..{seeds[-1]}), means with 95% t-intervals over seeds."
    ]
    gate = lambda n, g: _ci(_cell(s, n, "original", "default", g, "gate"))
    lines.append(
        f"Mean gate a in distribution (0 = in-context h, 1 = in-weight g), N={small} -> N={large}: "
        f"high {gate(small, 'high')} -> {gate(large, 'high')}; "
        f"low {gate(small, 'low')} -> {gate(large, 'low')}."
    )
    for group in ("high", "low"):
        n_cross = crossing(s, group)
        lines.append(
            f"{group}-frequency queries: the gate stays above 0.5 from N={n_cross} on."
            if n_cross is not None
            else f"{group}-frequency queries: the gate does not stay above 0.5 up to N={large}."
        )
    for n in (small, large):
        parts = []
        for group in ("high", "low"):
            f, g, h = (
                _cell(s, n, "original", "default", group, m)
                for m in ("error", "error_in_weight", "error_in_context")
            )
            parts.append(f"{group}: f {_ci(f)}, g {_ci(g)}, h {_ci(h)}")
        lines.append(f"Error in distribution at N={n}: " + "; ".join(parts) + ".")
    for group in ("high", "low"):
        sh = lambda n, m: _ci(_cell(s, n, "shifted", "always", group, m))
        nv = lambda n: _ci(_cell(s, n, "original", "never", group, "error"))
        lines.append(
            f"{group}-frequency, shifted labels with the query's class in the context (only h can answer): "
            f"error of f {sh(small, 'error')} -> {sh(large, 'error')} "
            f"(h alone {sh(large, 'error_in_context')} at N={large}); "
            f"original labels, class never in the context (only g can answer): {nv(small)} -> {nv(large)}."
        )
    for group in ("high", "low"):  # does the gate pick the better predictor on fresh queries?
        gaps = {
            n: _cell(s, n, "original", "default", group, "error")["mean"]
            - min(
                _cell(s, n, "original", "default", group, m)["mean"]
                for m in ("error_in_weight", "error_in_context")
            )
            for n in config["n_train"]
        }
        worst = max(gaps, key=gaps.get)
        lines.append(
            f"{group}-frequency queries: f errs at most {gaps[worst]:+.2f} "
            "against the better of g and h alone "
            f"(at N={worst}; > 0: the gate picks the worse predictor on fresh queries)."
        )
    traj = trajectory(config)
    early = traj[traj.n_train == small].groupby("step")[["gate_high", "gate_low"]].mean()
    low_step = int(early.mean(axis=1).idxmin())
    lo = early.loc[low_step]
    lines.append(
        f"Over training at N={small} (fresh queries, mean over seeds): gate high / low "
        f"{early.iloc[0].gate_high:.2f} / {early.iloc[0].gate_low:.2f} at step {int(early.index[0])}, "
        f"lowest {lo.gate_high:.2f} / {lo.gate_low:.2f} at step {low_step}, "
        f"{early.iloc[-1].gate_high:.2f} / {early.iloc[-1].gate_low:.2f} at step {int(early.index[-1])}."
    )
    chosen = pd.DataFrame(config["selected_steps"]).groupby("n_train")["step"]
    read_at = (
        "the checkpoint of lowest training loss" if config["select"] == "min-train-loss" else "the last step"
    )
    lines.append(
        f"Read at {read_at} (select={config['select']}): steps "
        + ", ".join(f"N={n}: {int(v.min())}-{int(v.max())}" for n, v in chosen)
        + "."
    )
    lines.append(f"Chance error {config['chance_error']:.2f}.")
    return "\n".join(lines)
