"""Print every number of docs/studies/icl-vs-iwl.md: the study `icl-vs-iwl` (Chan et al. 2024,
synthetic part) with its `chan2024` preset, its variants, and the published sweeps, on one CPU
thread, each with its run time, 5 seeds (unless said) and 95% t-intervals over seeds.

    python benchmarks/chan_figures.py main           # chan2024 (5 seeds x N = 2^6..2^16)
    python benchmarks/chan_figures.py variants       # staged; gate on the query alone; read at the last step
    python benchmarks/chan_figures.py n-low          # 5 / 45 / 95 / 495 low-frequency classes
    python benchmarks/chan_figures.py sweeps         # p_high, p_relevant, L, sigma on chan2024 (3 seeds)
    python benchmarks/chan_figures.py sweeps-staged  # the same on staged
    python benchmarks/chan_figures.py full-steps     # both at the published 50,000 steps (3 seeds)
    python benchmarks/chan_figures.py old-defaults   # the study before the preset, from git (3 seeds)
    python benchmarks/chan_figures.py all            # all of the above

Each section prints the study's findings as it writes them and a markdown table computed from
`StudyResult.table` with the study's own `summary` (mean [95% t-interval over seeds], the
interval clipped to [0, 1] for display). The sweeps use 3 seeds and N = 2^6, 2^10, 2^14.
"""

from __future__ import annotations

import math
import sys
import time

import pandas as pd
import torch
from iclgd_lens.analyses import icl_vs_iwl


def ci(row) -> str:
    if math.isnan(row["ci_low"]):
        return f"{row['mean']:.2f}"
    return f"{row['mean']:.2f} [{row['ci_low']:.2f}, {row['ci_high']:.2f}]"  # clipped by `summary`


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


def over_training(result, sizes=(64, 4096), every: int = 1000) -> None:
    """The mean gate on fresh high / low queries at the checkpoints (every `every` steps), per N."""
    traj = icl_vs_iwl.trajectory(result.config)
    print(f"gate over training (mean over seeds; high / low), every {every} steps:\n")
    for n in sizes:
        curve = traj[(traj.n_train == n) & (traj.step % every == 0)].groupby("step")[
            ["gate_high", "gate_low"]
        ]
        cells = ", ".join(
            f"{int(k)}: {v.gate_high:.2f} / {v.gate_low:.2f}" for k, v in curve.mean().iterrows()
        )
        print(f"- N = {n}: {cells}")
    chosen = pd.DataFrame(result.config["selected_steps"])
    read = chosen.merge(traj, on=["n_train", "seed", "step"])  # the checkpoint each run is read at
    print(
        "\nselected checkpoints (min / median / max step; mean training NLL of f there): "
        + "; ".join(
            f"N={n}: {int(v.step.min())} / {int(v.step.median())} / {int(v.step.max())}; "
            f"{v.train_loss.mean():.3f}"
            for n, v in read.groupby("n_train")
        )
        + "\n"
    )


def main_section() -> None:
    result = run("chan2024 (the code behind the published figures, 10,000 steps)")
    by_n(result, MAIN_COLUMNS)
    over_training(result)


def variants() -> None:
    for title, kwargs in (
        ("variant staged (5,000 + 5,000 steps)", dict(preset="staged")),
        ("variant query-gate", dict(preset="query-gate")),
        (
            "chan2024 read at the last step instead of the checkpoint of lowest training loss",
            dict(select="final"),
        ),
    ):
        result = run(title, **kwargs)
        by_n(result, MAIN_COLUMNS)
        over_training(result)


def n_low() -> None:
    for n in (5, 45, 95, 495):
        by_n(run(f"chan2024 with {n} low-frequency classes", n_low=n), GATES)


def _sweep(preset: str) -> None:
    small = dict(n_seeds=3, n_train=(2**6, 2**10, 2**14))
    for name, values in (
        ("p_high", (0.5, 0.99)),
        ("p_relevant", (0.1, 0.5, 0.99)),
        ("context_len", (2, 4, 8)),
        ("sigma", (0.0, 0.02, 0.4)),
    ):
        # the preset's own value (p_high 0.9, p_relevant 0.9, L 1, sigma 0.2) is in `main` / `variants`
        for value in values:
            by_n(run(f"{preset}, {name} = {value}", preset=preset, **small, **{name: value}), GATES)


def sweeps() -> None:
    _sweep("chan2024")


def sweeps_staged() -> None:
    _sweep("staged")


def full_steps() -> None:
    for preset, title in (
        ("chan2024", "chan2024 at the published 50,000 steps"),
        ("staged", "staged at the published 50,000 steps per stage"),
    ):
        result = run(title, preset=preset, steps=icl_vs_iwl.PUBLISHED_STEPS, n_seeds=3)
        by_n(result, MAIN_COLUMNS)
        over_training(result, every=5000)


OLD_COMMIT = "f2f251f^"  # the study before the chan2024 preset (the right column)
OLD_SCRIPT = """
import sys, torch
sys.path.insert(0, sys.argv[1])
torch.set_num_threads(1)
import pandas as pd
from analyses import icl_vs_iwl
t = pd.concat([icl_vs_iwl.run(n_train=(64, 4096), seed=s).table for s in (0, 1, 2)])
m = t.groupby(["n_train", "evaluation", "group", "metric"])["value"].mean()
for n in (64, 4096):
    for g in ("high", "low"):
        d = lambda k, e="in_distribution": f"{m.loc[(n, e, g, k)]:.2f}"
        print(f"N={n} {g}: gate {d('gate')}, err f {d('error')}, g {d('error_in_weight')}, "
              f"h {d('error_in_context')}, shifted err f {d('error', 'shifted_labels')}")
"""


def old_defaults() -> None:
    """The old study (its own defaults) from git, 3 seeds, N = 64 and 4096: the bounds of
    tests/test_icl_vs_iwl.py fail on it."""
    import subprocess
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", OLD_COMMIT, "iclgd_lens", "analyses"],
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        started = time.time()
        out = subprocess.run(
            [sys.executable, "-c", OLD_SCRIPT, tmp], check=True, capture_output=True, text=True
        ).stdout
    print(f"\n===== old defaults ({OLD_COMMIT}), 3 seeds, mean: {time.time() - started:.1f} s\n\n{out}")


SECTIONS = {
    "main": main_section,
    "variants": variants,
    "n-low": n_low,
    "sweeps": sweeps,
    "sweeps-staged": sweeps_staged,
    "full-steps": full_steps,
    "old-defaults": old_defaults,
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
