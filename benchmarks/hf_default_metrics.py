"""Alternative C doing every metric of the default `compare()`, in plain HF transformers.

`alternative(..., variant="C", metrics="default")` (benchmarks/hf_alternatives.py) runs
`default_pipeline`: C's pipeline (GD of all demo sets in lockstep through a batched-weight K/V
linear, the demonstrations once per demo set through HF's KV cache, queries batched) with
`DefaultHooks`, which keep at the read position what compare()'s other default probes need
(query vectors, resid_out, sum v k^T over the context, the pattern row over the demonstrations),
and q_proj's output of the demonstrations' pass and of GD's training steps. Besides C's rows
(`episode_rows`), `default_rows` adds, from the shared `iclgd_lens.engine.metrics` functions:

- dW (Dai's dual form): `dw_cos` = Frobenius cosine of dW_ICL = sum v k^T over the demonstration
  tokens (from the prefix's KV cache) with dW_GD = the change of sum v k^T over the query's context
  under GD (icl~gd) or the random update (icl~random_update), per KV head; `dw_action_cos` = cosine
  of dW_ICL q and dW_GD q for ICL's rotary read query, per query head;
- `dual_form_cos` / `dual_form_rel_err`: dW_ICL q against ICL's head-output update h_ICL - h_ZSL;
- Dai's Kendall (`kendall_token`, `kendall_example`; icl~gd, icl~random): ICL's pre-softmax scores
  over the demonstration tokens summed over heads, softmaxed, against GD's read query dotted with
  the queries of GD's training tokens as GD saw them (/ sqrt(d_head) each), softmaxed; summed per
  demonstration at the example level;
- the per-head Kendall (`kendall_token_per_head`, `kendall_example_per_head`): ICL's pattern on the
  demonstration tokens against GD's read query dotted with the demonstration tokens' queries of
  the demonstrations' pass;
- `probe:resid_out`: delta cosines of each block's output at the read position (icl~gd, icl~icl_perm,
  icl~random_update, icl~random).

The random draws use the engine's seeds (seed + episode for the Kendall noise and the random
vectors). Nothing here imports the engine's pipeline (table, record, compare, gd) or the probes.
"""

from __future__ import annotations

import math

import torch
from hf_alternatives import (
    DefaultHooks,
    Rows,
    Swapped,
    _demo_ids,
    _rows,
    _run,
    episode_rows,
    lockstep_deltas,
    random_update_like,
    shared_prefix_len,
)

from iclgd_lens.engine import metrics
from iclgd_lens.tasks import Episode, encode_prompts, label_token_ids, permuted_demos


def default_pipeline(hf, tokenizer, task, episodes: list[Episode], variant, lr, baselines, seed):
    """C's pipeline with every default metric: the rows of `compare(probes=None)` on this model
    (the untrained baseline is run by `alternative` on its copy)."""
    if variant != "C":
        raise ValueError("the default metrics are written for variant C")
    rows = Rows()
    with torch.no_grad(), DefaultHooks(hf) as hooks:
        steps: list[torch.Tensor] = []
        with torch.enable_grad():
            deltas = lockstep_deltas(hf, tokenizer, task, episodes, lr, queries=steps)
        train = train_queries(steps, [_demo_ids(tokenizer, task, e) for e in episodes], hf.config.head_dim)
        queries = [q for e in episodes for q in e.queries]
        words = [e.label_words for e in episodes for _ in e.queries]
        enc = encode_prompts(tokenizer, task, [()] * len(queries), queries, words)
        hooks.context = enc.attention_mask.bool()  # query alone: sum v k^T over the context
        with Swapped(hf, deltas):
            gd_all = _run(hf, hooks, enc)
        random_all = None
        if "random_update" in baselines:
            with Swapped(hf, random_update_like(deltas, seed + 1)):
                random_all = _run(hf, hooks, enc)
        zsl_cache: dict = {}
        start = 0
        for e, episode in enumerate(episodes):
            n = len(episode.queries)
            key = (episode.queries, episode.label_words)
            if key not in zsl_cache:  # the same queries in every set: ZSL once
                zsl_enc = encode_prompts(
                    tokenizer, task, [()] * n, list(episode.queries), [episode.label_words] * n
                )
                hooks.context = zsl_enc.attention_mask.bool()
                zsl_cache[key] = _run(hf, hooks, zsl_enc)
            hooks.context = None
            rec = {"zsl": zsl_cache[key], "gd": _rows(gd_all, start, start + n)}
            if random_all is not None:
                rec["gd_random"] = _rows(random_all, start, start + n)
            prefix, rec["icl"] = icl_with_prefix(hf, hooks, tokenizer, task, episode, episode.demos)
            if "icl_perm" in baselines and len(episode.demos) > 1:
                demos = permuted_demos(episode.demos, seed + 1000 + e)
                _, rec["icl_perm"] = icl_with_prefix(hf, hooks, tokenizer, task, episode, demos, full=False)
            start += n
            labels = torch.tensor([q.label for q in episode.queries])
            label_ids = label_token_ids(tokenizer, episode.label_words)
            episode_rows(rec, labels, label_ids, e, baselines, seed + e, rows)
            default_rows(rec, prefix, *train[e], seed + e, baselines, rows)
    return rows.frame()


def icl_with_prefix(hf, hooks: DefaultHooks, tokenizer, task, episode: Episode, demos, full: bool = True):
    """ICL of one demo set: the demonstrations once through HF's KV cache, the queries batched on
    it. Returns (prefix: rotary keys `k`, values `v` [L, P, KV, d], pre-rotary queries `q`
    [L, P, H, d] and `segments` [P] of the demonstrations' pass; query recording, with the pattern
    row over the demonstrations and its `segments` [B, T] where `full`)."""
    n = len(episode.queries)
    enc = encode_prompts(tokenizer, task, [demos] * n, list(episode.queries), [episode.label_words] * n)
    prefix_len = shared_prefix_len(enc)
    hooks.full_q = full
    try:
        out = hf.model(input_ids=enc.input_ids[:1, :prefix_len], use_cache=True)
    finally:
        hooks.full_q = False
    cache = out.past_key_values
    prefix = {}
    if full:
        d = hf.config.head_dim
        prefix = {
            "k": torch.stack([layer.keys[0].transpose(0, 1) for layer in cache.layers]),  # [L, P, KV, d]
            "v": torch.stack([layer.values[0].transpose(0, 1) for layer in cache.layers]),
            "q": hooks.take()["q_full"][:, 0].unflatten(-1, (-1, d)),  # [L, P, H, d]
            "segments": enc.segments[0, :prefix_len],
        }
        allowed = enc.attention_mask.bool() & (torch.arange(enc.input_ids.shape[1]) <= enc.read_pos[:, None])
        hooks.demos = (enc.segments, allowed)
    cache.batch_repeat_interleave(n)
    try:
        rec = _run(hf, hooks, enc, offset=prefix_len, cache=cache)
    finally:
        hooks.demos = None
    rec["segments"] = enc.segments
    return prefix, rec


def train_queries(
    steps: list[torch.Tensor], demos: list[list[list[int]]], d_head: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per demo set: the queries of GD's training tokens as GD saw them, BOS left out, in
    demonstration order ([L, n_tokens, H, d]), and each token's demonstration 1..k ([n_tokens]).
    `steps[t]`: q_proj's output at step t [L, sets, pos, H * d] (step t trains on demonstration t)."""
    out = []
    for e, ids in enumerate(demos):
        q = torch.cat([steps[t][:, e, 1 : len(ids[t])] for t in range(len(ids))], dim=1)
        demo = torch.cat([torch.full((len(ids[t]) - 1,), t + 1) for t in range(len(ids))])
        out.append((q.unflatten(-1, (-1, d_head)), demo))
    return out


def _dw_q(dw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """dW q per query head under GQA (query head h reads KV head h // (H / KV)):
    dw [..., KV, d (v), d (k)], q [..., H, d] -> [..., H, d]."""
    grouped = q.unflatten(-2, (dw.shape[-3], -1))  # [..., KV, H / KV, d]
    return torch.einsum("...xvk,...xgk->...xgv", dw, grouped).flatten(-3, -2)


def default_rows(rec: dict, prefix: dict, train_q, train_demo, seed: int, baselines, rows: Rows) -> Rows:
    """The rows of the default probes beyond C's benchmark set, for one demo set (see the module
    docstring), added to `rows` (its episode set by the caller). rec: condition -> recording
    ([L, B, ...] per name); prefix: `icl_with_prefix`'s; train_q [L, n_tokens, H, d] and train_demo
    [n_tokens]: `train_queries`'."""
    zsl, icl, gd = rec["zsl"], rec["icl"], rec["gd"]
    others = {"icl~icl_perm": rec.get("icl_perm"), "icl~random_update": rec.get("gd_random")}
    rot_q = icl["rot_q"].float()  # [L, B, H, d]

    # Dai's dual form: dW_ICL over X' (the prefix from its first demonstration token on: the
    # demonstrations and their separators, no BOS) vs dW_GD over the query's context
    seg = prefix["segments"]  # (a prefix always holds demonstrations: C runs no k = 0)
    assert bool((seg > 0).any()), "the demonstrations' prefix holds no demonstration"
    added = torch.arange(seg.shape[-1]) >= int((seg > 0).long().argmax(-1).min())
    dw_icl = metrics.implicit_dw_icl(prefix["k"], prefix["v"], added.expand_as(seg))[
        :, None
    ]  # [L, 1, KV, d, d]
    for comparison, other in {"icl~gd": gd, "icl~random_update": rec.get("gd_random")}.items():
        if other is None:
            continue
        dw = other["kv_context"] - zsl["kv_context"]  # [L, B, KV, d, d]
        rows.add("dw_cos", comparison, metrics.matrix_cosine(dw_icl.expand_as(dw), dw), True)
        rows.add("dw_action_cos", comparison, metrics.cosine(_dw_q(dw_icl, rot_q), _dw_q(dw, rot_q)), True)
    cos = metrics.cosine(_dw_q(dw_icl, rot_q), (icl["head_out"] - zsl["head_out"]).float())
    rows.add("dual_form_cos", "icl~dual_form", cos, True)
    rows.add("dual_form_rel_err", "icl~dual_form", torch.sqrt(torch.clamp(1 - cos**2, min=0)), True)

    # Dai's Kendall: ICL's softmaxed scores over the demonstration tokens vs GD's query . training queries
    segments = icl["segments"][0]  # [T]: every row holds the same demonstrations
    icl_demo = segments[segments > 0]  # demonstration of each ICL demonstration token
    p_icl = torch.softmax(icl["demo_scores"][..., segments > 0], -1)  # [L, B, n_icl]
    scale = math.sqrt(gd["q"].shape[-1])
    q_gd = gd["q"].float().flatten(-2) / scale  # [L, B, H * d]
    p_gd = metrics.query_key_dots(q_gd, train_q.float().flatten(-2) / scale, softmax=True)  # [L, B, n_train]
    k = int(icl_demo.max())
    same_tokens = torch.equal(
        torch.bincount(icl_demo, minlength=k + 1), torch.bincount(train_demo, minlength=k + 1)
    )
    token = metrics.kendall_tau_b(p_icl, p_gd) if same_tokens else torch.full(p_icl.shape[:2], float("nan"))
    rows.add("kendall_token", "icl~gd", token, False)
    mass_icl = metrics.demo_attention_mass(p_icl, icl_demo, k)  # [L, B, k]
    mass_gd = metrics.demo_attention_mass(p_gd, train_demo, k)
    rows.add("kendall_example", "icl~gd", metrics.kendall_tau_b(mass_icl, mass_gd), False)
    if "random" in baselines:
        noise = torch.rand(p_icl.shape, generator=torch.Generator().manual_seed(seed))
        rows.add("kendall_token", "icl~random", metrics.kendall_tau_b(p_icl, noise), False)
        mass_noise = metrics.demo_attention_mass(noise, icl_demo, k)
        rows.add("kendall_example", "icl~random", metrics.kendall_tau_b(mass_icl, mass_noise), False)

    # per head: ICL's pattern on the demonstration tokens vs GD's query . their queries in the ICL pass
    seg = prefix["segments"]  # [P]
    mass = icl["demo_attention"][..., : len(seg)]  # [L, B, H, P]
    dots = metrics.query_key_dots(gd["q"].float().transpose(1, 2), prefix["q"].float().transpose(1, 2))
    dots = dots.transpose(1, 2)  # [L, B, H, P]
    on = seg > 0
    rows.add("kendall_token_per_head", "icl~gd", metrics.kendall_tau_b(mass[..., on], dots[..., on]), True)
    example = metrics.kendall_tau_b(
        metrics.demo_attention_mass(mass, seg), metrics.demo_attention_mass(dots, seg)
    )
    rows.add("kendall_example_per_head", "icl~gd", example, True)
    if "random" in baselines:
        noise = torch.rand(mass[..., on].shape, generator=torch.Generator().manual_seed(seed))
        rows.add("kendall_token_per_head", "icl~random", metrics.kendall_tau_b(mass[..., on], noise), True)

    # resid_out: each block's output at the read position, as delta cosines
    for comparison, other in {"icl~gd": gd, **others}.items():
        if other is not None:
            cos = metrics.delta_cosine(
                icl["resid_out"].float(), other["resid_out"].float(), zsl["resid_out"].float()
            )
            rows.add("probe:resid_out", comparison, cos, None)
    if "random" in baselines:
        r = torch.rand(icl["resid_out"].shape, generator=torch.Generator().manual_seed(seed))
        cos = metrics.simaou_random(icl["resid_out"].float(), zsl["resid_out"].float(), r)
        rows.add("probe:resid_out", "icl~random", cos, None)
    return rows
