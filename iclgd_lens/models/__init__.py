"""Load a LLaMA as a TransformerLens `TransformerBridge`: the shipped tiny models, a local
folder, a hub name, or a model already in memory.

Every source ends in the same call, `TransformerBridge.boot_transformers(name, hf_model=...,
tokenizer=..., device=...)`, on a model that is already in the requested dtype and on the
requested device, in eval mode, with eager attention (so `hook_attn_scores` / `hook_pattern`
fire). We never call `enable_compatibility_mode()`: the bridge keeps the raw HF weights and
numerics, which is what the GD comparison is defined against.

Booting wraps the HF modules in place (their state_dict keys gain `._original_component.`
segments). `original_state_dict(bridge)` gives the weights back under their HF names.
"""

from __future__ import annotations

import copy
import difflib
import os
import socket
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerBase

from iclgd_lens.errors import IclgdError

SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM",)
"""HF architectures iclgd-lens loads (LLaMA 1/2/3 checkpoints, with or without GQA)."""

EMBEDDED_MODELS: tuple[str, ...] = ("tiny-llama-icl", "tiny-llama-iclobj")
"""Names of the tiny LLaMAs shipped inside this package (folders next to this file)."""

DEFAULT_MODEL = "tiny-llama-icl"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,  # reference runs (HF keeps RMSNorm, softmax, RoPE angles in fp32)
}
"""Accepted dtype spellings. Quantized (int8/int4) models are not supported: GD needs real weights."""

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
_ORIGINAL = "._original_component"

__all__ = [
    "load_model",
    "original_state_dict",
    "model_info",
    "embedded_model_path",
    "resolve_dtype",
    "resolve_device",
    "prepare_tokenizer",
    "release_transient_state",
    "SUPPORTED_ARCHITECTURES",
    "EMBEDDED_MODELS",
    "DTYPES",
]


# ---- small resolvers ------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """`"float32"`/`"fp32"`, `"bfloat16"`/`"bf16"`, `"float16"`/`"fp16"` or one of those torch dtypes."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.lower().removeprefix("torch.")]
    raise IclgdError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`None` or `"auto"`: CUDA when available, else CPU. Raises if the device does not exist here."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise IclgdError(f"unknown device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise IclgdError(
                f"device {device!r} requested but CUDA is not available on this machine; "
                "use the device cpu or auto"
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise IclgdError(
                f"device {device!r} does not exist: "
                f"this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    elif resolved.type == "mps" and not torch.backends.mps.is_available():
        raise IclgdError(f"device {device!r} requested but MPS is not available on this machine")
    elif resolved.type not in ("cpu", "cuda", "mps"):
        raise IclgdError(f"unsupported device {device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'")
    return resolved


def embedded_model_path(name: str) -> Path:
    """The folder of a shipped tiny model (raises if the name is not one or it is not installed)."""
    if name not in EMBEDDED_MODELS:
        raise IclgdError(f"{name!r} is not an embedded model; embedded models: {', '.join(EMBEDDED_MODELS)}")
    path = Path(__file__).parent / name
    if not (path / "config.json").is_file():
        raise IclgdError(
            f"embedded model {name!r} is not installed (no config.json in {path}); reinstall iclgd-lens"
        )
    return path


def _resolve_source(name: str) -> str:
    """An embedded name -> its folder; a local folder -> itself; `org/name` -> the hub id."""
    if name in EMBEDDED_MODELS:
        return str(embedded_model_path(name))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IclgdError(
                f"folder {path} has no config.json; it is not a HF model folder (save_pretrained writes one)"
            )
        return str(path)
    if path.exists():
        raise IclgdError(f"{name} is a file, not a model folder; pass the folder that holds config.json")
    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(("/", "\\")) or name.count("/") > 1
    if looks_like_path or "/" not in name:
        close = difflib.get_close_matches(name, EMBEDDED_MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise IclgdError(
            f"unknown model {name!r}{hint}: not an embedded model ({', '.join(EMBEDDED_MODELS)}), "
            "not an existing folder, and not a hub id of the form org/name"
        )
    return name  # a hub id; from_pretrained resolves it (network or HF cache)


def _hub_error(name: str, error: Exception) -> IclgdError:
    """Turn a failed hub lookup into one line: gated / not found / no network / other."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    chain, exc = [], error
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    if any(isinstance(e, GatedRepoError) for e in chain):
        return IclgdError(
            f"{name!r} is a gated hub model: request access at https://huggingface.co/{name} "
            "and log in (hf auth login or HF_TOKEN)"
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return IclgdError(
            f"model {name!r} not found on the Hugging Face hub (nor as a local folder); check the name"
        )
    if any(
        isinstance(e, (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError))
        for e in chain
    ) or any("connect" in type(e).__name__.lower() for e in chain):
        return IclgdError(
            f"cannot reach the Hugging Face hub to load {name!r} and it is not in the local HF cache; "
            "connect to the network, or download it once and pass its local folder"
        )
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return IclgdError(f"could not load {name!r}: {first_line}")


def _hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers within `timeout_s` (False at once in offline mode),
    so that a missing network is one line in seconds, not minutes of retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def _check_architecture(config, label: str) -> None:
    """Raise unless the HF config describes a supported architecture."""
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:
        supported = any(a in SUPPORTED_ARCHITECTURES for a in architectures)
    else:
        supported = getattr(config, "model_type", None) == "llama"
        architectures = [f"model_type={getattr(config, 'model_type', None)!r}"]
    if not supported:
        raise IclgdError(
            f"{label} is a {', '.join(architectures)}; "
            f"iclgd-lens supports {', '.join(SUPPORTED_ARCHITECTURES)} only"
        )
    n_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(n_layers, int) and n_layers < 1:
        raise IclgdError(f"{label} has num_hidden_layers={n_layers}; a comparison needs at least one layer")


# ---- tokenizer --------------------------------------------------------------------------
def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` ready for the bridge; the caller's object is never changed.

    On the copy: a missing pad token is set to the EOS token; `add_bos_token` is switched on
    if the tokenizer does not prepend BOS by itself; padding is on the right; a tokenizer
    built in code gets a `name_or_path` if it has none. Raises IclgdError if the tokenizer
    still does not prepend BOS (every prompt of the papers starts with `<bos>`).
    """
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        raise IclgdError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    tok = copy.deepcopy(tokenizer)
    if tok.bos_token is None or tok.bos_token_id is None:
        raise IclgdError(
            "the tokenizer has no BOS token; iclgd-lens prompts start with <bos> "
            "(set bos_token=... when building it)"
        )
    if not tok.name_or_path:
        tok.name_or_path = "in-memory-tokenizer"
    tok.init_kwargs["name_or_path"] = tok.name_or_path  # TransformerLens reads it from init_kwargs
    if not _prepends_bos(tok):
        try:
            tok.add_bos_token = True
        except (AttributeError, ValueError, NotImplementedError):
            pass
    if not _prepends_bos(tok):
        raise IclgdError(
            f"tokenizer {tok.name_or_path!r} does not prepend BOS and cannot be made to; "
            "build it with add_bos_token=True or a post-processor that adds the BOS token"
        )
    tok.init_kwargs["add_bos_token"] = True  # tells TransformerLens not to reload it from the hub
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise IclgdError(
                "the tokenizer has neither a pad nor an EOS token; set pad_token=... when building it"
            )
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def _prepends_bos(tokenizer: PreTrainedTokenizerBase) -> bool:
    ids = tokenizer("a")["input_ids"]
    return len(ids) >= 1 and ids[0] == tokenizer.bos_token_id


# ---- loading ----------------------------------------------------------------------------
def read_folder_config(folder: str | Path):
    """The HF config of a model folder, checked to be a supported architecture; one line
    (IclgdError) when it cannot be read, including when transformers' own validation refuses it
    (e.g. an odd head_dim, which RoPE cannot rotate)."""
    try:
        config = AutoConfig.from_pretrained(str(folder))
    except Exception as error:  # OSError, ValueError, huggingface_hub's validation errors
        reason = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        raise IclgdError(f"cannot read the config of folder {folder}: {reason[:300]}") from None
    _check_architecture(config, repr(str(folder)))
    return config


def _load_pretrained(
    source: str, dtype: torch.dtype, tokenizer
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """`from_pretrained` on a local folder or a hub id; config first so a wrong architecture
    fails before gigabytes of weights are read."""
    from safetensors import SafetensorError

    is_folder = Path(source).is_dir()
    local = {}
    if (
        not is_folder
    ):  # a hub id: the local HF cache first; the network only if it is there, checked in seconds
        try:
            AutoConfig.from_pretrained(source, local_files_only=True)
            local = {"local_files_only": True}
        except (OSError, ValueError):
            if not _hub_reachable():
                raise IclgdError(
                    f"cannot reach the Hugging Face hub to load {source!r} (no network, "
                    "or HF_HUB_OFFLINE is set), it is not in the local HF cache, and there is no folder "
                    f"{source} here; check the path, connect to the network, "
                    "or download it once and pass its local folder"
                ) from None
    if is_folder:
        config = read_folder_config(source)
    else:
        try:
            config = AutoConfig.from_pretrained(source, **local)
        except Exception as error:  # OSError, ValueError, and the config's own validation
            raise _hub_error(source, error) from None
        _check_architecture(config, repr(source))
    if tokenizer is None and is_folder and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        raise IclgdError(
            f"folder {source} has no tokenizer files ({', '.join(_TOKENIZER_FILES)}); "
            "save the tokenizer there or pass tokenizer=..."
        )
    if is_folder:  # transformers reports an unreadable weights file as a missing one
        for file in sorted(Path(source).iterdir()):
            if file.suffix in (".safetensors", ".bin") and not os.access(file, os.R_OK):
                raise IclgdError(f"cannot read the weights file {file}: permission denied")
    try:
        hf_model = LlamaForCausalLM.from_pretrained(
            source, config=config, dtype=dtype, attn_implementation="eager", **local
        )
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(source, **local)
    except SafetensorError as error:  # a truncated or garbled weights file
        raise IclgdError(
            f"cannot read the weights of {source} (model.safetensors is damaged or incomplete: {error})"
        ) from None
    except (OSError, ValueError) as error:
        if is_folder:
            raise IclgdError(f"cannot load folder {source}: {str(error).splitlines()[0]}") from None
        raise _hub_error(source, error) from None
    except RuntimeError as error:  # transformers: weights whose shapes config.json does not give
        if "mismatched" not in str(error):  # anything else (out of memory, ...) is not this
            raise
        raise IclgdError(
            f"cannot load {source}: its weights do not match its config.json "
            f"({str(error).splitlines()[0][:200]})"
        ) from None
    return hf_model, tokenizer


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    hf_model: LlamaForCausalLM | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    copy_hf_model: bool = True,
    n_ctx: int | None = None,
):
    """Load a LLaMA and return it booted as a `TransformerBridge` in eval mode.

    Sources, by `name`:
      - an embedded name (`"tiny-llama-icl"`, `"tiny-llama-iclobj"`): the tiny models shipped
        with the package, offline;
      - a local folder in HF format (`save_pretrained` output: config.json, weights, tokenizer);
      - a hub id `org/name` (e.g. `"meta-llama/Llama-2-7b-hf"`): `LlamaForCausalLM.from_pretrained`
        and `AutoTokenizer.from_pretrained`, which need the network (and access, for gated
        repos) unless the model is already in the HF cache;
      - `hf_model=` an in-memory `LlamaForCausalLM` with its `tokenizer=`; `name` is then only a
        label for reports (the default label is the model's `name_or_path`).

    `device`: "cpu", "cuda", "cuda:N", or None/"auto" (CUDA when available). `dtype`:
    "float32"/"fp32" (default), "bfloat16"/"bf16", "float16"/"fp16", "float64"/"fp64". `n_ctx` overrides the
    context length recorded in `bridge.cfg.n_ctx` (RoPE models run past it, untrained).

    Booting changes the HF model it wraps: submodules are replaced by bridge wrappers (HF
    state_dict keys gain `._original_component.`), attention is switched to eager, and the
    weights are cast/moved to `dtype`/`device`. With `copy_hf_model=True` (default) an
    in-memory `hf_model` is deep-copied first, so the caller's model is left exactly as it
    was (same modules, bitwise-equal state_dict); this needs memory for a second copy. With
    `copy_hf_model=False` (for 7B models) the caller's own object is cast and moved in place,
    switched to eager attention and to eval mode, and its submodules are wrapped: afterwards
    use the returned bridge (`bridge.original_model` is that same object) and read its
    weights through `original_state_dict(bridge)`.

    The tokenizer is always copied (the caller's is never changed); on the copy a missing
    pad token is set to EOS and BOS prepending is switched on (see `prepare_tokenizer`).
    """
    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    if n_ctx is not None and (not isinstance(n_ctx, int) or n_ctx <= 0):
        raise IclgdError(f"n_ctx must be a positive integer, got {n_ctx!r}")
    if hf_model is not None:
        if not isinstance(hf_model, torch.nn.Module) or not hasattr(hf_model, "config"):
            raise IclgdError(
                f"hf_model must be a transformers LlamaForCausalLM, got {type(hf_model).__name__}"
            )
        if type(hf_model).__name__ not in SUPPORTED_ARCHITECTURES:
            raise IclgdError(
                f"hf_model is a {type(hf_model).__name__}; "
                f"iclgd-lens supports {', '.join(SUPPORTED_ARCHITECTURES)} only"
            )
        if any(_ORIGINAL.lstrip(".") in n for n, _ in hf_model.named_modules()):
            raise IclgdError(
                "hf_model is already wrapped by a TransformerBridge; "
                "pass a fresh HF model (or use that bridge)"
            )
        if tokenizer is None:
            raise IclgdError("hf_model was given without its tokenizer; pass tokenizer=... as well")
        label = (
            name if name != DEFAULT_MODEL else (getattr(hf_model, "name_or_path", "") or "in-memory-llama")
        )
        if copy_hf_model:
            hf_model = copy.deepcopy(hf_model)
    else:
        label = name
        hf_model, tokenizer = _load_pretrained(_resolve_source(name), torch_dtype, tokenizer)
    tokenizer = prepare_tokenizer(tokenizer)
    _check_vocab(tokenizer, hf_model)
    return _boot(label, hf_model, tokenizer, torch_device, torch_dtype, n_ctx)


def _check_vocab(tokenizer, hf_model) -> None:
    """Every id the tokenizer can give must have a row in the model's embedding; otherwise the
    first forward pass fails deep inside torch (an index error in GD's training)."""
    n_tokens, n_rows = len(tokenizer), int(hf_model.get_input_embeddings().weight.shape[0])
    if n_tokens > n_rows:
        raise IclgdError(
            f"the tokenizer has {n_tokens} tokens but the model's embedding has {n_rows} rows; "
            "pass the tokenizer the model was trained with"
        )


def _boot(label: str, hf_model, tokenizer, device: torch.device, dtype: torch.dtype, n_ctx: int | None):
    """The one path every source ends in: cast, move, eval, boot."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.utilities.multi_gpu import maybe_cast_floating_params

    maybe_cast_floating_params(hf_model, dtype)  # parameters only: RoPE inv_freq stays float32
    hf_model.to(device)
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers(
        label, hf_model=hf_model, tokenizer=tokenizer, device=str(device), dtype=dtype
    )
    if n_ctx is not None:  # only the recorded window changes (prompts are checked against it); TL's own
        bridge.cfg.n_ctx = n_ctx  # n_ctx= targets the HF config, which a model passed in keeps, and warns so
    bridge.eval()
    return bridge


# ---- inspection -------------------------------------------------------------------------
def original_state_dict(bridge) -> dict[str, torch.Tensor]:
    """The wrapped HF model's weights under their original HF names (no `._original_component`).

    `bridge` is a TransformerBridge or a HF model (booted by a bridge or not). The tensors are
    the live weights (not copies): clone before changing them. Bridge aliases of the same
    tensors (e.g. `self_attn.q.weight` beside `self_attn.q_proj.weight`) are dropped, keeping
    exactly the keys a fresh HF model of that class has.
    """
    model = getattr(bridge, "original_model", bridge)
    with torch.device("meta"):
        reference_keys = list(type(model)(copy.deepcopy(model.config)).state_dict())
    by_hf_name = {key.replace(_ORIGINAL, ""): value for key, value in model.state_dict().items()}
    missing = [k for k in reference_keys if k not in by_hf_name]
    if missing:
        raise IclgdError(f"cannot map the bridge's weights back to HF names; missing {missing[:3]}")
    return {k: by_hf_name[k] for k in reference_keys}


def release_transient_state(model) -> None:
    """Drop the residual TransformerLens' attention bridges keep from the last forward pass.

    The bridge stashes each block's pre-norm input (`_captured_pre_ln_residual`); after a pass
    with gradients it is a graph-holding tensor that breaks `copy.deepcopy(model)` and keeps
    activations alive. Recording (engine/record.py) and GD (engine/gd/train.py) leave the model as
    they found it, so they clear it.
    """
    for module in model.modules():
        if getattr(module, "_captured_pre_ln_residual", None) is not None:
            module._captured_pre_ln_residual = None


def model_info(bridge) -> dict:
    """Name, sizes, dtype, device and parameter count of a booted model, for reports."""
    cfg = bridge.cfg
    first = next(bridge.original_model.parameters())
    return {
        "name": cfg.model_name,
        "n_layers": cfg.n_layers,
        "d_model": cfg.d_model,
        "n_heads": cfg.n_heads,
        "n_kv_heads": getattr(cfg, "n_key_value_heads", None) or cfg.n_heads,
        "d_head": cfg.d_head,
        "d_vocab": cfg.d_vocab,
        "n_ctx": cfg.n_ctx,
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
        "n_params": sum(p.numel() for p in bridge.original_model.parameters()),
    }
