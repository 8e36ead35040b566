"""What a competent researcher writes in plain HF transformers instead of the engine: the issue's
alternatives A, B and C, producing the engine's tidy rows from the same metric functions.

No TransformerLens and no engine code: only prompt encoding (`iclgd_lens.tasks`) and the shared
metric functions (`iclgd_lens.engine.metrics`). The model is a plain `LlamaForCausalLM` with the
bridge's weights (sdpa attention, HF's own defaults).

- A: per demo set, `copy.deepcopy` + `torch.optim.SGD` on every k_proj/v_proj, one demonstration
  per step; queries batched (ZSL once, ICL full prompts, GD on the tuned copy); forward hooks keep
  only the read position.
- B: A, with the demonstrations run once per demo set and the queries batched on top of HF's KV
  cache (`DynamicCache.batch_repeat_interleave`).
- C: B, with GD of all demo sets in lockstep through a batched-weight K/V linear (one delta
  [n_demo_sets, d_out, d_in] per projection, `torch.optim.SGD`, loss = sum of per-set means).

`alternative(hf, tokenizer, task, episodes, variant="C", lr=..., baselines=...)` returns the table
`compare(..., probes=["attn_out", "head_out", "scores"], baselines=...)` returns (SimAOU raw and
normalised per layer and head, SimAM before/after/delta, accuracy, Rec2FTP, token overlap, overlap
cosine, KL, JS), with Dai's and Deutch et al.'s baselines on request: "random" (a uniform random
vector), "random_update" (GD replaced by a random update of equal norm per projection and set),
"icl_perm" (ICL with the demonstrations in another order) and "untrained" (the whole pipeline on a
copy with attention/MLP weights re-drawn), drawn with the same seeds as the engine so that every
number can be compared. With `metrics="default"` (variant C), every row of the default `compare()`
(all seven probes): benchmarks/hf_default_metrics.py, reading through `DefaultHooks`.
"""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from iclgd_lens.engine import metrics
from iclgd_lens.tasks import QUERY_SEGMENT, Episode, Task, encode_prompts, label_token_ids, permuted_demos

COLUMNS = ["metric", "comparison", "layer", "head", "episode", "query", "value"]
VARIANTS = ("A", "B", "C")


# ---- reading the read position with plain forward hooks -------------------------------------
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotary embedding. x [..., heads, d]; cos, sin [..., d] (broadcast over heads)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)


class ReadHooks:
    """Forward hooks on every attention layer that keep only the read position's attention output
    (`attn_out`, o_proj's output), its per-head output (`head_out`, o_proj's input) and its
    pre-softmax scores over the query's own tokens (`scores`, recomputed from q_proj/k_proj and
    RoPE for those few positions). Set `read` (row positions) and `keys` (positions of the query's
    tokens, padded, with their mask) before each pass."""

    def __init__(self, hf):
        self.cfg = hf.config
        self.layers = hf.model.layers
        self.read: torch.Tensor | None = None  # [B]
        self.keys: tuple[torch.Tensor, torch.Tensor] | None = None  # ([B, n] positions, [B, n] mask)
        self.store: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.handles = []

    def __enter__(self) -> "ReadHooks":
        for attn in (layer.self_attn for layer in self.layers):
            self.handles.append(attn.register_forward_pre_hook(self._scores, with_kwargs=True))
            self.handles.append(attn.o_proj.register_forward_hook(self._outputs))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def take(self) -> dict[str, torch.Tensor]:
        """What the last pass kept, stacked over layers: attn_out [L, B, d_model], head_out
        [L, B, H, d_head], scores [L, B, H, n] (NaN where the query has fewer tokens)."""
        out = {name: torch.stack(values) for name, values in self.store.items()}
        self.store = defaultdict(list)
        return out

    def _scores(self, attn, args, kwargs) -> None:
        if self.read is None:  # a pass that reads nothing (a prefix, a GD step)
            return
        h = kwargs["hidden_states"]  # [B, pos, d_model]
        cos, sin = kwargs["position_embeddings"]  # [B|1, pos, d_head]
        rows = torch.arange(h.shape[0])
        cos, sin = cos.expand(h.shape[0], -1, -1), sin.expand(h.shape[0], -1, -1)
        d = self.cfg.head_dim
        positions, mask = self.keys
        q = attn.q_proj(h[rows, self.read][:, None]).view(len(rows), -1, d)  # [B, H, d] (pre-rotary)
        self.query = (q, _rope(q, cos[rows, self.read], sin[rows, self.read]))  # for DefaultHooks
        q = self.query[1]
        k = attn.k_proj(torch.gather(h, 1, positions[..., None].expand(-1, -1, h.shape[-1])))
        k = k.view(len(rows), positions.shape[1], -1, d)  # [B, n, KV, d]
        pick = lambda t: torch.gather(t, 1, positions[..., None].expand(-1, -1, d))  # noqa: E731
        k = _rope(k, pick(cos), pick(sin))
        k = k.repeat_interleave(q.shape[1] // k.shape[2], dim=2)  # [B, n, H, d]
        scores = torch.einsum("bhd,bnhd->bhn", q, k) * attn.scaling
        self.store["scores"].append(scores.masked_fill(~mask[:, None, :], float("nan")).float())

    def _outputs(self, o_proj, args, out) -> None:
        if self.read is None:
            return
        rows = torch.arange(out.shape[0])
        z = args[0][rows, self.read]  # [B, H * d_head]
        self.store["head_out"].append(z.view(len(rows), -1, self.cfg.head_dim).detach())
        self.store["attn_out"].append(out[rows, self.read].detach())


class DefaultHooks(ReadHooks):
    """ReadHooks plus what compare()'s other default probes need, all at the read position unless
    said: the query vector (`q` pre-rotary, `rot_q`), each decoder layer's output (`resid_out`), and
    per pass on request: `context` (the pass's attention mask [B, pos]): sum v k^T over the tokens up
    to the read position (`kv_context` [L, B, KV, d (v), d (k)], rotary keys recomputed from
    k_proj/v_proj, so a swapped-in GD delta counts); `demos` (segments [B, T] and allowed keys [B, T]
    of a pass on a KV cache): the read row's pre-softmax scores summed over heads (`demo_scores`
    [L, B, T], NaN off the demonstrations) and its pattern (`demo_attention` [L, B, H, T], zero off
    them), from the rotary keys the cache holds after the layer; `full_q`: q_proj's output at every
    position (`q_full` [L, B, pos, H * d], the demonstrations' pass)."""

    def __init__(self, hf):
        super().__init__(hf)
        self.context: torch.Tensor | None = None
        self.demos: tuple[torch.Tensor, torch.Tensor] | None = None
        self.full_q = False

    def __enter__(self) -> "DefaultHooks":
        super().__enter__()  # the read query is computed by ReadHooks' pre-hook, which runs first
        for layer in self.layers:
            attn = layer.self_attn
            self.handles.append(attn.register_forward_pre_hook(self._context, with_kwargs=True))
            self.handles.append(attn.register_forward_hook(self._demo_row, with_kwargs=True))
            self.handles.append(attn.q_proj.register_forward_hook(self._full_q))
            self.handles.append(layer.register_forward_hook(self._resid))
        return self

    def _context(self, attn, args, kwargs) -> None:
        if self.read is None:
            return
        q, rot_q = self.query
        self.store["q"].append(q.detach())
        self.store["rot_q"].append(rot_q.detach())
        if self.context is None:
            return
        h = kwargs["hidden_states"]  # [B, pos, d_model]
        cos, sin = kwargs["position_embeddings"]
        d = self.cfg.head_dim
        k = _rope(attn.k_proj(h).unflatten(-1, (-1, d)), cos, sin)  # [B, pos, KV, d]
        v = attn.v_proj(h).unflatten(-1, (-1, d))
        upto = torch.arange(h.shape[1])[None] <= self.read[:, None]
        self.store["kv_context"].append(metrics.implicit_dw_icl(k, v, self.context & upto).detach())

    def _demo_row(self, attn, args, kwargs, out) -> None:
        if self.read is None or self.demos is None:
            return
        segments, allowed = self.demos
        keys = kwargs["past_key_values"].layers[attn.layer_idx].keys  # [B, KV, T, d], rotary
        rot_q = self.query[1].unflatten(
            1, (keys.shape[1], -1)
        )  # [B, KV, H / KV, d]: head h reads h // (H / KV)
        scores = torch.einsum("bxgd,bxtd->bxgt", rot_q, keys).flatten(1, 2) * attn.scaling  # [B, H, T]
        pattern = torch.softmax(scores.masked_fill(~allowed[:, None], float("-inf")), -1)
        demo = segments > 0
        self.store["demo_scores"].append(scores.sum(1).masked_fill(~demo, float("nan")).float())
        self.store["demo_attention"].append((pattern * demo[:, None]).float())

    def _full_q(self, q_proj, args, out) -> None:
        if self.full_q:
            self.store["q_full"].append(out.detach())

    def _resid(self, layer, args, out) -> None:
        if self.read is None:
            return
        out = out[0] if isinstance(out, tuple) else out
        self.store["resid_out"].append(out[torch.arange(out.shape[0]), self.read].detach())


def _query_keys(enc, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each row's query tokens (left-packed, padded with the first) and their mask."""
    keep = enc.segments == QUERY_SEGMENT
    n = int(keep.sum(-1).max())
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :n]
    mask = torch.gather(keep, 1, order)
    return torch.where(mask, order, order[:, :1]) - offset, mask


def _run(hf, hooks: ReadHooks, enc, *, offset: int = 0, cache=None) -> dict[str, torch.Tensor]:
    """One batched pass with the read hooks; positions of `enc` start at `offset` (a cached prefix)."""
    read = hooks.read = enc.read_pos - offset
    hooks.keys = _query_keys(enc, offset)
    ids = enc.input_ids[:, offset:]
    mask = enc.attention_mask if cache is not None else enc.attention_mask[:, offset:]
    try:
        hidden = hf.model(
            input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=cache is not None
        )
    finally:
        hooks.read = None
    last = hidden.last_hidden_state[torch.arange(len(ids)), read]  # [B, d_model]
    return {**hooks.take(), "logits": hf.lm_head(last).float()}


# ---- the conditions --------------------------------------------------------------------------
def _icl(hf, hooks, tokenizer, task, episode: Episode, demos, shared_prefix: bool) -> dict:
    n = len(episode.queries)
    enc = encode_prompts(tokenizer, task, [demos] * n, list(episode.queries), [episode.label_words] * n)
    if not shared_prefix:
        return _run(hf, hooks, enc)
    prefix_len = shared_prefix_len(enc)
    out = hf.model(input_ids=enc.input_ids[:1, :prefix_len], use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(n)
    return _run(hf, hooks, enc, offset=prefix_len, cache=cache)


def shared_prefix_len(enc) -> int:
    """Tokens every row shares before the first query token (the demonstrations)."""
    first_query = int((enc.segments == QUERY_SEGMENT).float().argmax(-1).min())
    same = (enc.input_ids[:, :first_query] == enc.input_ids[:1, :first_query]).all(0)
    return int(same.long().cumprod(0).sum())


def _demo_ids(tokenizer, task, episode: Episode) -> list[list[int]]:
    """Each demonstration tokenised alone, with BOS (GD's training examples), in one call."""
    return tokenizer([task.render_demo(d, episode.label_words) for d in episode.demos])["input_ids"]


def _kv_modules(hf) -> list[tuple[nn.Module, str]]:
    return [(layer.self_attn, name) for layer in hf.model.layers for name in ("k_proj", "v_proj")]


def finetune_copy(hf, tokenizer, task, episode: Episode, lr: float):
    """A: a deep copy whose k_proj/v_proj took one torch.optim.SGD step per demonstration."""
    tuned = copy.deepcopy(hf).requires_grad_(False)
    params = [getattr(m, name).weight.requires_grad_(True) for m, name in _kv_modules(tuned)]
    optimizer = torch.optim.SGD(params, lr=lr)
    for ids in _demo_ids(tokenizer, task, episode):
        ids = torch.tensor([ids])
        logits = tuned(input_ids=ids).logits
        loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tuned.requires_grad_(False)


class BatchedLinear(nn.Module):
    """C's K/V projection: the shared base weight plus one delta per demo set. Rows of a batch are
    demo-set-major with the same count per set."""

    def __init__(self, base: nn.Linear, n_sets: int):
        super().__init__()
        self.base = base
        self.delta = nn.Parameter(torch.zeros(n_sets, base.out_features, base.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [sets * rows, pos, d_in]
        grouped = x.reshape(self.delta.shape[0], -1, x.shape[-1])  # [sets, rows * pos, d_in]
        return self.base(x) + (grouped @ self.delta.mT).reshape(*x.shape[:-1], -1)


class Swapped:
    """C: k_proj/v_proj of `hf` replaced by BatchedLinear modules while inside (restored after)."""

    def __init__(self, hf, deltas: list[torch.Tensor]):
        self.hf, self.deltas = hf, deltas

    def __enter__(self) -> list[BatchedLinear]:
        self.saved = _kv_modules(self.hf)
        self.linears = []
        for (module, name), delta in zip(self.saved, self.deltas):
            linear = BatchedLinear(getattr(module, name), delta.shape[0])
            linear.delta.data = delta
            setattr(module, name, linear)
            self.linears.append(linear)
        return self.linears

    def __exit__(self, *exc) -> None:
        for (module, name), linear in zip(self.saved, self.linears):
            setattr(module, name, linear.base)


def lockstep_deltas(
    hf, tokenizer, task, episodes: list[Episode], lr: float, queries: list | None = None
) -> list[torch.Tensor]:
    """C: SGD of every demo set at once, step t on demonstration t of each set. `queries`: a list
    that receives, per step, q_proj's output of every layer as GD saw it ([L, sets, pos, H * d]; the
    GD side of Dai's Kendall)."""
    n_sets = len(episodes)
    shapes = [getattr(m, name).weight.shape for m, name in _kv_modules(hf)]
    deltas = [torch.zeros(n_sets, *s) for s in shapes]
    flags = [p.requires_grad for p in hf.parameters()]
    hf.requires_grad_(False)
    demos = [_demo_ids(tokenizer, task, e) for e in episodes]
    pad = tokenizer.pad_token_id or 0
    seen: list[torch.Tensor] = []
    handles = (
        [
            layer.self_attn.q_proj.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
            for layer in hf.model.layers
        ]
        if queries is not None
        else []
    )
    try:
        with Swapped(hf, deltas) as linears:
            optimizer = torch.optim.SGD([lin.delta for lin in linears], lr=lr)
            for step in range(len(episodes[0].demos)):
                rows = [d[step] for d in demos]
                width = max(map(len, rows))
                ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
                mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
                targets = torch.where(mask[:, 1:] > 0, ids[:, 1:], -100)
                logits = hf(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
                if queries is not None:
                    queries.append(torch.stack(seen))
                    seen.clear()
                token_loss = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
                loss = (token_loss.sum(-1) / (targets != -100).sum(-1)).sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            return [lin.delta.detach() for lin in linears]
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in zip(hf.parameters(), flags):
            p.requires_grad_(flag)


def random_update_like(deltas: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Gaussian directions scaled to each delta's Frobenius norm per set (Deutch et al.); set e's
    drawn from its own generator seeded seed * 1_000_003 + e, projection by projection (the
    engine's draws, so that the numbers can be compared)."""
    generators = [torch.Generator().manual_seed(seed * 1_000_003 + e) for e in range(deltas[0].shape[0])]
    out = []
    for d in deltas:
        noise = torch.stack([torch.randn(d.shape[1:], generator=g) for g in generators])
        out.append(noise * (torch.linalg.matrix_norm(d) / torch.linalg.matrix_norm(noise))[:, None, None])
    return out


def untrained_hf(hf, seed: int):
    """A copy with every attention/MLP linear weight re-drawn N(0, initializer_range^2)."""
    fresh = copy.deepcopy(hf)
    generator = torch.Generator().manual_seed(seed)
    std = getattr(fresh.config, "initializer_range", None) or 0.02
    with torch.no_grad():
        for name, module in fresh.named_modules():
            if isinstance(module, nn.Linear) and (".self_attn." in name or ".mlp." in name):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if module.bias is not None:
                    module.bias.zero_()
    return fresh


# ---- the whole comparison --------------------------------------------------------------------
METRICS = ("benchmark", "default")
"""benchmark: the rows of compare(probes=["attn_out", "head_out", "scores"]); default: every row of
compare()'s default probes (benchmarks/hf_default_metrics.py; variant C only)."""


def alternative(
    hf,
    tokenizer,
    task: Task,
    episodes: list[Episode],
    *,
    variant: str,
    lr: float,
    baselines=(),
    seed=0,
    metrics: str = "benchmark",
) -> pd.DataFrame:
    """Alternative `variant` (A, B or C) on `episodes`: one tidy table with the engine's rows
    (`metrics`: "benchmark" or "default", see METRICS)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}")
    if metrics not in METRICS:
        raise ValueError(f"metrics must be one of {METRICS}")
    if variant != "C" and ("random_update" in baselines or metrics == "default"):
        raise ValueError("the random-update baseline and the default metrics are written for C only")
    if metrics == "default":
        from hf_default_metrics import default_pipeline as pipeline
    else:
        pipeline = _pipeline
    table = pipeline(hf, tokenizer, task, episodes, variant, lr, tuple(b for b in baselines), seed)
    if "untrained" in baselines:
        base = pipeline(untrained_hf(hf, seed), tokenizer, task, episodes, variant, lr, (), seed)
        table = pd.concat(
            [table, base[base["comparison"] == "icl~gd"].assign(comparison="untrained:icl~gd")],
            ignore_index=True,
        )
    return table


def _pipeline(hf, tokenizer, task, episodes, variant, lr, baselines, seed) -> pd.DataFrame:
    rows = Rows()
    with torch.no_grad(), ReadHooks(hf) as hooks:
        zsl_cache: dict = {}
        with torch.enable_grad():
            deltas = lockstep_deltas(hf, tokenizer, task, episodes, lr) if variant == "C" else None
        gd_all = random_all = None
        if variant == "C":  # every set's queries in one batch, rows set-major
            queries = [q for e in episodes for q in e.queries]
            words = [e.label_words for e in episodes for _ in e.queries]
            enc = encode_prompts(tokenizer, task, [()] * len(queries), queries, words)
            with Swapped(hf, deltas):
                gd_all = _run(hf, hooks, enc)
            if "random_update" in baselines:
                with Swapped(hf, random_update_like(deltas, seed + 1)):
                    random_all = _run(hf, hooks, enc)
        start = 0
        for e, episode in enumerate(episodes):
            n = len(episode.queries)
            key = (episode.queries, episode.label_words)
            if key not in zsl_cache:  # the same queries in every set: ZSL once
                enc = encode_prompts(
                    tokenizer, task, [()] * n, list(episode.queries), [episode.label_words] * n
                )
                zsl_cache[key] = _run(hf, hooks, enc)
            rec = {"zsl": zsl_cache[key]}
            rec["icl"] = _icl(hf, hooks, tokenizer, task, episode, episode.demos, variant != "A")
            if "icl_perm" in baselines and len(episode.demos) > 1:
                demos = permuted_demos(episode.demos, seed + 1000 + e)
                rec["icl_perm"] = _icl(hf, hooks, tokenizer, task, episode, demos, variant != "A")
            if variant == "C":
                rec["gd"] = _rows(gd_all, start, start + n)
                if random_all is not None:
                    rec["gd_random"] = _rows(random_all, start, start + n)
            else:
                with torch.enable_grad():
                    tuned = finetune_copy(hf, tokenizer, task, episode, lr)
                enc = encode_prompts(
                    tokenizer, task, [()] * n, list(episode.queries), [episode.label_words] * n
                )
                with ReadHooks(tuned) as tuned_hooks:
                    rec["gd"] = _run(tuned, tuned_hooks, enc)
                del tuned
            start += n
            labels = torch.tensor([q.label for q in episode.queries])
            label_ids = label_token_ids(tokenizer, episode.label_words)
            episode_rows(rec, labels, label_ids, e, baselines, seed + e, rows)
    return rows.frame()


def _rows(rec: dict, start: int, stop: int) -> dict:
    return {name: (v[start:stop] if name == "logits" else v[:, start:stop]) for name, v in rec.items()}


# ---- tidy rows from the shared metric functions ----------------------------------------------
class Rows:
    """Tidy rows: `add` per layer / head, `add_model` per query, for demo set `episode` (set it
    before adding); `frame()` builds one DataFrame from every array added (one small DataFrame
    per metric costs more than the metrics)."""

    def __init__(self, episode: int = 0):
        self.episode = episode
        self.columns: list[tuple[np.ndarray, ...]] = []

    def add(self, metric: str, comparison: str, v: torch.Tensor, head_mean: bool | None) -> None:
        """v [L, B] (per layer), or [L, B, H] per head (head_mean: also the nanmean as head -1)."""
        v = v.float().numpy()
        if v.ndim == 3:
            L, B, H = v.shape
            grid = np.meshgrid(np.arange(L), np.arange(B), np.arange(H), indexing="ij")
            self._add(metric, comparison, grid[0], grid[2], grid[1], v)
            if not head_mean:
                return
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                v = np.nanmean(v, -1)
        L, B = v.shape
        grid = np.meshgrid(np.arange(L), np.arange(B), indexing="ij")
        self._add(metric, comparison, grid[0], np.full_like(grid[0], -1), grid[1], v)

    def add_model(self, metric: str, comparison: str, v: torch.Tensor, query: int | None = None) -> None:
        """v [B] per query (or one value with `query`, e.g. -1 for the whole demo set)."""
        v = v.float().numpy().reshape(-1)
        q = np.arange(len(v)) if query is None else np.full(len(v), query)
        self._add(metric, comparison, np.full(len(v), -1), np.full(len(v), -1), q, v)

    def _add(self, metric, comparison, layer, head, query, value) -> None:
        n = value.size
        self.columns.append(
            (
                np.full(n, metric, dtype=object),
                np.full(n, comparison, dtype=object),
                layer.reshape(-1),
                head.reshape(-1),
                np.full(n, self.episode),
                query.reshape(-1),
                value.reshape(-1),
            )
        )

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame({name: np.concatenate(c) for name, c in zip(COLUMNS, zip(*self.columns))})


def episode_rows(rec: dict, labels, label_ids, episode: int, baselines, seed: int, rows=None) -> Rows:
    """Every metric of one demo set, vectorised over layers, queries and heads, added to `rows`
    (a new Rows if None)."""
    rows = rows if rows is not None else Rows()
    rows.episode = episode
    add, add_model = rows.add, rows.add_model
    zsl, icl, gd = rec["zsl"], rec["icl"], rec["gd"]
    others = {"icl~icl_perm": rec.get("icl_perm"), "icl~random_update": rec.get("gd_random")}
    for name in ("attn_out", "head_out"):
        for comparison, other in {"icl~gd": gd, **others}.items():
            if other is not None:
                add("simaou", comparison, metrics.delta_cosine(icl[name], other[name], zsl[name]), False)
                add("simaou_norm", comparison, metrics.simaou_norm(icl[name], other[name], zsl[name]), False)
        if "random" in baselines:
            r = torch.rand(icl[name].shape, generator=torch.Generator().manual_seed(seed))
            add("simaou", "icl~random", metrics.simaou_random(icl[name], zsl[name], r), False)
            add("simaou_norm", "icl~random", metrics.simaou_norm_random(icl[name], zsl[name], r), False)
    m_icl, m_gd, m_zsl = _same_width(icl["scores"], gd["scores"], zsl["scores"])
    add("simam_before", "icl~zsl", metrics.cosine(m_icl, m_zsl), True)
    add("simam_after", "icl~gd", metrics.cosine(m_icl, m_gd), True)
    for comparison, other in {"icl~gd": gd, **others}.items():
        if other is not None:
            a, b, z = _same_width(icl["scores"], other["scores"], zsl["scores"])
            delta = metrics.cosine(a - z, b - z)
            delta[0] = float("nan")  # rotary layer 0: ICL cannot change the query's own scores
            add("simam_delta", comparison, delta, True)
    logp = {
        name: F.log_softmax(r["logits"], -1)
        for name, r in {
            "zsl": zsl,
            "icl": icl,
            "gd": gd,
            **{k: rec.get(k) for k in ("icl_perm", "gd_random")},
        }.items()
        if r is not None
    }
    correct = {}
    for name in ("zsl", "icl", "gd"):
        correct[name] = metrics.label_correct(rec[name]["logits"][:, label_ids], labels)
        add_model("accuracy", name, correct[name].float())
        add_model(
            "accuracy_vocab",
            name,
            (rec[name]["logits"].argmax(-1) == torch.tensor(label_ids)[labels]).float(),
        )
    add_model(
        "rec2ftp",
        "icl~gd",
        torch.tensor([metrics.rec2ftp(correct["zsl"], correct["icl"], correct["gd"])]),
        -1,
    )
    for comparison, (a, b) in {
        "icl~gd": ("icl", "gd"),
        "icl~icl_perm": ("icl", "icl_perm"),
        "icl~random_update": ("icl", "gd_random"),
        "gd~zsl": ("gd", "zsl"),
        "icl~zsl": ("icl", "zsl"),
    }.items():
        if a in logp and b in logp:
            p1, p2 = logp[a].exp(), logp[b].exp()
            add_model("token_overlap", comparison, metrics.token_overlap(p1, p2, 10))
            add_model("overlap_cosine", comparison, metrics.overlap_cosine(p1, p2, 10))
            add_model("kl", comparison, metrics.kl(logp[a], logp[b]))
            add_model("js", comparison, metrics.js(logp[a], logp[b]))
    return rows


def _same_width(*maps: torch.Tensor) -> list[torch.Tensor]:
    width = max(m.shape[-1] for m in maps)
    return [F.pad(m, (0, width - m.shape[-1]), value=float("nan")) for m in maps]


def plain_copy(bridge, attn_implementation: str = "sdpa"):
    """A plain `LlamaForCausalLM` with the bridge's weights (no bridge wrappers), HF's defaults."""
    from transformers import LlamaForCausalLM

    from iclgd_lens.models import original_state_dict

    config = copy.deepcopy(bridge.original_model.config)
    config._attn_implementation = attn_implementation
    first = next(bridge.original_model.parameters())
    hf = LlamaForCausalLM(config)
    hf.load_state_dict(original_state_dict(bridge))  # copies the values
    return hf.to(first.dtype).eval()
