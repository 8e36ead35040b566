"""Print the von Oswald et al. (2023) figures the docs quote, on the task distribution of
`iclgd_lens/worlds/oswald.py`: the best learning rate of one GD step from W0 = 0, its loss, the loss of
predicting zero, and the loss of the hand-built linear self-attention layer at that learning rate.

    python benchmarks/oswald_figures.py [--n-tasks 1000] [--large 100000] [--d-x 10] [--n-context 10]

The protocol is the one of `tests/test_oswald.py::test_best_lr_gd_beats_zero_and_icl_matches_gd`:
`best_gd_lr` (closed form) is fitted on `n_tasks` tasks drawn with `fit_seed`, and the losses
(`regression_loss`: 1/2 squared error, mean over tasks) are measured on `n_tasks` other tasks
drawn with `eval_seed`. x ~ U(-0.5, 0.5)^d_x, W ~ N(0, I), one output (d_y = 1). The same is
then printed for `large` tasks (the values of the distribution itself, up to about 0.005), next
to the exact expected loss of predicting zero, E 1/2 (w.x)^2 = d_x / 24.
The paper reports a best lr of about 6 and a loss of about 0.21 against about 0.42 for zero.
"""

from __future__ import annotations

import torch
import typer

from iclgd_lens.worlds.oswald import (
    LinearSelfAttention,
    best_gd_lr,
    gd_step,
    hand_built_weights,
    predict_icl,
    regression_loss,
    regression_tasks,
)


def figures(
    n_tasks: int = 1000, d_x: int = 10, n_context: int = 10, fit_seed: int = 0, eval_seed: int = 1
) -> dict:
    """The figures as a dict: lr, gd_loss, zero_loss, icl_loss (held-out) and the in-sample losses."""
    d_y = 1
    fit = regression_tasks(n_tasks, n_context=n_context, d_x=d_x, d_y=d_y, seed=fit_seed)
    lr = best_gd_lr(*fit)
    out = {"lr": lr}
    for label, data in (
        ("", regression_tasks(n_tasks, n_context=n_context, d_x=d_x, d_y=d_y, seed=eval_seed)),
        ("fit_", fit),
    ):
        xc, yc, xq, yq = data
        gd_pred = torch.einsum("tox,tx->to", gd_step(xc, yc, None, lr), xq)
        out[f"{label}gd_loss"] = float(regression_loss(gd_pred, yq))
        out[f"{label}zero_loss"] = float(regression_loss(torch.zeros_like(yq), yq))
    xc, yc, xq, yq = regression_tasks(n_tasks, n_context=n_context, d_x=d_x, d_y=d_y, seed=eval_seed)
    model = LinearSelfAttention(d_x, d_y, hand_built_weights(d_x, d_y, lr, n_context))
    with torch.no_grad():
        out["icl_loss"] = float(regression_loss(predict_icl(model, xc, yc, xq), yq))
    return out


def main(
    n_tasks: int = 1000,
    large: int = 100_000,
    d_x: int = 10,
    n_context: int = 10,
    fit_seed: int = 0,
    eval_seed: int = 1,
) -> None:
    """Print the figures for `n_tasks` tasks (the test's protocol), then for `large` tasks."""
    torch.set_num_threads(1)
    print(f"von Oswald task distribution: x ~ U(-0.5, 0.5)^{d_x}, W ~ N(0, I), N = {n_context}, d_y = 1")
    for n in (n_tasks, large):
        f = figures(n, d_x, n_context, fit_seed, eval_seed)
        print(f"\n{n} tasks: best one-step GD learning rate (fitted on seed {fit_seed}): {f['lr']:.2f}")
        print(
            f"  in-sample loss (the fitting tasks): GD {f['fit_gd_loss']:.3f}, "
            f"predicting zero {f['fit_zero_loss']:.3f}"
        )
        print(
            f"  held-out loss (seed {eval_seed}): GD {f['gd_loss']:.3f}, "
            f"predicting zero {f['zero_loss']:.3f}, hand-built attention layer {f['icl_loss']:.3f}"
        )
    print(f"\nexpected loss of predicting zero: d_x / 24 = {d_x / 24:.3f}")


if __name__ == "__main__":
    typer.run(main)
