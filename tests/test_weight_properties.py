"""Weight properties: sparsity, scaled-identity distance and ranks of the construction vs real/random
weights."""

import pytest
import torch
from iclgd_lens.analyses import weight_properties as wp
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from iclgd_lens.errors import IclgdError
from iclgd_lens.worlds.oswald import hand_built_weights

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_bridge():
    from transformer_lens.model_bridge import TransformerBridge

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + [f"w{i}" for i in range(30)])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        name_or_path="tiny",
        add_bos_token=True,
    )
    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(vocab),
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(cfg)
    return TransformerBridge.boot_transformers("tiny", hf_model=hf, tokenizer=tok, device="cpu")


def _brute_force_distance(m: torch.Tensor, rtol: float = 1e-4) -> float:
    """min_c ||M - c P||_F / ||M||_F with P built explicitly from a full SVD of M."""
    m = m.double()
    _, s, vh = torch.linalg.svd(m)
    r = int((s > rtol * s.max()).sum())
    p = vh[:r].T @ vh[:r]
    c = (m * p).sum() / r
    return float((m - c * p).norm() / m.norm())


def test_hand_built_keys_are_sparse_and_gaussian_is_not():
    built = hand_built_weights(d_x=100, d_y=1, lr=1.0, n_context=10)
    assert wp.near_zero_fraction(built["W_K"], [1e-6])[1e-6] >= 0.99
    gaussian = torch.randn(101, 101, generator=torch.Generator().manual_seed(0))
    assert wp.near_zero_fraction(gaussian, [1e-6])[1e-6] < 0.01
    # larger thresholds catch more small Gaussian entries: monotone in t
    fractions = wp.near_zero_fraction(gaussian)
    assert fractions[1e-2] > fractions[1e-6]


def test_scaled_identity_distance_zero_for_construction_positive_for_random():
    built = hand_built_weights(d_x=10, d_y=1, lr=1.0, n_context=10)
    distance, rank = wp.score_matrix_structure(built["W_K"][None], built["W_Q"][None])
    assert distance.item() == pytest.approx(0.0, abs=1e-6)
    assert rank.item() == 10
    gen = torch.Generator().manual_seed(1)
    k, q = torch.randn(3, 4, 16, generator=gen), torch.randn(3, 4, 16, generator=gen)
    distance, rank = wp.score_matrix_structure(k, q)
    assert (distance > 0.5).all() and (rank == 4).all()
    # the factored computation agrees with the explicit projector
    for head in range(3):
        assert distance[head].item() == pytest.approx(_brute_force_distance(k[head].T @ q[head]), abs=1e-8)
    # a scaled projector (any c, any subspace) is at distance 0; adding noise moves it away
    basis = torch.linalg.qr(torch.randn(16, 5, generator=gen))[0]  # [16, 5]
    w = 3.0 * basis.T  # [5, 16]: W_K^T W_Q = 9 P
    assert wp.score_matrix_structure(w[None], w[None])[0].item() == pytest.approx(0.0, abs=1e-6)
    noisy = w + 0.3 * torch.randn(5, 16, generator=gen)
    assert wp.score_matrix_structure(w[None], noisy[None])[0].item() > 0.05


def test_run_on_bridge_reads_every_layer_and_changes_nothing(tiny_bridge):
    before = {k: v.clone() for k, v in tiny_bridge.original_model.state_dict().items()}
    result = wp.run(model=tiny_bridge)
    after = tiny_bridge.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    t = result.table
    model_rows = t[t.source == "tiny"]
    assert sorted(model_rows.layer.unique()) == [0, 1]
    heads = model_rows[model_rows.metric == "scaled_identity_distance"]
    assert len(heads) == 2 * 4  # layers x query heads (GQA: 2 kv heads shared)
    assert (heads.value > 0.5).all()
    built = t[(t.source == "von Oswald (d=11)") & (t.metric == "scaled_identity_distance")]
    assert built.value.abs().max() < 1e-6
    # findings quote the table's numbers
    w_k_max = t[(t.source == "tiny") & (t.matrix == "W_K") & (t.metric == "near_zero_fraction")].value.max()
    assert f"{w_k_max:.2%}" in result.findings
    assert len(result.figures) == 3


def test_attention_weights_match_hf_projections(tiny_bridge):
    layers, heads = wp.attention_weights(tiny_bridge)
    assert heads == dict(n_heads=4, n_kv_heads=2, d_head=8)
    assert layers[1]["W_K"].shape == (16, 32) and layers[1]["W_Q"].shape == (32, 32)
    # the same numbers the wrapped HF Linear uses (found through _original_component)
    ids = torch.tensor([[1, 5, 6, 7]])
    cache = {}
    with tiny_bridge.hooks(
        fwd_hooks=[
            ("blocks.1.attn.k.hook_in", lambda x, hook: cache.update(x=x)),
            ("blocks.1.attn.k.hook_out", lambda x, hook: cache.update(k=x)),
        ]
    ):
        tiny_bridge(ids)
    k_out = cache["k"].reshape(1, 4, -1)
    assert torch.allclose(k_out, cache["x"] @ layers[1]["W_K"].T, atol=1e-5)


def test_bad_input_is_one_line_error():
    with pytest.raises(IclgdError):
        wp.run(model=torch.nn.Linear(3, 3))
    with pytest.raises(IclgdError) as err:
        wp.run(
            model=LlamaForCausalLM(
                LlamaConfig(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    vocab_size=20,
                )
            ),
            thresholds=[2.0],
        )
    assert "\n" not in str(err.value)


def test_embedded_model_is_far_from_the_construction_and_left_unchanged():
    """The shipped tiny-llama-icl learned ICL by next-token training, not by the hand-built
    construction: its attention weights are dense (below Shen et al.'s ~60% near-zero for real
    LLMs at every threshold) and no head's W_K^T W_Q is a scaled projector; the construction at
    the same width is. Reading the weights changes nothing."""
    from iclgd_lens.models import load_model, original_state_dict

    bridge = load_model("tiny-llama-icl", device="cpu")
    before = {k: v.clone() for k, v in original_state_dict(bridge).items()}
    result = wp.run(model=bridge)
    t = result.table
    name = result.config["model"]
    model_rows = t[t.source == name]
    assert sorted(model_rows.layer.unique()) == list(range(bridge.cfg.n_layers))
    near = model_rows[model_rows.metric == "near_zero_fraction"].value
    assert near.max() < wp.SHEN_MODEL_MAX_NEAR_ZERO
    heads = model_rows[model_rows.metric == "scaled_identity_distance"].value
    assert len(heads) == bridge.cfg.n_layers * bridge.cfg.n_heads and (heads > 0.5).all()
    built = t[
        (t.source == f"von Oswald (d={bridge.cfg.d_model})") & (t.metric == "scaled_identity_distance")
    ].value
    assert len(built) == 1 and built.abs().max() < 1e-6
    after = original_state_dict(bridge)
    assert all(torch.equal(before[k], after[k]) for k in before)
