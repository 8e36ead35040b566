"""Print the figures of docs/studies/causal.md: the causal study run with its defaults on both
embedded models, on one CPU thread.

    python benchmarks/causal_figures.py                       # tiny-llama-icl and tiny-llama-iclobj
    python benchmarks/causal_figures.py tiny-llama-icl        # one model (a name, folder or hub id)

For each model: the run time, the study's `findings` exactly as it writes them, and markdown
tables computed from `StudyResult.table` with the study's own `summary` (episode-level means,
[95% t-interval] over the episode means: the queries of one episode share its demonstrations and
GD run, so they are not independent samples) and `stats.paired_test` (paired sign-flip test over
episodes).
"""

from __future__ import annotations

import math
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd
import torch
from iclgd_lens.analyses import causal

from iclgd_lens import load_model, stats

MODELS = ("tiny-llama-icl", "tiny-llama-iclobj")


def _rows(s: pd.DataFrame, metric: str, comparison: str, scope: str, layer: int, head: int | None):
    """The rows of one (metric, comparison, scope, layer[, head]); a per-head summary has no scope."""
    keep = (s.metric == metric) & (s.comparison == comparison) & (s.layer == layer)
    if "scope" in s.columns:
        keep &= s.scope == scope
    if head is not None:
        keep &= s["head"] == head
    return s[keep]


def cell(
    s: pd.DataFrame,
    metric: str,
    comparison: str,
    scope: str,
    layer: int,
    digits: int = 2,
    head: int | None = None,
) -> str:
    row = _rows(s, metric, comparison, scope, layer, head)
    if row.empty or math.isnan(row.iloc[0]["mean"]):
        return "—"
    r = row.iloc[0]
    if math.isnan(r.ci_low):
        return f"{r['mean']:.{digits}f}"
    return f"{r['mean']:.{digits}f} [{r.ci_low:.{digits}f}, {r.ci_high:.{digits}f}]"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def layer_label(scope: str, layer: int, n_layers: int) -> str:
    return {"single": f"{layer}", "bottom": f"0..{layer}", "top": f"{layer}..{n_layers - 1}"}[scope]


def paired(
    t: pd.DataFrame, metric: str, a: str, b: str, scope: str, layer: int, head: int | None = None
) -> str:
    def per_episode(comparison):
        sub = _rows(t, metric, comparison, scope, layer, head)
        return stats.episode_means(sub.value.to_numpy(), sub.episode.to_numpy())

    test = stats.paired_test(per_episode(a), per_episode(b))
    return (
        f"{test.diff_mean:+.2f} [{test.diff_ci_low:+.2f}, {test.diff_ci_high:+.2f}], p = {test.p_value:.4f}"
    )


def report(model: str) -> None:
    bridge = load_model(model)
    started = time.time()
    result = causal.run(bridge, progress=False)
    elapsed = time.time() - started
    t, s = result.table, causal.summary(result.table)
    L = int(result.config["n_layers"])
    c = result.config
    print(f"## {model}\n")
    print(
        f"run time {elapsed:.1f} s (one CPU thread, untrained baseline included); k={c['k']}, "
        f"{c['n_episodes']} episodes x {c['n_queries']} queries, GD preset {c['gd']['name']} at lr "
        f"{c['gd']['lr']}, seed {c['seed']}; {c['n_demo_tokens_mean']:.0f} demonstration tokens per prompt "
        "on average"
    )
    print(
        f"all-layer ICL patch: max |logits - ICL logits| = {c['all_layer_patch_max_abs_err']:.1e} "
        f"(untrained copy: {c.get('untrained_all_layer_patch_max_abs_err', float('nan')):.1e})\n"
    )
    print("Findings as printed:\n")
    print(result.findings + "\n")

    print("### Conditions\n")
    rows = []
    for prefix in ("", "untrained:"):
        for cond in ("zsl", "icl", "gd", "icl_perm"):
            rows.append(
                [f"{prefix}{cond}"]
                + [
                    cell(s, m, f"{prefix}{cond}", "none", -1)
                    for m in ("accuracy", "logit_diff", "kl_to_icl", "kl_to_gd", "recovered")
                ]
            )
    print(table(["condition", "accuracy", "logit diff", "KL(ICL‖·)", "KL(GD‖·)", "recovered"], rows) + "\n")

    for metric, title in (
        ("recovered", "share of ICL's logit-diff effect recovered"),
        ("kl_reduction", "KL reduction 1 - KL(ICL‖patched)/KL(ICL‖ZSL)"),
    ):
        print(f"### Activation patching into ZSL: {title}\n")
        rows = [
            [scope, layer_label(scope, l, L)]
            + [cell(s, metric, f"patch:{src}", scope, l) for src in causal.PATCH_SOURCES]
            for scope, l, _ in causal.scopes(L)
        ]
        print(table(["scope", "layers", *causal.PATCH_SOURCES], rows) + "\n")
    print(
        "paired over episodes, recovered, gd_scaled - random: "
        + "; ".join(
            f"layer {l}: {paired(t, 'recovered', 'patch:gd_scaled', 'patch:random', 'single', l)}"
            for l in range(L)
        )
        + f"; all layers: {paired(t, 'recovered', 'patch:gd_scaled', 'patch:random', 'bottom', L - 1)}\n"
    )

    hs = causal.head_summary(t[~t.comparison.str.startswith("untrained:")])
    n_heads = int(hs["head"].max()) + 1 if not hs.empty else 0
    for kind, names, title in (
        ("patch_head", causal.HEAD_PATCH_SOURCES, "one head patched into ZSL (denoising)"),
        ("subst_head", causal.HEAD_SUBSTITUTES, "ICL with one head's update removed or replaced (noising)"),
    ):
        if hs.empty:
            break
        print(f"### Per head, {title}: share of ICL's logit-diff effect recovered\n")
        rows = [
            [str(l), str(h)] + [cell(hs, "recovered", f"{kind}:{name}", "head", l, head=h) for name in names]
            for l in range(L)
            for h in range(n_heads)
        ]
        print(table(["layer", "head", *names], rows) + "\n")
    if not hs.empty:
        rec = hs[hs.metric == "recovered"]
        for src in causal.HEAD_PATCH_SOURCES:
            sub = rec[rec.comparison == f"patch_head:{src}"]
            sums = ", ".join(f"{v:.2f}" for v in sub.groupby("layer")["mean"].sum())
            print(f"patch_head:{src}: max over heads {sub['mean'].max():.2f}, summed per layer {sums}")
        print(
            "same layer, all heads at once (patch:icl, single): "
            + ", ".join(cell(s, "recovered", "patch:icl", "single", l) for l in range(L))
        )
        removed = rec[rec.comparison == "subst_head:none"].sort_values("mean")
        for _, worst in removed.head(3).iterrows():
            l, h = int(worst.layer), int(worst["head"])
            vs_random = paired(t, "recovered", "subst_head:gd_scaled", "subst_head:random", "head", l, h)
            vs_none = paired(t, "recovered", "subst_head:gd", "subst_head:none", "head", l, h)
            print(
                f"head {l}.{h} removed: recovered {worst['mean']:.2f}; paired over episodes, "
                f"gd_scaled - random {vs_random}, gd - none {vs_none}"
            )
        print()

    for metric, title in (
        ("kl_to_icl", "KL(ICL‖substituted)"),
        ("agreement", "agreement with ICL's label"),
        ("accuracy", "accuracy"),
    ):
        print(f"### Update substitution in the ICL run: {title}\n")
        rows = [
            [scope, layer_label(scope, l, L)]
            + [cell(s, metric, f"subst:{name}", scope, l) for name in causal.SUBSTITUTES]
            for scope, l, _ in causal.scopes(L, ("single", "bottom"))
        ]
        print(table(["scope", "layers", *causal.SUBSTITUTES], rows) + "\n")
    print(
        "paired over episodes, KL(ICL‖substituted), gd_scaled - random: "
        + "; ".join(
            f"layer {l}: {paired(t, 'kl_to_icl', 'subst:gd_scaled', 'subst:random', 'single', l)}"
            for l in range(L)
        )
        + "\n"
    )

    for metric, title in (
        ("accuracy", "accuracy"),
        ("kl_to_icl", "KL(ICL‖transplanted)"),
        ("kl_to_gd", "KL(GD‖transplanted)"),
        ("recovered", "recovered"),
    ):
        print(f"### Dual-form transplant into ZSL: {title}\n")
        rows = [
            [scope, layer_label(scope, l, L)]
            + [cell(s, metric, f"transplant:{m}", scope, l) for m in causal.TRANSPLANTS]
            for scope, l, _ in causal.scopes(L, ("single", "bottom"))
        ]
        print(table(["scope", "layers", *causal.TRANSPLANTS], rows) + "\n")
    print(
        "paired over episodes, KL(ICL‖transplanted) at all layers, linear_scaled - random: "
        + paired(t, "kl_to_icl", "transplant:linear_scaled", "transplant:random", "bottom", L - 1)
        + "\n"
    )

    print(
        "### Linear dual form against ICL's real update of z (clean ZSL query; mean over heads and queries)\n"
    )
    rows = [
        [
            str(l),
            cell(s, "dual_form_ratio", "transplant:linear", "single", l, digits=0),
            cell(s, "dual_form_cos", "transplant:linear", "single", l),
        ]
        for l in range(L)
    ]
    print(
        table(["layer", "norm ratio ‖dW_ICL q‖ / ‖z_ICL − z_ZSL‖", "cos(dW_ICL q, z_ICL − z_ZSL)"], rows)
        + "\n"
    )

    started = time.time()
    other = causal.run(bridge, progress=False, untrained=False, rope="zsl_position")
    so = causal.summary(other.table)
    print(
        "### The RoPE choice: the query at its ZSL position (rope='zsl_position', "
        f"{time.time() - started:.1f} s)\n"
    )
    rows = [
        [
            str(l),
            cell(so, "dual_form_cos", "transplant:linear", "single", l),
            cell(s, "dual_form_cos", "transplant:linear", "single", l),
        ]
        for l in range(L)
    ]
    print(table(["layer", "cos, zsl_position", "cos, icl_position (default)"], rows) + "\n")
    rows = [
        [
            m,
            cell(so, "kl_to_icl", f"transplant:{m}", "bottom", L - 1),
            cell(s, "kl_to_icl", f"transplant:{m}", "bottom", L - 1),
            cell(so, "recovered", f"transplant:{m}", "bottom", L - 1),
            cell(s, "recovered", f"transplant:{m}", "bottom", L - 1),
        ]
        for m in ("linear", "linear_scaled", "softmax")
    ]
    print(
        table(
            [
                "transplant, all layers",
                "KL(ICL‖·) zsl_position",
                "KL(ICL‖·) icl_position",
                "recovered zsl_position",
                "recovered icl_position",
            ],
            rows,
        )
        + "\n"
    )

    print("### Untrained copy (Deutch et al.'s baseline), all layers at once\n")
    rows = [
        [f"patch:{src}"]
        + [
            cell(s, m, f"untrained:patch:{src}", "bottom", L - 1)
            for m in ("recovered", "kl_reduction", "accuracy")
        ]
        for src in causal.PATCH_SOURCES
    ]
    rows += [
        [f"transplant:{m}"]
        + [
            cell(s, x, f"untrained:transplant:{m}", "bottom", L - 1)
            for x in ("recovered", "kl_reduction", "accuracy")
        ]
        for m in causal.TRANSPLANTS
    ]
    print(table(["intervention", "recovered", "KL reduction", "accuracy"], rows) + "\n")


def main(models: list[str]) -> None:
    torch.set_num_threads(1)
    started = time.time()
    for model in models or MODELS:
        report(model)
    print(f"total {time.time() - started:.1f} s (models loaded, both rope settings)")


if __name__ == "__main__":
    main(sys.argv[1:])
