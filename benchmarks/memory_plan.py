"""The 7B plan of docs/performance.md: the memory model's peak for LLaMa-2-7B in bf16 on one 80 GB
GPU, default compare() (every probe and baseline) on SST-2 at k = 32, with the batch size it
picks for a 60 GB budget, and the least FLOPs the comparison needs with the time that takes.

    python benchmarks/memory_plan.py [--max-memory-gb 60] [--n-queries 6 --n-queries 64]

No weights are loaded: the shape is LLaMa-2-7B's config (meta-llama/Llama-2-7b-hf) and the prompts
are SST-2-like sentences of 12-40 words under a word-level tokenizer, one token per word, which
matches SST-2's length under the LLaMA tokenizer (about 25 tokens a sentence, up to ~60; a
demonstration "Review: ... Sentiment: positive" adds 5). Time is FLOPs / an assumed sustained
rate (a fraction of H100 SXM's 989 TFLOP/s dense bf16); benchmarks/gpu_check.sh measures it.
"""

from __future__ import annotations

import random
import sys
from pathlib import Path

import typer
from transformers import LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_check import LLAMA_7B  # noqa: E402
from machine import minimum_flops  # noqa: E402

from iclgd_lens.engine import memory  # noqa: E402
from iclgd_lens.tasks import Example, Task  # noqa: E402

H100_BF16_DENSE = 989e12


def sst2_task(n_words: int = 2000, seed: int = 0) -> tuple[Task, object]:
    """SST-2's format and length distribution (one token per word), with its own word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    words = [f"w{i}" for i in range(n_words)]
    examples = [
        Example(
            " ".join(rng.choice(words) for _ in range(min(40, max(12, int(rng.gauss(24, 8)))))),
            rng.randint(0, 1),
        )
        for _ in range(1200)
    ]
    vocab = {
        w: i
        for i, w in enumerate(
            ["<unk>", "<s>", "</s>", "<pad>", "Review:", "Sentiment:", "negative", "positive", "\n", *words]
        )
    }
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    task = Task(
        "sst2-length",
        "Review: {text} Sentiment:",
        ("negative", "positive"),
        train=tuple(examples[:1000]),
        test=tuple(examples[1000:]),
        separator="\n",
    )
    return task, tokenizer


def main(
    max_memory_gb: float = typer.Option(60, help="the budget in GiB (2^30 bytes), weights included"),
    n_queries: list[int] = typer.Option([6, 64], help="queries per demo set (compare's default is 6)"),
    k: int = typer.Option(32),
    n_episodes: int = typer.Option(8),
) -> None:
    task, tokenizer = sst2_task()
    config = LlamaConfig(**LLAMA_7B)
    shape = memory.ModelShape.from_config(config, bytes_per_element=2)
    print(
        f"# LLaMa-2-7B shape, bf16, {shape.n_params / 1e9:.2f}B parameters; default compare, k={k}, "
        f"{n_episodes} demo sets; budget {max_memory_gb:g} GiB (GiB = 2^30 bytes throughout)"
    )
    for q in n_queries:
        plan = memory.plan_for_shape(
            shape,
            tokenizer,
            task,
            k=k,
            n_episodes=n_episodes,
            n_queries=q,
            max_memory=int(max_memory_gb * 2**30),
        )
        unchunked = memory.plan_for_shape(
            shape, tokenizer, task, k=k, n_episodes=n_episodes, n_queries=q, batch_size=128
        )
        episodes = task.episodes(k, n_episodes, q, 0)
        flops = minimum_flops(config, tokenizer, task, episodes, baselines=True)
        lengths = memory.lengths_of(tokenizer, task, episodes)
        print(f"\n## {n_episodes} demo sets x {q} queries (prefix up to {lengths.prefix} tokens)\n")
        print(
            f"batch_size 128: {unchunked.total_bytes / 2**30:.1f} GiB; chosen batch_size {plan.batch_size}: "
            f"{plan.total_bytes / 2**30:.1f} GiB ({'fits' if plan.fits else 'does NOT fit'})"
        )
        print(plan.describe())
        for share in (0.3, 0.5):
            print(
                f"least work {flops / 1e12:.0f} TFLOP: {flops / (share * H100_BF16_DENSE):.0f} s at "
                f"{share:.0%} of an H100's dense bf16 peak"
            )


if __name__ == "__main__":
    typer.run(main)
