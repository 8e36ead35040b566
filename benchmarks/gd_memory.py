"""Print the memory figures of docs/gd.md: the size of the GD deltas per episode on LLaMA-7B, dense
and low-rank (`dW = U V^T`), the break-even ranks at which a delta is multiplied out, and how many
episodes the deltas leave room for on an 80 GB GPU. Pure arithmetic on the model's shapes (no
model is loaded), with the rules of `iclgd_lens/engine/gd/`:

- dense SGD: deltas + one gradient of the same size (SGD updates in place); Adam adds m and v;
- low-rank SGD: each training token adds d_in + d_out entries per projection; no dense gradient;
- a projection goes dense past the break-even rank `LOW_RANK_LIMIT * d_in d_out / (d_in + d_out)`.

    python benchmarks/gd_memory.py [--bytes-per-entry 2] [--gpu-gb 80]

Sizes are decimal (1 GB = 1e9 bytes, 1 MB = 1e6, 1 KB = 1e3), bf16 = 2 bytes per entry.
"""

from __future__ import annotations

import typer

from iclgd_lens.engine.gd import LOW_RANK_LIMIT

# LLaMA-7B (huggyllama/llama-7b, meta-llama/Llama-2-7b-hf): no GQA, untied unembedding
D_MODEL, N_LAYERS, D_MLP, VOCAB = 4096, 32, 11008, 32000
# the shipped tiny models (iclgd_lens/models/*/config.json): d_model 128, 2 kv heads of 32
TINY_D_MODEL, TINY_KV = 128, 2 * 32


def projections(params: str) -> list[tuple[str, int, int]]:
    """(kind, d_in, d_out) of every projection a parameter set trains, as in gd.py's PARAM_SETS."""
    attn = ("attn", D_MODEL, D_MODEL)
    mlp = [
        ("mlp", D_MODEL, D_MLP),
        ("mlp", D_MODEL, D_MLP),
        ("mlp", D_MLP, D_MODEL),
    ]  # gate, up (in), down (out)
    if params == "v_single":
        return [attn]
    if params == "kv":
        return [attn] * 2 * N_LAYERS
    if params == "qkvo":
        return [attn] * 4 * N_LAYERS
    if params == "all":
        return ([attn] * 4 + mlp) * N_LAYERS + [("unembed", D_MODEL, VOCAB)]
    raise ValueError(params)


def size(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}"
    return f"{n_bytes:.0f} B"


def break_even(d_in: int, d_out: int) -> float:
    return LOW_RANK_LIMIT * d_in * d_out / (d_in + d_out)


def main(bytes_per_entry: int = 2, gpu_gb: float = 80.0) -> None:
    """Print the tables."""
    b = bytes_per_entry
    model_params = (
        2 * VOCAB * D_MODEL + N_LAYERS * (4 * D_MODEL**2 + 3 * D_MODEL * D_MLP + 2 * D_MODEL) + D_MODEL
    )
    model_bytes = model_params * b
    print(
        f"LLaMA-7B: d_model {D_MODEL}, {N_LAYERS} layers, d_mlp {D_MLP}, vocab {VOCAB}: "
        f"{model_params / 1e9:.2f} B parameters, {size(model_bytes)} at {b} bytes per entry"
    )
    print(f"relative rounding of one entry in bf16 (8 significant bits): 2^-8 = {100 * 2**-8:.2f}%\n")

    print("dense deltas, per episode:\n")
    print(
        "| params | entries per episode | deltas | peak during training, dense SGD | "
        "peak during training, Adam | "
        f"episodes whose SGD peak fits beside the model in {gpu_gb:g} GB | with Adam |"
    )
    print("|---|---|---|---|---|---|---|")
    dense_peak = {}
    for params in ("v_single", "kv", "qkvo", "all"):
        entries = sum(i * o for _, i, o in projections(params))
        delta = entries * b
        dense_peak[params] = 2 * delta
        room = gpu_gb * 1e9 - model_bytes
        count = f"{entries / 1e9:.3g} B" if entries >= 1e9 else f"{entries / 1e6:.3g} M"
        print(
            f"| `{params}` | {count} | {size(delta)} | {size(2 * delta)} | {size(4 * delta)} | "
            f"{room / (2 * delta):.1f} | {room / (4 * delta):.1f} |"
        )

    print(
        "\nlow-rank SGD deltas, per episode (r = training tokens: 8 demos x 30 tokens = 240, "
        "32 x 30 = 960):\n"
    )
    print(
        "| params | per training token | r = 240 | r = 960 | dense SGD peak / low-rank at r = 240 | "
        "at r = 960 | dense from r = |"
    )
    print("|---|---|---|---|---|---|---|")
    for params in ("v_single", "kv", "qkvo", "all"):
        proj = projections(params)
        per_token = sum(i + o for _, i, o in proj) * b
        ranks = {}
        for kind, i, o in proj:
            ranks.setdefault(kind, break_even(i, o))
        ranks_text = (
            ", ".join(f"{r:.0f} ({kind})" for kind, r in ranks.items())
            if len(ranks) > 1
            else f"{next(iter(ranks.values())):.0f}"
        )
        print(
            f"| `{params}` | {size(per_token)} | {size(240 * per_token)} | {size(960 * per_token)} | "
            f"{dense_peak[params] / (240 * per_token):.1f}x | "
            f"{dense_peak[params] / (960 * per_token):.1f}x | {ranks_text} |"
        )

    print(
        f"\nbreak-even rank (LOW_RANK_LIMIT = {LOW_RANK_LIMIT:g}): 512 x 512 -> {break_even(512, 512):.0f}; "
        f"4096 x 4096 -> {break_even(4096, 4096):.0f}; the tiny models' k/v ({TINY_KV} x {TINY_D_MODEL}) -> "
        f"{break_even(TINY_D_MODEL, TINY_KV):.1f}, "
        f"reached after {int(break_even(TINY_D_MODEL, TINY_KV) // 4)} batch-1 steps of 4-token "
        "demonstrations (BOS + 'cow = alpha')"
    )


if __name__ == "__main__":
    typer.run(main)
