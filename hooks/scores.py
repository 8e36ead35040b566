"""Probes of the attention map of the read position: SimAM and Kendall's inputs."""

from __future__ import annotations

import torch
from iclgd_lens.hooks import ReadContext, probe

from iclgd_lens import QUERY_SEGMENT, metrics


@probe("scores", points=["blocks.{layer}.attn.hook_attn_scores"], compare=False)
def scores(acts: dict[str, torch.Tensor], ctx: ReadContext) -> dict[str, torch.Tensor]:
    """Pre-softmax scores of the read position over the query's own tokens (`scores`, Dai's
    SimAM map) and, in the ICL condition, over the demonstration tokens (`demo_scores`, the
    ICL side of Dai's Kendall).

    `scores`: not BOS, not the demonstrations: slot j is the j-th token of the query, so maps
    from the ZSL and ICL prompts line up; missing slots are NaN. `demo_scores`: the row over
    every key position summed over the query heads (as Dai's Kendall sums them), NaN where the
    key is not a demonstration token.
    """
    if ctx.condition == "icl_prefix":
        return {}
    s = acts["attn.hook_attn_scores"]  # [batch, n_heads, q_pos, key_pos]
    row = s[ctx.batch_index, :, ctx.read_pos]  # [batch, n_heads, key_pos]
    out = {
        "scores": metrics.select_keys(row, ctx.segments == QUERY_SEGMENT)[0]
    }  # [batch, n_heads, n_query_tokens]
    if ctx.condition == "icl":
        # summed in float32 (a bf16 model's scores would lose their last digits in a bf16 sum)
        out["demo_scores"] = (
            row.float().sum(1).masked_fill(~(ctx.segments > 0), float("nan"))
        )  # [batch, key_pos]
    return out


@probe("demo_attention", points=["blocks.{layer}.attn.hook_pattern"], compare=False)
def demo_attention(acts: dict[str, torch.Tensor], ctx: ReadContext) -> dict[str, torch.Tensor]:
    """Attention mass the read position puts on each demonstration token (ICL only).

    Returns the pattern row over all key positions with non-demonstration keys zeroed:
    [batch, n_heads, key_pos]; sum it per segment for the example-level Kendall.
    """
    if ctx.condition != "icl":
        return {}
    pattern = acts["attn.hook_pattern"]  # [batch, n_heads, q_pos, key_pos]
    row = pattern[ctx.batch_index, :, ctx.read_pos]  # [batch, n_heads, key_pos]
    return {"demo_attention": row * (ctx.segments > 0)[:, None, :]}
