"""Tasks: demonstrations, queries, a prompt template, label words, and the read position.

A `Task` knows how to turn examples into text. An `Episode` is one demonstration set with
the queries asked under it (and the label words in force for it: the synthetic tasks of the
embedded models draw a fresh mapping per episode). `encode_prompts` turns prompts into token
ids and marks, for every token, which demonstration it belongs to, so that hooks can slice
the read position, the demonstration tokens and the query's own tokens without guessing.

Prompt layout (Dai et al. 2023):

    ICL:  <bos> demo_1 SEP demo_2 SEP ... demo_k SEP query
    ZSL:  <bos> query
    demo_i = template.format(text=x_i) + " " + label_word(y_i)
    query  = template.format(text=x)            (the label word is what is predicted)

The read position is the last token of the query: the token whose next-token distribution
predicts the label (docs/science.md, pitfall 1). `Task.read_offset` moves it (e.g. -1 = one token
earlier) for users who want another position.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from iclgd_lens.errors import IclgdError

QUERY_SEGMENT = -1
"""Segment id of the query's own tokens (the template filled with the query text)."""
OTHER_SEGMENT = 0
"""Segment id of BOS, separators and padding."""


def added_context_mask(segments: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The tokens an ICL prompt adds to its zero-shot prompt: X' of Dai's dual form.

    The ICL prompt is the zero-shot prompt (BOS, the query) with the demonstrations and the
    separator after each inserted before the query, so X' runs from the first demonstration
    token up to the last token before the query: every demonstration and separator token, no
    BOS, no query token, no padding. Only with all of them does sum_{X'} v k^T make the
    linear-attention identity F_ICL(q) = (W_ZSL + dW_ICL) q exact (docs/metrics.md). Kendall
    and the attention-mass metrics use the demonstration tokens alone (`segments > 0`).
    segments, attention_mask [batch, pos] -> bool [batch, pos].
    """
    n = segments.shape[-1]
    positions = torch.arange(n, device=segments.device)
    demo, query = segments > 0, segments == QUERY_SEGMENT
    first_demo = torch.where(demo.any(-1), demo.float().argmax(-1), n)  # [batch]
    first_query = torch.where(query.any(-1), query.float().argmax(-1), n)
    inside = (positions >= first_demo[..., None]) & (positions < first_query[..., None])
    return inside & attention_mask.bool()


@dataclass(frozen=True)
class Example:
    """One labelled input: `text` fills the template, `label` indexes the label words."""

    text: str
    label: int


@dataclass(frozen=True)
class Episode:
    """One demonstration set, the queries asked under it, and the label words in force."""

    demos: tuple[Example, ...]
    queries: tuple[Example, ...]
    label_words: tuple[str, ...]


@dataclass
class Task:
    """A classification task in the prompt format of the papers.

    `train` holds the pool demonstrations are drawn from, `test` the queries. Subclasses
    (the synthetic mapping tasks of the embedded models) override `episodes` to draw a fresh
    label mapping per episode.
    """

    name: str
    template: str
    label_words: tuple[str, ...]
    train: tuple[Example, ...] = ()
    test: tuple[Example, ...] = ()
    separator: str = "\n"
    read_offset: int = 0
    description: str = ""
    gd_lr: float | None = None  # the task's learning rate for GD presets (Dai tuned one per task)

    # ---- text -------------------------------------------------------------------------
    def render_query(self, example: Example) -> str:
        """The template filled with the example's text, without its label."""
        return self.template.format(text=example.text)

    def render_demo(self, example: Example, label_words: Sequence[str]) -> str:
        """A demonstration: the filled template followed by its label word."""
        return f"{self.render_query(example)} {label_words[example.label]}"

    def icl_prompt(self, demos: Sequence[Example], query: Example, label_words: Sequence[str]) -> str:
        """Demonstrations then the query, joined by the separator."""
        parts = [self.render_demo(d, label_words) for d in demos] + [self.render_query(query)]
        return self.separator.join(parts)

    def zsl_prompt(self, query: Example) -> str:
        """The query alone."""
        return self.render_query(query)

    # ---- sampling ---------------------------------------------------------------------
    def episodes(self, k: int, n_episodes: int, n_queries: int, seed: int = 0) -> list[Episode]:
        """Draw `n_episodes` demonstration sets of `k` examples from `train` and `n_queries`
        queries from `test` (the same queries for every episode, as in Dai et al.)."""
        if k < 0:
            raise IclgdError(f"k must be >= 0, got {k}")
        if k > len(self.train):
            raise IclgdError(f"task {self.name!r} has {len(self.train)} training examples, cannot draw k={k}")
        if not self.test:
            raise IclgdError(f"task {self.name!r} has no test examples to use as queries")
        rng = random.Random(seed)
        queries = tuple(rng.sample(list(self.test), min(n_queries, len(self.test))))
        return [
            Episode(tuple(rng.sample(list(self.train), k)), queries, tuple(self.label_words))
            for _ in range(n_episodes)
        ]


@dataclass
class EncodedPrompts:
    """A right-padded batch of prompts with the bookkeeping hooks need.

    `segments[b, p]` is i+1 for tokens of demonstration i, QUERY_SEGMENT for the query's own
    tokens, OTHER_SEGMENT for BOS, separators and padding. `read_pos[b]` is the position
    whose hidden state predicts the label (never a padding position).
    """

    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    segments: torch.Tensor  # [batch, pos]
    read_pos: torch.Tensor  # [batch]
    texts: list[str] = field(default_factory=list)

    @property
    def lengths(self) -> torch.Tensor:
        """Number of real (non-padding) tokens per prompt: [batch]."""
        return self.attention_mask.sum(-1)

    def rows(self, start: int, stop: int) -> "EncodedPrompts":
        """Prompts start..stop-1 (trailing all-padding columns kept: harmless, masked)."""
        return EncodedPrompts(
            self.input_ids[start:stop],
            self.attention_mask[start:stop],
            self.segments[start:stop],
            self.read_pos[start:stop],
            self.texts[start:stop],
        )

    def to(self, device: torch.device | str) -> "EncodedPrompts":
        return EncodedPrompts(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.segments.to(device),
            self.read_pos.to(device),
            self.texts,
        )


def _char_spans(
    task: Task, demos: Sequence[Example], query: Example, label_words: Sequence[str]
) -> list[tuple[int, int, int]]:
    """Character spans (start, end, segment) of each demonstration and of the query."""
    spans, cursor = [], 0
    for i, demo in enumerate(demos):
        text = task.render_demo(demo, label_words)
        spans.append((cursor, cursor + len(text), i + 1))
        cursor += len(text) + len(task.separator)
    query_text = task.render_query(query)
    spans.append((cursor, cursor + len(query_text), QUERY_SEGMENT))
    return spans


def _token_segments(offsets: Sequence[tuple[int, int]], spans: list[tuple[int, int, int]]) -> np.ndarray:
    """Segment of each token: that of the first span its characters overlap (spans are sorted and
    disjoint, so it is the first span ending after the token starts), OTHER_SEGMENT for tokens
    without characters (BOS) or outside every span (separators). offsets [pos, 2] -> [pos]."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offsets[:, 0], offsets[:, 1]
    span_start, span_end, span_id = (np.asarray(c, dtype=np.int64) for c in zip(*spans))
    first = np.searchsorted(span_end, starts, side="right")  # first span with end > token start
    inside = first < len(spans)
    first = np.minimum(first, len(spans) - 1)
    overlaps = inside & (ends > starts) & (span_start[first] < ends)
    return np.where(overlaps, span_id[first], OTHER_SEGMENT)


def _query_ids_alone(tokenizer, task: Task, queries: Sequence[Example]) -> list[list[int]]:
    """The tokens each query has in its ZSL prompt: its own, without BOS or other specials."""
    texts = [task.zsl_prompt(q) for q in queries]
    if not texts:
        return []
    encs = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True, verbose=False)
    out = []
    for text, ids, offsets in zip(texts, encs["input_ids"], encs["offset_mapping"]):
        seg = _token_segments(offsets, [(0, len(text), QUERY_SEGMENT)])
        out.append([int(t) for t, s in zip(ids, seg) if s == QUERY_SEGMENT])
    return out


def _query_as_alone(
    tokenizer, text: str, ids: Sequence[int], offsets, seg: np.ndarray, query_start: int, alone: list[int]
) -> tuple[list[int], np.ndarray]:
    """An ICL prompt's tokens with its query tokenised as in the ZSL prompt.

    A tokenizer can split the same query differently after the demonstrations than alone:
    SentencePiece (LLaMA-1/2) marks the first word of a text with "▁" ("▁Review" alone, "Review"
    after a newline), and a BPE that joins a space to the next word ("Ġw30") does so only when
    the separator is a space. ZSL, GD and ICL must read the same query tokens, or the
    position-by-position comparisons (SimAM over the query's keys, the read position's states)
    compare different tokens. Where the text's own tokens of the query differ from its tokens
    alone, they are replaced by those; a token that spans the separator and the query gives its
    separator characters back as tokens of their own (OTHER_SEGMENT). Trailing specials (an EOS
    some tokenizers append) stay where they are.
    """
    positions = np.flatnonzero(seg == QUERY_SEGMENT)
    if not len(positions) or [int(ids[p]) for p in positions] == alone:
        return list(ids), seg
    first, last = int(positions[0]), int(positions[-1])
    gap = text[offsets[first][0] : query_start] if offsets[first][0] < query_start else ""
    gap_ids = tokenizer(gap, add_special_tokens=False)["input_ids"] if gap else []
    new_ids = [*ids[:first], *gap_ids, *alone, *ids[last + 1 :]]
    new_seg = np.concatenate(
        [
            seg[:first],
            np.full(len(gap_ids), OTHER_SEGMENT, dtype=seg.dtype),
            np.full(len(alone), QUERY_SEGMENT, dtype=seg.dtype),
            seg[last + 1 :],
        ]
    )
    return new_ids, new_seg


def encode_prompts(
    tokenizer,
    task: Task,
    demo_sets: Sequence[Sequence[Example]],
    queries: Sequence[Example],
    label_words: Sequence[Sequence[str]],
    max_length: int | None = None,
) -> EncodedPrompts:
    """Tokenise one prompt per (demo set, query) pair, right-padded, with segments.

    An empty demo set gives the ZSL prompt. Token-to-segment assignment uses the fast
    tokenizer's offset mapping, so it holds for SentencePiece and word-level tokenizers alike.
    An ICL prompt's query has the tokens it has alone (`_query_as_alone`), so that every
    condition reads the same query tokens.
    Raises IclgdError if a prompt is longer than `max_length` (the caller truncates
    demonstrations on purpose, the same way for ICL and GD: docs/science.md, pitfall 4).
    """
    if not (len(demo_sets) == len(queries) == len(label_words)):
        raise ValueError("demo_sets, queries and label_words must have one entry per prompt")
    texts = [
        task.icl_prompt(demos, query, words) if demos else task.zsl_prompt(query)
        for demos, query, words in zip(demo_sets, queries, label_words)
    ]
    # one batched call; verbose=False: a prompt longer than the tokenizer's model_max_length is
    # ours to report (below, as one line), not transformers' "Token indices sequence length" warning
    encs = tokenizer(texts, return_offsets_mapping=True, add_special_tokens=True, verbose=False)
    with_demos = [b for b, demos in enumerate(demo_sets) if demos]
    alone = dict(zip(with_demos, _query_ids_alone(tokenizer, task, [queries[b] for b in with_demos])))
    rows = []
    for b, (text, ids, offsets, demos, query, words) in enumerate(
        zip(texts, encs["input_ids"], encs["offset_mapping"], demo_sets, queries, label_words)
    ):
        spans = _char_spans(task, demos, query, words)
        seg = _token_segments(offsets, spans)
        if demos:
            ids, seg = _query_as_alone(tokenizer, text, ids, offsets, seg, spans[-1][0], alone[b])
        query_positions = np.flatnonzero(seg == QUERY_SEGMENT)
        if max_length is not None and len(ids) > max_length:
            if not demos or len(query_positions) >= max_length:
                n_query = len(ids) if not demos else len(query_positions)
                shown = query.text if len(query.text) <= 40 else query.text[:40] + "..."
                raise IclgdError(
                    f"the query {shown!r} of task {task.name!r} is {n_query} tokens by itself, longer than "
                    f"the context window of {max_length} even without demonstrations; shorten that text"
                )
            raise IclgdError(
                f"prompt of {len(ids)} tokens exceeds the context window of {max_length}; "
                "use fewer demonstrations (smaller k)"
            )
        if not len(query_positions):
            raise IclgdError(f"the query of task {task.name!r} produced no tokens: {text!r}")
        read = int(query_positions[-1]) + task.read_offset
        if not 0 <= read < len(ids):
            raise IclgdError(f"read_offset {task.read_offset} moves the read position outside the prompt")
        rows.append((ids, seg, read))
    width = max(len(r[0]) for r in rows)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = len(rows)
    input_ids = np.full((batch, width), pad_id, dtype=np.int64)
    attention_mask = np.zeros((batch, width), dtype=np.int64)
    segments = np.full((batch, width), OTHER_SEGMENT, dtype=np.int64)
    read_pos = np.zeros(batch, dtype=np.int64)
    for b, (ids, seg, read) in enumerate(rows):
        input_ids[b, : len(ids)] = ids
        attention_mask[b, : len(ids)] = 1
        segments[b, : len(ids)] = seg
        read_pos[b] = read
    input_ids, attention_mask, segments, read_pos = (
        torch.from_numpy(a) for a in (input_ids, attention_mask, segments, read_pos)
    )
    return EncodedPrompts(input_ids, attention_mask, segments, read_pos, texts)


def resolve_task(task: "Task | str | Path | None", seed: int = 0) -> "Task":
    """A Task as given, a task name or data file (`formats.load_task`), or for None the
    embedded models' default task (`mapping.default_task`): what compare() and the studies accept."""
    if task is None:
        from iclgd_lens.tasks.mapping import default_task

        return default_task(seed=seed)
    if isinstance(task, (str, Path)):
        from iclgd_lens.tasks.formats import load_task

        return load_task(str(task), seed=seed)
    if not isinstance(task, Task):
        raise IclgdError(f"task must be a Task, a task name or a data file, got {type(task).__name__}")
    return task


def permuted_demos(demos: Sequence[Example], seed: int) -> tuple[Example, ...]:
    """The demonstrations in another order, from their own `random.Random(seed)` (never the
    prompt's own order when k > 1): the "ICL under another order" baseline and ceiling."""
    rng = random.Random(seed)
    order = list(range(len(demos)))
    while len(demos) > 1 and order == list(range(len(demos))):
        rng.shuffle(order)
    return tuple(demos[i] for i in order)


def readable_tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token id as the text it stands for, for people to read: byte-level pieces decoded
    (`Ġcat` -> ` cat`), special tokens by name (`<s>`), whitespace-only tokens made visible
    (` ` -> `·`, newline -> `⏎`). Not escaped: pages escape it where it enters them."""
    out = []
    for i in ids:
        text = tokenizer.decode([int(i)])
        out.append(
            text if text.strip() else text.replace(" ", "·").replace("\n", "⏎").replace("\t", "⇥") or "∅"
        )
    return out


_WARNED_SPLIT: set[tuple[str, ...]] = set()  # warn once per set of split label words


def label_token_ids(tokenizer, label_words: Sequence[str]) -> list[int]:
    """The token id that starts each label word when it follows the prompt (" " + word).

    Label words that tokenize into several tokens are scored by their first token (Dai et al.
    average the log-probabilities of all of them: docs/metrics.md, Accuracy), with a warning
    that says so; two label words sharing a first token cannot be told apart and raise.
    """
    ids, split = [], []
    for word in label_words:
        with_space = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        bare = tokenizer(word, add_special_tokens=False)["input_ids"]
        toks = with_space or bare
        if not toks or (len(toks) == 1 and toks[0] == tokenizer.unk_token_id):
            raise IclgdError(f"label word {word!r} is not in the tokenizer's vocabulary")
        ids.append(toks[0])
        if len(toks) > 1:
            split.append(word)
    if split and tuple(split) not in _WARNED_SPLIT:
        _WARNED_SPLIT.add(tuple(split))
        warnings.warn(
            f"label word(s) {split} are several tokens; they are scored by their first token only",
            stacklevel=2,
        )
    if len(set(ids)) != len(ids):
        raise IclgdError(
            f"label words {list(label_words)} share a first token; "
            "choose words that differ in their first token"
        )
    return ids
