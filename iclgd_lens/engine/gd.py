"""Gradient descent on an episode's demonstrations, as per-episode weight deltas applied by hooks.

The GD condition of a comparison is "the model after fine-tuning on the demonstrations". The
user's model is never changed to get it: every trained projection `W` (a linear layer) gets a
delta `dW` per episode, stored beside the model, and hooks add `dW x` to the projection's
output (`x` is the projection's input, read at its `.hook_in`; the sum is returned at its
`.hook_out`). So B episodes are fine-tuned in lockstep on one shared base model in one batched
forward/backward per step, and the explicit `dW_GD` per layer is a result of its own. With
plain SGD a delta is kept exactly as low-rank factors dW = U V^T (one column per training token)
while that is cheaper than dense, so no dense gradient is ever built (see `Deltas`).

    config = GDConfig.dai()                    # lr None: the task's learning rate (Task.gd_lr)
    deltas = train_deltas(bridge, tokenizer, task, episodes, config)
    with bridge.hooks(fwd_hooks=delta_hooks(deltas, row_episode)):   # the GD condition
        logits = bridge(input_ids, attention_mask=attention_mask)

Settings follow the papers (docs/science.md, section 3): Dai et al. (K/V of every layer, SGD, one
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
from iclgd_lens.models import release_transient_state
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
DEFAULT_LR = 1e-3
"""The learning rate of a config with lr=None on a task that has no `gd_lr` of its own."""
"""Names `GDConfig.preset` knows (the CLI lists them)."""


@dataclass
class GDConfig:
    """What GD trains, with which optimizer and loss, on which order of demonstrations."""

    params: str = "kv"  # "kv" | "qkvo" | "v_single" | "all" (attn q/k/v/o, mlp gate/in/out, unembedding)
    layer: int | None = None  # the layer of "v_single" (None: the middle layer, n_layers // 2)
    optimizer: str = "sgd"  # "sgd" (momentum 0, no weight decay, no clipping) | "adam" (torch defaults)
    lr: float | None = None  # None: the task's learning rate (Task.gd_lr), else DEFAULT_LR; a number always wins
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
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
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
    def dai(cls, lr: float | None = None) -> "GDConfig":
        """Dai et al. 2023: W_K and W_V of every layer, SGD, 1 epoch, batch 1, loss on all tokens."""
        return cls(params="kv", optimizer="sgd", lr=lr, epochs=1, batch_size=1, loss_on="all_tokens", name="dai")

    @classmethod
    def shen(cls, lr: float | None = None, epochs: int = 20, layer: int | None = None, params: str = "all") -> "GDConfig":
        """Shen et al. 2024: label-token loss; the whole model ("all") or W_V of one layer ("v_single")."""
        name = "shen-single-layer" if params == "v_single" else "shen"
        return cls(params=params, layer=layer, optimizer="sgd", lr=lr, epochs=epochs, batch_size=1,
                   loss_on="label_tokens", name=name)

    @classmethod
    def deutch(cls, lr: float | None = None) -> "GDConfig":
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

    def for_task(self, task: Task | None) -> "GDConfig":
        """This config with its learning rate resolved: an explicit `lr` is kept; None takes the
        task's own (`Task.gd_lr`, as Dai et al. tuned one per task), else DEFAULT_LR. A preset
        name and the preset's object therefore train with the same learning rate."""
        if self.lr is not None:
            return self
        task_lr = getattr(task, "gd_lr", None)
        return replace(self, lr=task_lr if task_lr is not None else DEFAULT_LR)

    @classmethod
    def resolve(cls, gd: "GDConfig | str", task: Task | None) -> "GDConfig":
        """A GDConfig or a preset name, with the learning rate resolved for `task` (`for_task`)."""
        config = cls.preset(gd) if isinstance(gd, str) else gd
        if not isinstance(config, GDConfig):
            raise IclgdError(f"gd must be a GDConfig or a preset name ({', '.join(PRESETS)}), got {type(gd).__name__}")
        return config.for_task(task)

    def describe(self) -> str:
        """A short name for messages: the preset, or "custom settings"."""
        return f"preset {self.name}" if self.name else "custom settings"


# ---- results --------------------------------------------------------------------------------
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
        """Frobenius norm of every delta: {path: [n_episodes]} (factors: |U V^T|^2 = sum (U^T U) * (V^T V))."""
        out = {}
        for path, part in self.parts.items():
            if isinstance(part, tuple):
                u, v = (t.float() for t in part)
                gram = (u.mT @ u) * (v.mT @ v)  # [n_episodes, r, r]
                out[path] = gram.sum((-2, -1)).clamp_min(0).sqrt()
            else:
                out[path] = torch.linalg.matrix_norm(part.float())
        return out

    def scaled_random_like(self, seed: int) -> "Deltas":
        """A random update of the same Frobenius norm per tensor and episode (Deutch et al.'s
        baseline): Gaussian directions from a generator seeded with `seed` alone."""
        generator = torch.Generator().manual_seed(seed)
        norms = self.norms()
        tensors = {}
        for path, part in self.parts.items():
            like = part[0] if isinstance(part, tuple) else part
            shape = (like.shape[0], like.shape[1], part[1].shape[1]) if isinstance(part, tuple) else like.shape
            noise = torch.randn(shape, generator=generator)  # [n_episodes, d_out, d_in]
            scale = norms[path].cpu() / torch.linalg.matrix_norm(noise)  # [n_episodes]
            tensors[path] = (noise * scale[:, None, None]).to(dtype=like.dtype, device=like.device)
        return Deltas(tensors, self.config, self.losses.clone())


def _densify(factors: Factors) -> torch.Tensor:
    """U V^T: [n_episodes, d_out, d_in]."""
    u, v = factors
    return u @ v.mT


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
def _apply(x: torch.Tensor, part: "torch.Tensor | Factors", episodes: list[int], counts: list[int], permute: torch.Tensor | None) -> torch.Tensor | None:
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
    parts: dict, row_episode: torch.Tensor, record: dict[str, list] | None = None, applied: dict[str, int] | None = None
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
        raise IclgdError(f"row_episode has indices outside 0..{n_episodes - 1} (the deltas hold {n_episodes} episodes)")
    order = torch.argsort(rows, stable=True)
    permute = None if torch.equal(order, torch.arange(len(rows))) else order
    episodes, counts = (t.tolist() for t in torch.unique_consecutive(rows[order], return_counts=True))
    calls = record.get if record is not None else lambda path: None
    hooks = []
    for path, part in parts.items():
        saved: dict[str, torch.Tensor] = {}

        def save_input(x: torch.Tensor, hook, saved=saved) -> None:
            saved["x"] = x  # a reference: the projection's input, no copy

        def add_update(out: torch.Tensor, hook, saved=saved, part=part, permute=permute, calls=calls(path), path=path) -> torch.Tensor:
            if "x" not in saved:
                raise IclgdError(f"{DELTAS_NOT_APPLIED}: {path}.hook_in did not fire before {path}.hook_out")
            x = saved.pop("x")
            if x.shape[0] != len(rows):
                raise IclgdError(f"delta hooks were built for batches of {len(rows)} rows, the model ran on {x.shape[0]}")
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
            raise IclgdError(f"{DELTAS_NOT_APPLIED}: the update of {path} was added {n} times in one forward pass ({len(wrong)} projection(s) affected)")

    return [*_hooks_for_parts(deltas.parts, row_episode, applied=applied), ("unembed.hook_out", check_all_applied)]


DELTAS_NOT_APPLIED = (
    "the GD deltas were not applied as built (this install of transformer-lens/transformers calls the projection "
    "hooks differently; supported versions: docs/versions.md)"
)


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
LOW_RANK_LIMIT = 1.0
"""SGD keeps a delta as factors while its rank r (training tokens so far) stays at most this
times the break-even rank d_in * d_out / (d_in + d_out), where U (V^T x) costs as much as dW x;
past it the delta is multiplied out and trained dense. 0 trains dense from the start."""


def _requires_grad(resid: torch.Tensor, hook) -> torch.Tensor:
    """A graph root: the residual stream as a leaf that requires grad, so that the gradient of
    every projection's output exists even when the model's parameters do not require grad."""
    return resid.detach().requires_grad_(True)


def _forward_losses(
    model: "TransformerBridge", input_ids, attention_mask, targets, parts, row_episode, config: GDConfig, record: dict, observers=()
) -> torch.Tensor:
    """Per-episode loss [n_episodes] of one step, with the current deltas hooked in (the
    outputs of the low-rank projections go to `record`, see `_hooks_for_parts`). `observers`
    are read-only hooks, registered after the deltas so that they see the updated values."""
    n_episodes = len(torch.unique(row_episode))
    unembed_record = {"unembed": record["unembed"]} if "unembed" in record else None
    hooks = _hooks_for_parts({p: d for p, d in parts.items() if p != "unembed" or not config.layer_causal}, row_episode, record)
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
    unembed_hooks = _hooks_for_parts({"unembed": parts["unembed"]}, row_episode, unembed_record) if "unembed" in parts else []
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
        raise IclgdError(f"all episodes of one GD run must have the same number of demonstrations, got {sorted(ks)}")
    return ks.pop()


def train_deltas(
    model: "TransformerBridge", tokenizer, task: Task, episodes: list[Episode], config: GDConfig, *, progress: bool = False,
    record_queries: bool = False,
) -> Deltas:
    """Fine-tune `config`'s projections on each episode's demonstrations, all episodes at once.

    Every demonstration is one training example (`task.render_demo`, tokenised alone with
    BOS); step t trains on batch t of every episode (chunks of `batch_size` in prompt order,
    or in `demo_order(k, order_seed)`), for `epochs` passes. Loss per episode = mean over its
    loss tokens; the sum over episodes is differentiated with `torch.autograd.grad` w.r.t. the
    deltas (Adam, or SGD past `LOW_RANK_LIMIT`) or w.r.t. the projections' outputs (SGD's
    low-rank factors), so the model's parameters, their `.grad` and `requires_grad` are never
    touched. Raises IclgdError if the loss or the deltas stop being finite.

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
        parts = {path: tuple(torch.zeros((n_episodes, d, 0), dtype=dtypes[path], device=device) for d in w.shape)
                 for path, w in weights.items()}
    else:
        parts = {path: torch.zeros((n_episodes, *w.shape), dtype=dtypes[path], device=device) for path, w in weights.items()}
    adam_m = {path: torch.zeros_like(t) for path, t in parts.items()} if config.optimizer == "adam" else {}
    adam_v = {path: torch.zeros_like(t) for path, t in parts.items()} if config.optimizer == "adam" else {}

    encoded = [[_encode_demo(tokenizer, task, d, e.label_words, config.loss_on) for d in e.demos] for e in episodes]
    order = demo_order(k, config.order_seed)
    chunks = [order[i : i + config.batch_size] for i in range(0, k, config.batch_size)] * config.epochs
    steps_per_epoch = max(1, len(chunks) // config.epochs)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    try:
        queries: dict | None = {} if record_queries else None
        deltas = _train(model, parts, adam_m, adam_v, encoded, chunks, steps_per_epoch, n_episodes, pad_id, device, config, progress, queries)
        if queries is not None:
            deltas.train_queries, deltas.train_token_demo = _stack_train_queries(queries, encoded, n_layers)
        return deltas
    finally:
        release_transient_state(model)


def _train(model, parts, adam_m, adam_v, encoded, chunks, steps_per_epoch, n_episodes, pad_id, device, config, progress, queries=None) -> Deltas:
    """The GD loop of `train_deltas` (dense deltas updated in place, factors extended)."""
    step_losses = []
    calls_per_step = {path: model.cfg.n_layers if path == "unembed" and config.layer_causal else 1 for path in parts}
    with torch.enable_grad():
        for step, chunk in enumerate(tqdm(chunks, desc="GD", disable=not progress), start=1):
            batch = [encoded[e][i] for e in range(n_episodes) for i in chunk]  # episode-major rows
            row_episode = torch.arange(n_episodes).repeat_interleave(len(chunk))  # [rows]
            input_ids, attention_mask, targets = _pad_batch(batch, pad_id, device)
            new_rank = len(chunk) * input_ids.shape[1]  # training tokens per episode this step
            for path, part in parts.items():  # past the break-even rank: multiply out, go on dense
                if isinstance(part, tuple) and part[0].shape[-1] + new_rank * calls_per_step[path] > _rank_limit(part):
                    parts[path] = _densify(part)
            leaves = {path: d.detach().requires_grad_(True) for path, d in parts.items() if not isinstance(d, tuple)}
            record = {path: [] for path, part in parts.items() if isinstance(part, tuple)}
            observers = _query_observers(queries, chunk, n_episodes, model.cfg.n_layers) if queries is not None else ()
            losses = _forward_losses(model, input_ids, attention_mask, targets, {**parts, **leaves}, row_episode, config, record, observers)
            if not torch.isfinite(losses).all():
                raise IclgdError(_diverged(step, config))
            outputs = [out for calls in record.values() for _, out in calls]
            grads = torch.autograd.grad(losses.sum(), [*leaves.values(), *outputs], allow_unused=True)
            with torch.no_grad():  # in place: deltas + gradients are the peak memory, nothing more
                for path, grad in zip(leaves, grads):
                    if grad is not None:
                        _update_(parts[path], grad, path, step, config, adam_m, adam_v)
                output_grads = iter(grads[len(leaves) :])
                for path, calls in record.items():
                    parts[path] = _extend(parts[path], [(x, next(output_grads)) for x, _ in calls], n_episodes, config.lr)
                if step % steps_per_epoch == 0 and not all(_is_finite(part) for part in parts.values()):
                    raise IclgdError(_diverged(step, config))  # checked once an epoch: a per-step check cost 24% of GD time
            del leaves, grads, record, outputs
            step_losses.append(losses.detach().float().cpu())
    losses = torch.stack(step_losses) if step_losses else torch.zeros((0, n_episodes))
    return Deltas(parts, config, losses)


def _query_observers(store: dict, chunk: list[int], n_episodes: int, n_layers: int) -> list[tuple[str, HookFn]]:
    """Hooks that keep each training row's query vectors: store[(episode, demo, layer)] =
    q [pos, n_heads, d_head] of that row (padded; cut to length later). A later epoch overwrites."""

    def make(layer: int) -> HookFn:
        def keep(q: torch.Tensor, hook) -> None:  # [rows, pos, n_heads, d_head], rows episode-major
            q = q.detach()
            for row in range(q.shape[0]):
                store[(row // len(chunk), chunk[row % len(chunk)], layer)] = q[row].clone()

        return keep

    return [(f"blocks.{layer}.attn.hook_q", make(layer)) for layer in range(n_layers)]


def _stack_train_queries(store: dict, encoded: list[list[_EncodedDemo]], n_layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per episode: queries of the training tokens in demonstration order, BOS excluded
    ([n_layers, n_tokens, n_heads, d_head]), and each token's demonstration 1..k ([n_tokens])."""
    queries, token_demo = [], []
    for e, demos in enumerate(encoded):
        per_layer = [torch.cat([store[(e, i, layer)][1 : len(d.input_ids)] for i, d in enumerate(demos)]) for layer in range(n_layers)]
        queries.append(torch.stack(per_layer))
        token_demo.append(torch.cat([torch.full((len(d.input_ids) - 1,), i + 1, dtype=torch.long) for i, d in enumerate(demos)]))
    return queries, token_demo


def _rank_limit(factors: Factors) -> float:
    """The largest rank kept low-rank: LOW_RANK_LIMIT x the break-even rank d_in d_out / (d_in + d_out)."""
    d_out, d_in = factors[0].shape[1], factors[1].shape[1]
    return LOW_RANK_LIMIT * d_in * d_out / (d_in + d_out)


def _extend(factors: Factors, calls: list[tuple[torch.Tensor, torch.Tensor | None]], n_episodes: int, lr: float) -> Factors:
    """One SGD step on low-rank factors: dW -= lr * sum over tokens of g x^T, i.e. append
    (-lr g, x) of every training token to (U, V). x [rows, pos, d_in]; g [rows, pos, d_out]
    (or [rows, pos, heads, d_head]); rows episode-major. Padding tokens have g = 0 (right
    padding, causal mask) and are kept, so every episode gets the same rank."""
    u, v = factors
    new_u, new_v = [u], [v]
    for x, g in calls:
        if g is None:  # the output did not reach the loss
            continue
        g = einops.rearrange(g.reshape(*g.shape[:2], -1), "(e r) p o -> e o (r p)", e=n_episodes)
        new_u.append(g.to(u.dtype).mul_(-lr))  # (not alpha=-lr: a huge lr must overflow to inf in fp16, not raise)
        new_v.append(einops.rearrange(x, "(e r) p i -> e i (r p)", e=n_episodes).to(v.dtype))
    return torch.cat(new_u, -1), torch.cat(new_v, -1)


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
    bound = torch.linalg.vector_norm(u.float(), dim=-1).amax() * torch.linalg.vector_norm(v.float(), dim=-1).amax()
    return bool(bound < torch.finfo(u.dtype).max) or bool(torch.isfinite(_densify(part)).all())


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
