"""The straightforward reference protocol the engine is benchmarked against.

Written the way the published code works (Dai et al. 2023's scripts): for each demonstration
set, copy the model (`copy.deepcopy`), fine-tune its K and V projections with
`torch.optim.SGD` on the demonstrations one at a time, then for each query, one at a time,
run the full `run_with_cache` for ZSL, ICL and GD and compute the metrics from those caches.
No batching, no shared prefix, every activation of every layer cached.

The metrics are the same functions the engine uses (`iclgd_lens.engine.metrics`) and the rows have
the engine's tidy layout (metric, comparison, layer, head, episode, query, value), so the two
tables can be merged and compared number by number:

    table = reference_compare(model, task, episodes, lr=1e-2)

Computed: SimAOU raw and normalised (layer level from the attention output, per head from z),
SimAM before / after / delta on the query's own tokens (per head, and the head mean as
head -1), accuracy and accuracy over the vocabulary, Rec2FTP, and the output-distribution
comparisons (token overlap, overlap cosine, KL, JS) that `compare` always adds. This is the
set `compare(..., baselines=False, artifacts=False, probes=["attn_out", "head_out", "scores"])`
produces.
"""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from iclgd_lens.engine import metrics
from iclgd_lens.tasks import QUERY_SEGMENT, Episode, Task, encode_prompts, label_token_ids

COLUMNS = ["metric", "comparison", "layer", "head", "episode", "query", "value"]


def finetune_kv(model, tokenizer, task: Task, episode: Episode, lr: float):
    """A deep copy of `model` whose W_K, W_V (every layer) took one SGD step per demonstration,
    in prompt order, on the causal-LM loss over every demonstration token (Dai's setting)."""
    tuned = copy.deepcopy(model)
    for p in tuned.parameters():
        p.requires_grad_(False)
    kv = []
    for layer in range(tuned.cfg.n_layers):
        for name in ("k", "v"):
            weight = tuned.get_submodule(f"blocks.{layer}.attn.{name}").original_component.weight
            kv.append(weight.requires_grad_(True))
    optimizer = torch.optim.SGD(kv, lr=lr, momentum=0.0, weight_decay=0.0)
    for demo in episode.demos:
        ids = tokenizer(task.render_demo(demo, episode.label_words), return_tensors="pt")["input_ids"].to(
            kv[0].device
        )  # [1, pos]
        logits = tuned(ids)  # [1, pos, vocab]
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for p in kv:
        p.requires_grad_(False)
    return tuned


def read_out(cache, logits: torch.Tensor, encoded, n_layers: int) -> dict[str, torch.Tensor]:
    """What the metrics need from one full cache of one prompt, read at its read position."""
    read = int(encoded.read_pos[0])
    query_keys = (encoded.segments[0] == QUERY_SEGMENT).nonzero().squeeze(-1)  # [n_query_tokens]
    attn_out = torch.stack(
        [cache[f"blocks.{l}.hook_attn_out"][0, read] for l in range(n_layers)]
    )  # [L, d_model]
    head_out = torch.stack(
        [cache[f"blocks.{l}.attn.hook_z"][0, read] for l in range(n_layers)]
    )  # [L, H, d_head]
    scores = torch.stack(
        [cache[f"blocks.{l}.attn.hook_attn_scores"][0, :, read, query_keys] for l in range(n_layers)]
    )  # [L, H, n_query_tokens]
    return {
        "attn_out": attn_out,
        "head_out": head_out,
        "scores": scores.float(),
        "logits": logits[0, read],
    }  # logits [vocab]


def query_rows(
    zsl: dict, icl: dict, gd: dict, label: int, label_ids: list[int], episode: int, query: int
) -> tuple[list[tuple], dict[str, bool]]:
    """Every metric of one query as tidy tuples, and whether ZSL / ICL / GD got it right."""
    rows: list[tuple] = []

    def per_layer(metric, comparison, values):  # values [L]
        rows.extend((metric, comparison, l, -1, episode, query, float(v)) for l, v in enumerate(values))

    def per_head(metric, comparison, values):  # values [L, H]
        rows.extend(
            (metric, comparison, l, h, episode, query, float(values[l, h]))
            for l in range(values.shape[0])
            for h in range(values.shape[1])
        )

    for fn, metric in ((metrics.delta_cosine, "simaou"), (metrics.simaou_norm, "simaou_norm")):
        per_layer(metric, "icl~gd", fn(icl["attn_out"], gd["attn_out"], zsl["attn_out"]))
        per_head(metric, "icl~gd", fn(icl["head_out"], gd["head_out"], zsl["head_out"]))
    m_icl, m_gd, m_zsl = icl["scores"], gd["scores"], zsl["scores"]
    for metric, comparison, value in (
        ("simam_before", "icl~zsl", metrics.cosine(m_icl, m_zsl)),
        ("simam_after", "icl~gd", metrics.cosine(m_icl, m_gd)),
        ("simam_delta", "icl~gd", metrics.cosine(m_icl - m_zsl, m_gd - m_zsl)),
    ):
        per_head(metric, comparison, value)
        per_layer(metric, comparison, np.nanmean(value.numpy(), axis=-1))

    label_t = torch.tensor([label])
    correct = {}
    for name, rec in (("zsl", zsl), ("icl", icl), ("gd", gd)):
        correct[name] = bool(metrics.label_correct(rec["logits"][label_ids][None], label_t)[0])
        rows.append(("accuracy", name, -1, -1, episode, query, float(correct[name])))
        rows.append(
            (
                "accuracy_vocab",
                name,
                -1,
                -1,
                episode,
                query,
                float(int(rec["logits"].argmax()) == label_ids[label]),
            )
        )
    logp = {
        name: F.log_softmax(rec["logits"].float(), -1)
        for name, rec in (("zsl", zsl), ("icl", icl), ("gd", gd))
    }
    for comparison, (a, b) in {
        "icl~gd": ("icl", "gd"),
        "gd~zsl": ("gd", "zsl"),
        "icl~zsl": ("icl", "zsl"),
    }.items():
        p1, p2 = logp[a].exp(), logp[b].exp()
        for metric, value in (
            ("token_overlap", metrics.token_overlap(p1, p2, 10)),
            ("overlap_cosine", metrics.overlap_cosine(p1, p2, 10)),
            ("kl", metrics.kl(logp[a], logp[b])),
            ("js", metrics.js(logp[a], logp[b])),
        ):
            rows.append((metric, comparison, -1, -1, episode, query, float(value)))
    return rows, correct


def reference_compare(model, task: Task, episodes: list[Episode], *, lr: float) -> pd.DataFrame:
    """The reference protocol over `episodes`: one tidy table with the engine's layout."""
    tokenizer = model.tokenizer
    n_layers = model.cfg.n_layers
    device = next(model.parameters()).device
    rows: list[tuple] = []
    for e, episode in enumerate(episodes):
        tuned = finetune_kv(model, tokenizer, task, episode, lr)
        label_ids = label_token_ids(tokenizer, episode.label_words)
        correct = {"zsl": [], "icl": [], "gd": []}
        for q, query in enumerate(episode.queries):
            zsl_enc = encode_prompts(tokenizer, task, [()], [query], [episode.label_words]).to(device)
            icl_enc = encode_prompts(tokenizer, task, [episode.demos], [query], [episode.label_words]).to(
                device
            )
            with torch.no_grad():
                zsl = read_out(*_run_with_cache(model, zsl_enc), zsl_enc, n_layers)
                icl = read_out(*_run_with_cache(model, icl_enc), icl_enc, n_layers)
                gd = read_out(*_run_with_cache(tuned, zsl_enc), zsl_enc, n_layers)
            query_table, query_correct = query_rows(zsl, icl, gd, query.label, label_ids, e, q)
            rows += query_table
            for name in correct:
                correct[name].append(query_correct[name])
        score = metrics.rec2ftp(*(torch.tensor(correct[name]) for name in ("zsl", "icl", "gd")))
        rows.append(("rec2ftp", "icl~gd", -1, -1, e, -1, score))
        del tuned
    return pd.DataFrame(rows, columns=COLUMNS)


def _run_with_cache(model, encoded) -> tuple:
    """Full forward pass of one prompt with every activation cached -> (cache, logits)."""
    logits, cache = model.run_with_cache(encoded.input_ids)  # one unpadded prompt: no mask needed
    return cache, logits
