"""The memory model (iclgd_lens.engine.memory): its structure, not timings or measured peaks (those
are benchmarks/engine.py's and benchmarks/gpu_check.py's). Terms are checked against sizes computed
here from the shapes, and against a real prefix KV cache."""

from __future__ import annotations

import pytest
import torch

from iclgd_lens.engine import memory
from iclgd_lens.engine.memory import Lengths, ModelShape, predict

SHAPE = ModelShape(
    n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128, d_vocab=100, n_params=100_000
)
LENGTHS = Lengths(demo=6, train=48, prefix=50, suffix=4, zsl=5, query_tokens=3)
ALL_PROBES = ("attn_out", "head_out", "scores", "demo_attention", "query_vectors", "kv_outer", "resid_out")
ALL_BASELINES = ("random", "random_update", "icl_perm", "untrained")


def plan(**kw):
    args = dict(n_episodes=8, n_queries=16, k=8, probes=ALL_PROBES, baselines=ALL_BASELINES, batch_size=64)
    return predict(SHAPE, LENGTHS, **{**args, **kw})


def test_the_peak_is_the_largest_phase_and_its_terms_add_up():
    p = plan()
    totals = {name: sum(terms.values()) for name, terms in p.phases.items()}
    assert set(totals) == {"gd", "prefix", "queries", "table", "untrained"}
    assert p.peak_bytes == max(totals.values()) and p.phase == max(totals, key=totals.get)
    assert p.total_bytes == p.peak_bytes + SHAPE.model_bytes
    assert "predicted peak" in p.describe() and p.phase in p.describe()


def test_terms_equal_the_shapes_they_stand_for():
    """The query pass's keys and values (the groups' prefix cache once, one layer's buffer of the
    rows), the random update's dense deltas and the low-rank factors, each against the formula
    written out here."""
    p = plan(batch_size=32)
    b, L, d_kv = 4, SHAPE.n_layers, SHAPE.n_kv_heads * SHAPE.d_head
    rows, groups = 32, 2  # two episodes of 16 queries per ICL pass
    prefix_cache = groups * L * 2 * LENGTHS.prefix * d_kv * b
    one_layer = (
        rows * 2 * (LENGTHS.prefix + LENGTHS.suffix) * (d_kv + SHAPE.n_heads * SHAPE.d_head) * b
    )  # GQA
    query_pass = p.phases["queries"]["ICL query pass (prefix cache, one layer of row keys)"]
    assert prefix_cache + one_layer <= query_pass < prefix_cache + 2 * one_layer + 10**6
    # K and V, every layer, dense, for the 2 episodes of one group (they fit RANDOM_UPDATE_BYTES)
    random_deltas = 2 * 2 * L * SHAPE.d_model * d_kv * b
    assert p.phases["queries"]["random-update deltas"] == random_deltas
    # a shape whose one episode's dense K/V update is above RANDOM_UPDATE_BYTES: one episode at a time
    wide = ModelShape(
        n_layers=32,
        d_model=4096,
        n_heads=32,
        n_kv_heads=32,
        d_head=128,
        d_mlp=11008,
        d_vocab=32000,
        n_params=6_700_000_000,
        bytes_per_element=2,
    )
    big = predict(
        wide, LENGTHS, n_episodes=8, n_queries=6, k=8, probes=("attn_out",), baselines=ALL_BASELINES
    )
    assert big.phases["queries"]["random-update deltas"] == 32 * 2 * 4096 * 4096 * 2
    # rank 48 is past the break-even rank 64 * 32 / 96 = 21.3 of a 64 -> 32 projection: dense + gradient
    assert p.phases["table"]["deltas"] == 2 * 8 * 2 * L * SHAPE.d_model * d_kv * b
    short = Lengths(demo=4, train=16, prefix=50, suffix=4, zsl=5, query_tokens=3)  # rank 16: low-rank
    low = predict(SHAPE, short, n_episodes=8, n_queries=16, k=4, probes=("attn_out",), baselines=())
    assert low.phases["table"]["deltas"] == 8 * 2 * L * 16 * (SHAPE.d_model + d_kv) * b


def test_kv_cache_term_covers_a_real_shared_prefix_cache():
    """A real HF prefix cache under the SharedPrefixCache of 32 query rows, as run_shared_prefixes
    uses it, holds no more than the model's KV term; and plain HF's logits on it equal those on
    HF's own DynamicCache copied to every row."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from iclgd_lens.engine.prefix_cache import SharedPrefixCache

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    prefix_ids, query_ids = (
        torch.randint(0, 100, (2, LENGTHS.prefix)),
        torch.randint(0, 100, (32, LENGTHS.suffix)),
    )
    row_group = torch.arange(2).repeat_interleave(16)
    with torch.no_grad():
        cache = hf(prefix_ids, use_cache=True).past_key_values
        shared = SharedPrefixCache(cache, row_group)
        logits = hf(query_ids, past_key_values=shared, use_cache=True).logits
        copied = hf(prefix_ids, use_cache=True).past_key_values
        copied.batch_select_indices(row_group)
        want = hf(query_ids, past_key_values=copied, use_cache=True).logits
    torch.testing.assert_close(logits, want, atol=1e-6, rtol=1e-5)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    held += sum(t.numel() * t.element_size() for t in (shared.scratch.keys, shared.scratch.values))
    shape = ModelShape.of(hf)
    term = predict(
        shape, LENGTHS, n_episodes=2, n_queries=16, k=8, probes=("attn_out",), baselines=(), batch_size=32
    ).phases["queries"]["ICL query pass (prefix cache, one layer of row keys)"]
    rows, pos, keys = 32, LENGTHS.suffix, LENGTHS.prefix + LENGTHS.suffix
    activations = (
        rows
        * pos
        * (memory.PASS_D_MODEL * 64 + memory.PASS_D_MLP * 128 + memory.PASS_SCORES * 4 * keys + 100)
        * 4
    )  # the pass's own activations and logits
    gqa_expanded = (
        rows * 2 * keys * 4 * 16 * 4
    )  # one layer's keys and values repeated to 4 heads (the bridge)
    assert held <= term <= 1.2 * held + activations + gqa_expanded


def test_more_work_never_needs_less_memory():
    base = plan().peak_bytes
    assert plan(n_queries=32).peak_bytes >= base
    assert plan(n_episodes=16).peak_bytes >= base
    assert plan(probes=("attn_out",)).peak_bytes < base  # kv_outer, Kendall and friends cost memory
    assert plan(baselines=()).peak_bytes < base
    assert plan(batch_size=16).peak_bytes <= base


def test_batch_size_is_chosen_to_fit_the_budget():
    big = memory.choose_batch_size(SHAPE, LENGTHS, None, **_kw())
    assert big.batch_size == memory.BATCH_SIZES[0] and big.fits
    small = memory.choose_batch_size(SHAPE, LENGTHS, big.total_bytes - 1, **_kw())
    assert small.batch_size < big.batch_size and small.total_bytes < big.total_bytes and small.fits
    none = memory.choose_batch_size(SHAPE, LENGTHS, 1000, **_kw())
    assert not none.fits and "does NOT fit" in none.describe()
    # a given batch_size is the cap: used as given when it fits, else the largest size below it that does
    capped = memory.choose_batch_size(SHAPE, LENGTHS, big.total_bytes, batch_size=24, **_kw())
    assert capped.batch_size == 24 and capped.fits
    over = memory.choose_batch_size(SHAPE, LENGTHS, None, batch_size=96, **_kw())
    tight = memory.choose_batch_size(SHAPE, LENGTHS, over.total_bytes - 1, batch_size=96, **_kw())
    assert over.batch_size == 96 and tight.batch_size == max(b for b in memory.BATCH_SIZES if b < 96)
    assert tight.fits


def _kw():
    return dict(n_episodes=8, n_queries=16, k=8, probes=ALL_PROBES, baselines=ALL_BASELINES)


def test_plan_compare_reads_the_model_and_task():
    from iclgd_lens import load_model

    model = load_model(device="cpu")
    p = memory.plan_compare(model, k=4, n_episodes=2, n_queries=4)
    assert p.model_bytes == sum(t.numel() * t.element_size() for t in model.original_model.parameters())
    assert p.peak_bytes > 0 and p.batch_size == 128 and "untrained" in p.phases  # compare's default
    with pytest.raises(Exception):
        memory.predict(
            ModelShape.of(model),
            LENGTHS,
            n_episodes=1,
            n_queries=1,
            k=1,
            probes=(),
            baselines=(),
            gd_params="nonsense",
        )


def test_compare_picks_the_batch_size_that_fits_max_memory():
    """compare(max_memory=...) runs with the memory model's batch size, and refuses up front a
    budget that no batch size fits (one line, before any model work)."""
    from iclgd_lens import compare, load_model
    from iclgd_lens.errors import IclgdError

    model = load_model(device="cpu")
    kw = dict(k=4, n_episodes=4, n_queries=6, baselines=False)
    roomy = memory.plan_compare(model, **kw)
    results = compare(model, max_memory=roomy.total_bytes, progress=False, artifacts=False, **kw)
    assert results.config["batch_size"] == 128  # compare's default, which fits
    tight = memory.plan_compare(model, batch_size=1, **kw)
    assert tight.total_bytes < roomy.total_bytes
    smaller = compare(model, max_memory=tight.total_bytes, progress=False, artifacts=False, **kw)
    assert smaller.config["batch_size"] < 128
    with pytest.raises(IclgdError, match="memory model predicts"):
        compare(model, max_memory=1000, progress=False, artifacts=False, **kw)


def test_the_untrained_baseline_holds_no_second_model_on_a_gpu():
    """untrained_in_place parks the trained weights in host memory: on a GPU the baseline adds no
    weights; on a CPU the re-drawn attention/MLP weights sit beside the parked ones."""
    gpu, cpu = plan(device="cuda"), plan(device="cpu")
    key = "re-drawn attention/MLP weights beside the parked trained ones (same memory on a CPU)"
    assert gpu.phases["untrained"][key] == 0
    d, q, kv = SHAPE.d_model, SHAPE.n_heads * SHAPE.d_head, SHAPE.n_kv_heads * SHAPE.d_head
    assert cpu.phases["untrained"][key] == SHAPE.n_layers * (2 * d * q + 2 * d * kv + 3 * d * SHAPE.d_mlp) * 4
    assert (
        sum(cpu.phases["untrained"].values()) - sum(gpu.phases["untrained"].values())
        == (cpu.phases["untrained"][key])
    )
