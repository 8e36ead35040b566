"""The shipped tiny models do what the model card says: no 0-shot skill, strong 8-shot ICL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from iclgd_lens.models.making.evaluation import kshot_accuracy
from iclgd_lens.tasks.mapping import default_task

torch.set_num_threads(1)

MODELS = Path(__file__).resolve().parents[1] / "iclgd_lens" / "models"
N_EPISODES, N_QUERIES = 60, 4  # 240 queries per k: a 50% model lands within 10 points w.p. > 99.8%


def load(name: str):
    folder = MODELS / name
    if not (folder / "config.json").exists():
        pytest.fail(f"{name} is not shipped in {folder}")
    return LlamaForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder), folder


@pytest.mark.parametrize("name", ["tiny-llama-icl", "tiny-llama-iclobj"])
def test_zero_shot_is_chance_and_eight_shot_is_learned(name):
    model, tokenizer, _ = load(name)
    # a seed the model card does not use: fresh held-out episodes
    acc = kshot_accuracy(model, tokenizer, default_task(), (0, 8), N_EPISODES, N_QUERIES, seed=12345)
    assert abs(acc[0] - 0.5) <= 0.10, acc
    assert acc[8] >= 0.90, acc


@pytest.mark.parametrize("name", ["tiny-llama-icl", "tiny-llama-iclobj"])
def test_shipped_folder_is_small_llama_with_gqa_and_a_training_log(name):
    model, tokenizer, folder = load(name)
    size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    assert size <= 10 * 2**20
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.max_position_embeddings >= 128
    log = json.loads((folder / "training_log.json").read_text())
    assert len(log["losses"]) == log["config"]["steps"] and log["seed"] == log["config"]["seed"]
    if "train_cpu_seconds" in log:  # the cost on an idle core (wall time depends on the machine's load)
        assert log["train_cpu_seconds"] <= 20 * 60
    ids = tokenizer("cow = alpha", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id and tokenizer.pad_token_id is not None
    # 16-shot prompts fit the context window
    episode = default_task().episodes(16, 1, 1, seed=0)[0]
    prompt = default_task().icl_prompt(episode.demos, episode.queries[0], episode.label_words)
    assert len(tokenizer(prompt)["input_ids"]) <= cfg.max_position_embeddings


def test_accuracy_is_the_same_through_the_transformer_bridge():
    models = pytest.importorskip("iclgd_lens.models")
    hf_model, tokenizer, _ = load("tiny-llama-icl")
    bridge = models.load_model("tiny-llama-icl", device="cpu")
    task = default_task()
    # k=0 is near chance, so predictions there are query-specific: equal accuracies mean equal argmaxes
    on_hf = kshot_accuracy(hf_model, tokenizer, task, (0, 2), 25, 4, seed=7)
    on_bridge = kshot_accuracy(bridge, tokenizer, task, (0, 2), 25, 4, seed=7)
    assert on_hf == on_bridge
