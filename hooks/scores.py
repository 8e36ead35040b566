"""Probes of the attention map of the read position: SimAM and Kendall's inputs."""

from __future__ import annotations

import torch

from iclgd_lens.hooks import ReadContext, probe
from iclgd_lens import QUERY_SEGMENT


def query_token_slots(segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row, the key positions of the query's own tokens, left-aligned.

    Returns (positions [batch, width], valid [batch, width]) where width is the largest
    number of query tokens in the batch; invalid slots point at position 0.
    """
    is_query = segments == QUERY_SEGMENT  # [batch, key_pos]
    width = int(is_query.sum(-1).max())
    order = torch.argsort((~is_query).to(torch.int8), dim=-1, stable=True)[:, :width]  # query positions first, in order
    valid = torch.gather(is_query, 1, order)
    return torch.where(valid, order, torch.zeros_like(order)), valid


@probe("scores", points=["blocks.{layer}.attn.hook_attn_scores"])
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
    positions, valid = query_token_slots(ctx.segments)
    picked = torch.gather(row, 2, positions[:, None, :].expand(-1, row.shape[1], -1))  # [batch, n_heads, width]
    out = {"scores": picked.masked_fill(~valid[:, None, :], float("nan"))}
    if ctx.condition == "icl":
        out["demo_scores"] = row.sum(1).masked_fill(~(ctx.segments > 0), float("nan"))  # [batch, key_pos]
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
