"""Probes of queries, keys and values: the dual form's implicit update and Kendall's GD side.

Dai et al.'s dual form (linear attention, per head): the demonstrations, with their separators
(every token the ICL prompt adds), add dW_ICL = sum_i v_i k_i^T to the zero-shot weights
W_ZSL = sum_j v_j k_j^T over the query's context tokens. GD changes W_K, W_V, so its implicit
update is dW_GD = sum_j v_j^GD k_j^GD^T - sum_j v_j k_j^T over the same context tokens: a few
tokens, so it is kept as those tokens' keys and values (its factors), not as a d_head x d_head
matrix per row. Keys are post-rotary (`hook_rot_k`), as the real attention sees them; under GQA
there are n_kv heads.
"""

from __future__ import annotations

import torch
from iclgd_lens.hooks import ReadContext, probe

from iclgd_lens import IclgdError, added_context_mask, metrics


@probe(
    "kv_outer",
    points=["blocks.{layer}.attn.hook_rot_k", "blocks.{layer}.attn.hook_v"],
    compare=False,
)
def kv_outer(acts: dict[str, torch.Tensor], ctx: ReadContext) -> dict[str, torch.Tensor]:
    """sum v k^T over this pass's tokens of X' (`kv_demo`, = dW_ICL: the demonstrations and their
    separators, `tasks.added_context_mask`) and, in
    the query-alone conditions, the keys and values of the context tokens up to the read
    position (`kv_context_k`, `kv_context_v`, other positions zero), the factors of their
    sum v k^T: dW_GD is the difference of two such sums (`metrics.dw_difference_factors`)."""
    k = acts["attn.hook_rot_k"].float()  # [batch, pos, n_kv, d_head] (this pass's positions)
    v = acts["attn.hook_v"].float()
    seg = ctx.pass_segments  # [batch, pos]
    added = added_context_mask(ctx.segments, ctx.attention_mask)  # [batch, key_pos]
    out = {}
    if ctx.prefix_len > 0 and bool(added[:, ctx.prefix_len :].any()):
        raise IclgdError(  # dW_ICL is read from the shared prefix alone: all of X' must lie in it
            "the separator before the query tokenises differently before some queries (it merges "
            "into the query's first token in some prompts), so the tokens the demonstrations add "
            "differ between queries of one episode and dW_ICL is not one matrix; use a separator "
            "that tokenises on its own (e.g. '\\n'), or compare(..., share_prefix=False) (no dW metrics)"
        )
    if ctx.prefix_len == 0 and bool(added.any()):
        out["kv_demo"] = metrics.implicit_dw_icl(k, v, added)  # [batch, n_kv, d_head (v), d_head (k)]
    if ctx.condition not in ("icl", "icl_prefix"):
        positions = torch.arange(seg.shape[1], device=seg.device)
        mask = ctx.attention_mask[:, ctx.prefix_len :].bool() & (positions[None] <= ctx.read_pos[:, None])
        keep = mask[:, :, None, None]  # in the model's own dtype: exactly the keys and values attention used
        out["kv_context_k"] = acts["attn.hook_rot_k"] * keep  # [batch, pos, n_kv, d_head]
        out["kv_context_v"] = acts["attn.hook_v"] * keep
    return out


@probe(
    "query_vectors", points=["blocks.{layer}.attn.hook_q", "blocks.{layer}.attn.hook_rot_q"], compare=False
)
def query_vectors(acts: dict[str, torch.Tensor], ctx: ReadContext) -> dict[str, torch.Tensor]:
    """The query vector of the read position (`q`, pre-rotary; `rot_q`, post-rotary) and,
    where this pass holds demonstrations, the pre-rotary queries of their tokens (`q_demo`)."""
    q = acts["attn.hook_q"]  # [batch, pos, n_heads, d_head]
    out = {}
    seg = ctx.pass_segments
    if ctx.condition != "icl_prefix":
        out["q"] = q[ctx.batch_index, ctx.read_pos]  # [batch, n_heads, d_head]
        out["rot_q"] = acts["attn.hook_rot_q"][ctx.batch_index, ctx.read_pos]
    if bool((seg > 0).any()):
        out["q_demo"] = q * (seg > 0)[:, :, None, None].to(q.dtype)  # [batch, pos, n_heads, d_head]
    return out
