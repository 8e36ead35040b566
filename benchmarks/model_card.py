"""Re-measure the k-shot accuracy curve of the shipped tiny models (the numbers of docs/model-card.md).

    python benchmarks/model_card.py [--episodes 100] [--queries 4] [--seed 0]

Loads each shipped folder with `LlamaForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`,
draws held-out 2-way episodes with fresh label assignments (`corpus.default_task`), and prints
a markdown table of accuracy per k (argmax over the episode's two label words), plus a summary
of each model's training log.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import typer
from transformers import AutoTokenizer, LlamaForCausalLM

from iclgd_lens.corpus import default_task
from iclgd_lens.evaluation import kshot_accuracy

MODELS_DIR = Path(__file__).resolve().parents[1] / "iclgd_lens" / "models"
MODEL_NAMES = ("tiny-llama-icl", "tiny-llama-iclobj")
KS = (0, 1, 2, 4, 8, 16)


def training_summary(folder: Path) -> str:
    """One line from training_log.json: steps, time, loss at start and end (mean of 50 steps)."""
    log = json.loads((folder / "training_log.json").read_text())
    losses = log["losses"]
    first, last = sum(losses[:50]) / len(losses[:50]), sum(losses[-50:]) / len(losses[-50:])
    return (
        f"{log['model']}: {log['n_parameters']:,} parameters, {len(losses)} steps, seed {log['seed']}, "
        f"{log['train_seconds']:.0f}s, loss {first:.3f} (first 50 steps) -> {last:.3f} (last 50 steps)"
    )


def main(episodes: int = 100, queries: int = 4, seed: int = 0, threads: int = 1) -> None:
    """Print the k-shot curve of each shipped model."""
    torch.set_num_threads(threads)
    task = default_task()
    rows = {}
    for name in MODEL_NAMES:
        folder = MODELS_DIR / name
        if not (folder / "config.json").exists():
            print(f"{name}: not shipped ({folder})")
            continue
        print(training_summary(folder))
        model = LlamaForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        start = time.time()
        rows[name] = kshot_accuracy(model, tokenizer, task, KS, episodes, queries, seed=seed)
        print(f"  measured in {time.time() - start:.1f}s")
    n = episodes * min(queries, 6)
    print(f"\nk-shot accuracy, 2-way, {episodes} episodes x {min(queries, 6)} queries = {n} queries per k, seed {seed}:\n")
    print("| model | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    for name, acc in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * acc[k]:.1f}%" for k in KS) + " |")


if __name__ == "__main__":
    typer.run(main)
