"""Baselines: Dai's uniform random vector, a random update of equal norm, the untrained model."""

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from iclgd_lens.engine.baselines import random_vector_like, untrained_copy, untrained_in_place
from iclgd_lens.engine.gd import Deltas, GDConfig
from iclgd_lens.errors import IclgdError

torch.set_num_threads(1)

INIT_STD = 0.3  # far from the trained-weight scale below, so a re-draw is visible in the std


def tiny_llama(seed=0):
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=INIT_STD,
        attention_bias=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # "trained" weights: a scale unlike the init, norms not all ones
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.05 + (1.0 if "norm" in name else 0.0))
    return model


def tiny_tokenizer():
    vocab = {f"w{i}": i for i in range(40)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="w1",
        eos_token="w2",
        unk_token="w0",
        pad_token="w3",
        name_or_path="tiny-test-llama",
        add_bos_token=True,
    )


def is_attention_or_mlp(key):
    return (".self_attn." in key or ".mlp." in key) and "norm" not in key


def test_random_vector_like_is_uniform_unit_cube_and_seeded():
    h = torch.zeros(3, 4000, dtype=torch.float64)
    state = torch.random.get_rng_state()
    r = random_vector_like(h, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global random state untouched
    assert r.shape == h.shape and r.dtype == h.dtype
    assert (r >= 0).all() and (r < 1).all()
    assert abs(r.mean().item() - 0.5) < 0.02  # not zero-mean (Dai's recipe)
    assert torch.equal(r, random_vector_like(h, seed=1))
    assert not torch.equal(r, random_vector_like(h, seed=2))


def test_scaled_random_like_keeps_norms_and_zero_episodes():
    """Deutch's random update (`Deltas.scaled_random_like`, what compare runs): per episode and
    tensor the norm of the GD delta, a different direction, seeded, dense or low-rank alike."""
    gen = torch.Generator().manual_seed(0)
    dense = torch.randn(5, 8, 16, generator=gen)
    dense[2] = 0
    low_rank = (torch.randn(5, 8, 3, generator=gen), torch.randn(5, 12, 3, generator=gen))
    deltas = Deltas(
        {"blocks.0.attn.k": dense, "blocks.0.attn.v": low_rank}, GDConfig.dai(), torch.zeros(1, 5)
    )
    state = torch.random.get_rng_state()
    r = deltas.scaled_random_like(seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)  # global random state untouched
    norms = deltas.norms()
    for path, norm in r.norms().items():
        assert r.tensors[path].shape == deltas.tensors[path].shape and path not in r.factors  # dense
        assert torch.allclose(norm, norms[path], atol=1e-5)
        cos = torch.nn.functional.cosine_similarity(
            r.tensors[path].flatten(1), deltas.tensors[path].flatten(1), dim=1
        )
        assert cos[[0, 1, 3, 4]].abs().max() < 0.6  # a different direction
    assert torch.equal(r.tensors["blocks.0.attn.k"][2], torch.zeros(8, 16))
    again, other = deltas.scaled_random_like(seed=3), deltas.scaled_random_like(seed=4)
    for path in norms:
        assert torch.equal(r.tensors[path], again.tensors[path])
        assert not torch.equal(r.tensors[path], other.tensors[path])


def test_scaled_random_like_of_a_subset_equals_those_episodes_of_the_whole():
    """compare() draws the random update a few episodes at a time: episode e's update is
    the same whichever subset it is drawn in, and each episode keeps its own norm."""
    gen = torch.Generator().manual_seed(1)
    low_rank = (torch.randn(4, 8, 3, generator=gen), torch.randn(4, 12, 3, generator=gen))
    deltas = Deltas({"blocks.0.attn.v": low_rank}, GDConfig.dai(), torch.zeros(2, 4))
    whole = deltas.scaled_random_like(seed=5).tensors["blocks.0.attn.v"]
    part = deltas.scaled_random_like(seed=5, episodes=[2, 3])
    assert torch.equal(part.tensors["blocks.0.attn.v"], whole[2:4])
    assert part.n_episodes == 2 and part.losses.shape == (2, 2)
    torch.testing.assert_close(part.norms()["blocks.0.attn.v"], deltas.norms()["blocks.0.attn.v"][2:4])


def test_dense_bytes_per_episode_is_what_the_random_update_draws_per_episode():
    """compare() sizes its chunks of the random update by Deltas.dense_bytes_per_episode: the
    bytes of one episode of scaled_random_like's dense tensors, for factors and dense parts alike."""
    gen = torch.Generator().manual_seed(1)
    parts = {
        "blocks.0.attn.k": (torch.randn(3, 8, 2, generator=gen), torch.randn(3, 12, 2, generator=gen)),
        "blocks.0.attn.v": torch.randn(3, 6, 12, dtype=torch.float64, generator=gen),
    }
    deltas = Deltas(parts, GDConfig.dai(), torch.zeros(2, 3))
    drawn = deltas.scaled_random_like(seed=0, episodes=[1]).tensors
    assert deltas.dense_bytes_per_episode() == sum(t.numel() * t.element_size() for t in drawn.values())
    assert deltas.dense_bytes_per_episode() == 8 * 12 * 4 + 6 * 12 * 8


def check_untrained(trained_sd, fresh_sd):
    """Attention/MLP weights re-drawn at the init scale, biases 0, everything else kept."""
    for key, value in trained_sd.items():
        new = fresh_sd[key]
        if is_attention_or_mlp(key) and key.endswith("weight"):
            assert not torch.equal(new, value), key
            assert abs(new.std().item() - INIT_STD) < 0.1 * INIT_STD, key
        elif is_attention_or_mlp(key) and key.endswith("bias"):
            assert torch.equal(new, torch.zeros_like(new)), key
        else:  # embeddings, norms, unembedding
            assert torch.equal(new, value), key


def test_untrained_copy_of_hf_model_leaves_it_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng_state = torch.random.get_rng_state()
    fresh = untrained_copy(model, seed=0)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert fresh is not model
    check_untrained(before, fresh.state_dict())
    again = untrained_copy(model, seed=0).state_dict()
    assert all(torch.equal(again[k], v) for k, v in fresh.state_dict().items())
    other = untrained_copy(model, seed=1).state_dict()
    assert not torch.equal(
        other["model.layers.0.self_attn.q_proj.weight"],
        fresh.state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )


def test_untrained_copy_of_bridge_is_a_new_bridge():
    from transformer_lens.model_bridge import TransformerBridge

    hf = tiny_llama()
    clean = {k: v.clone() for k, v in hf.state_dict().items()}
    bridge = TransformerBridge.boot_transformers(
        "tiny-test-llama", hf_model=hf, tokenizer=tiny_tokenizer(), device="cpu"
    )
    before = {k: v.clone() for k, v in bridge.original_model.state_dict().items()}
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        logits_before = bridge(ids)
        untrained = untrained_copy(bridge, seed=0)
        logits_after = bridge(ids)
        logits_untrained = untrained(ids)
    after = bridge.original_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits_before, logits_after)
    assert isinstance(untrained, TransformerBridge) and untrained.original_model is not hf
    assert "blocks.1.attn.hook_z" in untrained.hook_dict
    assert not torch.allclose(logits_untrained, logits_before)
    fresh_sd = {
        k.replace("._original_component", ""): v for k, v in untrained.original_model.state_dict().items()
    }
    check_untrained(clean, fresh_sd)


def test_untrained_copy_rejects_other_objects():
    with pytest.raises(IclgdError):
        untrained_copy(torch.nn.Linear(3, 3))


def test_untrained_copy_keeps_dtype():
    model = tiny_llama().double()
    fresh = untrained_copy(model, seed=0)
    assert {p.dtype for p in fresh.parameters()} == {torch.float64}


def _boot(hf):
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        "tiny-test-llama", hf_model=hf, tokenizer=tiny_tokenizer(), device="cpu"
    )


def test_untrained_in_place_is_the_untrained_copy_and_puts_the_trained_weights_back():
    """Inside the block the bridge runs exactly as untrained_copy's new bridge (bitwise, biases
    zeroed too); after it, the same Parameter objects hold the trained values again, bitwise."""
    hf = tiny_llama()
    clean = {k: v.clone() for k, v in hf.state_dict().items()}
    bridge = _boot(hf)
    params = dict(bridge.named_parameters())
    before = {k: v.clone() for k, v in bridge.original_model.state_dict().items()}
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        trained_logits = bridge(ids)
        want = untrained_copy(bridge, seed=2)(ids)
        with untrained_in_place(bridge, seed=2) as untrained:
            assert untrained is bridge
            got = bridge(ids)
            inside = {
                k.replace("._original_component", ""): v.clone()
                for k, v in bridge.original_model.state_dict().items()
            }
        after_logits = bridge(ids)
    assert torch.equal(got, want) and not torch.allclose(got, trained_logits)
    check_untrained(clean, inside)
    after = bridge.original_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(after_logits, trained_logits)
    assert all(p is params[n] for n, p in bridge.named_parameters())


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_untrained_in_place_puts_the_weights_back_when_the_block_fails(error):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error):
        with untrained_in_place(model, seed=0):
            assert not torch.equal(
                model.model.layers[0].mlp.up_proj.weight, before["model.layers.0.mlp.up_proj.weight"]
            )
            raise error("stopped inside the untrained baseline")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_untrained_in_place_rejects_other_objects():
    with pytest.raises(IclgdError):
        with untrained_in_place(torch.nn.Linear(3, 3)):
            pass


def test_untrained_in_place_refuses_offloaded_weights():
    """accelerate's offload hooks would load the trained weights back at every pass: one line instead."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    model = tiny_llama()
    add_hook_to_module(model.model.layers[1].mlp, AlignDevicesHook(execution_device="cpu", offload=True))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(IclgdError, match="offloaded"):
        with untrained_in_place(model, seed=0):
            pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
