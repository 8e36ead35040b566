"""Re-measure the k-shot accuracy curve of the shipped tiny models (the numbers of docs/model-card.md).

    python benchmarks/model_card.py [--episodes 100] [--queries 4] [--seed 0]

Loads each shipped folder with `LlamaForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`,
draws held-out 2-way episodes with fresh label assignments (`corpus.default_task`), and prints
a markdown table of accuracy per k (argmax over the episode's two label words), plus a summary
of each model's training log: parameters and size, training time, the loss curve (means over
50 steps) and the k-shot checks made during training, plus the length of a 16-shot prompt and the
label loss a perfect in-context learner would still have on the iclobj training prompts.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
import typer
from transformers import AutoTokenizer, LlamaForCausalLM

from iclgd_lens.models.making.evaluation import kshot_accuracy
from iclgd_lens.models.making.tokenizer import build_tokenizer
from iclgd_lens.models.making.training import make_batch
from iclgd_lens.tasks.mapping import World, default_task

MODELS_DIR = Path(__file__).resolve().parents[1] / "iclgd_lens" / "models"
MODEL_NAMES = ("tiny-llama-icl", "tiny-llama-iclobj")
KS = (0, 1, 2, 4, 8, 16)
LOSS_WINDOWS = {  # the 50-step windows of the model card's loss curves, by the step they end at
    "tiny-llama-icl": (50, 250, 500, 1000, 1250, 1500, 1750, 2000),
    "tiny-llama-iclobj": (50, 250, 600, 1000, 1300, 1500, 2000),
}


def training_summary(folder: Path) -> str:
    """One line from training_log.json: steps, time, loss at start and end (mean of 50 steps)."""
    log = json.loads((folder / "training_log.json").read_text())
    losses = log["losses"]
    first, last = sum(losses[:50]) / len(losses[:50]), sum(losses[-50:]) / len(losses[-50:])
    cpu = log.get("train_cpu_seconds")
    cpu_text = f", {cpu:.0f}s CPU ({cpu / len(losses):.2f}s per step, {cpu / 60:.0f} min)" if cpu else ""
    lines = [
        f"{log['model']}: {log['n_parameters']:,} parameters ({4 * log['n_parameters'] / 1e6:.1f} MB in "
        f"float32), {len(losses)} steps, seed {log['seed']}, {log['train_seconds']:.0f}s wall "
        f"clock{cpu_text}, loss {first:.3f} (first 50 steps) -> {last:.3f} (last 50 steps)",
        "  loss, mean over the 50 steps ending at step: "
        + ", ".join(
            f"{end}: {sum(losses[end - 50 : end]) / 50:.3f}"
            for end in LOSS_WINDOWS.get(log["model"], ())
            if end <= len(losses)
        ),
    ]
    checks = log.get("kshot_during_training", [])
    if checks:
        ks = sorted({int(k) for c in checks for k in c["accuracy"]})
        lines.append("  k-shot checks during training | step " + " | ".join(f"{c['step']:,}" for c in checks))
        for k in ks:
            lines.append(
                f"    {k}-shot | " + " | ".join(f"{100 * c['accuracy'][str(k)]:.0f}%" for c in checks)
            )
    return "\n".join(lines)


def oracle_label_loss(seq_len: int = 128, n_sequences: int = 4000, seed: int = 0) -> float:
    """Label-token loss of a model that knows every label of an iclobj training prompt except
    those it cannot know: the first line of the first category (ln 16) and of the second
    (ln 15: the other 15 words), mean over every label target as in training."""
    world = World()
    tokenizer = build_tokenizer(world)
    ids, targets = make_batch("iclobj", world, tokenizer, random.Random(seed), n_sequences, seq_len)
    n_words = len(world.label_words)
    total, count = 0.0, 0
    for row in targets.tolist():
        seen = []
        for t in row:
            if t == -100:
                continue
            count += 1
            if t not in seen:
                total += math.log(n_words - len(seen))
                seen.append(t)
    return total / count


def main(episodes: int = 100, queries: int = 4, seed: int = 0, threads: int = 1) -> None:
    """Print the k-shot curve of each shipped model."""
    torch.set_num_threads(threads)
    task = default_task()
    episode = task.episodes(16, 1, 1, seed=seed)[0]
    tokenizer = build_tokenizer(World())
    prompt = task.icl_prompt(episode.demos, episode.queries[0], episode.label_words)
    print(
        f"a 16-shot prompt of the default task: {len(tokenizer(prompt)['input_ids'])} tokens (BOS included)"
    )
    print(
        "label loss of a perfect in-context learner on iclobj's 128-token training prompts: "
        f"{oracle_label_loss():.3f}\n"
    )
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
    print(
        f"\nk-shot accuracy, 2-way, {episodes} episodes x {min(queries, 6)} queries = {n} queries per k, "
        f"seed {seed}:\n"
    )
    print("| model | " + " | ".join(f"k={k}" for k in KS) + " |")
    print("|---|" + "---|" * len(KS))
    for name, acc in rows.items():
        print(f"| {name} | " + " | ".join(f"{100 * acc[k]:.1f}%" for k in KS) + " |")


if __name__ == "__main__":
    typer.run(main)
