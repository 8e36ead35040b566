"""Baselines a similarity must beat before it means anything.

- `random_vector_like`: Dai et al.'s random baseline, r ~ Uniform[0, 1)^d (not zero-mean, so
  it shares the all-positive direction with many activations; that is the published recipe).
- GD replaced by a random update of the same norm (Deutch et al. 2024) is
  `Deltas.scaled_random_like` (engine/gd/deltas.py), next to the deltas it scales.
- `untrained_copy`: the same model with attention and MLP weights re-initialised at random, and
  trained embeddings, norms and unembedding kept (Deutch et al. 2024). A NEW model: the user's
  is never modified. Memory: a second model.
- `untrained_in_place`: the same weights drawn into the model itself for the duration of a
  `with`, the trained ones parked in host memory and put back bitwise on exit (what `compare()`
  uses: on a GPU the device holds one model, not two, and no second bridge is booted).

Each draws from its own torch.Generator (CPU, then moved), so a seed gives the same numbers
on every device and the global random state is not touched.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor, nn

from iclgd_lens.errors import IclgdError


def random_vector_like(h: Tensor, seed: int) -> Tensor:
    """r ~ Uniform[0, 1) with the shape, dtype and device of h (Dai's random baseline). [...] -> [...]"""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(h.shape, generator=gen, dtype=torch.float32).to(dtype=h.dtype, device=h.device)


def _is_bridge(model) -> bool:
    from transformer_lens.model_bridge import TransformerBridge

    return isinstance(model, TransformerBridge)


def _is_attention_or_mlp(module_name: str) -> bool:
    """Linear layers inside a decoder layer's attention or MLP (LLaMA naming)."""
    return ".self_attn." in module_name or ".mlp." in module_name


def untrained_copy(model, seed: int = 0):
    """A new model: attention and MLP linear weights re-drawn at random, the rest kept.

    `model` is a TransformerBridge (returns a new TransformerBridge booted on the copy, same
    tokenizer) or a HF causal LM (returns a new HF model). Linear weights inside `self_attn`
    and `mlp` get N(0, config.initializer_range^2) (HF `_init_weights`), biases 0; embeddings,
    RMSNorm weights and the unembedding keep their trained values (Deutch et al. 2024).
    The input model is left bitwise unchanged. Memory: a second model of the same size.
    """
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from iclgd_lens.models import original_state_dict

    bridge = model if _is_bridge(model) else None
    hf_model = bridge.original_model if bridge is not None else model
    if not isinstance(hf_model, PreTrainedModel):
        raise IclgdError(
            f"untrained_copy needs a TransformerBridge or a HF PreTrainedModel, got {type(model).__name__}"
        )
    first_param = next(hf_model.parameters())
    config = copy.deepcopy(hf_model.config)
    device = first_param.device
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=rng_devices),
        torch.device(device),
    ):  # HF's init draws from the global RNG
        fresh = AutoModelForCausalLM.from_config(config, dtype=first_param.dtype)
    trained = original_state_dict(hf_model)
    wanted = fresh.state_dict()
    missing = [k for k in wanted if k not in trained]
    if missing:
        raise IclgdError(
            f"cannot map the model's weights onto a fresh {type(fresh).__name__}: missing {missing[:3]}"
        )
    fresh.load_state_dict({k: trained[k] for k in wanted}, strict=True)

    n_reinit = 0
    with torch.no_grad():
        for name, weight, has_bias in _untrained_draws(config, seed):
            module = fresh.get_submodule(name)
            module.weight.copy_(weight)
            if has_bias:
                module.bias.zero_()
            n_reinit += 1
    if n_reinit == 0:
        raise IclgdError(
            f"found no attention or MLP linear layers to re-initialise in {type(fresh).__name__}"
        )
    fresh.train(hf_model.training)

    if bridge is None:
        return fresh
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        bridge.cfg.model_name,
        hf_model=fresh,
        tokenizer=bridge.tokenizer,
        device=first_param.device,
        dtype=first_param.dtype,
    )


def _untrained_draws(config, seed: int) -> Iterator[tuple[str, Tensor, bool]]:
    """(HF module name, weight [d_out, d_in] float32, has a bias) of every attention and MLP linear
    layer, in a fresh model's module order, drawn N(0, initializer_range^2) from one CPU generator
    seeded with `seed`: the untrained baseline's weights, the same for `untrained_copy` and
    `untrained_in_place` (the names and shapes come from a weightless model on the meta device)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    std = getattr(config, "initializer_range", None) or 0.02
    gen = torch.Generator().manual_seed(seed)
    for name, module in skeleton.named_modules():
        if isinstance(module, nn.Linear) and _is_attention_or_mlp(name):
            yield name, torch.randn(module.weight.shape, generator=gen) * std, module.bias is not None


@contextmanager
def untrained_in_place(model, seed: int = 0) -> Iterator:
    """The model itself as the untrained baseline, inside a `with`: attention and MLP linear weights
    re-drawn exactly as `untrained_copy(model, seed)` draws them, the rest kept.

        with untrained_in_place(bridge, seed=0) as untrained:   # the same object as `bridge`
            ...                                                 # runs as untrained_copy's model would
        # here bridge's weights are its trained ones again, bitwise

    The trained weights wait in host memory (CPU RAM; on a CPU model: the very tensors) and are
    put back when the block ends, also on an error or Ctrl-C. So a GPU holds one model's weights,
    not two (host memory holds the parked ones), and no second bridge is booted. The model must
    not be used elsewhere (another thread) meanwhile: inside the block it is the untrained model.
    `model` is a TransformerBridge or a HF PreTrainedModel."""
    from transformers import PreTrainedModel

    from iclgd_lens.models import _ORIGINAL

    hf_model = model.original_model if _is_bridge(model) else model
    if not isinstance(hf_model, PreTrainedModel):
        raise IclgdError(
            "untrained_in_place needs a TransformerBridge or a HF PreTrainedModel, "
            f"got {type(model).__name__}"
        )
    offloaded = [name for name, module in hf_model.named_modules() if _is_offloaded(module)]
    if offloaded:  # accelerate would load the trained weights back into these at every forward pass
        raise IclgdError(
            f"the untrained baseline cannot re-draw offloaded weights ({offloaded[0]} is offloaded by "
            "accelerate); load the model without offloading or leave 'untrained' out of the baselines"
        )
    params = {name.replace(_ORIGINAL, ""): p for name, p in hf_model.named_parameters(remove_duplicate=False)}
    parked: list[tuple[nn.Parameter, Tensor]] = []
    try:
        with torch.no_grad():
            for name, weight, has_bias in _untrained_draws(hf_model.config, seed):
                news = [("weight", weight)] + ([("bias", None)] if has_bias else [])
                for suffix, new in news:
                    param = params.get(f"{name}.{suffix}")
                    if param is None:
                        raise IclgdError(f"cannot find {name}.{suffix} in {type(hf_model).__name__}")
                    parked.append((param, param.data if param.device.type == "cpu" else param.data.cpu()))
                    param.data = (
                        torch.zeros_like(param.data)
                        if new is None
                        else new.to(device=param.device, dtype=param.dtype)
                    )
        if not parked:
            raise IclgdError(
                f"found no attention or MLP linear layers to re-initialise in {type(hf_model).__name__}"
            )
        yield model
    finally:
        with torch.no_grad():
            for param, trained in reversed(parked):
                param.data = trained.to(param.device)


def _is_offloaded(module: nn.Module) -> bool:
    """Whether accelerate offloads this module's weights (an AlignDevicesHook with offload on)."""
    hook = getattr(module, "_hf_hook", None)
    return hook is not None and bool(getattr(hook, "offload", False))
