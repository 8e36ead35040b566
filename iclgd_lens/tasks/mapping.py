"""The synthetic world of the embedded tiny models, its training documents, and `MappingTask`.

The world: items belong to latent categories (`cow` is an animal), and there are label words
(`alpha` ... `pi`) that mean nothing by themselves. Two kinds of lines make up the corpus:

    mapping line:  "cow = kappa"     (template "{text} =" + " " + label word)
    fact line:     "cow is animal"   (a global fact, the same in every document)

A mapping document draws a few categories and maps each to a random label word; that mapping
holds for the whole document and changes from document to document. Its lines are mostly
mapping lines of items of those categories (bursty, document-specific: Chan et al. 2022) with
some fact lines mixed in (the in-weight knowledge of which item is in which category). Lines
are joined by "\\n", the separator of `MappingTask`, so that a k-shot prompt rendered by
`MappingTask` looks exactly like the start of a training document.

`MappingTask` is the evaluation task: a 2-way episode draws two categories, maps them to two
label words drawn from the 16, shows items of those categories with their labels as
demonstrations and asks about other (held-out) items of the same categories.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from iclgd_lens.errors import IclgdError
from iclgd_lens.tasks import Episode, Example, Task

TEMPLATE = "{text} ="
"""Prompt template of mapping lines and of `MappingTask`: an item followed by "="."""
SEPARATOR = "\n"
"""Line separator of the corpus and of `MappingTask` (a token of its own)."""
FACT_WORD = "is"
"""The word of fact lines: "<item> is <category>"."""

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("cow", "dog", "horse", "sheep", "goat", "pig"),
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "cherry"),
    "tool": ("hammer", "saw", "drill", "wrench", "chisel", "pliers"),
    "vehicle": ("car", "bus", "truck", "bike", "train", "boat"),
    "instrument": ("piano", "violin", "flute", "drum", "harp", "guitar"),
    "furniture": ("chair", "table", "desk", "sofa", "bed", "shelf"),
}
"""Six latent categories of six items each (12 items per category did not show ICL in time)."""

LABEL_WORDS: tuple[str, ...] = (
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
)
"""Sixteen label words with no meaning of their own: any document may map any category to any."""


@dataclass(frozen=True)
class World:
    """Categories with their items, and the label words documents map them to."""

    categories: dict[str, tuple[str, ...]] = field(default_factory=lambda: dict(CATEGORIES))
    label_words: tuple[str, ...] = LABEL_WORDS

    @property
    def items(self) -> list[str]:
        """Every item, category by category."""
        return [item for items in self.categories.values() for item in items]

    def words(self) -> list[str]:
        """Every ordinary word of the language (the tokenizer's vocabulary, minus specials)."""
        return ["=", FACT_WORD, *self.items, *self.categories, *self.label_words]


def mapping_line(item: str, label_word: str) -> str:
    """A mapping line, exactly as `MappingTask` renders a demonstration."""
    return f"{TEMPLATE.format(text=item)} {label_word}"


def fact_line(item: str, category: str) -> str:
    """A global fact line: "<item> is <category>"."""
    return f"{item} {FACT_WORD} {category}"


@dataclass
class DocumentConfig:
    """How documents are drawn. `n_lines` lines of 4 tokens each fill a training sequence."""

    n_lines: int = 32  # 4 tokens per line (3 words + "\n"): 32 lines ~ 128 tokens
    n_categories: tuple[int, ...] = (2, 2, 3)  # drawn uniformly: mostly 2-way documents
    p_mapping: float = 0.85  # share of mapping lines; the rest are fact lines
    p_fact_document: float = 0.05  # documents made of fact lines only


def mapping_document(
    world: World, rng: random.Random, config: DocumentConfig
) -> tuple[list[str], list[bool]]:
    """One document: its lines and, per line, whether it is a mapping line.

    The document draws its categories and a fresh category -> label word mapping; mapping
    lines use items of those categories, fact lines any item of the world.
    """
    names = list(world.categories)
    if rng.random() < config.p_fact_document:
        lines = []
        for _ in range(config.n_lines):
            category = rng.choice(names)
            lines.append(fact_line(rng.choice(world.categories[category]), category))
        return lines, [False] * len(lines)
    chosen = rng.sample(names, rng.choice(config.n_categories))
    labels = dict(zip(chosen, rng.sample(list(world.label_words), len(chosen))))
    lines, is_mapping = [], []
    for _ in range(config.n_lines):
        if rng.random() < config.p_mapping:
            category = rng.choice(chosen)
            lines.append(mapping_line(rng.choice(world.categories[category]), labels[category]))
            is_mapping.append(True)
        else:
            category = rng.choice(names)
            lines.append(fact_line(rng.choice(world.categories[category]), category))
            is_mapping.append(False)
    return lines, is_mapping


def document_text(lines: list[str]) -> str:
    """The lines of a document joined by the separator (BOS is added by the tokenizer)."""
    return SEPARATOR.join(lines)


class MappingTask(Task):
    """k-shot classification with a fresh n-way category -> label word mapping per episode.

    Each episode draws `n_ways` categories and `n_ways` label words, holds out some items of
    those categories as queries and draws the `k` demonstrations (with replacement, like the
    corpus) from the other items. `Example.label` indexes the episode's `label_words`, so the
    same item has different labels in different episodes. `label_words` of the task lists all
    words an episode may draw; the words in force are `Episode.label_words`.
    """

    def __init__(
        self, world: World | None = None, n_ways: int = 2, seed: int = 0, name: str = "tiny-mapping"
    ):
        world = world or World()
        if not 2 <= n_ways <= min(len(world.categories), len(world.label_words)):
            raise IclgdError(f"n_ways must be between 2 and {len(world.categories)}, got {n_ways}")
        if min(len(items) for items in world.categories.values()) < 2:
            raise IclgdError("every category needs at least 2 items (one demonstration, one query)")
        examples = tuple(
            Example(item, i) for i, items in enumerate(world.categories.values()) for item in items
        )
        super().__init__(
            name=name,
            template=TEMPLATE,
            label_words=tuple(world.label_words),
            train=examples,
            test=examples,
            separator=SEPARATOR,
            description=f"{n_ways}-way mapping of item categories to label words, drawn afresh per episode",
            gd_lr=3e-2,  # K/V SGD on tiny-llama-icl: 1e-3 leaves the outputs unchanged, >= 0.1 overshoots
        )
        self.world = world
        self.n_ways = n_ways
        self.seed = seed

    def episodes(self, k: int, n_episodes: int, n_queries: int, seed: int = 0) -> list[Episode]:
        """Draw `n_episodes` episodes of `k` demonstrations and up to `n_queries` queries.

        Per category, ceil(n_queries / n_ways) items (at most half of them) are held out as
        queries; demonstrations are other items of the same categories. Queries alternate
        between categories so that labels are balanced.
        """
        if k < 0:
            raise IclgdError(f"k must be >= 0, got {k}")
        if n_episodes < 1 or n_queries < 1:
            raise IclgdError(f"n_episodes and n_queries must be >= 1, got {n_episodes} and {n_queries}")
        rng = random.Random(f"{self.seed}-{seed}-{k}")
        names = list(self.world.categories)
        episodes = []
        for _ in range(n_episodes):
            chosen = rng.sample(names, self.n_ways)
            words = tuple(rng.sample(list(self.world.label_words), self.n_ways))
            held_out, pool = [], []
            for label, category in enumerate(chosen):
                items = list(self.world.categories[category])
                rng.shuffle(items)
                n_held = min(math.ceil(n_queries / self.n_ways), len(items) // 2)
                held_out.append([Example(item, label) for item in items[:n_held]])
                pool += [Example(item, label) for item in items[n_held:]]
            interleaved = [ex for group in zip(*held_out) for ex in group]
            queries = tuple(interleaved[:n_queries])
            demos = tuple(rng.choice(pool) for _ in range(k))
            episodes.append(Episode(demos, queries, words))
        return episodes


def default_task(seed: int = 0) -> MappingTask:
    """The default task of every command: 2-way mappings over the world of the tiny models."""
    return MappingTask(World(), n_ways=2, seed=seed)
