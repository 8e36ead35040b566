"""What the report draws for one example (episode 0, query 0): attention patterns of ZSL, ICL
and GD, dW_ICL and dW_GD per layer with their cosine, and the tokens whose probabilities move most."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from iclgd_lens.engine import metrics
from iclgd_lens.engine.gd import Deltas, delta_hooks
from iclgd_lens.engine.record import Recorder
from iclgd_lens.tasks import Episode, Task, encode_prompts, readable_tokens


def example_artifacts(
    model,
    task: Task,
    episode: Episode,
    deltas: Deltas,
    episode_index: int = 0,
    max_tokens: int = 48,
    max_heads: int = 8,
    max_dim: int = 32,
) -> dict:
    """What the report draws for one example (query 0 of `episode`): attention patterns of ZSL,
    ICL and GD, dW_ICL and dW_GD per layer, and the tokens whose probabilities move most.
    `deltas` are the comparison's own GD deltas (`train_deltas` of every episode), of which row
    `episode_index` belongs to `episode`: GD is not run again for the example."""
    from iclgd_lens.hooks import Probe, get_probes

    tokenizer = model.tokenizer
    device = next(model.parameters()).device
    query = episode.queries[0]
    full_pattern = Probe(
        "pattern",
        ("blocks.{layer}.attn.hook_pattern",),
        lambda acts, ctx: {"pattern": acts["attn.hook_pattern"]},
    )  # [1, H, q, k]
    recorder = Recorder(model, [full_pattern, *get_probes(["kv_outer"])])
    zsl = encode_prompts(tokenizer, task, [()], [query], [episode.label_words]).to(device)
    icl = encode_prompts(tokenizer, task, [episode.demos], [query], [episode.label_words]).to(device)
    rows = torch.full((1,), episode_index, dtype=torch.long, device=device)
    runs = {
        "zsl": (zsl, recorder.run(zsl, "zsl")),
        "icl": (icl, recorder.run(icl, "icl")),
        "gd": (zsl, recorder.run(zsl, "gd", interventions=delta_hooks(deltas, rows))),
    }
    attention = {}
    for condition, (enc, rec) in runs.items():
        n = int(enc.lengths[0])
        start = max(0, n - max_tokens)
        tokens = readable_tokens(tokenizer, enc.input_ids[0, start:n].tolist())
        pattern = rec["pattern"][:, 0, :max_heads, start:n, start:n].float()  # [L, H, q, k]
        attention[condition] = {
            str(l): {"tokens": tokens, "pattern": _rounded(pattern[l])} for l in range(pattern.shape[0])
        }
    dw_icl = runs["icl"][1]["kv_demo"][:, 0]  # [L, n_kv, d, d]
    gd_rec, zsl_rec = runs["gd"][1], runs["zsl"][1]
    p_gd, k_gd = metrics.dw_difference_factors(
        gd_rec["kv_context_k"], gd_rec["kv_context_v"], zsl_rec["kv_context_k"], zsl_rec["kv_context_v"]
    )
    dw_gd = torch.einsum("ltxv,ltxk->lxvk", p_gd[:, 0], k_gd[:, 0]).float()  # [L, n_kv, d, d]
    dw = {
        str(l): {
            "icl": _rounded(_pooled(dw_icl[l, :max_heads], max_dim)),
            "gd": _rounded(_pooled(dw_gd[l, :max_heads], max_dim)),
            "cos": metrics.matrix_cosine(dw_icl[l], dw_gd[l]).tolist(),
        }
        for l in range(dw_icl.shape[0])
    }
    p = {c: F.softmax(r.logits[0].float(), -1) for c, (_, r) in runs.items()}
    d_icl, d_gd = p["icl"] - p["zsl"], p["gd"] - p["zsl"]
    top = torch.topk(d_icl.abs() + d_gd.abs(), 15).indices.tolist()
    top_tokens = [
        {"token": token, "d_icl": float(d_icl[i]), "d_gd": float(d_gd[i])}
        for i, token in zip(top, readable_tokens(tokenizer, top))
    ]
    example = {
        "icl_prompt": icl.texts[0],
        "zsl_prompt": zsl.texts[0],
        "label": episode.label_words[query.label],
    }
    return {"attention": attention, "dw": dw, "top_tokens": top_tokens, "example": example}


def _pooled(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool the last two dims down to at most size x size (7B heads are 128 x 128)."""
    if x.shape[-1] <= size:
        return x
    return F.adaptive_avg_pool2d(x.float(), (size, size))


def _rounded(x: torch.Tensor, digits: int = 4) -> list:
    return np.round(x.detach().float().cpu().numpy(), digits).tolist()
