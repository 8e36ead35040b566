"""Train the embedded tiny LLaMA models on the synthetic corpus (reproducible, CPU, minutes).

    iclgd-lens train --variant icl    --out iclgd_lens/models/tiny-llama-icl    --threads 1
    iclgd-lens train --variant iclobj --out iclgd_lens/models/tiny-llama-iclobj --threads 1

Variants:
- `icl`: the ordinary next-token loss on every token of the corpus (`corpus.mapping_document`:
  bursty document-specific mappings plus global fact lines). ICL has to emerge.
- `iclobj`: the explicit ICL objective of the theory papers: 2-way k-shot prompts (mapping lines
  only) with the loss on the label tokens only, short prompts first (`ICLOBJ_LENGTH_CURRICULUM`).

The run is seeded (model init and data), single-process, and writes the HF model and
tokenizer (`save_pretrained`) plus `training_log.json` (config, seed, losses, k-shot checks,
time) to `--out`, all at once when training ends (the place is checked before training starts;
a folder that holds anything but a model saved here is refused; other files in an earlier
model's folder, such as its README, stay). `--micro` is a seconds-long configuration for tests.
The command is `iclgd-lens train` (iclgd_lens/cli.py); from Python, call
`train(TrainConfig(...), out=...)`.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from iclgd_lens import folders
from iclgd_lens.models.making.evaluation import kshot_accuracy
from iclgd_lens.models.making.tokenizer import build_tokenizer
from iclgd_lens.tasks.mapping import DocumentConfig, World, default_task, document_text, mapping_document

VARIANTS = ("icl", "iclobj")

ICLOBJ_LENGTH_CURRICULUM: tuple[tuple[int, int], ...] = ((600, 16), (1000, 32), (1300, 64))
"""The `iclobj` variant's default length curriculum. With the loss on label tokens only,
128-token prompts from the first step sat on the "one of the two labels in the prompt" plateau
for 2,000+ steps; short prompts first (as the theory papers' length curricula, e.g. Garg et al.
2022) let ICL appear by step ~1,250 with seed 0 (not with every seed: docs/model-card.md)."""


@dataclass
class TrainConfig:
    """Everything that determines a training run (written to training_log.json)."""

    variant: str = "icl"
    seed: int = 0
    steps: int = 2000
    batch_size: int = 32
    seq_len: int = 128  # 16-shot prompts (~67 tokens) are in distribution
    length_curriculum: tuple[tuple[int, int], ...] | None = None
    """(until_step, seq_len) pairs: sequences are that short before that step, in batches made
    proportionally bigger (same tokens per step); `seq_len` afterwards. Empty: `seq_len`
    throughout. None: the variant's default (`ICLOBJ_LENGTH_CURRICULUM` for iclobj, else empty)."""
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # GQA: the default model exercises it
    max_position_embeddings: int = 256
    eval_every: int = 250
    eval_episodes: int = 25
    eval_ks: tuple[int, ...] = (0, 1, 2, 8)
    threads: int = 1

    def __post_init__(self) -> None:
        if self.length_curriculum is None:
            self.length_curriculum = ICLOBJ_LENGTH_CURRICULUM if self.variant == "iclobj" else ()
        self.length_curriculum = tuple(tuple(pair) for pair in self.length_curriculum)  # JSON gives lists


MICRO = dict(
    steps=6,
    batch_size=4,
    seq_len=32,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    warmup_steps=2,
    eval_every=0,
)
"""A configuration that trains in about a second (for tests)."""


def document_config(variant: str, seq_len: int) -> DocumentConfig:
    """Documents of the variant, with enough 4-token lines to fill `seq_len` tokens."""
    n_lines = seq_len // 4 + 1
    if variant == "icl":
        return DocumentConfig(n_lines=n_lines)
    return DocumentConfig(n_lines=n_lines, n_categories=(2,), p_mapping=1.0, p_fact_document=0.0)


def model_config(config: TrainConfig, tokenizer) -> LlamaConfig:
    """The LLaMA architecture (RMSNorm, RoPE, SwiGLU, GQA) at the configured size."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_batch(
    variant: str, world: World, tokenizer, rng: random.Random, batch_size: int, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [batch, seq_len] and next-token targets [batch, seq_len] (-100 = no loss).

    `icl`: every next token is a target. `iclobj`: only label words are targets.
    """
    doc_config = document_config(variant, seq_len)
    texts = [document_text(mapping_document(world, rng, doc_config)[0]) for _ in range(batch_size)]
    ids = torch.tensor([tokenizer(t)["input_ids"][:seq_len] for t in texts])  # [batch, seq_len]
    targets = torch.full_like(ids, -100)
    targets[:, :-1] = ids[:, 1:]
    if variant == "iclobj":
        label_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(world.label_words)))
        targets[~torch.isin(targets, label_ids)] = -100
    return ids, targets


def batch_shape(step: int, config: TrainConfig) -> tuple[int, int]:
    """(batch size, sequence length) at `step` under the length curriculum."""
    for until, length in sorted(config.length_curriculum):
        if step < until:
            return config.batch_size * config.seq_len // length, length
    return config.batch_size, config.seq_len


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio * lr`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (
        config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def portable_tokenizer_class(folder: Path) -> None:
    """Name the tokenizer class "PreTrainedTokenizerFast" (transformers 5 writes its alias
    "TokenizersBackend", which transformers 4 cannot load)."""
    path = Path(folder) / "tokenizer_config.json"
    tokenizer_config = json.loads(path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


TRAINING_LOG = "training_log.json"


def holds_trained_model(folder: Path) -> bool:
    """Whether `folder` holds a model `train` saved (whose files a retrained one may replace)."""
    return (folder / TRAINING_LOG).is_file()


def train(
    config: TrainConfig, out: Path | None = None, log=print, command: str | None = None
) -> tuple[LlamaForCausalLM, object, dict]:
    """Train one model; save it to `out` if given. Returns (model, tokenizer, training log)."""
    if config.variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {config.variant!r}")
    if out is not None:  # before minutes of training: a place that cannot take the model
        folders.check_target(out, holds_trained_model, "model")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    world = World()
    name = f"tiny-llama-{config.variant}"
    tokenizer = build_tokenizer(world, name_or_path=name)
    model = LlamaForCausalLM(model_config(config, tokenizer))
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.95),
    )
    task = default_task(seed=config.seed)
    losses, evals = [], []
    start, cpu_start = time.time(), time.process_time()
    curriculum = "".join(
        f", {batch_shape(until - 1, config)[0]} x {n} before step {until}"
        for until, n in config.length_curriculum
    )
    log(
        f"{name}: {n_params:,} parameters, {config.steps} steps of {config.batch_size} x {config.seq_len} "
        f"tokens{curriculum}"
    )
    model.train()
    for step in range(config.steps):
        batch_size, seq_len = batch_shape(step, config)
        ids, targets = make_batch(config.variant, world, tokenizer, rng, batch_size, seq_len)
        logits = model(ids).logits  # [batch, seq_len, vocab]
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        losses.append(round(loss.item(), 5))
        last = step + 1 == config.steps
        if config.eval_every and ((step + 1) % config.eval_every == 0 or last):
            acc = kshot_accuracy(
                model, tokenizer, task, config.eval_ks, config.eval_episodes, 4, seed=10_000 + step
            )
            evals.append({"step": step + 1, "accuracy": acc})
            mean_loss = sum(losses[-50:]) / len(losses[-50:])
            log(f"step {step + 1}: loss {mean_loss:.4f}  k-shot {acc}  ({time.time() - start:.0f}s)")
    seconds, cpu_seconds = time.time() - start, time.process_time() - cpu_start
    training_log = {
        "model": name,
        "command": command,
        "config": asdict(config),
        "seed": config.seed,
        "n_parameters": n_params,
        "train_seconds": round(seconds, 1),  # wall clock (slower when the machine is shared)
        "train_cpu_seconds": round(cpu_seconds, 1),  # CPU time of this process: the cost on an idle machine
        "losses": losses,
        "kshot_during_training": evals,
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
    }
    if out is not None:
        with folders.written_in_place(out, "model", keep_others=True) as folder:
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            portable_tokenizer_class(folder)
            (folder / TRAINING_LOG).write_text(json.dumps(training_log, indent=1))
        log(f"saved to {out} after {seconds:.0f}s")
    return model, tokenizer, training_log
