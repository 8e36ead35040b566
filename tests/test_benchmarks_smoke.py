"""benchmarks/engine.py on a micro configuration: it runs, and engine and reference AGREE.

Not a timing test (the CPU is shared): it checks the numbers of the two sides, the memory
accounting, and that the script's --quick mode runs end to end.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import engine  # noqa: E402
from reference_protocol import finetune_kv  # noqa: E402

from iclgd_lens.engine.gd import GDConfig, train_deltas  # noqa: E402

torch.set_num_threads(1)

MICRO = engine.Shape(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=64, n_ctx=256)


@pytest.fixture(scope="module")
def model():
    return engine.random_llama(MICRO)


@pytest.fixture(scope="module")
def task():
    return engine.bench_task()


@pytest.fixture(scope="module")
def tables(model, task):
    config = engine.Config(k=3, n_episodes=2, n_queries=4, lr=0.05)
    return engine.run_engine(model, task, config)[0], engine.run_reference(model, task, config)[0]


def test_engine_and_reference_compute_the_same_rows_and_numbers(tables):
    engine_table, reference_table = tables
    result = engine.agreement(engine_table, reference_table)
    assert result["rows_only_one_side"] == 0
    layer0_simam_delta = int(((reference_table.metric == "simam_delta") & (reference_table.layer == 0)).sum())
    assert result["rows_compared"] + layer0_simam_delta == len(reference_table) == len(engine_table) > 100
    assert result["simaou_layer_mean_diff"] < 1e-4
    assert result["max_row_diff"] < 1e-4
    assert {"simaou", "simaou_norm", "simam_before", "simam_after", "simam_delta", "accuracy"} <= set(
        result["max_row_diff_per_metric"]
    )


def test_agreement_catches_a_difference(tables):
    """The check can fail: a shifted SimAOU value on one side is reported."""
    engine_table, reference_table = tables
    broken = reference_table.copy()
    row = broken.index[(broken.metric == "simaou") & (broken["head"] == -1) & (broken.layer == 1)][0]
    broken.loc[row, "value"] += 0.1
    result = engine.agreement(engine_table, broken)
    assert result["max_row_diff"] == pytest.approx(0.1, abs=1e-4)
    assert result["simaou_layer_mean_diff"] == pytest.approx(
        0.1 / 8, abs=1e-4
    )  # 2 episodes x 4 queries per layer
    assert engine.agreement(engine_table, broken.drop(index=row))["rows_only_one_side"] == 1


def test_reference_sgd_matches_the_engine_deltas(model, task):
    """The reference's deep-copied, SGD-tuned K/V weights equal W + dW of train_deltas."""
    episode = task.episodes(3, 1, 2, seed=1)[0]
    tuned = finetune_kv(model, model.tokenizer, task, episode, lr=0.05)
    deltas = train_deltas(model, model.tokenizer, task, [episode], GDConfig.dai(lr=0.05))
    for path, dw in deltas.tensors.items():
        w0 = model.get_submodule(path).original_component.weight
        w1 = tuned.get_submodule(path).original_component.weight
        assert dw[0].abs().max() > 1e-4  # GD moved the weights
        assert torch.allclose(w1, w0 + dw[0], atol=1e-6)
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_memory_accounting(model, task):
    prompt = engine.prompt_of_length(model.tokenizer, task, 96)
    assert prompt.input_ids.shape == (1, 96) and int(prompt.attention_mask.sum()) == 96
    rows = engine.measure_memory(model, task, n_tokens=96)
    bench = [r for r in rows if r["probes"].startswith("benchmark")]
    # 3 probes keep per layer: attn_out [d_model] + head_out [heads, d_head] + scores [heads, 2 query tokens],
    # plus the logits [vocab] (+ the segments of the pass)
    per_layer = MICRO.d_model * 2 + MICRO.n_heads * 2
    expected_min = 4 * (MICRO.n_layers * per_layer + model.cfg.d_vocab)
    assert all(expected_min <= r["recorded_bytes"] < 4 * expected_min for r in bench)
    assert all(r["full_cache_bytes"] > 50 * r["recorded_bytes"] for r in bench)


def test_quick_run_prints_the_tables(capsys):
    engine.main(
        threads=1,
        quick=True,
        reps=1,
        scaling=False,
        rss=False,
        memory_tokens=64,
        json_out=None,
        rss_child_spec=None,
    )
    out = capsys.readouterr().out
    assert "## speed" in out and "## recorded memory" in out and "(OK: < 1e-4)" in out
    assert "measured fp32 matmul peak" in out and "| C + every baseline |" in out and "| published |" in out
    assert "| C, every default metric |" in out
    assert "measured again after the speed tables" in out


@pytest.mark.parametrize("end_peak, used", [(2e11, 2e11), (5e10, 1e11)])
def test_the_shares_of_the_peak_use_the_larger_of_two_measurements(monkeypatch, end_peak, used):
    """The speed rows' shares are recomputed against the larger of the peaks measured before and
    after the timings, from the unrounded seconds and FLOPs (not from the rounded columns)."""
    rows = [
        {
            "seconds": 0.4,  # rounded: the shares must not be computed from it
            "GFLOP counted": 1.0,
            "GFLOP needed": 0.5,
            "% of matmul peak": 0.0,
            "needed % of peak": 0.0,
            "unrounded": {"seconds": 0.4444, "flops": 1.0e10, "needed_flops": 0.5e10},
        }
    ]
    results = {"matmul_peak": {"flops_per_s": 1e11}, "speed": rows}
    monkeypatch.setattr(engine, "matmul_peak", lambda threads: {"flops_per_s": end_peak, "per_size": {}})
    assert engine.settle_peak(results, threads=1) == used
    assert results["matmul_peak_used"] == used and results["matmul_peak"]["flops_per_s"] == 1e11
    row = results["speed"][0]
    assert row["% of matmul peak"] == round(100 * 1.0e10 / 0.4444 / used, 1)
    assert row["needed % of peak"] == round(100 * 0.5e10 / 0.4444 / used, 1)


@pytest.mark.parametrize("variant", ["A", "B", "C"])
def test_hand_written_alternatives_give_the_engine_rows(model, task, tables, variant):
    """A, B and C (plain HF, benchmarks/hf_alternatives.py) produce exactly the engine's rows and
    numbers; C with every baseline the rows of compare(baselines=True) with the benchmark probes."""
    from hf_alternatives import alternative, plain_copy

    config = engine.Config(k=3, n_episodes=2, n_queries=4, lr=0.05)
    episodes = task.episodes(config.k, config.n_episodes, config.n_queries, config.seed)
    hf = plain_copy(model)
    assert not any("original_component" in name for name, _ in hf.named_modules())  # no bridge inside
    table = alternative(hf, model.tokenizer, task, episodes, variant=variant, lr=config.lr)
    result = engine.agreement(tables[0], table)
    assert result["rows_only_one_side"] == 0 and result["rows_compared"] > 100
    assert result["max_row_diff"] < 1e-4
    if variant == "C":
        full = alternative(
            hf, model.tokenizer, task, episodes, variant="C", lr=config.lr, baselines=engine.ALL_BASELINES
        )
        reference = engine.engine_compare(model, task, config, engine.BENCH_PROBES, True, False)
        result = engine.agreement(reference, full)
        assert result["rows_only_one_side"] == 0 and result["max_row_diff"] < 1e-4
        assert {"icl~icl_perm", "icl~random_update", "icl~random", "untrained:icl~gd"} <= set(full.comparison)


DEFAULT_ONLY = {
    "dw_cos",
    "dw_action_cos",
    "dual_form_cos",
    "dual_form_rel_err",
    "kendall_token",
    "kendall_example",
    "kendall_token_per_head",
    "kendall_example_per_head",
    "probe:resid_out",
}
"""Metrics of the default probes (kv_outer, query_vectors, demo_attention, resid_out) beyond C's
benchmark set."""


def test_c_with_every_default_metric_gives_the_default_compare_rows(model, task):
    """C doing every default metric (plain HF, benchmarks/hf_default_metrics.py: dW from the prefix's
    KV cache and recomputed rotary keys, Dai's Kendall from the queries GD saw, the per-head Kendall,
    resid_out, ...) gives exactly the rows of compare()'s defaults with every baseline (none missing on
    either side) and their numbers."""
    from hf_alternatives import alternative, plain_copy

    config = engine.Config(k=3, n_episodes=2, n_queries=4, lr=0.05)
    episodes = task.episodes(config.k, config.n_episodes, config.n_queries, config.seed)
    reference = engine.engine_compare(model, task, config, None, True, False)
    full = alternative(
        plain_copy(model),
        model.tokenizer,
        task,
        episodes,
        variant="C",
        lr=config.lr,
        baselines=engine.ALL_BASELINES,
        metrics="default",
    )
    result = engine.agreement(reference, full)
    assert result["rows_only_one_side"] == 0 and result["rows_compared"] > 2000
    assert result["max_row_diff"] < 1e-4
    assert DEFAULT_ONLY | {"accuracy_vocab", "simaou", "simam_delta"} <= set(
        result["max_row_diff_per_metric"]
    )
    for metric in DEFAULT_ONLY:  # numbers on both sides, not NaN = NaN
        values = full[full.metric == metric]
        assert values.value.notna().mean() > 0.9 and values.value.std() > 0.01, metric
    compared = set(zip(full.metric, full.comparison))
    for metric in ("dw_cos", "dw_action_cos", "kendall_token", "kendall_token_per_head", "probe:resid_out"):
        assert {
            (metric, "untrained:icl~gd"),
            (metric, "icl~random_update" if "dw" in metric else "icl~random"),
        } <= compared


def test_minimum_flops_counts_gd_and_the_passes(model, task):
    """The least-FLOPs count grows with every part of the work it names, and baselines more than
    double it (the untrained copy runs the pipeline again)."""
    from machine import minimum_flops

    cfg = model.original_model.config
    few, more = task.episodes(3, 2, 4, 0), task.episodes(6, 2, 4, 0)
    base = minimum_flops(cfg, model.tokenizer, task, few, baselines=False)
    assert 0 < base < minimum_flops(cfg, model.tokenizer, task, more, baselines=False)
    assert minimum_flops(cfg, model.tokenizer, task, few, baselines=True) > 2 * base


def test_needed_gd_flops_agree_with_torchs_flop_counter(model, task):
    """GD's part of the least FLOPs against what torch.utils.flop_counter counts in train_deltas
    (which pads each step to its longest demonstration and computes every logit): never more
    than counted (up to 2%: the least count includes dense K/V weight gradients, 2 P_kv per token,
    which SGD's low-rank factors never form), and not far below."""
    from machine import counted_flops, needed_flops

    from iclgd_lens.engine.gd import GDConfig
    from iclgd_lens.engine.gd.train import train_deltas

    episodes = task.episodes(3, 2, 4, 0)
    need = needed_flops(model.original_model.config, model.tokenizer, task, episodes, baselines=False)
    counted, _ = counted_flops(
        lambda: train_deltas(model, model.tokenizer, task, episodes, GDConfig.dai(lr=0.05))
    )
    assert 0.6 * counted <= need["gd"] <= 1.02 * counted


LOADED_DISTRIBUTIONS = """
import importlib.metadata as md, runpy, sys
from pathlib import Path
sys.argv = [sys.argv[1], "--dry-run"]
runpy.run_path(sys.argv[0], run_name="__main__")
owner = {}
for dist in md.distributions():
    for f in dist.files or ():
        if f.suffix in (".py", ".so"):
            owner[str(Path(dist.locate_file(f)).resolve())] = dist.metadata["Name"]
files = [getattr(m, "__file__", None) for m in list(sys.modules.values())]
names = {owner.get(str(Path(f).resolve())) for f in files if f}
print("DISTRIBUTIONS " + " ".join(sorted(n for n in names if n)))
"""
"""Runs the GPU check's dry run (its path: the first argument), then prints every installed
distribution that owns a loaded module."""


def _names(path: Path) -> dict[str, str]:
    """{normalised name: version or ''} of a requirements-style file (comments skipped)."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def test_gpu_check_dry_run_on_the_cpu_and_what_the_device_needs():
    """benchmarks/gpu_check.sh --dry-run runs the GPU run's own function (`run_check`) on the small
    config on the CPU; and every distribution it loads is either in the device machine's image
    (benchmarks/gpu_image_packages.txt) or among the wheels carried there (benchmarks/gpu_wheels.txt,
    at requirements.lock's versions), so that the GPU run does not stop at an import."""
    root = BENCHMARKS.parent
    out = subprocess.run(
        [sys.executable, "-c", LOADED_DISTRIBUTIONS, str(BENCHMARKS / "gpu_check.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for key in (
        "versions:",
        "plan: LLaMA-7B shape",
        "batch_size:",
        "phases_s: total",
        "rows:",
        "small_fp32_cpu_vs_cpu_max_diff:",
        "gd_update_over_h_by_layer:",
        "batch_shape_noise_over_h_by_layer:",
    ):
        assert key in out.stdout, key
    loaded = out.stdout.split("DISTRIBUTIONS ")[-1].split()
    image = _names(BENCHMARKS / "gpu_image_packages.txt")
    carried = _names(BENCHMARKS / "gpu_wheels.txt")
    lock = _names(root / "requirements.lock")
    missing = [
        n for n in loaded if re.sub(r"[-_.]+", "-", n).lower() not in {**image, **carried, "iclgd-lens": ""}
    ]
    assert not missing, f"the GPU check imports {missing}, neither in the device image nor carried"
    assert {"transformer-lens", "transformers"} <= set(carried)
    assert {n: v for n, v in carried.items() if lock.get(n) != v} == {}, "carried wheels must match the lock"


def test_ceilings_follow_from_the_rates_and_the_needed_flops(model, task):
    """With every pass at the peak, the benchmark setting reaches 100% of it and its k-scaling is
    the needed FLOPs' ratio; with GD's steps at half the peak, both follow the FLOP split."""
    from machine import needed_flops

    peak = 1e11
    labels = list(engine.ENGINE_SHAPES)
    full = engine.ceilings(dict.fromkeys(labels, peak), peak, model, task)
    need = {
        k: needed_flops(
            model.original_model.config, model.tokenizer, task, task.episodes(k, 8, 32, 0), baselines=False
        )
        for k in (16, 32)
    }
    total = {k: sum(n.values()) for k, n in need.items()}
    assert full[0]["at the passes' ceilings"] == "100.0%"
    assert full[1]["at the passes' ceilings"] == f"{total[32] / total[16]:.2f}x"
    slow_gd = engine.ceilings({**dict.fromkeys(labels, peak), labels[0]: peak / 2}, peak, model, task)
    share = total[16] / (2 * need[16]["gd"] + need[16]["passes"])
    assert slow_gd[0]["at the passes' ceilings"] == f"{100 * share:.1f}%"
    ratio = (2 * need[32]["gd"] + need[32]["passes"]) / (2 * need[16]["gd"] + need[16]["passes"])
    assert slow_gd[1]["at the passes' ceilings"] == f"{ratio:.2f}x"
    default = needed_flops(
        model.original_model.config, model.tokenizer, task, task.episodes(16, 8, 32, 0), baselines=True
    )
    assert full[2]["at the passes' ceilings"] == "100.0%"
    default_share = sum(default.values()) / (2 * default["gd"] + default["passes"])
    assert slow_gd[2]["at the passes' ceilings"] == f"{100 * default_share:.1f}%"
    assert default_share != share  # the untrained model's GD steps weigh differently


def test_pass_overhead_times_both_sides_and_leaves_the_model_as_it_was(model):
    """benchmarks/machine.py's pass_times (pass_overhead.py, engine.py's targets): four positive
    timings, the bridge's requires_grad flags kept."""
    from machine import pass_times

    flags = [p.requires_grad for p in model.parameters()]
    times = pass_times(model, reps=1)
    assert len(times) == 4 and all(ms > 0 for ms in times.values())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_phase_times_split_a_default_compare(model, task):
    """benchmarks/machine.py's phase_times: the micro model's default compare (k = 3, 2 demo
    sets; Dai's batch-1 GD, run for the comparison and the untrained baseline) makes 2 x 3 GD
    steps; the phases add up to the whole; the bridge holds no hook after it."""
    from machine import phase_times

    c = engine.Config(k=3, n_episodes=2, n_queries=4, lr=0.05)
    p = phase_times(model, lambda: engine.engine_compare(model, task, c, None, True, True))
    assert p["gd_steps"] == 2 * 3 and p["passes"] > 0
    assert min(p["gd_s"], p["passes_s"], p["tables_s"]) > 0
    parts = p["gd_s"] + p["passes_s"] + p["tables_s"] + p["rest_s"]
    assert parts == pytest.approx(p["total_s"]) and p["rest_s"] >= 0
    assert not model._forward_hooks and not model._forward_pre_hooks


def test_targets_say_met_or_the_gap_and_its_cause():
    """The targets table of benchmarks/engine.py, from a made-up run: a met target has no gap and
    no cause; a missed one has the factor missing and a cause built from the run's own figures."""
    tiny, mid = "tiny", "mid"

    def speed(model, setting, side, speedup, share, seconds=1.0):
        """A speed row; its unrounded seconds and FLOPs (at a peak of 1e11) are what targets read."""
        flops = share / 100 * 1e11 * seconds
        return {
            "model": model,
            "setting": setting,
            "side": side,
            "engine speedup": speedup,
            "% of matmul peak": share,
            "seconds": seconds,
            "unrounded": {"seconds": seconds, "flops": flops, "needed_flops": flops},
        }

    passes = {
        "forward + backward, bridge ms": 8.0,
        "forward + backward, plain HF ms": 5.0,
        "no-grad forward, bridge ms": 4.0,
        "no-grad forward, plain HF ms": 2.0,
    }
    # 10 GD steps x (8 - 5) ms + 20 other passes x (4 - 2) ms = 0.07 s of a 1 s run
    phases = dict(total_s=1.0, gd_s=0.4, passes_s=0.3, tables_s=0.2, rest_s=0.1, gd_steps=10, passes=20)
    results = {
        "speed": [
            speed(mid, "default", engine.DEFAULT_C, 1.5, 20.0, seconds=6.0),
            speed(mid, "default", "engine default compare", 1.0, 25.0, seconds=4.0),
            speed(tiny, "default", engine.DEFAULT_C, 2.0, 5.0, seconds=2.0),
            speed(tiny, "default", "engine default compare", 1.0, 5.0),
            speed(mid, "benchmark", "engine", 1.0, 35.0),
        ],
        "scaling": [
            {"side": "engine", "ratio": 1.76, "unrounded": {"ratio": 1.76}},
            {"side": "C", "ratio": 1.73, "unrounded": {"ratio": 1.73}},
        ],
        "matmul_peak_used": 1e11,
        "rss": [
            {
                "setting": "default",
                "side": "engine default compare",
                "growth MB": 300,
                "model / measured": 0.9,
            },
            {"setting": "default", "side": engine.DEFAULT_C, "growth MB": 100, "model / measured": ""},
            {"setting": "benchmark", "side": "engine", "growth MB": 100, "model / measured": 1.3},
        ],
        "shapes": [{"% of matmul peak": 51.0}],
        "ceiling_figures": {
            "share_of_peak": 69.0,
            "k_ratio": 1.64,
            "gd_share": 37.0,
            "flops_ratio": 1.55,
            "gd_flops_ratio": 2.0,
            "gd_step_matmul_s": 0.035,
            "default_share_of_peak": 66.0,
        },
        "passes": {tiny: passes, mid: passes},
        "phases": {tiny: phases, mid: phases},
    }
    rows = {r["target"].split(" (")[0]: r for r in engine.targets(results, tiny, mid)}
    three = rows["default compare >= 3x faster than C doing every default metric"]
    assert (
        three["met"] == "no"
        and three["missing factor"] == "2.00x"
        # the engine's FLOPs (25% of the peak for 4 s) in a third of C's 6 s: 25% x 3 / 1.5
        and "in a third of C's time, at 50% of the peak (25% reached; C at 20%)" in three["cause (this run)"]
        and "allows 66% in this setting" in three["cause (this run)"]
        and "GD 0.40 s (10 steps, 40.0 ms each), 20 other passes 0.30 s, tables 0.20 s"
        in three["cause (this run)"]
        and "accounts for 0.07 s of it" in three["cause (this run)"]
        and f"at plain HF's, {6.0 / (4.0 * 0.93):.2f}x C" in three["cause (this run)"]
    )
    tiny_row = next(r for r in engine.targets(results, tiny, mid) if "(tiny)" in r["target"])
    assert (
        tiny_row["met"] == "yes" and tiny_row["missing factor"] == "" and tiny_row["cause (this run)"] == ""
    )
    assert rows[">= 50% of the matmul peak on mid"]["missing factor"] == f"{50 / 35:.2f}x"
    k_row = rows["k 16 -> 32 at most 1.6x the time"]
    assert (
        k_row["met"] == "no"
        and k_row["missing factor"] == f"{1.76 / 1.6:.2f}x"
        and "1.64x" in k_row["cause (this run)"]
    )
    results["speed"][2] = speed(tiny, "default", engine.DEFAULT_C, 0.9, 5.0, seconds=0.9)
    slow_tiny = next(r for r in engine.targets(results, tiny, mid) if "(tiny)" in r["target"])
    assert slow_tiny["met"] == "no" and slow_tiny["missing factor"] == f"{1.5 / 0.9:.2f}x"
    assert "C takes 0.90 s" in slow_tiny["cause (this run)"]
    assert f"at plain HF's, {0.9 / 0.93:.2f}x C" in slow_tiny["cause (this run)"]
    rss_row = rows["peak RSS growth of the default compare <= 2x C's"]
    assert rss_row["met"] == "no" and rss_row["measured"] == "3.00x"
    memory_rows = [r for r in engine.targets(results, tiny, mid) if r["target"].startswith("memory model")]
    assert [r["met"] for r in memory_rows] == ["no", "yes"]
    # met or not by the measured value, not by its rounding: 49.96% shows as 50.0 in the speed
    # table and 1.6004x as 1.60 in the k table, and neither is met
    results["speed"][4] = {**speed(mid, "benchmark", "engine", 1.0, 49.96), "% of matmul peak": 50.0}
    results["scaling"][0] = {"side": "engine", "ratio": 1.6, "unrounded": {"ratio": 1.6004}}
    edge = {r["target"].split(" (")[0]: r for r in engine.targets(results, tiny, mid)}
    assert edge[">= 50% of the matmul peak on mid"]["met"] == "no"
    assert edge[">= 50% of the matmul peak on mid"]["measured"] == "49.96%"
    assert edge["k 16 -> 32 at most 1.6x the time"]["met"] == "no"
    assert edge["k 16 -> 32 at most 1.6x the time"]["measured"] == "1.600x"
