"""A memory model of `compare()`: the peak bytes a comparison holds beyond the model's weights,
predicted from the model's shape, k, the prompt lengths, episodes, queries, probes and baselines,
and the rows per forward pass (`batch_size`) that keep it under a budget.

    plan = plan_compare(model, task, k=32, n_episodes=8, n_queries=64, max_memory=60 * 2**30)
    plan.batch_size, plan.peak_bytes, plan.phase       # pass compare(..., batch_size=plan.batch_size)
    print(plan.describe())                             # every term of the peak phase

The peak is the largest of four phases, each the sum of what is alive then:

- `gd`: one GD step (all episodes' rows in lockstep): the activations autograd saves, the logits
  and their float32 loss tensors, the low-rank factors (preallocated to their final rank) or
  the dense deltas and their gradients;
- `prefix` / `queries`: the ICL passes (the demonstrations once per episode, then the query rows on
  top of the prefix KV cache, whose keys and values each layer writes for its rows into one
  buffer that every layer reuses) and the query-alone passes, beside the deltas, the
  random-update baseline's dense deltas (`RANDOM_UPDATE_BYTES`' worth of episodes) and the
  recordings of one group of episodes (compare() records, tables and drops a group of at most
  `batch_size` query rows at a time);
- `table`: the metrics of one episode (the largest temporaries: the float64 factors of the dW
  metrics, Kendall's bounded sign chunks) beside the group's recordings and the rows;
- with the untrained baseline (`baselines.untrained_in_place`: the model's own attention and MLP
  weights re-drawn, the trained ones parked in host memory): on a GPU nothing more than the
  first pass's rows beside that baseline's own (baseline-free) pipeline; on a CPU, where the
  parked weights stay in the same memory, also the re-drawn attention and MLP weights.

Sizes follow the code paths of `engine.record`, `engine.gd`, `engine.table` and the built-in
probes (iclgd_lens.hooks); constants are counts of tensors of a LLaMA decoder layer. Checked
against measured peaks (RSS on the CPU, `torch.cuda.max_memory_allocated` on a GPU) by
benchmarks/engine.py and benchmarks/gpu_check.py; the 7B plan of docs/performance.md is
benchmarks/memory_plan.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from iclgd_lens.engine.metrics import KENDALL_CHUNK_BYTES
from iclgd_lens.errors import IclgdError

RANDOM_UPDATE_BYTES = 256 * 2**20
"""The random-update baseline's dense deltas are drawn for as many of a group's episodes at once
as fit in this many bytes (at least one; compare() reads it from here): the small models' groups
run in one pass, a 7B comparison holds one episode's dense K/V update (2 GB in bf16)."""

BATCH_SIZES = (128, 64, 32, 16, 8, 4, 2, 1)
"""Rows per forward pass `plan_compare` tries, largest first (compare()'s default is 128)."""

# tensors of one decoder layer, per token, that autograd keeps for the backward pass of a GD step
# (eager LLaMA): in units of d_model (norm inputs and their float32 copies, q/k/v and their
# rotated copies, the attention output, o_proj's input, residuals), of d_mlp (gate, up, act(gate),
# act * up) and of n_heads x key positions (scores, softmax, the hooked pattern)
SAVED_D_MODEL, SAVED_D_MLP, SAVED_SCORES = 14, 4, 3
# transient tensors of one layer of a forward pass without gradients (one layer at a time)
PASS_D_MODEL, PASS_D_MLP, PASS_SCORES = 6, 3, 3
TABLE_ROW_BYTES = 90
"""Bytes of one tidy row (7 numpy/object columns, the strings shared) in the DataFrames."""


@dataclass(frozen=True)
class ModelShape:
    """What the memory model needs of a LLaMA: sizes and the bytes of one element."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_params: int
    bytes_per_element: int = 4

    @classmethod
    def of(cls, model) -> "ModelShape":
        """From a TransformerBridge (or a HF LLaMA)."""
        hf = getattr(model, "original_model", model)
        first = next(hf.parameters())
        return cls.from_config(hf.config, first.element_size(), sum(p.numel() for p in hf.parameters()))

    @classmethod
    def from_config(cls, config, bytes_per_element: int, n_params: int | None = None) -> "ModelShape":
        """From a HF LlamaConfig (parameters counted from the config when not given)."""
        d, L = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or heads
        d_head = getattr(config, "head_dim", None) or d // heads
        if n_params is None:
            per_layer = (
                d * heads * d_head * 2 + 2 * d * kv * d_head + 3 * d * config.intermediate_size + 2 * d
            )
            tied = getattr(config, "tie_word_embeddings", False)
            n_params = L * per_layer + config.vocab_size * d * (1 if tied else 2) + d
        return cls(
            L, d, heads, kv, d_head, config.intermediate_size, config.vocab_size, n_params, bytes_per_element
        )

    @property
    def model_bytes(self) -> int:
        return self.n_params * self.bytes_per_element

    @property
    def attention_mlp_bytes(self) -> int:
        """Bytes of the attention and MLP linear weights: what the untrained baseline re-draws."""
        d, q, kv = self.d_model, self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        return self.n_layers * (2 * d * q + 2 * d * kv + 3 * d * self.d_mlp) * self.bytes_per_element


@dataclass(frozen=True)
class Lengths:
    """Token counts of one comparison (maxima over its episodes unless said otherwise)."""

    demo: int  # the longest demonstration tokenised alone (BOS included): one GD row
    train: int  # GD training tokens per episode, each step padded to its longest row
    prefix: int  # the shared demonstrations of an ICL prompt
    suffix: int  # an ICL prompt after the prefix (separator and query)
    zsl: int  # a query alone (BOS included)
    query_tokens: int  # the query's own tokens (the SimAM map's width)


@dataclass
class Plan:
    """A predicted peak: bytes beyond the model's weights, per phase and per term."""

    batch_size: int
    peak_bytes: int
    phase: str
    phases: dict[str, dict[str, int]] = field(default_factory=dict)
    model_bytes: int = 0
    fits: bool = True
    max_memory: int | None = None

    @property
    def total_bytes(self) -> int:
        """The weights plus the peak: what the device must hold."""
        return self.model_bytes + self.peak_bytes

    def describe(self) -> str:
        gb = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        lines = [
            f"predicted peak {gb(self.total_bytes)} = model {gb(self.model_bytes)} + {gb(self.peak_bytes)} "
            f"in phase {self.phase!r} with batch_size={self.batch_size}"
            + (
                f" (budget {gb(self.max_memory)}{'' if self.fits else ': does NOT fit'})"
                if self.max_memory
                else ""
            )
        ]
        for name, terms in self.phases.items():
            total = sum(terms.values())
            parts = ", ".join(f"{k} {gb(v)}" for k, v in sorted(terms.items(), key=lambda kv: -kv[1]) if v)
            lines.append(f"  {name}: {gb(total)} ({parts})")
        return "\n".join(lines)


def predict(
    shape: ModelShape,
    lengths: Lengths,
    *,
    n_episodes: int,
    n_queries: int,
    k: int,
    probes: Sequence[str],
    baselines: Sequence[str],
    batch_size: int = 128,
    gd_params: str = "kv",
    gd_batch: int = 1,
    delta_bytes: int | None = None,
    low_rank_limit: float = 1.0,
    device: str = "cuda",
) -> Plan:
    """The peak of one `compare()` with these sizes on a `device` type ("cuda", "cpu"; see the
    module docstring for the phases)."""
    s, n = shape, lengths
    b = s.bytes_per_element
    db = delta_bytes or b
    E, Q, L, d, H, KV, dh = n_episodes, n_queries, s.n_layers, s.d_model, s.n_heads, s.n_kv_heads, s.d_head
    d_kv = KV * dh
    probes, baselines = set(probes), set(baselines)

    # ---- GD: the deltas and one step ------------------------------------------------------------
    projections = _projections(s, gd_params)  # (d_in, d_out) of every trained projection
    rank = n.train  # low-rank factors grow by every training token
    deltas = 0
    for d_in, d_out in projections:
        if rank <= low_rank_limit * d_in * d_out / (d_in + d_out):
            deltas += E * rank * (d_in + d_out) * db
        else:
            deltas += 2 * E * d_in * d_out * db  # dense delta and its gradient
    rows_gd, t = E * gd_batch, n.demo
    saved = rows_gd * t * L * (SAVED_D_MODEL * d + SAVED_D_MLP * s.d_mlp + SAVED_SCORES * H * t) * b
    logits_gd = rows_gd * t * s.d_vocab * (b + 3 * 4)  # logits, float32 copy, log-softmax, gradient
    train_queries = E * L * n.train * H * dh * b if {"scores", "query_vectors"} <= probes else 0
    gd_phase = {
        "deltas (preallocated factors, or dense + gradient)": deltas,
        "saved activations": saved,
        "logits and loss": logits_gd,
        "GD's query vectors (Kendall)": train_queries,
    }

    # ---- recordings kept until the table ---------------------------------------------------------
    key_pos = n.prefix + n.suffix
    icl_conditions = 1 + ("icl_perm" in baselines and k > 1)
    gd_conditions = 1 + ("random_update" in baselines)
    zsl_rows = Q  # every episode asks the same queries: ZSL runs once
    per_row = {  # bytes one query row keeps, per condition kind
        "query_alone": 0,
        "icl": 0,
    }
    vocab = s.d_vocab * b
    per_row["query_alone"] += vocab
    per_row["icl"] += vocab
    if "attn_out" in probes:
        per_row["query_alone"] += L * d * b
        per_row["icl"] += L * d * b
    if "head_out" in probes:
        per_row["query_alone"] += L * H * dh * b
        per_row["icl"] += L * H * dh * b
    if "scores" in probes:
        per_row["query_alone"] += L * H * n.query_tokens * 4
        per_row["icl"] += L * H * n.query_tokens * 4 + L * key_pos * b  # + demo_scores
    if "demo_attention" in probes:
        per_row["icl"] += L * H * key_pos * b
    if "query_vectors" in probes:
        per_row["query_alone"] += L * H * dh * b
        per_row["icl"] += 2 * L * H * dh * b  # q and rot_q
    if "kv_outer" in probes:
        per_row["query_alone"] += 2 * L * n.zsl * KV * dh * b  # kv_context_k, kv_context_v
    if "resid_out" in probes:
        per_row["query_alone"] += L * d * b
        per_row["icl"] += L * d * b
    per_prefix = 0
    if "query_vectors" in probes:
        per_prefix += L * n.prefix * H * dh * b  # q_demo
    if "kv_outer" in probes:
        per_prefix += L * KV * dh * dh * b  # kv_demo
    # compare() records, tables and drops one group of episodes at a time (at most batch_size query
    # rows, or one episode): the recordings of one group are alive, not those of every episode
    rows_group = min(E, max(1, batch_size // Q)) * Q if Q <= batch_size else Q
    groups = max(1, rows_group // Q)
    recordings = (
        zsl_rows * per_row["query_alone"]
        + gd_conditions * rows_group * per_row["query_alone"]
        + icl_conditions * (rows_group * per_row["icl"] + groups * per_prefix)
    )
    # chunks of one condition are joined (a copy) only when a group has more rows than a pass
    biggest_condition = (
        max(rows_group * per_row["icl"], rows_group * per_row["query_alone"])
        if rows_group > batch_size
        else 0
    )
    # drawn dense for as many of a group's episodes as fit in RANDOM_UPDATE_BYTES (at least one)
    episodes_per_group = min(E, max(1, batch_size // Q)) if Q <= batch_size else 1
    per_episode_random = sum(d_in * d_out * db for d_in, d_out in projections)
    random_deltas = (
        min(episodes_per_group, max(1, RANDOM_UPDATE_BYTES // per_episode_random)) * per_episode_random
        if "random_update" in baselines
        else 0
    )

    # ---- the passes ------------------------------------------------------------------------------
    rows_icl = min(batch_size, rows_group)  # query rows per ICL pass (chunks of one group)
    layer_pass = lambda rows, pos, keys: (
        rows * pos * (PASS_D_MODEL * d + PASS_D_MLP * s.d_mlp) * b
        + (  # noqa: E731
            PASS_SCORES * rows * H * pos * keys * b
        )
    )
    prefix_cache = groups * L * 2 * n.prefix * d_kv * b
    prefix_pass = (
        layer_pass(groups, n.prefix, n.prefix)
        + groups * n.prefix * vocab
        + prefix_cache
        + groups * per_prefix
    )
    # the groups' prefix cache (read, never copied per row) and one layer's keys and values of the
    # chunk's rows (engine.prefix_cache: one buffer reused by every layer), GQA-expanded once more
    kv_rows = prefix_cache + rows_icl * 2 * key_pos * (d_kv + (H * dh if KV < H else 0)) * b
    query_pass = layer_pass(rows_icl, n.suffix, key_pos) + rows_icl * n.suffix * vocab + kv_rows
    rows_q = min(batch_size, rows_group)
    alone_pass = layer_pass(rows_q, n.zsl, n.zsl) + rows_q * n.zsl * vocab
    kept = {
        "deltas": deltas,
        "random-update deltas": random_deltas,
        "recordings": recordings,
        "joining chunks (x2 of one condition)": biggest_condition,
    }
    prefix_phase = {**kept, "prefix pass": prefix_pass}
    queries_phase = {
        **kept,
        "ICL query pass (prefix cache, one layer of row keys)": query_pass,
        "query-alone pass": 0,
    }
    if alone_pass > query_pass:
        queries_phase = {
            **kept,
            "ICL query pass (prefix cache, one layer of row keys)": 0,
            "query-alone pass": alone_pass,
        }

    # ---- the table -------------------------------------------------------------------------------
    rows_table = _table_rows(s, E, Q, probes, baselines)
    # the dW metrics' float64 factors of one layer and comparison (P, K, A k) and the dual form's dW q
    dual_form = (
        3 * Q * 2 * n.zsl * KV * dh * 8 + 2 * L * Q * H * dh * 8
        if {"kv_outer", "query_vectors", "head_out"} <= probes
        else 0
    )
    pairs = n.prefix * (n.prefix - 1) // 2  # Kendall's pairs of demonstration tokens
    kendall = (  # the pair signs of a and b and one difference, per chunk of at most KENDALL_CHUNK_BYTES
        3 * min(KENDALL_CHUNK_BYTES, L * Q * H * pairs * 4)
        if "demo_attention" in probes or "query_vectors" in probes
        else 0
    )
    table_phase = {
        "deltas": deltas,
        "random-update deltas": random_deltas,
        "recordings": recordings,
        "episode temporaries (dW factors, dW q, Kendall chunks)": dual_form + kendall,
        "rows": rows_table * TABLE_ROW_BYTES,
    }
    phases = {"gd": gd_phase, "prefix": prefix_phase, "queries": queries_phase, "table": table_phase}
    if "untrained" in baselines:
        base = predict(
            shape,
            lengths,
            n_episodes=E,
            n_queries=Q,
            k=k,
            probes=sorted(probes),
            baselines=(),
            batch_size=batch_size,
            gd_params=gd_params,
            gd_batch=gd_batch,
            delta_bytes=delta_bytes,
            low_rank_limit=low_rank_limit,
            device=device,
        )
        phases["untrained"] = {
            "re-drawn attention/MLP weights beside the parked trained ones (same memory on a CPU)": (
                s.attention_mlp_bytes if device == "cpu" else 0
            ),
            "first pass's rows": rows_table * TABLE_ROW_BYTES,
            f"its own pipeline (phase {base.phase})": base.peak_bytes,
        }
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    phase = max(totals, key=totals.get)
    return Plan(batch_size, int(totals[phase]), phase, phases, s.model_bytes)


def _projections(s: ModelShape, params: str) -> list[tuple[int, int]]:
    d, q, kv = s.d_model, s.n_heads * s.d_head, s.n_kv_heads * s.d_head
    attn = {"kv": [(d, kv), (d, kv)], "qkvo": [(d, q), (d, kv), (d, kv), (q, d)]}
    if params == "v_single":
        return [(d, kv)]
    if params in ("kv", "qkvo"):
        return attn[params] * s.n_layers
    if params == "all":
        mlp = [(d, s.d_mlp), (d, s.d_mlp), (s.d_mlp, d)]
        return (attn["qkvo"] + mlp) * s.n_layers + [(d, s.d_vocab)]
    raise IclgdError(f"unknown GD parameter set {params!r}")


def _table_rows(s: ModelShape, E: int, Q: int, probes: set, baselines: set) -> int:
    """Rows of the tidy table: per-head metrics x (heads + the head mean) and per-layer metrics."""
    comparisons = 1 + ("icl_perm" in baselines) + ("random_update" in baselines) + ("random" in baselines)
    per_head = per_layer = 0
    if "head_out" in probes:
        per_head += 2 * comparisons
    if "attn_out" in probes:
        per_layer += 2 * comparisons
    if "scores" in probes:
        per_head += 3 + ("icl_perm" in baselines) + ("random_update" in baselines)
    if "demo_attention" in probes and "query_vectors" in probes:
        per_head += 2 + ("random" in baselines)
    if "scores" in probes and "query_vectors" in probes:
        per_layer += 2 * (1 + ("random" in baselines))
    if "kv_outer" in probes:
        per_head += 2 * (1 + ("random_update" in baselines)) + 2
    if "resid_out" in probes:
        per_layer += comparisons
    return E * Q * s.n_layers * (per_head * (s.n_heads + 1) + per_layer) + E * Q * 30


def lengths_of(tokenizer, task, episodes) -> Lengths:
    """The token counts of `episodes` of `task` under `tokenizer` (as compare() encodes them)."""
    from iclgd_lens.tasks import QUERY_SEGMENT, encode_prompts

    demo = train = prefix = suffix = zsl = query_tokens = 0
    for episode in episodes:
        demo_lengths = [
            len(tokenizer(task.render_demo(x, episode.label_words))["input_ids"]) for x in episode.demos
        ]
        demo = max([demo, *demo_lengths])
        train = max(train, sum(demo_lengths))
        if not episode.demos:
            continue
        icl = encode_prompts(
            tokenizer,
            task,
            [episode.demos] * len(episode.queries),
            list(episode.queries),
            [episode.label_words] * len(episode.queries),
        )
        first_query = int((icl.segments == QUERY_SEGMENT).float().argmax(-1).min())
        prefix = max(prefix, first_query)
        suffix = max(suffix, icl.input_ids.shape[1] - first_query)
        query_tokens = max(query_tokens, int((icl.segments == QUERY_SEGMENT).sum(-1).max()))
    for episode in episodes[:1]:
        alone = encode_prompts(
            tokenizer,
            task,
            [()] * len(episode.queries),
            list(episode.queries),
            [episode.label_words] * len(episode.queries),
        )
        zsl = alone.input_ids.shape[1]
    # GD steps pad to the longest row of the step: at most `demo` per step
    train = max(train, 0)
    return Lengths(demo, train, prefix, suffix, zsl, query_tokens)


def plan_compare(
    model,
    task=None,
    *,
    gd="dai",
    k: int = 8,
    n_episodes: int = 8,
    n_queries: int = 6,
    seed: int = 0,
    probes: Sequence[str] | None = None,
    baselines: Sequence[str] | bool = True,
    batch_size: int | None = None,
    max_memory: int | None = None,
    device: str | None = None,
) -> Plan:
    """The predicted peak of `compare(model, task, ...)` with the same arguments, and the largest
    batch size whose peak fits `max_memory` bytes, weights included (`batch_size` if it fits, else
    the largest of BATCH_SIZES below it; `choose_batch_size`). `plan.fits` is False when even one
    row per pass does not fit: the GD step or the recordings need fewer episodes or queries per call.
    `device`: the device type it runs on ("cuda", "cpu"; default: that of the model's weights)."""
    from iclgd_lens.tasks import resolve_task

    if device is None:
        device = next(getattr(model, "original_model", model).parameters()).device.type

    return plan_for_shape(
        ModelShape.of(model),
        model.tokenizer,
        resolve_task(task, seed),
        device=device,
        gd=gd,
        k=k,
        n_episodes=n_episodes,
        n_queries=n_queries,
        seed=seed,
        probes=probes,
        baselines=baselines,
        batch_size=batch_size,
        max_memory=max_memory,
    )


def plan_for_shape(
    shape: ModelShape,
    tokenizer,
    task,
    *,
    gd="dai",
    k: int = 8,
    n_episodes: int = 8,
    n_queries: int = 6,
    seed: int = 0,
    probes: Sequence[str] | None = None,
    baselines: Sequence[str] | bool = True,
    batch_size: int | None = None,
    max_memory: int | None = None,
    device: str = "cuda",
) -> Plan:
    """`plan_compare` without weights: a model's shape (`ModelShape.from_config`) and tokenizer,
    e.g. for a 7B plan on a machine that cannot load it (`device`: the device type it will run on)."""
    from iclgd_lens.engine.compare import _chosen_baselines, _probe_names
    from iclgd_lens.engine.gd import GDConfig

    config = GDConfig.resolve(gd, task)
    episodes = task.episodes(k, n_episodes, n_queries, seed)
    lengths = lengths_of(tokenizer, task, episodes)
    delta_bytes = 4 if config.delta_dtype else None
    # SGD's steps pad each step to its longest row across episodes: the rank is the padded total
    lengths = Lengths(
        lengths.demo,
        _padded_train(tokenizer, task, episodes, config.batch_size),
        lengths.prefix,
        lengths.suffix,
        lengths.zsl,
        lengths.query_tokens,
    )
    kwargs = dict(
        n_episodes=n_episodes,
        n_queries=len(episodes[0].queries),
        k=k,
        probes=_probe_names(probes),
        baselines=_chosen_baselines(baselines),
        gd_params=config.params,
        gd_batch=config.batch_size,
        delta_bytes=delta_bytes,
        device=device,
    )
    return choose_batch_size(shape, lengths, max_memory, batch_size, **kwargs)


def choose_batch_size(shape, lengths, max_memory, batch_size=None, **kwargs) -> Plan:
    """The largest batch size whose predicted total fits `max_memory`: `batch_size` itself if it
    fits (or no budget is given), else the largest of BATCH_SIZES below it (all of them if None)."""
    candidates = (batch_size, *(b for b in BATCH_SIZES if b < batch_size)) if batch_size else BATCH_SIZES
    plan = None
    for size in candidates:
        plan = predict(shape, lengths, batch_size=size, **kwargs)
        plan.max_memory = max_memory
        if max_memory is None or plan.total_bytes <= max_memory:
            return plan
    plan.fits = False
    return plan


def _padded_train(tokenizer, task, episodes, gd_batch: int) -> int:
    """GD training tokens per episode as the steps run them: each step's rows padded to the longest
    row of that step over every episode (every episode gets the same rank)."""
    lengths = [
        [len(tokenizer(task.render_demo(x, e.label_words))["input_ids"]) for x in e.demos] for e in episodes
    ]
    k = len(lengths[0]) if lengths else 0
    total = 0
    for start in range(0, k, gd_batch):
        width = max(max(row[start : start + gd_batch]) for row in lengths)
        total += width * len(lengths[0][start : start + gd_batch])
    return total
