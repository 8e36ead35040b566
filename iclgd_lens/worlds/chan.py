"""In-context vs in-weight learning on synthetic data (Chan et al. 2022, 2024): the generator
and the gated model.

Library code for the study `iclgd_lens.analyses.icl_vs_iwl` (docs/science.md, section 6;
docs/studies/icl-vs-iwl.md lists every point where this differs from the published code,
chanb/simple_icl). The defaults follow that code.

**Generator.** `n_classes` classes with centres on the unit sphere in `dim` (64) dimensions.
Classes `0 .. n_high-1` form the high-frequency group (total probability `p_high`, uniform inside
the group), the rest the low-frequency group (uniform inside). With `zipf_exponent` set, class
probabilities are instead p(c) ∝ (c+1)^-alpha over all classes, and the `n_high` most frequent
classes are still called "high". An input is x = centre + sigma * noise, noise ~ N(0, I_dim).
A sequence is a context of `context_len` (L) labelled inputs and a query. With probability
`p_relevant` the context holds the query's class: exactly `n_relevant` copies if set, otherwise
the context is drawn i.i.d. from the class distribution *conditioned on at least one copy* (the
published code redraws the whole context until it holds one; this draws the same distribution
directly: the number of copies from Binomial(L, p(query class)) truncated to >= 1, the other
items from the class distribution without the query's class). Otherwise no context item has the
query's class. With probability `label_noise` (eps) a training label (context and query) is
flipped to (y + 1) mod C. In a training set every class is the query of at least one sequence
(when N >= C). Labels are class ids; `shifted_label_map` moves every class to the label of the
next class of its own frequency group, so a model that memorised class -> label is wrong and
only reading the context gives the answer.

**Gated model.** f = a g + (1 - a) h, all three probability vectors over labels:
g = softmax(MLP(x_q)) the in-weight predictor (two hidden layers of 64, ReLU, initialised as
flax's nn.Dense), h = sum_i
softmax_i(-|x_i - x_q|^2 / T) onehot(y_i) the in-context predictor with T = exp(exp(theta)),
theta = 0 at the start (T = e, and T > 1 always), and a = sigmoid(MLP(.)) the gate (two hidden
layers of 64). The gate reads the flattened inputs of the sequence, [x_1, ..., x_L, x_q], without
the labels (`gate_input="sequence"`), or, as a variant, the query alone (`gate_input="query"`).
As in the published code, f is clipped at 1e-8 and h at 1e-7 before their logs.

**Training** (`train_gated_models`, `train_gated_model`), on a fixed data set of N sequences,
Adam, minibatches drawn with replacement: `training="joint"` fits g, h and the gate together by
the NLL of f for `steps` steps (the code behind the published figures: chanb/simple_icl, branch
iclr_2025, whose alpha templates mask no parameters); `training="staged"` (the main branch's
templates) fits g (NLL of g) and h (NLL of h) for `steps` steps, freezes them and then fits the
gate (NLL of f) for `steps` more, on the same data set. Checkpoints every `checkpoint_every`
steps record the training loss and the gate on fresh sequences; by default each model is
returned at its checkpoint of lowest training loss, as the published plots read their runs.
Seeded; the global RNG is untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from iclgd_lens.errors import IclgdError

GROUPS = ("high", "low")
QUERY_GROUPS = ("high", "low", "all")
GATE_INPUTS = ("sequence", "query")
TRAININGS = ("joint", "staged")
SELECTS = ("min-train-loss", "final")  # which checkpoint a trained model is returned at
LABELINGS = ("original", "shifted")
CONTEXTS = {
    "default": None,
    "always": 1.0,
    "never": 0.0,
}  # evaluation context -> p_relevant (None: the setting's)


@dataclass(frozen=True)
class ChanSetting:
    """The knobs of the synthetic generator (docs/science.md, section 6)."""

    n_classes: int = 10
    n_high: int = 5  # classes in the high-frequency group
    p_high: float = 0.9  # total probability of the high-frequency group (ignored with zipf_exponent)
    zipf_exponent: float | None = None  # p(c) ∝ (c+1)^-alpha instead of the two-level split
    dim: int = 64
    sigma: float = 0.2  # within-class noise, per coordinate
    context_len: int = 1  # L
    p_relevant: float = 0.9  # probability that the context holds the query's class
    n_relevant: int | None = None  # exact number of copies when relevant (None: at least one)
    label_noise: float = 0.0  # eps: probability a training label y is flipped to (y + 1) mod C

    def check(self) -> None:
        """Raise IclgdError (one line) for a setting the generator cannot draw from."""
        if self.n_classes < 2 or not 1 <= self.n_high < self.n_classes:
            raise IclgdError(
                f"need n_classes >= 2 and 1 <= n_high < n_classes, got {self.n_classes}, {self.n_high}"
            )
        for name in ("p_high", "p_relevant", "label_noise"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise IclgdError(f"{name} must be in [0, 1], got {value}")
        if self.zipf_exponent is None and not 0.0 < self.p_high < 1.0:
            raise IclgdError(f"p_high must be strictly between 0 and 1, got {self.p_high}")
        if self.zipf_exponent is not None and self.zipf_exponent < 0:
            raise IclgdError(f"zipf_exponent must be >= 0, got {self.zipf_exponent}")
        if self.dim < 1 or self.context_len < 1 or self.sigma < 0:
            raise IclgdError(
                "need dim >= 1, context_len >= 1, sigma >= 0; "
                f"got {self.dim}, {self.context_len}, {self.sigma}"
            )
        if self.n_relevant is not None and not 1 <= self.n_relevant <= self.context_len:
            raise IclgdError(
                f"n_relevant must be in 1..context_len={self.context_len}, got {self.n_relevant}"
            )


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
        return Sequences(
            *(
                t[index]
                for t in (
                    self.context_x,
                    self.context_labels,
                    self.query_x,
                    self.query_labels,
                    self.query_classes,
                )
            )
        )


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


def _copies_at_least_one(p: Tensor, n_ctx: int, gen: torch.Generator) -> Tensor:
    """Number of query-class copies in an i.i.d. context of n_ctx items conditioned on >= 1:
    Binomial(n_ctx, p) truncated to 1..n_ctx, one draw per entry of p [n]. Returns [n] long."""
    k = torch.arange(1, n_ctx + 1, dtype=torch.float64)  # [L]
    p = p.double().clamp(1e-12, 1 - 1e-12)[:, None]  # [n, 1]
    log_choose = math.lgamma(n_ctx + 1) - torch.lgamma(k + 1) - torch.lgamma(n_ctx - k + 1)  # [L]
    log_w = log_choose + k * p.log() + (n_ctx - k) * torch.log1p(-p)  # [n, L]
    return torch.multinomial(torch.softmax(log_w, dim=1).float(), 1, generator=gen).squeeze(1) + 1


def sample_sequences(
    world: World,
    n: int,
    gen: torch.Generator,
    *,
    label_map: Tensor | None = None,  # [n_classes]; default identity
    p_relevant: float | None = None,  # default world.setting.p_relevant
    label_noise: float | None = None,  # default world.setting.label_noise
    query_group: str
    | None = None,  # "high" / "low": draw the query class within that group only ("all" / None: any)
    cover_classes: bool = False,  # every class the query of >= 1 sequence (training sets, n >= C)
) -> Sequences:
    """Draw `n` sequences from the generator (see the module docstring)."""
    s = world.setting
    label_map = identity_label_map(world) if label_map is None else label_map
    p_relevant = s.p_relevant if p_relevant is None else p_relevant
    label_noise = s.label_noise if label_noise is None else label_noise
    n_ctx, n_cls = s.context_len, s.n_classes

    query_probs = world.class_probs.clone()
    if query_group not in (None, "all"):
        if query_group not in GROUPS:
            raise IclgdError(f"query_group must be one of {QUERY_GROUPS}, got {query_group!r}")
        query_probs[world.is_high if query_group == "low" else ~world.is_high] = 0.0
    query_classes = torch.multinomial(query_probs, n, replacement=True, generator=gen)  # [n]
    if cover_classes:  # a random min(n, C) sequences take every class (a random subset if n < C) once
        slots = torch.randperm(n, generator=gen)[: min(n, n_cls)]
        query_classes[slots] = torch.randperm(n_cls, generator=gen)[: len(slots)]

    relevant = torch.rand(n, generator=gen) < p_relevant  # [n]
    if s.n_relevant is None:
        n_copies = _copies_at_least_one(world.class_probs[query_classes], n_ctx, gen)
    else:
        n_copies = torch.full((n,), s.n_relevant, dtype=torch.long)
    n_copies = torch.where(relevant, n_copies, torch.zeros_like(n_copies))  # [n]
    other_probs = world.class_probs.repeat(n, 1)  # [n, C]
    other_probs[torch.arange(n), query_classes] = 0.0
    context_classes = torch.multinomial(
        other_probs, n_ctx, replacement=True, generator=gen
    )  # [n, L], never the query's
    slot_rank = (
        torch.rand(n, n_ctx, generator=gen).argsort(dim=1).argsort(dim=1)
    )  # [n, L] random permutation ranks
    copy_slot = slot_rank < n_copies[:, None]  # [n, L]
    context_classes = torch.where(copy_slot, query_classes[:, None], context_classes)

    context_x = world.centres[context_classes] + s.sigma * torch.randn(n, n_ctx, s.dim, generator=gen)
    query_x = world.centres[query_classes] + s.sigma * torch.randn(n, s.dim, generator=gen)
    context_labels = label_map[context_classes]
    query_labels = label_map[query_classes]
    if label_noise > 0:  # flip y -> (y + 1) mod C, as the published code
        noisy = torch.rand(n, n_ctx, generator=gen) < label_noise
        context_labels = torch.where(noisy, (context_labels + 1) % n_cls, context_labels)
        noisy = torch.rand(n, generator=gen) < label_noise
        query_labels = torch.where(noisy, (query_labels + 1) % n_cls, query_labels)
    return Sequences(context_x, context_labels, query_x, query_labels, query_classes)


def _dense(d_in: int, d_out: int) -> nn.Linear:
    """A linear layer initialised as flax's nn.Dense (the published code): LeCun normal weights
    (truncated at 2 standard deviations, variance 1/d_in), zero bias."""
    layer = nn.Linear(d_in, d_out)
    std = math.sqrt(1.0 / d_in) / 0.87962566103423978  # flax's variance_scaling correction for the truncation
    with torch.no_grad():
        nn.init.trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
        layer.bias.zero_()
    return layer


def _mlp(d_in: int, hidden: tuple[int, ...], d_out: int) -> nn.Sequential:
    layers, width = [], d_in
    for h in hidden:
        layers += [_dense(width, h), nn.ReLU()]
        width = h
    return nn.Sequential(*layers, _dense(width, d_out))


@dataclass
class GatedOutput:
    """What the gated model computes for a batch."""

    log_probs: Tensor  # [..., n, n_labels] log f
    gate: Tensor  # [..., n] a(x), weight of the in-weight predictor
    in_weight_log_probs: Tensor  # [..., n, n_labels] log g
    in_context_probs: Tensor  # [..., n, n_labels] h


def _gated_forward(
    in_weight,
    gate,
    temperature: Tensor,
    n_labels: int,
    gate_input: str,
    context_x: Tensor,
    context_labels: Tensor,
    query_x: Tensor,
) -> GatedOutput:
    """f = a g + (1 - a) h for inputs with any leading dims (one model: [n]; a stack of models: [M, n]).

    context_x [..., L, dim], context_labels [..., L], query_x [..., dim]; `temperature`
    broadcasts against [..., L]; `in_weight` and `gate` map [..., d_in] -> [..., d_out].
    """
    sq_dist = ((context_x - query_x.unsqueeze(-2)) ** 2).sum(-1)  # [..., L]
    attention = torch.softmax(-sq_dist / temperature, dim=-1)  # [..., L]
    in_context = torch.zeros(*query_x.shape[:-1], n_labels, dtype=query_x.dtype, device=query_x.device)
    in_context = in_context.scatter_add(-1, context_labels, attention)  # [..., n_labels]
    log_g = F.log_softmax(in_weight(query_x), dim=-1)  # [..., n_labels]
    if gate_input == "query":
        features = query_x
    else:  # the flattened inputs of the sequence [x_1, ..., x_L, x_q] (no labels, as published)
        features = torch.cat([context_x.flatten(-2), query_x], dim=-1)
    a = torch.sigmoid(gate(features).squeeze(-1))  # [...] weight of g
    f = (1 - a).unsqueeze(-1) * in_context + a.unsqueeze(-1) * log_g.exp()
    return GatedOutput(f.clamp_min(1e-8).log(), a, log_g, in_context)


class GatedModel(nn.Module):
    """f = a g + (1 - a) h: in-weight MLP g, soft nearest-neighbour h, learned gate a."""

    def __init__(
        self,
        dim: int,
        n_labels: int,
        context_len: int,
        *,
        hidden: tuple[int, ...] = (64, 64),
        gate_hidden: tuple[int, ...] = (64, 64),
        gate_input: str = "sequence",
    ):
        super().__init__()
        if gate_input not in GATE_INPUTS:
            raise IclgdError(f"gate_input must be one of {GATE_INPUTS}, got {gate_input!r}")
        self.n_labels = n_labels
        self.gate_input = gate_input
        self.in_weight = _mlp(dim, tuple(hidden), n_labels)
        gate_in = dim if gate_input == "query" else (context_len + 1) * dim
        self.gate = _mlp(gate_in, tuple(gate_hidden), 1)
        self.temperature_param = nn.Parameter(torch.tensor(0.0))  # T = exp(exp(theta)), e at the start

    @property
    def temperature(self) -> Tensor:
        return self.temperature_param.exp().exp()

    def forward(self, context_x: Tensor, context_labels: Tensor, query_x: Tensor) -> GatedOutput:
        # context_x [n, L, dim], context_labels [n, L], query_x [n, dim]
        return _gated_forward(
            self.in_weight,
            self.gate,
            self.temperature,
            self.n_labels,
            self.gate_input,
            context_x,
            context_labels,
            query_x,
        )


class _StackedMLP(nn.Module):
    """M MLPs of one shape as batched weights, applied to [M, n, d_in] with one bmm per layer."""

    def __init__(self, mlps: list[nn.Sequential]):
        super().__init__()
        linears = [[m for m in mlp if isinstance(m, nn.Linear)] for mlp in mlps]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].weight.detach().T for ls in linears]))
            for i in range(len(linears[0]))
        )  # [M, d_in, d_out]
        self.biases = nn.ParameterList(
            nn.Parameter(torch.stack([ls[i].bias.detach()[None] for ls in linears]))
            for i in range(len(linears[0]))
        )  # [M, 1, d_out]

    def forward(self, x: Tensor) -> Tensor:
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x

    def write_back(self, mlps: list[nn.Sequential]) -> None:
        for m, mlp in enumerate(mlps):
            for i, linear in enumerate(l for l in mlp if isinstance(l, nn.Linear)):
                linear.weight.data.copy_(self.weights[i][m].T)
                linear.bias.data.copy_(self.biases[i][m, 0])


def _checkpoint_data(
    worlds: list[World], data: list[Sequences], seeds: list[int], n_pretrain: int, n_track: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Fixed sequences read at every checkpoint, from generators of their own (so that
    checkpointing leaves the training trajectory unchanged): `n_pretrain` training sequences per
    model drawn with replacement (the published "pretraining" evaluation, whose loss picks the
    checkpoint) and `n_track` fresh in-distribution sequences per query group (the curves over
    training). Returns ([cx, cy, qx, qy] of [M, n_pretrain, ...], the same of [M, 2 * n_track, ...])."""
    pre, track = [], []
    for world, d, seed in zip(worlds, data, seeds):
        gen = torch.Generator().manual_seed(20_000 + seed)
        index = torch.randint(len(d), (n_pretrain,), generator=gen)
        pre.append(d.subset(index))
        fresh = [sample_sequences(world, n_track, gen, label_noise=0.0, query_group=g) for g in GROUPS]
        track.append(Sequences(*(torch.cat(ts) for ts in zip(*(_fields(f) for f in fresh)))))
    stack = lambda seqs: [torch.stack(ts) for ts in zip(*(_fields(q)[:4] for q in seqs))]
    return stack(pre), stack(track)


def _fields(d: Sequences) -> tuple[Tensor, ...]:
    return d.context_x, d.context_labels, d.query_x, d.query_labels, d.query_classes


def train_gated_models(
    worlds: list[World],
    n_train: list[int],
    seeds: list[int],
    *,
    steps: int = 5000,
    batch_size: int = 32,
    learning_rate: float = 3e-4,
    hidden: tuple[int, ...] = (64, 64),
    gate_input: str = "sequence",
    training: str = "joint",
    weight_decay: float = 0.0,
    checkpoint_every: int | None = 500,
    select: str = "min-train-loss",
    n_pretrain: int = 2000,
    n_track: int = 256,
) -> list[GatedModel]:
    """Train M gated models side by side, model m on a fixed training set of `n_train[m]`
    sequences from `worlds[m]`, seeded by `seeds[m]`: the same as training each alone.

    Each model has its own data, initialisation and minibatch order from its seed (the data
    first, then the minibatch indices, from one generator). The M models are stacked into
    batched weights and trained with one Adam on the sum of their losses; Adam acts elementwise
    and the losses do not interact, so each model follows its own trajectory (up to float
    rounding of the batched matmuls). `training="joint"`: `steps` steps on g, h and the gate
    together (NLL of f); `"staged"`: `steps` steps on g and h (each by its own NLL), then, with
    them frozen, `steps` steps on the gate (NLL of f). The number of steps does not depend on N,
    so a small N means many passes over few sequences. The global RNG is untouched.

    Checkpoints (as the published code, every `checkpoint_every` steps and at the start of the
    run, or of the gate's stage when staged): the NLL of f on `n_pretrain` training sequences
    drawn with replacement, and the mean gate and error of f on `n_track` fresh sequences per
    query group. `select="min-train-loss"` returns each model at its checkpoint of lowest
    training loss (the latest of equal ones), as the published figures read their runs;
    `"final"` at the last step. Each returned model carries `trajectory` (one dict per
    checkpoint: step, train_loss, gate_high, gate_low, error_high, error_low) and
    `selected_step`.
    """
    if not (len(worlds) == len(n_train) == len(seeds)) or not worlds:
        raise IclgdError("worlds, n_train and seeds must be lists of one length >= 1")
    if min(n_train) < 1 or steps < 1 or batch_size < 1:
        raise IclgdError(
            f"n_train, steps and batch_size must be >= 1, got {min(n_train)}, {steps}, {batch_size}"
        )
    if training not in TRAININGS:
        raise IclgdError(f"training must be one of {TRAININGS}, got {training!r}")
    if select not in SELECTS:
        raise IclgdError(f"select must be one of {SELECTS}, got {select!r}")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise IclgdError(f"checkpoint_every must be >= 1 (or None: no checkpoints), got {checkpoint_every}")
    if checkpoint_every is None and select != "final":
        raise IclgdError(f"select={select!r} needs checkpoints (checkpoint_every >= 1)")
    s = worlds[0].setting
    if any(w.setting != s for w in worlds):
        raise IclgdError(
            "models trained side by side need one generator setting (their worlds may differ in seed only)"
        )
    gens = [torch.Generator().manual_seed(seed) for seed in seeds]
    data = [sample_sequences(w, n, g, cover_classes=True) for w, n, g in zip(worlds, n_train, gens)]
    pool = [torch.cat(ts) for ts in zip(*(_fields(d)[:4] for d in data))]
    offsets = torch.tensor([0, *n_train[:-1]]).cumsum(0).tolist()
    models = []
    with torch.random.fork_rng(devices=[]):
        for seed in seeds:
            torch.manual_seed(seed)
            models.append(
                GatedModel(
                    s.dim,
                    s.n_classes,
                    s.context_len,
                    hidden=tuple(hidden),
                    gate_hidden=tuple(hidden),
                    gate_input=gate_input,
                )
            )
    g_stack = _StackedMLP([m.in_weight for m in models])
    gate_stack = _StackedMLP([m.gate for m in models])
    theta = nn.Parameter(torch.stack([m.temperature_param.detach() for m in models]))  # [M]
    all_params = [*g_stack.parameters(), *gate_stack.parameters(), theta]
    n_models = len(models)
    if checkpoint_every is not None:
        pre, track = _checkpoint_data(worlds, data, seeds, n_pretrain, n_track)
    trajectories: list[list[dict]] = [[] for _ in models]
    best_loss = torch.full((n_models,), math.inf)
    best_step = [0] * n_models
    best_params = [p.detach().clone() for p in all_params]

    def run(cx, cy, qx):
        return _gated_forward(
            g_stack, gate_stack, theta.exp().exp()[:, None, None], s.n_classes, gate_input, cx, cy, qx
        )

    def forward():
        index = torch.cat(
            [torch.randint(n, (batch_size,), generator=g) + off for n, g, off in zip(n_train, gens, offsets)]
        )
        cx, cy, qx, qy = (t[index].view(n_models, batch_size, *t.shape[1:]) for t in pool)
        return run(cx, cy, qx), qy

    def nll(
        log_probs: Tensor, labels: Tensor
    ) -> Tensor:  # [M, B, C], [M, B] -> sum over models of the mean NLL
        return -log_probs.gather(-1, labels[..., None]).mean(dim=(1, 2)).sum()

    @torch.no_grad()
    def checkpoint(step: int, selecting: bool) -> None:
        out = run(*pre[:3])
        loss = -out.log_probs.gather(-1, pre[3][..., None]).squeeze(-1).mean(-1)  # [M]
        fresh = run(*track[:3])
        wrong = (fresh.log_probs.argmax(-1) != track[3]).float()  # [M, 2 * n_track]
        for m in range(n_models):
            trajectories[m].append(
                dict(
                    step=step,
                    train_loss=float(loss[m]),
                    gate_high=float(fresh.gate[m, :n_track].mean()),
                    gate_low=float(fresh.gate[m, n_track:].mean()),
                    error_high=float(wrong[m, :n_track].mean()),
                    error_low=float(wrong[m, n_track:].mean()),
                )
            )
        if selecting:
            better = loss <= best_loss  # [M]; ties go to the later checkpoint, as published
            best_loss[better] = loss[better]
            for m in better.nonzero().flatten().tolist():
                best_step[m] = step
            for keep, p in zip(best_params, all_params):
                keep[better] = p.detach()[better]

    def fit(params, loss_of, first_step: int, selecting: bool) -> None:
        optimiser = torch.optim.Adam(params, lr=learning_rate, weight_decay=weight_decay)
        if checkpoint_every is not None:
            checkpoint(first_step, selecting)
        for i in range(1, steps + 1):
            out, labels = forward()
            loss = loss_of(out, labels)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if checkpoint_every is not None and (i % checkpoint_every == 0 or i == steps):
                checkpoint(first_step + i, selecting)

    if training == "joint":
        fit(all_params, lambda out, y: nll(out.log_probs, y), 0, True)
    else:
        stage1 = [*g_stack.parameters(), theta]
        fit(
            stage1,
            lambda out, y: (
                nll(out.in_weight_log_probs, y) + nll(out.in_context_probs.clamp_min(1e-7).log(), y)
            ),
            0,
            False,
        )
        for p in stage1:
            p.requires_grad_(False)
        best_params = [p.detach().clone() for p in all_params]  # g and h: the last step of stage 1
        fit(list(gate_stack.parameters()), lambda out, y: nll(out.log_probs, y), steps, True)
    with torch.no_grad():
        if select == "min-train-loss":
            for keep, p in zip(best_params, all_params):
                p.copy_(keep)
        g_stack.write_back([m.in_weight for m in models])
        gate_stack.write_back([m.gate for m in models])
        for m, model in enumerate(models):
            model.temperature_param.copy_(theta[m])
            model.trajectory = trajectories[m]
            model.selected_step = (
                best_step[m] if select == "min-train-loss" else (2 * steps if training == "staged" else steps)
            )
    return [model.eval() for model in models]


def train_gated_model(world: World, n_train: int, *, seed: int = 0, **kwargs) -> GatedModel:
    """One gated model on a fixed training set of `n_train` sequences (`train_gated_models` with M = 1)."""
    return train_gated_models([world], [n_train], [seed], **kwargs)[0]


@torch.no_grad()
def evaluate_grid(model: GatedModel, world: World, n_eval: int, seed: int = 0) -> list[dict]:
    """Errors of f, g, h and the mean gate on fresh clean sequences, over the published grid:
    labels {original, shifted within the frequency group} x context {default (the training
    p_relevant), always, never relevant} x queries {high, low, all}.

    `n_eval` sequences per cell. Returns tidy rows {labels, context, group, metric, value}.
    """
    if n_eval < 1:
        raise IclgdError(f"n_eval must be >= 1, got {n_eval}")
    maps = {"original": identity_label_map(world), "shifted": shifted_label_map(world)}
    gen = torch.Generator().manual_seed(10_000 + seed)
    rows = []
    for labels in LABELINGS:
        for context, p_relevant in CONTEXTS.items():
            for group in QUERY_GROUPS:
                data = sample_sequences(
                    world,
                    n_eval,
                    gen,
                    label_map=maps[labels],
                    p_relevant=p_relevant,
                    label_noise=0.0,
                    query_group=group,
                )
                out = model(data.context_x, data.context_labels, data.query_x)
                values = {
                    "error": out.log_probs.argmax(-1) != data.query_labels,
                    "error_in_weight": out.in_weight_log_probs.argmax(-1) != data.query_labels,
                    "error_in_context": out.in_context_probs.argmax(-1) != data.query_labels,
                    "gate": out.gate,
                }
                rows += [
                    dict(labels=labels, context=context, group=group, metric=k, value=float(v.float().mean()))
                    for k, v in values.items()
                ]
    return rows
