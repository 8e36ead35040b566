"""The KV cache of a query pass on top of shared demonstrations: every query row reads its group's
prefix keys and values without a per-row copy of the whole prefix cache being kept.

HF's cache holds one row per prompt, so query rows on a shared prefix normally get the prefix
copied to every row in every layer (`DynamicCache.batch_select_indices`), and `update` then
concatenates each layer's new keys onto that copy: two copies of rows x layers x prefix, alive
together for the whole pass (at LLaMa-7B scale, 64 rows on a 1,300-token prefix: ~23 GB).
`SharedPrefixCache` keeps the prefix once per group and, in each layer's `update`, writes the
rows' keys and values (their group's prefix, then the pass's own tokens) into one scratch buffer
that every layer reuses: one copy per layer, memory for one layer. The attention the bridge
computes is unchanged (same keys, same values, same hooks); `claimed_by` lets the recorder check
at run time that a layer's keys were still its own when its attention read them.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class Scratch:
    """One keys buffer and one values buffer [rows, n_kv_heads, key_pos, d_head], shared by every
    layer of a `SharedPrefixCache` (and by the caches of later chunks of the same rows' width)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.claimed_by: int | None = None  # the layer whose keys the buffer holds now

    def claim(
        self, layer: int, like: torch.Tensor, rows: int, key_pos: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [rows, n_kv_heads, key_pos, d_head] of the buffers, (re)allocated when too small."""
        shape = (rows, like.shape[1], key_pos, like.shape[3])
        fits = (
            self.keys is not None
            and self.keys.shape[0] >= rows
            and self.keys.shape[1:] == shape[1:]
            and self.keys.dtype == like.dtype
            and self.keys.device == like.device
        )
        if not fits:
            self.keys = self.values = None  # free the old buffers before the new ones exist
            self.keys, self.values = (like.new_empty(shape) for _ in range(2))
        self.claimed_by = layer
        return self.keys[:rows], self.values[:rows]


class SharedPrefixLayer(DynamicLayer):
    """One layer: its groups' prefix keys/values [groups, n_kv_heads, prefix, d_head] and, per
    pass, the rows' full keys/values written into the shared scratch buffer."""

    def __init__(self, layer: int, prefix: DynamicLayer, runs: list[tuple[int, int, int]], scratch: Scratch):
        super().__init__()
        self.layer, self.runs, self.scratch = layer, runs, scratch
        self.prefix_keys, self.prefix_values = prefix.keys, prefix.values
        self.dtype, self.device = prefix.keys.dtype, prefix.keys.device
        self.is_initialized = True
        self.length = prefix.keys.shape[-2]  # positions the cache holds: the prefix, then prefix + pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """key_states, value_states [rows, n_kv_heads, pos, d_head] -> the rows' keys and values
        over prefix + pos (views of the scratch buffer, valid until the next layer's update)."""
        prefix_len, rows = self.prefix_keys.shape[-2], key_states.shape[0]
        if rows != self.runs[-1][2]:
            raise ValueError(f"the cache was built for {self.runs[-1][2]} query rows, the pass has {rows}")
        keys, values = self.scratch.claim(self.layer, key_states, rows, prefix_len + key_states.shape[-2])
        for group, start, stop in self.runs:  # each group's prefix broadcast to its rows: one copy
            keys[start:stop, :, :prefix_len].copy_(self.prefix_keys[group : group + 1])
            values[start:stop, :, :prefix_len].copy_(self.prefix_values[group : group + 1])
        keys[:, :, prefix_len:].copy_(key_states)
        values[:, :, prefix_len:].copy_(value_states)
        self.length = prefix_len + key_states.shape[-2]
        return keys, values

    def get_seq_length(self) -> int:
        return self.length


class SharedPrefixCache(Cache):
    """The cache of one query pass: row r reads group `row_group[r]` of `prefix` (the cache the
    prefix pass returned, one row per group, never modified). `row_group` [rows] must be sorted
    (each group's rows together). `scratch`: a `Scratch` to reuse across passes (new if None)."""

    def __init__(self, prefix: Cache, row_group: torch.Tensor, scratch: Scratch | None = None):
        groups, counts = torch.unique_consecutive(row_group.cpu(), return_counts=True)
        if len(set(groups.tolist())) != len(groups):
            raise ValueError("row_group must keep each group's rows together")
        stops = torch.cumsum(counts, 0).tolist()
        runs = [(g, stop - n, stop) for g, n, stop in zip(groups.tolist(), counts.tolist(), stops)]
        self.scratch = scratch if scratch is not None else Scratch()
        super().__init__(
            layers=[SharedPrefixLayer(l, layer, runs, self.scratch) for l, layer in enumerate(prefix.layers)]
        )
