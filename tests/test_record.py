"""Recording: probes slice what is asked, hooks are removed, prefix sharing changes nothing."""

import pytest
import torch
from tiny import tiny_bridge, tiny_hf_model, tiny_task, tiny_tokenizer

from iclgd_lens.engine.record import Recorder, split_shared_prefix
from iclgd_lens.errors import IclgdError
from iclgd_lens.tasks import QUERY_SEGMENT, encode_prompts

torch.set_num_threads(1)


def _icl_batch(tok, task, k=3, n_queries=4):
    ep = task.episodes(k, 1, n_queries, seed=1)[0]
    n = len(ep.queries)
    return ep, encode_prompts(tok, task, [ep.demos] * n, list(ep.queries), [ep.label_words] * n)


@pytest.mark.parametrize("n_kv_heads", [2, 4])
def test_shared_prefix_equals_full_passes(n_kv_heads):
    tok, task = tiny_tokenizer(), tiny_task()
    bridge = tiny_bridge(tokenizer=tok, n_kv_heads=n_kv_heads)
    _, enc = _icl_batch(tok, task)
    rec = Recorder(bridge)
    full = rec.run(enc, "icl")
    prefix, shared = rec.run_shared_prefix(enc, "icl")
    for name in ["attn_out", "head_out", "scores", "q", "rot_q"]:
        torch.testing.assert_close(shared[name], full[name], atol=1e-5, rtol=1e-5, equal_nan=True)
    torch.testing.assert_close(shared.logits, full.logits, atol=1e-5, rtol=1e-5)
    # demonstration-side quantities come from the prefix pass, once per episode
    torch.testing.assert_close(prefix["kv_demo"][:, 0], full["kv_demo"][:, 0], atol=1e-5, rtol=1e-5)
    # attention rows: the prefix version covers prefix + suffix keys; same values where real
    width = full["demo_attention"].shape[-1]
    torch.testing.assert_close(
        shared["demo_attention"][..., :width], full["demo_attention"], atol=1e-5, rtol=1e-5
    )


def test_recorded_values_match_hf_eager_attention():
    """Oracle without TransformerLens: recompute attention output and pattern from HF's eager attention."""
    tok, task = tiny_tokenizer(), tiny_task()
    hf = tiny_hf_model()
    bridge = tiny_bridge(hf, tok)
    _, enc = _icl_batch(tok, task)
    rec = Recorder(bridge, probes=["attn_out", "scores"])
    got = rec.run(enc, "icl")
    captured = {}

    def grab(layer):
        def hook(module, args, kwargs, output):
            captured[layer] = (output[0].detach(), output[1].detach())

        return hook

    handles = [
        hf.model.layers[l].self_attn.register_forward_hook(grab(l), with_kwargs=True) for l in range(2)
    ]
    try:
        with torch.no_grad():
            hf(enc.input_ids, attention_mask=enc.attention_mask, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    rows = torch.arange(enc.input_ids.shape[0])
    for layer in range(2):
        attn_out, weights = captured[layer]
        torch.testing.assert_close(got["attn_out"][layer], attn_out[rows, enc.read_pos], atol=1e-5, rtol=1e-5)
        # HF's pattern is softmax(scores): log-ratios between query-token slots equal score differences
        hf_rows = weights[rows, :, enc.read_pos]  # [batch, heads, key]
        scores = got["scores"][layer]  # [batch, heads, width]
        query_keys = [(enc.segments[b] == QUERY_SEGMENT).nonzero().squeeze(-1) for b in range(len(rows))]
        assert scores.shape[-1] == max(len(idx) for idx in query_keys)
        for b, idx in enumerate(query_keys):  # slot j: the query's j-th token; the rest NaN
            n = len(idx)
            assert torch.isnan(scores[b, :, n:]).all()
            log_hf = torch.log(hf_rows[b][:, idx])
            torch.testing.assert_close(
                log_hf - log_hf[:, :1], scores[b, :, :n] - scores[b, :, :1], atol=1e-4, rtol=1e-4
            )
    assert rec.recording("icl").values == {}


def test_hooks_removed_after_exception():
    tok, task = tiny_tokenizer(), tiny_task()
    bridge = tiny_bridge(tokenizer=tok)
    _, enc = _icl_batch(tok, task)
    state = {k: v.clone() for k, v in bridge.state_dict().items()}
    rec = Recorder(bridge)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        rec.run(enc, "icl", interventions=[("blocks.1.hook_resid_post", boom)])
    assert all(len(hp.fwd_hooks) == 0 for hp in bridge.hook_dict.values())
    assert all(torch.equal(state[k], v) for k, v in bridge.state_dict().items())


def test_split_shared_prefix_stops_before_query():
    tok, task = tiny_tokenizer(), tiny_task()
    _, enc = _icl_batch(tok, task)
    prefix, suffix, n = split_shared_prefix(enc)
    assert (prefix.segments >= 0).all() and (suffix.segments == -1).any(-1).all()
    assert torch.equal(
        torch.cat([prefix.input_ids.expand(len(suffix.input_ids), -1), suffix.input_ids], 1), enc.input_ids
    )


def test_several_episodes_share_one_prefix_pass_and_match_full_passes():
    """Prefixes of different lengths, right-padded into one pass; queries on their own cache."""
    tok, task = tiny_tokenizer(), tiny_task()
    bridge = tiny_bridge(tokenizer=tok)
    groups, fulls = [], []
    rec = Recorder(bridge)
    for k, seed in ((2, 1), (5, 2), (3, 3)):
        ep = task.episodes(k, 1, 3, seed=seed)[0]
        n = len(ep.queries)
        enc = encode_prompts(tok, task, [ep.demos] * n, list(ep.queries), [ep.label_words] * n)
        groups.append(enc)
        fulls.append(rec.run(enc, "icl"))
    prefix, shared = rec.run_shared_prefixes(groups, "icl")
    start = 0
    for g, full in enumerate(fulls):
        n = full.logits.shape[0]
        part = shared.rows(start, start + n)
        start += n
        for name in ["attn_out", "head_out", "scores", "q", "rot_q"]:
            torch.testing.assert_close(part[name], full[name], atol=1e-5, rtol=1e-5, equal_nan=True)
        torch.testing.assert_close(part.logits, full.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            prefix.rows(g, g + 1)["kv_demo"][:, 0], full["kv_demo"][:, 0], atol=1e-5, rtol=1e-5
        )


@pytest.mark.parametrize("max_rows", [1, 2, 4])
def test_query_rows_in_chunks_equal_one_pass(max_rows):
    """run_shared_prefixes(max_rows=...) copies the prefix cache per chunk of query rows: the same
    numbers as full passes, also across chunks whose queries differ in length (NaN-padded maps)."""
    tok, task = tiny_tokenizer(), tiny_task()
    bridge = tiny_bridge(tokenizer=tok)
    rec = Recorder(bridge)
    groups, fulls = [], []
    for k, seed in ((3, 1), (2, 4)):
        ep = task.episodes(k, 1, 3, seed=seed)[0]
        n = len(ep.queries)
        enc = encode_prompts(tok, task, [ep.demos] * n, list(ep.queries), [ep.label_words] * n)
        groups.append(enc)
        fulls.append(rec.run(enc, "icl"))
    prefix, chunked = rec.run_shared_prefixes(groups, "icl", max_rows=max_rows)
    _, whole = rec.run_shared_prefixes(groups, "icl")
    assert torch.equal(chunked.segments, whole.segments)
    start = 0
    for full in fulls:
        n = full.logits.shape[0]
        part = chunked.rows(start, start + n)
        start += n
        for name in ["attn_out", "head_out", "q", "rot_q"]:
            torch.testing.assert_close(part[name], full[name], atol=1e-5, rtol=1e-5)
        width = full["scores"].shape[-1]
        torch.testing.assert_close(
            part["scores"][..., :width], full["scores"], atol=1e-5, rtol=1e-5, equal_nan=True
        )
        assert torch.isnan(part["scores"][..., width:]).all()
        torch.testing.assert_close(part.logits, full.logits, atol=1e-5, rtol=1e-5)


def _ignore_cache(keep_filling: bool):
    """What transformers 5.24 did under TransformerLens 4.3: the attention bridge never sees the
    cache (`keep_filling=False`: it stays empty), or fills it but attends without it."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    original = AttentionBridge._update_kv_cache

    def broken(self, k, v, **kwargs):
        if keep_filling:
            original(self, k, v, **kwargs)
        return k, v

    return broken


@pytest.mark.parametrize("keep_filling", [False, True], ids=["cache-stays-empty", "cache-filled-but-unused"])
def test_shared_prefix_fails_loudly_when_the_cache_is_ignored(keep_filling, monkeypatch):
    """The run-time guard of the fast path: a cache that is not used must stop the run, never
    give ICL numbers of prompts without their demonstrations."""
    from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

    from iclgd_lens.errors import IclgdError

    tok, task = tiny_tokenizer(), tiny_task()
    bridge = tiny_bridge(tokenizer=tok)
    _, enc = _icl_batch(tok, task)
    rec = Recorder(bridge, probes=["attn_out"])  # no probe that would crash on the short key axis
    monkeypatch.setattr(AttentionBridge, "_update_kv_cache", _ignore_cache(keep_filling))
    with pytest.raises(IclgdError, match="shared-prefix fast path is broken") as err:
        rec.run_shared_prefix(enc, "icl")
    assert "\n" not in str(err.value)
    assert not any(hp.fwd_hooks for hp in bridge.hook_dict.values())  # nothing left attached


def test_shared_prefix_cache_returns_what_hf_dynamic_cache_returns():
    """Oracle: HF's own DynamicCache with the prefix copied to every row (batch_select_indices)
    and the pass's keys concatenated; the shared-prefix cache must return the same keys and
    values in every layer, while its buffer holds one layer's and the prefix stays untouched."""
    from transformers.cache_utils import DynamicCache

    from iclgd_lens.engine.prefix_cache import SharedPrefixCache

    gen = torch.Generator().manual_seed(0)
    n_layers, groups, kv_heads, prefix_len, d_head, pos = 3, 2, 2, 5, 4, 2
    row_group = torch.tensor([0, 0, 0, 1, 1])
    prefix = DynamicCache()
    for layer in range(n_layers):
        k, v = (torch.randn(groups, kv_heads, prefix_len, d_head, generator=gen) for _ in range(2))
        prefix.update(k, v, layer)
    before = [(layer.keys.clone(), layer.values.clone()) for layer in prefix.layers]
    oracle = DynamicCache()
    for layer in range(n_layers):
        oracle.update(*(t.clone() for t in before[layer]), layer)
    oracle.batch_select_indices(row_group)
    shared = SharedPrefixCache(prefix, row_group)
    assert shared.get_seq_length(0) == prefix_len
    for layer in range(n_layers):
        k, v = (torch.randn(len(row_group), kv_heads, pos, d_head, generator=gen) for _ in range(2))
        want_k, want_v = oracle.update(k, v, layer)
        got_k, got_v = shared.update(k, v, layer)
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
        assert got_k.data_ptr() == shared.scratch.keys.data_ptr()  # one buffer for every layer
    assert {shared.get_seq_length(layer) for layer in range(n_layers)} == {prefix_len + pos}
    assert shared.scratch.keys.shape == (len(row_group), kv_heads, prefix_len + pos, d_head)
    for layer, (k, v) in zip(prefix.layers, before):
        assert torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_shared_prefix_fails_loudly_when_a_layer_reads_another_layers_keys(monkeypatch):
    """The run-time guard of the reused key buffer: if this install's attention let a later
    layer's cache update run before a layer's attention had read its keys, the run must stop."""
    from iclgd_lens.engine.prefix_cache import SharedPrefixLayer
    from iclgd_lens.errors import IclgdError

    original = SharedPrefixLayer.update

    def claimed_by_the_next_layer(self, k, v, *args, **kwargs):
        out = original(self, k, v, *args, **kwargs)
        self.scratch.claimed_by = self.layer + 1
        return out

    tok, task = tiny_tokenizer(), tiny_task()
    bridge = tiny_bridge(tokenizer=tok)
    _, enc = _icl_batch(tok, task)
    rec = Recorder(bridge, probes=["attn_out"])
    rec.run_shared_prefix(enc, "icl")  # unpatched: runs
    monkeypatch.setattr(SharedPrefixLayer, "update", claimed_by_the_next_layer)
    with pytest.raises(IclgdError, match="shared key buffer holds layer 1's keys") as err:
        rec.run_shared_prefix(enc, "icl")
    assert "\n" not in str(err.value)
    assert not any(hp.fwd_hooks for hp in bridge.hook_dict.values())


def test_a_separator_outside_the_shared_prefix_is_refused_in_one_line():
    """Row 1's first query token swallowed the separator, row 0's did not: the tokens the
    demonstrations add differ between the rows and one lies past the shared prefix. dW_ICL would
    be read without it; the kv_outer probe refuses in one line (the query pass, where it sees
    that token)."""
    from iclgd_lens.hooks import get_probes

    from iclgd_lens.tasks import QUERY_SEGMENT as Q
    from iclgd_lens.tasks import EncodedPrompts

    ids = torch.tensor([[1, 4, 5, 49, 6, 48], [1, 4, 5, 7, 48, 3]])
    mask = torch.tensor([[1] * 6, [1] * 5 + [0]])
    seg = torch.tensor([[0, 1, 1, 0, Q, Q], [0, 1, 1, Q, Q, 0]])
    enc = EncodedPrompts(ids, mask, seg, torch.tensor([5, 4]), ["a", "b"])
    bridge = tiny_bridge()
    with pytest.raises(IclgdError, match="separator before the query tokenises differently") as info:
        Recorder(bridge, get_probes(["kv_outer"])).run_shared_prefixes([enc], "icl")
    assert "\n" not in str(info.value)
    prefix, queries = Recorder(bridge, get_probes(["attn_out"])).run_shared_prefixes(
        [enc], "icl"
    )  # no dW: runs
    assert queries["attn_out"].shape[1] == 2


def test_a_hook_point_outside_the_blocks_is_refused_in_one_line():
    """Probes are called once per layer: a point without {layer} would give every layer the same
    rows, so it is refused before any pass, naming the probe and the point."""
    from iclgd_lens.hooks import Probe

    flat = Probe("embed_probe", ("hook_embed",), lambda acts, ctx: {"e": acts["hook_embed"][:, -1]})
    with pytest.raises(
        IclgdError, match="probe 'embed_probe' reads hook point 'hook_embed', which has no"
    ) as info:
        Recorder(tiny_bridge(), [flat])
    assert "\n" not in str(info.value)


def test_layers_outside_the_model_and_one_probe_name_as_a_string():
    """Recorder(layers=...) beyond the model names its layer count; a probe given as one string is
    that probe (not one probe per character)."""
    bridge = tiny_bridge()
    n = bridge.cfg.n_layers
    with pytest.raises(IclgdError) as info:
        Recorder(bridge, ["attn_out"], layers=[0, n + 5])
    assert str(info.value) == f"layer(s) [{n + 5}] out of range: the model has {n} layers (0 to {n - 1})"
    assert [p.name for p in Recorder(bridge, "attn_out").probes] == ["attn_out"]


def _groups_of_different_prefix_lengths(tok, task):
    groups = []
    for k, seed in ((2, 1), (5, 2)):
        ep = task.episodes(k, 1, 2, seed=seed)[0]
        n = len(ep.queries)
        groups.append(encode_prompts(tok, task, [ep.demos] * n, list(ep.queries), [ep.label_words] * n))
    return groups


def test_shared_prefix_fails_loudly_when_rope_gets_other_positions(monkeypatch):
    """The run-time guard of the query rows' positions: after a right-padded prefix their RoPE
    positions are their own unpadded ones, passed explicitly; an install that dropped them (and
    counted positions from the padded prefix) must stop the run, not shift RoPE silently."""
    from transformer_lens.model_bridge.transformer_bridge import TransformerBridge

    tok, task = tiny_tokenizer(), tiny_task()
    bridge = tiny_bridge(tokenizer=tok)
    groups = _groups_of_different_prefix_lengths(tok, task)
    rec = Recorder(bridge, probes=["attn_out"])
    rec.run_shared_prefixes(groups, "icl")  # unpatched: runs
    pre_hooks = [len(m._forward_pre_hooks) for m in bridge.original_model.modules()]
    original = TransformerBridge.forward

    def without_positions(self, *args, **kwargs):
        kwargs.pop("position_ids", None)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(TransformerBridge, "forward", without_positions)
    monkeypatch.setattr(TransformerBridge, "_accepts_derived_position_ids", lambda self: False)
    with pytest.raises(IclgdError, match="RoPE received other positions") as err:
        rec.run_shared_prefixes(groups, "icl")
    assert "\n" not in str(err.value)
    assert not any(hp.fwd_hooks for hp in bridge.hook_dict.values())
    assert [len(m._forward_pre_hooks) for m in bridge.original_model.modules()] == pre_hooks


def test_a_model_saved_with_use_cache_false_shares_its_prefix():
    """A config saved with use_cache=False (as after gradient-checkpointed training) made the
    prefix pass return no cache and compare() crash; the prefix pass asks for its cache."""
    tok, task = tiny_tokenizer(), tiny_task()
    hf = tiny_hf_model()
    hf.config.use_cache = False
    bridge = tiny_bridge(hf, tokenizer=tok)
    groups = _groups_of_different_prefix_lengths(tok, task)
    rec = Recorder(bridge, probes=["attn_out"])
    _, shared = rec.run_shared_prefixes(groups, "icl")
    full = Recorder(bridge, probes=["attn_out"])
    start = 0
    for enc in groups:
        one = full.run(enc, "icl")
        n = one.logits.shape[0]
        torch.testing.assert_close(shared.rows(start, start + n).logits, one.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(
            shared.rows(start, start + n)["attn_out"], one["attn_out"], atol=1e-5, rtol=1e-5
        )
        start += n
