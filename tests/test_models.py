"""load_model: every source through one path, the caller's model left alone, clear errors.

All offline: tiny random LLaMAs and a word-level tokenizer built here; the hub path runs the
real `from_pretrained("org/name")` against a fake HF cache in a tmp folder (offline mode).
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import iclgd_lens.models as loader
from iclgd_lens.errors import IclgdError
from iclgd_lens.models import SUPPORTED_ARCHITECTURES, load_model, model_info, original_state_dict

torch.set_num_threads(1)
WORDS = ["Sentence:", "Label:", "good", "bad", "film", "a", "dull", "fun"]


def tokenizer(
    pad: bool = True, bos_post_processor: bool = True, add_bos_token: bool = True, bos: bool = True
) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos_post_processor:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    kwargs = dict(eos_token="</s>", unk_token="<unk>", name_or_path="test-words", add_bos_token=add_bos_token)
    if bos:
        kwargs["bos_token"] = "<s>"
    if pad:
        kwargs["pad_token"] = "<pad>"
    return PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)


def hf_llama(n_heads: int = 4, n_kv_heads: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(WORDS) + 4,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def saved_folder(path: Path, hf=None, tok=None) -> Path:
    (hf or hf_llama()).save_pretrained(path)
    (tok or tokenizer()).save_pretrained(path)
    return path


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def is_wrapped(model: torch.nn.Module) -> bool:
    return any("_original_component" in name for name, _ in model.named_modules())


IDS = torch.tensor([[1, 4, 9, 6, 10, 5], [1, 11, 8, 7, 4, 5]])  # [batch, pos], BOS first


def max_logit_gap(bridge, hf: LlamaForCausalLM) -> float:
    with torch.no_grad():
        return (bridge(IDS) - hf(IDS).logits).abs().max().item()


# ---- in memory --------------------------------------------------------------------------
def test_in_memory_copy_leaves_the_callers_model_and_tokenizer_alone():
    hf, tok = hf_llama(), tokenizer(pad=False)
    before, attn_impl = snapshot(hf), hf.config._attn_implementation
    bridge = load_model(hf_model=hf, tokenizer=tok, device="cpu")
    assert bitwise_equal(snapshot(hf), before)
    assert not is_wrapped(hf) and type(hf.model.layers[0].self_attn).__name__ == "LlamaAttention"
    assert hf.config._attn_implementation == attn_impl
    assert bridge.original_model is not hf and is_wrapped(bridge.original_model)
    assert bitwise_equal(original_state_dict(bridge), before)
    assert not bridge.training and not bridge.original_model.training
    assert tok.pad_token is None  # the caller's tokenizer is untouched ...
    assert bridge.tokenizer.pad_token == "</s>"  # ... the bridge's copy pads with EOS
    assert max_logit_gap(bridge, hf) <= 1e-5


def test_in_memory_without_copy_wraps_the_callers_model_in_place():
    hf = hf_llama()
    before = snapshot(hf)
    bridge = load_model(hf_model=hf, tokenizer=tokenizer(), device="cpu", copy_hf_model=False)
    assert bridge.original_model is hf and is_wrapped(hf)
    assert set(hf.state_dict()) != set(before)  # the keys gained ._original_component
    assert bitwise_equal(original_state_dict(bridge), before)  # the weights themselves are unchanged
    fresh = LlamaForCausalLM(hf.config)  # the undo docs/models.md gives: a plain HF model again
    fresh.load_state_dict(original_state_dict(bridge))
    assert bitwise_equal(fresh.state_dict(), before) and not is_wrapped(fresh)
    with pytest.raises(IclgdError, match="already wrapped by a TransformerBridge"):
        load_model(hf_model=hf, tokenizer=tokenizer(), device="cpu")


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_bridge_logits_equal_hf_eager_logits_with_and_without_gqa(n_heads, n_kv_heads):
    hf = hf_llama(n_heads, n_kv_heads, seed=n_kv_heads)
    bridge = load_model(hf_model=hf, tokenizer=tokenizer(), device="cpu")
    assert bridge.cfg.n_heads == n_heads
    assert (bridge.cfg.n_key_value_heads or n_heads) == n_kv_heads  # the bridge leaves it None without GQA
    assert max_logit_gap(bridge, hf) <= 1e-5
    info = model_info(bridge)
    assert info["n_kv_heads"] == n_kv_heads and info["n_heads"] == n_heads and info["d_head"] == 32 // n_heads
    assert info["n_params"] == sum(p.numel() for p in hf.parameters())
    assert (info["dtype"], info["device"], info["n_layers"], info["d_vocab"]) == (
        "float32",
        "cpu",
        2,
        len(WORDS) + 4,
    )
    assert info["name"] == "in-memory-llama" or info["name"] == hf.name_or_path


@pytest.mark.parametrize("dtype", ["bf16", "bfloat16", torch.bfloat16])
def test_bf16_runs_with_bf16_parameters(dtype):
    hf = hf_llama()
    bridge = load_model(hf_model=hf, tokenizer=tokenizer(), device="cpu", dtype=dtype)
    assert {p.dtype for p in bridge.original_model.parameters()} == {torch.bfloat16}
    assert model_info(bridge)["dtype"] == "bfloat16"
    assert next(hf.parameters()).dtype == torch.float32  # the caller's copy keeps its dtype
    with torch.no_grad():
        logits = bridge(IDS)
        reference = hf(IDS).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_label_and_n_ctx(caplog):
    """n_ctx sets the window prompts are checked against, with no TransformerLens warning that it
    "may not have taken effect" (TL's n_ctx= targets the HF config, which a model passed in keeps)."""
    with caplog.at_level("WARNING"):
        bridge = load_model("my-llama", hf_model=hf_llama(), tokenizer=tokenizer(), device="auto", n_ctx=32)
    assert bridge.cfg.model_name == "my-llama" and bridge.cfg.n_ctx == 32
    assert not [r for r in caplog.records if "n_ctx" in r.getMessage()], caplog.text
    with pytest.raises(IclgdError, match="n_ctx must be a positive integer"):
        load_model(hf_model=hf_llama(), tokenizer=tokenizer(), n_ctx=0)


def test_tokenizer_without_add_bos_is_fixed_on_a_copy():
    tok = tokenizer(bos_post_processor=False, add_bos_token=False)
    assert tok("good film")["input_ids"][0] != tok.bos_token_id
    bridge = load_model(hf_model=hf_llama(), tokenizer=tok, device="cpu")
    assert bridge.tokenizer("good film")["input_ids"][0] == tok.bos_token_id
    assert tok("good film")["input_ids"][0] != tok.bos_token_id  # caller's object unchanged


# ---- local folder and hub name ------------------------------------------------------------
def test_local_folder(tmp_path):
    hf = hf_llama(n_kv_heads=1, seed=3)
    folder = saved_folder(tmp_path / "tiny", hf)
    bridge = load_model(str(folder), device="cpu")
    assert bridge.cfg.model_name == str(folder)
    assert bitwise_equal(original_state_dict(bridge), snapshot(hf))
    assert max_logit_gap(bridge, hf) <= 1e-5
    assert bridge.tokenizer("good film")["input_ids"] == [1, 6, 8]


def fake_hub_cache(root: Path, repo_id: str, folder: Path) -> None:
    """Lay `folder` out the way huggingface_hub caches a downloaded repo."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "snapshots" / commit).mkdir(parents=True)
    for file in folder.iterdir():
        (repo / "snapshots" / commit / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty HF cache in tmp_path and offline mode: from_pretrained(org/name) reads only the cache."""
    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hub_name_goes_through_from_pretrained(tmp_path, offline_hub, monkeypatch):
    hf = hf_llama(seed=5)
    fake_hub_cache(offline_hub, "org/tiny-llama", saved_folder(tmp_path / "saved", hf))
    sources = []
    real = LlamaForCausalLM.from_pretrained.__func__

    def spy(cls, source, *args, **kwargs):
        sources.append(source)
        return real(cls, source, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "from_pretrained", classmethod(spy))
    bridge = load_model("org/tiny-llama", device="cpu")
    assert sources == ["org/tiny-llama"]  # the hub id itself, not a resolved folder
    assert bridge.cfg.model_name == "org/tiny-llama"
    assert max_logit_gap(bridge, hf) <= 1e-5


def test_hub_errors_say_offline_gated_or_not_found(offline_hub, monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    with pytest.raises(IclgdError, match="cannot reach the Hugging Face hub to load 'org/absent'"):
        load_model("org/absent", device="cpu")

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(
        "iclgd_lens.models._hub_reachable", lambda *args, **kwargs: True
    )  # a hub that answers
    response = types.SimpleNamespace(headers={}, request=None)
    for error, message in [
        (
            GatedRepoError("403 gated", response=response),
            r"'meta-llama/Llama-2-7b-hf' is a gated hub model: request access",
        ),
        (
            RepositoryNotFoundError("404", response=response),
            r"model 'org/typo' not found on the Hugging Face hub",
        ),
    ]:

        def download(*args, _error=error, **kwargs):
            raise _error

        monkeypatch.setattr("transformers.utils.hub.hf_hub_download", download)
        name = "meta-llama/Llama-2-7b-hf" if isinstance(error, GatedRepoError) else "org/typo"
        with pytest.raises(IclgdError, match=message) as info:
            load_model(name, device="cpu")
        assert "\n" not in str(info.value)


# ---- user errors ---------------------------------------------------------------------------
def test_unknown_names(tmp_path):
    with pytest.raises(
        IclgdError, match=r"unknown model 'tiny-llama-ilc' \(did you mean 'tiny-llama-icl'\?\)"
    ):
        load_model("tiny-llama-ilc")
    with pytest.raises(IclgdError, match="not an existing folder"):
        load_model(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(IclgdError, match="has no config.json"):
        load_model(str(tmp_path))
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(IclgdError, match="is a file, not a model folder"):
        load_model(str(tmp_path / "weights.bin"))


def test_missing_tokenizer(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path / "no-tok")
    with pytest.raises(IclgdError, match="has no tokenizer files.*pass tokenizer="):
        load_model(str(tmp_path / "no-tok"))
    assert load_model(str(tmp_path / "no-tok"), tokenizer=tokenizer(), device="cpu").cfg.n_layers == 2
    with pytest.raises(IclgdError, match="hf_model was given without its tokenizer"):
        load_model(hf_model=hf)


def test_non_llama_architecture(tmp_path):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=12, n_positions=32))
    with pytest.raises(
        IclgdError,
        match=f"hf_model is a GPT2LMHeadModel; iclgd-lens supports {SUPPORTED_ARCHITECTURES[0]} only",
    ):
        load_model(hf_model=gpt2, tokenizer=tokenizer())
    saved_folder(tmp_path / "gpt2", gpt2)
    with pytest.raises(IclgdError, match="is a GPT2LMHeadModel; iclgd-lens supports LlamaForCausalLM only"):
        load_model(str(tmp_path / "gpt2"))


def test_bad_dtype_device_and_tokenizer():
    hf, tok = hf_llama(), tokenizer()
    with pytest.raises(IclgdError, match="unsupported dtype 'int8'; use one of float32, fp32, bfloat16"):
        load_model(hf_model=hf, tokenizer=tok, dtype="int8")
    with pytest.raises(IclgdError, match="unsupported dtype"):
        load_model(hf_model=hf, tokenizer=tok, dtype=torch.complex64)
    with pytest.raises(IclgdError, match="unknown device 'gpu'"):
        load_model(hf_model=hf, tokenizer=tok, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(IclgdError, match="CUDA is not available"):
            load_model(hf_model=hf, tokenizer=tok, device="cuda")
    with pytest.raises(IclgdError, match="the tokenizer has no BOS token"):
        load_model(hf_model=hf, tokenizer=tokenizer(bos=False, bos_post_processor=False))
    with pytest.raises(IclgdError, match="tokenizer must be a transformers tokenizer"):
        load_model(hf_model=hf, tokenizer="test-words")
    small = hf_llama()
    small.resize_token_embeddings(len(tok) - 2)  # ids past the embedding: an index error in GD otherwise
    with pytest.raises(
        IclgdError, match=rf"the tokenizer has {len(tok)} tokens but the model's embedding has"
    ):
        load_model(hf_model=small, tokenizer=tok)
    assert not is_wrapped(hf)


def test_every_error_is_one_line(tmp_path):
    attempts = [
        lambda: load_model("nope"),
        lambda: load_model(hf_model=hf_llama()),
        lambda: load_model(hf_model=hf_llama(), tokenizer=tokenizer(), dtype="half-ish"),
    ]
    for attempt in attempts:
        with pytest.raises(IclgdError) as info:
            attempt()
        assert "\n" not in str(info.value) and str(info.value)


# ---- the shipped models ----------------------------------------------------------------------
@pytest.mark.parametrize("name", loader.EMBEDDED_MODELS)
def test_embedded_model_loads_by_name(name):
    folder = Path(loader.__file__).parent / name
    if not (folder / "config.json").is_file():
        pytest.skip(f"shipped model {name} not trained yet (no {folder}/config.json)")
    bridge = load_model(name, device="cpu")
    info = model_info(bridge)
    assert info["name"] == name and info["dtype"] == "float32"
    assert bitwise_equal(original_state_dict(bridge), snapshot(LlamaForCausalLM.from_pretrained(folder)))
    ids = bridge.tokenizer("a", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == bridge.tokenizer.bos_token_id
    with torch.no_grad():
        assert torch.isfinite(bridge(ids)).all()


def test_an_unreachable_hub_is_one_line_in_seconds(offline_hub, monkeypatch):
    """Online mode but no network (this sandbox): no minutes of retries, one line, fast."""
    import time

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr("iclgd_lens.models._hub_reachable", lambda *args, **kwargs: False)
    started = time.perf_counter()
    with pytest.raises(IclgdError, match="cannot reach the Hugging Face hub to load 'org/absent'") as info:
        load_model("org/absent", device="cpu")
    assert time.perf_counter() - started < 5 and "\n" not in str(info.value)


def test_a_damaged_weights_file_is_one_line(tmp_path):
    folder = saved_folder(tmp_path / "saved", hf_llama())
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # truncated
    with pytest.raises(IclgdError, match="damaged or incomplete") as info:
        load_model(str(folder), device="cpu")
    assert "\n" not in str(info.value)


def test_a_config_that_transformers_refuses_is_one_line(tmp_path):
    """HF validates a config as it reads it (an odd head_dim cannot be rotated by RoPE); its own
    error type is not an OSError, and must still come out as one line naming the folder."""
    import json

    from tiny import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "odd")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "head_dim": 15}))
    with pytest.raises(IclgdError, match=f"cannot read the config of folder {folder}"):
        load_model(str(folder))
