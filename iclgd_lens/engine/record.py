"""Record what probes return during forward passes of one condition (ZSL, ICL or GD).

`Recorder` attaches probe hooks to a TransformerBridge (or any TransformerLens
`HookedRootModule` with the same hook names) and keeps only what the probes return, stacked
over layers. Hooks are always removed, also when the forward pass raises; recording never
changes the model.

    rec = Recorder(model, probes=["attn_out", "scores"])
    icl = rec.run(encoded_icl, "icl")          # Recording: icl["attn_out"] is [n_layers, batch, d_model]

    with rec.attach(encoded_icl, "icl"):       # or by hand, e.g. in a notebook
        model(encoded_icl.input_ids, attention_mask=encoded_icl.attention_mask)
    rec.recording("icl")

ICL prompts of one episode share their demonstrations. `run_shared_prefix` runs those once
(condition "icl_prefix", kept in the KV cache) and the queries as a batch on top of them: the
same numbers as full passes (tested), far fewer FLOPs.
"""

from __future__ import annotations

import difflib
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from iclgd_lens.engine.prefix_cache import Scratch, SharedPrefixCache
from iclgd_lens.errors import IclgdError
from iclgd_lens.hooks import Probe, ReadContext, get_probes
from iclgd_lens.models import release_transient_state
from iclgd_lens.tasks import EncodedPrompts

HookList = list[tuple[str, Callable]]


@dataclass
class Recording:
    """Probe outputs of one condition: name -> [n_layers, batch, ...], and read-position logits."""

    condition: str
    values: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None  # [batch, d_vocab] at the read position
    segments: torch.Tensor | None = None  # [batch, key_pos] segments of the keys this pass saw

    def rows(self, start: int, stop: int) -> "Recording":
        """The batch rows start..stop-1 of this recording (values are [n_layers, batch, ...])."""
        values = {name: v[:, start:stop] for name, v in self.values.items()}
        logits = self.logits[start:stop] if self.logits is not None else None
        segments = self.segments[start:stop] if self.segments is not None else None
        return Recording(self.condition, values, logits, segments)

    @staticmethod
    def concat(parts: list["Recording"]) -> "Recording":
        """Join recordings of consecutive batch chunks of one condition. Values whose trailing
        sizes differ between chunks (a SimAM map is as wide as the chunk's longest query) are
        NaN-padded to the widest, the padding the probes use themselves."""
        if len(parts) == 1:
            return parts[0]
        values = {name: _cat_padded([p.values[name] for p in parts]) for name in parts[0].values}
        logits = torch.cat([p.logits for p in parts]) if parts[0].logits is not None else None
        return Recording(parts[0].condition, values, logits, None)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[name]

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def keys(self):
        return self.values.keys()


class Attachment:
    """Probe hooks (and interventions) added through TransformerLens' own `model.hooks()`
    context; `remove()` or use as a context manager. Removing takes off only these hooks."""

    def __init__(self, context):
        self._context = context
        self._open = True

    def remove(self) -> None:
        if self._open:
            self._open = False
            self._context.__exit__(None, None, None)

    def __enter__(self) -> "Attachment":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class Recorder:
    """Attach probes to a model and collect what they return, per condition."""

    def __init__(
        self, model, probes: Sequence[str | Probe] | None = None, layers: Iterable[int] | None = None
    ):
        self.model = model
        if isinstance(probes, (str, Probe)):  # one probe, not a string's characters
            probes = [probes]
        if probes is None:
            self.probes: list[Probe] = get_probes()
        else:
            self.probes = [p if isinstance(p, Probe) else get_probes([p])[0] for p in probes]
        self.layers = (
            list(layers) if layers is not None else list(range(model.cfg.n_layers))
        )  # other HookedRootModules: pass layers
        self._check_points()
        self._collected: dict[str, dict[str, dict[int, torch.Tensor]]] = defaultdict(
            lambda: defaultdict(dict)
        )
        self.key_probe: dict[str, str] = {}  # each recorded key -> the probe that returns it

    def _check_points(self) -> None:
        """Every probe's hook points exist on this model (checked once, before any pass)."""
        known = set(self.model.hook_dict)
        n_layers = getattr(getattr(self.model, "cfg", None), "n_layers", None)
        outside = [layer for layer in self.layers if n_layers is not None and not 0 <= layer < n_layers]
        if outside:
            raise IclgdError(
                f"layer(s) {outside} out of range: the model has {n_layers} layers (0 to {n_layers - 1})"
            )
        for p in self.probes:
            for point in p.points:
                if "{layer}" not in point:
                    fixed = re.sub(r"^blocks\.\d+\.", "blocks.{layer}.", point)
                    example = fixed if fixed != point else "blocks.{layer}.hook_resid_pre"
                    what = "a point of one block" if fixed != point else "a point outside the blocks"
                    raise IclgdError(
                        f"probe {p.name!r} reads hook point {point!r}, which has no {{layer}}: a probe is "
                        f"called once per layer, so {what} would be copied into every layer's rows; "
                        f"name per-layer points (e.g. {example!r})"
                    )
            for layer in self.layers[:1] + self.layers[-1:]:
                for point in p.point_names(layer):
                    if point not in known:
                        of_layer = sorted(n for n in known if n.startswith(f"blocks.{layer}."))
                        near = difflib.get_close_matches(point, of_layer, n=3, cutoff=0.6) or of_layer[:6]
                        raise IclgdError(
                            f"probe {p.name!r} reads hook point {point!r}, which this model does not have "
                            f"(closest points of layer {layer}: {', '.join(near)}; "
                            "model.hook_dict names them all)"
                        )

    def compared_keys(self) -> tuple[str, ...]:
        """Recorded keys whose probe declared `compare=True`: the engine compares them across
        conditions as delta cosines (`probe:<key>`)."""
        declared = {p.name: p.compare for p in self.probes}
        return tuple(key for key, name in self.key_probe.items() if declared.get(name))

    # ---- hooks -----------------------------------------------------------------------
    def hooks(self, context: ReadContext) -> HookList:
        """Hook functions that feed each probe, layer by layer, for one pass."""
        hooks: HookList = []
        store = self._collected[context.condition]
        for layer in self.layers:
            layer_ctx = ReadContext(**{**context.__dict__, "layer": layer})
            for p in self.probes:
                hooks += self._probe_hooks(p, layer, layer_ctx, store)
        return hooks

    def _probe_hooks(self, p: Probe, layer: int, ctx: ReadContext, store) -> HookList:
        stash: dict[str, torch.Tensor] = {}
        key_probe = self.key_probe
        short = [Probe.short_name(pt) for pt in p.points]

        def make(key: str) -> Callable:
            def hook(activation: torch.Tensor, hook) -> None:
                stash[key] = activation
                if len(stash) == len(short):
                    acts = dict(stash)
                    stash.clear()
                    with torch.no_grad():
                        try:
                            out = p.fn(acts, ctx)
                        except IclgdError:
                            raise
                        except Exception as err:  # the probe's own bug: name the probe, where and what
                            raise IclgdError(
                                f"probe {p.name!r} raised {type(err).__name__}: {err} (layer {layer}, "
                                f"condition {ctx.condition}, points {', '.join(p.point_names(layer))})"
                                f"{_remedy(p)}"
                            ) from err
                    _check_probe_output(p, out, ctx, layer)
                    for name, value in out.items():
                        if key_probe.setdefault(name, p.name) != p.name:
                            raise IclgdError(
                                f"probes {key_probe[name]!r} and {p.name!r} both return {name!r}; "
                                "rename one of the keys"
                            )
                        store[name][layer] = value.detach()
                return None

            return hook

        return [(name, make(key)) for name, key in zip(p.point_names(layer), short)]

    def attach(
        self,
        encoded: EncodedPrompts,
        condition: str,
        *,
        interventions: HookList = (),
        prefix_len: int = 0,
        segments: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> Attachment:
        """Add the probe hooks to the model until `.remove()` (or the end of a `with`).

        `interventions` are hooks that change activations (e.g. the GD deltas of
        `iclgd_lens.engine.gd.delta_hooks`). They are registered before every probe hook, in one
        `model.hooks()` call, so a probe on the same hook point always reads the changed value.
        """
        context = self.context(
            encoded, condition, prefix_len=prefix_len, segments=segments, attention_mask=attention_mask
        )
        hooks_context = self.model.hooks(fwd_hooks=[*interventions, *self.hooks(context)])
        hooks_context.__enter__()
        return Attachment(hooks_context)

    def context(
        self,
        encoded: EncodedPrompts,
        condition: str,
        *,
        prefix_len: int = 0,
        segments=None,
        attention_mask=None,
    ) -> ReadContext:
        cfg = getattr(self.model, "cfg", None)
        n_heads = getattr(cfg, "n_heads", 1)
        return ReadContext(
            condition=condition,
            layer=-1,
            read_pos=encoded.read_pos,
            segments=encoded.segments if segments is None else segments,
            attention_mask=encoded.attention_mask if attention_mask is None else attention_mask,
            prefix_len=prefix_len,
            n_heads=n_heads,
            n_kv_heads=getattr(cfg, "n_key_value_heads", None) or n_heads,
        )

    def recording(
        self,
        condition: str,
        logits: torch.Tensor | None = None,
        segments: torch.Tensor | None = None,
        *,
        clear: bool = True,
    ) -> Recording:
        """Stack what was collected for `condition` over the recorder's layers: [n_layers, batch, ...],
        row i for the i-th of `sorted(self.layers)` (every layer of the model unless `layers` was
        given). A layer at which a probe returned nothing for a key (a probe of late layers only,
        or one that skips a condition at some layer) holds NaN there, so every row keeps its layer."""
        collected = self._collected.pop(condition, {}) if clear else self._collected.get(condition, {})
        layers = sorted(self.layers)
        values = {}
        for name, per_layer in collected.items():
            shapes = {tuple(v.shape) for v in per_layer.values()}
            dtypes = {v.dtype for v in per_layer.values()}
            probe_name = self.key_probe.get(name, name)
            if len(shapes) > 1 or len(dtypes) > 1:
                raise IclgdError(
                    f"probe {probe_name!r} returned {name!r} with different shapes or dtypes at different "
                    f"layers ({', '.join(map(str, sorted(shapes)))}; condition {condition}); return one "
                    "shape and dtype at every layer"
                )
            if len(per_layer) == len(layers):
                values[name] = torch.stack([per_layer[layer] for layer in layers])
                continue
            first = next(iter(per_layer.values()))
            if not first.is_floating_point():
                raise IclgdError(
                    f"probe {probe_name!r} returned {name!r} at layers {sorted(per_layer)} only (condition "
                    f"{condition}) as {first.dtype}, which cannot mark the other layers as missing (NaN); "
                    "return a floating tensor, or the key at every layer"
                )
            stacked = first.new_full((len(layers), *first.shape), float("nan"))
            for row, layer in enumerate(layers):
                if layer in per_layer:
                    stacked[row] = per_layer[layer]
            values[name] = stacked
        return Recording(condition, values, logits, segments)

    # ---- running ---------------------------------------------------------------------
    def run(self, encoded: EncodedPrompts, condition: str, *, interventions: HookList = ()) -> Recording:
        """One batched forward pass of `condition`; `interventions` (e.g. GD deltas) change
        activations before any probe reads them (see `attach`)."""
        try:
            with torch.no_grad(), self.attach(encoded, condition, interventions=interventions):
                logits = self.model(encoded.input_ids, attention_mask=encoded.attention_mask)
        finally:
            release_transient_state(self.model)
        return self.recording(condition, _read_logits(logits, encoded.read_pos), encoded.segments)

    def run_batched(
        self,
        encoded: EncodedPrompts,
        condition: str,
        *,
        batch_size: int = 64,
        deltas=None,
        row_episode: torch.Tensor | None = None,
    ) -> Recording:
        """`run` in chunks of at most `batch_size` rows, joined along the batch dim. With GD
        `deltas` (`iclgd_lens.engine.gd.Deltas`), row b gets the deltas of episode `row_episode[b]`."""
        from iclgd_lens.engine.gd import (
            delta_hooks,
        )  # gd trains through the recorder's model; imported when used

        n = encoded.input_ids.shape[0]
        if deltas is not None and (row_episode is None or len(row_episode) != n):
            raise IclgdError(
                f"run_batched with deltas needs row_episode with one episode index per row ({n} rows)"
            )
        parts = []
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            interventions = delta_hooks(deltas, row_episode[start:stop]) if deltas is not None else ()
            parts.append(self.run(encoded.rows(start, stop), condition, interventions=interventions))
        return Recording.concat(parts)

    def run_shared_prefix(
        self, encoded: EncodedPrompts, condition: str = "icl"
    ) -> tuple[Recording, Recording]:
        """ICL prompts that share their demonstrations: the prefix once, the queries batched.

        Returns (prefix recording, condition "icl_prefix", one row; query recording).
        """
        return self.run_shared_prefixes([encoded], condition)

    def run_shared_prefixes(
        self, groups: Sequence[EncodedPrompts], condition: str = "icl", *, max_rows: int | None = None
    ) -> tuple[Recording, Recording]:
        """Several episodes at once: each group's prompts share their demonstrations.

        One pass runs every group's prefix (right-padded to the longest), then passes of at most
        `max_rows` query rows (all rows when None) on top of their own group's KV cache (a
        `SharedPrefixCache`: each layer writes its rows' keys and values into one buffer that all
        layers reuse, instead of a copy of the whole prefix cache per row; padding slots masked;
        the query rows' position ids are passed, derived from the mask, so that RoPE positions are
        the unpadded ones after their own group's prefix, and checked where RoPE receives them).
        Returns (prefix recording, one row per group; query recording, the groups' rows in order).
        """
        splits = [split_shared_prefix(enc) for enc in groups]
        prefix = _stack_right_padded([p for p, _, _ in splits])
        suffix = _stack_right_padded([s for _, s, _ in splits])
        prefix_len = prefix.input_ids.shape[1]
        row_group = torch.cat(
            [torch.full((len(s.input_ids),), g, dtype=torch.long) for g, (_, s, _) in enumerate(splits)]
        ).to(prefix.input_ids.device)
        n_rows = len(row_group)
        step = n_rows if max_rows is None else max(1, max_rows)
        segments = torch.cat([prefix.segments[row_group], suffix.segments], dim=1)
        mask = torch.cat([prefix.attention_mask[row_group], suffix.attention_mask], dim=1)
        total_len = prefix_len + suffix.input_ids.shape[1]
        parts = []
        try:
            with torch.no_grad():
                with self.attach(prefix, "icl_prefix"):
                    _, cache = self.model(  # use_cache: a config saved with use_cache=False returns none
                        prefix.input_ids,
                        attention_mask=prefix.attention_mask,
                        return_type="logits_and_cache",
                        use_cache=True,
                    )
                prefix_rec = self.recording("icl_prefix", segments=prefix.segments)
                check_cache_length(
                    cache, self.model.cfg.n_layers, prefix_len, "after the demonstrations' pass"
                )
                scratch = Scratch()  # the query rows' keys and values, one layer at a time
                for start in range(0, n_rows, step):
                    stop = min(start + step, n_rows)
                    rows = SharedPrefixCache(cache, row_group[start:stop], scratch)
                    parts.append(
                        self._queries_on_prefix(
                            suffix.rows(start, stop),
                            rows,
                            condition,
                            prefix_len,
                            total_len,
                            segments[start:stop],
                            mask[start:stop],
                        )
                    )
                    del rows
        finally:
            release_transient_state(self.model)
        queries = Recording.concat(parts)
        queries.segments = segments
        return prefix_rec, queries

    def _queries_on_prefix(
        self, suffix, cache: SharedPrefixCache, condition, prefix_len: int, total_len: int, segments, mask
    ) -> Recording:
        """One pass of query rows on top of their group's prefix cache, with the run-time guards."""
        guard, seen = key_length_guard(self.layers, total_len)
        guard += scratch_guard(cache.scratch, self.model.cfg.n_layers)
        positions = unpadded_positions(mask)[:, prefix_len:]  # [rows, suffix_len]
        with (
            self.attach(
                suffix,
                condition,
                interventions=guard,
                prefix_len=prefix_len,
                segments=segments,
                attention_mask=mask,
            ),
            rope_position_guard(self.model, positions),
        ):
            logits = self.model(
                suffix.input_ids, attention_mask=mask, past_key_values=cache, position_ids=positions
            )
        if sorted(seen) != sorted(self.layers):
            missing = sorted(set(self.layers) - set(seen))
            raise IclgdError(
                f"{PREFIX_CACHE_BROKEN}: attention of layer(s) {missing} never showed its keys, "
                "so the cached prefix cannot be verified"
            )
        check_cache_length(cache, self.model.cfg.n_layers, total_len, "after the queries' pass")
        return self.recording(condition, _read_logits(logits, suffix.read_pos), segments)


PREFIX_CACHE_BROKEN = (
    "the shared-prefix fast path is broken on this install (the KV cache of the demonstrations is not used; "
    "supported: see docs/versions.md, or pass share_prefix=False)"
)


def unpadded_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a [rows, keys] attention mask: each real token's index among its row's real
    tokens (a padded prefix slot does not count), 1 at padding (never attended). -> [rows, keys]"""
    positions = mask.long().cumsum(-1) - 1
    return positions.masked_fill_(mask == 0, 1)


@contextmanager
def rope_position_guard(model, expected: torch.Tensor):
    """Guard of the shared-prefix fast path: every rotary embedding of the wrapped HF model must
    receive the query rows' unpadded positions passed to it (`expected`, [rows, suffix_len]), not
    positions counted from the padded prefix; checked once per pass when the pass returns. A model
    without a rotary module has nothing to check."""
    seen: list[torch.Tensor | None] = []

    def record(module, args, kwargs) -> None:
        seen.append(kwargs.get("position_ids", args[1] if len(args) > 1 else None))

    hf = getattr(model, "original_model", model)
    rotary = [m for m in hf.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in rotary]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
    if rotary and not seen:
        raise IclgdError(
            f"{PREFIX_CACHE_BROKEN}: the rotary embedding never received position ids, so the query "
            "rows' positions cannot be verified"
        )
    for positions in seen:
        if not (
            isinstance(positions, torch.Tensor)
            and positions.shape == expected.shape
            and torch.equal(positions.to(expected.device), expected)
        ):
            raise IclgdError(
                f"{PREFIX_CACHE_BROKEN}: RoPE received other positions than the query rows' own after "
                "their group's unpadded prefix"
            )


def check_cache_length(cache, n_layers: int, expected: int, when: str) -> None:
    """Guard of the shared-prefix fast path: the KV cache must hold exactly `expected` positions
    in every layer, or the ICL numbers would silently come from prompts without demonstrations."""
    if cache is None or not hasattr(cache, "get_seq_length"):
        raise IclgdError(f"{PREFIX_CACHE_BROKEN}: the model returned no KV cache {when}")
    lengths = {cache.get_seq_length(layer) for layer in range(n_layers)}
    if lengths != {expected}:
        raise IclgdError(
            f"{PREFIX_CACHE_BROKEN}: the cache holds {sorted(lengths)} positions {when}, expected {expected}"
        )


def key_length_guard(layers: Sequence[int], expected: int) -> tuple[HookList, list[int]]:
    """Hooks that check, in every layer, that attention sees `expected` keys (cached prefix +
    this pass), and the list of layers they have seen. Costs one shape comparison per layer."""
    seen: list[int] = []

    def make(layer: int) -> Callable:
        def check(scores: torch.Tensor, hook) -> None:  # [batch, heads, q_pos, key_pos]
            if scores.shape[-1] != expected:
                raise IclgdError(
                    f"{PREFIX_CACHE_BROKEN}: attention of layer {layer} sees {scores.shape[-1]} keys, "
                    f"expected {expected}"
                )
            seen.append(layer)

        return check

    return [(f"blocks.{layer}.attn.hook_attn_scores", make(layer)) for layer in layers], seen


def scratch_guard(scratch: Scratch, n_layers: int) -> HookList:
    """Hooks that check, in every layer, that the shared buffer of the query rows' keys and
    values still holds this layer's when its attention pattern multiplies the values (it would
    not if this install's attention updated the cache of a later layer first)."""

    def make(layer: int) -> Callable:
        def check(pattern: torch.Tensor, hook) -> None:
            if scratch.claimed_by != layer:
                raise IclgdError(
                    f"{PREFIX_CACHE_BROKEN}: layer {layer} attends while the shared key buffer holds "
                    f"layer {scratch.claimed_by}'s keys"
                )

        return check

    return [(f"blocks.{layer}.attn.hook_pattern", make(layer)) for layer in range(n_layers)]


def _remedy(p: Probe) -> str:
    """How to get rid of a failing user probe, which every later default compare() records."""
    if p.built_in:
        return ""
    source = getattr(getattr(p.fn, "__code__", None), "co_filename", "")
    where = f" in {Path(source).name}" if source and not source.startswith("<") else ""
    return (
        f"; fix it{where}, or remove it with iclgd_lens.hooks.unregister({p.name!r}) "
        "(on the command line: leave out its --hooks file)"
    )


def _check_probe_output(p: Probe, out, ctx: ReadContext, layer: int) -> None:
    """A probe returns {name: tensor with a leading batch dimension}; say what is wrong otherwise."""
    where = f"(layer {layer}, condition {ctx.condition}){_remedy(p)}"
    if not isinstance(out, dict):
        raise IclgdError(
            f"probe {p.name!r} returned a {type(out).__name__}; expected a dict of name -> tensor {where}"
        )
    batch = ctx.read_pos.shape[0]
    for name, value in out.items():
        if not isinstance(value, torch.Tensor):
            raise IclgdError(
                f"probe {p.name!r} returned {type(value).__name__} for {name!r}; "
                f"expected a tensor [batch={batch}, ...] {where}"
            )
        if value.ndim == 0 or value.shape[0] != batch:
            raise IclgdError(
                f"probe {p.name!r} returned {name!r} of shape {tuple(value.shape)}; "
                f"expected [batch={batch}, ...] {where}"
            )
        if p.compare and value.ndim == 1:
            raise IclgdError(
                f"probe {p.name!r} returned {name!r} of shape {tuple(value.shape)}, one number per row; "
                "a compared probe returns vectors, [batch, d] or [batch, heads, d], whose updates are "
                "compared as cosines: return a vector per row, or declare the probe with compare=False to "
                f"record it for your own code with a Recorder (compare() then keeps none of it) {where}"
            )


def _cat_padded(values: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat along the batch dim (1) of [n_layers, batch, ...] tensors, NaN-padding the trailing
    dims of floating tensors to the largest size (other dtypes must match)."""
    sizes = [max(v.shape[d] for v in values) for d in range(2, values[0].ndim)]
    if all(list(v.shape[2:]) == sizes for v in values) or not values[0].is_floating_point():
        return torch.cat(values, dim=1)
    padded = []
    for v in values:
        pad = [p for d in reversed(range(2, v.ndim)) for p in (0, sizes[d - 2] - v.shape[d])]
        padded.append(torch.nn.functional.pad(v, pad, value=float("nan")))
    return torch.cat(padded, dim=1)


def _read_logits(logits: torch.Tensor, read_pos: torch.Tensor) -> torch.Tensor:
    """Logits at each row's read position: [batch, d_vocab] (never position -1 of padding)."""
    return logits[torch.arange(logits.shape[0], device=logits.device), read_pos].detach()


def _stack_right_padded(parts: Sequence[EncodedPrompts]) -> EncodedPrompts:
    """Concatenate prompt batches along the batch dim, right-padding to the longest (masked)."""
    width = max(p.input_ids.shape[1] for p in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))
    return EncodedPrompts(
        torch.cat([pad(p.input_ids) for p in parts]),
        torch.cat([pad(p.attention_mask) for p in parts]),
        torch.cat([pad(p.segments) for p in parts]),
        torch.cat([p.read_pos for p in parts]),
        [t for p in parts for t in p.texts],
    )


def split_shared_prefix(encoded: EncodedPrompts) -> tuple[EncodedPrompts, EncodedPrompts, int]:
    """Split prompts into their common token prefix (one row) and the per-row rest.

    The prefix stops before the first query token of any row, so every row's query (and its
    read position) lies in the suffix. Returns (prefix, suffix, prefix_len).
    """
    ids, seg = encoded.input_ids, encoded.segments
    same = (ids == ids[:1]).all(0) & (seg == seg[:1]).all(0) & (seg >= 0).all(0)  # [pos]
    prefix_len = int(same.long().cumprod(0).sum())
    first_query = int((seg < 0).float().argmax(-1).min())
    prefix_len = min(prefix_len, first_query)
    if prefix_len < 1:
        raise ValueError("prompts share no prefix")
    prefix = EncodedPrompts(
        ids[:1, :prefix_len],
        encoded.attention_mask[:1, :prefix_len],
        seg[:1, :prefix_len],
        torch.tensor([prefix_len - 1], device=ids.device),
    )
    suffix = EncodedPrompts(
        ids[:, prefix_len:],
        encoded.attention_mask[:, prefix_len:],
        seg[:, prefix_len:],
        encoded.read_pos - prefix_len,
        encoded.texts,
    )
    return prefix, suffix, prefix_len
