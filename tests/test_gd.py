"""Oracle tests of the GD engine: batched per-episode deltas applied by hooks must equal, for
every episode, a deep-copied HF model trained with torch.optim on the same batches."""

from __future__ import annotations

import copy
import random
import re

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformer_lens.model_bridge import TransformerBridge
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import iclgd_lens.engine.gd.train as gd  # the training module: LOW_RANK_LIMIT and _densify are read there
from iclgd_lens.engine.gd import Deltas, GDConfig, delta_hooks, demo_order, projection_paths, train_deltas
from iclgd_lens.errors import IclgdError
from iclgd_lens.tasks import Episode, Example, Task

torch.set_num_threads(1)

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "Input:", "Label:", "very"] + list("abcdefgh") + ["yes", "no"]
HF_NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "in": "mlp.up_proj",
    "out": "mlp.down_proj",
}
K = 4


# ---- fixtures ---------------------------------------------------------------------------
def make_tokenizer() -> PreTrainedTokenizerFast:
    word_level = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=word_level,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        name_or_path="tiny-words",
        add_bos_token=True,
    )


def make_hf(gqa: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2 if gqa else 4,
        max_position_embeddings=64,
        initializer_range=0.1,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module", params=[False, True], ids=["mha", "gqa"])
def models_(request, tok):
    """(untouched HF model, bridge booted on a deep copy of it)."""
    hf = make_hf(request.param)
    bridge = TransformerBridge.boot_transformers(
        "tiny", hf_model=copy.deepcopy(hf), tokenizer=tok, device="cpu"
    )
    return hf, bridge


@pytest.fixture(scope="module")
def mha(tok):
    hf = make_hf(False)
    return hf, TransformerBridge.boot_transformers(
        "tiny", hf_model=copy.deepcopy(hf), tokenizer=tok, device="cpu"
    )


TASK = Task(name="tiny", template="Input: {text} Label:", label_words=("yes", "no"))
EPISODES = [  # demos of different lengths (padding), three episodes
    Episode(
        (Example("a b", 0), Example("c", 1), Example("d e f", 0), Example("g", 1)),
        (Example("a c", 0), Example("h", 1)),
        ("yes", "no"),
    ),
    Episode(
        (Example("h h", 1), Example("b c d", 0), Example("e", 0), Example("f a", 1)),
        (Example("a c", 0), Example("h", 1)),
        ("no", "yes"),
    ),
    Episode(
        (Example("g f e d", 0), Example("a", 1), Example("c c", 1), Example("b", 0)),
        (Example("a c", 0), Example("h", 1)),
        ("yes", "no"),
    ),
]


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_bitwise_equal(before: dict, model: torch.nn.Module) -> None:
    after = model.state_dict()
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert torch.equal(t, after[name]), name


def hf_param_name(path: str) -> str:
    if path == "unembed":
        return "lm_head.weight"
    _, layer, _, proj = path.split(".")
    return f"model.layers.{layer}.{HF_NAMES[proj]}.weight"


def batches(episode: Episode, config: GDConfig) -> list[list[str]]:
    """The demonstrations of each SGD step, written out independently of gd.py."""
    demos = [episode.demos[i] for i in demo_order(len(episode.demos), config.order_seed)]
    texts = [f"Input: {d.text} Label: {episode.label_words[d.label]}" for d in demos]
    steps = [texts[i : i + config.batch_size] for i in range(0, len(texts), config.batch_size)]
    return steps * config.epochs


def encode_with_labels(
    tok, texts: list[str], label_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and HF `labels` (-100 on padding, and on non-label tokens if label_only)."""
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100)
    for r, (row, text) in enumerate(zip(rows, texts)):
        ids[r, : len(row)] = torch.tensor(row)
        mask[r, : len(row)] = 1
        n_label = (
            len(tok(" " + text.split("Label: ")[1], add_special_tokens=False)["input_ids"])
            if label_only
            else len(row)
        )
        labels[r, len(row) - n_label : len(row)] = torch.tensor(row[len(row) - n_label :])
    return ids, mask, labels


def reference_gd(hf, tok, episode: Episode, config: GDConfig, paths: list[str]) -> LlamaForCausalLM:
    """A deep copy of the HF model fine-tuned with torch.optim on the same batches."""
    ref = copy.deepcopy(hf)
    ref.requires_grad_(False)
    trained = [ref.get_parameter(hf_param_name(p)).requires_grad_(True) for p in paths]
    opt = (
        torch.optim.SGD(trained, lr=config.lr)
        if config.optimizer == "sgd"
        else torch.optim.Adam(trained, lr=config.lr)
    )
    for texts in batches(episode, config):
        ids, mask, labels = encode_with_labels(tok, texts, config.loss_on == "label_tokens")
        loss = ref(ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ref


def query_batch(tok, episodes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every query of every episode (episode-major): ids, mask, row_episode."""
    texts = [TASK.render_query(q) for e in episodes for q in e.queries]
    enc = tok(texts, padding=True, return_tensors="pt")
    rows = torch.arange(len(episodes)).repeat_interleave(len(episodes[0].queries))
    return enc["input_ids"], enc["attention_mask"], rows


def assert_deltas_close(
    ours: torch.Tensor, learned: torch.Tensor, path: str, atol: float, outliers: float
) -> None:
    """|ours - learned| <= atol everywhere, or (outliers > 0) on all but that fraction of
    entries, which must still be within 10 * atol."""
    diff = (ours - learned).abs()
    if outliers == 0:
        torch.testing.assert_close(ours, learned, atol=atol, rtol=0, msg=path)
        return
    assert (diff > atol).float().mean() <= outliers and diff.max() <= 10 * atol, (
        f"{path}: max |diff| {diff.max():.2e}"
    )


def check_against_reference(
    hf, bridge, tok, config: GDConfig, atol: float = 1e-5, outliers: float = 0.0
) -> Deltas:
    before = state_of(bridge)
    deltas = train_deltas(bridge, tok, TASK, EPISODES, config)
    assert_bitwise_equal(before, bridge)
    paths = projection_paths(config, hf.config.num_hidden_layers)
    assert sorted(deltas.tensors) == sorted(paths)
    ids, mask, rows = query_batch(tok, EPISODES)
    with torch.no_grad(), bridge.hooks(fwd_hooks=delta_hooks(deltas, rows)):
        gd_logits = bridge(ids, attention_mask=mask)
    n_q = len(EPISODES[0].queries)
    for e, episode in enumerate(EPISODES):
        ref = reference_gd(hf, tok, episode, config, paths)
        for path in paths:
            name = hf_param_name(path)
            learned = ref.get_parameter(name) - hf.get_parameter(name)
            assert learned.abs().max() > 1e-4, f"{path}: the reference did not move"
            assert_deltas_close(deltas.tensors[path][e], learned.detach(), path, atol, outliers)
        with torch.no_grad():
            ref_logits = ref(
                ids[e * n_q : (e + 1) * n_q], attention_mask=mask[e * n_q : (e + 1) * n_q]
            ).logits
        real = mask[e * n_q : (e + 1) * n_q].bool()
        torch.testing.assert_close(
            gd_logits[e * n_q : (e + 1) * n_q][real], ref_logits[real], atol=atol, rtol=0
        )
    return deltas


# ---- hook points ------------------------------------------------------------------------
def test_hook_in_is_exactly_what_hf_projection_receives(mha, tok):
    _, bridge = mha
    ids = tok(["Input: a b Label: yes"], return_tensors="pt")["input_ids"]
    hf_inputs, hook_inputs = {}, {}
    layer = bridge.original_model.model.layers[1].self_attn
    handles = [
        getattr(layer, f"{p}_proj").original_component.register_forward_hook(
            lambda m, i, o, p=p: hf_inputs.__setitem__(p, i[0])
        )
        for p in "ko"
    ]
    try:
        with bridge.hooks(
            fwd_hooks=[
                (f"blocks.1.attn.{p}.hook_in", lambda t, hook, p=p: hook_inputs.__setitem__(p, t))
                for p in "ko"
            ]
        ):
            bridge(ids)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(hook_inputs["k"], hf_inputs["k"])
    assert hook_inputs["o"].ndim == 4  # [batch, pos, heads, d_head], flattened (h d) by delta hooks
    assert torch.equal(hook_inputs["o"].flatten(2), hf_inputs["o"])


# ---- oracle: batched deltas == torch.optim on a deep copy -------------------------------
LOW_RANK = {
    "factors": float("inf"),
    "default": gd.LOW_RANK_LIMIT,
    "dense": 0.0,
}  # LOW_RANK_LIMIT per SGD path


@pytest.mark.parametrize("path", list(LOW_RANK))
@pytest.mark.parametrize("params", ["kv", "v_single", "all"])
@pytest.mark.parametrize("batch_size", [1, 2])
def test_sgd_matches_torch_sgd(models_, tok, params, batch_size, path, monkeypatch):
    hf, bridge = models_
    monkeypatch.setattr(gd, "LOW_RANK_LIMIT", LOW_RANK[path])
    config = GDConfig(params=params, lr=0.05, epochs=2, batch_size=batch_size)
    deltas = check_against_reference(hf, bridge, tok, config)
    if path == "factors":
        assert set(deltas.factors) == set(deltas.parts)
    if path == "dense":
        assert not deltas.factors


@pytest.mark.parametrize("params", ["kv", "all"])
def test_adam_matches_torch_adam(models_, tok, params):
    hf, bridge = models_
    config = GDConfig(params=params, optimizer="adam", lr=1e-3, epochs=2, batch_size=2)
    # Adam divides by sqrt(v) + 1e-8: for gradient entries near 1e-8, fp32 rounding of the
    # gradient moves the step by a visible fraction of lr (measured: 1 of 1536 entries of one
    # MLP matrix off by 1.1e-5). Allow 0.1% of entries up to 1e-4; everything else at 1e-5.
    check_against_reference(hf, bridge, tok, config, outliers=1e-3)


@pytest.mark.parametrize("path", ["factors", "default"])
def test_label_token_loss_matches_torch_sgd(mha, tok, path, monkeypatch):
    hf, bridge = mha
    monkeypatch.setattr(gd, "LOW_RANK_LIMIT", LOW_RANK[path])
    check_against_reference(
        hf, bridge, tok, GDConfig(params="qkvo", lr=0.05, epochs=2, loss_on="label_tokens")
    )


# ---- order ------------------------------------------------------------------------------
def test_order_seed_permutes_steps_and_none_keeps_prompt_order(mha, tok):
    hf, bridge = mha
    order = demo_order(K, 3)
    assert sorted(order) == list(range(K)) and order != list(range(K))
    assert demo_order(K, None) == list(range(K)) and demo_order(K, 3) == order
    random.seed(0)
    first = demo_order(8, 5)
    random.seed(1)  # its own RNG: the global random state does not matter, the seed does
    assert demo_order(8, 5) == first and demo_order(8, 6) != first
    permuted = [Episode(tuple(e.demos[i] for i in order), e.queries, e.label_words) for e in EPISODES]
    base = GDConfig(params="kv", lr=0.05, epochs=2)
    seeded = train_deltas(bridge, tok, TASK, EPISODES, GDConfig(params="kv", lr=0.05, epochs=2, order_seed=3))
    by_hand = train_deltas(bridge, tok, TASK, permuted, base)
    in_order = train_deltas(bridge, tok, TASK, EPISODES, base)
    for path in seeded.tensors:
        torch.testing.assert_close(seeded.tensors[path], by_hand.tensors[path], atol=1e-6, rtol=0)
    gap = max((seeded.tensors[p] - in_order.tensors[p]).abs().max().item() for p in seeded.tensors)
    assert gap > 1e-4  # SGD with batch 1 depends on the order


def test_full_batch_gd_is_invariant_to_order(mha, tok):
    _, bridge = mha
    runs = [
        train_deltas(
            bridge, tok, TASK, EPISODES, GDConfig(params="kv", lr=0.05, epochs=2, batch_size=K, order_seed=s)
        )
        for s in (None, 1, 2)
    ]
    for run in runs[1:]:
        for path in run.tensors:
            torch.testing.assert_close(run.tensors[path], runs[0].tensors[path], atol=1e-6, rtol=0)


# ---- losses -----------------------------------------------------------------------------
def test_label_token_loss_is_the_loss_of_the_label_positions_only(mha, tok):
    hf, bridge = mha
    task = Task(
        name="tiny", template="Input: {text} Label:", label_words=("very yes", "no")
    )  # a 2-token label
    episodes = [Episode((Example("a b", 0), Example("c", 1)), (), ("very yes", "no"))]
    config = GDConfig(params="kv", lr=0.05, batch_size=2, loss_on="label_tokens")
    first_step = train_deltas(bridge, tok, task, episodes, config).losses[0, 0]
    all_tokens = train_deltas(
        bridge, tok, task, episodes, GDConfig(params="kv", lr=0.05, batch_size=2)
    ).losses[0, 0]
    # by hand: demo 1 = [bos Input: a b Label: very yes] -> label tokens at 5, 6;
    # demo 2 = [bos Input: c Label: no] -> 4
    losses = []
    for text, label_positions in (("Input: a b Label: very yes", [5, 6]), ("Input: c Label: no", [4])):
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.no_grad():
            logp = hf(ids).logits.log_softmax(-1)[0]
        losses += [-logp[p - 1, ids[0, p]] for p in label_positions]
    torch.testing.assert_close(first_step, torch.stack(losses).mean(), atol=1e-5, rtol=0)
    assert abs(first_step - all_tokens) > 1e-3


def test_all_tokens_loss_is_hf_causal_lm_loss(mha, tok):
    hf, bridge = mha
    config = GDConfig(params="kv", lr=0.05, batch_size=2)
    deltas = train_deltas(bridge, tok, TASK, EPISODES, config)
    for e, episode in enumerate(EPISODES):
        ids, mask, labels = encode_with_labels(tok, batches(episode, config)[0], label_only=False)
        with torch.no_grad():
            expected = hf(ids, attention_mask=mask, labels=labels).loss
        torch.testing.assert_close(deltas.losses[0, e], expected, atol=1e-5, rtol=0)
    assert deltas.losses.shape == (2, len(EPISODES))


# ---- layer-causal GD (Deutch et al.) ----------------------------------------------------
def layer_causal_reference(hf, tok, episode: Episode, lr: float, paths: list[str]) -> LlamaForCausalLM:
    """SGD on sum_l LM loss(lm_head(norm(h_l))), h_l = layer_l(h_{l-1}.detach()), by hand over HF layers."""
    ref = copy.deepcopy(hf)
    ref.requires_grad_(False)
    trained = [ref.get_parameter(hf_param_name(p)).requires_grad_(True) for p in paths]
    opt = torch.optim.SGD(trained, lr=lr)
    for (text,) in batches(episode, GDConfig(lr=lr)):
        ids = torch.tensor([tok(text)["input_ids"]])
        n = ids.shape[1]
        positions = torch.arange(n)[None]
        causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
        h = ref.model.embed_tokens(ids)
        rotary = ref.model.rotary_emb(h, positions)
        loss = 0.0
        for l, layer in enumerate(ref.model.layers):
            h = layer(
                h.detach() if l > 0 else h,
                attention_mask=causal,
                position_ids=positions,
                position_embeddings=rotary,
            )
            h = h[0] if isinstance(h, tuple) else h
            logits = ref.lm_head(ref.model.norm(h))
            loss = loss + F.cross_entropy(logits[0, :-1], ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ref


@pytest.mark.parametrize("path", ["factors", "default"])
def test_layer_causal_matches_hand_written_loop(models_, tok, path, monkeypatch):
    hf, bridge = models_
    monkeypatch.setattr(gd, "LOW_RANK_LIMIT", LOW_RANK[path])
    config = GDConfig.deutch(lr=0.05)
    deltas = train_deltas(bridge, tok, TASK, EPISODES, config)
    plain = train_deltas(bridge, tok, TASK, EPISODES, GDConfig.dai(lr=0.05))
    paths = projection_paths(config, 2)
    for e, episode in enumerate(EPISODES):
        ref = layer_causal_reference(hf, tok, episode, 0.05, paths)
        for path in paths:
            name = hf_param_name(path)
            torch.testing.assert_close(
                deltas.tensors[path][e],
                (ref.get_parameter(name) - hf.get_parameter(name)).detach(),
                atol=1e-5,
                rtol=0,
                msg=path,
            )
    # the last layer learns from its own exit in both; the first layer does not
    assert (deltas.tensors["blocks.0.attn.k"] - plain.tensors["blocks.0.attn.k"]).abs().max() > 1e-4


def test_layer_causal_with_unembedding_delta_runs_and_trains_unembed(mha, tok):
    _, bridge = mha
    deltas = train_deltas(bridge, tok, TASK, EPISODES[:1], GDConfig(params="all", lr=0.05, layer_causal=True))
    assert deltas.norms()["unembed"][0] > 0


# ---- applying deltas --------------------------------------------------------------------
def _grouped_and_shuffled(bridge, tok, deltas):
    """GD-condition logits of the query batch with rows grouped by episode, and shuffled."""
    ids, mask, rows = query_batch(tok, EPISODES)
    shuffle = torch.tensor([5, 0, 3, 1, 4, 2])
    with torch.no_grad():
        with bridge.hooks(fwd_hooks=delta_hooks(deltas, rows)):
            grouped = bridge(ids, attention_mask=mask)
        with bridge.hooks(fwd_hooks=delta_hooks(deltas, rows[shuffle])):
            shuffled = bridge(ids[shuffle], attention_mask=mask[shuffle])
    return ids, mask, rows, shuffle, grouped, shuffled


def test_delta_hooks_accept_rows_in_any_order(mha, tok):
    _, bridge = mha
    deltas = train_deltas(bridge, tok, TASK, EPISODES, GDConfig(params="qkvo", lr=0.05))
    ids, mask, rows, shuffle, grouped, shuffled = _grouped_and_shuffled(bridge, tok, deltas)
    with torch.no_grad():
        base = bridge(ids, attention_mask=mask)
    torch.testing.assert_close(shuffled, grouped[shuffle], atol=1e-6, rtol=0)
    assert (grouped - base).abs().max() > 1e-3
    with pytest.raises(IclgdError, match="row_episode"):
        delta_hooks(deltas, torch.tensor([0, 7]))


def test_norms_and_scaled_random_like(mha, tok):
    _, bridge = mha
    deltas = train_deltas(bridge, tok, TASK, EPISODES, GDConfig(params="kv", lr=0.05))
    rand, again = deltas.scaled_random_like(0), deltas.scaled_random_like(0)
    for path, norm in deltas.norms().items():
        assert norm.shape == (len(EPISODES),) and (norm > 0).all()
        torch.testing.assert_close(rand.norms()[path], norm, rtol=1e-5, atol=0)
        assert torch.equal(rand.tensors[path], again.tensors[path])
        cos = F.cosine_similarity(rand.tensors[path].flatten(1), deltas.tensors[path].flatten(1), dim=1)
        assert cos.abs().max() < 0.5
    assert not torch.equal(
        deltas.scaled_random_like(1).tensors["blocks.0.attn.k"], rand.tensors["blocks.0.attn.k"]
    )


# ---- safety: divergence, the user's model untouched -------------------------------------
@pytest.fixture(scope="module")
def half(tok):
    """A float16 bridge: its deltas overflow to inf at a large learning rate, as real runs do."""
    hf = make_hf(False).half()
    return hf, TransformerBridge.boot_transformers(
        "tiny", hf_model=copy.deepcopy(hf), tokenizer=tok, device="cpu"
    )


def test_divergence_raises_one_clear_line_and_leaves_model_unchanged(half, tok):
    _, bridge = half
    before = state_of(bridge)
    with pytest.raises(IclgdError) as info:
        train_deltas(bridge, tok, TASK, EPISODES, GDConfig.dai(lr=1e6))
    message = str(info.value)
    assert re.fullmatch(
        r"GD diverged at step \d+ with lr=1e\+06 \(preset dai\); lower the learning rate", message
    ), message
    assert_bitwise_equal(before, bridge)


def test_float32_deltas_for_half_precision_models(half, tok):
    _, bridge = half
    deltas = train_deltas(bridge, tok, TASK, EPISODES, GDConfig(params="kv", lr=0.05, delta_dtype="float32"))
    assert all(t.dtype == torch.float32 for t in deltas.tensors.values())
    ids, mask, rows = query_batch(tok, EPISODES)
    with torch.no_grad(), bridge.hooks(fwd_hooks=delta_hooks(deltas, rows)):
        gd_logits = bridge(ids, attention_mask=mask)
    assert gd_logits.dtype == torch.float16 and torch.isfinite(gd_logits).all()
    default = train_deltas(bridge, tok, TASK, EPISODES, GDConfig(params="kv", lr=0.05))
    assert default.tensors["blocks.0.attn.k"].dtype == torch.float16


def test_model_unchanged_after_exception_inside_a_hook(mha, tok):
    hf, bridge = mha
    before = state_of(bridge)
    flags = {n: p.requires_grad for n, p in bridge.named_parameters()}
    calls = []

    def fail_on_third_forward(t, hook):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")

    bridge.add_hook("blocks.0.hook_resid_post", fail_on_third_forward)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            train_deltas(bridge, tok, TASK, EPISODES, GDConfig(params="all", lr=0.05, optimizer="adam"))
    finally:
        bridge.reset_hooks()
    assert_bitwise_equal(before, bridge)
    assert flags == {n: p.requires_grad for n, p in bridge.named_parameters()}
    assert all(p.grad is None for p in bridge.parameters())
    ids, mask, _ = query_batch(tok, EPISODES)
    with torch.no_grad():  # no delta hook left behind
        torch.testing.assert_close(
            bridge(ids, attention_mask=mask), hf(ids, attention_mask=mask).logits, atol=1e-5, rtol=0
        )


# ---- configuration ----------------------------------------------------------------------
def test_preset_object_and_preset_name_train_with_the_same_learning_rate():
    """The README's `compare(model, gd=GDConfig.dai())` must mean `gd="dai"`: the task's lr."""
    from dataclasses import replace

    from iclgd_lens.engine.gd import DEFAULT_LR

    task = replace(TASK, gd_lr=0.07)
    for name, make in (("dai", GDConfig.dai), ("deutch", GDConfig.deutch), ("shen", GDConfig.shen)):
        assert GDConfig.resolve(make(), task) == GDConfig.resolve(name, task)
        assert GDConfig.resolve(name, task).lr == 0.07
        assert GDConfig.resolve(make(lr=0.2), task).lr == 0.2  # an explicit lr wins
    assert GDConfig.resolve("dai", replace(TASK, gd_lr=None)).lr == DEFAULT_LR
    with pytest.raises(IclgdError):
        GDConfig.resolve(0.1, task)


def test_train_deltas_resolves_the_task_learning_rate(mha, tok):
    from dataclasses import replace

    _, bridge = mha
    task = replace(TASK, gd_lr=0.05)
    implicit = train_deltas(bridge, tok, task, EPISODES, GDConfig.dai())
    explicit = train_deltas(bridge, tok, task, EPISODES, GDConfig.dai(lr=0.05))
    assert implicit.config.lr == 0.05
    for path in explicit.tensors:
        torch.testing.assert_close(implicit.tensors[path], explicit.tensors[path], atol=0, rtol=0)


def test_presets_and_bad_settings():
    assert GDConfig.preset("dai", lr=0.2) == GDConfig(params="kv", lr=0.2, name="dai")
    assert GDConfig.preset("deutch").layer_causal and GDConfig.preset("deutch").params == "kv"
    shen = GDConfig.preset("shen-single-layer", layer=1)
    assert (shen.params, shen.layer, shen.loss_on) == ("v_single", 1, "label_tokens")
    assert GDConfig.shen().params == "all"
    assert projection_paths(GDConfig.shen(params="v_single"), 4) == ["blocks.2.attn.v"]
    assert len(projection_paths(GDConfig.shen(), 2)) == 2 * 7 + 1
    for bad in (
        lambda: GDConfig.preset("adamw"),
        lambda: GDConfig.preset("dai", momentum=0.9),
        lambda: GDConfig(optimizer="rmsprop"),
        lambda: GDConfig(lr=-1),
        lambda: GDConfig(params="kv", layer=1),
        lambda: GDConfig(batch_size=0),
        lambda: GDConfig(lr=True),  # a bool is not a number here
        lambda: GDConfig(epochs=True),
        lambda: GDConfig(epochs=2.0),
        lambda: GDConfig(params="v_single", layer=1.5),
        lambda: GDConfig(delta_dtype="bf16"),
        lambda: GDConfig(layer_causal="false"),  # a truthy string would train layer-causally
        lambda: GDConfig.preset("dai", layer_causal="yes"),
        lambda: GDConfig.preset(["dai", "shen"]),  # not a name (was: TypeError, unhashable list)
        lambda: projection_paths(GDConfig(params="v_single", layer=5), 2),
    ):
        with pytest.raises(IclgdError) as info:
            bad()
        assert "\n" not in str(info.value)


def test_delta_dtype_takes_the_spellings_of_float32():
    for spelling in ("float32", "fp32", "FP32", "torch.float32", torch.float32):
        assert GDConfig(delta_dtype=spelling).delta_dtype == "float32"


def test_zero_demonstrations_give_zero_deltas(mha, tok):
    _, bridge = mha
    empty = [Episode((), e.queries, e.label_words) for e in EPISODES]
    deltas = train_deltas(bridge, tok, TASK, empty, GDConfig.dai())
    assert deltas.losses.shape == (0, len(EPISODES))
    assert all((n == 0).all() for n in deltas.norms().values())


def test_episodes_must_share_k(mha, tok):
    _, bridge = mha
    short = Episode(EPISODES[0].demos[:2], EPISODES[0].queries, EPISODES[0].label_words)
    with pytest.raises(IclgdError, match="same number of demonstrations"):
        train_deltas(bridge, tok, TASK, [EPISODES[0], short], GDConfig())


# ---- low-rank SGD: factors (U, V) with dW = U V^T ------------------------------------------
def train_with_limit(bridge, tok, config: GDConfig, limit: float, monkeypatch, episodes=EPISODES) -> Deltas:
    monkeypatch.setattr(gd, "LOW_RANK_LIMIT", limit)
    return train_deltas(bridge, tok, TASK, episodes, config)


def gd_logits(bridge, tok, deltas: Deltas) -> torch.Tensor:
    ids, mask, rows = query_batch(tok, EPISODES)
    with torch.no_grad(), bridge.hooks(fwd_hooks=delta_hooks(deltas, rows)):
        return bridge(ids, attention_mask=mask)


LOW_RANK_SETTINGS = {
    "dai-k4": GDConfig.dai(lr=0.05),
    "kv-batch2-2epochs": GDConfig(params="kv", lr=0.05, epochs=2, batch_size=2),
    "all-2epochs": GDConfig(params="all", lr=0.05, epochs=2),
    "layer-causal": GDConfig.deutch(lr=0.05),
    "layer-causal-all-batch2": GDConfig(params="all", lr=0.05, batch_size=2, layer_causal=True),
    "qkvo-label-seeded": GDConfig(params="qkvo", lr=0.05, epochs=2, loss_on="label_tokens", order_seed=1),
}


@pytest.mark.parametrize("name", list(LOW_RANK_SETTINGS))
def test_factor_path_equals_dense_path(models_, tok, name, monkeypatch):
    _, bridge = models_
    config = LOW_RANK_SETTINGS[name]
    low_rank = train_with_limit(bridge, tok, config, float("inf"), monkeypatch)
    dense = train_with_limit(bridge, tok, config, 0.0, monkeypatch)
    assert set(low_rank.factors) == set(low_rank.parts) and not dense.factors
    assert list(low_rank.tensors) == list(dense.tensors) == projection_paths(config, 2)
    for path, dw in dense.tensors.items():
        assert dw.abs().max() > 1e-4, path
        torch.testing.assert_close(low_rank.tensors[path], dw, atol=1e-5, rtol=0, msg=path)
        torch.testing.assert_close(
            low_rank.norms()[path], dense.norms()[path], atol=1e-6, rtol=1e-5, msg=path
        )
    torch.testing.assert_close(low_rank.losses, dense.losses, atol=1e-5, rtol=0)
    logits = gd_logits(bridge, tok, low_rank)
    torch.testing.assert_close(logits, gd_logits(bridge, tok, dense), atol=1e-5, rtol=0)
    ids, mask, _ = query_batch(tok, EPISODES)
    with torch.no_grad():
        assert (logits - bridge(ids, attention_mask=mask)).abs().max() > 1e-3  # the deltas act


@pytest.mark.parametrize("name", ["dai-k4", "kv-batch2-2epochs", "layer-causal"])
def test_preallocated_factors_equal_concatenated_ones(models_, tok, name, monkeypatch):
    """The factors written into preallocated buffers are bitwise the factors concatenated step by
    step, and each delta's U fills one buffer (no second copy of the factors)."""
    _, bridge = models_
    config = LOW_RANK_SETTINGS[name]
    preallocated = train_with_limit(bridge, tok, config, float("inf"), monkeypatch)
    monkeypatch.setattr(gd, "_factor_buffers", lambda *args: {})
    concatenated = train_with_limit(bridge, tok, config, float("inf"), monkeypatch)
    for path, (u, v) in concatenated.factors.items():
        pu, pv = preallocated.factors[path]
        assert torch.equal(pu, u) and torch.equal(pv, v), path
        assert pu.untyped_storage().nbytes() == u.numel() * u.element_size()  # exactly as wide as needed


def test_rank_is_the_number_of_padded_training_tokens(mha, tok, monkeypatch):
    _, bridge = mha
    config = GDConfig(params="kv", lr=0.05, epochs=2, batch_size=3)  # steps: demos {0,1,2}, {3}, twice
    deltas = train_with_limit(bridge, tok, config, float("inf"), monkeypatch)
    steps = [batches(e, config) for e in EPISODES]  # [episode][step] -> texts
    # every step adds rows x padded width columns per episode (the width is shared by all episodes)
    rank = sum(
        len(steps[0][i]) * max(len(tok(t)["input_ids"]) for e in steps for t in e[i])
        for i in range(len(steps[0]))
    )
    for path, (u, v) in deltas.factors.items():
        d_out, d_in = bridge.get_submodule(path).original_component.weight.shape
        assert u.shape == (len(EPISODES), d_out, rank) and v.shape == (len(EPISODES), d_in, rank), path


def test_densification_kicks_in_and_matches_torch_sgd(mha, tok, monkeypatch):
    hf, bridge = mha
    densified = []
    real_densify = gd._densify
    monkeypatch.setattr(
        gd, "_densify", lambda factors: densified.append(factors[0].shape[-1]) or real_densify(factors)
    )
    monkeypatch.setattr(gd, "LOW_RANK_LIMIT", 1.0)
    # k/v are 32 x 32 here: break-even rank 16; a step of batch 2 adds 2 x (6..9) columns, so
    # every projection trains step 1 low-rank and is multiplied out, non-zero, before step 2
    deltas = check_against_reference(hf, bridge, tok, GDConfig(params="kv", lr=0.05, epochs=3, batch_size=2))
    assert not deltas.factors and len(densified) == len(deltas.parts)
    assert all(rank > 0 for rank in densified)


def test_low_rank_path_needs_no_parameter_gradients(tok, monkeypatch):
    """The factor path takes gradients w.r.t. projection outputs: it must still work when no
    parameter of the model requires grad (a frozen model), and leave the flags as they were."""
    hf = make_hf(False)
    frozen = TransformerBridge.boot_transformers(
        "tiny", hf_model=copy.deepcopy(hf).requires_grad_(False), tokenizer=tok, device="cpu"
    )
    plain = TransformerBridge.boot_transformers(
        "tiny", hf_model=copy.deepcopy(hf), tokenizer=tok, device="cpu"
    )
    for config in (GDConfig(params="qkvo", lr=0.05, epochs=2), GDConfig.deutch(lr=0.05)):
        ours = train_with_limit(frozen, tok, config, float("inf"), monkeypatch)
        expected = train_with_limit(plain, tok, config, 0.0, monkeypatch)
        for path, dw in expected.tensors.items():
            torch.testing.assert_close(ours.tensors[path], dw, atol=1e-5, rtol=0, msg=path)
    assert not any(p.requires_grad for p in frozen.parameters())


def test_factor_deltas_keep_dtype_norms_random_baseline_and_row_order(mha, half, tok, monkeypatch):
    _, bridge = mha
    deltas = train_with_limit(bridge, tok, GDConfig(params="kv", lr=0.05), float("inf"), monkeypatch)
    assert set(deltas.factors) == set(deltas.parts)
    for path, norm in deltas.norms().items():  # from U^T U and V^T V, never multiplied out
        torch.testing.assert_close(norm, torch.linalg.matrix_norm(deltas.tensors[path]), rtol=1e-5, atol=0)
    rand = deltas.scaled_random_like(0)
    for path, norm in deltas.norms().items():
        assert rand.tensors[path].shape == deltas.tensors[path].shape
        torch.testing.assert_close(rand.norms()[path], norm, rtol=1e-5, atol=0)
    ids, mask, rows, shuffle, grouped, shuffled = _grouped_and_shuffled(bridge, tok, deltas)
    with torch.no_grad():
        with bridge.hooks(fwd_hooks=delta_hooks(deltas, torch.full((2,), 1))):  # one episode's rows only
            second = bridge(ids[2:4], attention_mask=mask[2:4])
    torch.testing.assert_close(shuffled, grouped[shuffle], atol=1e-6, rtol=0)
    torch.testing.assert_close(second, grouped[2:4], atol=1e-6, rtol=0)
    _, half_bridge = half
    fp32 = train_with_limit(
        half_bridge, tok, GDConfig(params="kv", lr=0.05, delta_dtype="float32"), float("inf"), monkeypatch
    )
    assert all(u.dtype == v.dtype == torch.float32 for u, v in fp32.factors.values())
    fp16 = train_with_limit(half_bridge, tok, GDConfig(params="kv", lr=0.05), float("inf"), monkeypatch)
    assert all(u.dtype == torch.float16 for u, _ in fp16.factors.values())
    assert all(dw.dtype == torch.float16 for dw in fp16.tensors.values())


def test_low_rank_divergence_raises_one_clear_line(half, tok, monkeypatch):
    _, bridge = half
    before = state_of(bridge)
    with pytest.raises(
        IclgdError, match=r"^GD diverged at step \d+ with lr=1e\+06 \(preset dai\); lower the learning rate$"
    ):
        train_with_limit(bridge, tok, GDConfig.dai(lr=1e6), float("inf"), monkeypatch)
    assert_bitwise_equal(before, bridge)


def test_delta_hooks_fail_loudly_when_a_projection_update_is_not_applied(mha, tok):
    """Run-time guard: if the bridge stopped calling one projection's hooks, the GD condition
    must stop, not silently run with part of the update missing."""
    _, bridge = mha
    deltas = train_deltas(bridge, tok, TASK, EPISODES, GDConfig.dai(lr=0.05))
    ids, mask, rows = query_batch(tok, EPISODES)
    hooks = delta_hooks(deltas, rows)
    with torch.no_grad(), bridge.hooks(fwd_hooks=hooks):
        bridge(ids, attention_mask=mask)  # all applied: passes, twice in a row
        bridge(ids, attention_mask=mask)
    skipped = [(name, fn) for name, fn in hooks if not name.startswith("blocks.1.attn.v.")]
    with pytest.raises(IclgdError, match="blocks.1.attn.v was added 0 times") as info, torch.no_grad():
        with bridge.hooks(fwd_hooks=skipped):
            bridge(ids, attention_mask=mask)
    assert "\n" not in str(info.value)
