"""compare()'s table, number by number, against an independent oracle (tests/oracle_hf.py).

The oracle runs plain HF LlamaForCausalLM forward passes and torch.optim.SGD on a deep copy,
in float64 (a float64 copy of the shipped fp32 weights; HF keeps RMSNorm, the softmax and
RoPE's angles in float32 even there); compare() runs the TransformerLens bridge in float32.
Every row of a metric family is matched by (metric, comparison, layer, head, episode, query):
no row may be missing or extra, NaN must meet NaN, and values must agree within

    ATOL + FP32_REL * cond

`cond` is the row's float32 conditioning, computed by the oracle; 1 for numbers that are not
cosines (accuracy, Rec2FTP, Kendall, token overlap, overlap cosine):
- delta cosines (SimAOU, SimAOU_norm, dw_cos, dw_action_cos, dual form, probes):
  |ref| / |x - ref| of the updates involved (oracle_hf.update_cond). A float32 pass gets h_GD
  and h_ZSL right to ~1e-6 |h| each, so a GD update that is 0.4% of |h| (per-head z, layer 3,
  Dai's K/V GD at the task's lr) is known only to ~2.5e-4, and its cosine cannot honestly agree
  to 1e-5: measured, simaou per head is 1.3e-4 off at cond 230; dw_action_cos 4e-5, dw_cos 3e-5,
  simaou_norm 2e-5 off at cond 70-240.
- SimAM maps: S / |m| (before / after) and S / |m_X - m_ZSL| (delta), S = |q| max|k| / sqrt(D),
  the bound of every score (oracle_hf.map_cond); simam_delta is 5e-5 off at layer 3.
- KL, JS: 4 |logits|_inf (fp32 logits are right to ~1e-6 of their size); a KL of 4.18 in the
  Q/K/V/O run is 3.1e-5 off.
The float32 rounding depends on the CPU's matmul kernels: on one machine the smallest FP32_REL
that holds on these runs was 6.7e-7 (simaou, ragged run), on another (AMD EPYC, 2026-12-02)
3.4e-6 (KL gd~zsl of 1.05 off by 1.8e-4 at cond 50; simaou 2.7e-5 off at cond 7.5), so
FP32_REL = 1e-5 leaves a 3x margin over the worst seen; well-conditioned rows are held to
1e-5, and most agree to 1e-6 or better. Kendall's tau-b has exact ties on both sides; values
equal by construction (the same token's GD-side value at layer 0) are computed equal on both
(`metrics.query_key_dots`; the oracle gives query rows equal to 1e-12 the first one's value,
`oracle_hf.same_rows_same_value`): when a matmul's lanes rounded them apart, kendall_token at
layer 0 was 0.02 off on one CPU and matched on another; a tie tolerance of 1e-6 instead tied
different demonstrations' masses (kendall_example 0.010 off the exact value on an independent
float64 oracle; tests/test_metrics.py::test_kendall_does_not_tie_masses_that_differ_by_a_millionth).
"""

from __future__ import annotations

import copy

import numpy as np
import oracle_hf as O
import pandas as pd
import pytest
import torch

from iclgd_lens import compare, load_model
from iclgd_lens.engine.baselines import untrained_copy
from iclgd_lens.engine.gd import GDConfig, delta_hooks, train_deltas
from iclgd_lens.engine.record import Recorder
from iclgd_lens.tasks import Example, Task, encode_prompts
from iclgd_lens.tasks.mapping import default_task

torch.set_num_threads(1)

ATOL = 1e-5
FP32_REL = 1e-5
SEED = 0
KV = ("k_proj", "v_proj")
QKVO = ("q_proj", "k_proj", "v_proj", "o_proj")


def ragged_task() -> Task:
    """Queries and demonstrations of 1-3 words from the tiny model's vocabulary: ZSL and ICL
    batches are right-padded, the episodes' shared prefixes differ in length, the query maps of
    SimAM have 2-4 slots (NaN-padded in a batch). The default task has none of this (every
    query is 2 tokens, every demonstration 3)."""
    train = [
        ("cow", 0),
        ("dog is animal", 0),
        ("goat pig", 0),
        ("sheep", 0),
        ("saw drill", 1),
        ("hammer", 1),
        ("wrench is tool", 1),
        ("pliers chisel saw", 1),
    ]
    test = [("horse", 0), ("pig is", 0), ("drill", 1), ("chisel is tool", 1), ("cow goat", 0)]
    return Task(
        name="ragged",
        template="{text} =",
        label_words=("alpha", "beta"),
        separator="\n",
        gd_lr=3e-2,
        train=tuple(Example(t, y) for t, y in train),
        test=tuple(Example(t, y) for t, y in test),
    )


RUNS = {
    # task; compare()'s gd argument given the task; the HF projections the oracle trains;
    # compare()'s baselines; k
    "dai": dict(
        task=lambda: default_task(seed=0), gd=lambda task: "dai", projections=KV, baselines=True, k=4
    ),
    # lr None: the task's gd_lr (GDConfig.for_task), what the oracle trains with
    "qkvo": dict(
        task=lambda: default_task(seed=0),
        gd=lambda task: GDConfig(params="qkvo"),
        projections=QKVO,
        baselines=("random", "icl_perm"),
        k=4,
    ),
    "ragged": dict(
        task=ragged_task, gd=lambda task: "dai", projections=KV, baselines=("random", "icl_perm"), k=3
    ),
}
N_EPISODES, N_QUERIES = 2, 4

FAMILIES = {
    "simaou": [("simaou", "icl~gd"), ("simaou", "icl~icl_perm")],
    "simaou_random": [("simaou", "icl~random")],
    "simaou_norm": [("simaou_norm", "icl~gd"), ("simaou_norm", "icl~icl_perm")],
    "simaou_norm_random": [("simaou_norm", "icl~random")],
    "simam_before_after": [("simam_before", "icl~zsl"), ("simam_after", "icl~gd")],
    "simam_delta": [("simam_delta", "icl~gd"), ("simam_delta", "icl~icl_perm")],
    "dw_cos": [("dw_cos", "icl~gd")],
    "dw_action_cos": [("dw_action_cos", "icl~gd")],
    "dual_form": [("dual_form_cos", "icl~dual_form"), ("dual_form_rel_err", "icl~dual_form")],
    "kendall_token": [("kendall_token", "icl~gd")],
    "kendall_example": [("kendall_example", "icl~gd")],
    "kendall_per_head": [("kendall_token_per_head", "icl~gd"), ("kendall_example_per_head", "icl~gd")],
    "accuracy": [(m, c) for m in ("accuracy", "accuracy_vocab") for c in ("zsl", "icl", "gd")],
    "rec2ftp": [("rec2ftp", "icl~gd")],
    "top10_overlap": [
        (m, c)
        for m in ("token_overlap", "overlap_cosine")
        for c in ("icl~gd", "icl~icl_perm", "gd~zsl", "icl~zsl")
    ],
    "kl_js": [(m, c) for m in ("kl", "js") for c in ("icl~gd", "icl~icl_perm", "gd~zsl", "icl~zsl")],
    "probe_resid_out": [("probe:resid_out", c) for c in ("icl~gd", "icl~icl_perm", "icl~random")],
}

NOT_CHECKED = {
    # (metric or None for all, comparison): why the oracle does not recompute it
    (None, "icl~random_update"): "GD replaced by a random update of equal norm: random weights",
    ("kendall_token", "icl~random"): "ICL's ranking against uniform noise",
    ("kendall_example", "icl~random"): "ICL's ranking against uniform noise",
    ("kendall_token_per_head", "icl~random"): "ICL's ranking against uniform noise",
}

UNTRAINED = "untrained:icl~gd"
UNTRAINED_FAMILIES = {
    name: [(m, UNTRAINED) for m, c in pairs if c == "icl~gd"]
    for name, pairs in FAMILIES.items()
    if any(c == "icl~gd" for _, c in pairs)
}


# ---- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world():
    """The bridge compare() runs on, and the same weights as a plain HF model (fp32 and a float64 copy)."""
    hf32 = O.load_hf_model()
    return {
        "model": load_model(),
        "hf32": hf32,
        "hf64": copy.deepcopy(hf32).double(),
        "tokenizer": O.load_tokenizer(),
    }


_CACHE: dict[str, dict] = {}


def _run(world, name: str) -> dict:
    """compare() once per run, and the oracle of the same run (module-wide cache)."""
    if name not in _CACHE:
        spec = RUNS[name]
        task, tok = spec["task"](), world["tokenizer"]
        episodes = task.episodes(spec["k"], N_EPISODES, N_QUERIES, SEED)
        table = compare(
            world["model"],
            task,
            gd=spec["gd"](task),
            k=spec["k"],
            n_episodes=N_EPISODES,
            n_queries=N_QUERIES,
            seed=SEED,
            baselines=spec["baselines"],
            progress=False,
            artifacts=False,
        ).table
        oracle, passes = O.oracle_table(
            world["hf64"], tok, task, episodes, projections=spec["projections"], lr=task.gd_lr, seed=SEED
        )
        out = {"task": task, "episodes": episodes, "table": table, "oracle": oracle, "passes": passes}
        if (
            spec["baselines"] is True
        ):  # the untrained baseline: the same pipeline on untrained_copy(seed=0), icl~gd rows only
            untrained = untrained_copy(world["hf32"], seed=0).double().requires_grad_(False)
            base, _ = O.oracle_table(
                untrained,
                tok,
                task,
                episodes,
                projections=spec["projections"],
                lr=task.gd_lr,
                seed=SEED,
                with_perm=False,
                with_random=False,
            )
            out["untrained"] = base[base.comparison == "icl~gd"].assign(comparison=UNTRAINED)
        _CACHE[name] = out
    return _CACHE[name]


@pytest.fixture(scope="module", autouse=True)
def _clear_cache():
    yield
    _CACHE.clear()


# ---- matching ---------------------------------------------------------------------------------------
def _select(frame: pd.DataFrame, pairs) -> pd.DataFrame:
    keep = pd.Series(list(zip(frame.metric, frame.comparison)), index=frame.index).isin(set(pairs))
    return frame[keep]


def assert_matches(table: pd.DataFrame, oracle: pd.DataFrame, pairs) -> None:
    """Every oracle row of `pairs` is in the table exactly once and agrees; the table has no other rows
    of `pairs`."""
    want = _select(oracle, pairs)
    got = _select(table, pairs)[[*O.KEYS, "value"]]
    assert len(want), f"the oracle has no rows for {pairs}"
    duplicated = got[got.duplicated(O.KEYS, keep=False)]
    assert duplicated.empty, (
        f"rows appear more than once in compare()'s table:\n{duplicated.head(10).to_string()}"
    )
    merged = want.merge(got, on=O.KEYS, how="outer", suffixes=("_oracle", "_project"), indicator=True)
    missing = merged[merged._merge == "left_only"]
    extra = merged[merged._merge == "right_only"]
    both = merged[merged._merge == "both"].copy()
    nan_o, nan_p = both.value_oracle.isna(), both.value_project.isna()
    both["diff"] = (both.value_project - both.value_oracle).abs()
    both["tol"] = ATOL + FP32_REL * both.cond
    bad = both[(nan_o != nan_p) | (~nan_o & ~nan_p & ~(both["diff"] <= both["tol"]))]
    problems = []
    if len(missing):
        problems.append(
            f"{len(missing)} oracle rows missing from compare()'s table, "
            f"e.g.\n{missing[O.KEYS].head(8).to_string()}"
        )
    if len(extra):
        problems.append(
            f"{len(extra)} rows in compare()'s table the oracle does not define, "
            f"e.g.\n{extra[[*O.KEYS, 'value_project']].head(8).to_string()}"
        )
    if len(bad):
        worst = bad.assign(order=bad["diff"].fillna(np.inf)).sort_values("order", ascending=False)
        cols = [*O.KEYS, "value_project", "value_oracle", "diff", "tol"]
        problems.append(
            f"{len(bad)} of {len(both)} values disagree with the oracle, "
            f"worst first:\n{worst[cols].head(12).to_string()}"
        )
    assert not problems, "\n\n".join(problems)


# ---- the table ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("run", list(RUNS))
def test_table_matches_oracle(world, run, family):
    """Each metric family of compare()'s table: Dai's K/V GD and Q/K/V/O GD on the default task,
    and Dai's GD on the ragged task (padding, prefixes of different lengths)."""
    r = _run(world, run)
    assert_matches(r["table"], r["oracle"], FAMILIES[family])


@pytest.mark.parametrize("family", list(UNTRAINED_FAMILIES))
def test_untrained_baseline_matches_oracle(world, family):
    """The "untrained:icl~gd" rows: the same metrics on untrained_copy(model, seed=0)."""
    r = _run(world, "dai")
    assert_matches(r["table"], r["untrained"], UNTRAINED_FAMILIES[family])


def test_oracle_kendall_is_scipys_tau_b():
    """The oracle's pairwise tau-b is scipy's, ties included."""
    import scipy.stats

    rng = np.random.default_rng(0)
    for _ in range(20):
        a, b = rng.integers(0, 5, 9).astype(float), rng.standard_normal(9).round(1)
        want = scipy.stats.kendalltau(a, b).statistic
        assert O.kendalltau(a, b) == pytest.approx(want, abs=1e-12) or (
            np.isnan(want) and np.isnan(O.kendalltau(a, b))
        )


@pytest.mark.parametrize("run", list(RUNS))
def test_every_number_of_the_table_is_checked(world, run):
    """No (metric, comparison) of compare()'s table escapes the oracle unless listed in NOT_CHECKED."""
    table = _run(world, run)["table"]
    checked = {pair for pairs in (*FAMILIES.values(), *UNTRAINED_FAMILIES.values()) for pair in pairs}
    skipped = lambda m, c: (None, c) in NOT_CHECKED or (m, c) in NOT_CHECKED
    unchecked = sorted(
        {
            (m, c)
            for m, c in zip(table.metric, table.comparison)
            if (m, c) not in checked and not skipped(m, c)
        }
    )
    assert not unchecked, f"compare() writes numbers no oracle test checks: {unchecked}"


# ---- the GD condition itself --------------------------------------------------------------------------
def _gd_config(task, run: str) -> GDConfig:
    """What compare() hands train_deltas for this run (train_deltas resolves lr None to the task's)."""
    gd = RUNS[run]["gd"](task)
    return GDConfig.preset(gd) if isinstance(gd, str) else gd


@pytest.mark.parametrize("run", list(RUNS))
def test_gd_deltas_and_losses_equal_torch_optim_on_a_deep_copy(world, run):
    """The weight deltas compare() trains (train_deltas) equal W_after - W_before of the
    torch.optim.SGD deep copy, projection by projection, and the per-step losses agree."""
    r = _run(world, run)
    model, task, episodes, passes = world["model"], r["task"], r["episodes"], r["passes"]
    deltas = train_deltas(model, model.tokenizer, task, episodes, _gd_config(task, run))
    short = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}
    projections = RUNS[run]["projections"]
    assert set(deltas.parts) == {
        f"blocks.{l}.attn.{short[p]}" for l in range(model.cfg.n_layers) for p in projections
    }
    for e, ep in enumerate(passes):
        np.testing.assert_allclose(
            deltas.losses[:, e].double().cpu().numpy(), np.array(ep.gd_run.losses), atol=1e-5, rtol=0
        )
        for l, (base, tuned) in enumerate(zip(world["hf64"].model.layers, ep.gd_run.model.model.layers)):
            for p in projections:
                want = (
                    getattr(tuned.self_attn, p).weight - getattr(base.self_attn, p).weight
                )  # [d_out, d_in] float64
                got = deltas.tensors[f"blocks.{l}.attn.{short[p]}"][e].detach().cpu().double()
                rel = float((got - want).norm() / want.norm())
                assert rel < 1e-5, (
                    f"episode {e} layer {l} {p}: |dW_project - dW_torch.optim| / |dW| = {rel:.2e}"
                )


@pytest.mark.parametrize("precision", ["float64", "float32"])
@pytest.mark.parametrize("run", list(RUNS))
def test_gd_condition_h_equals_the_fine_tuned_copy(world, run, precision):
    """The GD condition as compare() records it (ZSL prompts, deltas applied by delta_hooks,
    attn_out / head_out probes) equals h and z of the torch.optim-fine-tuned HF deep copy
    (float64 copy: the reference; float32 copy: the model exactly as shipped)."""
    r = _run(world, run)
    model, task, episodes, tok = world["model"], r["task"], r["episodes"], world["tokenizer"]
    deltas = train_deltas(model, model.tokenizer, task, episodes, _gd_config(task, run))
    queries = [q for ep in episodes for q in ep.queries]
    words = [ep.label_words for ep in episodes for _ in ep.queries]
    row_episode = torch.tensor([e for e, ep in enumerate(episodes) for _ in ep.queries])
    device = next(model.parameters()).device
    enc = encode_prompts(model.tokenizer, task, [()] * len(queries), queries, words).to(device)
    rec = Recorder(model, ["attn_out", "head_out"]).run(
        enc, "gd", interventions=delta_hooks(deltas, row_episode.to(device))
    )
    b = 0
    for e, episode in enumerate(episodes):
        if precision == "float64":
            gd_passes = r["passes"][e].gd
        else:
            tuned = O.train_gd(world["hf32"], tok, task, episode, RUNS[run]["projections"], task.gd_lr).model
            gd_passes = [
                O.run_pass(tuned, p) for p in O.prompts(tok, task, (), episode.queries, episode.label_words)
            ]
        for q, gd in enumerate(gd_passes):
            for name, want in (("attn_out", gd.h), ("head_out", gd.z)):
                got = rec[name][:, b].detach().cpu().double()  # [L, d] / [L, H, D]
                err = float((got - want.double()).abs().max())
                assert err < 1e-5 * max(1.0, float(want.abs().max())), (
                    f"episode {e} query {q} {name}: max |project - torch.optim copy| = {err:.2e}"
                )
            b += 1


# ---- the oracle checks itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("run", list(RUNS))
def test_oracle_scores_reproduce_hf_attention(world, run):
    """The oracle's own RoPE / GQA / scaling: softmax of its recomputed scores equals HF's
    attention weights, sum p v equals the o_proj input z, and o_proj(z) equals h."""
    passes = _run(world, run)["passes"]
    hf = world["hf64"]
    for ep in passes:
        for p in (*ep.zsl, *ep.icl, *ep.gd):
            probs = torch.softmax(O.read_scores(p), -1)  # [L, H, P']
            # HF's eager attention takes its softmax in float32 even in a float64 model: ~1e-7
            torch.testing.assert_close(probs, p.probs_hf[..., : p.read + 1].double(), atol=1e-6, rtol=0)
            assert (
                float(p.probs_hf[..., p.read + 1 :].abs().sum()) == 0.0
            )  # causal: nothing after the read position
            v = O.repeat_kv(p.v[:, : p.read + 1].double(), probs.shape[1])  # [L, P', H, D]
            torch.testing.assert_close(
                torch.einsum("lhp,lphd->lhd", probs, v), p.z.double(), atol=1e-6, rtol=0
            )
    p = passes[0].icl[0]
    for l, block in enumerate(hf.model.layers):
        torch.testing.assert_close(block.self_attn.o_proj(p.z[l].reshape(-1)), p.h[l], atol=1e-10, rtol=0)


@pytest.mark.parametrize("run", list(RUNS))
def test_oracle_prompts_and_gd_texts(world, run):
    """The oracle reads the query's last token, and trains on each demonstration alone with BOS
    (the same tokens as in the prompt, so token-level Kendall is defined)."""
    r = _run(world, run)
    passes, tok = r["passes"], world["tokenizer"]
    for ep, episode in zip(passes, r["episodes"]):
        for zsl, icl in zip(ep.zsl, ep.icl):
            assert zsl.read == len(zsl.prompt.ids) - 1 and icl.read == len(icl.prompt.ids) - 1
            assert zsl.prompt.ids[0] == tok.bos_token_id and icl.prompt.ids[0] == tok.bos_token_id
            assert (
                icl.prompt.ids[-len(zsl.prompt.ids) + 1 :] == zsl.prompt.ids[1:]
            )  # the query ends the ICL prompt
            seg = icl.prompt.segments
            for i, q_train in enumerate(ep.gd_run.train_q):
                assert int((seg == i + 1).sum()) == q_train.shape[1]
        assert ep.gd_run.texts == [r["task"].render_demo(d, episode.label_words) for d in episode.demos]
