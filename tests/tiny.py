"""Tiny LLaMA models, tokenizers and tasks built in code, for fast offline tests."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from iclgd_lens.tasks import Example, Task

WORDS = [f"w{i}" for i in range(40)] + ["A", "B", "C", "D", ":", "Label"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over WORDS that prepends <s>, with offsets."""
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + WORDS + ["\n"])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(pattern=r"\s+|\n", behavior="isolated")
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        name_or_path="tiny-test",
        add_bos_token=True,
    )


def tiny_hf_model(
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_model: int = 32,
    seed: int = 0,
    vocab_size: int = len(WORDS) + 5,
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=2 * d_model,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_bridge(hf=None, tokenizer=None, **kw):
    """Boot a TransformerBridge over a deep copy of `hf` (the original stays unwrapped)."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = hf if hf is not None else tiny_hf_model(**kw)
    bridge = TransformerBridge.boot_transformers(
        "tiny-test", hf_model=copy.deepcopy(hf), tokenizer=tokenizer or tiny_tokenizer(), device="cpu"
    )
    bridge.eval()
    return bridge


def tiny_task() -> Task:
    """A 2-way task over words w0..w39 with template '{text} :' and labels A/B."""
    examples = [Example(f"w{i} w{(i * 7) % 40}", i % 2) for i in range(40)]
    return Task(
        "tiny", "{text} :", ("A", "B"), train=tuple(examples[:30]), test=tuple(examples[30:]), separator=" "
    )


def tiny_model_folder(folder: Path, tokenizer=None, max_positions: int = 256) -> Path:
    """A random 2-layer LLaMA saved in HF format in `folder`, with `tokenizer` (default: the
    embedded models' tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from iclgd_lens.models.making.tokenizer import build_tokenizer

    tok = tokenizer if tokenizer is not None else build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def spm_like_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer that splits like LLaMA-1/2's SentencePiece: "▁" marks a word after a space and
    the first word of a text (so "w3" alone is "▁w3", after a newline "w3"); "\\n" is a token of
    its own; BOS <s> is prepended; no pad token."""
    pieces = [p for w in WORDS for p in (w, f"▁{w}")] + ["\n", "▁"]
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *pieces])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True),
        ]
    )
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", name_or_path="spm-like"
    )
