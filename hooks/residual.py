"""Probe of the residual stream at the read position, after each block."""

from __future__ import annotations

import torch
from iclgd_lens.hooks import ReadContext, probe


@probe("resid_out", points=["blocks.{layer}.hook_resid_post"])
def resid_out(acts: dict[str, torch.Tensor], ctx: ReadContext) -> dict[str, torch.Tensor]:
    """Residual stream after the block at the read position."""
    if ctx.condition == "icl_prefix":
        return {}
    resid = acts["hook_resid_post"]  # [batch, pos, d_model]
    return {"resid_out": resid[ctx.batch_index, ctx.read_pos]}  # [batch, d_model]
