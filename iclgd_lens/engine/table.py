"""The metrics of one episode as tidy rows: recordings of ZSL, ICL, GD and the baselines in,
one row per number out (metric, comparison, layer, head, episode, query, value).

`episode_table` is where each published metric meets its inputs (docs/metrics.md, "What
`compare()` feeds each metric"); the metric functions themselves are in `metrics`.
"""

from __future__ import annotations

import math
import warnings

import einops
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from iclgd_lens.engine import metrics
from iclgd_lens.engine.baselines import random_vector_like
from iclgd_lens.engine.record import Recording
from iclgd_lens.errors import IclgdError


def episode_table(
    rec: dict[str, Recording],
    labels: torch.Tensor,
    label_ids: list[int],
    *,
    episode: int,
    chosen,
    seed: int,
    rotary: bool = True,
    train_queries: tuple[torch.Tensor, torch.Tensor] | None = None,
    compared: tuple[str, ...] = (),
) -> pd.DataFrame:
    """Every metric of one episode as tidy rows (metric, comparison, layer, head, episode, query, value).
    `rotary`: the model uses rotary positions (LLaMA), which leaves SimAM-delta undefined at layer 0.
    `train_queries`: (queries [L, n_tokens, n_heads, d_head], demonstration of each token [n_tokens])
    of GD's training tokens (`Deltas.train_queries`), the GD side of Dai's Kendall.
    `compared`: recorded keys to compare as delta cosines (`probe:<key>`): what the probes
    declared with `compare=True` return (`Recorder.compared_keys`)."""
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
            out.add(
                "simaou",
                comparison,
                metrics.delta_cosine(icl[name], other[name], zsl[name]),
                per_head,
                head_mean=False,
            )
            out.add(
                "simaou_norm",
                comparison,
                metrics.simaou_norm(icl[name], other[name], zsl[name]),
                per_head,
                head_mean=False,
            )
        if "random" in chosen:
            r = random_vector_like(icl[name], seed)
            out.add(
                "simaou",
                "icl~random",
                metrics.simaou_random(icl[name], zsl[name], r),
                per_head,
                head_mean=False,
            )
            out.add(
                "simaou_norm",
                "icl~random",
                metrics.simaou_norm_random(icl[name], zsl[name], r),
                per_head,
                head_mean=False,
            )

    # SimAM before/after and SimAM-delta on the query's own tokens
    if "scores" in icl:
        m_icl, m_gd, m_zsl = _same_width(icl["scores"], gd["scores"], zsl["scores"])
        out.add("simam_before", "icl~zsl", metrics.simam(m_icl, m_zsl), True)
        out.add("simam_after", "icl~gd", metrics.simam(m_icl, m_gd), True)
        out.add(
            "simam_delta",
            "icl~gd",
            _undefined_at_layer_0(metrics.simam_delta(m_icl, m_gd, m_zsl), rotary),
            True,
        )
        for comparison, other in others.items():
            if other is not None:
                o_icl, o_other, o_zsl = _same_width(icl["scores"], other["scores"], zsl["scores"])
                out.add(
                    "simam_delta",
                    comparison,
                    _undefined_at_layer_0(metrics.simam_delta(o_icl, o_other, o_zsl), rotary),
                    True,
                )

    # implicit weight updates: dW_ICL (demonstrations) vs dW_GD (change of sum v k^T over the query's
    # tokens), dW_GD as the factors of that difference (metrics.dw_difference_factors)
    prefix = rec.get("icl_prefix")
    if prefix is not None and "kv_demo" in prefix and "kv_context_k" in gd:
        dw_icl = prefix["kv_demo"][:, 0]  # [L, n_kv, d, d]: every row of an episode holds the same demos
        for comparison, other in {"icl~gd": gd, "icl~random_update": rec.get("gd_random")}.items():
            if other is None or "kv_context_k" not in other:
                continue
            cos, action = zip(*(_dw_rows(dw_icl[l], other, zsl, icl, l) for l in range(dw_icl.shape[0])))
            out.add("dw_cos", comparison, torch.stack(cos), True)
            if "rot_q" in icl:
                out.add("dw_action_cos", comparison, torch.stack(action), True)
        if "head_out" in icl and "rot_q" in icl:
            predicted = metrics.dw_act(dw_icl, icl["rot_q"].float())
            actual = icl["head_out"].float() - zsl["head_out"].float()  # (a bf16 difference would round)
            cos = metrics.cosine(predicted, actual)
            out.add("dual_form_cos", "icl~dual_form", cos, True)
            out.add("dual_form_rel_err", "icl~dual_form", torch.sqrt(torch.clamp(1 - cos**2, min=0)), True)

    # Kendall (Dai): ICL's scores over the demonstration tokens vs the GD model's query . the queries of
    # GD's training tokens
    if train_queries is not None and "demo_scores" in icl and "q" in gd:
        _dai_kendall_rows(out, icl, gd, *train_queries, seed, "random" in chosen)
    # the per-head variant: per-head taus of ICL's attention mass vs GD query . ICL demo-token queries
    if prefix is not None and "q_demo" in prefix and "demo_attention" in icl and "q" in gd:
        _kendall_per_head_rows(out, prefix, icl, gd, seed, "random" in chosen)

    # output distributions: accuracy, Rec2FTP, token overlap, overlap cosine, KL, JS
    logp = {
        name: F.log_softmax(r.logits.float(), -1)
        for name, r in rec.items()
        if r is not None and r.logits is not None and name != "icl_prefix"
    }
    correct = {}
    for name in ("zsl", "icl", "gd"):
        correct[name] = metrics.label_correct(rec[name].logits[:, label_ids], labels)
        out.add_model("accuracy", name, correct[name].float())
        out.add_model(
            "accuracy_vocab",
            name,
            (rec[name].logits.argmax(-1) == torch.tensor(label_ids, device=labels.device)[labels]).float(),
        )
    out.add_model(
        "rec2ftp",
        "icl~gd",
        torch.tensor([metrics.rec2ftp(correct["zsl"], correct["icl"], correct["gd"])]),
        query=-1,
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
            out.add_model("token_overlap", comparison, metrics.token_overlap(p1, p2, 10))
            out.add_model("overlap_cosine", comparison, metrics.overlap_cosine(p1, p2, 10))
            out.add_model("kl", comparison, metrics.kl(logp[a], logp[b]))
            out.add_model("js", comparison, metrics.js(logp[a], logp[b]))

    # probes declared with compare=True: every vector they return, compared as a delta cosine
    for name in compared:
        if name not in icl or name not in zsl:  # without GD's value the ICL-only baselines still compare
            continue
        _check_same_shape(name, {c: r[name] for c, r in rec.items() if r is not None and name in r})
        per_head = icl[name].dim() == 4
        for comparison, other in {"icl~gd": gd, **others}.items():
            if other is not None and name in other:
                out.add(
                    f"probe:{name}",
                    comparison,
                    metrics.delta_cosine(
                        icl[name].float().flatten(2 + per_head),
                        other[name].float().flatten(2 + per_head),
                        zsl[name].float().flatten(2 + per_head),
                    ),
                    per_head,
                )
        if "random" in chosen:
            v = icl[name].float().flatten(2 + per_head)
            out.add(
                f"probe:{name}",
                "icl~random",
                metrics.simaou_random(
                    v, zsl[name].float().flatten(2 + per_head), random_vector_like(v, seed)
                ),
                per_head,
            )
    return out.frame()


def _check_same_shape(name: str, values: dict[str, torch.Tensor]) -> None:
    """A compared probe vector must have one shape in every condition (ICL's prompts are longer
    than ZSL's, so a whole-sequence tensor is not): one line saying so, not a broadcasting error."""
    shapes = {c: tuple(v.shape[2:]) for c, v in values.items() if c != "icl_prefix"}  # past [L, batch]
    if len(set(shapes.values())) > 1:
        seen = ", ".join(f"{c} {s}" for c, s in shapes.items())
        raise IclgdError(
            f"probe vector {name!r} has different shapes across conditions ({seen}); a compared vector "
            "(compare=True) needs one shape in every condition, and ICL's passes hold more positions than "
            "ZSL's (its demonstrations), so neither a whole sequence nor an attention row over the keys "
            "compares: read a vector at one position, e.g. x[ctx.batch_index, ctx.read_pos] of a "
            "residual or head output, or declare the probe with compare=False"
        )


def _dai_kendall_rows(
    out: "_Rows", icl, gd, train_q: torch.Tensor, train_demo: torch.Tensor, seed: int, with_random: bool
) -> None:
    """Dai et al.'s Kendall (LMOps understand_icl), one tau-b per (layer, query), added to `out`.

    ICL side: the read position's pre-softmax scores over the demonstration tokens, summed
    over heads, softmaxed over those tokens. GD side: the GD model's query at the ZSL read
    position (all heads) / sqrt(d_head), dotted with the queries / sqrt(d_head) of GD's
    training tokens as GD saw them, softmaxed. Token level: tau-b of the two; example level:
    tau-b of their sums per demonstration. Token level is NaN when a demonstration tokenises
    to another number of tokens in the prompt than alone (the tokens cannot be paired).
    """
    demo_pos = icl.segments[0] > 0  # [key_pos]: every row of an episode holds the same demonstrations
    icl_demo = icl.segments[0][demo_pos]  # [n_icl] demonstration of each ICL token
    scores = icl["demo_scores"][..., : len(demo_pos)][
        ..., demo_pos
    ].float()  # [L, B, n_icl] (summed over heads by the probe)
    p_icl = torch.softmax(scores, -1)
    d_head = gd["q"].shape[-1]
    q_gd = einops.rearrange(gd["q"].float(), "l b h d -> l b (h d)") / math.sqrt(d_head)
    q_train = einops.rearrange(train_q.float().to(q_gd.device), "l t h d -> l t (h d)") / math.sqrt(d_head)
    p_gd = metrics.query_key_dots(q_gd, q_train, softmax=True)  # [L, B, n_train]
    train_demo = train_demo.to(icl_demo.device)
    n_demos = int(icl_demo.max())
    if torch.equal(
        torch.bincount(icl_demo, minlength=n_demos + 1), torch.bincount(train_demo, minlength=n_demos + 1)
    ):
        out.add("kendall_token", "icl~gd", metrics.kendall_tau_b(p_icl, p_gd), False)
    else:
        out.add("kendall_token", "icl~gd", torch.full(p_icl.shape[:2], float("nan")), False)
    mass_icl = metrics.demo_attention_mass(p_icl, icl_demo, n_demos)  # [L, B, k]
    out.add(
        "kendall_example",
        "icl~gd",
        metrics.kendall_tau_b(mass_icl, metrics.demo_attention_mass(p_gd, train_demo, n_demos)),
        False,
    )
    if with_random:
        noise = torch.rand(p_icl.shape, generator=torch.Generator().manual_seed(seed)).to(
            p_icl.device
        )  # [L, B, n_icl] ~ U[0,1)
        out.add("kendall_token", "icl~random", metrics.kendall_tau_b(p_icl, noise), False)
        out.add(
            "kendall_example",
            "icl~random",
            metrics.kendall_tau_b(mass_icl, metrics.demo_attention_mass(noise, icl_demo, n_demos)),
            False,
        )


def _kendall_per_head_rows(out: "_Rows", prefix, icl, gd, seed, with_random) -> None:
    """The per-head variant (not Dai's): tau-b per (layer, query, head) of ICL's post-softmax
    attention on the demonstration tokens vs the GD query . the demonstration tokens' queries
    of the ICL pass (raw dot products, summed per demonstration at the example level); head -1
    is the mean over heads. A random baseline at the token level."""
    q_demo = prefix["q_demo"][:, 0].float()  # [L, pos, n_heads, d] (every row holds the same demonstrations)
    seg = prefix.segments[0, : q_demo.shape[1]]  # [pos]
    demo_tokens = seg > 0
    q_gd = gd["q"].float()  # [L, B, n_heads, d]
    mass = icl["demo_attention"][..., : q_demo.shape[1]].float()  # [L, B, n_heads, pos]
    dots = einops.rearrange(
        metrics.query_key_dots(
            einops.rearrange(q_gd, "l b h d -> l h b d"), einops.rearrange(q_demo, "l p h d -> l h p d")
        ),
        "l h b p -> l b h p",
    )  # [L, B, n_heads, pos]
    out.add(
        "kendall_token_per_head",
        "icl~gd",
        metrics.kendall_tau_b(mass[..., demo_tokens], dots[..., demo_tokens]),
        True,
    )
    out.add(
        "kendall_example_per_head",
        "icl~gd",
        metrics.kendall_tau_b(metrics.demo_attention_mass(mass, seg), metrics.demo_attention_mass(dots, seg)),
        True,
    )
    if with_random:
        gen = torch.Generator().manual_seed(seed)
        noise = torch.rand(mass[..., demo_tokens].shape, generator=gen).to(mass.device)
        out.add(
            "kendall_token_per_head", "icl~random", metrics.kendall_tau_b(mass[..., demo_tokens], noise), True
        )


def _dw_rows(dw_icl: torch.Tensor, other, zsl, icl, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dw_cos [B, n_kv] and dw_action_cos [B, n_heads] (None without query vectors) of one layer:
    dW_ICL [n_kv, d, d] against dW_GD (or the random update's) as the factors of the change of
    sum v k^T over the context tokens. One layer at a time, so that the float64 factors of a 7B
    model's every layer are never alive at once."""
    p, k = metrics.dw_difference_factors(
        other["kv_context_k"][layer],
        other["kv_context_v"][layer],
        zsl["kv_context_k"][layer],
        zsl["kv_context_v"][layer],
    )  # [B, 2 * pos, n_kv, d]
    cos = metrics.factored_matrix_cosine(dw_icl, p, k)
    if "rot_q" not in icl:
        return cos, None
    q = icl["rot_q"][layer].double()  # [B, n_heads, d]
    action = metrics.cosine(metrics.dw_act(dw_icl[None], q[None])[0], metrics.dual_form_update(q, k, p))
    return cos, action


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


def _same_width(*maps: torch.Tensor) -> list[torch.Tensor]:
    """Pad score maps [L, B, H, width] with NaN to a common width (prompts of a batch may hold
    queries of different lengths); nothing else is changed."""
    width = max(m.shape[-1] for m in maps)
    return [
        F.pad(m.to(torch.promote_types(m.dtype, torch.float32)), (0, width - m.shape[-1]), value=float("nan"))
        for m in maps
    ]


class _Rows:
    """Collects metric tensors into tidy rows without per-row Python loops."""

    def __init__(self, episode: int):
        self.episode = episode
        self.columns: list[tuple[np.ndarray, ...]] = []

    def add(
        self, metric: str, comparison: str, values: torch.Tensor, per_head: bool, head_mean: bool = True
    ) -> None:
        """values [L, B] (per layer) or [L, B, H] (per head; with `head_mean` the mean over
        heads is added as head -1, the layer-level value)."""
        v = values.detach().float().cpu().numpy()
        if per_head:
            L, B, H = v.shape
            self._frame(
                metric,
                comparison,
                np.repeat(np.arange(L), B * H),
                np.tile(np.repeat(np.arange(B), H), L),
                np.tile(np.arange(H), L * B),
                v.reshape(-1),
            )
            if not head_mean:
                return
            with warnings.catch_warnings():  # all heads NaN (e.g. no update at all) -> NaN, quietly
                warnings.simplefilter("ignore", RuntimeWarning)
                v = np.nanmean(v, axis=-1)
        L, B = v.shape
        self._frame(
            metric,
            comparison,
            np.repeat(np.arange(L), B),
            np.tile(np.arange(B), L),
            np.full(L * B, -1),
            v.reshape(-1),
        )

    def add_model(self, metric: str, comparison: str, values: torch.Tensor, query: int | None = None) -> None:
        v = values.detach().float().cpu().numpy().reshape(-1)
        queries = np.arange(len(v)) if query is None else np.full(len(v), query)
        self._frame(metric, comparison, np.full(len(v), -1), queries, np.full(len(v), -1), v)

    def _frame(self, metric, comparison, layer, query, head, value) -> None:
        n = len(value)
        self.columns.append(
            (
                np.full(n, metric, dtype=object),
                np.full(n, comparison, dtype=object),
                layer,
                head,
                query,
                value,
            )
        )

    def frame(self) -> pd.DataFrame:
        """One DataFrame from all collected arrays (small frames cost more than the metrics)."""
        cols = ["metric", "comparison", "layer", "head", "episode", "query", "value"]
        if not self.columns:
            return pd.DataFrame(columns=cols)
        metric, comparison, layer, head, query, value = (np.concatenate(c) for c in zip(*self.columns))
        return pd.DataFrame(
            {
                "metric": metric,
                "comparison": comparison,
                "layer": layer,
                "head": head,
                "episode": self.episode,
                "query": query,
                "value": value,
            }
        )[cols]
