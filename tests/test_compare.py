"""compare(): the end-to-end comparison on a tiny random LLaMA."""

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import tiny_bridge, tiny_task, tiny_tokenizer

from iclgd_lens.engine.compare import compare
from iclgd_lens.engine.gd import GDConfig
from iclgd_lens.engine.record import Recorder
from iclgd_lens.errors import IclgdError

torch.set_num_threads(1)

SMALL = dict(k=3, n_episodes=2, n_queries=4, progress=False)


@pytest.fixture(scope="module")
def bridge():
    return tiny_bridge(tokenizer=tiny_tokenizer(), n_layers=2)


@pytest.fixture(scope="module")
def results(bridge):
    return compare(
        bridge,
        tiny_task(),
        gd=GDConfig.dai(lr=0.05),
        baselines=("random", "random_update", "icl_perm"),
        **SMALL,
    )


def test_table_has_the_literature_metrics(results):
    t = results.table
    expected = {
        "simaou",
        "simaou_norm",
        "simam_before",
        "simam_after",
        "simam_delta",
        "kendall_example",
        "kendall_token",
        "dw_cos",
        "dw_action_cos",
        "dual_form_cos",
        "accuracy",
        "rec2ftp",
        "token_overlap",
        "overlap_cosine",
        "kl",
        "js",
        "probe:resid_out",
    }
    assert expected <= set(t["metric"])
    assert {"icl~gd", "icl~random", "icl~random_update", "icl~icl_perm"} <= set(
        t.loc[t.metric == "simaou", "comparison"]
    )
    # one value per (layer, query) for layer-level SimAOU: 2 layers x 2 episodes x 4 queries
    layer_level = t[(t.metric == "simaou") & (t.comparison == "icl~gd") & (t["head"] == -1)]
    assert len(layer_level) == 2 * 2 * 4
    cos = t[t.metric.isin(["simaou", "simaou_norm", "dw_cos", "simam_delta"])]["value"].dropna()
    assert cos.between(-1 - 1e-5, 1 + 1e-5).all()
    assert results.config["k"] == 3 and results.config["gd"]["lr"] == 0.05


def test_icl_against_itself_under_another_order_is_the_ceiling(results):
    """ICL vs ICL (another demo order) must agree far better than ICL vs a random vector."""
    s = results.summary()
    get = lambda c: s[(s.metric == "simaou") & (s.comparison == c) & (s["head"] == -1)]["mean"].mean()
    assert get("icl~icl_perm") > get("icl~random") + 0.3


def test_model_unchanged_also_when_gd_diverges(bridge, monkeypatch):
    before = {k: v.clone() for k, v in bridge.state_dict().items()}
    compare(bridge, tiny_task(), gd=GDConfig.dai(lr=0.05), baselines=False, **SMALL)
    assert all(torch.equal(before[k], v) for k, v in bridge.state_dict().items())
    # fp32 RMSNorm saturates instead of overflowing, so make the second SGD step blow up
    import iclgd_lens.engine.gd.train as gd_train

    real_step = gd_train._sgd_step_
    calls = []

    def exploding_step(delta, grad, lr):
        real_step(delta, grad, lr)
        calls.append(1)
        if len(calls) > len(gd_train.projection_paths(GDConfig.dai(), 2)):  # from the second step on
            delta.mul_(float("inf"))

    monkeypatch.setattr(gd_train, "_sgd_step_", exploding_step)
    monkeypatch.setattr(
        gd_train, "LOW_RANK_LIMIT", 0
    )  # dense deltas from the start: _sgd_step_ is their SGD step
    with pytest.raises(IclgdError, match="lr=0.05"):
        compare(bridge, tiny_task(), gd=GDConfig.dai(lr=0.05), baselines=False, **SMALL)
    assert all(torch.equal(before[k], v) for k, v in bridge.state_dict().items())
    assert all(len(hp.fwd_hooks) == 0 for hp in bridge.hook_dict.values())


def test_prefix_sharing_and_chunking_change_no_number(bridge):
    kw = dict(gd=GDConfig.dai(lr=0.05), baselines=("random_update", "icl_perm"), artifacts=False, **SMALL)
    a = compare(bridge, tiny_task(), share_prefix=True, batch_size=64, **kw).table
    b = compare(bridge, tiny_task(), share_prefix=False, batch_size=3, **kw).table
    key = ["metric", "comparison", "layer", "head", "episode", "query"]
    merged = a.merge(b, on=key, suffixes=("_a", "_b"))
    assert len(merged) == len(a) == len(b)
    both_nan = merged.value_a.isna() & merged.value_b.isna()
    assert np.allclose(merged.value_a[~both_nan], merged.value_b[~both_nan], atol=1e-4)


def test_random_update_drawn_an_episode_at_a_time_changes_no_number(bridge, monkeypatch):
    """compare() draws the random update's dense deltas for as many episodes as fit in
    RANDOM_UPDATE_BYTES: one at a time (a budget of one byte) gives the same rows bitwise."""
    from iclgd_lens.engine import compare as comparison

    kw = dict(gd=GDConfig.dai(lr=0.05), baselines=("random_update",), artifacts=False, **SMALL)
    whole = compare(bridge, tiny_task(), **kw).table
    monkeypatch.setattr(comparison, "RANDOM_UPDATE_BYTES", 1)
    single = compare(bridge, tiny_task(), **kw).table
    rows = whole.comparison.str.contains("random_update")
    assert rows.any()
    pd.testing.assert_frame_equal(single.reset_index(drop=True), whole.reset_index(drop=True))


def test_zero_shots_make_icl_equal_zsl(bridge):
    with pytest.warns(UserWarning, match="k=0: with no demonstrations"):  # the cosines of zero updates
        r = compare(bridge, tiny_task(), k=0, n_episodes=1, n_queries=4, baselines=False, progress=False)
    acc = r.table[r.table.metric == "accuracy"].groupby("comparison")["value"].mean()
    assert acc["icl"] == acc["zsl"] == acc["gd"]
    kl = r.table[(r.table.metric == "kl") & (r.table.comparison == "icl~zsl")]["value"]
    assert (kl.abs() < 1e-6).all()


def test_untrained_baseline_is_recorded(bridge):
    r = compare(
        bridge, tiny_task(), gd=GDConfig.dai(lr=0.05), baselines=("untrained",), artifacts=False, **SMALL
    )
    assert "untrained:icl~gd" in set(r.table.comparison)


def test_artifacts_for_the_report(results):
    art = results.artifacts
    assert set(art["attention"]) == {"zsl", "icl", "gd"}
    layer0 = art["attention"]["icl"]["0"]
    assert len(layer0["pattern"][0]) == len(layer0["tokens"])
    assert len(art["dw"]["0"]["icl"]) == 2  # n_kv heads
    assert len(art["top_tokens"]) == 15


def test_simam_delta_keeps_gd_changes_of_any_size():
    """Small learning rates make GD's score changes tiny (~1e-6); they are real and must enter
    SimAM-delta unchanged (an earlier version snapped entries within 1e-5 of the ZSL map onto
    it). Synthetic maps in float64 against the published definition computed with numpy."""
    from iclgd_lens.engine.compare import episode_table
    from iclgd_lens.engine.record import Recording

    gen = torch.Generator().manual_seed(0)
    L, B, H, W, V = 3, 2, 2, 4, 12
    m_zsl = torch.randn(L, B, H, W, generator=gen, dtype=torch.float64)
    m_icl = m_zsl + torch.randn(L, B, H, W, generator=gen, dtype=torch.float64)
    d_gd = 1e-6 * torch.randn(L, B, H, W, generator=gen, dtype=torch.float64)  # a tiny but real GD update
    logits = torch.randn(B, V, generator=gen)
    rec = {
        name: Recording(name, {"scores": m}, logits)
        for name, m in (("zsl", m_zsl), ("icl", m_icl), ("gd", m_zsl + d_gd))
    }
    table = episode_table(rec, torch.tensor([0, 1]), [2, 3], episode=0, chosen=(), seed=0, rotary=False)
    got = (
        table[(table.metric == "simam_delta") & (table["head"] >= 0)]
        .sort_values(["layer", "query", "head"])["value"]
        .to_numpy()
    )
    a, b = (m_icl - m_zsl).numpy(), d_gd.numpy()
    expected = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))  # [L, B, H]
    np.testing.assert_allclose(got, expected.reshape(-1), atol=1e-6)
    assert np.abs(expected).max() > 0.1  # the check is not vacuous


def test_metrics_come_from_what_probes_declare(bridge):
    """compare=True: every returned vector becomes `probe:<key>`, whatever its key is called;
    compare=False: no metric; two probes returning one key: refused with one line."""
    from iclgd_lens.hooks import PROBES, probe

    def mlp(acts, ctx):
        return (
            {}
            if ctx.condition == "icl_prefix"
            else {"q_mlp": acts["hook_mlp_out"][ctx.batch_index, ctx.read_pos]}
        )

    try:
        probe("t_compared", points=["blocks.{layer}.hook_mlp_out"])(mlp)
        probe("t_silent", points=["blocks.{layer}.hook_mlp_out"], compare=False)(
            lambda acts, ctx: (
                {}
                if ctx.condition == "icl_prefix"
                else {"silent": acts["hook_mlp_out"][ctx.batch_index, ctx.read_pos]}
            )
        )
        kw = dict(gd=GDConfig.dai(lr=0.05), baselines=False, artifacts=False, **SMALL)
        with pytest.warns(
            UserWarning, match="'t_silent' is declared compare=False: compare.. runs it"
        ) as said:
            metrics = set(
                compare(bridge, tiny_task(), probes=["attn_out", "t_compared", "t_silent"], **kw).table.metric
            )
        assert "probe:q_mlp" in metrics and "probe:silent" not in metrics
        assert not [w for w in said if "t_compared" in str(w.message) or "attn_out" in str(w.message)]
        probe("t_clash", points=["blocks.{layer}.hook_mlp_out"])(
            lambda acts, ctx: (
                {}
                if ctx.condition == "icl_prefix"
                else {"attn_out": acts["hook_mlp_out"][ctx.batch_index, ctx.read_pos]}
            )
        )
        with pytest.raises(IclgdError, match="both return 'attn_out'") as info:
            compare(bridge, tiny_task(), probes=["attn_out", "t_clash"], **kw)
        assert "\n" not in str(info.value)
        # a whole-sequence vector: ICL's query pass and ZSL's prompt differ in length
        probe("t_sequence", points=["blocks.{layer}.hook_mlp_out"])(
            lambda acts, ctx: {} if ctx.condition == "icl_prefix" else {"seq": acts["hook_mlp_out"]}
        )
        with pytest.raises(IclgdError, match="'seq' has different shapes across conditions") as info:
            compare(bridge, tiny_task(), probes=["attn_out", "t_sequence"], **kw)
        assert "\n" not in str(info.value)
    finally:
        for name in ("t_compared", "t_silent", "t_clash", "t_sequence"):
            PROBES.pop(name, None)
    assert not any(hp.fwd_hooks for hp in bridge.hook_dict.values())


@pytest.mark.parametrize(
    "point, says",
    [
        ("blocks.{layer}.hook_mlp_outt", "closest points of layer 0: blocks.0.hook_mlp_out"),
        (
            "blocks.0.hook_mlp_out",
            "a point of one block would be copied into every layer's rows; name "
            "per-layer points (e.g. 'blocks.{layer}.hook_mlp_out')",
        ),
        ("hook_embed", "a point outside the blocks would be copied"),
    ],
)
def test_a_wrong_hook_point_is_answered_with_the_point_meant(bridge, point, says):
    from iclgd_lens.hooks import PROBES, probe

    try:
        probe("t_point", points=[point])(lambda acts, ctx: {})
        with pytest.raises(IclgdError) as info:
            Recorder(bridge, ["t_point"])
    finally:
        PROBES.pop("t_point", None)
    assert says in str(info.value) and "\n" not in str(info.value)


def test_the_untrained_baselines_gd_has_its_own_progress_bar(bridge, capsys):
    """With progress on, the comparison's GD bar and the untrained baseline's are told apart."""
    compare(
        bridge,
        tiny_task(),
        **{**SMALL, "progress": True},
        gd=GDConfig.dai(lr=0.05),
        baselines=("untrained",),
        artifacts=False,
    )
    err = capsys.readouterr().err
    assert "GD:" in err and "GD (untrained):" in err


def test_hooks_already_on_the_model_are_named_in_a_warning(bridge):
    """A hook left on the bridge (model.add_hook, or a Recorder.attach never removed) acts on every
    condition: compare() says so, naming the hook point; with none left it says nothing."""
    import warnings

    bridge.add_hook("blocks.1.hook_resid_pre", lambda x, hook: x)
    try:
        with pytest.warns(UserWarning, match=r"1 hook point\(s\) already have hooks attached.*blocks\.1"):
            compare(bridge, tiny_task(), k=1, n_episodes=1, n_queries=2, baselines=False, progress=False)
    finally:
        bridge.reset_hooks()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compare(bridge, tiny_task(), k=1, n_episodes=1, n_queries=2, baselines=False, progress=False)


def test_every_baseline_runs_in_bf16_with_the_rows_of_float32():
    """The GPU check's and a 7B user's setting, bf16 with every baseline and max_memory, gives the
    same rows as float32, every defined value finite, and the same undefined (NaN) entries but
    for a few Kendall taus (NaN where an input is constant: values that differ in float32 can tie
    once rounded to bf16); the headline SimAOU of ICL vs GD moves by little
    (benchmarks/dtype_figures.py measures how much on tiny-llama-icl)."""
    from tiny import tiny_hf_model

    from iclgd_lens import load_model

    hf = tiny_hf_model(n_layers=2)
    key = ["metric", "comparison", "layer", "head", "episode", "query"]
    tables = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model(hf_model=hf, tokenizer=tiny_tokenizer(), dtype=dtype)
        out = compare(
            model, tiny_task(), gd=GDConfig.dai(lr=0.05), max_memory=2**30, artifacts=False, **SMALL
        )
        tables[dtype] = out.table.set_index(key)["value"].sort_index()
    full, half = tables["float32"], tables["bfloat16"]
    assert full.index.equals(half.index)
    undefined_in_one = full.isna() != half.isna()
    assert undefined_in_one.mean() < 0.01
    assert set(full[undefined_in_one].index.get_level_values("metric")) <= {
        "kendall_token",
        "kendall_example",
        "kendall_token_per_head",
        "kendall_example_per_head",
    }
    assert np.isfinite(half.dropna()).all()
    simaou = (full - half).xs(("simaou", "icl~gd", -1), level=("metric", "comparison", "head"))
    assert simaou.abs().median() < 0.1


def test_simam_at_layer_0_is_1_under_a_sentencepiece_tokenizer():
    """At layer 0 the query's keys and the read position's query vector depend only on the tokens
    and their relative positions, so the read position's scores over the query's own tokens are
    the same with and without demonstrations: SimAM(ICL, ZSL) = 1 by construction. A LLaMA-1/2
    tokenizer splits the query differently after a newline ("w30") than alone ("▁w30"); compared
    slot by slot, those maps would give cosines far from 1."""
    import dataclasses

    from tiny import spm_like_tokenizer, tiny_hf_model

    from iclgd_lens import load_model

    tok = spm_like_tokenizer()
    model = load_model(hf_model=tiny_hf_model(n_layers=2, vocab_size=len(tok)), tokenizer=tok)
    task = dataclasses.replace(tiny_task(), separator="\n")
    out = compare(model, task, gd=GDConfig.dai(lr=0.05), baselines=False, artifacts=False, **SMALL)
    simam = out.table.query("metric == 'simam_before' and comparison == 'icl~zsl' and layer == 0")
    assert len(simam) and np.allclose(simam["value"], 1.0, atol=1e-5), simam["value"].describe()
