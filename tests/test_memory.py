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
    """The prefix KV cache copied to every query row, the random update's dense deltas and the
    low-rank factors, each against the formula written out here."""
    p = plan(batch_size=32)
    b, L, d_kv = 4, SHAPE.n_layers, SHAPE.n_kv_heads * SHAPE.d_head
    rows = 32  # two episodes of 16 queries per ICL pass
    kv_rows = rows * L * 2 * (LENGTHS.prefix + LENGTHS.suffix) * d_kv * b
    assert p.phases["queries"]["ICL query pass (KV cache per row)"] >= kv_rows
    # K and V, every layer, dense, for the 2 episodes of one group (drawn a group at a time)
    random_deltas = 2 * 2 * L * SHAPE.d_model * d_kv * b
    assert p.phases["queries"]["random-update deltas"] == random_deltas
    # rank 48 is past the break-even rank 64 * 32 / 96 = 21.3 of a 64 -> 32 projection: dense + gradient
    assert p.phases["table"]["deltas"] == 2 * 8 * 2 * L * SHAPE.d_model * d_kv * b
    short = Lengths(demo=4, train=16, prefix=50, suffix=4, zsl=5, query_tokens=3)  # rank 16: low-rank
    low = predict(SHAPE, short, n_episodes=8, n_queries=16, k=4, probes=("attn_out",), baselines=())
    assert low.phases["table"]["deltas"] == 8 * 2 * L * 16 * (SHAPE.d_model + d_kv) * b


def test_kv_cache_term_covers_a_real_prefix_cache():
    """A real HF DynamicCache of the prefix, copied to every row as run_shared_prefixes does, holds
    no more than the model's KV term."""
    from transformers import LlamaConfig, LlamaForCausalLM

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
    with torch.no_grad():
        cache = hf(torch.randint(0, 100, (1, LENGTHS.prefix)), use_cache=True).past_key_values
        cache.batch_repeat_interleave(32)
        hf(torch.randint(0, 100, (32, LENGTHS.suffix)), past_key_values=cache, use_cache=True)
    held = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    shape = ModelShape.of(hf)
    term = predict(
        shape, LENGTHS, n_episodes=2, n_queries=16, k=8, probes=("attn_out",), baselines=(), batch_size=32
    ).phases["queries"]["ICL query pass (KV cache per row)"]
    assert held <= term < 1.5 * held + 32 * LENGTHS.suffix * 100 * 4 * 2 + 10**6


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
    assert over.batch_size == 96 and tight.batch_size == big.batch_size and tight.fits


def _kw():
    return dict(n_episodes=8, n_queries=16, k=8, probes=ALL_PROBES, baselines=ALL_BASELINES)


def test_plan_compare_reads_the_model_and_task():
    from iclgd_lens import load_model

    model = load_model(device="cpu")
    p = memory.plan_compare(model, k=4, n_episodes=2, n_queries=4)
    assert p.model_bytes == sum(t.numel() * t.element_size() for t in model.original_model.parameters())
    assert p.peak_bytes > 0 and p.batch_size == 64 and "untrained" in p.phases
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
    assert results.config["batch_size"] == 64
    tight = memory.plan_compare(model, batch_size=1, **kw)
    assert tight.total_bytes < roomy.total_bytes
    smaller = compare(model, max_memory=tight.total_bytes, progress=False, artifacts=False, **kw)
    assert smaller.config["batch_size"] < 64
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
