"""Study: do a model's attention weights look like the von Oswald GD construction? (Shen et al. 2024)

For the hand-built weights of `iclgd_lens.worlds.oswald.hand_built_weights` (at the paper's size and at the
loaded model's width), for Gaussian matrices of the model's shapes, and for every layer of a loaded
LLaMA, it measures:

- **near-zero fraction** of W_Q, W_K, W_V: the share of entries with |w| < t * max|w|, for thresholds
  t = 1e-2 .. 1e-6 (relative to the matrix's largest entry);
- **scaled-identity distance** of the score matrix M = W_K^T W_Q of each head ([d_model, d_model]; the
  attention score of key token e_i and query token e_j is e_i^T M e_j, before RoPE, i.e. at relative
  distance 0): min_c ||M - c P||_F / ||M||_F, with P the orthogonal projector onto the row space of M
  (the subspace M acts on). The minimum is at c = <M, P>_F / rank, so the squared distance is
  ||M||_F^2 - <M, P>_F^2 / rank. It is 0 exactly when M is a multiple of a projector, as in the
  construction (M = [[I_x, 0], [0, 0]]), and near 1 for random low-rank M. Computed in float64 from
  QR factors of W_K and W_Q per head, so a d_model = 4096 model never forms a 4096 x 4096 matrix per head;
- **numerical rank** of W_Q, W_K, W_V and of M per head: singular values above `rank_rtol` times the
  largest, reported as a count and as a fraction of the largest possible rank.

Weights are read from the HF modules (`model.layers[l].self_attn.{q,k,v}_proj.weight`, found through
any `_original_component` wrapping of a TransformerBridge); nothing is modified. Biases are ignored
(LLaMA has none). Under GQA each query head is paired with its key/value head.
"""

from __future__ import annotations

import re
import time
from typing import Any, Sequence

import einops
import pandas as pd
import plotly.express as px
import torch
from torch import Tensor, nn

from iclgd_lens import IclgdError, StudyResult
from iclgd_lens.study import checked_args
from iclgd_lens.worlds.oswald import hand_built_weights

THRESHOLDS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
MATRICES = ("W_Q", "W_K", "W_V")
SCORE_MATRIX = "W_K^T W_Q"
QUESTION = (
    "Are the loaded model's W_Q, W_K, W_V as sparse, and its W_K^T W_Q as close to a scaled identity, "
    "as the von Oswald construction that makes attention a GD step requires?"
)
# Shen et al. 2024 on LLaMa-7B / GPT-J (docs/science.md, section 4)
SHEN_MODEL_MAX_NEAR_ZERO = 0.60
SHEN_CONSTRUCTION_NEAR_ZERO = {"W_Q": 0.9999, "W_K": 0.9999, "W_V": 0.75}
_PROJ = re.compile(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.weight$")


def near_zero_fraction(weight: Tensor, thresholds: Sequence[float] = THRESHOLDS) -> dict[float, float]:
    """Share of entries with |w| < t * max|w|, for each threshold t. weight: any shape."""
    magnitude = weight.detach().abs().float()
    largest = magnitude.max()
    return {t: float((magnitude < t * largest).float().mean()) for t in thresholds}


def numerical_rank(weight: Tensor, rank_rtol: float = 1e-4) -> int:
    """Number of singular values above rank_rtol * the largest. weight: [m, n]."""
    singular = torch.linalg.svdvals(weight.detach().float())
    return int((singular > rank_rtol * singular.max()).sum()) if singular.max() > 0 else 0


def score_matrix_structure(w_k: Tensor, w_q: Tensor, rank_rtol: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Scaled-identity distance and numerical rank of M = W_K^T W_Q, per head.

    w_k, w_q: [heads, d_head, d_model] (k = W_K e per head). Returns (distance [heads], rank [heads]):
    distance = min_c ||M - c P||_F / ||M||_F with P the projector onto M's row space (see module doc).
    """
    w_k, w_q = w_k.detach().double(), w_q.detach().double()
    basis_k, tri_k = torch.linalg.qr(einops.rearrange(w_k, "h e d -> h d e"))  # W_K^T = basis_k tri_k
    basis_q, tri_q = torch.linalg.qr(einops.rearrange(w_q, "h e d -> h d e"))  # W_Q^T = basis_q tri_q
    core = tri_k @ tri_q.transpose(-1, -2)  # [h, e, e]; M = basis_k core basis_q^T
    u, singular, vh = torch.linalg.svd(core)
    left = basis_k @ u  # [h, d, e], left singular vectors of M
    right = basis_q @ vh.transpose(-1, -2)  # [h, d, e], right singular vectors (row space of M)
    kept = singular > rank_rtol * singular.max(-1, keepdim=True).values  # [h, e]
    rank = kept.sum(-1)  # [h]
    norm_sq = (singular**2).sum(-1)  # ||M||_F^2
    inner = (singular * (left * right).sum(-2) * kept).sum(-1)  # <M, P>_F = sum_j s_j <l_j, r_j>
    dist_sq = (norm_sq - inner**2 / rank.clamp_min(1)).clamp_min(0.0)
    distance = torch.where(
        norm_sq > 0, dist_sq.sqrt() / norm_sq.sqrt().clamp_min(1e-300), torch.zeros_like(norm_sq)
    )
    return distance, rank


def _hf_model(model: Any) -> nn.Module:
    """The HF model behind a name, a TransformerBridge, or an HF model (never booted or changed here)."""
    if isinstance(model, str):
        from iclgd_lens import load_model

        return load_model(model).original_model
    if hasattr(model, "original_model"):
        return model.original_model
    if isinstance(model, nn.Module) and hasattr(model, "config"):
        return model
    raise IclgdError(
        "model must be a model name, a TransformerBridge or a HF LlamaForCausalLM, "
        f"got {type(model).__name__}"
    )


def _model_name(model: Any) -> str:
    """A label for the model in tables and figures."""
    if isinstance(model, str):
        return model
    name = getattr(getattr(model, "cfg", None), "model_name", None) or getattr(
        _hf_model(model).config, "name_or_path", None
    )
    return str(name) if name else "model"


def attention_weights(model: Any) -> tuple[list[dict[str, Tensor]], dict[str, int]]:
    """Per layer {"W_Q": [n_heads*d_head, d_model], "W_K", "W_V": [n_kv*d_head, d_model]} and the head shape.

    Reads `layers.{l}.self_attn.{q,k,v}_proj.weight` from the parameters of the HF model, with any
    `._original_component` (TransformerBridge wrapping) removed from the names. Tensors are the
    model's own (detached, not copied); nothing is written to them.
    """
    hf = _hf_model(model)
    found: dict[int, dict[str, Tensor]] = {}
    for name, param in hf.named_parameters():
        match = _PROJ.search(name.replace("._original_component", ""))
        if match:
            found.setdefault(int(match.group(1)), {})[f"W_{match.group(2).upper()}"] = param.detach()
    if not found or any(len(found[l]) != 3 for l in found):
        raise IclgdError(
            "no LLaMA attention weights (layers.N.self_attn.{q,k,v}_proj.weight) found in this model"
        )
    cfg = hf.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return [found[l] for l in sorted(found)], dict(n_heads=n_heads, n_kv_heads=n_kv, d_head=d_head)


def _per_head(w_q: Tensor, w_k: Tensor, n_heads: int, n_kv: int, d_head: int) -> tuple[Tensor, Tensor]:
    """Split into heads and pair each query head with its (GQA) key head: both [n_heads, d_head, d_model]."""
    q = einops.rearrange(w_q, "(h e) d -> h e d", h=n_heads, e=d_head)
    k = einops.rearrange(w_k, "(g e) d -> g e d", g=n_kv, e=d_head)
    return q, einops.repeat(k, "g e d -> (g r) e d", r=n_heads // n_kv)


def _rows(
    source: str, layer: int, weights: dict[str, Tensor], heads: tuple[int, int, int], thresholds, rank_rtol
) -> list[dict]:
    """Tidy rows of all measurements for one set of W_Q, W_K, W_V."""
    rows = []
    for matrix in MATRICES:
        w = weights[matrix]
        for t, frac in near_zero_fraction(w, thresholds).items():
            rows.append(
                dict(
                    source=source,
                    matrix=matrix,
                    layer=layer,
                    head=-1,
                    metric="near_zero_fraction",
                    threshold=t,
                    value=frac,
                )
            )
        rank = numerical_rank(w, rank_rtol)
        rows.append(
            dict(
                source=source,
                matrix=matrix,
                layer=layer,
                head=-1,
                metric="rank",
                threshold=None,
                value=float(rank),
            )
        )
        rows.append(
            dict(
                source=source,
                matrix=matrix,
                layer=layer,
                head=-1,
                metric="rank_fraction",
                threshold=None,
                value=rank / min(w.shape),
            )
        )
    q, k = _per_head(weights["W_Q"], weights["W_K"], *heads)
    distance, rank = score_matrix_structure(k, q, rank_rtol)
    for head in range(q.shape[0]):
        common = dict(source=source, matrix=SCORE_MATRIX, layer=layer, head=head, threshold=None)
        rows.append(dict(common, metric="scaled_identity_distance", value=float(distance[head])))
        rows.append(dict(common, metric="rank", value=float(rank[head])))
        rows.append(
            dict(common, metric="rank_fraction", value=float(rank[head]) / min(q.shape[1], q.shape[2]))
        )
    return rows


@checked_args
def run(
    model: Any = "tiny-llama-icl",
    *,
    thresholds: Sequence[float] = THRESHOLDS,
    d_x: int = 10,
    d_y: int = 1,
    lr: float = 1.0,
    n_context: int = 10,
    rank_rtol: float = 1e-4,
    at_model_width: bool = True,
    gaussian_baseline: bool = True,
    seed: int = 0,
) -> StudyResult:
    """Measure sparsity, score-matrix structure and ranks: construction vs Gaussian vs the model,
    side by side.

    `model`: a shipped model name (loaded with `iclgd_lens.models.load_model`), a TransformerBridge,
    or a HF LlamaForCausalLM. `d_x, d_y, lr, n_context` set the hand-built construction (one head,
    d = d_x + d_y); with `at_model_width` it is also built at d = d_model (d_x = d_model - d_y), the
    size at which Shen et al. count its zeros. The Gaussian baseline has the shapes of the model's layers.
    """
    thresholds = tuple(float(t) for t in thresholds)
    if not thresholds or any(not 0 < t < 1 for t in thresholds):
        raise IclgdError(f"thresholds must be numbers in (0, 1), got {thresholds}")
    if not 0 < rank_rtol < 1:
        raise IclgdError(f"rank_rtol must be in (0, 1), got {rank_rtol}")
    started = time.perf_counter()
    layers, heads = attention_weights(model)
    model_name = _model_name(model)
    d_model = layers[0]["W_Q"].shape[1]

    rows = []
    constructions = [(f"von Oswald (d={d_x + d_y})", d_x)]
    if at_model_width and d_model - d_y >= 1 and d_model != d_x + d_y:
        constructions.append((f"von Oswald (d={d_model})", d_model - d_y))
    for source, width in constructions:
        built = hand_built_weights(width, d_y, lr, n_context)
        d = width + d_y
        rows += _rows(source, -1, built, (1, 1, d), thresholds, rank_rtol)
    if gaussian_baseline:
        gen = torch.Generator().manual_seed(seed)
        gaussian = {m: torch.randn(*layers[0][m].shape, generator=gen) for m in MATRICES}
        rows += _rows(
            "Gaussian",
            -1,
            gaussian,
            (heads["n_heads"], heads["n_kv_heads"], heads["d_head"]),
            thresholds,
            rank_rtol,
        )
    for layer, weights in enumerate(layers):
        rows += _rows(
            model_name,
            layer,
            weights,
            (heads["n_heads"], heads["n_kv_heads"], heads["d_head"]),
            thresholds,
            rank_rtol,
        )
    table = pd.DataFrame(rows, columns=["source", "matrix", "layer", "head", "metric", "threshold", "value"])
    config = dict(
        model=model_name,
        n_layers=len(layers),
        d_model=d_model,
        **heads,
        thresholds=list(thresholds),
        d_x=d_x,
        d_y=d_y,
        lr=lr,
        n_context=n_context,
        rank_rtol=rank_rtol,
        seed=seed,
        torch=torch.__version__,
        run_time_s=round(time.perf_counter() - started, 2),
    )
    return StudyResult(
        name="weight-properties",
        question=QUESTION,
        table=table,
        figures=_figures(table),
        findings=_findings(table, model_name),
        config=config,
    )


def _figures(table: pd.DataFrame) -> list:
    """Grouped bars: near-zero fraction by threshold; scaled-identity distance; rank fractions."""
    near = (
        table[table.metric == "near_zero_fraction"]
        .groupby(["source", "matrix", "threshold"], as_index=False, sort=False)
        .value
    )
    near = near.agg(["mean", "min", "max"])
    near["t"] = near.threshold.map(lambda t: f"{t:g}")
    fig_near = px.bar(
        near,
        x="t",
        y="mean",
        color="source",
        facet_col="matrix",
        barmode="group",
        error_y=near["max"] - near["mean"],
        error_y_minus=near["mean"] - near["min"],
        labels={"t": "threshold t (|w| < t max|w|)", "mean": "near-zero fraction"},
        title="Near-zero entries (model: mean over layers, bars = min..max)",
    )
    fig_near.add_hline(
        y=SHEN_MODEL_MAX_NEAR_ZERO, line_dash="dot", annotation_text="Shen et al.: LLaMa-7B < ~0.6"
    )
    dist = table[table.metric == "scaled_identity_distance"].copy()
    dist["where"] = dist.layer.map(lambda l: "construction / baseline" if l < 0 else f"layer {l}")
    dist = dist.groupby(["source", "where"], as_index=False, sort=False).value.mean()
    fig_dist = px.bar(
        dist,
        x="where",
        y="value",
        color="source",
        barmode="group",
        range_y=[0, 1.05],
        labels={"where": "", "value": "min_c ||M - cP|| / ||M||  (mean over heads)"},
        title="Distance of W_K^T W_Q from a scaled identity on its row space",
    )
    ranks = (
        table[table.metric == "rank_fraction"]
        .groupby(["source", "matrix"], as_index=False, sort=False)
        .value.mean()
    )
    fig_rank = px.bar(
        ranks,
        x="matrix",
        y="value",
        color="source",
        barmode="group",
        range_y=[0, 1.05],
        labels={"value": "numerical rank / max rank (mean)"},
        title="Numerical ranks",
    )
    return [fig_near, fig_dist, fig_rank]


def _findings(table: pd.DataFrame, model_name: str) -> str:
    """Sentences computed from the table, set against Shen et al.'s figures."""
    near = table[table.metric == "near_zero_fraction"]
    lines = []
    for matrix in MATRICES:
        model_max = near[(near.source == model_name) & (near.matrix == matrix)].value.max()
        built = (
            near[(near.source.str.startswith("von Oswald")) & (near.matrix == matrix)]
            .groupby("source")
            .value.min()
        )
        built_text = ", ".join(f"{src} {v:.2%}" for src, v in built.items())
        verdict = "below" if model_max < SHEN_MODEL_MAX_NEAR_ZERO else "above"
        need = SHEN_CONSTRUCTION_NEAR_ZERO[matrix]
        gap = "short of" if model_max < need else "meeting"
        lines.append(
            f"{matrix}: at most {model_max:.2%} of {model_name}'s entries are near zero at any threshold and "
            f"layer ({verdict} Shen et al.'s ~60% for LLaMa-7B, {gap} the >= {need:.2%} they say the "
            f"construction needs); our hand-built weights: {built_text}."
        )
    dist = (
        table[table.metric == "scaled_identity_distance"].groupby("source").value.agg(["mean", "min", "max"])
    )
    parts = [
        f"{src} {row['mean']:.3f} (heads {row['min']:.3f}..{row['max']:.3f})" for src, row in dist.iterrows()
    ]
    lines.append(
        "Scaled-identity distance of W_K^T W_Q (0 = a multiple of a projector, as the construction): "
        + "; ".join(parts)
        + "."
    )
    ranks = (
        table[(table.metric == "rank_fraction") & (table.source == model_name)].groupby("matrix").value.mean()
    )
    lines.append(
        f"{model_name} numerical rank / max rank: "
        + ", ".join(f"{m} {v:.2f}" for m, v in ranks.items())
        + "."
    )
    return "\n".join(lines)
