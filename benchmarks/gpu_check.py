"""The GPU check: a randomly initialised LLaMA-7B-shaped model (no download) through the default
compare() at k = 32 on SST-2-like prompts (max_memory = 60 GB: the memory model picks the batch
size), with time per demo set and peak GPU memory beside the memory model's prediction, plus the
agreement of a small float32 config between the GPU and the CPU.

    python benchmarks/gpu_check.py              # on a machine with CUDA (about 5 minutes on one H100/H200)
    python benchmarks/gpu_check.py --dry-run    # anywhere: the plan, and the small config on the CPU only

Prints one `key: value` line per figure. `benchmarks/gpu_check.sh` runs it with the thread and
allocator settings the figures are measured with.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
from importlib import metadata
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from iclgd_lens import GDConfig, Task, compare, load_model
from iclgd_lens.engine import memory
from iclgd_lens.engine.gd import train_deltas
from iclgd_lens.engine.record import Recorder
from iclgd_lens.tasks import Example, encode_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import phase_times  # noqa: E402

PHASES = ("total_s", "gd_s", "passes_s", "tables_s", "rest_s")

VERSIONS_SHOWN = ("torch", "transformers", "transformer-lens", "tokenizers", "huggingface_hub")
"""Printed first: on the device machine torch is the image's, the rest the carried wheels'."""

MAX_MEMORY = 60 * 2**30
"""The budget of the 7B plan (docs/performance.md): compare() picks its batch size to fit it."""

LLAMA_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
)
SMALL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=4096,
)


def sst2_like_task(tokenizer_words: int = 200) -> Task:
    """Two-way sentiment prompts in Dai's SST-2 format with made-up sentences of 8-16 words."""
    import random

    rng = random.Random(0)
    words = [f"w{i}" for i in range(tokenizer_words)]
    examples = [
        Example(" ".join(rng.choice(words) for _ in range(rng.randint(8, 16))), rng.randint(0, 1))
        for _ in range(400)
    ]
    return Task(
        "sst2-like",
        "Sentence: {text} Label:",
        ("Negative", "Positive"),
        train=tuple(examples[:300]),
        test=tuple(examples[300:]),
        separator="\n",
        gd_lr=5e-4,
    )


def random_llama(shape: dict, dtype: torch.dtype, device: str, seed: int = 0):
    """A HF LLaMA of `shape` with random weights, built directly in `dtype` on `device` (a 7B model
    is never held in float32 too). The word-level `tokenizer()` below stands in for LLaMA's."""
    torch.manual_seed(seed)
    config = LlamaConfig(**shape, bos_token_id=1, eos_token_id=2, attn_implementation="eager")
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return hf.eval()


def tokenizer():
    """A word-level tokenizer over the task's words, built in code (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {
        w: i
        for i, w in enumerate(
            ["<unk>", "<s>", "</s>", "<pad>", "Sentence:", "Label:", "Negative", "Positive", "\n"]
            + [f"w{i}" for i in range(200)]
        )
    }
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        name_or_path="gpu-check",
    )


def agreement(task: Task, devices: tuple[str, str]) -> float:
    """Largest difference of the table's values between two devices on the small fp32 config."""
    tables = []
    hf = random_llama(SMALL, torch.float32, "cpu")
    for device in devices:
        bridge = load_model(hf_model=copy.deepcopy(hf), tokenizer=tokenizer(), device=device, dtype="float32")
        tables.append(
            compare(
                bridge,
                task,
                gd=GDConfig.dai(),
                k=8,
                n_episodes=2,
                n_queries=4,
                progress=False,
                artifacts=False,
            ).table.set_index(["metric", "comparison", "layer", "head", "episode", "query"])
        )
    return float((tables[0]["value"] - tables[1]["value"]).abs().max())


def update_and_noise(bridge, task: Task, k: int, n_episodes: int, n_queries: int, batch_size: int) -> None:
    """Is the GD update of the attention output larger than what the model's dtype and the
    kernels' choice of batch shape alone change? Prints, per layer (median over queries),
    |h_GD - h_ZSL| / |h_ZSL| and |h_ZSL(all rows) - h_ZSL(one demo set's rows)| / |h_ZSL|: compare()
    runs the shared ZSL pass on one demo set's rows and GD on the whole group, and a GPU picks
    its bf16 matmul kernels by shape. If the second is not far below the first, bf16 numbers of
    GD's update are partly rounding (docs/models.md, "bf16 and the numbers")."""
    episodes = task.episodes(k, n_episodes, n_queries, 0)
    deltas = train_deltas(bridge, bridge.tokenizer, task, episodes, GDConfig.dai())
    queries = [q for e in episodes for q in e.queries]
    words = [e.label_words for e in episodes for _ in e.queries]
    device = next(bridge.parameters()).device
    enc = encode_prompts(bridge.tokenizer, task, [()] * len(queries), queries, words).to(device)
    row_episode = torch.tensor([i for i, e in enumerate(episodes) for _ in e.queries], device=device)
    recorder = Recorder(bridge, ["attn_out"])
    zsl = recorder.run_batched(enc, "zsl", batch_size=batch_size)["attn_out"].float()  # [L, B, d]
    n = len(episodes[0].queries)
    zsl_one = recorder.run_batched(enc.rows(0, n), "zsl", batch_size=batch_size)["attn_out"].float()
    gd = recorder.run_batched(enc, "gd", batch_size=batch_size, deltas=deltas, row_episode=row_episode)
    size = torch.linalg.vector_norm(zsl, dim=-1)  # [L, B]
    update = (torch.linalg.vector_norm(gd["attn_out"].float() - zsl, dim=-1) / size).median(-1).values
    noise = (torch.linalg.vector_norm(zsl[:, :n] - zsl_one, dim=-1) / size[:, :n]).median(-1).values
    print("gd_update_over_h_by_layer: " + " ".join(f"{v:.1e}" for v in update.tolist()))
    print("batch_shape_noise_over_h_by_layer: " + " ".join(f"{v:.1e}" for v in noise.tolist()))


def run_check(
    task: Task, shape: dict, dtype: torch.dtype, device: str, k: int, n_episodes: int, n_queries: int
):
    """Build the random model of `shape` on `device`, load it in place, run the default compare with
    `max_memory` = MAX_MEMORY, and print its time, batch size and, on a GPU, its peak memory beside
    the memory model's prediction for the model as booted. The dry run calls this with the small
    shape on the CPU, so that the GPU run's code is the tested code."""
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    hf = random_llama(shape, dtype, device)
    bridge = load_model(
        hf_model=hf,
        tokenizer=tokenizer(),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        copy_hf_model=False,
    )
    weights = sum(p.numel() * p.element_size() for p in bridge.original_model.parameters())
    print(f"model_gb: {weights / 2**30:.2f}")
    plan = memory.plan_for_shape(
        memory.ModelShape.of(bridge),
        bridge.tokenizer,
        task,
        k=k,
        n_episodes=n_episodes,
        n_queries=n_queries,
        max_memory=MAX_MEMORY,
    )
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    outcome = {}

    def run() -> None:
        outcome["results"] = compare(
            bridge,
            task,
            k=k,
            n_episodes=n_episodes,
            n_queries=n_queries,
            progress=False,
            max_memory=MAX_MEMORY,
        )

    phases = phase_times(bridge, run)  # synchronised at each phase's ends on a GPU
    results = outcome["results"]
    print(f"seconds_per_demo_set: {phases['total_s'] / n_episodes:.2f}")
    print(
        "phases_s: "
        + " ".join(f"{name.removesuffix('_s')} {phases[name]:.2f}" for name in PHASES)
        + f" (GD steps {phases['gd_steps']}, other passes {phases['passes']}; tables: the metrics,"
        " Kendall's query_key_dots and tau-b included)"
    )
    print(f"batch_size: {results.config['batch_size']}")
    if cuda:
        measured = torch.cuda.max_memory_allocated()
        print(f"peak_gpu_gb: {measured / 2**30:.1f}")
        print(f"predicted_over_measured: {plan.total_bytes / measured:.2f}")
    print(plan.describe())
    print(f"rows: {len(results.table)}")
    update_and_noise(bridge, task, k, n_episodes, n_queries, results.config["batch_size"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan and run the small config on the CPU only"
    )
    args = parser.parse_args()
    task = sst2_like_task()
    print("versions: " + ", ".join(f"{name} {metadata.version(name)}" for name in VERSIONS_SHOWN))
    print(
        f"plan: LLaMA-7B shape {LLAMA_7B}, bf16, default compare, k=32, "
        f"4 demo sets x 16 queries, gd=dai (lr {task.gd_lr})"
    )
    plan = memory.plan_for_shape(
        memory.ModelShape.from_config(LlamaConfig(**LLAMA_7B), bytes_per_element=2),
        tokenizer(),
        task,
        k=32,
        n_episodes=4,
        n_queries=16,
        max_memory=MAX_MEMORY,
    )
    print(
        f"predicted_peak_gpu_gb: {plan.total_bytes / 2**30:.1f} "
        f"(batch_size {plan.batch_size}, phase {plan.phase})"
    )
    if args.dry_run or not torch.cuda.is_available():
        print(f"dry_run: the small config on the CPU ({'asked for' if args.dry_run else 'no CUDA device'})")
        print(f"small_fp32_cpu_vs_cpu_max_diff: {agreement(task, ('cpu', 'cpu')):.2e}")
        run_check(task, SMALL, torch.float32, "cpu", k=4, n_episodes=2, n_queries=2)
        return
    print(
        f"torch: {torch.__version__} on {torch.cuda.get_device_name()}, "
        f"float32 matmul precision {torch.get_float32_matmul_precision()!r} (TF32 unless 'highest')"
    )
    # the small configuration first: seconds, and a device bug shows there before the 7B build
    print(f"small_fp32_gpu_vs_cpu_max_diff: {agreement(task, ('cpu', 'cuda')):.2e}")
    gc.collect()
    torch.cuda.empty_cache()
    run_check(task, LLAMA_7B, torch.bfloat16, "cuda", k=32, n_episodes=4, n_queries=16)


if __name__ == "__main__":
    main()
