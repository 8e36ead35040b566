"""Print every number of docs/studies/icl-vs-iwl.md: the study `icl-vs-iwl` (Chan et al. 2024,
synthetic part) with its `chan2024` preset, its variants, and the published sweeps, on one CPU
thread, each with its run time, 5 seeds (unless said) and 95% t-intervals over seeds.

    python benchmarks/chan_figures.py main        # the chan2024 preset (5 seeds x N = 2^6..2^16), ~1 min
    python benchmarks/chan_figures.py variants    # joint training; gate on the query alone, ~2 min
    python benchmarks/chan_figures.py n-low       # 5 / 45 / 95 / 495 low-frequency classes, ~5 min
    python benchmarks/chan_figures.py sweeps      # p_high, p_relevant, L, sigma; chan2024 and joint, ~8 min
    python benchmarks/chan_figures.py full-steps  # chan2024 at 50,000 steps, joint at 100,000, ~17 min
    python benchmarks/chan_figures.py all         # all of the above

Each section prints the study's findings as it writes them and a markdown table computed from
`StudyResult.table` with the study's own `summary` (mean [95% t-interval over seeds], the
interval clipped to [0, 1] for display). The sweeps use 3 seeds and N = 2^6, 2^10, 2^14.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from iclgd_lens.analyses import icl_vs_iwl


def ci(row) -> str:
    if math.isnan(row["ci_low"]):
        return f"{row['mean']:.2f}"
    return f"{row['mean']:.2f} [{max(row['ci_low'], 0):.2f}, {min(row['ci_high'], 1):.2f}]"


def run(title: str, **kwargs):
    started = time.time()
    result = icl_vs_iwl.run(**kwargs)
    print(f"\n===== {title}: {time.time() - started:.1f} s on {torch.get_num_threads()} thread(s)\n")
    print(f"icl_vs_iwl.run({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})\n")
    print("findings:\n" + result.findings + "\n")
    return result


def by_n(result, columns: list[tuple[str, str, str, str, str]]) -> None:
    """One row per N; each column (heading, labels, context, group, metric) as mean [interval]."""
    s = icl_vs_iwl.summary(result.table).set_index(icl_vs_iwl.KEYS)
    print("| N | " + " | ".join(c[0] for c in columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for n in result.config["n_train"]:
        print(f"| {n} | " + " | ".join(ci(s.loc[(n, *c[1:])]) for c in columns) + " |")
    print()


MAIN_COLUMNS = [
    ("gate, high", "original", "default", "high", "gate"),
    ("gate, low", "original", "default", "low", "gate"),
    ("err f, high", "original", "default", "high", "error"),
    ("err f, low", "original", "default", "low", "error"),
    ("err g, low", "original", "default", "low", "error_in_weight"),
    ("err h, low", "original", "default", "low", "error_in_context"),
    ("shifted+always err f, high", "shifted", "always", "high", "error"),
    ("shifted+always err f, low", "shifted", "always", "low", "error"),
    ("never err f, high", "original", "never", "high", "error"),
    ("never err f, low", "original", "never", "low", "error"),
]
GATES = [
    ("gate, high", "original", "default", "high", "gate"),
    ("gate, low", "original", "default", "low", "gate"),
    ("err f, low", "original", "default", "low", "error"),
    ("err h, low", "original", "default", "low", "error_in_context"),
    ("err g, low", "original", "default", "low", "error_in_weight"),
]


def main_section() -> None:
    by_n(run("chan2024 (the published protocol at 5,000 steps per stage)"), MAIN_COLUMNS)


def variants() -> None:
    for preset in ("joint", "query-gate"):
        by_n(run(f"variant {preset}", preset=preset), MAIN_COLUMNS)


def n_low() -> None:
    for n in (5, 45, 95, 495):
        by_n(run(f"chan2024 with {n} low-frequency classes", n_low=n), GATES)


def sweeps() -> None:
    small = dict(n_seeds=3, n_train=(2**6, 2**10, 2**14))
    for preset in ("chan2024", "joint"):
        for name, values in (
            ("p_high", (0.5, 0.99)),
            ("p_relevant", (0.1, 0.5, 0.99)),
            ("context_len", (2, 4, 8)),
            ("sigma", (0.0, 0.02, 0.4)),
        ):
            # the preset's own value (p_high 0.9, p_relevant 0.9, L 1, sigma 0.2) is in `main` / `variants`
            for value in values:
                by_n(run(f"{preset}, {name} = {value}", preset=preset, **small, **{name: value}), GATES)


def full_steps() -> None:
    by_n(
        run("chan2024 at the published 50,000 steps per stage", steps=icl_vs_iwl.PUBLISHED_STEPS),
        MAIN_COLUMNS,
    )
    by_n(
        run(
            "joint at 100,000 steps (the published two stages together)",
            preset="joint",
            steps=2 * icl_vs_iwl.PUBLISHED_STEPS,
        ),
        MAIN_COLUMNS,
    )


SECTIONS = {
    "main": main_section,
    "variants": variants,
    "n-low": n_low,
    "sweeps": sweeps,
    "full-steps": full_steps,
}

if __name__ == "__main__":
    torch.set_num_threads(1)
    chosen = sys.argv[1:] or ["main"]
    if chosen == ["all"]:
        chosen = list(SECTIONS)
    for name in chosen:
        if name not in SECTIONS:
            raise SystemExit(f"choose from: all, {', '.join(SECTIONS)}")
        SECTIONS[name]()
