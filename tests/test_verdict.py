"""Tests of the verdict (iclgd_lens/engine/verdict.py) against what its marks claim: Holm's
correction against Holm's own sequential procedure, the chance of a false mark by simulation on
planted tables where the truth is known, the floors it names, and the ceiling share."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from iclgd_lens.engine import stats
from iclgd_lens.engine.results import Results
from iclgd_lens.engine.verdict import ABOVE, BELOW, UNDECIDED, min_episodes_to_mark, verdict
from tests.test_results import make_results


def _holm_rejections(p: np.ndarray, alpha: float) -> set[int]:
    """Holm (1979) as published: test the sorted p-values in turn, the i-th (from 1) against
    alpha / (m - i + 1), and stop at the first that fails."""
    defined = [i for i in range(len(p)) if not np.isnan(p[i])]
    m = len(defined)
    rejected = set()
    for step, i in enumerate(sorted(defined, key=lambda j: p[j])):
        if p[i] > alpha / (m - step):
            break
        rejected.add(i)
    return rejected


def test_holm_adjusted_p_values_reject_what_holms_procedure_rejects():
    rng = np.random.default_rng(0)
    for trial in range(300):
        m = int(rng.integers(1, 12))
        p = rng.random(m) ** rng.uniform(0.5, 4)  # from near-uniform to many small p-values
        p[rng.random(m) < 0.15] = np.nan
        adjusted = stats.holm_adjust(p)
        assert np.array_equal(np.isnan(adjusted), np.isnan(p))
        for alpha in (0.01, 0.05, 0.2):
            assert {i for i in range(m) if adjusted[i] <= alpha} == _holm_rejections(p, alpha), (p, alpha)


def _planted(rng, icl_gd: float, floors: dict[str, float], n_layers: int, n_episodes: int = 8) -> Results:
    """One metric (simaou) whose episode means are drawn around the given values per comparison:
    the truth of every mark is known."""
    rows = []
    for comparison, mean in {"icl~gd": icl_gd, **floors}.items():
        values = mean + 0.3 * rng.standard_normal((n_layers, n_episodes))
        for layer in range(n_layers):
            for episode in range(n_episodes):
                rows.append(("simaou", comparison, layer, -1, episode, 0, values[layer, episode]))
    columns = ["metric", "comparison", "layer", "head", "episode", "query", "value"]
    return Results(pd.DataFrame(rows, columns=columns))


def test_a_false_above_mark_among_a_metrics_layers_stays_below_alpha():
    """Deutch et al.'s case: ICL~GD far above the random floors but no better than the untrained
    model. Every "above all baselines" mark is then false; with Holm's correction across the
    layers a page shows one at most alpha of the time, where uncorrected marks show one far more
    often (the same pages)."""
    rng = np.random.default_rng(1)
    floors = {"icl~random": -2.0, "icl~random_update": -2.0, "untrained:icl~gd": 0.0}
    pages = [_planted(rng, 0.0, floors, n_layers=6) for _ in range(300)]
    false_pages = {
        correction: np.mean([(verdict(r, correction=correction).table["mark"] == ABOVE).any() for r in pages])
        for correction in ("holm", "none")
    }
    assert false_pages["holm"] <= 0.05, false_pages
    assert false_pages["none"] > 2 * false_pages["holm"] and false_pages["none"] > 0.06, false_pages


def test_a_real_difference_is_marked_in_both_directions():
    rng = np.random.default_rng(2)
    floors = {"icl~random": -2.0, "untrained:icl~gd": -2.0}
    assert (verdict(_planted(rng, 1.0, floors, n_layers=4)).table["mark"] == ABOVE).all()
    below = verdict(
        _planted(rng, 1.0, {"icl~random": -2.0, "untrained:icl~gd": 3.0}, n_layers=4, n_episodes=10)
    )
    assert (below.table["mark"] == BELOW).all()
    # one floor far below, one equal: the claim needs every floor beaten
    mixed = verdict(_planted(rng, 0.0, {"icl~random": -3.0, "untrained:icl~gd": 0.0}, n_layers=4))
    assert not (mixed.table["mark"] == ABOVE).any()


def test_the_text_says_when_the_correction_leaves_no_mark_possible():
    """8 episodes give p >= 0.0078; Holm over 32 layers asks for p < 0.0016 at the first."""
    assert min_episodes_to_mark(32) == 11 and min_episodes_to_mark(4) == 8 and min_episodes_to_mark(1) == 6
    assert stats.min_p_value(11) < 0.05 / 32 <= stats.min_p_value(10)
    rng = np.random.default_rng(3)
    found = verdict(_planted(rng, 1.0, {"icl~random": -2.0}, n_layers=32))
    assert (found.table["mark"] == UNDECIDED).all()
    assert "use at least 11 episodes" in found.text and "Holm's correction across 32 layers" in found.text
    uncorrected = verdict(_planted(rng, 1.0, {"icl~random": -2.0}, n_layers=32), correction="none")
    assert (uncorrected.table["mark"] == ABOVE).all() and "not corrected" in uncorrected.text
    one = verdict(_planted(rng, 1.0, {"icl~random": -2.0}, n_layers=2, n_episodes=1)).text
    assert "1 episode " in one and "1 episodes" not in one
    with pytest.raises(ValueError, match="correction"):
        verdict(_planted(rng, 1.0, {"icl~random": -2.0}, n_layers=2), correction="bonferroni")


def test_the_verdict_names_the_floors_each_metric_had_and_those_not_run():
    results = make_results(n_layers=2, n_episodes=8)
    text = results.verdict().text
    assert "Floors: random vector, random update of equal norm, untrained model (simaou)" in text
    assert "random vector (simaou_norm)" in text and "Not run" not in text
    only_random = results.table[~results.table["comparison"].isin(["icl~random_update", "untrained:icl~gd"])]
    text = Results(only_random, results.config, {}).verdict().text
    assert "Not run: random update of equal norm, untrained model" in text


def test_the_ceiling_share_is_given_only_above_a_ceiling_clear_of_zero():
    rng = np.random.default_rng(4)
    near_zero = verdict(_planted(rng, 0.5, {"icl~random": -2.0, "icl~icl_perm": 0.0}, n_layers=3))
    assert near_zero.table["of_ceiling"].isna().all() and "ceiling" not in near_zero.text
    clear = verdict(_planted(rng, 0.5, {"icl~random": -2.0, "icl~icl_perm": 1.0}, n_layers=3))
    assert clear.table["of_ceiling"].between(0.1, 1.5).all() and "of the ICL~ICL ceiling" in clear.text


def test_the_error_rate_benchmark_prints_its_tables(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "verdict_error_rates.py"
    spec = importlib.util.spec_from_file_location("verdict_error_rates", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(pages=3, layers=2, episodes=[8], seed=0)
    out = capsys.readouterr().out
    assert "| episodes | 6 | 7 | 8 | 9 | 10 | 11 | 11 | 12 |" in out
    assert out.count("| Deutch's case") == 2 and out.count("| full null") == 2
