"""One ICL-vs-GD comparison end to end: episodes -> GD deltas -> recordings -> tidy Results.

    from iclgd_lens import load_model, compare
    model = load_model()                      # the embedded tiny-llama-icl
    results = compare(model, k=8)             # default task, Dai's GD preset, every baseline
    results.summary().query("metric == 'simaou'")

For each episode (a demonstration set) and each of its queries, three conditions are
recorded with the same probes: ZSL (query alone), ICL (demonstrations + query, the
demonstrations run once per episode and shared through the KV cache), GD (query alone with
the episode's GD weight deltas applied by hooks). Baselines are recorded beside them:
ICL under another demonstration order, GD replaced by a random update of equal norm, Dai's
uniform random vector, and the whole pipeline on an untrained copy of the model.
The user's model is never modified (tested bitwise).
"""

from __future__ import annotations

import math
import random
import time
import warnings
from dataclasses import asdict
from typing import Sequence

import einops
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from iclgd_lens.engine import metrics
from iclgd_lens.engine.baselines import random_vector_like
from iclgd_lens.errors import IclgdError
from iclgd_lens.engine.gd import GDConfig, delta_hooks, train_deltas
from iclgd_lens.engine.record import Recorder, Recording
from iclgd_lens.engine.results import Results, versions
from iclgd_lens.tasks import Episode, Task, encode_prompts, label_token_ids

ALL_BASELINES = ("random", "random_update", "icl_perm", "untrained")
"""Baselines recorded beside every similarity (Dai; Deutch et al.; Shen et al.)."""

BUILTIN_VECTOR_PROBES = {"attn_out", "head_out", "scores", "demo_scores", "demo_attention", "q", "rot_q", "q_demo", "kv_demo", "kv_context"}


def compare(
    model,
    task: Task | None = None,
    *,
    gd: GDConfig | str = "dai",
    k: int = 8,
    n_episodes: int = 8,
    n_queries: int = 8,
    seed: int = 0,
    baselines: Sequence[str] | bool = True,
    probes: Sequence[str] | None = None,
    share_prefix: bool = True,
    batch_size: int = 64,
    progress: bool = True,
    artifacts: bool = True,
) -> Results:
    """Compare ICL with GD on `task`, layer by layer, and return the tidy Results.

    `gd` is a GDConfig or a preset name ("dai", "shen", "shen-single-layer", "deutch"); a
    preset takes the task's own learning rate (`Task.gd_lr`) where it has one, as Dai et al.
    tuned one per task.
    `baselines` is True (all of ALL_BASELINES), False, or a subset of names.
    `probes` names the probes to record (default: iclgd_lens.hooks.DEFAULT_PROBES plus every
    probe registered by the user). `batch_size` bounds the rows of one forward pass.
    Episodes are the statistical unit (their queries share demonstrations and GD run): the
    default 8 episodes let the exact paired test reach p = 0.0078 (docs/statistics.md).
    """
    started = time.time()
    torch.manual_seed(seed)
    if task is None:
        from iclgd_lens.tasks.mapping import default_task

        task = default_task(seed=seed)
    gd_config = GDConfig.resolve(gd, task)
    chosen = _chosen_baselines(baselines)
    episodes = task.episodes(k, n_episodes, n_queries, seed)
    probe_names = _probe_names(probes)

    table = _compare_once(model, task, episodes, gd_config, chosen, probe_names, seed, share_prefix, batch_size, progress)
    parts = [table]
    if "untrained" in chosen:
        from iclgd_lens.engine.baselines import untrained_copy

        untrained = untrained_copy(model, seed=seed)
        base = _compare_once(untrained, task, episodes, gd_config, (), probe_names, seed, share_prefix, batch_size, progress, desc="untrained")
        base = base[base["comparison"] == "icl~gd"].assign(comparison="untrained:icl~gd")
        parts.append(base)
        del untrained
    table = pd.concat(parts, ignore_index=True)
    table["k"] = k
    art = example_artifacts(model, task, episodes[0], gd_config, episodes, seed) if artifacts and k > 0 else {}
    config = {
        "model": _model_info(model),
        "task": {"name": task.name, "template": task.template, "separator": task.separator, "read_offset": task.read_offset},
        "k": k,
        "n_episodes": n_episodes,
        "n_queries": len(episodes[0].queries),
        "seed": seed,
        "gd": asdict(gd_config),
        "baselines": list(chosen),
        "probes": probe_names,
        "share_prefix": share_prefix,
        "versions": versions(),  # provenance
        "run_time_s": round(time.time() - started, 2),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
    }
    return Results(table=table, config=config, artifacts=art)


# ---- one pass over all episodes ------------------------------------------------------------
def _compare_once(model, task, episodes, gd_config, chosen, probe_names, seed, share_prefix, batch_size, progress, desc="compare") -> pd.DataFrame:
    tokenizer = model.tokenizer
    device = _device(model)
    k = len(episodes[0].demos)
    dai_kendall = {"scores", "query_vectors"} <= set(probe_names)
    deltas = train_deltas(model, tokenizer, task, episodes, gd_config, progress=progress, record_queries=dai_kendall) if k > 0 else None
    random_deltas = deltas.scaled_random_like(seed + 1) if deltas is not None and "random_update" in chosen else None
    recorder = Recorder(model, probe_names)
    max_len = _context_window(model)
    rotary = getattr(model.cfg, "positional_embedding_type", "rotary") == "rotary"

    # the query-alone conditions of every episode together, batch_size rows per pass
    queries = [q for episode in episodes for q in episode.queries]
    words = [episode.label_words for episode in episodes for _ in episode.queries]
    row_episode = torch.tensor([e for e, episode in enumerate(episodes) for _ in episode.queries], device=device)
    zsl_enc = encode_prompts(tokenizer, task, [()] * len(queries), queries, words, max_length=max_len).to(device)
    query_alone = {"zsl": _batched(recorder, zsl_enc, "zsl", _no_hooks, batch_size)}
    for condition, d in (("gd", deltas), ("gd_random", random_deltas)):
        if d is not None:
            query_alone[condition] = _batched(recorder, zsl_enc, condition, lambda a, b, d=d: delta_hooks(d, row_episode[a:b]), batch_size)
    if deltas is None:
        query_alone["gd"] = query_alone["zsl"]

    icl_encs = [_encode_icl(tokenizer, task, episode, episode.demos, max_len, device) for episode in episodes]
    icl = _icl_all(recorder, icl_encs, "icl", share_prefix and k > 0, batch_size)
    perm = None
    if "icl_perm" in chosen and k > 1:
        perm_encs = [_encode_icl(tokenizer, task, ep, _permuted(ep.demos, seed + 1000 + e), max_len, device) for e, ep in enumerate(episodes)]
        perm = _icl_all(recorder, perm_encs, "icl_perm", share_prefix, batch_size)

    frames, start = [], 0
    for e, episode in enumerate(tqdm(episodes, desc=desc, disable=not progress)):
        n = len(episode.queries)
        rec: dict[str, Recording] = {name: r.rows(start, start + n) for name, r in query_alone.items()}
        rec["icl_prefix"], rec["icl"] = icl[e]
        if perm is not None:
            rec["icl_perm"] = perm[e][1]
        start += n
        labels = torch.tensor([q.label for q in episode.queries], device=device)
        label_ids = label_token_ids(tokenizer, episode.label_words)
        train_queries = (deltas.train_queries[e], deltas.train_token_demo[e]) if deltas is not None and deltas.train_queries else None
        frames.append(episode_table(rec, labels, label_ids, episode=e, chosen=chosen, seed=seed + e, rotary=rotary, train_queries=train_queries))
    return pd.concat(frames, ignore_index=True)


def _encode_icl(tokenizer, task: Task, episode: Episode, demos, max_len, device):
    n = len(episode.queries)
    return encode_prompts(tokenizer, task, [demos] * n, list(episode.queries), [episode.label_words] * n, max_length=max_len).to(device)


def _icl_all(recorder: Recorder, encs: list, condition: str, share_prefix: bool, batch_size: int) -> list[tuple[Recording, Recording]]:
    """(demonstration recording, query recording) per episode. With a shared prefix, episodes
    are run together (their prefixes in one pass, their queries in another) in groups of at most
    `batch_size` query rows; otherwise each episode's full prompts in one pass."""
    if not share_prefix:
        return [_icl(recorder, enc, condition, False) for enc in encs]
    out, group = [], []
    for i, enc in enumerate(encs):
        group.append(enc)
        last = i == len(encs) - 1
        if last or sum(len(g.input_ids) for g in group) + len(encs[i + 1].input_ids) > batch_size:
            prefix, queries = recorder.run_shared_prefixes(group, condition)
            start = 0
            for g, member in enumerate(group):
                n = len(member.input_ids)
                out.append((prefix.rows(g, g + 1), queries.rows(start, start + n)))
                start += n
            group = []
    return out


def _icl(recorder: Recorder, enc, condition: str, share_prefix: bool) -> tuple[Recording | None, Recording]:
    """The ICL condition, with the shared demonstrations run once when possible."""
    if share_prefix:
        prefix, rec = recorder.run_shared_prefix(enc, condition)
        return prefix, rec
    rec = recorder.run(enc, condition)
    return rec, rec


def _batched(recorder: Recorder, enc, condition: str, hooks_for, batch_size: int) -> Recording:
    """`recorder.run` in chunks of at most `batch_size` rows, joined along the batch dim.

    `hooks_for(start, stop)` gives the extra hooks for those rows (e.g. their GD deltas).
    """
    n = enc.input_ids.shape[0]
    parts = [
        recorder.run(enc.rows(start, min(start + batch_size, n)), condition, interventions=hooks_for(start, min(start + batch_size, n)))
        for start in range(0, n, batch_size)
    ]
    return Recording.concat(parts)


def _no_hooks(start: int, stop: int) -> list:
    return []


# ---- metrics of one episode ----------------------------------------------------------------
def episode_table(
    rec: dict[str, Recording], labels: torch.Tensor, label_ids: list[int], *, episode: int, chosen, seed: int, rotary: bool = True,
    train_queries: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Every metric of one episode as tidy rows (metric, comparison, layer, head, episode, query, value).
    `rotary`: the model uses rotary positions (LLaMA), which leaves SimAM-delta undefined at layer 0.
    `train_queries`: (queries [L, n_tokens, n_heads, d_head], demonstration of each token [n_tokens])
    of GD's training tokens (`Deltas.train_queries`), the GD side of Dai's Kendall."""
    out = _Rows(episode)
    zsl, icl, gd = rec["zsl"], rec["icl"], rec["gd"]
    others = {"icl~icl_perm": rec.get("icl_perm"), "icl~random_update": rec.get("gd_random")}

    # SimAOU (raw and Dai's normalised) on the attention output and per head
    # (layer level from the attention output, per head from z; the head rows are not averaged)
    for name, per_head in (("attn_out", False), ("head_out", True)):
        if name not in icl:
            continue
        for comparison, other in {"icl~gd": gd, **others}.items():
            if other is None:
                continue
            out.add("simaou", comparison, metrics.delta_cosine(icl[name], other[name], zsl[name]), per_head, head_mean=False)
            out.add("simaou_norm", comparison, metrics.simaou_norm(icl[name], other[name], zsl[name]), per_head, head_mean=False)
        if "random" in chosen:
            r = random_vector_like(icl[name], seed)
            out.add("simaou", "icl~random", metrics.simaou_random(icl[name], zsl[name], r), per_head, head_mean=False)
            out.add("simaou_norm", "icl~random", metrics.simaou_norm_random(icl[name], zsl[name], r), per_head, head_mean=False)

    # SimAM before/after and SimAM-delta on the query's own tokens
    if "scores" in icl:
        m_icl, m_gd, m_zsl = _same_width(icl["scores"], gd["scores"], zsl["scores"])
        out.add("simam_before", "icl~zsl", metrics.simam(m_icl, m_zsl), True)
        out.add("simam_after", "icl~gd", metrics.simam(m_icl, m_gd), True)
        out.add("simam_delta", "icl~gd", _undefined_at_layer_0(metrics.simam_delta(m_icl, m_gd, m_zsl), rotary), True)
        for comparison, other in others.items():
            if other is not None:
                o_icl, o_other, o_zsl = _same_width(icl["scores"], other["scores"], zsl["scores"])
                out.add("simam_delta", comparison, _undefined_at_layer_0(metrics.simam_delta(o_icl, o_other, o_zsl), rotary), True)

    # implicit weight updates: dW_ICL (demonstrations) vs dW_GD (change of sum v k^T over the query's tokens)
    prefix = rec.get("icl_prefix")
    if prefix is not None and "kv_demo" in prefix and "kv_context" in gd:
        dw_icl = prefix["kv_demo"][:, :1] if prefix["kv_demo"].shape[1] == 1 else prefix["kv_demo"]  # [L, 1|B, n_kv, d, d]
        for comparison, other in {"icl~gd": gd, "icl~random_update": rec.get("gd_random")}.items():
            if other is None or "kv_context" not in other:
                continue
            dw_other = other["kv_context"] - zsl["kv_context"]  # [L, B, n_kv, d, d]
            out.add("dw_cos", comparison, metrics.matrix_cosine(dw_icl.expand_as(dw_other), dw_other), True)
            if "rot_q" in icl:
                q = icl["rot_q"].float()  # [L, B, n_heads, d]
                out.add("dw_action_cos", comparison, metrics.cosine(_act(dw_icl.expand_as(dw_other), q), _act(dw_other, q)), True)
        if "head_out" in icl and "rot_q" in icl:
            predicted = _act(dw_icl.expand(-1, icl["rot_q"].shape[1], -1, -1, -1), icl["rot_q"].float())
            actual = (icl["head_out"] - zsl["head_out"]).float()
            cos = metrics.cosine(predicted, actual)
            out.add("dual_form_cos", "icl~dual_form", cos, True)
            out.add("dual_form_rel_err", "icl~dual_form", torch.sqrt(torch.clamp(1 - cos**2, min=0)), True)

    # Kendall (Dai): ICL's scores over the demonstration tokens vs the GD model's query . the queries of GD's training tokens
    if train_queries is not None and "demo_scores" in icl and "q" in gd:
        out.extend(_dai_kendall_rows(icl, gd, *train_queries, episode, seed, "random" in chosen))
    # the per-head variant: per-head taus of ICL's attention mass vs GD query . ICL demo-token queries
    if prefix is not None and "q_demo" in prefix and "demo_attention" in icl and "q" in gd:
        out.extend(_kendall_per_head_rows(prefix, icl, gd, episode, seed, "random" in chosen))

    # output distributions: accuracy, Rec2FTP, token overlap, overlap cosine, KL, JS
    logp = {name: F.log_softmax(r.logits.float(), -1) for name, r in rec.items() if r is not None and r.logits is not None and name != "icl_prefix"}
    correct = {}
    for name in ("zsl", "icl", "gd"):
        correct[name] = metrics.label_correct(rec[name].logits[:, label_ids], labels)
        out.add_model("accuracy", name, correct[name].float())
        out.add_model("accuracy_vocab", name, (rec[name].logits.argmax(-1) == torch.tensor(label_ids, device=labels.device)[labels]).float())
    out.add_model("rec2ftp", "icl~gd", torch.tensor([metrics.rec2ftp(correct["zsl"], correct["icl"], correct["gd"])]), query=-1)
    for comparison, (a, b) in {"icl~gd": ("icl", "gd"), "icl~icl_perm": ("icl", "icl_perm"), "icl~random_update": ("icl", "gd_random"), "gd~zsl": ("gd", "zsl"), "icl~zsl": ("icl", "zsl")}.items():
        if a in logp and b in logp:
            p1, p2 = logp[a].exp(), logp[b].exp()
            out.add_model("token_overlap", comparison, metrics.token_overlap(p1, p2, 10))
            out.add_model("overlap_cosine", comparison, metrics.overlap_cosine(p1, p2, 10))
            out.add_model("kl", comparison, metrics.kl(logp[a], logp[b]))
            out.add_model("js", comparison, metrics.js(logp[a], logp[b]))

    # user probes: any vector the probe returned, compared as a delta cosine
    for name in icl.keys():
        if name in BUILTIN_VECTOR_PROBES or name not in gd or name not in zsl:
            continue
        per_head = icl[name].dim() == 4
        for comparison, other in {"icl~gd": gd, **others}.items():
            if other is not None and name in other:
                out.add(f"probe:{name}", comparison, metrics.delta_cosine(icl[name].float().flatten(2 + per_head), other[name].float().flatten(2 + per_head), zsl[name].float().flatten(2 + per_head)), per_head)
        if "random" in chosen:
            v = icl[name].float().flatten(2 + per_head)
            out.add(f"probe:{name}", "icl~random", metrics.simaou_random(v, zsl[name].float().flatten(2 + per_head), random_vector_like(v, seed)), per_head)
    return out.frame()


def _dai_kendall_rows(icl, gd, train_q: torch.Tensor, train_demo: torch.Tensor, episode: int, seed: int, with_random: bool) -> pd.DataFrame:
    """Dai et al.'s Kendall (LMOps understand_icl), one tau-b per (layer, query).

    ICL side: the read position's pre-softmax scores over the demonstration tokens, summed
    over heads, softmaxed over those tokens. GD side: the GD model's query at the ZSL read
    position (all heads) / sqrt(d_head), dotted with the queries / sqrt(d_head) of GD's
    training tokens as GD saw them, softmaxed. Token level: tau-b of the two; example level:
    tau-b of their sums per demonstration. Token level is NaN when a demonstration tokenises
    to another number of tokens in the prompt than alone (the tokens cannot be paired).
    """
    demo_pos = icl.segments[0] > 0  # [key_pos]: every row of an episode holds the same demonstrations
    icl_demo = icl.segments[0][demo_pos]  # [n_icl] demonstration of each ICL token
    scores = icl["demo_scores"][..., : len(demo_pos)][..., demo_pos].float()  # [L, B, n_icl] (summed over heads by the probe)
    p_icl = torch.softmax(scores, -1)
    d_head = gd["q"].shape[-1]
    q_gd = einops.rearrange(gd["q"].float(), "l b h d -> l b (h d)") / math.sqrt(d_head)
    q_train = einops.rearrange(train_q.float().to(q_gd.device), "l t h d -> l t (h d)") / math.sqrt(d_head)
    p_gd = torch.softmax(torch.einsum("lbx,ltx->lbt", q_gd, q_train), -1)  # [L, B, n_train]
    train_demo = train_demo.to(icl_demo.device)
    n_demos = int(icl_demo.max())
    out = _Rows(episode)
    if torch.equal(torch.bincount(icl_demo, minlength=n_demos + 1), torch.bincount(train_demo, minlength=n_demos + 1)):
        out.add("kendall_token", "icl~gd", metrics.kendall_tau_b(p_icl, p_gd), False)
    else:
        out.add("kendall_token", "icl~gd", torch.full(p_icl.shape[:2], float("nan")), False)
    mass_icl = metrics.demo_attention_mass(p_icl, icl_demo, n_demos)  # [L, B, k]
    out.add("kendall_example", "icl~gd", metrics.kendall_tau_b(mass_icl, metrics.demo_attention_mass(p_gd, train_demo, n_demos)), False)
    if with_random:
        noise = torch.rand(p_icl.shape, generator=torch.Generator().manual_seed(seed)).to(p_icl.device)  # [L, B, n_icl] ~ U[0,1)
        out.add("kendall_token", "icl~random", metrics.kendall_tau_b(p_icl, noise), False)
        out.add("kendall_example", "icl~random", metrics.kendall_tau_b(mass_icl, metrics.demo_attention_mass(noise, icl_demo, n_demos)), False)
    return out.frame()


def _kendall_per_head_rows(prefix, icl, gd, episode, seed, with_random) -> pd.DataFrame:
    """The per-head variant (not Dai's): tau-b per (layer, query, head) of ICL's post-softmax
    attention on the demonstration tokens vs the GD query . the demonstration tokens' queries
    of the ICL pass (raw dot products, summed per demonstration at the example level); head -1
    is the mean over heads. A random baseline at the token level."""
    q_demo = prefix["q_demo"][:, 0].float()  # [L, pos, n_heads, d] (every row holds the same demonstrations)
    seg = prefix.segments[0, : q_demo.shape[1]]  # [pos]
    demo_tokens = seg > 0
    q_gd = gd["q"].float()  # [L, B, n_heads, d]
    mass = icl["demo_attention"][..., : q_demo.shape[1]].float()  # [L, B, n_heads, pos]
    dots = torch.einsum("lbhd,lphd->lbhp", q_gd, q_demo)  # [L, B, n_heads, pos]
    out = _Rows(episode)
    out.add("kendall_token_per_head", "icl~gd", metrics.kendall_tau_b(mass[..., demo_tokens], dots[..., demo_tokens]), True)
    out.add("kendall_example_per_head", "icl~gd", metrics.kendall_tau_b(metrics.demo_attention_mass(mass, seg), metrics.demo_attention_mass(dots, seg)), True)
    if with_random:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.rand(mass[..., demo_tokens].shape, generator=gen).to(mass.device)
        out.add("kendall_token_per_head", "icl~random", metrics.kendall_tau_b(mass[..., demo_tokens], noise), True)
    return out.frame()


def _undefined_at_layer_0(cos: torch.Tensor, rotary: bool) -> torch.Tensor:
    """SimAM-delta is NaN at layer 0 of a rotary model: there the query's own pre-softmax scores
    depend only on its own tokens and their relative positions, so ICL's map update is exactly
    zero by construction (what is measured is float rounding of RoPE at other absolute
    positions), and the direction of a zero update is undefined. cos [L, B, H] -> [L, B, H]."""
    if not rotary:
        return cos
    cos = cos.clone()
    cos[0] = float("nan")
    return cos


def _act(dw: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """dW q per query head under GQA: dw [..., n_kv, d, d], q [..., n_heads, d] -> [..., n_heads, d]."""
    groups = q.shape[-2] // dw.shape[-3]
    return torch.einsum("...hvk,...hk->...hv", dw.repeat_interleave(groups, dim=-3), q)


def _same_width(*maps: torch.Tensor) -> list[torch.Tensor]:
    """Pad score maps [L, B, H, width] with NaN to a common width (prompts of a batch may hold
    queries of different lengths); nothing else is changed."""
    width = max(m.shape[-1] for m in maps)
    return [F.pad(m.to(torch.promote_types(m.dtype, torch.float32)), (0, width - m.shape[-1]), value=float("nan")) for m in maps]


def _permuted(demos: tuple, seed: int) -> tuple:
    """Another order of the demonstrations (never the same one when k > 1), own RNG."""
    rng = random.Random(seed)
    order = list(range(len(demos)))
    while order == list(range(len(demos))):
        rng.shuffle(order)
    return tuple(demos[i] for i in order)


class _Rows:
    """Collects metric tensors into tidy rows without per-row Python loops."""

    def __init__(self, episode: int):
        self.episode = episode
        self.frames: list[pd.DataFrame] = []
        self.columns: list[tuple[np.ndarray, ...]] = []

    def add(self, metric: str, comparison: str, values: torch.Tensor, per_head: bool, head_mean: bool = True) -> None:
        """values [L, B] (per layer) or [L, B, H] (per head; with `head_mean` the mean over
        heads is added as head -1, the layer-level value)."""
        v = values.detach().float().cpu().numpy()
        if per_head:
            L, B, H = v.shape
            self._frame(metric, comparison, np.repeat(np.arange(L), B * H), np.tile(np.repeat(np.arange(B), H), L), np.tile(np.arange(H), L * B), v.reshape(-1))
            if not head_mean:
                return
            with warnings.catch_warnings():  # all heads NaN (e.g. no update at all) -> NaN, quietly
                warnings.simplefilter("ignore", RuntimeWarning)
                v = np.nanmean(v, axis=-1)
        L, B = v.shape
        self._frame(metric, comparison, np.repeat(np.arange(L), B), np.tile(np.arange(B), L), np.full(L * B, -1), v.reshape(-1))

    def add_model(self, metric: str, comparison: str, values: torch.Tensor, query: int | None = None) -> None:
        v = values.detach().float().cpu().numpy().reshape(-1)
        queries = np.arange(len(v)) if query is None else np.full(len(v), query)
        self._frame(metric, comparison, np.full(len(v), -1), queries, np.full(len(v), -1), v)

    def extend(self, frame: pd.DataFrame) -> None:
        self.frames.append(frame)

    def _frame(self, metric, comparison, layer, query, head, value) -> None:
        n = len(value)
        self.columns.append((np.full(n, metric, dtype=object), np.full(n, comparison, dtype=object), layer, head, query, value))

    def frame(self) -> pd.DataFrame:
        cols = ["metric", "comparison", "layer", "head", "episode", "query", "value"]
        parts = list(self.frames)
        if self.columns:  # one DataFrame from all collected arrays: small frames cost more than the metrics
            metric, comparison, layer, head, query, value = (np.concatenate(c) for c in zip(*self.columns))
            parts.append(pd.DataFrame({"metric": metric, "comparison": comparison, "layer": layer, "head": head, "episode": self.episode, "query": query, "value": value}))
        return pd.concat(parts, ignore_index=True)[cols] if parts else pd.DataFrame(columns=cols)


# ---- artifacts for the report --------------------------------------------------------------
def example_artifacts(model, task: Task, episode: Episode, gd_config: GDConfig, episodes, seed: int, max_tokens: int = 48, max_heads: int = 8, max_dim: int = 32) -> dict:
    """What the report draws for one example (episode 0, query 0): attention patterns of ZSL,
    ICL and GD, dW_ICL and dW_GD per layer, and the tokens whose probabilities move most."""
    from iclgd_lens.hooks import Probe, get_probes

    tokenizer = model.tokenizer
    query = episode.queries[0]
    full_pattern = Probe("pattern", ("blocks.{layer}.attn.hook_pattern",), lambda acts, ctx: {"pattern": acts["attn.hook_pattern"][0]})
    recorder = Recorder(model, [full_pattern, *get_probes(["kv_outer"])])
    zsl = encode_prompts(tokenizer, task, [()], [query], [episode.label_words]).to(_device(model))
    icl = encode_prompts(tokenizer, task, [episode.demos], [query], [episode.label_words]).to(_device(model))
    deltas = train_deltas(model, tokenizer, task, [episode], gd_config, progress=False)
    rows = torch.zeros(1, dtype=torch.long, device=_device(model))
    runs = {"zsl": (zsl, recorder.run(zsl, "zsl")), "icl": (icl, recorder.run(icl, "icl")), "gd": (zsl, recorder.run(zsl, "gd", interventions=delta_hooks(deltas, rows)))}
    attention = {}
    for condition, (enc, rec) in runs.items():
        n = int(enc.lengths[0])
        start = max(0, n - max_tokens)
        tokens = tokenizer.convert_ids_to_tokens(enc.input_ids[0, start:n].tolist())
        pattern = rec["pattern"][:, :max_heads, start:n, start:n].float()  # [L, H, q, k]
        attention[condition] = {str(l): {"tokens": tokens, "pattern": _rounded(pattern[l])} for l in range(pattern.shape[0])}
    dw_icl = runs["icl"][1]["kv_demo"][:, 0]  # [L, n_kv, d, d]
    dw_gd = (runs["gd"][1]["kv_context"] - runs["zsl"][1]["kv_context"])[:, 0]
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
    top_tokens = [{"token": tokenizer.convert_ids_to_tokens([i])[0], "d_icl": float(d_icl[i]), "d_gd": float(d_gd[i])} for i in top]
    example = {"icl_prompt": icl.texts[0], "zsl_prompt": zsl.texts[0], "label": episode.label_words[query.label]}
    return {"attention": attention, "dw": dw, "top_tokens": top_tokens, "example": example}


def _pooled(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool the last two dims down to at most size x size (7B heads are 128 x 128)."""
    if x.shape[-1] <= size:
        return x
    return F.adaptive_avg_pool2d(x.float(), (size, size))


def _rounded(x: torch.Tensor, digits: int = 4) -> list:
    return np.round(x.detach().float().cpu().numpy(), digits).tolist()


# ---- small helpers -------------------------------------------------------------------------
def _chosen_baselines(baselines) -> tuple[str, ...]:
    if baselines is True:
        return ALL_BASELINES
    if baselines is False or baselines is None:
        return ()
    unknown = [b for b in baselines if b not in ALL_BASELINES]
    if unknown:
        raise IclgdError(f"unknown baseline(s) {unknown}; choose from {list(ALL_BASELINES)}")
    return tuple(baselines)


def _probe_names(probes) -> list[str]:
    from iclgd_lens.hooks import DEFAULT_PROBES, PROBES, get_probes

    get_probes([])  # loads the built-in probes
    if probes is not None:
        return list(probes)
    user = [n for n in PROBES if n not in DEFAULT_PROBES]
    return list(DEFAULT_PROBES) + user


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _context_window(model) -> int | None:
    return getattr(model.cfg, "n_ctx", None)


def _model_info(model) -> dict:
    try:
        from iclgd_lens.models import model_info

        return model_info(model)
    except Exception:  # a model that is not a bridge (e.g. in tests)
        return {"name": getattr(model.cfg, "model_name", "?")}
