"""Gradient descent on an episode's demonstrations, as per-episode weight deltas applied by hooks.

The GD condition of a comparison is "the model after fine-tuning on the demonstrations". The
user's model is never changed to get it: every trained projection `W` (a linear layer) gets a
delta `dW` per episode, stored beside the model, and hooks add `dW x` to the projection's
output (`x` is the projection's input, read at its `.hook_in`; the sum is returned at its
`.hook_out`). So B episodes are fine-tuned in lockstep on one shared base model in one batched
forward/backward per step, and the explicit `dW_GD` per layer is a result of its own.

    config = GDConfig.dai(lr=1e-3)
    deltas = train_deltas(bridge, tokenizer, task, episodes, config)
    with bridge.hooks(fwd_hooks=delta_hooks(deltas, row_episode)):   # the GD condition
        logits = bridge(input_ids, attention_mask=attention_mask)

Settings follow the papers (SCIENCE.md section 3): Dai et al. (K/V of every layer, SGD, one
epoch, batch 1, causal-LM loss on every demonstration token), Shen et al. (label-token loss,
whole model or W_V of one layer), Deutch et al. (layer-causal GD). See docs/gd.md.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Callable, Sequence

import einops
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from iclgd_lens.errors import IclgdError
from iclgd_lens.record import release_transient_state
from iclgd_lens.tasks import Episode, Example, Task

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

PARAM_SETS = ("kv", "qkvo", "v_single", "all")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("all_tokens", "label_tokens")
ATTN_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "in", "out")
ADAM_BETAS = (0.9, 0.999)  # torch.optim.Adam defaults
ADAM_EPS = 1e-8
IGNORE = -100  # target id of positions that carry no loss

HookFn = Callable[[torch.Tensor, object], torch.Tensor | None]


# ---- configuration --------------------------------------------------------------------------
PRESETS = ("dai", "shen", "shen-single-layer", "deutch")
"""Names `GDConfig.preset` knows (the CLI lists them)."""


@dataclass
class GDConfig:
    """What GD trains, with which optimizer and loss, on which order of demonstrations."""

    params: str = "kv"  # "kv" | "qkvo" | "v_single" | "all" (attn q/k/v/o, mlp gate/in/out, unembedding)
    layer: int | None = None  # the layer of "v_single" (None: the middle layer, n_layers // 2)
    optimizer: str = "sgd"  # "sgd" (momentum 0, no weight decay, no clipping) | "adam" (torch defaults)
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 1  # demonstrations per step, in prompt order
    loss_on: str = "all_tokens"  # "all_tokens" (Dai) | "label_tokens" (Shen)
    layer_causal: bool = False  # Deutch et al.: stop-gradient between layers, early-exit loss per layer
    order_seed: int | None = None  # None: prompt order; int: a seeded permutation of the step order
    delta_dtype: str | None = None  # None: the model's dtype; "float32": fp32 deltas for bf16/fp16 models
    name: str | None = None  # the preset this config came from (for messages and Results.config)

    def __post_init__(self) -> None:
        if self.params not in PARAM_SETS:
            raise IclgdError(f"unknown GD params {self.params!r}; choose one of {', '.join(PARAM_SETS)}")
        if self.layer is not None and self.params != "v_single":
            raise IclgdError(f"GD layer={self.layer} is only used with params='v_single' (got params={self.params!r})")
        if self.optimizer not in OPTIMIZERS:
            raise IclgdError(f"unknown GD optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise IclgdError(f"GD learning rate must be a positive number, got {self.lr!r}")
        if not (isinstance(self.epochs, int) and self.epochs >= 1):
            raise IclgdError(f"GD epochs must be an integer >= 1, got {self.epochs!r}")
        if not (isinstance(self.batch_size, int) and self.batch_size >= 1):
            raise IclgdError(f"GD batch_size must be an integer >= 1, got {self.batch_size!r}")
        if self.loss_on not in LOSSES:
            raise IclgdError(f"unknown GD loss {self.loss_on!r}; choose one of {', '.join(LOSSES)}")
        if self.delta_dtype not in (None, "float32"):
            raise IclgdError(f"GD delta_dtype must be None (the model's dtype) or 'float32', got {self.delta_dtype!r}")

    @classmethod
    def dai(cls, lr: float = 1e-3) -> "GDConfig":
        """Dai et al. 2023: W_K and W_V of every layer, SGD, 1 epoch, batch 1, loss on all tokens."""
        return cls(params="kv", optimizer="sgd", lr=lr, epochs=1, batch_size=1, loss_on="all_tokens", name="dai")

    @classmethod
    def shen(cls, lr: float = 1e-4, epochs: int = 20, layer: int | None = None, params: str = "all") -> "GDConfig":
        """Shen et al. 2024: label-token loss; the whole model ("all") or W_V of one layer ("v_single")."""
        name = "shen-single-layer" if params == "v_single" else "shen"
        return cls(params=params, layer=layer, optimizer="sgd", lr=lr, epochs=epochs, batch_size=1,
                   loss_on="label_tokens", name=name)

    @classmethod
    def deutch(cls, lr: float = 1e-3) -> "GDConfig":
        """Deutch et al. 2024: Dai's setting, trained layer-causally (each layer from its own early exit)."""
        return replace(cls.dai(lr), layer_causal=True, name="deutch")

    @classmethod
    def preset(cls, name: str, **overrides) -> "GDConfig":
        """A named preset ("dai", "shen", "shen-single-layer", "deutch") with fields overridden."""
        presets = {
            "dai": cls.dai,
            "shen": cls.shen,
            "shen-single-layer": lambda: cls.shen(params="v_single"),
            "deutch": cls.deutch,
        }
        assert tuple(presets) == PRESETS
        if name not in presets:
            raise IclgdError(f"unknown GD preset {name!r}; choose one of {', '.join(presets)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise IclgdError(f"unknown GD setting {unknown[0]!r}; settings are {', '.join(sorted(known))}")
        return replace(presets[name](), **overrides)

    def describe(self) -> str:
        """A short name for messages: the preset, or "custom settings"."""
        return f"preset {self.name}" if self.name else "custom settings"


# ---- results --------------------------------------------------------------------------------
@dataclass
class Deltas:
    """Per-episode weight deltas, one tensor per (layer, projection): [n_episodes, d_out, d_in]."""

    tensors: dict[str, torch.Tensor]  # key: the projection's module path ("blocks.3.attn.k", "unembed")
    config: GDConfig
    losses: torch.Tensor  # [n_steps, n_episodes] training loss per step (before the step's update)

    @property
    def n_episodes(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def norms(self) -> dict[str, torch.Tensor]:
        """Frobenius norm of every delta: {path: [n_episodes]}."""
        return {path: torch.linalg.matrix_norm(dw.float()) for path, dw in self.tensors.items()}

    def scaled_random_like(self, seed: int) -> "Deltas":
        """A random update of the same Frobenius norm per tensor and episode (Deutch et al.'s
        baseline): Gaussian directions from a generator seeded with `seed` alone."""
        generator = torch.Generator().manual_seed(seed)
        tensors = {}
        for path, dw in self.tensors.items():
            noise = torch.randn(dw.shape, generator=generator)  # [n_episodes, d_out, d_in]
            scale = torch.linalg.matrix_norm(dw.float()).cpu() / torch.linalg.matrix_norm(noise)  # [n_episodes]
            tensors[path] = (noise * scale[:, None, None]).to(dtype=dw.dtype, device=dw.device)
        return Deltas(tensors, self.config, self.losses.clone())


# ---- which projections ----------------------------------------------------------------------
def projection_paths(config: GDConfig, n_layers: int) -> list[str]:
    """Module paths of the projections `config.params` trains, e.g. "blocks.3.attn.k"."""
    if config.params == "v_single":
        layer = n_layers // 2 if config.layer is None else config.layer
        if not 0 <= layer < n_layers:
            raise IclgdError(f"GD layer {layer} is out of range for a model with {n_layers} layers")
        return [f"blocks.{layer}.attn.v"]
    attn = {"kv": ("k", "v"), "qkvo": ATTN_PROJECTIONS, "all": ATTN_PROJECTIONS}[config.params]
    mlp = MLP_PROJECTIONS if config.params == "all" else ()
    paths = [f"blocks.{l}.attn.{p}" for l in range(n_layers) for p in attn]
    paths += [f"blocks.{l}.mlp.{p}" for l in range(n_layers) for p in mlp]
    return paths + (["unembed"] if config.params == "all" else [])


def _raw_module(model, path: str) -> torch.nn.Module:
    """The HF module behind a bridge component (calling it fires no hooks)."""
    module = model.get_submodule(path)
    return getattr(module, "original_component", module)


def _linear_weight(model, path: str) -> torch.Tensor:
    """The weight [d_out, d_in] of the linear layer at a bridge path."""
    try:
        return _raw_module(model, path).weight
    except AttributeError as exc:
        raise IclgdError(f"the model has no linear projection at {path!r}; is it a LLaMA TransformerBridge?") from exc


def demo_order(k: int, order_seed: int | None) -> list[int]:
    """The order in which GD visits demonstrations 0..k-1: prompt order for None, else a
    permutation from its own `random.Random(order_seed)` (never a shared random state)."""
    order = list(range(k))
    if order_seed is not None:
        random.Random(order_seed).shuffle(order)
    return order


# ---- applying deltas ------------------------------------------------------------------------
def _apply(x: torch.Tensor, dw: torch.Tensor, episodes: list[int], counts: list[int], permute: torch.Tensor | None) -> torch.Tensor:
    """dW x for every row with its own episode's delta.

    x: [batch, pos, d_in]; dw: [n_episodes, d_out, d_in]; rows sorted by episode (after
    `permute`) come in runs `counts` of episode `episodes`. Returns [batch, pos, d_out].
    """
    x = x.to(dw.dtype)
    if permute is not None:
        x = x[permute]
    if episodes == list(range(dw.shape[0])) and len(set(counts)) == 1:  # every episode, equal rows
        grouped = einops.rearrange(x, "(e r) p i -> e r p i", e=len(episodes))
        update = einops.einsum(grouped, dw, "e r p i, e o i -> e r p o")
        update = einops.rearrange(update, "e r p o -> (e r) p o")
    else:
        pieces = x.split(counts)
        update = torch.cat([einops.einsum(piece, dw[e], "r p i, o i -> r p o") for piece, e in zip(pieces, episodes)])
    if permute is not None:
        update = update[torch.argsort(permute)]
    return update


def _hooks_for_tensors(tensors: dict[str, torch.Tensor], row_episode: torch.Tensor) -> list[tuple[str, HookFn]]:
    """The hook_in/hook_out pair per projection that adds dW x (see `delta_hooks`)."""
    if not tensors:
        return []
    n_episodes = next(iter(tensors.values())).shape[0]
    rows = torch.as_tensor(row_episode).detach().cpu()
    if rows.ndim != 1 or rows.dtype not in (torch.int64, torch.int32) or len(rows) == 0:
        raise IclgdError("row_episode must be a 1-D integer tensor with one episode index per batch row")
    if rows.min() < 0 or rows.max() >= n_episodes:
        raise IclgdError(f"row_episode has indices outside 0..{n_episodes - 1} (the deltas hold {n_episodes} episodes)")
    order = torch.argsort(rows, stable=True)
    permute = None if torch.equal(order, torch.arange(len(rows))) else order
    episodes, counts = (t.tolist() for t in torch.unique_consecutive(rows[order], return_counts=True))
    hooks = []
    for path, dw in tensors.items():
        saved: dict[str, torch.Tensor] = {}

        def save_input(x: torch.Tensor, hook, saved=saved) -> None:
            saved["x"] = x  # a reference: the projection's input, no copy

        def add_update(out: torch.Tensor, hook, saved=saved, dw=dw, permute=permute) -> torch.Tensor:
            x = saved.pop("x")
            if x.shape[0] != len(rows):
                raise IclgdError(f"delta hooks were built for batches of {len(rows)} rows, the model ran on {x.shape[0]}")
            if x.ndim == 4:  # attn.o.hook_in is [batch, pos, heads, d_head]
                x = einops.rearrange(x, "b p h d -> b p (h d)")
            update = _apply(x, dw, episodes, counts, permute.to(x.device) if permute is not None else None)
            if out.ndim == 4:  # q/k/v hook_out are [batch, pos, heads, d_head]
                update = einops.rearrange(update, "b p (h d) -> b p h d", h=out.shape[2])
            return out + update.to(out.dtype)

        hooks += [(f"{path}.hook_in", save_input), (f"{path}.hook_out", add_update)]
    return hooks


def delta_hooks(deltas: Deltas, row_episode: torch.Tensor) -> list[tuple[str, HookFn]]:
    """Forward hooks that add dW x to every projection of `deltas`, for a batch whose row b
    belongs to episode `row_episode[b]` ([batch] long tensor).

    Pass them first in `fwd_hooks` so that probes on the same hook points see the updated
    activations: `with bridge.hooks(fwd_hooks=delta_hooks(d, rows) + probes): bridge(ids)`.
    """
    return _hooks_for_tensors(deltas.tensors, row_episode)


# ---- training data --------------------------------------------------------------------------
@dataclass
class _EncodedDemo:
    """One demonstration as a training example: token ids and the target of each position."""

    input_ids: list[int]
    targets: list[int]  # targets[p] = the token predicted from position p, or IGNORE


def _encode_demo(tokenizer, task: Task, demo: Example, label_words: Sequence[str], loss_on: str) -> _EncodedDemo:
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


def _pad_batch(demos: list[_EncodedDemo], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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
        einops.rearrange(logits.float(), "r p v -> (r p) v"), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    token_loss = einops.rearrange(token_loss, "(e rp) -> e rp", e=n_episodes)  # [episodes, rows*pos]
    n_loss_tokens = einops.rearrange(targets != IGNORE, "(e r) p -> e (r p)", e=n_episodes).sum(-1)
    return token_loss.sum(-1) / n_loss_tokens


# ---- training -------------------------------------------------------------------------------
def _forward_losses(model: "TransformerBridge", input_ids, attention_mask, targets, tensors, row_episode, config: GDConfig) -> torch.Tensor:
    """Per-episode loss [n_episodes] of one step, with the current deltas hooked in."""
    n_episodes = next(iter(tensors.values())).shape[0]
    hooks = _hooks_for_tensors(tensors, row_episode)
    if not config.layer_causal:
        with model.hooks(fwd_hooks=hooks):
            logits = model(input_ids, attention_mask=attention_mask)  # [rows, pos, vocab]
        return _episode_losses(logits, targets, n_episodes)

    # Layer-causal (Deutch et al.): h_l = Layer_l(stopgrad(h_{l-1})), loss = sum_l LM loss of
    # the early exit W_U . norm_final(h_l). Norm and unembedding are called as raw HF modules
    # (no hooks fire), plus the unembedding delta when "all" trains it.
    final_norm = _raw_module(model, "ln_final")
    unembed = _raw_module(model, "unembed")
    unembed_hooks = _hooks_for_tensors({"unembed": tensors["unembed"]}, row_episode) if "unembed" in tensors else []
    layer_losses: list[torch.Tensor] = []

    def early_exit_loss(resid: torch.Tensor, hook) -> None:  # resid [rows, pos, d_model]
        normed = final_norm(resid)
        logits = unembed(normed)  # [rows, pos, vocab]
        if unembed_hooks:
            unembed_hooks[0][1](normed, None)
            logits = unembed_hooks[1][1](logits, None)
        layer_losses.append(_episode_losses(logits, targets, n_episodes))

    def stop_gradient(resid: torch.Tensor, hook) -> torch.Tensor:
        return resid.detach()

    n_layers = model.cfg.n_layers
    hooks += [(f"blocks.{l}.hook_resid_pre", stop_gradient) for l in range(1, n_layers)]
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
        raise IclgdError(f"all episodes of one GD run must have the same number of demonstrations, got {sorted(ks)}")
    return ks.pop()


def train_deltas(model: "TransformerBridge", tokenizer, task: Task, episodes: list[Episode], config: GDConfig, *, progress: bool = False) -> Deltas:
    """Fine-tune `config`'s projections on each episode's demonstrations, all episodes at once.

    Every demonstration is one training example (`task.render_demo`, tokenised alone with
    BOS); step t trains on batch t of every episode (chunks of `batch_size` in prompt order,
    or in `demo_order(k, order_seed)`), for `epochs` passes. Loss per episode = mean over its
    loss tokens; the sum over episodes is differentiated with `torch.autograd.grad` w.r.t. the
    deltas only, so the model's parameters, their `.grad` and `requires_grad` are never touched.
    Raises IclgdError if the loss or the deltas stop being finite.
    """
    k = _check_inputs(model, episodes)
    n_episodes, n_layers = len(episodes), model.cfg.n_layers
    paths = projection_paths(config, n_layers)
    weights = {path: _linear_weight(model, path) for path in paths}
    device = weights[paths[0]].device
    tensors = {
        path: torch.zeros((n_episodes, *w.shape), dtype=torch.float32 if config.delta_dtype else w.dtype, device=device)
        for path, w in weights.items()
    }  # each [n_episodes, d_out, d_in]
    adam_m = {path: torch.zeros_like(t) for path, t in tensors.items()} if config.optimizer == "adam" else {}
    adam_v = {path: torch.zeros_like(t) for path, t in tensors.items()} if config.optimizer == "adam" else {}

    encoded = [[_encode_demo(tokenizer, task, d, e.label_words, config.loss_on) for d in e.demos] for e in episodes]
    order = demo_order(k, config.order_seed)
    chunks = [order[i : i + config.batch_size] for i in range(0, k, config.batch_size)] * config.epochs
    steps_per_epoch = max(1, len(chunks) // config.epochs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    try:
        return _train(model, tensors, adam_m, adam_v, encoded, chunks, steps_per_epoch, n_episodes, pad_id, device, config, progress)
    finally:
        release_transient_state(model)


def _train(model, tensors, adam_m, adam_v, encoded, chunks, steps_per_epoch, n_episodes, pad_id, device, config, progress) -> Deltas:
    """The GD loop of `train_deltas` (deltas updated in place)."""
    step_losses = []
    with torch.enable_grad():
        for step, chunk in enumerate(tqdm(chunks, desc="GD", disable=not progress), start=1):
            batch = [encoded[e][i] for e in range(n_episodes) for i in chunk]  # episode-major rows
            row_episode = torch.arange(n_episodes).repeat_interleave(len(chunk))  # [rows]
            input_ids, attention_mask, targets = _pad_batch(batch, pad_id, device)
            leaves = {path: t.detach().requires_grad_(True) for path, t in tensors.items()}
            losses = _forward_losses(model, input_ids, attention_mask, targets, leaves, row_episode, config)
            if not torch.isfinite(losses).all():
                raise IclgdError(_diverged(step, config))
            grads = torch.autograd.grad(losses.sum(), list(leaves.values()), allow_unused=True)
            with torch.no_grad():  # in place: deltas + gradients are the peak memory, nothing more
                for path, grad in zip(leaves, grads):
                    if grad is not None:
                        _update_(tensors[path], grad, path, step, config, adam_m, adam_v)
                if step % steps_per_epoch == 0 and not all(torch.isfinite(t).all() for t in tensors.values()):
                    raise IclgdError(_diverged(step, config))  # checked once an epoch: a per-step check cost 24% of GD time
            del leaves, grads
            step_losses.append(losses.detach().float().cpu())
    losses = torch.stack(step_losses) if step_losses else torch.zeros((0, n_episodes))
    return Deltas(tensors, config, losses)


def _update_(delta: torch.Tensor, grad: torch.Tensor, path: str, step: int, config: GDConfig, adam_m: dict, adam_v: dict) -> None:
    """One optimizer step in place, elementwise (so per episode): plain SGD, or Adam written
    as torch.optim.Adam's single-tensor update (defaults: betas 0.9/0.999, eps 1e-8)."""
    if config.optimizer == "sgd":
        if delta.dtype == torch.float32:
            delta.add_(grad, alpha=-config.lr)  # one pass over memory: the update is memory-bound
        else:
            delta.sub_(grad.mul_(config.lr))  # (not alpha=-lr: a huge lr must overflow to inf in fp16, not raise)
        return
    beta1, beta2 = ADAM_BETAS
    adam_m[path].mul_(beta1).add_(grad, alpha=1 - beta1)
    adam_v[path].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    denom = (adam_v[path].sqrt() / math.sqrt(bias_correction2)).add_(ADAM_EPS)
    delta.sub_(adam_m[path].div(denom).mul_(config.lr / bias_correction1))


def _diverged(step: int, config: GDConfig) -> str:
    return f"GD diverged at step {step} with lr={config.lr:g} ({config.describe()}); lower the learning rate"
