"""Print how often the verdict marks a layer falsely, with and without Holm's correction across a
metric's layers (docs/statistics.md, "The verdict"): planted tables whose truth is known, one
similarity metric, its episode means drawn around a set value per comparison (sd 0.3).

- Deutch's case: ICL~GD far above the random vector and the random update (by 2, about 7 sd)
  but level with the untrained model, so every "above all baselines" mark is false;
- the full null: ICL~GD and every floor level, so every mark is false.

For each case, the share of pages (one metric, L layers) with at least one false mark; first, the
episodes a metric needs before any of its layers can be marked (`verdict.min_episodes_to_mark`).

    python benchmarks/verdict_error_rates.py [--pages 200] [--layers 6]
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import typer

from iclgd_lens.engine.results import Results
from iclgd_lens.engine.verdict import ABOVE, BELOW, min_episodes_to_mark, verdict

CASES = {
    "Deutch's case (level with the untrained model)": {
        "icl~gd": 0.0,
        "icl~random": -2.0,
        "icl~random_update": -2.0,
        "untrained:icl~gd": 0.0,
    },
    "full null (level with every floor)": {
        "icl~gd": 0.0,
        "icl~random": 0.0,
        "icl~random_update": 0.0,
        "untrained:icl~gd": 0.0,
    },
}


def planted(rng: np.random.Generator, means: dict[str, float], n_layers: int, n_episodes: int) -> Results:
    """One metric (simaou): an episode mean per (comparison, layer, episode) around `means`."""
    rows = [
        ("simaou", comparison, layer, -1, episode, 0, value)
        for comparison, mean in means.items()
        for layer, values in enumerate(mean + 0.3 * rng.standard_normal((n_layers, n_episodes)))
        for episode, value in enumerate(values)
    ]
    columns = ["metric", "comparison", "layer", "head", "episode", "query", "value"]
    return Results(pd.DataFrame(rows, columns=columns))


def main(
    pages: int = 200, layers: int = 6, episodes: list[int] = typer.Option([8, 16]), seed: int = 0
) -> None:
    """The episodes each layer count needs, then the false-mark rates of each case."""
    counts = (1, 2, 4, 8, 16, 32, 40, 80)
    print("# episodes a metric of L layers needs before Holm's first step can pass at alpha 0.05")
    print("| layers | " + " | ".join(map(str, counts)) + " |")
    print("|---|" + "---|" * len(counts))
    print("| episodes | " + " | ".join(str(min_episodes_to_mark(n)) for n in counts) + " |\n")
    print(f"# {pages} planted pages per row, one metric, {layers} layers, alpha 0.05")
    print("| case | episodes | correction | pages with a false 'above all' | with a false 'below' |")
    print("|---|---|---|---|---|")
    for case, means in CASES.items():
        for n_episodes in episodes:
            rng = np.random.default_rng(seed)
            tables = [planted(rng, means, layers, n_episodes) for _ in range(pages)]
            for correction in ("holm", "none"):
                marks = [verdict(t, correction=correction).table["mark"] for t in tables]
                above = np.mean([(m == ABOVE).any() for m in marks])
                below = np.mean([(m == BELOW).any() for m in marks])
                print(f"| {case} | {n_episodes} | {correction} | {above:.1%} | {below:.1%} |")


if __name__ == "__main__":
    typer.run(main)
