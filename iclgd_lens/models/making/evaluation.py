"""k-shot accuracy of a model on a task: the k-shot curve of the model card.

Works on anything called as `model(input_ids, attention_mask=mask)` that returns logits
(a tensor, or an object with `.logits`): an HF `LlamaForCausalLM` or a TransformerBridge.
The prediction is the argmax over the first tokens of the episode's label words, read at
`EncodedPrompts.read_pos` (the last query token, never a padding position).
"""

from __future__ import annotations

from typing import Iterable

import torch

from iclgd_lens.tasks import Task, encode_prompts, label_token_ids


def _device_of(model) -> torch.device:
    """The device of the model's parameters (CPU for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration):
        return torch.device("cpu")


def _logits(output) -> torch.Tensor:
    """Logits from a model's output: a tensor, or an HF output with `.logits`."""
    return output if isinstance(output, torch.Tensor) else output.logits


@torch.no_grad()
def kshot_accuracy(
    model,
    tokenizer,
    task: Task,
    ks: Iterable[int] = (0, 1, 2, 4, 8, 16),
    n_episodes: int = 50,
    n_queries: int = 4,
    seed: int = 0,
) -> dict[int, float]:
    """Accuracy for each k: the share of queries whose label word scores highest among the
    episode's label words, over `n_episodes` episodes of up to `n_queries` queries each."""
    device = _device_of(model)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    accuracy = {}
    for k in ks:
        correct = total = 0
        for episode in task.episodes(k, n_episodes, n_queries, seed=seed):
            n = len(episode.queries)
            enc = encode_prompts(
                tokenizer, task, [episode.demos] * n, list(episode.queries), [episode.label_words] * n
            ).to(device)
            logits = _logits(model(enc.input_ids, attention_mask=enc.attention_mask))  # [batch, pos, vocab]
            read_logits = logits[torch.arange(n, device=device), enc.read_pos]  # [batch, vocab]
            label_ids = torch.tensor(label_token_ids(tokenizer, episode.label_words), device=device)
            predicted = read_logits[:, label_ids].argmax(-1)  # [batch], index into label words
            truth = torch.tensor([q.label for q in episode.queries], device=device)
            correct += int((predicted == truth).sum())
            total += n
        accuracy[int(k)] = correct / total
    if was_training and hasattr(model, "train"):
        model.train()
    return accuracy
