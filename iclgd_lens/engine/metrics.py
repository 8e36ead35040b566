"""Similarities between ICL and GD, as pure functions of tensors (torch in, torch out).

No model access here: callers record activations (hooks) and pass tensors. Every function
is batched over leading dimensions; shapes are in the type-hint comments. Definitions,
papers and the choices made (zero vectors, empty overlaps, population std) are in
docs/metrics.md.

Conventions:
- Cosines of a zero vector are 0, never NaN (a zero update points nowhere, so it agrees with
  nothing). Only a comparison with *no entries at all* (an empty mask) is NaN: there is
  nothing to compare; aggregation (`iclgd_lens.engine.stats`) drops NaNs.
- Masks are bool tensors, True = a real entry, False = padding. In `cosine`, NaN entries of
  either input count as padding too.
- Half-precision inputs (a bf16 or fp16 model's recordings) are computed in float32, before any
  difference is taken: in bf16, cos(x, x) comes out 1.0078 or 0.9961, and a small update
  h_ICL - h_ZSL would be mostly the rounding of the subtraction.
"""

from __future__ import annotations

import math
from typing import Sequence

import einops
import numpy as np
import scipy.stats
import torch
from torch import Tensor

from iclgd_lens.errors import IclgdError


# ---- cosines --------------------------------------------------------------------------------
def _at_least_float32(*tensors: Tensor) -> tuple[Tensor, ...]:
    """The tensors, half-precision ones (bf16, fp16) converted to float32; others unchanged."""
    return tuple(t.float() if t.is_floating_point() and t.element_size() < 4 else t for t in tensors)


def _safe_cosine(a: Tensor, b: Tensor) -> Tensor:
    """cos(a, b) over the last dim; 0 where either vector is zero, NaN where either holds a NaN
    (a NaN activation must not read as "no update"). [..., d] -> [...]"""
    a, b = _at_least_float32(a, b)
    dot = (a * b).sum(-1)
    norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
    return torch.where(norms == 0, torch.zeros_like(dot), dot / torch.where(norms == 0, 1.0, norms))


def cosine(a: Tensor, b: Tensor, mask: Tensor | None = None) -> Tensor:
    """Cosine over the last dim, counting only entries marked real.

    a, b [..., n]; mask [..., n] bool (True = real), broadcastable to a; NaN entries of a or b
    are also treated as padding. -> [...]. Zero vector (over the real entries) -> 0;
    no real entry at all -> NaN.
    """
    a, b = torch.broadcast_tensors(*_at_least_float32(a, b))
    valid = ~(torch.isnan(a) | torch.isnan(b))
    if mask is not None:
        valid = valid & mask.to(torch.bool)
    zero = torch.zeros((), dtype=a.dtype, device=a.device)
    out = _safe_cosine(torch.where(valid, a, zero), torch.where(valid, b, zero))
    return torch.where(valid.any(-1), out, torch.full_like(out, float("nan")))


def delta_cosine(h_a: Tensor, h_b: Tensor, h_ref: Tensor) -> Tensor:
    """cos(h_a - h_ref, h_b - h_ref) over the last dim: SimAOU (raw form) when
    h_a = h_ICL, h_b = h_GD, h_ref = h_ZSL. [..., d] x3 -> [...]; 0 if an update is zero."""
    h_a, h_b, h_ref = _at_least_float32(h_a, h_b, h_ref)
    return _safe_cosine(h_a - h_ref, h_b - h_ref)


simaou = delta_cosine


def _unit(h: Tensor) -> Tensor:
    """h / |h| over the last dim (a zero vector stays zero). [..., d] -> [..., d]"""
    (h,) = _at_least_float32(h)
    n = torch.linalg.vector_norm(h, dim=-1, keepdim=True)
    return h / torch.where(n > 0, n, torch.ones_like(n))


def simaou_norm(h_icl: Tensor, h_gd: Tensor, h_zsl: Tensor) -> Tensor:
    """Dai et al.'s SimAOU: L2-normalise each h first, then subtract and take the cosine.

    [..., d] x3 -> [...]. Has a floor of 1/4 for unrelated updates of twice the size of h_ZSL
    (see docs/metrics.md); report `delta_cosine` by default, this one for replication.
    """
    return delta_cosine(_unit(h_icl), _unit(h_gd), _unit(h_zsl))


def simaou_random(h_icl: Tensor, h_zsl: Tensor, r: Tensor) -> Tensor:
    """Dai's random baseline of the raw SimAOU: cos(h_ICL - h_ZSL, r), with r drawn as an
    update (r ~ U[0,1)^d, `baselines.random_vector_like`). [..., d] x3 -> [...]"""
    h_icl, h_zsl = _at_least_float32(h_icl, h_zsl)
    return _safe_cosine(h_icl - h_zsl, r)


def simaou_norm_random(h_icl: Tensor, h_zsl: Tensor, r: Tensor) -> Tensor:
    """Dai's random baseline of SimAOU_norm: the normalised ICL update against r itself,
    cos(unit(h_ICL) - unit(h_ZSL), r) (LMOps understand_icl), not against unit(h_ZSL + r) -
    unit(h_ZSL). [..., d] x3 -> [...]"""
    return _safe_cosine(_unit(h_icl) - _unit(h_zsl), r)


def matrix_cosine(a: Tensor, b: Tensor) -> Tensor:
    """Frobenius cosine <A, B>_F / (|A|_F |B|_F) of the last two dims. [..., m, n] -> [...];
    0 if a zero matrix."""
    return _safe_cosine(
        einops.rearrange(a, "... m n -> ... (m n)"), einops.rearrange(b, "... m n -> ... (m n)")
    )


# ---- attention maps -------------------------------------------------------------------------
def simam(scores_a: Tensor, scores_b: Tensor, mask: Tensor | None = None) -> Tensor:
    """SimAM (Dai): cosine between two attention maps of the read position, per head.

    scores_a, scores_b [batch, heads, keys]: the read position's pre-softmax scores over the
    same keys (the query's own tokens, aligned with `select_keys`); mask [batch, keys] bool
    (True = real key; padding may also be NaN). -> [batch, heads].
    """
    if mask is not None:
        mask = einops.rearrange(mask.to(torch.bool), "b k -> b 1 k")
    return cosine(scores_a, scores_b, mask)


def simam_delta(m_icl: Tensor, m_gd: Tensor, m_zsl: Tensor, mask: Tensor | None = None) -> Tensor:
    """SimAM-delta (Deutch): cos(m_ICL - m_ZSL, m_GD - m_ZSL) per head.
    [batch, heads, keys] x3, mask [batch, keys] -> [batch, heads]."""
    m_icl, m_gd, m_zsl = _at_least_float32(m_icl, m_gd, m_zsl)
    return simam(m_icl - m_zsl, m_gd - m_zsl, mask)


def select_keys(scores: Tensor, keep: Tensor) -> tuple[Tensor, Tensor]:
    """Pack the keys marked in `keep` to the left, so that maps from prompts of different
    layouts (ICL vs ZSL) line up key by key.

    scores [batch, heads, pos] (one query row per prompt), keep [batch, pos] bool (e.g.
    segments == QUERY_SEGMENT) -> (packed [batch, heads, n_max] with NaN padding, mask [batch, n_max]).
    Slot j of a row is its j-th kept key, in position order; n_max is the most keys kept in a row.
    """
    keep = keep.to(device=scores.device, dtype=torch.bool)
    n_max = int(keep.sum(-1).max()) if keep.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[
        :, :n_max
    ]  # kept positions first, in order
    mask = torch.gather(keep, 1, order)  # [batch, n_max]
    packed = torch.gather(
        scores, 2, order[:, None, :].expand(-1, scores.shape[1], -1)
    )  # [batch, heads, n_max]
    return packed.masked_fill(~mask[:, None, :], float("nan")), mask


def demo_attention_mass(pattern_row: Tensor, segments: Tensor, n_demos: int | None = None) -> Tensor:
    """Attention mass the read position puts on each demonstration (Dai's example-level Kendall).

    pattern_row [..., pos] (post-softmax attention of the read position over keys),
    segments [..., pos] (broadcastable; i+1 for demonstration i, <= 0 otherwise, see tasks.py)
    -> [..., n_demos] float64 (n_demos defaults to segments.max()). Summed in float64, where a sum
    of a demonstration's float32 values is exact in any order: two demonstrations holding the same
    values get the same mass bitwise, a tie for Kendall's exact ties, whatever order a kernel adds in.
    """
    segments = segments.to(pattern_row.device).long()
    n_demos = int(segments.max()) if n_demos is None else n_demos
    if n_demos < 1:
        raise IclgdError("demo_attention_mass needs at least one demonstration segment (ids >= 1)")
    one_hot = torch.nn.functional.one_hot(segments.clamp(min=0, max=n_demos), n_demos + 1)[..., 1:]
    return torch.einsum("...p,...pd->...d", pattern_row.double(), one_hot.double())


def query_key_dots(queries: Tensor, keys: Tensor, *, softmax: bool = False) -> Tensor:
    """Dot products of query rows with key rows, [..., B, x] . [..., T, x] -> [..., B, T] (with
    `softmax`, softmaxed over T): the GD side of Dai's Kendall and of its per-head variant.

    Bitwise-equal key rows (within one leading index) give bitwise-equal values: each distinct key
    row is multiplied once and its value copied to every position that holds it (the softmax too:
    exp of the distinct values, weighted by how often each occurs). At layer 0 the same token has
    the same pre-rotary query, so its values are equal by construction; a matmul would give them
    whatever last bits the kernel's lanes give each row, and Kendall's exact ties would rank them
    by that rounding, differently on another CPU or GPU.
    """
    lead = queries.shape[:-2]
    flat_q, flat_k = queries.reshape(-1, *queries.shape[-2:]), keys.reshape(-1, *keys.shape[-2:])
    out = []
    for q, k in zip(flat_q, flat_k):  # q [B, x], k [T, x]
        distinct, position_of, counts = torch.unique(k, dim=0, return_inverse=True, return_counts=True)
        values = q @ distinct.T  # [B, U]
        if softmax:
            weights = torch.exp(values - values.amax(-1, keepdim=True))
            values = weights / (weights * counts.to(weights.dtype)).sum(-1, keepdim=True)
        out.append(values[:, position_of])
    return torch.stack(out).reshape(*lead, queries.shape[-2], keys.shape[-2])


KENDALL_CHUNK_BYTES = 64 * 2**20
"""Bound on the pair-sign tensors `kendall_tau_b` holds at once (float32 [rows, n (n - 1) / 2] each)."""


def kendall_tau_b(a: Tensor, b: Tensor, chunk_bytes: int = KENDALL_CHUNK_BYTES) -> Tensor:
    """Kendall's tau-b over the last dim, batched: [..., n] x2 -> [...] (scipy's default variant).

    tau_b = sum_{i<j} sgn(a_i - a_j) sgn(b_i - b_j) / sqrt(n_a n_b), n_a / n_b = pairs not tied
    in a / b. Exact ties, as scipy: values equal by construction must be computed equal
    (`query_key_dots`, `demo_attention_mass`), since no tolerance tells a rounding difference from
    a real one (at layer 0 GD's masses of two different demonstrations differ by 1e-6 relative,
    about 8 float32 ulps). NaN where either input is constant, holds
    a NaN, or n < 2 (as scipy's default). Exact: the pair signs are
    -1, 0, 1 and their sums integers below 2^24 (n < 5793), which float32 holds exactly (the
    untied counts are the squared norms of the signs, rounded to int64). Memory: only the
    n (n - 1) / 2 pairs i < j, rows taken in chunks of at most `chunk_bytes` per sign tensor
    (never one float64 [..., n, n] tensor for the whole batch).
    """
    a, b = torch.broadcast_tensors(a, b)
    lead, n = a.shape[:-1], a.shape[-1]
    out_dtype = a.dtype if a.is_floating_point() else torch.float64
    exact = torch.float32 if n < 5793 else torch.float64
    flat_a, flat_b = a.reshape(-1, n), b.reshape(-1, n)
    i, j = torch.triu_indices(n, n, 1, device=a.device)  # the pairs i < j
    rows = max(1, chunk_bytes // max(1, len(i) * exact.itemsize))
    concordance, untied_a, untied_b = [], [], []

    def pair_signs(x: Tensor) -> Tensor:  # [rows, n] -> [rows, pairs]: sgn(x_i - x_j) in x's own dtype
        return x.index_select(1, i).sub_(x.index_select(1, j)).sign_().to(exact)

    def untied(signs: Tensor) -> Tensor:  # pairs with a nonzero sign: sum of squared signs, exact
        return torch.linalg.vector_norm(signs, dim=-1).double().square().round().long()

    for start in range(0, flat_a.shape[0], rows):
        da, db = pair_signs(flat_a[start : start + rows]), pair_signs(flat_b[start : start + rows])
        untied_a.append(untied(da))  # (a norm: count_nonzero took 6x as long)
        untied_b.append(untied(db))
        concordance.append(da.mul_(db).sum(-1).double())  # [rows]
    if not concordance:  # an empty batch
        return torch.empty(lead, dtype=out_dtype, device=a.device)
    con = torch.cat(concordance)
    untied = torch.sqrt(torch.cat(untied_a).double() * torch.cat(untied_b).double())
    defined = (untied > 0) & ~(flat_a.isnan().any(-1) | flat_b.isnan().any(-1))  # NaN in: NaN, as scipy
    tau = torch.where(
        defined,
        con / torch.where(untied > 0, untied, torch.ones_like(untied)),
        torch.full_like(untied, float("nan")),
    )
    return tau.reshape(lead).to(out_dtype)


def kendall(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> tuple[float, float]:
    """Kendall's tau-b and its two-sided p-value (scipy.stats.kendalltau) between two flattened
    rankings of equal size. NaN, NaN when fewer than 2 items or a constant input."""
    x = torch.as_tensor(a).detach().double().flatten().cpu().numpy()
    y = torch.as_tensor(b).detach().double().flatten().cpu().numpy()
    if x.shape != y.shape:
        raise IclgdError(f"kendall needs inputs of equal size, got {x.size} and {y.size}")
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan"), float("nan")
    res = scipy.stats.kendalltau(x, y)
    return float(res.statistic), float(res.pvalue)


# ---- output distributions (Shen et al. 2024) ------------------------------------------------
def _top_k_mask(p: Tensor, k: int) -> Tensor:
    """Bool [..., vocab]: True on the k largest entries of p; ties at the k-th place go to the
    lowest token ids. (A bf16 model's probabilities tie often, and which tied index `topk`
    returns differs between CPU and GPU kernels: the rule makes the set the same on every device.)"""
    if not 1 <= k <= p.shape[-1]:
        raise IclgdError(f"k must be between 1 and the vocabulary size {p.shape[-1]}, got {k}")
    kth = p.topk(k, dim=-1).values[..., -1:]  # [..., 1]: the k-th largest value
    above, tied = p > kth, p == kth
    room = k - above.sum(-1, keepdim=True)  # [..., 1]: places left for the tied entries
    return above | (tied & (tied.cumsum(-1) <= room))


def token_overlap(p1: Tensor, p2: Tensor, k: int = 10) -> Tensor:
    """|topK(p1) ∩ topK(p2)| / K over the last (vocabulary) dim. [..., vocab] -> [...] in [0, 1];
    NaN where either row holds a NaN (its top-K set is not defined)."""
    p1, p2 = _at_least_float32(p1, p2)
    both = _top_k_mask(p1, k) & _top_k_mask(p2, k)
    return _nan_where_nan(both.sum(-1).to(p1.dtype) / k, p1, p2)


def _nan_where_nan(out: Tensor, *rows: Tensor) -> Tensor:
    """`out` [...] with NaN where any of the `rows` [..., vocab] holds a NaN."""
    bad = torch.zeros(out.shape, dtype=torch.bool, device=out.device)
    for row in rows:
        bad = bad | row.isnan().any(-1)
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def overlap_cosine(p1: Tensor, p2: Tensor, k: int = 10) -> Tensor:
    """Cosine between p1 and p2 restricted to the tokens in both top-K sets. [..., vocab] -> [...].

    0 when the top-K sets do not overlap (the distributions agree on no likely token); NaN where
    either row holds a NaN.
    """
    p1, p2 = _at_least_float32(p1, p2)
    both = _top_k_mask(p1, k) & _top_k_mask(p2, k)
    zero = torch.zeros((), dtype=p1.dtype, device=p1.device)
    return _nan_where_nan(_safe_cosine(torch.where(both, p1, zero), torch.where(both, p2, zero)), p1, p2)


def kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) in nats from log-probabilities over the last dim. [..., vocab] -> [...].
    Terms with p = 0 count 0; p > 0 where q = 0 gives inf."""
    log_p, log_q = _at_least_float32(log_p, log_q)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def js(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Jensen-Shannon divergence in nats (in [0, ln 2]) from log-probabilities. [..., vocab] -> [...]."""
    log_p, log_q = _at_least_float32(log_p, log_q)
    log_m = torch.logaddexp(log_p, log_q) - math.log(2.0)
    return 0.5 * kl(log_p, log_m) + 0.5 * kl(log_q, log_m)


def order_sensitivity(probs: Tensor) -> Tensor:
    """Shen's Sen: population std (correction=0) over permutations of each output probability,
    summed over the vocabulary. probs [n_perms, ..., vocab] -> [...]."""
    if probs.shape[0] < 2:
        raise IclgdError(f"order_sensitivity needs at least 2 permutations, got {probs.shape[0]}")
    (probs,) = _at_least_float32(probs)
    return probs.std(dim=0, correction=0).sum(-1)


# ---- predictions ----------------------------------------------------------------------------
def label_correct(logits_over_labels: Tensor, labels: Tensor) -> Tensor:
    """Whether the argmax over the label words hits the label. [batch, n_labels], [batch] -> bool [batch]."""
    return logits_over_labels.argmax(-1) == labels.to(logits_over_labels.device)


def accuracy(logits_over_labels: Tensor, labels: Tensor) -> Tensor:
    """Fraction of argmax-over-label-words predictions that are right (Dai's protocol).
    [batch, n_labels], [batch] -> scalar tensor in [0, 1]."""
    return label_correct(logits_over_labels, labels).float().mean()


def rec2ftp(zsl_correct: Tensor, icl_correct: Tensor, gd_correct: Tensor) -> float:
    """Rec2FTP (Dai) = 100 * |ZSL wrong, GD right, ICL right| / |ZSL wrong, GD right|.

    Bool [n] each. NaN when no query is wrong zero-shot and right after GD (never the
    |GD right - ICL right| denominator of docs/science.md, pitfall 6).
    """
    zsl, icl, gd = (
        torch.as_tensor(t).to(torch.bool).flatten() for t in (zsl_correct, icl_correct, gd_correct)
    )
    if not (zsl.shape == icl.shape == gd.shape):
        raise IclgdError("rec2ftp needs zsl_correct, icl_correct and gd_correct of equal length")
    fixed_by_gd = ~zsl & gd
    denominator = int(fixed_by_gd.sum())
    if denominator == 0:
        return float("nan")
    return 100.0 * int((fixed_by_gd & icl).sum()) / denominator


# ---- implicit weights (Dai's dual form) -----------------------------------------------------
def implicit_dw_icl(k_demo: Tensor, v_demo: Tensor, mask: Tensor | None = None) -> Tensor:
    """dW_ICL = sum_i v_i k_i^T over the tokens X' the demonstrations add, per (kv) head (Dai's
    dual form; `tasks.added_context_mask` gives X': the demonstrations and their separators).

    k_demo, v_demo [..., n_tokens, heads, d_head]; mask [..., n_tokens] bool (True = a token
    of X') -> [..., heads, d_head (v), d_head (k)].
    """
    if mask is not None:
        w = mask.to(k_demo.dtype)
        k_demo = k_demo * einops.rearrange(w, "... n -> ... n 1 1")
    return torch.einsum("...nhv,...nhk->...hvk", v_demo, k_demo)


def dw_difference_factors(k_a: Tensor, v_a: Tensor, k_b: Tensor, v_b: Tensor) -> tuple[Tensor, Tensor]:
    """dW_a - dW_b, each dW = sum_t v_t k_t^T over its own tokens, as factors (P, K) with
    dW_a - dW_b = sum_t P_t K_t^T: P = [v_a; -v_b], K = [k_a; k_b] along the tokens.

    k_*, v_* [..., tokens, heads, d_head], tokens that do not count set to zero (NaN padding
    from joining chunks of other lengths counts as zero too) -> P, K [..., tokens_a + tokens_b,
    heads, d_head] in float64: the dW metrics below are computed from them without forming the
    d_head x d_head matrix of every row, and without the cancellation of a float32 difference
    (`factored_matrix_cosine`; `dual_form_update(q, K, P)` is their dW q)."""
    zero = lambda x: torch.nan_to_num(x.double(), nan=0.0)  # noqa: E731
    return torch.cat([zero(v_a), -zero(v_b)], -3), torch.cat([zero(k_a), zero(k_b)], -3)


def factored_matrix_cosine(a: Tensor, p: Tensor, k: Tensor) -> Tensor:
    """`matrix_cosine(A, B)` of a dense A [..., heads, m, n] and B = sum_t p_t k_t^T, p [..., t,
    heads, m], k [..., t, heads, n] (leading dims broadcast), without forming B: <A, B>_F =
    sum_t p_t^T A k_t and |B|_F^2 = sum_{t,s} (p_t . p_s)(k_t . k_s), in float64. -> [..., heads];
    0 where either matrix is zero."""
    a, p, k = a.double(), p.double(), k.double()
    inner = (torch.einsum("...hmn,...thn->...thm", a, k) * p).sum((-3, -1))
    gram_p = torch.einsum("...thm,...shm->...hts", p, p)
    gram_k = torch.einsum("...thn,...shn->...hts", k, k)
    norm_b = (gram_p * gram_k).sum((-2, -1)).clamp(min=0).sqrt()
    norms = torch.linalg.vector_norm(a, dim=(-2, -1)) * norm_b
    return torch.where(norms > 0, inner / torch.where(norms > 0, norms, torch.ones_like(norms)), 0.0)


def dw_act(dw: Tensor, q: Tensor) -> Tensor:
    """dW q per query head under GQA (query head h reads kv head h // (heads_q / heads_kv)).
    dw [L, heads_kv, m, n] (one matrix per layer and kv head, shared by every row), q [L, rows,
    heads_q, n] -> [L, rows, heads_q, m]; the rows ride in the matmul, dW is never copied per row."""
    grouped = einops.rearrange(q, "l b (kv g) n -> l b kv g n", kv=dw.shape[-3])
    out = torch.einsum("lxmn,lbxgn->lbxgm", dw.to(q.dtype), grouped)
    return einops.rearrange(out, "l b kv g m -> l b (kv g) m")


def dual_form_update(q: Tensor, k_demo: Tensor, v_demo: Tensor, mask: Tensor | None = None) -> Tensor:
    """The linear-attention prediction of the ICL update of the read position: dW_ICL q.

    q [..., heads_q, d_head]; k_demo, v_demo [..., n_tokens, heads_kv, d_head] (GQA: query
    head h reads kv head h // (heads_q / heads_kv)); mask [..., n_tokens] -> [..., heads_q, d_head].
    Unnormalised (no softmax, no 1/sqrt(d_head)), as in the dual form. Computed as
    sum_i v_i (k_i . q), without forming dW_ICL: the same product for any pair of factors, e.g.
    the change of sum v k^T that `dw_difference_factors` returns.
    """
    if mask is not None:
        k_demo = k_demo * einops.rearrange(mask.to(k_demo.dtype), "... n -> ... n 1 1")
    heads_q, heads_kv = q.shape[-2], k_demo.shape[-2]
    if heads_q % heads_kv:
        raise IclgdError(f"{heads_q} query heads cannot share {heads_kv} key/value heads")
    grouped = einops.rearrange(q, "... (kv g) k -> ... kv g k", kv=heads_kv)
    weights = torch.einsum("...nxk,...xgk->...nxg", k_demo, grouped)  # k_i . q per token
    out = torch.einsum("...nxv,...nxg->...xgv", v_demo, weights)
    return einops.rearrange(out, "... kv g v -> ... (kv g) v")


# ---- values that are undefined by definition ------------------------------------------------------
UNDEFINED_BECAUSE: dict[str, str] = {
    "simam_delta": (
        "at layer 0 of a rotary model ICL cannot change the query's own pre-softmax scores (a zero update)"
    ),
    "rec2ftp": "no query of the episode is wrong zero-shot and right after GD (an empty denominator)",
    "kendall_token": (
        "a demonstration tokenises to another number of tokens in the prompt than alone, "
        "or a ranking is constant"
    ),
    "kendall_example": (
        "a ranking is constant (every demonstration tied) or there are fewer than 2 demonstrations"
    ),
    "kendall_token_per_head": "a ranking is constant or there are fewer than 2 demonstration tokens",
    "kendall_example_per_head": "a ranking is constant or there are fewer than 2 demonstrations",
}
"""Why a metric can be NaN (shown as "undefined" with this reason, never as a number); see docs/metrics.md."""
