"""The ICL-vs-GD studies (analyses/): properties that must hold on tiny random LLaMAs."""

import numpy as np
import pytest
import torch

from iclgd_lens.errors import IclgdError
from iclgd_lens.gd import GDConfig
from iclgd_lens.study import StudyResult
from iclgd_lens.tasks import Example, Task, label_token_ids
from tiny import tiny_bridge, tiny_task, tiny_tokenizer

torch.set_num_threads(1)
GD = GDConfig.dai(lr=0.05)


@pytest.fixture(scope="module")
def bridge():
    return tiny_bridge(tokenizer=tiny_tokenizer(), n_layers=2)


def _state(bridge):
    return {k: v.clone() for k, v in bridge.state_dict().items()}


def _unchanged(bridge, before):
    return all(torch.equal(before[k], v) for k, v in bridge.state_dict().items()) and all(
        len(hp.fwd_hooks) == 0 for hp in bridge.hook_dict.values()
    )


# ---- order sensitivity ------------------------------------------------------------------------
def test_full_batch_gd_is_order_invariant_and_icl_is_not(bridge):
    from iclgd_lens.analyses.order_sensitivity import run

    before = _state(bridge)
    r = run(bridge, tiny_task(), k=4, n_permutations=4, batch_sizes=(1, 2), gd=GD, n_episodes=2, n_queries=3, progress=False)
    assert isinstance(r, StudyResult) and r.figures and r.findings
    t = r.table
    assert set(t.method) == {"icl", "gd_b1", "gd_b2", "gd_full"}
    sen = t[t.metric == "sen"]
    assert (sen[sen.method == "gd_full"].value.abs() < 1e-6).all()  # the same summed gradient in any order
    assert (sen[sen.method == "icl"].value > 1e-6).all()  # different prompts, different outputs
    assert (sen[sen.method == "gd_b1"].value > 1e-6).all()  # SGD steps in another order end elsewhere
    assert t[t.metric.str.contains("overlap")].value.between(0, 1).all()
    assert set(t[t.metric == "attn_sen"].layer) == {0, 1}
    assert _unchanged(bridge, before)


def test_identical_orders_give_the_exact_floor(bridge):
    """With k copies of one demonstration every order is the same prompt and the same SGD run:
    ICL-vs-ICL agreement must then be perfect (Sen 0, overlap 1), so it is a valid floor."""
    from iclgd_lens.analyses.order_sensitivity import run

    same = Task("same", "{text} :", ("A", "B"), train=(Example("w1 w2", 0),) * 3, test=(Example("w5 w6", 1), Example("w7 w8", 0)), separator=" ")
    r = run(bridge, same, k=3, n_permutations=3, batch_sizes=(1,), gd=GD, n_episodes=1, n_queries=2, progress=False)
    t = r.table
    assert (t[t.metric == "sen"].value.abs() < 1e-6).all()
    assert (t[t.metric == "order_overlap"].value == 1.0).all()


def test_order_sensitivity_rejects_k_below_two(bridge):
    from iclgd_lens.analyses.order_sensitivity import run

    with pytest.raises(IclgdError, match="k >= 2"):
        run(bridge, tiny_task(), k=1, progress=False)


# ---- k sweep ----------------------------------------------------------------------------------
def test_k_sweep_has_every_k_and_its_icl_accuracy_is_the_models(bridge):
    from iclgd_lens.analyses.k_sweep import run

    task, ks, n_ep, n_q = tiny_task(), (1, 2, 4), 2, 4
    r = run(bridge, task, ks=ks, gd_only_ks=(12,), gd=GD, n_episodes=n_ep, n_queries=n_q, baselines=("icl_perm",), progress=False)
    t = r.table
    assert set(t.k) == {1, 2, 4, 12}
    assert set(t[t.k == 12].comparison) == {"zsl", "gd"}  # GD-only k: no ICL prompt is built
    acc = t[t.metric == "accuracy"]
    assert acc.value.between(0, 1).all()
    # ICL accuracy recomputed here with plain forward passes, one prompt at a time
    tok = bridge.tokenizer
    for k in ks:
        correct = []
        for episode in task.episodes(k, n_ep, n_q, 0):
            ids = label_token_ids(tok, episode.label_words)
            for q in episode.queries:
                enc = tok(task.icl_prompt(episode.demos, q, episode.label_words), return_tensors="pt")
                with torch.no_grad():
                    logits = bridge(enc["input_ids"], attention_mask=enc["attention_mask"])[0, -1]
                correct.append(int(logits[ids].argmax()) == q.label)
        table_acc = acc[(acc.k == k) & (acc.comparison == "icl")].value.mean()
        assert table_acc == pytest.approx(np.mean(correct))


# ---- GD trajectories --------------------------------------------------------------------------
def test_gd_trajectories_grid_best_cell_and_divergence(bridge):
    from iclgd_lens.analyses.gd_trajectories import best_cell, cell_summary, run

    r = run(bridge, tiny_task(), lrs=(0.05, 1e38), params=("kv", "v_single"), epochs=(1, 2), k=2, n_episodes=1, n_queries=3, progress=False)
    t = r.table
    assert len(t[["params", "lr", "epochs"]].drop_duplicates()) == 2 * 2 * 2
    assert set(t[t.metric == "diverged"].lr) == {1e38}  # recorded, not raised
    s = cell_summary(t)
    sim = s[(s.metric == "simaou") & (s.comparison == "icl~gd")]
    best = best_cell(t, "simaou")
    assert best["value"] == pytest.approx(sim["mean"].max()) and best["lr"] == 0.05
    # more epochs of SGD move GD further: the two epochs' SimAOU are not the same number
    kv = sim[(sim.params == "kv") & (sim.lr == 0.05)].sort_values("epochs")["mean"].to_numpy()
    assert abs(kv[0] - kv[1]) > 1e-6
    assert "Best agreement" in r.findings


# ---- ICL objective vs emergent ----------------------------------------------------------------
def test_iclobj_vs_emergent_same_model_twice_shows_no_difference(bridge):
    from iclgd_lens.analyses.iclobj_vs_emergent import differences, run

    other = tiny_bridge(tokenizer=tiny_tokenizer(), n_layers=2, seed=1)
    kw = dict(k=2, gd=GD, n_episodes=2, n_queries=4, baselines=("random_update", "icl_perm"), progress=False)
    same = run([bridge, bridge], tiny_task(), **kw)
    d = differences(same.table, same.config["models"])
    assert len(d) and (d["diff"].abs() < 1e-9).all()
    assert "differs:" not in same.findings
    r = run([bridge, other], tiny_task(), **kw)
    assert set(r.table.model) == set(r.config["models"]) and len(r.config["models"]) == 2
    assert (differences(r.table, r.config["models"])["diff"].abs() > 1e-6).any()


# ---- conflict probe ---------------------------------------------------------------------------
FACTS = [(f"w{i}", "ABCD"[i % 4], "ABCD"[(i + 1) % 4]) for i in range(8)]


def test_conflict_probe_rates_and_fine_tuning(bridge):
    from iclgd_lens.analyses.conflict_probe import run

    before = _state(bridge)
    r = run(bridge, FACTS, template="{text} :", k=3, ft_lr=1e-2, ft_epochs=40, progress=False)
    t = r.table
    rates = t[t.metric.isin(["context_wins", "weights_win", "other"])]
    assert rates.value.between(0, 1).all()
    assert np.allclose(rates.groupby(["stage", "query"]).value.sum(), 1.0)  # one outcome per prompt
    acc = t[t.metric == "fact_accuracy"].groupby("stage").value.mean()
    assert acc["after"] == 1.0  # fine-tuning on the facts with a large lr memorises them
    outcome = lambda stage: t[(t.stage == stage) & (t.metric == "context_wins")].value.to_numpy()
    wins = lambda stage: t[(t.stage == stage) & (t.metric == "weights_win")].value.to_numpy()
    assert not (np.array_equal(outcome("before"), outcome("after")) and np.array_equal(wins("before"), wins("after")))
    assert t[t.metric == "attn_update_cos"].value.between(-1 - 1e-5, 1 + 1e-5).all()
    assert _unchanged(bridge, before)


def test_conflict_probe_reads_facts_files(tmp_path, bridge):
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
