"""The ICL-vs-GD studies (analyses/): properties that must hold, checked on the shipped
`tiny-llama-icl` (and `tiny-llama-iclobj`) wherever that stays fast, else on tiny random LLaMAs.

No test freezes a measured figure: each checks something that must be true whatever the
weights (full-batch GD is order-invariant, identical orders give the exact floor, the table's
accuracy is the model's) or a property the embedded model was built to have (ICL emerged:
few-shot beats zero-shot; the corpus facts are in its weights).
"""

import re

import numpy as np
import pytest
import torch
from tiny import tiny_bridge, tiny_tokenizer

from iclgd_lens.engine.gd import GDConfig
from iclgd_lens.errors import IclgdError
from iclgd_lens.study import StudyResult, parse_numbers
from iclgd_lens.tasks import Example, Task, label_token_ids

torch.set_num_threads(1)
GD = GDConfig.dai(lr=0.05)


def test_parse_numbers_reads_numbers_strings_and_cli_lists():
    assert parse_numbers(8, "ks") == [8]
    assert parse_numbers("4, 1,2,,4", "ks") == [1, 2, 4]
    assert parse_numbers(["1", "2,4", 2, 8.0], "--k", minimum=0) == [1, 2, 4, 8]  # repeated --k
    assert parse_numbers(np.array([3, 1]), "ks") == [1, 3]
    assert parse_numbers("1e-3,0.1", "lrs", kind=float) == [1e-3, 0.1]
    assert parse_numbers((0.1, 1), "lrs", kind=float) == [0.1, 1.0]
    assert all(type(v) is int for v in parse_numbers([2.0, "3"], "ks"))
    assert parse_numbers(0, "ks", minimum=0) == [0]
    bad = [
        ("1,x", {}, "whole numbers"),
        ("2.5", {}, "whole numbers"),
        ([2.5], {}, "whole numbers"),
        ([True], {}, "whole numbers"),
        ("nan", dict(kind=float), "numbers"),
        (None, {}, "numbers"),
        ("", {}, "at least one"),
        ((), {}, "at least one"),
        (" , ", {}, "at least one"),
        ("-1,2", dict(minimum=0), ">= 0"),
        ("0", dict(kind=float, minimum=0, strict_minimum=True), "> 0"),
    ]
    for values, options, fragment in bad:
        with pytest.raises(IclgdError, match=fragment) as err:
            parse_numbers(values, "my_what", **options)
        assert "my_what" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(TypeError):
        parse_numbers(1, "ks", kind=str)


@pytest.fixture(scope="module")
def icl_model():
    """The shipped model whose ICL emerged from next-token training (0-shot ~50%, 8-shot ~100%)."""
    from iclgd_lens.models import load_model

    return load_model("tiny-llama-icl", device="cpu")


@pytest.fixture(scope="module")
def mapping_task():
    from iclgd_lens.tasks.mapping import default_task

    return default_task(seed=0)


@pytest.fixture(scope="module")
def bridge():
    """A random tiny LLaMA, for the checks that need a model that has not memorised anything."""
    return tiny_bridge(tokenizer=tiny_tokenizer(), n_layers=2)


def _state(bridge):
    return {k: v.clone() for k, v in bridge.state_dict().items()}


def _unchanged(bridge, before):
    return all(torch.equal(before[k], v) for k, v in bridge.state_dict().items()) and all(
        len(hp.fwd_hooks) == 0 for hp in bridge.hook_dict.values()
    )


# ---- order sensitivity ------------------------------------------------------------------------
def test_full_batch_gd_is_order_invariant_and_icl_is_not(icl_model, mapping_task):
    from iclgd_lens.analyses.order_sensitivity import run

    before = _state(icl_model)
    r = run(
        icl_model,
        mapping_task,
        k=4,
        n_permutations=3,
        batch_sizes=(1,),
        n_episodes=1,
        n_queries=2,
        progress=False,
    )
    assert isinstance(r, StudyResult) and r.figures and r.findings
    assert (
        r.config["gd"]["lr"] == mapping_task.gd_lr
    )  # a preset by name takes the task's learning rate, as compare() does
    t = r.table
    assert set(t.method) == {"icl", "gd_b1", "gd_full"}
    sen = t[t.metric == "sen"]
    assert (sen[sen.method == "gd_full"].value.abs() < 1e-6).all()  # the same summed gradient in any order
    assert (sen[sen.method == "icl"].value > 1e-6).all()  # different prompts, different outputs
    assert (
        sen[sen.method == "gd_b1"].value > 1e-6
    ).all()  # SGD steps in another order end elsewhere (GD is no no-op)
    assert t[t.metric.str.contains("overlap")].value.between(0, 1).all()
    assert set(t[t.metric == "attn_sen"].layer) == set(range(icl_model.cfg.n_layers))
    assert _unchanged(icl_model, before)


@pytest.mark.parametrize("k,n", [(2, 2), (3, 6), (4, 10), (8, 10)])
def test_the_orders_of_a_study_are_all_different_and_none_repeats_the_prompt_order(k, n):
    """Independent shuffles repeat at small k (k = 2, 10 draws: 2 distinct orders, 3 of them the
    prompt order): a repeat inflates the ICL-vs-ICL ceiling and weights Sen. The study's orders
    are n different permutations, the first the prompt order; at k = 8 the seeds are those of
    independent draws (no skip was needed: the documented figures stand)."""
    import itertools

    from iclgd_lens.analyses.order_sensitivity import distinct_orders

    seeds, orders = distinct_orders(k, n, seed=0)
    assert orders[0] == list(range(k)) and seeds[0] is None and len(orders) == len(seeds) == n
    assert len({tuple(o) for o in orders}) == n
    assert all(tuple(o) in set(itertools.permutations(range(k))) for o in orders)
    if k == 8:
        assert seeds == [None, *range(1, n)]


def test_more_orders_than_k_factorial_are_refused(icl_model, mapping_task):
    from iclgd_lens.analyses.order_sensitivity import run

    with pytest.raises(
        IclgdError, match=r"k=3 demonstrations have only 6 orders, fewer than n_permutations=7"
    ):
        run(icl_model, mapping_task, k=3, n_permutations=7, n_episodes=1, n_queries=1, progress=False)


def test_identical_orders_give_the_exact_floor(icl_model):
    """With k copies of one demonstration every order is the same prompt and the same SGD run:
    ICL-vs-ICL agreement must then be perfect (Sen 0, overlap 1), so it is a valid floor."""
    from iclgd_lens.analyses.order_sensitivity import run

    same = Task(
        "same",
        "{text} =",
        ("alpha", "beta"),
        train=(Example("cow", 0),) * 3,
        test=(Example("dog", 0), Example("apple", 1)),
        separator="\n",
    )
    r = run(
        icl_model,
        same,
        k=3,
        n_permutations=3,
        batch_sizes=(1,),
        gd=GD,
        n_episodes=1,
        n_queries=2,
        progress=False,
    )
    t = r.table
    assert (t[t.metric == "sen"].value.abs() < 1e-6).all()
    assert (t[t.metric == "order_overlap"].value == 1.0).all()


def test_order_sensitivity_rejects_k_below_two(icl_model, mapping_task):
    from iclgd_lens.analyses.order_sensitivity import run

    with pytest.raises(IclgdError, match="k >= 2"):
        run(icl_model, mapping_task, k=1, progress=False)


# ---- k sweep ----------------------------------------------------------------------------------
def test_studies_record_the_queries_they_ran_not_only_those_asked(icl_model, mapping_task):
    """A task with fewer test examples than asked gives fewer queries per episode: the config
    says how many ran (n_queries) beside the request (n_queries_asked)."""
    from iclgd_lens.analyses.k_sweep import run

    asked = len(mapping_task.test) + 5
    with pytest.warns(UserWarning, match=r"gives (\d+) queries per episode") as caught:
        r = run(icl_model, mapping_task, ks=(1,), n_episodes=1, n_queries=asked, baselines=(), progress=False)
    ran = int(re.search(r"gives (\d+) queries", str(caught[0].message)).group(1))  # compare's own count
    assert r.config["n_queries"] == ran < asked
    assert r.config["n_queries_asked"] == asked


def test_k_sweep_icl_accuracy_is_the_models_and_beats_zero_shot(icl_model, mapping_task):
    from iclgd_lens.analyses.k_sweep import run

    task, ks, n_ep, n_q = mapping_task, (1, 4), 1, 4
    r = run(
        icl_model,
        task,
        ks=ks,
        gd_only_ks=(12,),
        n_episodes=n_ep,
        n_queries=n_q,
        baselines=("icl_perm",),
        progress=False,
    )
    t = r.table
    assert set(t.k) == {1, 4, 12}
    assert set(t[t.k == 12].comparison) == {"zsl", "gd"}  # GD-only k: no ICL prompt is built
    acc = t[t.metric == "accuracy"]
    assert acc.value.between(0, 1).all()
    # ICL accuracy recomputed here with plain forward passes, one prompt at a time
    tok = icl_model.tokenizer
    for k in ks:
        correct = []
        for episode in task.episodes(k, n_ep, n_q, 0):
            ids = label_token_ids(tok, episode.label_words)
            for q in episode.queries:
                enc = tok(task.icl_prompt(episode.demos, q, episode.label_words), return_tensors="pt")
                with torch.no_grad():
                    logits = icl_model(enc["input_ids"], attention_mask=enc["attention_mask"])[0, -1]
                correct.append(int(logits[ids].argmax()) == q.label)
        table_acc = acc[(acc.k == k) & (acc.comparison == "icl")].value.mean()
        assert table_acc == pytest.approx(np.mean(correct))
    # ICL emerged in this model: with 4 demonstrations it beats the zero-shot prompt
    at4 = acc[acc.k == 4].groupby("comparison").value.mean()
    assert at4["icl"] > at4["zsl"]


def test_gd_only_k_uses_the_tasks_learning_rate_like_compare(icl_model, mapping_task, monkeypatch):
    """A preset given by name trains GD at Task.gd_lr in the GD-only rows too (not the preset's 1e-3)."""
    from iclgd_lens.analyses import k_sweep

    seen = []
    real = k_sweep.train_deltas
    monkeypatch.setattr(k_sweep, "train_deltas", lambda *a, **kw: seen.append(a[4]) or real(*a, **kw))
    table = k_sweep.gd_only_table(icl_model, mapping_task, "dai", 12, 1, 2, 0)
    assert [c.lr for c in seen] == [mapping_task.gd_lr] and seen[0].params == "kv"
    assert set(table.comparison) == {"zsl", "gd"} and table.value.between(0, 1).all()


# ---- GD trajectories --------------------------------------------------------------------------
def test_gd_trajectories_grid_best_cell_and_divergence(icl_model, mapping_task):
    from iclgd_lens.analyses.gd_trajectories import best_cell, cell_summary, findings, run

    r = run(
        icl_model,
        mapping_task,
        lrs=(0.05, 1e38),
        params=("kv", "v_single"),
        epochs=(1, 2),
        k=2,
        n_episodes=1,
        n_queries=2,
        progress=False,
    )
    t = r.table
    assert len(t[["params", "lr", "epochs"]].drop_duplicates()) == 2 * 2 * 2
    # recorded, not raised (K/V at lr 1e38 overflows; W_V of one layer may not, as RMSNorm rescales it)
    assert set(t[t.metric == "diverged"].lr) == {1e38}
    assert len(t[(t.metric == "diverged") & (t.params == "kv")]) == 2
    s = cell_summary(t)
    sim = s[(s.metric == "simaou") & (s.comparison == "icl~gd")]
    best = best_cell(t, "simaou")
    assert best["value"] == pytest.approx(sim["mean"].max())
    assert not ((best["params"] == "kv") and (best["lr"] == 1e38))  # a diverged cell is never the best
    # more epochs of SGD move GD further: the two epochs' SimAOU are not the same number
    kv = sim[(sim.params == "kv") & (sim.lr == 0.05)].sort_values("epochs")["mean"].to_numpy()
    assert abs(kv[0] - kv[1]) > 1e-6
    assert "Best agreement" in r.findings

    by_accuracy = findings(t, "accuracy", best_cell(t, "accuracy"))  # GD's own accuracy, not an agreement
    assert "Best GD accuracy: " in by_accuracy and "icl~gd" not in by_accuracy


# ---- ICL objective vs emergent ----------------------------------------------------------------
@pytest.mark.filterwarnings(
    "ignore:Precision loss occurred:RuntimeWarning"
)  # Welch's test on identical samples
def test_iclobj_vs_emergent_same_model_twice_shows_no_difference(icl_model, mapping_task):
    from iclgd_lens.analyses.iclobj_vs_emergent import differences, run

    kw = dict(k=2, n_episodes=2, n_queries=2, baselines=("random_update", "icl_perm"), progress=False)
    same = run([icl_model, icl_model], mapping_task, **kw)
    d = differences(same.table, same.config["models"])
    assert len(d) and (d["diff"].abs() < 1e-9).all()
    assert "differs:" not in same.findings
    r = run(["tiny-llama-icl", "tiny-llama-iclobj"], mapping_task, **kw)
    assert set(r.table.model) == {"tiny-llama-icl", "tiny-llama-iclobj"}
    assert (differences(r.table, r.config["models"])["diff"].abs() > 1e-6).any()


# ---- conflict probe ---------------------------------------------------------------------------
def test_conflict_probe_on_the_embedded_model(icl_model):
    """The corpus's facts are in every training document, so the model holds them (zero-shot);
    every conflict prompt has exactly one outcome; the model is left unchanged."""
    from iclgd_lens.analyses.conflict_probe import corpus_facts, run

    before = _state(icl_model)
    facts = corpus_facts(seed=0)[::3]  # 12 of the 36 facts, two per category
    r = run(icl_model, facts, k=2, ft_epochs=1, progress=False)
    t = r.table
    rates = t[t.metric.isin(["context_wins", "weights_win", "other"])]
    assert rates.value.between(0, 1).all()
    assert np.allclose(rates.groupby(["stage", "query"]).value.sum(), 1.0)  # one outcome per prompt
    assert t[(t.metric == "fact_accuracy") & (t.stage == "before")].value.mean() >= 0.9
    assert set(t[t.metric == "attn_update_norm"].layer) == set(range(icl_model.cfg.n_layers))
    assert _unchanged(icl_model, before)
    # the weights win every conflict before fine-tuning: a floor, and the findings say so
    if t[(t.metric == "context_wins") & (t.stage == "before")].value.mean() <= 0.05:
        assert "floor" in r.findings


def test_study_summaries_clip_intervals_to_each_metrics_range():
    import pandas as pd
    from iclgd_lens.analyses import conflict_probe, icl_vs_iwl

    # two facts: a rate of 0 and 1, norms 0.1 and 9, cosines -1 and 1 (raw t-intervals reach +-6)
    facts = pd.DataFrame(
        {
            "metric": ["context_wins"] * 2 + ["attn_update_norm"] * 2 + ["attn_update_cos"] * 2,
            "stage": "after",
            "layer": [-1, -1, 0, 0, 0, 0],
            "query": [0, 1] * 3,
            "value": [0.0, 1.0, 0.1, 9.0, -1.0, 1.0],
        }
    )
    s = conflict_probe.summary(facts).set_index("metric")
    assert tuple(s.loc["context_wins", ["ci_low", "ci_high"]]) == (0.0, 1.0)
    assert s.loc["attn_update_norm", "ci_low"] == 0.0 and s.loc["attn_update_norm", "ci_high"] > 9
    assert tuple(s.loc["attn_update_cos", ["ci_low", "ci_high"]]) == (-1.0, 1.0)
    runs = pd.DataFrame(
        {
            "n_train": 10,
            "seed": [0, 1, 2],
            "labels": "original",
            "context": "default",
            "group": "rare",
            "metric": "error",
            "value": [0.0, 1.0, 1.0],
        }
    )
    row = icl_vs_iwl.summary(runs).iloc[0]
    assert (row["ci_low"], row["ci_high"], row["n_seeds"]) == (0.0, 1.0, 3)


def test_mapping_facts_are_consistent_per_category():
    from iclgd_lens.analyses.conflict_probe import mapping_facts

    from iclgd_lens.tasks.mapping import CATEGORIES, LABEL_WORDS

    facts = mapping_facts(seed=0)
    assert [f[0] for f in facts] == [item for items in CATEGORIES.values() for item in items]
    for items in CATEGORIES.values():  # one label and one counterfact per category
        rows = [f for f in facts if f[0] in items]
        assert len({f[1] for f in rows}) == 1 and len({f[2] for f in rows}) == 1
    answers, counterfacts = {f[1] for f in facts}, {f[2] for f in facts}
    assert len(answers) == len(CATEGORIES) and answers == counterfacts
    assert all(ans != cf and ans in LABEL_WORDS for _, ans, cf in facts)
    assert mapping_facts(seed=1) != facts


@pytest.mark.parametrize("name", ["tiny-llama-icl", "tiny-llama-iclobj"])
def test_conflict_probe_mapping_facts_give_the_context_room_to_lose(name):
    """Mapping-format facts ("item = label") are not in the weights (labels are redrawn in every
    training document), so a contradicting context wins before fine-tuning; fine-tuning on the
    facts puts them in the weights and the context wins far less often."""
    from iclgd_lens.analyses.conflict_probe import mapping_facts, run

    from iclgd_lens.models import load_model

    model = load_model(name, device="cpu")
    before = _state(model)
    facts = mapping_facts(seed=0)[::2]
    r = run(model, facts, k=4, template="{text} =", ft_epochs=40, progress=False)
    t = r.table
    rate = lambda metric, stage: t[(t.metric == metric) & (t.stage == stage)].value.mean()
    _check_intervals_over_answer_groups(r, facts)
    assert rate("fact_accuracy", "before") <= 0.5  # the weights do not hold these facts...
    assert rate("context_wins", "before") >= 0.5  # ...so the context wins
    assert rate("fact_accuracy", "after") >= 0.9  # fine-tuning memorises them
    # these 18 facts: 1.00 -> 0.44 (tiny-llama-icl), 0.67 -> 0.39 (tiny-llama-iclobj)
    assert rate("context_wins", "after") <= rate("context_wins", "before") - 0.2
    assert set(t[t.metric == "attn_update_cos"].layer) == set(range(model.cfg.n_layers))
    assert _unchanged(model, before)


def _check_intervals_over_answer_groups(result, facts) -> None:
    """The summary's intervals and the findings' paired change, recomputed with scipy over the
    facts' answer groups (facts that share an answer share its counterfact: one unit), the
    groups taken from the facts themselves, not from the table's column."""
    import itertools

    from iclgd_lens.analyses.conflict_probe import context_change, summary
    from scipy import stats as sps

    t = result.table
    answer_of = {i: f[1] for i, f in enumerate(facts)}
    groups = sorted(set(answer_of.values()))
    summed = summary(t).set_index(["metric", "stage", "layer"])

    def group_rates(stage):
        rows = t[(t.metric == "context_wins") & (t.stage == stage)]
        return np.array([rows[rows["query"].map(answer_of) == g].value.astype(float).mean() for g in groups])

    for stage in ("before", "after"):
        x = group_rates(stage)
        half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)) if x.std() > 0 else 0.0
        row = summed.loc[("context_wins", stage, -1)]
        assert row["n_answers"] == len(groups) and row["n"] == len(facts)
        assert row["mean"] == pytest.approx(x.mean(), abs=1e-12)
        assert row["ci_low"] == pytest.approx(max(x.mean() - half, 0.0), abs=1e-9)
        assert row["ci_high"] == pytest.approx(min(x.mean() + half, 1.0), abs=1e-9)
    d = group_rates("after") - group_rates("before")
    signs = np.array(list(itertools.product([1, -1], repeat=len(d))))
    p = np.mean(np.abs((signs * d).mean(1)) >= abs(d.mean()) - 1e-12)
    change = context_change(t)
    assert change.diff_mean == pytest.approx(d.mean(), abs=1e-12) and change.p_value == pytest.approx(p)
    assert f"paired over {len(groups)} answers" in result.findings


FACTS = [(f"w{i}", "ABCD"[i % 4], "ABCD"[(i + 1) % 4]) for i in range(8)]


def test_conflict_probe_fine_tuning_changes_outcomes(bridge):
    """On a random model (which holds no facts) fine-tuning with a large lr memorises the facts
    and changes the conflict outcomes; the embedded model already knows its facts."""
    from iclgd_lens.analyses.conflict_probe import run

    before = _state(bridge)
    r = run(bridge, FACTS, template="{text} :", k=3, ft_lr=1e-2, ft_epochs=40, progress=False)
    t = r.table
    acc = t[t.metric == "fact_accuracy"].groupby("stage").value.mean()
    assert acc["after"] == 1.0  # fine-tuning on the facts with a large lr memorises them
    outcome = lambda stage: t[(t.stage == stage) & (t.metric == "context_wins")].value.to_numpy()
    wins = lambda stage: t[(t.stage == stage) & (t.metric == "weights_win")].value.to_numpy()
    same_outcomes = np.array_equal(outcome("before"), outcome("after"))
    assert not (same_outcomes and np.array_equal(wins("before"), wins("after")))
    assert t[t.metric == "attn_update_cos"].value.between(-1 - 1e-5, 1 + 1e-5).all()
    assert _unchanged(bridge, before)


def test_conflict_probe_reads_facts_files(tmp_path):
    from iclgd_lens.analyses.conflict_probe import corpus_facts, read_facts

    path = tmp_path / "facts.csv"
    path.write_text("subject,answer\nw1,A\nw2,B\nw3,C\n")
    facts = read_facts(path)
    assert [f[:2] for f in facts] == [("w1", "A"), ("w2", "B"), ("w3", "C")]
    assert all(cf != ans for _, ans, cf in facts)
    bad = tmp_path / "bad.csv"
    bad.write_text("name,city\nx,y\n")
    with pytest.raises(IclgdError, match="subject"):
        read_facts(bad)
    assert all(true != false for _, true, false in corpus_facts(seed=3))
