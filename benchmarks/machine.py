"""What the machine can do and what a run costs it: the measured dense matmul peak, the FLOPs a
run does (counted by `torch.utils.flop_counter`), the least FLOPs the comparison needs, and the
peak RSS growth of a run (measured in a fresh child process).

Used by benchmarks/engine.py; every figure is measured in the same run as the timings it is set
beside.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode


def matmul_peak(threads: int, sizes=(512, 1024, 2048), repeats: int = 5) -> dict:
    """Dense float32 matmul throughput in FLOP/s with `threads` torch threads: the best of
    `repeats` timings of an n x n @ n x n product, the best over `sizes` (the machine's limit for
    the kind of work the engine does)."""
    torch.set_num_threads(threads)
    best = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        best[n] = 2 * n**3 / min(times)
    return {"flops_per_s": max(best.values()), "per_size": {n: round(f / 1e9, 1) for n, f in best.items()}}


def pass_matmul_rate(
    rows: int, weight_shapes: list[tuple[int, int]], threads: int, repeats: int = 5
) -> float:
    """FLOP/s of one forward pass's matmuls alone: `rows` activations through every weight of
    `weight_shapes` ([d_in, d_out], distinct tensors, so that they stream from memory as a model's
    do), the best of `repeats` sweeps: the most a pass of that many rows can reach on this machine."""
    torch.set_num_threads(threads)
    weights = [torch.randn(d_in, d_out) for d_in, d_out in weight_shapes]
    inputs = {d_in: torch.randn(rows, d_in) for d_in, _ in weight_shapes}
    best = float("inf")
    for _ in range(repeats + 1):  # the first sweep warms up
        start = time.perf_counter()
        for w in weights:
            inputs[w.shape[0]] @ w
        best = min(best, time.perf_counter() - start)
    return sum(2 * rows * d_in * d_out for d_in, d_out in weight_shapes) / best


def median_ms(fn, reps: int) -> float:
    """Median milliseconds of `reps` calls of `fn` after one warm-up call."""
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def pass_times(bridge, reps: int) -> dict[str, float]:
    """Milliseconds of one pass of 8 x 4 tokens (a GD step's shape), TransformerLens' bridge vs
    plain HF transformers on the same weights, no-grad and with backward from the residual stream
    (the graph a GD step builds): the cost of the bridge's per-call machinery."""
    from hf_alternatives import plain_copy

    hf = plain_copy(bridge)
    ids = torch.randint(5, bridge.cfg.d_vocab, (8, 4), generator=torch.Generator().manual_seed(0))

    def leaf(resid, hook):
        return resid.detach().requires_grad_(True)

    def bridge_forward():
        with torch.no_grad():
            bridge(ids)

    def hf_forward():
        with torch.no_grad():
            hf(ids)

    def bridge_backward():
        with torch.enable_grad(), bridge.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", leaf)]):
            bridge(ids).sum().backward()

    def hf_backward():
        with torch.enable_grad():
            embedded = hf.model.embed_tokens(ids).detach().requires_grad_(True)
            hf(inputs_embeds=embedded).logits.sum().backward()

    for p in hf.parameters():
        p.requires_grad_(False)
    saved = [p.requires_grad for p in bridge.parameters()]
    for p in bridge.parameters():
        p.requires_grad_(False)
    try:
        return {
            "no-grad forward, bridge ms": median_ms(bridge_forward, reps),
            "no-grad forward, plain HF ms": median_ms(hf_forward, reps),
            "forward + backward, bridge ms": median_ms(bridge_backward, reps),
            "forward + backward, plain HF ms": median_ms(hf_backward, reps),
        }
    finally:
        for p, flag in zip(bridge.parameters(), saved):
            p.requires_grad_(flag)


def phase_times(bridge, run) -> dict[str, float]:
    """Where one call of `run()` (a `compare()` on `bridge`) spends its time: seconds in
    `train_deltas` (GD, every call: forward, backward and factor updates), in the bridge's passes
    outside GD (no-grad forwards, their hooks included), in `episode_table` (metrics and rows),
    and the rest (encoding, the untrained weights drawn in place, artifacts); with the number of
    GD steps (forwards with gradients) and of the other passes. One extra, untimed-elsewhere run.
    On a CUDA device every boundary waits for the device (`torch.cuda.synchronize`), so that each
    phase is charged with its own kernels, not with those queued before it."""
    from unittest import mock

    from iclgd_lens.engine import compare as compare_module

    spent = {"gd_s": 0.0, "passes_s": 0.0, "tables_s": 0.0}
    counts = {"gd_steps": 0, "passes": 0}
    started: list[float] = []
    cuda = torch.cuda.is_available() and any(p.is_cuda for p in bridge.parameters())

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def timed(fn, key: str):
        def wrapper(*args, **kwargs):
            start = now()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += now() - start

        return wrapper

    def before(module, args) -> None:
        started.append(now())

    def after(module, args, out) -> None:
        elapsed = now() - started.pop()
        if torch.is_grad_enabled():
            counts["gd_steps"] += 1
        else:
            counts["passes"] += 1
            spent["passes_s"] += elapsed

    handles = [bridge.register_forward_pre_hook(before), bridge.register_forward_hook(after)]
    try:
        with (
            mock.patch.object(compare_module, "train_deltas", timed(compare_module.train_deltas, "gd_s")),
            mock.patch.object(
                compare_module, "episode_table", timed(compare_module.episode_table, "tables_s")
            ),
        ):
            start = now()
            run()
            total = now() - start
    finally:
        for handle in handles:
            handle.remove()
    rest = total - sum(spent.values())
    return {"total_s": total, **spent, "rest_s": rest, **counts}


def counted_flops(fn) -> tuple[float, object]:
    """FLOPs of the matmuls, convolutions and attention kernels `fn()` runs, and its result."""
    counter = FlopCounterMode(display=False)
    with counter:
        out = fn()
    return float(counter.get_total_flops()), out


def minimum_flops(cfg, tokenizer, task, episodes, *, baselines: bool) -> float:
    """The least matmul work the comparison needs: the sum of `needed_flops`."""
    return sum(needed_flops(cfg, tokenizer, task, episodes, baselines=baselines).values())


def needed_flops(cfg, tokenizer, task, episodes, *, baselines: bool) -> dict[str, float]:
    """The least matmul work the comparison needs (no padding, nothing computed twice), as
    {"gd": GD's steps, "passes": every other forward pass}:

    - GD: every demonstration token forward (2 P per token, P = parameters of the layers' and the
      unembedding's matmuls), backward to the activations (2 P) and to the K/V weights
      (2 P_kv), plus causal attention (4 d_model per key and layer, x3 with the backward);
    - ZSL once per distinct query; ICL: each demo set's prefix once, each query on top of it;
      GD: every query per demo set; attention 4 d_model per key and layer;
    - baselines: ICL under another order (prefix + queries), the random update (queries per
      set), and the whole pipeline again on the untrained copy.
    """
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    d_kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    p_layer = 2 * d * d + 2 * d * d_kv + 3 * d * cfg.intermediate_size
    p_kv = 2 * d * d_kv
    p_unembed = d * cfg.vocab_size

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # + BOS

    def attention(n: int, context: int) -> float:
        """QK^T and AV of n tokens after `context` cached ones, every layer (causal)."""
        return 4 * L * d * (n * context + n * (n + 1) / 2)

    def forward(n: int, context: int) -> float:
        """n tokens after `context` cached ones: the layers' matmuls and attention."""
        return 2 * L * p_layer * n + attention(n, context)

    def pipeline(with_baselines: bool) -> tuple[float, float]:
        runs = 2 if with_baselines else 1  # ICL (+ another order); GD (+ the random update)
        gd, total, seen = 0.0, 0.0, set()
        for episode in episodes:
            demo_lengths = [n_tokens(task.render_demo(x, episode.label_words)) for x in episode.demos]
            for n in demo_lengths:  # GD: forward and backward to activations, gradients of W_K, W_V
                gd += 4 * L * p_layer * n + 3 * attention(n, 0) + 4 * p_unembed * n + 2 * L * p_kv * n
            prefix = sum(demo_lengths)  # ~ the demonstrations and their separators, once per order
            total += runs * forward(prefix, 0)
            for q in episode.queries:
                n = n_tokens(task.render_query(q)) - 1
                total += runs * forward(n, prefix) + runs * forward(n + 1, 0)
                total += 2 * runs * 2 * p_unembed  # logits at the read position
                if (q, episode.label_words) not in seen:  # ZSL once per distinct query
                    seen.add((q, episode.label_words))
                    total += forward(n + 1, 0) + 2 * p_unembed
        return gd, total

    gd, passes = pipeline(baselines)
    if baselines:  # + the untrained copy's run
        gd, passes = (a + b for a, b in zip((gd, passes), pipeline(False)))
    return {"gd": gd, "passes": passes}


# ---- peak RSS of one side, in a fresh process -------------------------------------------------
def rss_now() -> int:
    """Resident set size of this process in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes: VmHWM, the high-water mark of
    its own address space. (Not ru_maxrss: Linux carries that over fork and exec, so a child
    started by a big parent reports the parent's size.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_growth_in_child(script: Path, args: list[str], timeout: int = 900) -> dict:
    """Run `script --rss-child ...args` in a fresh interpreter and return the JSON it prints last:
    its RSS once the models are built (and a micro run made) and the peak RSS after the side ran."""
    out = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        # glibc returns every block of 128 KB or more to the OS when it is freed (no dynamic mmap
        # threshold), so that the peak RSS follows the peak of live tensors, not heap fragmentation
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"RSS child {args} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
