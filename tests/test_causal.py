"""The causal study (analyses/causal.py): properties that hold whatever the weights.

Patching every layer's attention output at the read position with ICL's values is ICL (the read
position's residual is the embedding plus the attention and MLP outputs, and MLPs and norms are
position-wise); writing a run's own values back changes nothing; the linear dual-form transplant
is ICL exactly on linear attention (von Oswald's layer), and one GD step with the hand-built
weights; the softmax transplant is exact when the live context is ICL's own without the
demonstrations. No measured figure of the embedded models is frozen here.
"""

import pytest
import torch
from iclgd_lens.analyses import causal

from iclgd_lens import GDConfig
from iclgd_lens.tasks import added_context_mask
from iclgd_lens.worlds.oswald import (
    LinearSelfAttention,
    build_tokens,
    gd_step,
    hand_built_weights,
    predict_icl,
    regression_tasks,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def icl_model():
    from iclgd_lens.models import load_model

    return load_model("tiny-llama-icl", device="cpu")


@pytest.fixture(scope="module")
def runs(icl_model):
    from iclgd_lens.tasks.mapping import default_task

    task = default_task(seed=0)
    episodes = task.episodes(4, 2, 4, 0)
    return causal.record_runs(icl_model, task, episodes, GDConfig.resolve("dai", task), seed=0)


def _logits(model, enc, hooks=()):
    """Read-position logits of a plain forward pass (no Recorder), with `hooks` attached."""
    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        out = model(enc.input_ids, attention_mask=enc.attention_mask)
    return out[torch.arange(out.shape[0]), enc.read_pos]


def _all_layers(values, n_layers):
    return {l: values[l] for l in range(n_layers)}


def test_patching_every_layer_with_icl_values_is_icl(icl_model, runs):
    L, zsl, icl = runs.n_layers, runs.zsl_enc, runs.icl_enc
    icl_logits = _logits(icl_model, icl)  # independent of the Recorder's own ICL recording
    patched = _logits(
        icl_model, zsl, causal.write_at_read(_all_layers(runs.attn_out["icl"], L), zsl.read_pos)
    )
    assert torch.allclose(patched, icl_logits, atol=1e-5, rtol=0)
    # per-head outputs z (before W_O) as well: the transplant writes there
    patched_z = _logits(
        icl_model, zsl, causal.write_at_read(_all_layers(runs.z["icl"], L), zsl.read_pos, "attn.hook_z")
    )
    assert torch.allclose(patched_z, icl_logits, atol=1e-5, rtol=0)
    # the property needs every layer: leaving one out is not ICL
    some = {l: runs.attn_out["icl"][l] for l in range(1, L)}
    assert (_logits(icl_model, zsl, causal.write_at_read(some, zsl.read_pos)) - icl_logits).abs().max() > 1e-2


def test_writing_a_runs_own_values_changes_nothing(icl_model, runs):
    L, zsl, icl = runs.n_layers, runs.zsl_enc, runs.icl_enc
    zsl_logits, icl_logits = _logits(icl_model, zsl), _logits(icl_model, icl)
    same = _logits(icl_model, zsl, causal.write_at_read(_all_layers(runs.attn_out["zsl"], L), zsl.read_pos))
    assert torch.allclose(same, zsl_logits, atol=1e-6, rtol=0)
    # substituting ICL's own update (h_ZSL + (h_ICL - h_ZSL)) in the ICL run, one layer or all
    own = runs.attn_out["zsl"] + (runs.attn_out["icl"] - runs.attn_out["zsl"])
    for layers in ([0], [runs.n_layers - 1], list(range(L))):
        out = _logits(icl_model, icl, causal.write_at_read({l: own[l] for l in layers}, icl.read_pos))
        assert torch.allclose(out, icl_logits, atol=1e-5, rtol=0)
    # and an intervention that does change something is seen (the hooks are live)
    moved = _logits(icl_model, icl, causal.write_at_read({0: runs.attn_out["zsl"][0]}, icl.read_pos))
    assert (moved - icl_logits).abs().max() > 1e-3


def test_softmax_transplant_is_exact_when_the_context_is_icls_own(icl_model, runs):
    """Run the ICL prompt with the read position blind to the demonstration tokens (their scores
    masked in every layer, positions unchanged); the softmax transplant of their recorded keys and
    values must then give back ICL's logits at every layer."""
    L, icl = runs.n_layers, runs.icl_enc
    demo = added_context_mask(icl.segments, icl.attention_mask)  # [batch, pos]
    rows = torch.arange(len(icl.read_pos))

    def blind(scores, hook):  # [batch, heads, q_pos, k_pos]
        out = scores.clone()
        row = out[rows, :, icl.read_pos]  # [batch, heads, k_pos]
        out[rows, :, icl.read_pos] = row.masked_fill(demo[:, None, :], torch.finfo(out.dtype).min)
        return out

    blinding = [(f"blocks.{l}.attn.hook_attn_scores", blind) for l in range(L)]
    icl_logits = _logits(icl_model, icl)
    assert (_logits(icl_model, icl, blinding) - icl_logits).abs().max() > 1e-2  # the demonstrations matter
    transplant = causal.transplant_hooks(runs.demo, icl.read_pos, mode="softmax")
    assert torch.allclose(_logits(icl_model, icl, blinding + transplant), icl_logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("hand_built", [True, False])
def test_linear_transplant_is_icl_on_von_oswalds_layer(hand_built):
    """dW_ICL q added to z of the query alone (no context) gives ICL's output exactly, for any linear
    attention weights; with the hand-built weights that is one GD step's prediction."""
    d_x, d_y, n, lr = 5, 3, 8, 1.5
    xc, yc, xq, _ = regression_tasks(32, n_context=n, d_x=d_x, d_y=d_y, seed=7)
    weights = hand_built_weights(d_x, d_y, lr, n)
    if not hand_built:
        gen = torch.Generator().manual_seed(1)
        weights = {name: w + 0.3 * torch.randn(w.shape, generator=gen) for name, w in weights.items()}
    model = LinearSelfAttention(d_x, d_y, weights)
    icl_tokens, zsl_tokens = (
        build_tokens(xc, yc, xq),
        build_tokens(xc[:, :0], yc[:, :0], xq),
    )  # [T, N+1, d], [T, 1, d]
    store = {}

    def keep(t, hook):
        store[hook.name] = t.detach().clone()

    with model.hooks(
        fwd_hooks=[
            ("blocks.0.attn.hook_k", keep),
            ("blocks.0.attn.hook_v", keep),
            ("blocks.0.attn.hook_z", keep),
        ]
    ):
        icl_out = model(icl_tokens)
    context = (torch.arange(n + 1) < n).expand(len(xq), -1)  # keys and values: the context tokens
    demo = {0: causal.DemoKV(store["blocks.0.attn.hook_k"], store["blocks.0.attn.hook_v"], context)}
    read = torch.zeros(len(xq), dtype=torch.long)  # the query alone: position 0
    with model.hooks(fwd_hooks=causal.transplant_hooks(demo, read, mode="linear")):
        out = model(zsl_tokens)
    assert not torch.allclose(
        model(zsl_tokens)[:, -1], icl_out[:, -1], atol=1e-3
    )  # without it: no context at all
    assert torch.allclose(out[:, -1], icl_out[:, -1], atol=1e-5)
    # the same direction at ICL's own norm is the same update
    z_norm = {0: torch.linalg.vector_norm(store["blocks.0.attn.hook_z"][:, -1], dim=-1)}  # z_ZSL = 0 here
    with model.hooks(fwd_hooks=causal.transplant_hooks(demo, read, mode="linear_scaled", target_norm=z_norm)):
        assert torch.allclose(model(zsl_tokens)[:, -1], icl_out[:, -1], atol=1e-5)
    if hand_built:  # ICL is one GD step: the transplanted prediction is dW x_test
        assert torch.allclose(
            -out[:, -1, d_x:], torch.einsum("tox,tx->to", gd_step(xc, yc, None, lr), xq), atol=1e-5
        )
        assert torch.allclose(-out[:, -1, d_x:], predict_icl(model, xc, yc, xq), atol=1e-5)
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())


def test_patching_every_head_of_a_layer_is_patching_the_layer(icl_model, runs):
    """z of all heads -> o_proj is the attention output: writing ICL's z into every head of layer l
    (one head at a time, through write_head_at_read) equals writing ICL's attention output there."""
    zsl, heads = runs.zsl_enc, icl_model.cfg.n_heads
    for layer in range(runs.n_layers):
        per_head = [
            hook
            for h in range(heads)
            for hook in causal.write_head_at_read(layer, h, runs.z["icl"][layer, :, h], zsl.read_pos)
        ]
        by_heads = _logits(icl_model, zsl, per_head)
        by_layer = _logits(
            icl_model, zsl, causal.write_at_read({layer: runs.attn_out["icl"][layer]}, zsl.read_pos)
        )
        assert torch.allclose(by_heads, by_layer, atol=1e-5), layer
        one_head = _logits(
            icl_model, zsl, causal.write_head_at_read(layer, 0, runs.z["icl"][layer, :, 0], zsl.read_pos)
        )
        assert not torch.allclose(one_head, by_layer, atol=1e-5)  # one head is not the whole layer


def test_head_patch_logits_write_only_the_named_head(icl_model, runs):
    out = causal.head_patch_logits(icl_model, runs, seed=0)
    L, H = runs.n_layers, icl_model.cfg.n_heads
    subst = {(f"subst_head:{s}", l, h) for s in causal.HEAD_SUBSTITUTES for l in range(L) for h in range(H)}
    assert set(out) == subst | {
        (f"patch_head:{s}", l, h) for s in causal.HEAD_PATCH_SOURCES for l in range(L) for h in range(H)
    }
    zsl = runs.zsl_enc
    for l, h in [(0, 0), (L - 1, H - 1)]:
        want = _logits(icl_model, zsl, causal.write_head_at_read(l, h, runs.z["gd"][l, :, h], zsl.read_pos))
        assert torch.allclose(out[("patch_head:gd", l, h)], want, atol=1e-6)
    own = _logits(icl_model, zsl, causal.write_head_at_read(1, 1, runs.z["zsl"][1, :, 1], zsl.read_pos))
    assert torch.allclose(own, runs.logits["zsl"], atol=1e-5)  # a head's own value changes nothing

    # noising: hand-written hooks (not the study's) put ICL's z at the read position of every head of
    # every layer; that alone is ICL's read-position logits, and with one head left at ZSL's value it
    # is the study's subst_head:none for that head
    def icl_z_except(layer, head):
        def make(l):
            def hook(act, hook):
                out = act.clone()
                rows = torch.arange(out.shape[0])
                out[rows, zsl.read_pos] = runs.z["icl"][l].to(out.dtype)
                if l == layer:
                    out[rows, zsl.read_pos, head] = runs.z["zsl"][l, :, head].to(out.dtype)
                return out

            return hook

        return [(f"blocks.{l}.attn.hook_z", make(l)) for l in range(L)]

    assert torch.allclose(_logits(icl_model, zsl, icl_z_except(-1, 0)), runs.logits["icl"], atol=1e-5)
    for l, h in [(0, 1), (L - 2, 0)]:
        want = _logits(icl_model, zsl, icl_z_except(l, h))
        assert torch.allclose(out[("subst_head:none", l, h)], want, atol=1e-6)


def test_study_table_and_model_untouched(icl_model):
    before = {k: v.clone() for k, v in icl_model.state_dict().items()}
    r = causal.run(icl_model, k=4, n_episodes=2, n_queries=4, seed=0, progress=False)
    assert all(torch.equal(before[k], v) for k, v in icl_model.state_dict().items())
    assert all(len(hp.fwd_hooks) == 0 for hp in icl_model.hook_dict.values())
    t = r.table
    assert list(t.columns) == causal.COLUMNS
    assert set(t.metric) == set(causal.QUERY_METRICS) | set(causal.EPISODE_METRICS) | set(
        causal.DUAL_FORM_METRICS
    )
    assert set(t[t.metric.isin(causal.DUAL_FORM_METRICS)]["head"]) == set(range(icl_model.cfg.n_heads))
    expected = (
        {"zsl", "icl", "gd", "icl_perm"}
        | {f"patch:{s}" for s in causal.PATCH_SOURCES}
        | {f"subst:{s}" for s in causal.SUBSTITUTES}
        | {f"transplant:{m}" for m in causal.TRANSPLANTS}
        | {f"patch_head:{s}" for s in causal.HEAD_PATCH_SOURCES}
        | {f"subst_head:{s}" for s in causal.HEAD_SUBSTITUTES}
    )
    assert set(t.comparison) == expected | {f"untrained:{c}" for c in expected}
    assert set(t[t.comparison.str.startswith("patch:")].scope) == {"single", "bottom", "top"}
    head_rows = t[t.comparison.str.contains("_head:")]
    assert set(head_rows.scope) == {"head"} and set(head_rows["head"]) == set(range(icl_model.cfg.n_heads))
    assert (t[t.metric.isin(causal.EPISODE_METRICS)]["query"] == -1).all()
    assert (t[t.metric.isin(causal.QUERY_METRICS)]["query"] >= 0).all()
    assert t[t.metric.isin(["accuracy", "agreement"])].value.between(0, 1).all()
    L = icl_model.cfg.n_layers
    assert r.config["all_layer_patch_max_abs_err"] <= causal.RESULT_TOL
    # the table's all-layer ICL patch recovers exactly ICL's effect, and ZSL/ICL are the 0/1 anchors
    rec = t[
        (t.metric == "recovered") & (t.comparison == "patch:icl") & (t.scope == "bottom") & (t.layer == L - 1)
    ]
    assert rec.value.to_numpy() == pytest.approx(1.0, abs=1e-5)
    assert t[(t.metric == "recovered") & (t.comparison == "zsl")].value.to_numpy() == pytest.approx(0.0)
    assert t[(t.metric == "kl_to_icl") & (t.comparison == "icl")].value.abs().max() < 1e-6
    assert r.figures and isinstance(r.findings, str) and "every layer" in r.findings


@pytest.mark.parametrize(
    "gd_values, word",
    [
        ([0.8, 0.7, 0.9, 0.75, 0.85, 0.8, 0.7, 0.9], "stands in for"),
        ([0.1, 0.12, 0.08, 0.1, 0.11, 0.09, 0.1, 0.12], "partly stands in for"),
        ([0.1, -0.1, 0.05, -0.05, 0.0, 0.02, -0.02, 0.0], "does not stand in for"),
    ],
)
def test_verdict_line_follows_the_paired_test_and_the_recovered_share(gd_values, word):
    import pandas as pd

    rows = [
        dict(metric="recovered", comparison=c, scope="bottom", layer=3, head=-1, episode=e, query=-1, value=v)
        for c, values in (("patch:gd_scaled", gd_values), ("patch:random", [0.0] * 8))
        for e, v in enumerate(values)
    ]
    table = pd.DataFrame(rows)[causal.COLUMNS]
    line = causal.verdict(table, causal.summary(table), 4)
    assert line.startswith(f"Verdict: GD's update {word} ICL's")
