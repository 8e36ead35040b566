"""In-context vs in-weight learning on synthetic data (Chan et al. 2022, 2024): the generator and the gated model.

Library code for the study `iclgd_lens.analyses.icl_vs_iwl` (docs/science.md, section 6).

**Generator.** `n_classes` classes with centres on the unit sphere in `dim` (64) dimensions.
Classes `0 .. n_high-1` form the high-frequency group (total probability `p_high`, uniform inside
the group), the rest the low-frequency group (uniform inside). With `zipf_exponent` set, class
probabilities are instead p(c) ∝ (c+1)^-alpha over all classes, and the `n_high` most frequent
classes are still called "high". An input is x = centre + sigma * noise, noise ~ N(0, I_dim).
A sequence is a context of `context_len` (L) labelled inputs and a query. With probability
`p_relevant` the context holds the query's class: exactly `n_relevant` copies if set, otherwise
one copy at a random place and the other L-1 context classes drawn from the class distribution
(so "at least one"). Otherwise no context item has the query's class. Each label (context and
query) is replaced by a uniform random label with probability `label_noise` (eps), training only.
Labels are class ids (`n_labels == n_classes`); `shifted_label_map` moves every class to the label
of the next class of its own frequency group, so a model that memorised class -> label is wrong
and only reading the context can give the answer.

**Gated model.** f(x) = a(x) g(x) + (1 - a(x)) h(x), all three probability vectors over labels:
g = softmax(MLP(x_q)) the in-weight predictor, h = sum_i softmax_i(-|x_i - x_q|^2 / T) onehot(y_i)
the in-context predictor with a learnable temperature T, and a = sigmoid(MLP(.)) the gate. The
gate reads the query alone (`gate_input="query"`, as in Chan et al. 2024's a(x)) or the query plus
a context summary (`gate_input="query_context"`: [x_q, mean_i x_i, min_i |x_i - x_q|^2]), which
lets it see whether the query's class is in the context. Trained by NLL of f with Adam, seeded,
on a fixed data set of N sequences.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import einops
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from iclgd_lens.errors import IclgdError

GROUPS = ("high", "low")
GATE_INPUTS = ("query", "query_context")


@dataclass(frozen=True)
class ChanSetting:
    """The knobs of the synthetic generator (docs/science.md, section 6)."""

    n_classes: int = 100
    n_high: int = 10  # classes in the high-frequency group
    p_high: float = 0.9  # total probability of the high-frequency group (ignored with zipf_exponent)
    zipf_exponent: float | None = None  # p(c) ∝ (c+1)^-alpha instead of the two-level split
    dim: int = 64
    sigma: float = 0.1  # within-class noise, per coordinate
    context_len: int = 8  # L
    p_relevant: float = 0.9  # probability that the context holds the query's class
    n_relevant: int | None = None  # exact number of copies when relevant (None: at least one)
    label_noise: float = 0.0  # eps: probability a training label is replaced by a random one

    def check(self) -> None:
        """Raise IclgdError (one line) for a setting the generator cannot draw from."""
        if self.n_classes < 2 or not 1 <= self.n_high < self.n_classes:
            raise IclgdError(f"need n_classes >= 2 and 1 <= n_high < n_classes, got {self.n_classes}, {self.n_high}")
        for name in ("p_high", "p_relevant", "label_noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise IclgdError(f"{name} must be in [0, 1], got {value}")
        if self.zipf_exponent is None and not 0.0 < self.p_high < 1.0:
            raise IclgdError(f"p_high must be strictly between 0 and 1, got {self.p_high}")
        if self.zipf_exponent is not None and self.zipf_exponent < 0:
            raise IclgdError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if self.dim < 1 or self.context_len < 1 or self.sigma < 0:
            raise IclgdError(f"need dim >= 1, context_len >= 1, sigma >= 0; got {self.dim}, {self.context_len}, {self.sigma}")
        if self.n_relevant is not None and not 1 <= self.n_relevant <= self.context_len:
            raise IclgdError(f"n_relevant must be in 1..context_len={self.context_len}, got {self.n_relevant}")


@dataclass(frozen=True)
class World:
    """One draw of the class structure: centres, class probabilities, frequency groups."""

    setting: ChanSetting
    centres: Tensor  # [n_classes, dim], unit norm
    class_probs: Tensor  # [n_classes], sums to 1
    is_high: Tensor  # [n_classes] bool


@dataclass(frozen=True)
class Sequences:
    """A batch of sequences: labelled context and a query."""

    context_x: Tensor  # [n, L, dim]
    context_labels: Tensor  # [n, L] long
    query_x: Tensor  # [n, dim]
    query_labels: Tensor  # [n] long
    query_classes: Tensor  # [n] long

    def __len__(self) -> int:
        return self.query_x.shape[0]

    def subset(self, index: Tensor) -> "Sequences":
        """The sequences at `index` (a minibatch)."""
        return Sequences(*(t[index] for t in (self.context_x, self.context_labels, self.query_x, self.query_labels, self.query_classes)))


def class_probabilities(setting: ChanSetting) -> Tensor:
    """p(class) [n_classes]: two-level (p_high over the first n_high classes) or Zipf."""
    if setting.zipf_exponent is not None:
        weights = torch.arange(1, setting.n_classes + 1, dtype=torch.float64) ** -setting.zipf_exponent
        return (weights / weights.sum()).float()
    n_low = setting.n_classes - setting.n_high
    high = torch.full((setting.n_high,), setting.p_high / setting.n_high, dtype=torch.float64)
    low = torch.full((n_low,), (1.0 - setting.p_high) / n_low, dtype=torch.float64)
    return torch.cat([high, low]).float()


def make_world(setting: ChanSetting, seed: int = 0) -> World:
    """Draw class centres uniformly on the unit sphere (from an own generator)."""
    setting.check()
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(setting.n_classes, setting.dim, generator=gen)
    centres = centres / centres.norm(dim=-1, keepdim=True)
    is_high = torch.arange(setting.n_classes) < setting.n_high
    return World(setting, centres, class_probabilities(setting), is_high)


def identity_label_map(world: World) -> Tensor:
    """Label of each class in distribution: its own id. [n_classes] long."""
    return torch.arange(world.setting.n_classes)


def shifted_label_map(world: World) -> Tensor:
    """Every class takes the label of the next class of its own frequency group (cyclic). [n_classes] long."""
    labels = torch.arange(world.setting.n_classes)
    for group in (world.is_high, ~world.is_high):
        members = labels[group]
        labels[members] = torch.roll(members, shifts=-1)
    return labels


def sample_sequences(
    world: World,
    n: int,
    gen: torch.Generator,
    *,
    label_map: Tensor | None = None,  # [n_classes]; default identity
    p_relevant: float | None = None,  # default world.setting.p_relevant
    label_noise: float | None = None,  # default world.setting.label_noise
    query_group: str | None = None,  # "high" / "low": draw the query class within that group only
) -> Sequences:
    """Draw `n` sequences from the generator (see the module docstring)."""
    s = world.setting
    label_map = identity_label_map(world) if label_map is None else label_map
    p_relevant = s.p_relevant if p_relevant is None else p_relevant
    label_noise = s.label_noise if label_noise is None else label_noise
    n_ctx = s.context_len

    query_probs = world.class_probs.clone()
    if query_group is not None:
        if query_group not in GROUPS:
            raise IclgdError(f"query_group must be one of {GROUPS}, got {query_group!r}")
        query_probs[world.is_high if query_group == "low" else ~world.is_high] = 0.0
    query_classes = torch.multinomial(query_probs, n, replacement=True, generator=gen)  # [n]

    relevant = torch.rand(n, generator=gen) < p_relevant  # [n]
    other_probs = einops.repeat(world.class_probs, "c -> n c", n=n).clone()  # [n, C]
    other_probs[torch.arange(n), query_classes] = 0.0
    context_classes = torch.multinomial(other_probs, n_ctx, replacement=True, generator=gen)  # [n, L], never the query's
    if s.n_relevant is None:
        # one forced copy; the other items may be the query's class too, drawn at its frequency
        free = torch.multinomial(world.class_probs, n * n_ctx, replacement=True, generator=gen).view(n, n_ctx)
        context_classes = torch.where(relevant[:, None], free, context_classes)
        n_copies = torch.ones(n, dtype=torch.long)
    else:
        n_copies = torch.full((n,), s.n_relevant, dtype=torch.long)
    slot_rank = torch.rand(n, n_ctx, generator=gen).argsort(dim=1).argsort(dim=1)  # [n, L] random permutation ranks
    copy_slot = relevant[:, None] & (slot_rank < n_copies[:, None])  # [n, L]
    context_classes = torch.where(copy_slot, query_classes[:, None], context_classes)

    context_x = world.centres[context_classes] + s.sigma * torch.randn(n, n_ctx, s.dim, generator=gen)
    query_x = world.centres[query_classes] + s.sigma * torch.randn(n, s.dim, generator=gen)
    context_labels = label_map[context_classes]
    query_labels = label_map[query_classes]
    if label_noise > 0:
        n_labels = s.n_classes
        noisy = torch.rand(n, n_ctx, generator=gen) < label_noise
        context_labels = torch.where(noisy, torch.randint(n_labels, (n, n_ctx), generator=gen), context_labels)
        noisy = torch.rand(n, generator=gen) < label_noise
        query_labels = torch.where(noisy, torch.randint(n_labels, (n,), generator=gen), query_labels)
    return Sequences(context_x, context_labels, query_x, query_labels, query_classes)


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


@dataclass
class GatedOutput:
    """What the gated model computes for a batch."""

    log_probs: Tensor  # [n, n_labels] log f
    gate: Tensor  # [n] a(x), weight of the in-weight predictor
    in_weight_log_probs: Tensor  # [n, n_labels] log g
    in_context_probs: Tensor  # [n, n_labels] h


class GatedModel(nn.Module):
    """f(x) = a(x) g(x) + (1 - a(x)) h(x): in-weight MLP g, soft nearest-neighbour h, learned gate a."""

    def __init__(self, dim: int, n_labels: int, hidden: int = 128, gate_input: str = "query", temperature: float = 1.0):
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise IclgdError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        self.n_labels = n_labels
        self.gate_input = gate_input
        self.in_weight = _mlp(dim, hidden, n_labels)
        self.gate = _mlp(dim if gate_input == "query" else 2 * dim + 1, hidden, 1)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def forward(self, context_x: Tensor, context_labels: Tensor, query_x: Tensor) -> GatedOutput:
        # context_x [n, L, dim], context_labels [n, L], query_x [n, dim]
        sq_dist = ((context_x - query_x[:, None, :]) ** 2).sum(-1)  # [n, L]
        attention = torch.softmax(-sq_dist / self.log_temperature.exp(), dim=1)  # [n, L]
        in_context = torch.zeros(query_x.shape[0], self.n_labels, dtype=query_x.dtype, device=query_x.device)
        in_context = in_context.scatter_add(1, context_labels, attention)  # [n, n_labels]
        in_weight = F.log_softmax(self.in_weight(query_x), dim=-1)  # [n, n_labels]
        if self.gate_input == "query":
            gate_features = query_x
        else:
            gate_features = torch.cat([query_x, context_x.mean(1), sq_dist.min(1, keepdim=True).values], dim=-1)
        gate_logit = self.gate(gate_features).squeeze(-1)  # [n]
        log_f = torch.logaddexp(
            F.logsigmoid(gate_logit)[:, None] + in_weight,
            F.logsigmoid(-gate_logit)[:, None] + in_context.clamp_min(1e-12).log(),
        )
        return GatedOutput(log_f, torch.sigmoid(gate_logit), in_weight, in_context)


def train_gated_model(
    world: World,
    n_train: int,
    *,
    seed: int = 0,
    steps: int = 600,
    batch_size: int = 128,
    learning_rate: float = 3e-3,
    hidden: int = 128,
    gate_input: str = "query",
    weight_decay: float = 0.0,
) -> GatedModel:
    """Draw a fixed training set of `n_train` sequences and fit the gated model to it for `steps` Adam steps.

    The number of steps is the same for every N, so a small N means many passes over few
    sequences (the regime where memorising is hard and the context helps). Seeded: the data,
    the initialisation and the minibatch order come from `seed`; the global RNG is untouched.
    """
    if n_train < 1 or steps < 1 or batch_size < 1:
        raise IclgdError(f"n_train, steps and batch_size must be >= 1, got {n_train}, {steps}, {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    data = sample_sequences(world, n_train, gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GatedModel(world.setting.dim, world.setting.n_classes, hidden=hidden, gate_input=gate_input)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    for _ in range(steps):
        batch = data.subset(torch.randint(n_train, (min(batch_size, n_train),), generator=gen))
        out = model(batch.context_x, batch.context_labels, batch.query_x)
        loss = F.nll_loss(out.log_probs, batch.query_labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval()


@torch.no_grad()
def evaluate_by_group(model: GatedModel, world: World, evaluation: str, n_eval: int, seed: int = 0) -> list[dict]:
    """Errors of f, g, h and the mean gate, per frequency group, on fresh clean sequences.

    `evaluation`: "in_distribution" (the training generator, no label noise), "shifted_labels"
    (labels shifted within the frequency group, the context always holds the query's class,
    so only reading the context helps), or "context_irrelevant" (original labels, the context
    never holds the query's class, so only in-weight knowledge helps). Returns tidy rows
    {evaluation, group, metric, value}.
    """
    settings = {
        "in_distribution": dict(label_map=identity_label_map(world), p_relevant=None),
        "shifted_labels": dict(label_map=shifted_label_map(world), p_relevant=1.0),
        "context_irrelevant": dict(label_map=identity_label_map(world), p_relevant=0.0),
    }
    if evaluation not in settings:
        raise IclgdError(f"evaluation must be one of {tuple(settings)}, got {evaluation!r}")
    rows = []
    gen = torch.Generator().manual_seed(10_000 + seed)
    for group in GROUPS:
        data = sample_sequences(world, n_eval, gen, label_noise=0.0, query_group=group, **settings[evaluation])
        out = model(data.context_x, data.context_labels, data.query_x)
        values = {
            "error": out.log_probs.argmax(-1) != data.query_labels,
            "error_in_weight": out.in_weight_log_probs.argmax(-1) != data.query_labels,
            "error_in_context": out.in_context_probs.argmax(-1) != data.query_labels,
            "gate": out.gate,
        }
        rows += [dict(evaluation=evaluation, group=group, metric=k, value=float(v.float().mean())) for k, v in values.items()]
    return rows
