"""The von Oswald et al. (2023) ground truth: one linear self-attention layer that *is* a GD step.

A model where ICL equals GD exactly, so every comparison in iclgd-lens can be checked against
a case whose answer is known (docs/science.md, section 5). Tokens are e_j = (x_j, y_j) for the N
context pairs and e_{N+1} = (x_test, 0) for the query. One layer

    e_j <- e_j + P W_V (sum_i e_i e_i^T) W_K^T W_Q e_j        (keys and values: context only)

with the hand-built weights of `hand_built_weights` turns the query's y-entry into -dW x_test,
where dW is one GD step on L(W) = 1/(2N) sum_i |W x_i - y_i|^2 from W0 (`gd_step`).

`LinearSelfAttention` carries HookPoints named like a TransformerBridge's
(`blocks.0.attn.hook_z`, `blocks.0.hook_attn_out`, `blocks.0.attn.k.hook_out`, ...), so the
hook-based recording code written for LLaMA runs on it unchanged: `model.hooks(fwd_hooks=...)`.
"""

from __future__ import annotations

import einops
import torch
from torch import Tensor, nn
from transformer_lens import HookedRootModule
from transformer_lens.hook_points import HookPoint

from iclgd_lens.errors import IclgdError

WEIGHT_NAMES = ("W_K", "W_Q", "W_V", "P")


def hand_built_weights(
    d_x: int,
    d_y: int,
    lr: float,
    n_context: int,
    w0: Tensor | None = None,  # [d_y, d_x]
    gd_plus_plus: bool = False,
    gamma: float = 0.0,
    dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """The weights that make one linear self-attention layer a GD step (von Oswald et al. 2023).

    Returns W_K, W_Q, W_V, P, each [d, d] with d = d_x + d_y, acting on column tokens (x, y):

        W_K = W_Q = [[I_x, 0], [0, 0]]    W_V = [[0, 0], [W0, -I_y]]    P = (lr / N) I

    GD++ (`gd_plus_plus=True`) also transforms the inputs: W_V = [[I_x, 0], [W0, -I_y]] and
    P = [[-gamma I_x, 0], [0, (lr / N) I_y]].
    """
    if d_x < 1 or d_y < 1 or n_context < 1:
        raise IclgdError(f"d_x, d_y and n_context must be >= 1, got {d_x}, {d_y}, {n_context}")
    d = d_x + d_y
    w0 = torch.zeros(d_y, d_x, dtype=dtype) if w0 is None else w0.to(dtype)
    if tuple(w0.shape) != (d_y, d_x):
        raise IclgdError(f"w0 must have shape [d_y, d_x] = [{d_y}, {d_x}], got {list(w0.shape)}")
    w_k = torch.zeros(d, d, dtype=dtype)
    w_k[:d_x, :d_x] = torch.eye(d_x, dtype=dtype)
    w_v = torch.zeros(d, d, dtype=dtype)
    w_v[d_x:, :d_x] = w0
    w_v[d_x:, d_x:] = -torch.eye(d_y, dtype=dtype)
    p = (lr / n_context) * torch.eye(d, dtype=dtype)
    if gd_plus_plus:
        w_v[:d_x, :d_x] = torch.eye(d_x, dtype=dtype)
        p[:d_x, :d_x] = -gamma * torch.eye(d_x, dtype=dtype)
    return {"W_K": w_k, "W_Q": w_k.clone(), "W_V": w_v, "P": p}


def regression_tasks(
    n_tasks: int,
    n_context: int = 10,
    d_x: int = 10,
    d_y: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Linear regression tasks as in von Oswald et al.'s code: x ~ U(-0.5, 0.5)^d_x, W ~ N(0, I).

    Returns (x_context [T, N, d_x], y_context [T, N, d_y], x_query [T, d_x], y_query [T, d_y]),
    drawn from an own torch.Generator (the global random state is not touched).
    """
    if n_tasks < 1 or n_context < 1 or d_x < 1 or d_y < 1:
        raise IclgdError("n_tasks, n_context, d_x and d_y must all be >= 1")
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_tasks, d_y, d_x, generator=gen, dtype=dtype)  # [T, d_y, d_x]
    x = torch.rand(n_tasks, n_context + 1, d_x, generator=gen, dtype=dtype) - 0.5  # [T, N+1, d_x]
    y = torch.einsum("tox,tnx->tno", w, x)  # [T, N+1, d_y]
    return x[:, :-1], y[:, :-1], x[:, -1], y[:, -1]


def build_tokens(
    x_context: Tensor, y_context: Tensor, x_query: Tensor, y_query_init: Tensor | None = None
) -> Tensor:
    """Tokens e_j = (x_j, y_j) for the context and (x_test, y_init) for the query (y_init = 0).

    x_context [T, N, d_x], y_context [T, N, d_y], x_query [T, d_x] -> tokens [T, N+1, d_x+d_y].
    """
    if x_context.shape[:2] != y_context.shape[:2] or x_query.shape[0] != x_context.shape[0]:
        raise IclgdError(
            "x_context [T, N, d_x], y_context [T, N, d_y] and x_query [T, d_x] must agree in T and N"
        )
    if y_query_init is None:
        y_query_init = torch.zeros(x_query.shape[0], y_context.shape[-1], dtype=x_query.dtype)
    context = torch.cat([x_context, y_context], dim=-1)  # [T, N, d]
    query = torch.cat([x_query, y_query_init.to(x_query.dtype)], dim=-1)  # [T, d]
    return torch.cat([context, einops.rearrange(query, "t d -> t 1 d")], dim=1)


def gd_step(x_context: Tensor, y_context: Tensor, w0: Tensor | None, lr: float) -> Tensor:
    """One GD step on L(W) = 1/(2N) sum_i |W x_i - y_i|^2 from W0: dW = -(lr/N) sum_i (W0 x_i - y_i) x_i^T.

    x_context [T, N, d_x], y_context [T, N, d_y], w0 [d_y, d_x] or [T, d_y, d_x] or None (zero)
    -> dW [T, d_y, d_x].
    """
    n = x_context.shape[1]
    if w0 is None:
        residual = -y_context  # [T, N, d_y]
    else:
        residual = torch.einsum("...ox,tnx->tno", w0.to(x_context.dtype), x_context) - y_context
    return -(lr / n) * torch.einsum("tno,tnx->tox", residual, x_context)


def best_gd_lr(x_context: Tensor, y_context: Tensor, x_query: Tensor, y_query: Tensor) -> float:
    """The learning rate of one GD step from W0 = 0 that minimises the mean query loss.

    With W0 = 0 the prediction is lr * a with a = (1/N) sum_i y_i x_i^T x_test, so the
    loss 1/2 mean |y - lr a|^2 is minimised in closed form by lr = <y, a> / <a, a>.
    """
    a = gd_step(x_context, y_context, None, 1.0) @ x_query.unsqueeze(-1)  # [T, d_y, 1]
    a = a.squeeze(-1)  # [T, d_y]
    return float((y_query * a).sum() / (a * a).sum())


def regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """von Oswald's loss: 1/2 squared error summed over outputs, mean over tasks -> scalar."""
    return 0.5 * ((prediction - target) ** 2).sum(-1).mean()


class _Projection(nn.Module):
    """A bias-free linear map e -> W e on tokens, with bridge-style hook_in / hook_out.

    hook_out is reshaped to [batch, pos, heads=1, d] like the bridge's q/k/v outputs.
    """

    def __init__(self, d: int, heads_dim: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(d, d))  # [d_out, d_in]
        self.heads_dim = heads_dim
        self.hook_in = HookPoint()  # [batch, pos, d]
        self.hook_out = HookPoint()  # [batch, pos, 1, d] (heads_dim) or [batch, pos, d]

    def forward(self, x: Tensor) -> Tensor:
        x = self.hook_in(x)
        out = x @ self.weight.T  # [batch, pos, d]
        if self.heads_dim:
            out = einops.rearrange(out, "b p d -> b p 1 d")
        return self.hook_out(out)


class _LinearAttention(nn.Module):
    """Linear attention with one head of size d, keys and values over the context tokens only."""

    def __init__(self, d: int):
        super().__init__()
        self.q = _Projection(d)
        self.k = _Projection(d)
        self.v = _Projection(d)
        self.o = _Projection(d, heads_dim=False)  # P
        self.hook_q = HookPoint()  # [batch, pos, 1, d]
        self.hook_k = HookPoint()  # [batch, pos, 1, d]
        self.hook_v = HookPoint()  # [batch, pos, 1, d]
        self.hook_attn_scores = HookPoint()  # [batch, 1, query_pos, key_pos]
        self.hook_pattern = HookPoint()  # [batch, 1, query_pos, key_pos] (unnormalised: linear attention)
        self.hook_z = HookPoint()  # [batch, pos, 1, d]

    def forward(self, tokens: Tensor, n_context: int) -> Tensor:
        q = self.hook_q(self.q(tokens))  # [b, p, 1, d]
        k = self.hook_k(self.k(tokens))
        v = self.hook_v(self.v(tokens))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k)  # [b, 1, q, k]
        scores = self.hook_attn_scores(scores)
        is_context = (torch.arange(tokens.shape[1], device=tokens.device) < n_context).to(scores.dtype)  # [k]
        pattern = self.hook_pattern(scores * is_context)  # non-context keys get weight 0
        z = self.hook_z(torch.einsum("bhqk,bkhd->bqhd", pattern, v))  # [b, p, 1, d]
        return self.o(einops.rearrange(z, "b p h d -> b p (h d)"))  # [b, p, d]


class _Block(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.hook_resid_pre = HookPoint()  # [batch, pos, d]
        self.attn = _LinearAttention(d)
        self.hook_attn_out = HookPoint()  # [batch, pos, d]
        self.hook_resid_post = HookPoint()  # [batch, pos, d]

    def forward(self, tokens: Tensor, n_context: int) -> Tensor:
        resid = self.hook_resid_pre(tokens)
        attn_out = self.hook_attn_out(self.attn(resid, n_context))
        return self.hook_resid_post(resid + attn_out)


class LinearSelfAttention(HookedRootModule):
    """One linear self-attention layer e <- e + P W_V (sum_i e_i e_i^T) W_K^T W_Q e, with hooks.

    Hook names follow the TransformerBridge: `blocks.0.hook_resid_pre`, `blocks.0.attn.{q,k,v,o}.hook_in`
    / `hook_out`, `blocks.0.attn.hook_{q,k,v}`, `blocks.0.attn.hook_attn_scores`,
    `blocks.0.attn.hook_pattern` (the scores with non-context keys zeroed: linear attention has no
    softmax), `blocks.0.attn.hook_z` [b, p, 1, d], `blocks.0.hook_attn_out` [b, p, d] (= P z),
    `blocks.0.hook_resid_post`. One head of size d = d_x + d_y.
    """

    def __init__(self, d_x: int, d_y: int, weights: dict[str, Tensor] | None = None):
        super().__init__()
        self.d_x, self.d_y = d_x, d_y
        self.blocks = nn.ModuleList([_Block(d_x + d_y)])
        if weights is not None:
            self.load_weights(weights)
        self.setup()

    def _projections(self) -> dict[str, _Projection]:
        attn = self.blocks[0].attn
        return {"W_K": attn.k, "W_Q": attn.q, "W_V": attn.v, "P": attn.o}

    def load_weights(self, weights: dict[str, Tensor]) -> None:
        """Copy W_K, W_Q, W_V, P ([d, d] each) into the layer (and adopt their dtype)."""
        d = self.d_x + self.d_y
        missing = [n for n in WEIGHT_NAMES if n not in weights]
        if missing:
            raise IclgdError(f"weights lack {missing}; expected keys {list(WEIGHT_NAMES)}")
        for name, proj in self._projections().items():
            w = weights[name]
            if tuple(w.shape) != (d, d):
                raise IclgdError(f"{name} must have shape [{d}, {d}], got {list(w.shape)}")
            proj.weight.data = w.detach().clone()

    def weights(self) -> dict[str, Tensor]:
        """The current W_K, W_Q, W_V, P (detached copies)."""
        return {name: proj.weight.detach().clone() for name, proj in self._projections().items()}

    def forward(self, tokens: Tensor, n_context: int | None = None) -> Tensor:
        """tokens [batch, pos, d] -> updated tokens [batch, pos, d]. The first `n_context`
        tokens (default: all but the last) are keys and values."""
        if tokens.ndim != 3 or tokens.shape[-1] != self.d_x + self.d_y:
            raise IclgdError(f"tokens must be [batch, pos, {self.d_x + self.d_y}], got {list(tokens.shape)}")
        n_context = tokens.shape[1] - 1 if n_context is None else n_context
        return self.blocks[0](tokens, n_context)


def predict_icl(
    model: LinearSelfAttention,
    x_context: Tensor,
    y_context: Tensor,
    x_query: Tensor,
    w0: Tensor | None = None,
) -> Tensor:
    """The layer's in-context prediction for x_test: minus the query's y-entry after the layer.

    With the hand-built weights and W0 = 0 this is dW x_test. Given `w0` [d_y, d_x], the query
    enters as (x_test, -W0 x_test) so that the prediction is (W0 + dW) x_test. -> [T, d_y].
    """
    y_init = None if w0 is None else -(x_query @ w0.to(x_query.dtype).T)
    out = model(build_tokens(x_context, y_context, x_query, y_init))  # [T, N+1, d]
    return -out[:, -1, model.d_x :]
