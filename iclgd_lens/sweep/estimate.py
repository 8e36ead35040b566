"""Work and memory of a cell before anything runs (the sweep's --dry-run), from the model's
config, weight-file headers and tokenizer alone: no weights are loaded.

Work is `compare.estimate_flops` (2 x parameters x tokens over every condition); memory is the
predicted peak of `engine.memory` (weights, GD deltas, activations of the largest phase) for the
cell's sizes and batch size.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from types import SimpleNamespace

from iclgd_lens.errors import IclgdError
from iclgd_lens.sweep.run import Planned

ELEMENT_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float64": 8}
_PROJECTIONS = {
    "kv": ("k_proj", "v_proj"),
    "qkvo": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "v_single": ("v_proj",),
}


def _model_folder(name: str) -> Path | None:
    from iclgd_lens.models import EMBEDDED_MODELS, embedded_model_path

    if name in EMBEDDED_MODELS:
        return embedded_model_path(name)
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        return None


@lru_cache(maxsize=16)
def _shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from the safetensors headers (no tensor is read)."""
    from safetensors import SafetensorError, safe_open

    out: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    out[key] = tuple(handle.get_slice(key).get_shape())
        except SafetensorError as error:  # as load_model says it
            raise IclgdError(
                f"cannot read the weights of {folder} ({file.name} is damaged or incomplete: {error})"
            ) from None
    return out


@lru_cache(maxsize=16)
def _tokenizer(folder: str):
    from transformers import AutoTokenizer

    from iclgd_lens.models import prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(folder))


def estimate(planned: Planned, task) -> dict:
    """{"tflop", "memory_gb", "n_params", "cannot_run"} of one cell (None where the model is not
    on this machine). `cannot_run`: why `compare` would refuse the cell before any work (its
    prompts do not fit the model's context window: the checks `compare` makes), else None."""
    import torch

    from iclgd_lens.engine.compare import estimate_flops
    from iclgd_lens.engine.gd import GDConfig
    from iclgd_lens.models import read_folder_config

    folder = _model_folder(planned.cell.model)
    shapes = _shapes(str(folder)) if folder is not None else {}
    if not shapes:
        return {"tflop": None, "memory_gb": None, "n_params": None, "cannot_run": None}
    n_params = sum(_numel(s) for s in shapes.values())
    hf_config = read_folder_config(
        folder
    )  # one line for a config transformers refuses or another architecture
    config = json.loads((folder / "config.json").read_text())
    cell = planned.cell
    gd = GDConfig.resolve(cell.gd.config(), task)
    baselines = cell.setting("baselines")
    untrained = baselines is True or (isinstance(baselines, list) and "untrained" in baselines)
    stand_in = SimpleNamespace(  # what compare's checks and estimate_flops read of a model
        tokenizer=_tokenizer(str(folder)),
        cfg=SimpleNamespace(n_ctx=config.get("max_position_embeddings")),
        parameters=lambda: iter([torch.empty(n_params, device="meta")]),
    )
    refusal = _refusal(stand_in, config, task, cell, gd, untrained)
    if refusal is not None:
        return {"tflop": None, "memory_gb": None, "n_params": n_params, "cannot_run": refusal}
    episodes = task.episodes(cell.k, cell.setting("n_episodes"), cell.setting("n_queries"), cell.seed)
    flops = estimate_flops(stand_in, task, episodes, gd, untrained)
    element = ELEMENT_BYTES.get(str(cell.setting("dtype", "float32")), 4)
    try:
        memory = _memory_model(folder, hf_config, element, n_params, task, episodes, cell, gd, baselines)
    except ImportError:  # an older engine without the memory model: weights and GD deltas only
        memory = _weights_and_deltas(
            shapes, config, n_params, element, gd, untrained, cell.setting("n_episodes")
        )
    return {"tflop": flops / 1e12, "memory_gb": memory / 2**30, "n_params": n_params, "cannot_run": None}


def _refusal(stand_in, config: dict, task, cell, gd, untrained: bool) -> str | None:
    """The error `compare` would raise before any work because the cell's prompts do not fit the
    context window (`check_k_fits`, `check_prompts_fit` on the cell's own episodes), its GD
    trains a layer the model does not have (`projection_paths`), or its least possible work is
    beyond the device (`check_least_work`, before any episode is drawn), or None. `stand_in`: the
    cell's model as those checks read it (tokenizer, context window, parameter count)."""
    from iclgd_lens.engine.compare import check_k_fits, check_least_work, check_prompts_fit
    from iclgd_lens.engine.gd.config import projection_paths
    from iclgd_lens.errors import IclgdError

    tokenizer_log = logging.getLogger("transformers.tokenization_utils_base")
    level = tokenizer_log.level
    tokenizer_log.setLevel(logging.ERROR)  # "sequence length is longer than...": said here, as a refusal
    try:
        projection_paths(gd, int(config["num_hidden_layers"]))
        check_k_fits(stand_in.tokenizer, stand_in.cfg.n_ctx, task, cell.k)
        n_episodes, n_queries = cell.setting("n_episodes"), cell.setting("n_queries")
        device = str(cell.setting("device")).split(":")[0]
        if cell.setting("check_resources"):
            check_least_work(
                stand_in,
                task,
                cell.k,
                n_episodes,
                n_queries,
                gd,
                untrained,
                device,
                override="set check_resources = false in the spec to run it anyway",
            )
        episodes = task.episodes(cell.k, n_episodes, n_queries, cell.seed)
        check_prompts_fit(stand_in, task, episodes)
    except IclgdError as err:
        return str(err)
    finally:
        tokenizer_log.setLevel(level)
    return None


def _memory_model(
    folder: Path, hf_config, element: int, n_params: int, task, episodes, cell, gd, baselines
) -> int:
    """`engine.memory.plan_compare`'s predicted peak (weights included) for this cell, on a
    stand-in model that has the real config, tokenizer and parameter count but no weights."""
    import torch

    from iclgd_lens.engine.memory import plan_compare

    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}.get(element, torch.float32)
    hf = SimpleNamespace(
        config=hf_config,
        parameters=lambda: iter([torch.empty(n_params, dtype=dtype, device="meta")]),
    )
    stand_in = SimpleNamespace(original_model=hf, tokenizer=_tokenizer(str(folder)))
    plan = plan_compare(
        stand_in,
        task,
        gd=gd,
        k=cell.k,
        n_episodes=cell.setting("n_episodes"),
        n_queries=cell.setting("n_queries"),
        seed=cell.seed,
        probes=cell.setting("probes"),
        baselines=baselines,
        batch_size=cell.setting("batch_size"),
        device=str(cell.setting("device")).split(":")[0],
    )
    return plan.total_bytes


def _weights_and_deltas(shapes, config, n_params, element, gd, untrained, n_episodes) -> int:
    """Weights (twice with the untrained baseline) and every episode's GD deltas with gradients."""
    if gd.params == "all":
        trained = n_params
    else:
        names = _PROJECTIONS[gd.params]
        trained = sum(
            _numel(s) for k, s in shapes.items() if k.endswith(".weight") and k.split(".")[-2] in names
        )
        if gd.params == "v_single":
            trained //= max(1, int(config.get("num_hidden_layers", 1)))
    copies = 3 if gd.optimizer == "adam" else 2
    delta = 4 if gd.delta_dtype else element
    return n_params * element * (2 if untrained else 1) + trained * n_episodes * delta * copies


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
