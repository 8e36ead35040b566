"""Probes of the attention output at the read position: the quantity SimAOU compares."""

from __future__ import annotations

import torch
from iclgd_lens.hooks import ReadContext, probe


@probe("attn_out", points=["blocks.{layer}.hook_attn_out"], compare=False)
def attn_out(acts: dict[str, torch.Tensor], ctx: ReadContext) -> dict[str, torch.Tensor]:
    """Attention-layer output (after W_O, before the residual add) at the read position."""
    if ctx.condition == "icl_prefix":
        return {}
    out = acts["hook_attn_out"]  # [batch, pos, d_model]
    return {"attn_out": out[ctx.batch_index, ctx.read_pos]}  # [batch, d_model]


@probe("head_out", points=["blocks.{layer}.attn.hook_z"], compare=False)
def head_out(acts: dict[str, torch.Tensor], ctx: ReadContext) -> dict[str, torch.Tensor]:
    """Per-head attention output z (before W_O) at the read position."""
    if ctx.condition == "icl_prefix":
        return {}
    z = acts["attn.hook_z"]  # [batch, pos, n_heads, d_head]
    return {"head_out": z[ctx.batch_index, ctx.read_pos]}  # [batch, n_heads, d_head]
