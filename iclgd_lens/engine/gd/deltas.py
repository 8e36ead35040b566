"""Per-episode weight deltas and the hooks that apply them: `Deltas` (dense, or exact
low-rank factors U V^T for plain SGD), `delta_hooks` (add dW x at every trained projection,
with a run-time guard that each was applied once per pass) and the bridge's projections."""

from __future__ import annotations

from typing import Callable

import einops
import torch

from iclgd_lens.engine.gd.config import GDConfig
from iclgd_lens.errors import IclgdError

HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]


Factors = tuple[torch.Tensor, torch.Tensor]
"""A low-rank delta dW = U V^T: U [n_episodes, d_out, r], V [n_episodes, d_in, r]."""


class Deltas:
    """Per-episode weight deltas, one per (layer, projection), each [n_episodes, d_out, d_in].

    A delta is kept either dense or, for plain SGD, as factors (U, V) with dW = U V^T: from
    zero, SGD's dW of a linear layer is a sum of outer products -lr * g x^T over every training
    token seen (g: gradient of the projection's output, x: its input), so r = training tokens.
    `tensors` gives dense [n_episodes, d_out, d_in] tensors either way (factors are multiplied
    out on first access and cached); `parts` is what is stored, and what `delta_hooks` uses.
    """

    def __init__(
        self,
        tensors: dict[str, "torch.Tensor | Factors"],
        config: GDConfig,
        losses: torch.Tensor,
        train_queries: list[torch.Tensor] | None = None,
        train_token_demo: list[torch.Tensor] | None = None,
    ):
        self.parts = dict(tensors)  # key: the projection's module path ("blocks.3.attn.k", "unembed")
        self.config = config
        self.losses = losses  # [n_steps, n_episodes] training loss per step (before the step's update)
        # with train_deltas(record_queries=True), per episode: the pre-rotary queries of every
        # training token as GD saw it (BOS excluded, demonstration order; the last epoch's pass),
        # [n_layers, n_tokens, n_heads, d_head], and each token's demonstration (1..k), [n_tokens]
        self.train_queries = train_queries
        self.train_token_demo = train_token_demo
        self._dense: dict[str, torch.Tensor] = {}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every delta as a dense tensor [n_episodes, d_out, d_in] (factors multiplied out once)."""
        for path, part in self.parts.items():
            if path not in self._dense:
                self._dense[path] = _densify(part) if isinstance(part, tuple) else part
        return {path: self._dense[path] for path in self.parts}

    @property
    def factors(self) -> dict[str, Factors]:
        """The deltas kept low-rank: {path: (U [n_episodes, d_out, r], V [n_episodes, d_in, r])}."""
        return {path: part for path, part in self.parts.items() if isinstance(part, tuple)}

    @property
    def n_episodes(self) -> int:
        part = next(iter(self.parts.values()))
        return (part[0] if isinstance(part, tuple) else part).shape[0]

    def norms(self) -> dict[str, torch.Tensor]:
        """Frobenius norm of every delta: {path: [n_episodes]}
        (factors: |U V^T|^2 = sum (U^T U) * (V^T V))."""
        out = {}
        for path, part in self.parts.items():
            if isinstance(part, tuple):
                u, v = (t.float() for t in part)
                gram = (u.mT @ u) * (v.mT @ v)  # [n_episodes, r, r]
                out[path] = gram.sum((-2, -1)).clamp_min(0).sqrt()
            else:
                out[path] = torch.linalg.matrix_norm(part.float())
        return out

    def dense_bytes_per_episode(self) -> int:
        """Bytes of one episode's deltas multiplied out (what `scaled_random_like` draws per episode)."""
        total = 0
        for part in self.parts.values():
            d_out, d_in = _dense_shape(part)
            total += d_out * d_in * (part[0] if isinstance(part, tuple) else part).element_size()
        return total

    def scaled_random_like(self, seed: int, episodes: list[int] | None = None) -> "Deltas":
        """A random update of the same Frobenius norm per tensor and episode (Deutch et al.'s
        baseline): Gaussian directions, episode e's from its own generator seeded with
        `random_seed(seed, e)` alone, drawn tensor by tensor in `parts` order.

        `episodes`: only these episodes (in this order; the result holds len(episodes)), so that
        compare() can draw the dense random deltas of a few episodes at a time; each
        episode's update is the same whichever subset it is drawn in."""
        episodes = list(range(self.n_episodes)) if episodes is None else list(episodes)
        norms = self.norms()
        generators = [torch.Generator().manual_seed(random_seed(seed, e)) for e in episodes]
        tensors = {}
        for path, part in self.parts.items():
            like = part[0] if isinstance(part, tuple) else part
            d_out, d_in = _dense_shape(part)
            noise = torch.stack([torch.randn((d_out, d_in), generator=g) for g in generators])  # [e, out, in]
            scale = norms[path].cpu()[episodes] / torch.linalg.matrix_norm(noise)  # [e]
            tensors[path] = (noise * scale[:, None, None]).to(dtype=like.dtype, device=like.device)
        return Deltas(tensors, self.config, self.losses[:, episodes].clone())


def random_seed(seed: int, episode: int) -> int:
    """The seed of episode `episode`'s random update under `seed` (distinct for distinct pairs)."""
    return seed * 1_000_003 + episode


def _dense_shape(part: "torch.Tensor | Factors") -> tuple[int, int]:
    """(d_out, d_in) of a delta, dense [n_episodes, d_out, d_in] or factors (U, V)."""
    return (part[0].shape[1], part[1].shape[1]) if isinstance(part, tuple) else (part.shape[1], part.shape[2])


def _densify(factors: Factors) -> torch.Tensor:
    """U V^T: [n_episodes, d_out, d_in]."""
    u, v = factors
    return u @ v.mT


def _raw_module(model, path: str) -> torch.nn.Module:
    """The HF module behind a bridge component (calling it fires no hooks)."""
    module = model.get_submodule(path)
    return getattr(module, "original_component", module)


def _linear_weight(model, path: str) -> torch.Tensor:
    """The weight [d_out, d_in] of the linear layer at a bridge path."""
    try:
        return _raw_module(model, path).weight
    except AttributeError as exc:
        raise IclgdError(
            f"the model has no linear projection at {path!r}; is it a LLaMA TransformerBridge?"
        ) from exc


def _apply(
    x: torch.Tensor,
    part: "torch.Tensor | Factors",
    episodes: list[int],
    counts: list[int],
    permute: torch.Tensor | None,
) -> torch.Tensor | None:
    """dW x for every row with its own episode's delta (None if every delta is still zero-rank).

    x: [batch, pos, d_in]; part: dW [n_episodes, d_out, d_in] or factors (U [n_episodes, d_out, r],
    V [n_episodes, d_in, r]), applied as U (V^T x); rows sorted by episode (after `permute`) come
    in runs `counts` of episode `episodes`. Returns [batch, pos, d_out].
    """
    low_rank = isinstance(part, tuple)
    if low_rank and part[0].shape[-1] == 0:
        return None
    n_episodes, dtype = (part[0] if low_rank else part).shape[0], (part[0] if low_rank else part).dtype
    x = x.to(dtype)
    if permute is not None:
        x = x[permute]
    if episodes == list(range(n_episodes)) and len(set(counts)) == 1:  # every episode, equal rows
        grouped = einops.rearrange(x, "(e r) p i -> e (r p) i", e=n_episodes)
        if low_rank:
            update = (grouped @ part[1]) @ part[0].mT  # [e, rows*pos, d_out]
        else:
            update = grouped @ part.mT
        update = einops.rearrange(update, "e (r p) o -> (e r) p o", p=x.shape[1])
    else:
        pieces = x.split(counts)
        if low_rank:
            update = torch.cat([(piece @ part[1][e]) @ part[0][e].mT for piece, e in zip(pieces, episodes)])
        else:
            update = torch.cat([piece @ part[e].mT for piece, e in zip(pieces, episodes)])
    if permute is not None:
        update = update[torch.argsort(permute)]
    return update


def _hooks_for_parts(
    parts: dict,
    row_episode: torch.Tensor,
    record: dict[str, list] | None = None,
    applied: dict[str, int] | None = None,
) -> list[tuple[str, HookFn]]:
    """The hook_in/hook_out pair per projection that adds dW x (see `delta_hooks`).

    `record` (training): for each path in it, every call appends (x [batch, pos, d_in], the
    hook's returned output), so that the gradient w.r.t. that output can be taken.
    `applied` (application): counts, per path, the passes in which its update was added.
    """
    if not parts:
        return []
    first = next(iter(parts.values()))
    n_episodes = (first[0] if isinstance(first, tuple) else first).shape[0]
    rows = torch.as_tensor(row_episode).detach().cpu()
    if rows.ndim != 1 or rows.dtype not in (torch.int64, torch.int32) or len(rows) == 0:
        raise IclgdError("row_episode must be a 1-D integer tensor with one episode index per batch row")
    if rows.min() < 0 or rows.max() >= n_episodes:
        raise IclgdError(
            f"row_episode has indices outside 0..{n_episodes - 1} (the deltas hold {n_episodes} episodes)"
        )
    order = torch.argsort(rows, stable=True)
    permute = None if torch.equal(order, torch.arange(len(rows))) else order
    episodes, counts = (t.tolist() for t in torch.unique_consecutive(rows[order], return_counts=True))
    calls = record.get if record is not None else lambda path: None
    hooks = []
    for path, part in parts.items():
        saved: dict[str, torch.Tensor] = {}

        def save_input(x: torch.Tensor, hook, saved=saved) -> None:
            saved["x"] = x  # a reference: the projection's input, no copy

        def add_update(
            out: torch.Tensor, hook, saved=saved, part=part, permute=permute, calls=calls(path), path=path
        ) -> torch.Tensor:
            if "x" not in saved:
                raise IclgdError(f"{DELTAS_NOT_APPLIED}: {path}.hook_in did not fire before {path}.hook_out")
            x = saved.pop("x")
            if x.shape[0] != len(rows):
                raise IclgdError(
                    f"delta hooks were built for batches of {len(rows)} rows, the model ran on {x.shape[0]}"
                )
            if x.ndim == 4:  # attn.o.hook_in is [batch, pos, heads, d_head]
                x = einops.rearrange(x, "b p h d -> b p (h d)")
            update = _apply(x, part, episodes, counts, permute.to(x.device) if permute is not None else None)
            if update is not None:
                if out.ndim == 4:  # q/k/v hook_out are [batch, pos, heads, d_head]
                    update = einops.rearrange(update, "b p (h d) -> b p h d", h=out.shape[2])
                out = out + update.to(out.dtype)
            if calls is not None:
                calls.append((x.detach(), out))
            if applied is not None:
                applied[path] += 1
            return out

        hooks += [(f"{path}.hook_in", save_input), (f"{path}.hook_out", add_update)]
    return hooks


def delta_hooks(deltas: Deltas, row_episode: torch.Tensor) -> list[tuple[str, HookFn]]:
    """Forward hooks that add dW x to every projection of `deltas`, for a batch whose row b
    belongs to episode `row_episode[b]` ([batch] long tensor). Low-rank deltas are applied as
    U (V^T x), never multiplied out.

    Pass them first in `fwd_hooks` so that probes on the same hook points see the updated
    activations: `with bridge.hooks(fwd_hooks=delta_hooks(d, rows) + probes): bridge(ids)`;
    `Recorder.run(..., interventions=delta_hooks(d, rows))` does so by construction. The last
    hook is a run-time guard: it stops the pass unless every delta was added exactly once.
    """
    applied = dict.fromkeys(deltas.parts, 0)

    def check_all_applied(logits: torch.Tensor, hook) -> None:
        """Run-time guard, after the last projection: every delta was added exactly once."""
        wrong = {path: n for path, n in applied.items() if n != 1}
        applied.update(dict.fromkeys(applied, 0))
        if wrong:
            path, n = next(iter(wrong.items()))
            raise IclgdError(
                f"{DELTAS_NOT_APPLIED}: the update of {path} was added {n} times in one forward pass "
                f"({len(wrong)} projection(s) affected)"
            )

    return [
        *_hooks_for_parts(deltas.parts, row_episode, applied=applied),
        ("unembed.hook_out", check_all_applied),
    ]


DELTAS_NOT_APPLIED = (
    "the GD deltas were not applied as built (this install of transformer-lens/transformers calls the "
    "projection hooks differently; supported versions: docs/versions.md)"
)
