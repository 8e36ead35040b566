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

config.py (what is trained, presets), deltas.py (the deltas and the hooks that apply them),
train.py (the training loop). Settings follow the papers (docs/science.md, section 3): Dai et
al. (K/V of every layer, SGD, one epoch, batch 1, causal-LM loss on every demonstration
token), Shen et al. (label-token loss, whole model or W_V of one layer), Deutch et al.
(layer-causal GD). See docs/gd.md.
"""

from iclgd_lens.engine.gd.config import (
    ATTN_PROJECTIONS,
    DEFAULT_LR,
    LOSSES,
    MLP_PROJECTIONS,
    OPTIMIZERS,
    PARAM_SETS,
    PRESETS,
    GDConfig,
    demo_order,
    projection_paths,
)
from iclgd_lens.engine.gd.deltas import DELTAS_NOT_APPLIED, Deltas, Factors, delta_hooks
from iclgd_lens.engine.gd.train import LOW_RANK_LIMIT, train_deltas

__all__ = [
    "ATTN_PROJECTIONS",
    "DEFAULT_LR",
    "LOSSES",
    "MLP_PROJECTIONS",
    "OPTIMIZERS",
    "PARAM_SETS",
    "PRESETS",
    "GDConfig",
    "demo_order",
    "projection_paths",
    "DELTAS_NOT_APPLIED",
    "Deltas",
    "Factors",
    "delta_hooks",
    "LOW_RANK_LIMIT",
    "train_deltas",
]
