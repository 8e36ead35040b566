"""Oracle tests: the von Oswald layer with hand-built weights is exactly one GD step, and the
metrics and hook API of iclgd-lens see it as such."""

import pytest
import torch

from iclgd_lens.engine import metrics
from iclgd_lens.errors import IclgdError
from iclgd_lens.worlds.oswald import (
    LinearSelfAttention,
    best_gd_lr,
    build_tokens,
    gd_step,
    hand_built_weights,
    predict_icl,
    regression_loss,
    regression_tasks,
)

torch.set_num_threads(1)


def autograd_gd_step(x_context, y_context, w0, lr):
    """dW by autograd on L(W) = 1/(2N) sum_i |W x_i - y_i|^2, independent of gd_step's formula."""
    n_tasks, n, _ = x_context.shape
    w = w0.expand(n_tasks, -1, -1).clone().requires_grad_(True)  # [T, d_y, d_x]
    pred = torch.einsum("tox,tnx->tno", w, x_context)
    loss = 0.5 * ((pred - y_context) ** 2).sum(-1).mean(-1).sum()  # summed over tasks: per-task grads
    (grad,) = torch.autograd.grad(loss, w)
    return -lr * grad


def embed_y(y_update, d_x):
    """An update of the y-slot only, as a token-space vector [T, d_x + d_y]."""
    return torch.cat([torch.zeros(y_update.shape[0], d_x, dtype=y_update.dtype), y_update], dim=-1)


def record_attn_out(model, tokens):
    """The query token's attention-layer output, recorded through a HookPoint (bridge API)."""
    store = {}

    def keep(tensor, hook):
        store[hook.name] = tensor[:, -1].detach().clone()

    with model.hooks(fwd_hooks=[("blocks.0.hook_attn_out", keep)]):
        model(tokens)
    return store["blocks.0.hook_attn_out"]  # [T, d]


@pytest.mark.parametrize("with_w0", [False, True])
def test_icl_update_is_one_gd_step(with_w0):
    d_x, d_y, n, lr = 5, 2, 8, 1.7
    xc, yc, xq, _ = regression_tasks(64, n_context=n, d_x=d_x, d_y=d_y, seed=3)
    w0 = (
        torch.randn(d_y, d_x, generator=torch.Generator().manual_seed(9))
        if with_w0
        else torch.zeros(d_y, d_x)
    )
    dw = autograd_gd_step(xc, yc, w0, lr)  # [T, d_y, d_x]
    assert torch.allclose(gd_step(xc, yc, w0 if with_w0 else None, lr), dw, atol=1e-6)

    model = LinearSelfAttention(d_x, d_y, hand_built_weights(d_x, d_y, lr, n, w0=w0 if with_w0 else None))
    out = model(build_tokens(xc, yc, xq))  # [T, N+1, d]
    dw_x_test = torch.einsum("tox,tx->to", dw, xq)
    assert torch.allclose(out[:, -1, d_x:], -dw_x_test, atol=1e-5)  # query: y <- 0 - dW x_test
    dw_x_context = torch.einsum("tox,tnx->tno", dw, xc)
    assert torch.allclose(out[:, :-1, d_x:], yc - dw_x_context, atol=1e-5)  # context: y_j <- y_j - dW x_j
    assert torch.equal(out[..., :d_x], build_tokens(xc, yc, xq)[..., :d_x])  # x-slots untouched

    prediction = predict_icl(model, xc, yc, xq, w0=w0 if with_w0 else None)
    assert torch.allclose(prediction, torch.einsum("tox,tx->to", w0 + dw, xq), atol=1e-5)


def test_simaou_is_one_through_hooks_and_drops_when_w_k_is_perturbed():
    d_x, d_y, n, lr = 6, 4, 10, 2.0
    xc, yc, xq, _ = regression_tasks(200, n_context=n, d_x=d_x, d_y=d_y, seed=5)
    weights = hand_built_weights(d_x, d_y, lr, n)
    model = LinearSelfAttention(d_x, d_y, weights)

    h_icl = record_attn_out(model, build_tokens(xc, yc, xq))
    h_zsl = record_attn_out(model, build_tokens(xc[:, :0], yc[:, :0], xq))  # the query alone
    # GD: a linear readout y = W x from W0 = 0 gets dW; its output change at x_test, written into
    # the y-slot with the layer's sign convention (the y-slot holds minus the prediction).
    dw = gd_step(xc, yc, None, lr)
    h_gd = h_zsl + embed_y(-torch.einsum("tox,tx->to", dw, xq), d_x)
    simaou = metrics.delta_cosine(h_icl, h_gd, h_zsl)  # [T]
    assert torch.allclose(simaou, torch.ones_like(simaou), atol=1e-5)

    noise = torch.randn(weights["W_K"].shape, generator=torch.Generator().manual_seed(0))
    perturbed = dict(weights, W_K=weights["W_K"] + 0.5 * noise)
    model_perturbed = LinearSelfAttention(d_x, d_y, perturbed)
    h_icl_p = record_attn_out(model_perturbed, build_tokens(xc, yc, xq))
    h_zsl_p = record_attn_out(model_perturbed, build_tokens(xc[:, :0], yc[:, :0], xq))
    simaou_p = metrics.delta_cosine(h_icl_p, h_zsl_p + (h_gd - h_zsl), h_zsl_p)
    assert simaou_p.mean() < 0.99


def test_dual_form_is_exact_on_linear_attention():
    """metrics.implicit_dw_icl / dual_form_update on the recorded k, v, q reproduce the layer."""
    d_x, d_y, n, lr = 4, 3, 7, 1.3
    xc, yc, xq, _ = regression_tasks(16, n_context=n, d_x=d_x, d_y=d_y, seed=2)
    model = LinearSelfAttention(d_x, d_y, hand_built_weights(d_x, d_y, lr, n))
    store = {}

    def keep(tensor, hook):
        store[hook.name.split(".", 2)[-1]] = tensor.detach().clone()

    names = [
        "blocks.0.attn.q.hook_out",
        "blocks.0.attn.k.hook_out",
        "blocks.0.attn.v.hook_out",
        "blocks.0.hook_attn_out",
    ]
    with model.hooks(fwd_hooks=[(name, keep) for name in names]):
        model(build_tokens(xc, yc, xq))
    k_ctx, v_ctx = store["attn.k.hook_out"][:, :n], store["attn.v.hook_out"][:, :n]  # [T, N, 1, d]
    q_query = store["attn.q.hook_out"][:, -1]  # [T, 1, d]
    z_pred = metrics.dual_form_update(q_query, k_ctx, v_ctx)[:, 0]  # [T, d]
    attn_out_pred = z_pred @ model.weights()["P"].T
    assert torch.allclose(attn_out_pred, store["hook_attn_out"][:, -1], atol=1e-6)

    # The implicit weight, read from x_test to the y-slot, is -dW: cosine -1 with GD's dW.
    dw_icl = metrics.implicit_dw_icl(k_ctx, v_ctx)[:, 0]  # [T, d, d]
    w = model.weights()
    x_to_y = (w["P"] @ dw_icl @ w["W_Q"])[:, d_x:, :d_x]  # [T, d_y, d_x]
    cos = metrics.matrix_cosine(-x_to_y, gd_step(xc, yc, None, lr))
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_best_lr_gd_beats_zero_and_icl_matches_gd():
    d_x, d_y, n = 10, 1, 10
    fit = regression_tasks(1000, n_context=n, d_x=d_x, d_y=d_y, seed=0)
    lr = best_gd_lr(*fit)
    xc, yc, xq, yq = regression_tasks(1000, n_context=n, d_x=d_x, d_y=d_y, seed=1)
    gd_pred = torch.einsum("tox,tx->to", gd_step(xc, yc, None, lr), xq)
    gd_loss = regression_loss(gd_pred, yq)
    zero_loss = regression_loss(torch.zeros_like(yq), yq)
    assert gd_loss < 0.6 * zero_loss
    model = LinearSelfAttention(d_x, d_y, hand_built_weights(d_x, d_y, lr, n))
    icl_loss = regression_loss(predict_icl(model, xc, yc, xq), yq)
    assert abs(float(icl_loss.detach()) - float(gd_loss)) < 1e-5
    # the chosen lr is a minimum: nearby learning rates do worse
    for other in (0.7 * lr, 1.3 * lr):
        other_pred = torch.einsum("tox,tx->to", gd_step(xc, yc, None, other), xq)
        assert regression_loss(other_pred, yq) > gd_loss


def test_gd_plus_plus_transforms_inputs_and_keeps_the_y_update():
    d_x, d_y, n, lr, gamma = 5, 2, 6, 1.1, 0.3
    xc, yc, xq, _ = regression_tasks(8, n_context=n, d_x=d_x, d_y=d_y, seed=4)
    tokens = build_tokens(xc, yc, xq)
    out = LinearSelfAttention(d_x, d_y, hand_built_weights(d_x, d_y, lr, n, gd_plus_plus=True, gamma=gamma))(
        tokens
    )
    plain = LinearSelfAttention(d_x, d_y, hand_built_weights(d_x, d_y, lr, n))(tokens)
    assert torch.isfinite(out).all()
    assert torch.allclose(out[..., d_x:], plain[..., d_x:], atol=1e-6)
    gram_x_test = torch.einsum("tnx,tny,ty->tx", xc, xc, xq)  # sum_i x_i x_i^T x_test
    assert torch.allclose(out[:, -1, :d_x], xq - gamma * gram_x_test, atol=1e-6)


def test_hooks_can_edit_activations():
    d_x, d_y, n = 3, 1, 4
    xc, yc, xq, _ = regression_tasks(2, n_context=n, d_x=d_x, d_y=d_y, seed=0)
    model = LinearSelfAttention(d_x, d_y, hand_built_weights(d_x, d_y, 1.0, n))
    tokens = build_tokens(xc, yc, xq)
    with model.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", lambda t, hook: torch.zeros_like(t))]):
        out = model(tokens)
    assert torch.equal(out, tokens)
    assert not torch.equal(model(tokens), tokens)


def test_bad_input_raises_one_line_errors():
    with pytest.raises(IclgdError):
        hand_built_weights(3, 1, 1.0, 4, w0=torch.zeros(2, 3))
    with pytest.raises(IclgdError):
        LinearSelfAttention(3, 1, {"W_K": torch.zeros(4, 4)})
    with pytest.raises(IclgdError):
        LinearSelfAttention(3, 1, hand_built_weights(3, 1, 1.0, 4))(torch.zeros(2, 5, 7))


def test_recorder_reads_the_construction_exactly():
    """The engine's own recording path (Recorder + the built-in attn_out probe) on the hand-built
    layer: the recorded ICL update equals one GD step's update, SimAOU = 1 within 1e-5."""
    from iclgd_lens.engine.record import Recorder
    from iclgd_lens.tasks import QUERY_SEGMENT, EncodedPrompts

    d_x, d_y, n, lr = 6, 4, 10, 2.0
    xc, yc, xq, _ = regression_tasks(50, n_context=n, d_x=d_x, d_y=d_y, seed=11)
    model = LinearSelfAttention(d_x, d_y, hand_built_weights(d_x, d_y, lr, n))
    recorder = Recorder(model, probes=["attn_out"], layers=[0])

    def record(tokens, condition):
        batch, pos = tokens.shape[:2]
        segments = torch.cat(
            [torch.arange(1, pos).expand(batch, -1), torch.full((batch, 1), QUERY_SEGMENT)], dim=1
        )
        prompts = EncodedPrompts(
            torch.zeros(batch, pos, dtype=torch.long),
            torch.ones(batch, pos, dtype=torch.long),
            segments,
            torch.full((batch,), pos - 1),
        )
        with recorder.attach(prompts, condition):
            model(tokens)
        return recorder.recording(condition)["attn_out"][0]  # [T, d]

    h_icl = record(build_tokens(xc, yc, xq), "icl")
    h_zsl = record(build_tokens(xc[:, :0], yc[:, :0], xq), "zsl")
    dw = gd_step(xc, yc, None, lr)
    h_gd = h_zsl + embed_y(-torch.einsum("tox,tx->to", dw, xq), d_x)
    assert torch.allclose(h_icl - h_zsl, h_gd - h_zsl, atol=1e-5)
    simaou = metrics.delta_cosine(h_icl, h_gd, h_zsl)
    assert torch.allclose(simaou, torch.ones_like(simaou), atol=1e-5)
    assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())
