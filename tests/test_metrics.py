"""Each metric against an independent computation (numpy / scipy / plain loops), plus edge cases."""

import itertools
import math

import numpy as np
import oracle_hf
import pytest
import scipy.spatial.distance
import scipy.stats
import torch

from iclgd_lens.engine import metrics
from iclgd_lens.errors import IclgdError
from iclgd_lens.tasks import OTHER_SEGMENT, QUERY_SEGMENT

torch.set_num_threads(1)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def np_cos(a, b):
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


# ---- cosines --------------------------------------------------------------------------------
def test_delta_cosine_matches_numpy_and_zero_update_is_zero():
    h_a, h_b, h_ref = (torch.randn(3, 4, 16, generator=gen(i), dtype=torch.float64) for i in range(3))
    got = metrics.delta_cosine(h_a, h_b, h_ref)
    assert got.shape == (3, 4)
    a, b, r = h_a.numpy(), h_b.numpy(), h_ref.numpy()
    for i, j in itertools.product(range(3), range(4)):
        assert got[i, j].item() == pytest.approx(np_cos(a[i, j] - r[i, j], b[i, j] - r[i, j]), abs=1e-12)
    same = metrics.delta_cosine(h_ref, h_b, h_ref)  # no ICL update at all
    assert torch.equal(same, torch.zeros_like(same))


def test_simaou_norm_matches_dai_recipe():
    h_icl, h_gd, h_zsl = (torch.randn(5, 32, generator=gen(10 + i), dtype=torch.float64) for i in range(3))
    got = metrics.simaou_norm(h_icl, h_gd, h_zsl)
    for i in range(5):
        u = [x[i].numpy() / np.linalg.norm(x[i].numpy()) for x in (h_icl, h_gd, h_zsl)]
        assert got[i].item() == pytest.approx(np_cos(u[0] - u[2], u[1] - u[2]), abs=1e-12)


def test_random_baselines_follow_dai_definitions():
    """Dai (LMOps understand_icl): the random vector is compared with the ICL update itself;
    for SimAOU_norm with the normalised ICL update unit(h_ICL) - unit(h_ZSL), never with
    unit(h_ZSL + r) - unit(h_ZSL)."""
    h_icl, h_zsl = (torch.randn(5, 32, generator=gen(20 + i), dtype=torch.float64) for i in range(2))
    r = torch.rand(5, 32, generator=gen(22), dtype=torch.float64)
    raw, norm = metrics.simaou_random(h_icl, h_zsl, r), metrics.simaou_norm_random(h_icl, h_zsl, r)
    for i in range(5):
        a, z, ri = (x[i].numpy() for x in (h_icl, h_zsl, r))
        assert raw[i].item() == pytest.approx(np_cos(a - z, ri), abs=1e-12)
        assert norm[i].item() == pytest.approx(
            np_cos(a / np.linalg.norm(a) - z / np.linalg.norm(z), ri), abs=1e-12
        )
    assert (
        norm - metrics.simaou_norm(h_icl, h_zsl + r, h_zsl)
    ).abs().max() > 0.05  # the old, wrong recipe differs


def test_simaou_norm_floor_of_one_quarter_while_raw_is_zero():
    """h_ICL = z + n1, h_GD = z + n2, n1, n2 independent, orthogonal to z, |z + n| = 2|z|."""
    d, n_trials = 2**16, 8  # cos(n1, n2) ~ 1/sqrt(d): SimAOU_norm = 1/4 + 3/4 cos(n1, n2)
    z = torch.randn(n_trials, d, generator=gen(1), dtype=torch.float64)

    def noise_orthogonal_to_z(seed):
        n = torch.randn(n_trials, d, generator=gen(seed), dtype=torch.float64)
        n = n - (n * z).sum(-1, keepdim=True) / (z * z).sum(-1, keepdim=True) * z
        return (
            n / n.norm(dim=-1, keepdim=True) * math.sqrt(3.0) * z.norm(dim=-1, keepdim=True)
        )  # |z+n|^2 = 4|z|^2

    h_icl, h_gd = z + noise_orthogonal_to_z(2), z + noise_orthogonal_to_z(3)
    assert torch.allclose((h_icl).norm(dim=-1), 2 * z.norm(dim=-1))
    normalised = metrics.simaou_norm(h_icl, h_gd, z)
    raw = metrics.delta_cosine(h_icl, h_gd, z)
    assert torch.allclose(normalised, torch.full_like(normalised, 0.25), atol=1e-2)
    assert raw.abs().max() < 0.1


def test_cosine_with_mask_and_nan_padding():
    a = torch.randn(4, 10, generator=gen(4), dtype=torch.float64)
    b = torch.randn(4, 10, generator=gen(5), dtype=torch.float64)
    lengths = [10, 7, 3, 1]
    mask = torch.arange(10)[None, :] < torch.tensor(lengths)[:, None]  # [4, 10]
    got = metrics.cosine(a, b, mask)
    for i, n in enumerate(lengths):
        assert got[i].item() == pytest.approx(np_cos(a[i, :n].numpy(), b[i, :n].numpy()), abs=1e-12)
    # the same padding marked by NaN instead of a mask
    a_nan = torch.where(mask, a, torch.tensor(float("nan"), dtype=a.dtype))
    assert torch.allclose(metrics.cosine(a_nan, b), got)
    # zero vector over the real entries -> 0; no real entry -> NaN
    zeros = metrics.cosine(torch.zeros(2, 5), torch.randn(2, 5, generator=gen(6)))
    assert torch.equal(zeros, torch.zeros(2))
    empty = metrics.cosine(a[:1], b[:1], torch.zeros(1, 10, dtype=torch.bool))
    assert torch.isnan(empty).all()


def test_matrix_cosine_is_frobenius():
    a = torch.randn(3, 4, 5, generator=gen(7), dtype=torch.float64)
    b = torch.randn(3, 4, 5, generator=gen(8), dtype=torch.float64)
    got = metrics.matrix_cosine(a, b)
    for i in range(3):
        want = np.trace(a[i].numpy().T @ b[i].numpy()) / (
            np.linalg.norm(a[i].numpy()) * np.linalg.norm(b[i].numpy())
        )
        assert got[i].item() == pytest.approx(want, abs=1e-12)
    assert metrics.matrix_cosine(torch.zeros(4, 5), b[0]).item() == 0.0


# ---- attention maps -------------------------------------------------------------------------
def test_simam_and_simam_delta_per_head_over_variable_lengths():
    batch, heads, keys = 3, 2, 6
    m_icl, m_gd, m_zsl = (
        torch.randn(batch, heads, keys, generator=gen(20 + i), dtype=torch.float64) for i in range(3)
    )
    lengths = [6, 4, 2]
    mask = torch.arange(keys)[None, :] < torch.tensor(lengths)[:, None]
    s = metrics.simam(m_icl, m_gd, mask)
    d = metrics.simam_delta(m_icl, m_gd, m_zsl, mask)
    assert s.shape == d.shape == (batch, heads)
    for bi, h in itertools.product(range(batch), range(heads)):
        n = lengths[bi]
        a, g, z = (m[bi, h, :n].numpy() for m in (m_icl, m_gd, m_zsl))
        assert s[bi, h].item() == pytest.approx(np_cos(a, g), abs=1e-12)
        assert d[bi, h].item() == pytest.approx(np_cos(a - z, g - z), abs=1e-12)


def test_select_keys_aligns_query_tokens_across_layouts():
    # ICL prompt: bos, demo (2 tokens), sep, query (3 tokens); ZSL prompt: bos, query (3 tokens), pad
    seg_icl = torch.tensor(
        [[OTHER_SEGMENT, 1, 1, OTHER_SEGMENT, QUERY_SEGMENT, QUERY_SEGMENT, QUERY_SEGMENT]]
    )
    seg_zsl = torch.tensor(
        [
            [
                OTHER_SEGMENT,
                QUERY_SEGMENT,
                QUERY_SEGMENT,
                QUERY_SEGMENT,
                OTHER_SEGMENT,
                OTHER_SEGMENT,
                OTHER_SEGMENT,
            ]
        ]
    )
    scores_icl = torch.arange(14.0).reshape(1, 2, 7)
    scores_zsl = torch.arange(14.0).reshape(1, 2, 7) * 10
    packed_icl, mask_icl = metrics.select_keys(scores_icl, seg_icl == QUERY_SEGMENT)
    packed_zsl, mask_zsl = metrics.select_keys(scores_zsl, seg_zsl == QUERY_SEGMENT)
    assert packed_icl.tolist() == [[[4.0, 5.0, 6.0], [11.0, 12.0, 13.0]]]
    assert packed_zsl.tolist() == [[[10.0, 20.0, 30.0], [80.0, 90.0, 100.0]]]
    assert mask_icl.all() and mask_zsl.all()


def test_select_keys_pads_ragged_rows_with_nan():
    keep = torch.rand(6, 9, generator=gen(40)) > 0.5
    keep[2] = False  # a row with no key kept
    keep[3] = True
    scores = torch.randn(6, 3, 9, generator=gen(41))
    packed, mask = metrics.select_keys(scores, keep)
    assert packed.shape == (6, 3, 9) and mask.shape == (6, 9)
    for b in range(6):  # slot j holds the row's j-th kept key, in position order; the rest NaN
        idx = keep[b].nonzero().squeeze(-1)
        assert mask[b].tolist() == [True] * len(idx) + [False] * (9 - len(idx))
        assert torch.equal(packed[b, :, : len(idx)], scores[b][:, idx])
        assert torch.isnan(packed[b, :, len(idx) :]).all()
    packed, mask = metrics.select_keys(scores[:, :, :4], torch.zeros(6, 4, dtype=torch.bool))
    assert packed.shape == (6, 3, 0) and mask.shape == (6, 0)


def test_demo_attention_mass_sums_per_demonstration():
    segments = torch.tensor([0, 1, 1, 0, 2, 2, 2, 0, 3, -1, -1])
    pattern = torch.softmax(torch.randn(2, 4, 11, generator=gen(30)), dim=-1)  # [batch, heads, pos]
    got = metrics.demo_attention_mass(pattern, segments)
    assert got.shape == (2, 4, 3)
    for demo in (1, 2, 3):
        want = sum(pattern[..., p] for p in range(11) if segments[p] == demo)
        assert torch.allclose(got[..., demo - 1], want.double())
    with pytest.raises(IclgdError):
        metrics.demo_attention_mass(pattern, torch.zeros(11, dtype=torch.long))


def test_kendall_matches_pair_counting():
    a = torch.randn(12, generator=gen(31))
    b = a + 0.8 * torch.randn(12, generator=gen(32))
    tau, p = metrics.kendall(a, b)
    concordant = discordant = 0
    for i, j in itertools.combinations(range(12), 2):
        s = np.sign((a[i] - a[j]).item()) * np.sign((b[i] - b[j]).item())
        concordant += s > 0
        discordant += s < 0
    assert tau == pytest.approx((concordant - discordant) / (concordant + discordant), abs=1e-12)
    assert 0.0 <= p <= 1.0
    assert all(math.isnan(v) for v in metrics.kendall([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))


# ---- output distributions -------------------------------------------------------------------
def test_token_overlap_and_overlap_cosine_against_sets():
    p1 = torch.softmax(torch.randn(5, 40, generator=gen(40), dtype=torch.float64), -1)
    p2 = torch.softmax(p1.log() + 0.7 * torch.randn(5, 40, generator=gen(41), dtype=torch.float64), -1)
    k = 10
    overlap, ocos = metrics.token_overlap(p1, p2, k), metrics.overlap_cosine(p1, p2, k)
    for i in range(5):
        top1 = set(np.argsort(-p1[i].numpy())[:k])
        top2 = set(np.argsort(-p2[i].numpy())[:k])
        both = sorted(top1 & top2)
        assert overlap[i].item() == pytest.approx(len(both) / k)
        assert ocos[i].item() == pytest.approx(np_cos(p1[i].numpy()[both], p2[i].numpy()[both]), abs=1e-12)


def test_output_metrics_of_a_nan_row_are_nan_and_of_bf16_rows_float32():
    """NaN in, NaN out (a NaN left out of the top-K set read 1.0 and 0.5 here); bf16 probabilities
    are computed in float32 (3/10 came out 0.30078125), against float64 KL/JS on the same values."""
    p1 = torch.tensor([[float("nan"), 0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.25, 0.15]])
    p2 = torch.tensor([[0.1, 0.4, 0.3, 0.2, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2]])
    for fn in (metrics.token_overlap, metrics.overlap_cosine):
        out = fn(p1, p2, k=2)
        assert math.isnan(out[0].item()) and not math.isnan(out[1].item()), fn.__name__
    q1 = torch.softmax(torch.randn(4, 10, generator=gen(60)), -1).bfloat16()
    q2 = torch.softmax(torch.randn(4, 10, generator=gen(61)), -1).bfloat16()
    log1, log2 = (torch.log_softmax(q.float().log(), -1).bfloat16() for q in (q1, q2))
    l1, l2 = log1.double().numpy(), log2.double().numpy()  # float64 on the very same bf16 values
    a, b = np.exp(l1), np.exp(l2)
    lm = np.logaddexp(l1, l2) - np.log(2.0)
    for name, values, expected in (
        ("kl", metrics.kl(log1, log2), (a * (l1 - l2)).sum(-1)),
        ("js", metrics.js(log1, log2), 0.5 * (a * (l1 - lm)).sum(-1) + 0.5 * (b * (l2 - lm)).sum(-1)),
    ):
        assert values.dtype == torch.float32, name
        np.testing.assert_allclose(values.numpy(), expected, atol=1e-6, err_msg=name)
    assert metrics.token_overlap(q1, q2, k=10).dtype == torch.float32
    assert metrics.order_sensitivity(torch.stack([q1, q2])).dtype == torch.float32


def test_overlap_cosine_is_zero_when_top_k_sets_are_disjoint():
    p1 = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.05, 0.05])
    p2 = torch.tensor([0.05, 0.05, 0.1, 0.1, 0.3, 0.4])
    assert metrics.token_overlap(p1, p2, k=2).item() == 0.0
    assert metrics.overlap_cosine(p1, p2, k=2).item() == 0.0
    with pytest.raises(IclgdError):
        metrics.token_overlap(p1, p2, k=7)


def test_kl_and_js_match_scipy_including_zero_probabilities():
    logits_p = torch.randn(4, 30, generator=gen(50), dtype=torch.float64)
    logits_q = torch.randn(4, 30, generator=gen(51), dtype=torch.float64)
    logits_p[:, :5] = -float("inf")  # p has zeros
    log_p, log_q = torch.log_softmax(logits_p, -1), torch.log_softmax(logits_q, -1)
    kl, js = metrics.kl(log_p, log_q), metrics.js(log_p, log_q)
    for i in range(4):
        p, q = log_p[i].exp().numpy(), log_q[i].exp().numpy()
        assert kl[i].item() == pytest.approx(scipy.stats.entropy(p, q), abs=1e-10)
        assert js[i].item() == pytest.approx(scipy.spatial.distance.jensenshannon(p, q) ** 2, abs=1e-10)
    assert torch.isfinite(kl).all() and (js <= math.log(2) + 1e-12).all()
    assert torch.allclose(metrics.js(log_q, log_q), torch.zeros(4, dtype=torch.float64))


def test_order_sensitivity_is_population_std_summed():
    probs = torch.softmax(
        torch.randn(10, 3, 25, generator=gen(60), dtype=torch.float64), -1
    )  # [perms, batch, vocab]
    want = np.std(probs.numpy(), axis=0, ddof=0).sum(-1)
    assert np.allclose(metrics.order_sensitivity(probs).numpy(), want)
    assert torch.allclose(
        metrics.order_sensitivity(probs[:1].expand(4, -1, -1)), torch.zeros(3, dtype=torch.float64)
    )


# ---- predictions ----------------------------------------------------------------------------
def test_accuracy_over_label_words():
    logits = torch.randn(50, 4, generator=gen(70))
    labels = torch.randint(0, 4, (50,), generator=gen(71))
    want = np.mean(np.argmax(logits.numpy(), axis=1) == labels.numpy())
    assert metrics.accuracy(logits, labels).item() == pytest.approx(want)


def test_rec2ftp_counts_and_denominator():
    zsl = np.array([0, 0, 0, 0, 0, 1, 1, 0], dtype=bool)
    gd = np.array([1, 1, 1, 0, 0, 1, 1, 1], dtype=bool)
    icl = np.array([1, 0, 1, 1, 1, 1, 0, 0], dtype=bool)
    # ZSL wrong & GD right: positions 0, 1, 2, 7 (4); of those ICL right: 0, 2 (2) -> 50%
    got = metrics.rec2ftp(torch.tensor(zsl), torch.tensor(icl), torch.tensor(gd))
    assert got == pytest.approx(50.0)
    pitfall_6 = 100 * np.sum(~zsl & gd & icl) / abs(gd.sum() - icl.sum())
    assert got != pytest.approx(pitfall_6)
    rng = np.random.default_rng(0)
    z, i, g = (rng.random(200) < 0.5 for _ in range(3))
    assert metrics.rec2ftp(torch.tensor(z), torch.tensor(i), torch.tensor(g)) == pytest.approx(
        100 * np.sum(~z & g & i) / np.sum(~z & g)
    )
    assert math.isnan(
        metrics.rec2ftp(
            torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool), torch.ones(3, dtype=torch.bool)
        )
    )


# ---- implicit weights -----------------------------------------------------------------------
def test_implicit_dw_and_dual_form_with_mask_and_gqa():
    batch, n_tok, heads_kv, heads_q, d = 2, 5, 2, 4, 3
    k = torch.randn(batch, n_tok, heads_kv, d, generator=gen(80), dtype=torch.float64)
    v = torch.randn(batch, n_tok, heads_kv, d, generator=gen(81), dtype=torch.float64)
    q = torch.randn(batch, heads_q, d, generator=gen(82), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    dw = metrics.implicit_dw_icl(k, v, mask)
    update = metrics.dual_form_update(q, k, v, mask)
    assert dw.shape == (batch, heads_kv, d, d) and update.shape == (batch, heads_q, d)
    for b in range(batch):
        for h in range(heads_kv):
            want = sum(np.outer(v[b, i, h].numpy(), k[b, i, h].numpy()) for i in range(n_tok) if mask[b, i])
            assert np.allclose(dw[b, h].numpy(), want)
        for h in range(heads_q):
            kv = h // (heads_q // heads_kv)
            want = sum(v[b, i, kv].numpy() * float(k[b, i, kv] @ q[b, h]) for i in range(n_tok) if mask[b, i])
            assert np.allclose(update[b, h].numpy(), want)
    with pytest.raises(IclgdError):
        metrics.dual_form_update(torch.randn(batch, 3, d, dtype=torch.float64), k, v)


# ---- aggregation ----------------------------------------------------------------------------
def test_batched_kendall_tau_b_equals_scipy_with_ties():
    import scipy.stats

    from iclgd_lens.engine.metrics import kendall_tau_b

    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 4, 9), generator=gen).float()  # many ties
    b = torch.randn(3, 4, 9, generator=gen)
    b[0, 0] = 1.0  # a constant row -> NaN, as scipy
    got = kendall_tau_b(a, b)
    for i in range(3):
        for j in range(4):
            want = scipy.stats.kendalltau(a[i, j].numpy(), b[i, j].numpy()).statistic
            if np.isnan(want):
                assert torch.isnan(got[i, j])
            else:
                assert abs(float(got[i, j]) - want) < 1e-6


def test_kendall_ties_are_exact_as_scipys():
    """Values a few float32 ulps apart are not tied (scipy on the values as given), equal ones
    are; integers of any size keep exact ties; a NaN gives NaN, as scipy's default."""
    one = torch.tensor(1.0)
    ulps = torch.nextafter(torch.nextafter(one, torch.tensor(2.0)), torch.tensor(2.0))  # 2 ulps above 1
    b = torch.tensor([2.0, 1.0, 0.0, 4.0])
    for a in (
        torch.stack([one, ulps, torch.tensor(0.5), torch.tensor(3.0)]),
        torch.tensor([1.0, 1.0, 0.5, 3.0]),
    ):
        want = scipy.stats.kendalltau(a.double().numpy(), b.numpy()).statistic
        assert metrics.kendall_tau_b(a, b).item() == pytest.approx(want, abs=1e-7)
    assert metrics.kendall_tau_b(torch.stack([one, ulps]), torch.tensor([0.0, 1.0])).item() == 1.0
    big = torch.tensor([10**7, 10**7 + 1, 10**7 + 2, 10**7 - 1])
    assert metrics.kendall_tau_b(big, b).item() == pytest.approx(
        scipy.stats.kendalltau(big.numpy(), b.numpy()).statistic, abs=1e-7
    )
    with_nan = torch.tensor([1.0, float("nan"), 0.5, 3.0])
    assert math.isnan(metrics.kendall_tau_b(with_nan, b).item())
    assert math.isnan(scipy.stats.kendalltau(with_nan.numpy(), b.numpy()).statistic)


def test_kendall_does_not_tie_masses_that_differ_by_a_millionth():
    """GD's per-demonstration masses at layer 0 of a real comparison (tiny-llama-icl, k = 8, seed 3,
    episode 0, float32): different demonstrations 8e-7..1e-6 apart (relative), equal ones bitwise
    equal. Their tau-b with ICL's masses is scipy's on the exact values (-0.1134, the float64
    oracle's too); the tie tolerance of 1e-6 used before 0.4.0 tied different demonstrations here
    and gave -0.1237 (computed below from its definition, to show what the exact ties change)."""
    icl = torch.tensor([1.1099657e-07, 2.6344899e-06, 6.8549070e-07, 3.6675755e-07, 4.3009426e-05,
                        2.4645604e-05, 9.5749721e-03, 9.9035347e-01])  # fmt: skip
    gd = torch.tensor([0.12522897, 0.12522897, 0.12461741, 0.12522997, 0.12461751, 0.12522985,
                       0.12522985, 0.12461751])  # fmt: skip
    want = scipy.stats.kendalltau(icl.double().numpy(), gd.double().numpy()).statistic
    assert want == pytest.approx(-0.1134, abs=1e-4)
    assert metrics.kendall_tau_b(icl, gd).item() == pytest.approx(want, abs=1e-7)
    assert oracle_hf.kendalltau(icl, gd) == pytest.approx(want, abs=1e-12)

    def signs_within(x: torch.Tensor, rtol: float) -> list[int]:  # the old rule: within rtol is a tie
        x = x.tolist()
        pairs = itertools.combinations(range(len(x)), 2)
        return [
            0 if abs(x[i] - x[j]) <= rtol * max(abs(x[i]), abs(x[j])) else (x[i] > x[j]) * 2 - 1
            for i, j in pairs
        ]

    sa, sb = signs_within(icl, 1e-6), signs_within(gd, 1e-6)
    tolerant = sum(p * q for p, q in zip(sa, sb)) / math.sqrt(sum(map(abs, sa)) * sum(map(abs, sb)))
    assert tolerant == pytest.approx(-0.1237, abs=1e-4)


def test_query_key_dots_give_equal_keys_equal_values():
    """Bitwise-equal key rows (the same token at layer 0) get bitwise-equal dot products and
    softmax values wherever they stand, and the values are the plain matmul's and softmax's;
    per-demonstration masses of equal values standing at other offsets are bitwise equal."""
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(3, 5, 64, generator=gen)  # [L, B, x]
    keys = torch.randn(3, 37, 64, generator=gen)  # [L, T, x]
    copies = [(0, 17), (0, 33), (4, 21), (9, 36), (2, 3)]
    for src, dst in copies:
        keys[:, dst] = keys[:, src]
    for softmax in (False, True):
        got = metrics.query_key_dots(queries, keys, softmax=softmax)
        plain = torch.einsum("lbx,ltx->lbt", queries.double(), keys.double())
        want = torch.softmax(plain, -1) if softmax else plain
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
        for src, dst in copies:
            assert torch.equal(got[..., src], got[..., dst])
    per_head = metrics.query_key_dots(
        queries[:, None].expand(3, 2, 5, 64), keys[:, None].expand(3, 2, 37, 64)
    )
    assert per_head.shape == (3, 2, 5, 37) and torch.equal(
        per_head[:, 0], metrics.query_key_dots(queries, keys)
    )
    values = torch.rand(4, 11, generator=gen)
    values[:, 7:10] = values[:, 1:4]  # demonstration 3 holds demonstration 1's values, at another offset
    segments = torch.tensor([0, 1, 1, 1, 2, 2, 0, 3, 3, 3, 0])
    mass = metrics.demo_attention_mass(values, segments)
    assert mass.dtype == torch.float64 and torch.equal(mass[:, 0], mass[:, 2])


def test_added_context_mask_is_demonstrations_and_separators():
    """X' of the dual form: from the first demonstration token to the token before the query,
    separators included; never BOS, the query or padding; nothing in a zero-shot prompt."""
    from iclgd_lens.tasks import added_context_mask

    O, Q = OTHER_SEGMENT, QUERY_SEGMENT
    segments = torch.tensor(
        [
            [O, 1, 1, O, 2, 2, O, Q, Q, O],  # BOS, demo 1, sep, demo 2, sep, query, padding
            [O, Q, Q, O, O, O, O, O, O, O],  # a ZSL prompt, padded
            [1, 1, O, 2, O, Q, O, O, O, O],  # no BOS
        ]
    )
    mask = torch.tensor([[1] * 9 + [0], [1] * 3 + [0] * 7, [1] * 6 + [0] * 4])
    got = added_context_mask(segments, mask)
    want = torch.zeros_like(segments, dtype=torch.bool)
    want[0, 1:7] = True
    want[2, 0:5] = True
    assert torch.equal(got, want)


def test_kendall_tau_b_is_exact_in_chunks_and_matches_scipy():
    """The chunked pair-sign tau-b equals scipy's tau-b on every row, for any chunk size (one
    row per chunk, a few rows, all rows at once), with ties, NaN for a constant row, n = 1, and
    leading dimensions of several sizes; a long row (n = 300) too."""
    import scipy.stats

    from iclgd_lens.engine.metrics import kendall_tau_b

    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 4, (2, 5, 3, 12), generator=gen).double()  # heavy ties
    b = torch.randn(2, 5, 3, 12, generator=gen, dtype=torch.float64).round(decimals=1)
    a[1, 2, 0] = 3.0  # constant -> NaN
    want = np.array(
        [
            scipy.stats.kendalltau(x, y).statistic
            for x, y in zip(a.reshape(-1, 12).numpy(), b.reshape(-1, 12).numpy())
        ]
    ).reshape(2, 5, 3)
    for chunk_bytes in (1, 3 * 66 * 4, 10**9):
        got = kendall_tau_b(a, b, chunk_bytes=chunk_bytes).numpy()
        assert got.shape == (2, 5, 3)
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(want).sum() == 1
        assert np.allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=1e-12, rtol=0)
    long_a, long_b = torch.randn(2, 300, generator=gen), torch.randn(2, 300, generator=gen)
    got = kendall_tau_b(long_a, long_b, chunk_bytes=1)  # one row per chunk
    for i in range(2):
        assert (
            abs(float(got[i]) - scipy.stats.kendalltau(long_a[i], long_b[i]).statistic) < 1e-6
        )  # float32 in
    assert torch.isnan(kendall_tau_b(torch.ones(4, 1), torch.ones(4, 1))).all()


def test_factored_dw_metrics_equal_the_dense_matrices():
    """dW_GD kept as the factors of a difference of two sums v k^T: its Frobenius cosine with a dense
    dW_ICL and its action on query vectors (GQA: 4 query heads on 2 kv heads) equal those of the
    dense matrices written out here; NaN padding and zeroed tokens do not count."""
    g = torch.Generator().manual_seed(0)
    L, B, T, KV, H, d = 2, 3, 4, 2, 4, 5
    ka, va, kb, vb = (torch.randn(L, B, T, KV, d, generator=g, dtype=torch.float64) for _ in range(4))
    ka[:, :, -1], va[:, :, -1] = 0.0, 0.0  # a token outside the context
    dense = torch.einsum("lbtxv,lbtxk->lbxvk", va, ka) - torch.einsum("lbtxv,lbtxk->lbxvk", vb, kb)
    padded = [torch.cat([x, torch.full((L, B, 1, KV, d), float("nan"), dtype=x.dtype)], 2) for x in (ka, va)]
    p, k = metrics.dw_difference_factors(*padded, kb, vb)
    a = torch.randn(L, KV, d, d, generator=g, dtype=torch.float64)
    want_cos = metrics.matrix_cosine(a[:, None].expand_as(dense), dense)
    torch.testing.assert_close(metrics.factored_matrix_cosine(a[:, None], p, k), want_cos)
    q = torch.randn(L, B, H, d, generator=g, dtype=torch.float64)
    per_head = lambda m: torch.stack(  # noqa: E731
        [torch.einsum("...vk,...k->...v", m[..., h // (H // KV), :, :], q[:, :, h]) for h in range(H)], 2
    )
    torch.testing.assert_close(metrics.dual_form_update(q, k, p), per_head(dense))
    torch.testing.assert_close(metrics.dw_act(a, q), per_head(a[:, None].expand_as(dense)))
    zero = torch.zeros_like(ka)
    assert torch.equal(
        metrics.factored_matrix_cosine(a[:, None], *metrics.dw_difference_factors(zero, zero, zero, zero)),
        torch.zeros(L, B, KV, dtype=torch.float64),
    )


# ---- half-precision inputs (a bf16 model on a GPU) --------------------------------------------
def test_bf16_inputs_are_computed_in_float32_like_scipy_on_the_same_values():
    """A bf16 model records bf16 activations. The metrics must compute on them in float32: in
    bf16, cos(x, x) comes out 1.0078 or 0.9961, and an ICL update of 1% of h is mostly rounding
    of h_ICL - h_ZSL. Oracle: scipy's cosine distance in float64 on the very same (bf16) values."""
    h = torch.randn(64, 512, generator=gen(0))
    h_icl = (h + 0.01 * torch.randn(64, 512, generator=gen(1))).bfloat16()
    h_gd = (h + 0.01 * torch.randn(64, 512, generator=gen(2))).bfloat16()
    h_zsl = h.bfloat16()
    icl, gd, zsl = (t.double().numpy() for t in (h_icl, h_gd, h_zsl))
    r = torch.rand(64, 512, generator=gen(3)).bfloat16()

    def unit(x):
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    expected = {
        "delta_cosine": [1 - scipy.spatial.distance.cosine(a - c, b - c) for a, b, c in zip(icl, gd, zsl)],
        "simaou_norm": [
            1 - scipy.spatial.distance.cosine(a - c, b - c) for a, b, c in zip(unit(icl), unit(gd), unit(zsl))
        ],
        "simaou_random": [
            1 - scipy.spatial.distance.cosine(a - c, b) for a, b, c in zip(icl, r.double().numpy(), zsl)
        ],
        "self": [1.0] * 64,
    }
    got = {
        "delta_cosine": metrics.delta_cosine(h_icl, h_gd, h_zsl),
        "simaou_norm": metrics.simaou_norm(h_icl, h_gd, h_zsl),
        "simaou_random": metrics.simaou_random(h_icl, h_zsl, r),
        "self": metrics.cosine(h_icl, h_icl),
    }
    for name, values in got.items():
        assert values.dtype == torch.float32, name
        np.testing.assert_allclose(values.numpy(), expected[name], atol=2e-6, err_msg=name)
    maps = torch.randn(8, 4, 6, generator=gen(4))
    m_icl, m_gd, m_zsl = (
        (maps + 0.01 * torch.randn(8, 4, 6, generator=gen(5 + i))).bfloat16() for i in range(3)
    )
    delta = metrics.simam_delta(m_icl, m_gd, m_zsl)
    oracle = metrics.simam_delta(m_icl.double(), m_gd.double(), m_zsl.double())
    np.testing.assert_allclose(delta.double().numpy(), oracle.numpy(), atol=2e-6)


def test_top_k_ties_go_to_the_lowest_token_ids():
    """Token overlap's top-K sets on tied probabilities (frequent in bf16): the k largest, ties at
    the k-th place to the lowest ids, as a sort by (-p, id) in plain Python gives."""
    rows = torch.tensor([[0.1, 0.3, 0.3, 0.3, 0.0], [0.2, 0.2, 0.2, 0.2, 0.2], [0.5, 0.1, 0.1, 0.2, 0.1]])
    for k in range(1, 6):
        mask = metrics._top_k_mask(rows, k)
        for row, got in zip(rows.tolist(), mask.tolist()):
            chosen = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
            assert got == [i in chosen for i in range(len(row))], (row, k)
    p1 = torch.tensor([[0.4, 0.2, 0.2, 0.2]])
    p2 = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    assert metrics.token_overlap(p1, p2, 2).item() == 0.0  # {0, 1} vs {2, 3}


def test_a_nan_update_reads_nan_not_zero():
    """A zero update has cosine 0 by convention; a NaN in an activation (a layer a probe did not
    record, an overflow in bf16) must stay NaN rather than read as "no update" (it read 0)."""
    h_zsl = torch.zeros(2, 3)
    h_icl = torch.tensor([[1.0, 2.0, 3.0], [1.0, float("nan"), 0.0]])
    h_gd = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    cos = metrics.delta_cosine(h_icl, h_gd, h_zsl)
    assert cos[0].item() == 0.0 and torch.isnan(cos[1])
    assert torch.isnan(metrics.simaou_random(h_icl, h_zsl, torch.ones(2, 3))[1])
