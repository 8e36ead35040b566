"""What GD trains, with which optimizer, loss and learning rate: `GDConfig`, the papers'
presets, the projections a config trains (`projection_paths`) and the order of steps
(`demo_order`). Settings follow docs/science.md, section 3; see docs/gd.md."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, fields, replace

from iclgd_lens.errors import IclgdError
from iclgd_lens.tasks import Task

PARAM_SETS = ("kv", "qkvo", "v_single", "all")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("all_tokens", "label_tokens")
ATTN_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "in", "out")


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
    lr: float | None = (
        None  # None: the task's learning rate (Task.gd_lr), else DEFAULT_LR; a number always wins
    )
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
            raise IclgdError(
                f"GD layer={self.layer} is only used with params='v_single' (got params={self.params!r})"
            )
        if self.optimizer not in OPTIMIZERS:
            raise IclgdError(
                f"unknown GD optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}"
            )
        if self.lr is not None and not (
            isinstance(self.lr, (int, float))
            and not isinstance(self.lr, bool)
            and math.isfinite(self.lr)
            and self.lr > 0
        ):
            raise IclgdError(f"GD learning rate must be a positive number, got {self.lr!r}")
        for name in ("epochs", "batch_size"):  # a bool is not a count
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise IclgdError(f"GD {name} must be an integer >= 1, got {value!r}")
        if self.layer is not None and not (isinstance(self.layer, int) and not isinstance(self.layer, bool)):
            raise IclgdError(f"GD layer must be an integer or None, got {self.layer!r}")
        if not isinstance(self.layer_causal, bool):  # "false" and "yes" are both truthy
            raise IclgdError(f"GD layer_causal must be true or false (a boolean), got {self.layer_causal!r}")
        if self.loss_on not in LOSSES:
            raise IclgdError(f"unknown GD loss {self.loss_on!r}; choose one of {', '.join(LOSSES)}")
        if self.delta_dtype is not None:  # "float32", "fp32", "torch.float32" or torch.float32
            spelled = str(self.delta_dtype).lower().removeprefix("torch.")
            if spelled not in ("float32", "fp32"):
                raise IclgdError(
                    f"GD delta_dtype must be None (the model's dtype) or 'float32', got {self.delta_dtype!r}"
                )
            self.delta_dtype = "float32"

    @classmethod
    def dai(cls, lr: float | None = None) -> "GDConfig":
        """Dai et al. 2023: W_K and W_V of every layer, SGD, 1 epoch, batch 1, loss on all tokens."""
        return cls(
            params="kv", optimizer="sgd", lr=lr, epochs=1, batch_size=1, loss_on="all_tokens", name="dai"
        )

    @classmethod
    def shen(
        cls, lr: float | None = None, epochs: int = 20, layer: int | None = None, params: str = "all"
    ) -> "GDConfig":
        """Shen et al. 2024: label-token loss; the whole model ("all") or W_V of one layer ("v_single")."""
        name = "shen-single-layer" if params == "v_single" else "shen"
        return cls(
            params=params,
            layer=layer,
            optimizer="sgd",
            lr=lr,
            epochs=epochs,
            batch_size=1,
            loss_on="label_tokens",
            name=name,
        )

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
        if not isinstance(name, str) or name not in presets:
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
            raise IclgdError(
                f"gd must be a GDConfig or a preset name ({', '.join(PRESETS)}), got {type(gd).__name__}"
            )
        return config.for_task(task)

    def describe(self) -> str:
        """A short name for messages: the preset, or "custom settings"."""
        return f"preset {self.name}" if self.name else "custom settings"


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


def demo_order(k: int, order_seed: int | None) -> list[int]:
    """The order in which GD visits demonstrations 0..k-1: prompt order for None, else a
    permutation from its own `random.Random(order_seed)` (never a shared random state)."""
    order = list(range(k))
    if order_seed is not None:
        random.Random(order_seed).shuffle(order)
    return order
