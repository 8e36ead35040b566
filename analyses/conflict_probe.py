"""Study: when the context contradicts what the model holds in its weights, which wins, and
does fine-tuning (GD) on the facts change that? (Chan et al. 2024, part (b).)

Facts are (subject, answer, counterfact) triples rendered with a template, e.g. "cow is animal".
For each fact a conflict prompt shows k demonstrations that contradict the weights: the
fact's own subject with its counterfact ("cow is fruit") and k-1 other facts with their
counterfacts, then asks the subject ("cow is"). Prediction = argmax over every answer word.

- `fact_accuracy`: zero-shot prompt ("cow is") answered with the true answer (the weights know it);
- `context_wins` / `weights_win` / `other`: the conflict prompt answered with the counterfact /
  the true answer / something else (the three sum to 1);
- `attn_update_norm` (per layer): |h_conflict - h_ZSL| of the attention output at the read position;
- `attn_update_cos` (per layer, after only): cosine between the attention update after and before fine-tuning.

Each is measured before and after GD fine-tuning on the true facts (`train_deltas` on one
"episode" whose demonstrations are all facts; the model itself is never changed).

Facts (`facts`):

- `"corpus"` (embedded models): the corpus's global "item is category" facts,
  with the categories mapped to other categories by a seeded derangement (so the contradicting
  context is consistent: every animal is a fruit). These are stated in every training document and
  never contradicted, so the weights win every conflict before any fine-tuning: a floor, on which
  fine-tuning cannot make the context win less often.
- `"mapping"` (embedded models): facts in the format the model reads in context, "item = label":
  each category gets one label word (a seeded draw), every item of it that label; counterfacts
  from a seeded derangement of those labels. The corpus maps categories to fresh labels in every
  document, so the weights do not hold these facts (zero-shot near chance) and the context can win;
  fine-tuning on them puts them in the weights. This is the condition with headroom, and the
  default.
- a CSV/JSONL file with columns `subject`, `answer` and optionally `counterfact` (default: a
  derangement of the answers), or (subject, answer, counterfact) triples, for any model.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Sequence

import pandas as pd
import plotly.express as px
import torch

from iclgd_lens import (
    Episode,
    Example,
    GDConfig,
    IclgdError,
    Recorder,
    Recording,
    StudyResult,
    Task,
    delta_hooks,
    encode_prompts,
    label_token_ids,
    metrics,
    stats,
    train_deltas,
    versions,
)
from iclgd_lens.study import as_bridge, checked_args, device_of, model_name

QUESTION = (
    "When demonstrations contradict facts held in the weights, how often does the context win, "
    "before and after fine-tuning on those facts?"
)
COLUMNS = ["metric", "stage", "layer", "query", "answer", "value"]
"""`query`: the fact's index; `answer`: its true answer word. Facts that share an answer share its
counterfact (one derangement of the answers) and are one unit of the intervals (`summary`)."""
RANGES = {
    "fact_accuracy": (0.0, 1.0),
    "context_wins": (0.0, 1.0),
    "weights_win": (0.0, 1.0),
    "other": (0.0, 1.0),
    "attn_update_norm": (0.0, math.inf),
    "attn_update_cos": (-1.0, 1.0),
}
"""The range of each metric of this study (outcome rates, a norm, a cosine): the intervals of
`summary` are clipped to it."""
Fact = tuple[str, str, str]  # (subject, answer, counterfact)


# ---- facts ----------------------------------------------------------------------------------
def _derangement(values: list[str], rng: random.Random) -> dict[str, str]:
    """A map of each distinct value to another one (no value maps to itself)."""
    distinct = list(dict.fromkeys(values))
    if len(distinct) < 2:
        raise IclgdError("the facts need at least two different answers to contradict one with another")
    shuffled = distinct[:]
    while any(a == b for a, b in zip(distinct, shuffled)):
        rng.shuffle(shuffled)
    return dict(zip(distinct, shuffled))


def corpus_facts(seed: int = 0) -> list[Fact]:
    """The embedded models' global facts "item is category", each with a counterfact category
    from one seeded derangement of the categories."""
    from iclgd_lens import World

    world = World()
    swap = _derangement(list(world.categories), random.Random(seed))
    return [
        (item, category, swap[category]) for category, items in world.categories.items() for item in items
    ]


def mapping_facts(seed: int = 0) -> list[Fact]:
    """The embedded world's items as mapping-format facts "item = label": one seeded label word per
    category (6 of the 16), counterfacts from one seeded derangement of those six labels."""
    from iclgd_lens import World

    world = World()
    rng = random.Random(f"mapping-{seed}")
    labels = dict(zip(world.categories, rng.sample(list(world.label_words), len(world.categories))))
    swap = _derangement(list(labels.values()), rng)
    return [
        (item, labels[category], swap[labels[category]])
        for category, items in world.categories.items()
        for item in items
    ]


FACT_SETS = {"corpus": (corpus_facts, "{text} is"), "mapping": (mapping_facts, "{text} =")}
"""Built-in fact sets of the embedded models: name -> (facts of a seed, template in the corpus's
own format)."""


def read_facts(path: str | Path, seed: int = 0) -> list[Fact]:
    """Facts from a .csv or .jsonl file with columns subject, answer[, counterfact]."""
    path = Path(path)
    if not path.is_file():
        raise IclgdError(f"facts file not found: {path}")
    try:
        frame = pd.read_json(path, lines=True) if path.suffix in (".jsonl", ".json") else pd.read_csv(path)
    except ValueError as err:
        raise IclgdError(f"cannot read facts file {path}: {str(err).splitlines()[0]}") from None
    missing = {"subject", "answer"} - set(frame.columns)
    if missing:
        raise IclgdError(
            f"facts file {path} lacks column(s) {', '.join(sorted(missing))}; "
            "it needs subject, answer[, counterfact]"
        )
    frame = frame.astype({"subject": str, "answer": str})
    if "counterfact" not in frame:
        swap = _derangement(frame["answer"].tolist(), random.Random(seed))
        frame["counterfact"] = frame["answer"].map(swap)
    frame["counterfact"] = frame["counterfact"].astype(str)
    if (frame["counterfact"] == frame["answer"]).any():
        raise IclgdError(
            f"facts file {path}: a counterfact equals its answer "
            f"(row {int((frame.counterfact == frame.answer).idxmax())})"
        )
    return list(frame[["subject", "answer", "counterfact"]].itertuples(index=False, name=None))


# ---- prompts --------------------------------------------------------------------------------
def conflict_episodes(facts: list[Fact], words: tuple[str, ...], k: int, seed: int) -> list[Episode]:
    """One episode per fact: k contradicting demonstrations (the fact's own counterfact at a
    random place among k-1 other facts' counterfacts) and the fact's subject as the query."""
    rng = random.Random(seed)
    index = {w: i for i, w in enumerate(words)}
    episodes = []
    for i, (subject, answer, counterfact) in enumerate(facts):
        others = [j for j in range(len(facts)) if j != i]
        chosen = [
            Example(facts[j][0], index[facts[j][2]]) for j in rng.sample(others, min(k - 1, len(others)))
        ]
        chosen.insert(rng.randrange(len(chosen) + 1), Example(subject, index[counterfact]))
        episodes.append(Episode(tuple(chosen), (Example(subject, index[answer]),), words))
    return episodes


def _record(
    recorder: Recorder, task: Task, episodes: list[Episode], with_demos: bool, condition: str, deltas=None
) -> Recording:
    """Attention output and read logits, one row per episode (its one query)."""
    model = recorder.model
    enc = encode_prompts(
        model.tokenizer,
        task,
        [e.demos if with_demos else () for e in episodes],
        [e.queries[0] for e in episodes],
        [e.label_words for e in episodes],
        max_length=getattr(model.cfg, "n_ctx", None),
    ).to(device_of(model))
    hooks = delta_hooks(deltas, torch.zeros(len(episodes), dtype=torch.long)) if deltas is not None else []
    return recorder.run(enc, condition, interventions=hooks)


# ---- the study ------------------------------------------------------------------------------
@checked_args
def run(
    model="tiny-llama-icl",
    facts: str | Path | Sequence[Fact] | None = None,
    *,
    template: str | None = None,
    separator: str = "\n",
    k: int = 4,
    ft_params: str = "all",
    ft_optimizer: str = "adam",
    ft_lr: float = 1e-3,
    ft_epochs: int = 10,
    ft_batch_size: int = 4,
    seed: int = 0,
    progress: bool = True,
) -> StudyResult:
    """Context-vs-weights conflict rates and attention updates, before and after GD on the facts.

    `facts`: None or "mapping" (the embedded world's items as "item = label" facts: the condition
    with headroom), "corpus" (the embedded corpus's "item is category" facts: the floor),
    a CSV/JSONL path, or (subject, answer, counterfact) triples. `template`: default "{text} =" for
    "mapping", else "{text} is". `ft_*` set the fine-tuning on the true facts (label-token loss).
    """
    started = time.time()
    bridge = as_bridge(model)
    facts = "mapping" if facts is None else facts
    if isinstance(facts, str) and facts in FACT_SETS:
        make, default_template = FACT_SETS[facts]
        fact_list = make(seed)
    elif isinstance(facts, (str, Path)):
        fact_list, default_template = read_facts(facts, seed), "{text} is"
    else:
        fact_list, default_template = [tuple(map(str, f)) for f in facts], "{text} is"
    template = default_template if template is None else template
    if len(fact_list) < 2 or k < 1:
        raise IclgdError(
            f"the conflict probe needs at least 2 facts and k >= 1, got {len(fact_list)} facts and k={k}"
        )
    if "{text}" not in template:
        raise IclgdError(f"template must contain {{text}}, got {template!r}")
    words = tuple(dict.fromkeys([f[1] for f in fact_list] + [f[2] for f in fact_list]))
    label_ids = label_token_ids(bridge.tokenizer, words)
    index = {w: i for i, w in enumerate(words)}
    task = Task("facts", template, words, separator=separator)
    episodes = conflict_episodes(fact_list, words, k, seed)
    truth = torch.tensor([index[f[1]] for f in fact_list])
    counter = torch.tensor([index[f[2]] for f in fact_list])
    answers = [f[1] for f in fact_list]

    ft_config = GDConfig(
        params=ft_params,
        optimizer=ft_optimizer,
        lr=ft_lr,
        epochs=ft_epochs,
        batch_size=ft_batch_size,
        loss_on="label_tokens",
    )
    training = [Episode(tuple(Example(f[0], index[f[1]]) for f in fact_list), (), words)]
    deltas = train_deltas(bridge, bridge.tokenizer, task, training, ft_config, progress=progress)

    recorder = Recorder(bridge, ["attn_out"])
    frames, updates = [], {}
    for stage, stage_deltas in (("before", None), ("after", deltas)):
        zsl = _record(recorder, task, episodes, False, "zsl", stage_deltas)
        conflict = _record(recorder, task, episodes, True, "icl", stage_deltas)
        pred_zsl = zsl.logits[:, label_ids].argmax(-1).cpu()
        pred = conflict.logits[:, label_ids].argmax(-1).cpu()
        outcome = {
            "fact_accuracy": pred_zsl == truth,
            "context_wins": pred == counter,
            "weights_win": pred == truth,
            "other": (pred != counter) & (pred != truth),
        }
        frames += [_rows(name, stage, -1, v.float(), answers) for name, v in outcome.items()]
        updates[stage] = (conflict["attn_out"] - zsl["attn_out"]).float()  # [L, n_facts, d_model]
        norms = torch.linalg.vector_norm(updates[stage], dim=-1)  # [L, n_facts]
        frames += [
            _rows("attn_update_norm", stage, layer, norms[layer], answers) for layer in range(norms.shape[0])
        ]
    cos = metrics.cosine(updates["before"], updates["after"])  # [L, n_facts]
    frames += [_rows("attn_update_cos", "after", layer, cos[layer], answers) for layer in range(cos.shape[0])]
    table = pd.concat(frames, ignore_index=True)
    losses = deltas.losses.mean(-1)
    config = dict(
        model=model_name(bridge),
        facts=str(facts) if isinstance(facts, (str, Path)) else "given",
        n_facts=len(fact_list),
        template=template,
        k=k,
        fine_tuning=ft_config.__dict__,
        ft_loss_first=float(losses[0]),
        ft_loss_last=float(losses[-1]),
        seed=seed,
        versions=versions(),
        run_time_s=round(time.time() - started, 2),
    )
    return StudyResult("conflict-probe", QUESTION, table, figures(table), findings(table, config), config)


def _rows(metric: str, stage: str, layer: int, values: torch.Tensor, answers: list[str]) -> pd.DataFrame:
    v = values.detach().float().cpu().numpy().reshape(-1)
    return pd.DataFrame(
        {
            "metric": metric,
            "stage": stage,
            "layer": layer,
            "query": range(len(v)),
            "answer": answers,
            "value": v,
        }
    )[COLUMNS]


def _unit(table: pd.DataFrame) -> str:
    """The independent unit of a table: the answer group (a table saved before that column
    existed: the fact)."""
    return "answer" if "answer" in table.columns else "query"


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% t-interval per (metric, stage, layer), over the facts' answer groups.

    Facts that share an answer word also share its counterfact and contradict each other's
    demonstrations (the built-in sets: 6 answers of 6 facts each), so they are not independent:
    a t-interval over facts would count one answer's outcome several times and be too narrow.
    Each answer group's values are averaged first (`stats.episode_summary` with the answer as
    the unit; `n_answers` of them, `n` facts); with groups of equal size `mean` is the rate over
    facts. The "after" stage rests on one fine-tuning run shared by all facts: its interval
    speaks of the facts given that run, not of other fine-tuning runs. Intervals are clipped to
    the metric's range (`RANGES`).
    """
    out = stats.episode_summary(
        table, ["metric", "stage", "layer"], episode=_unit(table), sort=False, ranges=RANGES
    )
    return out.rename(columns={"n_episodes": "n_answers"})


def context_change(table: pd.DataFrame) -> stats.PairedTest:
    """How much more often the context wins after fine-tuning than before: the difference of
    the answer groups' `context_wins` rates, with its t-interval and sign-flip p-value over the
    groups (`stats.paired_test`, paired by answer). The findings call the change clear only
    where both the p-value (< 0.05) and the interval exclude none."""
    wins = table[(table.metric == "context_wins") & (table.layer == -1)]
    by_stage = {
        stage: stats.episode_means(group["value"].to_numpy(), group[_unit(table)].to_numpy())
        for stage, group in wins.groupby("stage")
    }
    return stats.paired_test(by_stage["after"], by_stage["before"])


def figures(table: pd.DataFrame) -> list:
    """Outcome rates before/after fine-tuning; attention update norm and direction per layer."""
    s = summary(table)
    rates = s[s.metric.isin(["fact_accuracy", "context_wins", "weights_win", "other"])]
    fig_rates = px.bar(
        rates,
        x="metric",
        y="mean",
        color="stage",
        barmode="group",
        range_y=[0, 1.05],
        labels={"mean": "rate", "metric": ""},
        title="Context vs weights: outcome rates before and after fine-tuning on the facts",
    )
    layers = s[s.metric.isin(["attn_update_norm", "attn_update_cos"])]
    fig_layers = px.line(
        layers,
        x="layer",
        y="mean",
        color="stage",
        facet_col="metric",
        markers=True,
        labels={"mean": "value"},
        title="Attention update of the conflict prompt (|h - h_ZSL|; cosine after vs before)",
    )
    fig_layers.update_yaxes(matches=None)
    return [fig_rates, fig_layers]


def findings(table: pd.DataFrame, config: dict) -> str:
    """Rates before -> after, and the layer whose attention update changed most, from the table."""
    s = summary(table).set_index(["metric", "stage", "layer"])["mean"]
    model_level = table[table.layer == -1].groupby(["metric", "stage"])["value"].mean()
    get = lambda m, st: float(model_level.get((m, st), float("nan")))  # rates over the facts
    lines = [
        f"Zero-shot fact accuracy {get('fact_accuracy', 'before'):.2f} -> "
        f"{get('fact_accuracy', 'after'):.2f} after fine-tuning "
        f"(loss {config['ft_loss_first']:.3f} -> {config['ft_loss_last']:.3f}).",
        f"With {config['k']} contradicting demonstrations the context wins "
        f"{get('context_wins', 'before'):.2f} -> {get('context_wins', 'after'):.2f}, "
        f"the weights win {get('weights_win', 'before'):.2f} -> {get('weights_win', 'after'):.2f} "
        f"(rates over {config['n_facts']} facts).",
    ]
    full = summary(table).set_index(["metric", "stage", "layer"])
    interval = lambda m, st: (
        f"[{full.loc[(m, st, -1), 'ci_low']:.2f}, {full.loc[(m, st, -1), 'ci_high']:.2f}]"
        if (m, st, -1) in full.index and not math.isnan(full.loc[(m, st, -1), "ci_low"])
        else ""
    )
    key = ("context_wins", "before", -1)
    n_answers = int(full.loc[key, "n_answers"]) if key in full.index else 0
    lines.append(
        f"95% t-intervals over the facts' {n_answers} answers (facts that share an answer share its "
        f"counterfact: one unit): context wins before {interval('context_wins', 'before')}, "
        f"after {interval('context_wins', 'after')}."
    )
    change = context_change(table)
    shown = (
        f"{change.diff_mean:+.2f} [{change.diff_ci_low:+.2f}, {change.diff_ci_high:+.2f}], "
        f"paired over {change.n_episodes} answers, sign-flip p = {change.p_value:.3g}"
    )
    if math.isnan(change.diff_ci_low):
        lines.append(
            f"Whether fine-tuning changed how often the context wins cannot be told from "
            f"{change.n_episodes} answer(s) ({change.diff_mean:+.2f})."
        )
    else:
        clear = change.p_value < 0.05 and (change.diff_ci_high < 0 or change.diff_ci_low > 0)
        verdict = (
            ("less often" if change.diff_mean < 0 else "more often")
            if clear
            else "neither clearly more nor less often (the test and the interval must both exclude no change)"
        )
        lines.append(f"Fine-tuning on the facts made the model follow the context {verdict}: {shown}.")
    if get("context_wins", "before") <= 0.05 and get("fact_accuracy", "before") >= 0.95:
        lines.append(
            "Before fine-tuning the weights already hold the facts and win (nearly) every conflict: "
            "a floor, on which fine-tuning cannot make the context win less often. "
            "Facts the weights do not hold give the effect room "
            '(facts="mapping" on the embedded models).'
        )
    if ("attn_update_cos", "after") in s.index.droplevel("layer"):
        cos = s.xs(("attn_update_cos", "after"), level=("metric", "stage"))
        norm_b = s.xs(("attn_update_norm", "before"), level=("metric", "stage"))
        norm_a = s.xs(("attn_update_norm", "after"), level=("metric", "stage"))
        worst = int(cos.idxmin())
        lines.append(
            f"The attention update changed direction most at layer {worst} "
            f"(cosine after vs before {cos.min():.3f}); "
            f"its norm there went {norm_b[worst]:.3f} -> {norm_a[worst]:.3f}."
        )
    return "\n".join(lines)
