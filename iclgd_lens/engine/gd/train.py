"""GD on the demonstrations of many episodes at once, in lockstep on one shared model:
`train_deltas` builds the training examples, runs one batched forward/backward per step with
the current deltas hooked in, and updates the deltas (SGD as low-rank factors or dense,
Adam: torch.optim.Adam on the dense deltas); layer-causal GD (Deutch et al.) included.
The model's parameters, their `.grad` and `requires_grad` are never touched."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import einops
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from iclgd_lens.engine.gd.config import GDConfig, demo_order, projection_paths
from iclgd_lens.engine.gd.deltas import (
    Deltas,
    Factors,
    HookFn,
    _densify,
    _hooks_for_parts,
    _linear_weight,
    _raw_module,
)
from iclgd_lens.errors import IclgdError
from iclgd_lens.models import release_transient_state
from iclgd_lens.tasks import Episode, Example, Task

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

IGNORE = -100  # target id of positions that carry no loss


@dataclass
class _EncodedDemo:
    """One demonstration as a training example: token ids and the target of each position."""

    input_ids: list[int]
    targets: list[int]  # targets[p] = the token predicted from position p, or IGNORE


def _encode_demo(
    tokenizer, task: Task, demo: Example, label_words: Sequence[str], loss_on: str
) -> _EncodedDemo:
    """Tokenise one rendered demonstration with BOS; mark the loss tokens."""
    text = task.render_demo(demo, label_words)
    enc = tokenizer(text, return_offsets_mapping=loss_on == "label_tokens", add_special_tokens=True)
    ids = list(enc["input_ids"])
    if loss_on == "all_tokens":
        is_loss = [p > 0 for p in range(len(ids))]
    else:
        label_start = len(text) - len(label_words[demo.label])
        is_loss = [end > start and end > label_start for (start, end) in enc["offset_mapping"]]
        if not any(is_loss[1:]):
            raise IclgdError(f"the label word of demonstration {text!r} produced no tokens to train on")
    targets = [ids[p + 1] if is_loss[p + 1] else IGNORE for p in range(len(ids) - 1)] + [IGNORE]
    return _EncodedDemo(ids, targets)


def _pad_batch(
    demos: list[_EncodedDemo], pad_id: int, device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-pad to a common length: input_ids, attention_mask, targets, each [rows, pos]."""
    width = max(len(d.input_ids) for d in demos)
    input_ids = torch.full((len(demos), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(demos), width), dtype=torch.long)
    targets = torch.full((len(demos), width), IGNORE, dtype=torch.long)
    for row, demo in enumerate(demos):
        n = len(demo.input_ids)
        input_ids[row, :n] = torch.tensor(demo.input_ids)
        attention_mask[row, :n] = 1
        targets[row, :n] = torch.tensor(demo.targets)
    return input_ids.to(device), attention_mask.to(device), targets.to(device)


def _episode_losses(logits: torch.Tensor, targets: torch.Tensor, n_episodes: int) -> torch.Tensor:
    """Mean next-token loss over each episode's loss tokens: [n_episodes].

    logits [rows, pos, vocab]; targets [rows, pos]; rows are episode-major, equal per episode.
    """
    token_loss = F.cross_entropy(
        einops.rearrange(logits.float(), "r p v -> (r p) v"),
        targets.flatten(),
        ignore_index=IGNORE,
        reduction="none",
    )
    token_loss = einops.rearrange(token_loss, "(e rp) -> e rp", e=n_episodes)  # [episodes, rows*pos]
    n_loss_tokens = einops.rearrange(targets != IGNORE, "(e r) p -> e (r p)", e=n_episodes).sum(-1)
    return token_loss.sum(-1) / n_loss_tokens


# ---- training -------------------------------------------------------------------------------
LOW_RANK_LIMIT = 1.0
"""SGD keeps a delta as factors while its rank r (training tokens so far) stays at most this
times the break-even rank d_in * d_out / (d_in + d_out), where U (V^T x) costs as much as dW x;
past it the delta is multiplied out and trained dense. 0 trains dense from the start."""


def _requires_grad(resid: torch.Tensor, hook) -> torch.Tensor:
    """A graph root: the residual stream as a leaf that requires grad, so that the gradient of
    every projection's output exists even when the model's parameters do not require grad."""
    return resid.detach().requires_grad_(True)


def _forward_losses(
    model: "TransformerBridge",
    input_ids,
    attention_mask,
    targets,
    parts,
    row_episode,
    config: GDConfig,
    record: dict,
    observers=(),
) -> torch.Tensor:
    """Per-episode loss [n_episodes] of one step, with the current deltas hooked in (the
    outputs of the low-rank projections go to `record`, see `_hooks_for_parts`). `observers`
    are read-only hooks, registered after the deltas so that they see the updated values."""
    n_episodes = len(torch.unique(row_episode))
    unembed_record = {"unembed": record["unembed"]} if "unembed" in record else None
    hooks = _hooks_for_parts(
        {p: d for p, d in parts.items() if p != "unembed" or not config.layer_causal}, row_episode, record
    )
    hooks += list(observers)
    hooks.append(("blocks.0.hook_resid_pre", _requires_grad))
    if not config.layer_causal:
        with model.hooks(fwd_hooks=hooks):
            logits = model(input_ids, attention_mask=attention_mask)  # [rows, pos, vocab]
        return _episode_losses(logits, targets, n_episodes)

    # Layer-causal (Deutch et al.): h_l = Layer_l(stopgrad(h_{l-1})), loss = sum_l LM loss of
    # the early exit W_U . norm_final(h_l). Norm and unembedding are called as raw HF modules
    # (no hooks fire), plus the unembedding delta when "all" trains it.
    final_norm = _raw_module(model, "ln_final")
    unembed = _raw_module(model, "unembed")
    unembed_hooks = (
        _hooks_for_parts({"unembed": parts["unembed"]}, row_episode, unembed_record)
        if "unembed" in parts
        else []
    )
    layer_losses: list[torch.Tensor] = []

    def early_exit_loss(resid: torch.Tensor, hook) -> None:  # resid [rows, pos, d_model]
        normed = final_norm(resid)
        logits = unembed(normed)  # [rows, pos, vocab]
        if unembed_hooks:
            unembed_hooks[0][1](normed, None)
            logits = unembed_hooks[1][1](logits, None)
        layer_losses.append(_episode_losses(logits, targets, n_episodes))

    n_layers = model.cfg.n_layers
    hooks += [(f"blocks.{l}.hook_resid_pre", _requires_grad) for l in range(1, n_layers)]  # stop-gradient
    hooks += [(f"blocks.{l}.hook_resid_post", early_exit_loss) for l in range(n_layers)]
    with model.hooks(fwd_hooks=hooks):
        model(input_ids, attention_mask=attention_mask)
    return torch.stack(layer_losses).sum(0)


def _check_inputs(model, episodes: list[Episode]) -> int:
    """Validate the arguments of train_deltas; return k."""
    if not (hasattr(model, "hooks") and hasattr(model, "cfg")):
        raise IclgdError("train_deltas needs a TransformerBridge (TransformerBridge.boot_transformers(...))")
    if not episodes:
        raise IclgdError("train_deltas needs at least one episode")
    ks = {len(e.demos) for e in episodes}
    if len(ks) != 1:
        raise IclgdError(
            f"all episodes of one GD run must have the same number of demonstrations, got {sorted(ks)}"
        )
    return ks.pop()


def train_deltas(
    model: "TransformerBridge",
    tokenizer,
    task: Task,
    episodes: list[Episode],
    config: GDConfig,
    *,
    progress: bool = False,
    record_queries: bool = False,
    progress_label: str = "GD",
) -> Deltas:
    """Fine-tune `config`'s projections on each episode's demonstrations, all episodes at once.

    Every demonstration is one training example (`task.render_demo`, tokenised alone with
    BOS); step t trains on batch t of every episode (chunks of `batch_size` in prompt order,
    or in `demo_order(k, order_seed)`), for `epochs` passes. Loss per episode = mean over its
    loss tokens; the sum over episodes is differentiated with `torch.autograd.grad` w.r.t. the
    deltas (Adam, or SGD past `LOW_RANK_LIMIT`) or w.r.t. the projections' outputs (SGD's
    low-rank factors), so the model's parameters, their `.grad` and `requires_grad` are never
    touched. Raises IclgdError if the loss or the deltas stop being finite.

    `progress_label`: the progress bar's label (with `progress`).
    `record_queries`: keep the query vectors (`attn.hook_q`, after any Q delta) of every
    training token as GD saw it (`Deltas.train_queries`): the GD side of Dai's Kendall.
    """
    k = _check_inputs(model, episodes)
    config = config.for_task(task)
    n_episodes, n_layers = len(episodes), model.cfg.n_layers
    paths = projection_paths(config, n_layers)
    weights = {path: _linear_weight(model, path) for path in paths}
    device = weights[paths[0]].device
    dtypes = {path: torch.float32 if config.delta_dtype else w.dtype for path, w in weights.items()}
    if config.optimizer == "sgd":  # factors of rank 0: U [n_episodes, d_out, 0], V [n_episodes, d_in, 0]
        parts = {
            path: tuple(torch.zeros((n_episodes, d, 0), dtype=dtypes[path], device=device) for d in w.shape)
            for path, w in weights.items()
        }
    else:
        # Adam: dense deltas from zero, as the parameters of a torch.optim.Adam (elementwise, so per episode)
        parts = {
            path: torch.zeros((n_episodes, *w.shape), dtype=dtypes[path], device=device, requires_grad=True)
            for path, w in weights.items()
        }
    adam = torch.optim.Adam(list(parts.values()), lr=config.lr) if config.optimizer == "adam" else None

    encoded = [
        [_encode_demo(tokenizer, task, d, e.label_words, config.loss_on) for d in e.demos] for e in episodes
    ]
    order = demo_order(k, config.order_seed)
    chunks = [order[i : i + config.batch_size] for i in range(0, k, config.batch_size)] * config.epochs
    steps_per_epoch = max(1, len(chunks) // config.epochs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    try:
        queries: dict | None = {} if record_queries else None
        deltas = _train(
            model,
            parts,
            adam,
            encoded,
            chunks,
            steps_per_epoch,
            n_episodes,
            pad_id,
            device,
            config,
            progress_label if progress else None,
            queries,
        )
        if queries is not None:
            deltas.train_queries, deltas.train_token_demo = _stack_train_queries(queries, encoded, n_layers)
        return deltas
    finally:
        release_transient_state(model)


def _train(
    model,
    parts,
    adam,
    encoded,
    chunks,
    steps_per_epoch,
    n_episodes,
    pad_id,
    device,
    config,
    progress: str | None,
    queries=None,
) -> Deltas:
    """The GD loop of `train_deltas` (dense deltas updated in place, factors extended; with
    `adam`, a torch.optim.Adam over the dense deltas, steps them). `progress`: the bar's label,
    None for no bar."""
    step_losses = []
    calls_per_step = {
        path: model.cfg.n_layers if path == "unembed" and config.layer_causal else 1 for path in parts
    }
    buffers = _factor_buffers(parts, encoded, chunks, n_episodes, calls_per_step)
    for path, (u, v) in buffers.items():
        parts[path] = (u[..., :0], v[..., :0])
    with (
        torch.enable_grad(),
        tqdm(chunks, desc=progress, disable=progress is None) as steps,
    ):  # closed on errors
        for step, chunk in enumerate(steps, start=1):
            batch = [encoded[e][i] for e in range(n_episodes) for i in chunk]  # episode-major rows
            row_episode = torch.arange(n_episodes).repeat_interleave(len(chunk))  # [rows]
            input_ids, attention_mask, targets = _pad_batch(batch, pad_id, device)
            new_rank = len(chunk) * input_ids.shape[1]  # training tokens per episode this step
            for path, part in parts.items():  # past the break-even rank: multiply out, go on dense
                if isinstance(part, tuple) and part[0].shape[-1] + new_rank * calls_per_step[
                    path
                ] > _rank_limit(part):
                    parts[path] = _densify(part)
                    buffers.pop(path, None)
            leaves = {
                path: d if adam is not None else d.detach().requires_grad_(True)
                for path, d in parts.items()
                if not isinstance(d, tuple)
            }
            record = {path: [] for path, part in parts.items() if isinstance(part, tuple)}
            observers = (
                _query_observers(queries, chunk, n_episodes, model.cfg.n_layers)
                if queries is not None
                else ()
            )
            losses = _forward_losses(
                model,
                input_ids,
                attention_mask,
                targets,
                {**parts, **leaves},
                row_episode,
                config,
                record,
                observers,
            )
            if not torch.isfinite(losses).all():
                raise IclgdError(_diverged(step, config))
            outputs = [out for calls in record.values() for _, out in calls]
            grads = torch.autograd.grad(losses.sum(), [*leaves.values(), *outputs], allow_unused=True)
            with torch.no_grad():  # in place: deltas + gradients are the peak memory, nothing more
                if adam is not None:
                    for path, grad in zip(leaves, grads):
                        parts[path].grad = grad
                    adam.step()
                    adam.zero_grad(set_to_none=True)
                else:
                    for path, grad in zip(leaves, grads):
                        if grad is not None:
                            _sgd_step_(parts[path], grad, config.lr)
                output_grads = iter(grads[len(leaves) :])
                for path, calls in record.items():
                    parts[path] = _extend(
                        parts[path],
                        [(x, next(output_grads)) for x, _ in calls],
                        n_episodes,
                        config.lr,
                        buffers.get(path),
                    )
                if step % steps_per_epoch == 0 and not all(_is_finite(part) for part in parts.values()):
                    raise IclgdError(
                        _diverged(step, config)
                    )  # checked once an epoch: a per-step check cost 24% of GD time
            del leaves, grads, record, outputs
            step_losses.append(losses.detach().float().cpu())
    losses = torch.stack(step_losses) if step_losses else torch.zeros((0, n_episodes))
    return Deltas(
        {path: part if isinstance(part, tuple) else part.detach() for path, part in parts.items()},
        config,
        losses,
    )


def _query_observers(
    store: dict, chunk: list[int], n_episodes: int, n_layers: int
) -> list[tuple[str, HookFn]]:
    """Hooks that keep each training row's query vectors: store[(episode, demo, layer)] =
    q [pos, n_heads, d_head] of that row (padded; cut to length later). A later epoch overwrites."""

    def make(layer: int) -> HookFn:
        def keep(q: torch.Tensor, hook) -> None:  # [rows, pos, n_heads, d_head], rows episode-major
            q = q.detach()
            for row in range(q.shape[0]):
                store[(row // len(chunk), chunk[row % len(chunk)], layer)] = q[row].clone()

        return keep

    return [(f"blocks.{layer}.attn.hook_q", make(layer)) for layer in range(n_layers)]


def _stack_train_queries(
    store: dict, encoded: list[list[_EncodedDemo]], n_layers: int
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per episode: queries of the training tokens in demonstration order, BOS excluded
    ([n_layers, n_tokens, n_heads, d_head]), and each token's demonstration 1..k ([n_tokens])."""
    queries, token_demo = [], []
    for e, demos in enumerate(encoded):
        per_layer = [
            torch.cat([store[(e, i, layer)][1 : len(d.input_ids)] for i, d in enumerate(demos)])
            for layer in range(n_layers)
        ]
        queries.append(torch.stack(per_layer))
        token_demo.append(
            torch.cat(
                [torch.full((len(d.input_ids) - 1,), i + 1, dtype=torch.long) for i, d in enumerate(demos)]
            )
        )
    return queries, token_demo


def _rank_limit(factors: Factors) -> float:
    """The largest rank kept low-rank: LOW_RANK_LIMIT x the break-even rank d_in d_out / (d_in + d_out)."""
    d_out, d_in = factors[0].shape[1], factors[1].shape[1]
    return LOW_RANK_LIMIT * d_in * d_out / (d_in + d_out)


def _factor_buffers(parts, encoded, chunks, n_episodes: int, calls_per_step: dict) -> dict[str, Factors]:
    """Preallocated (U, V) of every low-rank delta, as wide as the rank it reaches while it stays
    low-rank (each step adds rows x the step's padded length per call): the steps write into
    them instead of concatenating, so the factors are never held twice."""
    widths = [max(len(encoded[e][i].input_ids) for e in range(n_episodes) for i in chunk) for chunk in chunks]
    buffers = {}
    for path, part in parts.items():
        if not isinstance(part, tuple):
            continue
        capacity = 0
        for chunk, width in zip(chunks, widths):
            grown = capacity + len(chunk) * width * calls_per_step[path]
            if grown > _rank_limit(part):
                break
            capacity = grown
        u, v = part
        buffers[path] = (u.new_zeros((*u.shape[:2], capacity)), v.new_zeros((*v.shape[:2], capacity)))
    return buffers


def _extend(
    factors: Factors,
    calls: list[tuple[torch.Tensor, torch.Tensor | None]],
    n_episodes: int,
    lr: float,
    buffer: Factors | None = None,
) -> Factors:
    """One SGD step on low-rank factors: dW -= lr * sum over tokens of g x^T, i.e. append
    (-lr g, x) of every training token to (U, V). x [rows, pos, d_in]; g [rows, pos, d_out]
    (or [rows, pos, heads, d_head]); rows episode-major. Padding tokens have g = 0 (right
    padding, causal mask) and are kept, so every episode gets the same rank. With `buffer`
    (U, V preallocated, `factors` their first r columns) the new columns are written in place
    and views returned; without, or when it is full, the factors are concatenated."""
    u, v = factors
    new_u, new_v = [], []
    for x, g in calls:
        if g is None:  # the output did not reach the loss
            continue
        g = einops.rearrange(g.reshape(*g.shape[:2], -1), "(e r) p o -> e o (r p)", e=n_episodes)
        new_u.append(
            g.to(u.dtype).mul_(-lr)
        )  # (not alpha=-lr: a huge lr must overflow to inf in fp16, not raise)
        new_v.append(einops.rearrange(x, "(e r) p i -> e i (r p)", e=n_episodes).to(v.dtype))
    r, added = u.shape[-1], sum(t.shape[-1] for t in new_u)
    if buffer is not None and r + added <= buffer[0].shape[-1]:
        for t_u, t_v in zip(new_u, new_v):
            width = t_u.shape[-1]
            buffer[0][..., r : r + width] = t_u
            buffer[1][..., r : r + width] = t_v
            r += width
        return buffer[0][..., :r], buffer[1][..., :r]
    return torch.cat([u, *new_u], -1), torch.cat([v, *new_v], -1)


def _is_finite(part: "torch.Tensor | Factors") -> bool:
    """Whether a delta has no NaN or inf (factors: U, V finite and U V^T cannot overflow, by
    |(U V^T)_oi| <= |U_o| |V_i|; multiplied out only when that bound is inconclusive)."""
    if not isinstance(part, tuple):
        return bool(torch.isfinite(part).all())
    u, v = part
    if not (torch.isfinite(u).all() and torch.isfinite(v).all()):
        return False
    if u.shape[-1] == 0:
        return True
    bound = (
        torch.linalg.vector_norm(u.float(), dim=-1).amax()
        * torch.linalg.vector_norm(v.float(), dim=-1).amax()
    )
    return bool(bound < torch.finfo(u.dtype).max) or bool(torch.isfinite(_densify(part)).all())


def _sgd_step_(delta: torch.Tensor, grad: torch.Tensor, lr: float) -> None:
    """One plain SGD step on a dense delta, in place (momentum 0, no weight decay, no clipping)."""
    if delta.dtype == torch.float32:
        delta.add_(grad, alpha=-lr)  # one pass over memory: the update is memory-bound
    else:
        delta.sub_(grad.mul_(lr))  # (not alpha=-lr: a huge lr must overflow to inf in fp16, not raise)


def _diverged(step: int, config: GDConfig) -> str:
    return f"GD diverged at step {step} with lr={config.lr:g} ({config.describe()}); lower the learning rate"
