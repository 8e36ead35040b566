"""In-context vs in-weight learning: the generator's guarantees and the gated model's behaviour."""

import pytest
import torch

from iclgd_lens.worlds import chan
from iclgd_lens.analyses import icl_vs_iwl
from iclgd_lens.errors import IclgdError

torch.set_num_threads(1)


def _world(**kw):
    return chan.make_world(chan.ChanSetting(**kw), seed=0)


def test_context_holds_query_class_with_probability_p_relevant():
    world = _world(n_classes=50, n_high=5, p_relevant=0.3)
    data = chan.sample_sequences(world, 4000, torch.Generator().manual_seed(1))
    has_query = (data.context_labels == data.query_labels[:, None]).any(1).float().mean().item()
    # "at least one" copy plus chance repeats drawn at class frequency: a bit above p_relevant
    assert 0.3 <= has_query < 0.4


def test_exact_copies_and_none_when_irrelevant():
    world = _world(n_classes=50, n_high=5, context_len=6, n_relevant=2, p_relevant=0.5)
    data = chan.sample_sequences(world, 2000, torch.Generator().manual_seed(2))
    copies = (data.context_labels == data.query_labels[:, None]).sum(1)
    assert set(copies.tolist()) == {0, 2}
    none = chan.sample_sequences(world, 2000, torch.Generator().manual_seed(3), p_relevant=0.0)
    assert not (none.context_labels == none.query_labels[:, None]).any()


def test_group_frequencies_and_shifted_labels():
    world = _world(n_classes=40, n_high=4, p_high=0.75)
    assert world.class_probs[world.is_high].sum().item() == pytest.approx(0.75, abs=1e-6)
    data = chan.sample_sequences(world, 8000, torch.Generator().manual_seed(4))
    assert world.is_high[data.query_classes].float().mean().item() == pytest.approx(0.75, abs=0.03)
    shifted = chan.shifted_label_map(world)
    assert (shifted != torch.arange(40)).all()  # every class changes label...
    assert (world.is_high[shifted] == world.is_high).all()  # ...within its own frequency group
    zipf = _world(n_classes=40, n_high=4, zipf_exponent=1.0).class_probs
    assert (zipf[:-1] > zipf[1:]).all() and zipf.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_bad_settings_raise_one_line_errors():
    for kw in (dict(p_relevant=1.5), dict(n_high=100, n_classes=100), dict(n_relevant=9, context_len=8)):
        with pytest.raises(IclgdError) as err:
            chan.make_world(chan.ChanSetting(**kw))
        assert "\n" not in str(err.value)
    with pytest.raises(IclgdError):
        icl_vs_iwl.run(n_train="64,abc")


FAST = dict(n_classes=100, n_high=10, steps=250, n_eval=200, n_train=(64, 4096))


def test_gate_moves_to_in_weight_on_frequent_classes_as_data_grow():
    result = icl_vs_iwl.run(**FAST)
    t = result.table
    gate = t[(t.metric == "gate") & (t.evaluation == "in_distribution") & (t.group == "high")].set_index("n_train").value
    assert gate[4096] > gate[64] + 0.1
    # the context reader still works on rare classes: shifted labels far better than chance
    shifted_low = t[(t.metric == "error") & (t.evaluation == "shifted_labels") & (t.group == "low")].value
    assert shifted_low.min() < 0.8
    assert "N=64" in result.findings and f"{gate[4096]:.2f}" in result.findings
    assert len(result.figures) == 2


def test_without_relevant_context_the_model_cannot_learn_in_context():
    t = icl_vs_iwl.run(**{**FAST, "n_train": (4096,)}, p_relevant=0.0).table
    shifted = t[(t.metric == "error") & (t.evaluation == "shifted_labels")].value
    assert (1 - shifted).max() < 0.05  # accuracy near chance (0.01) on both groups
    gate = t[(t.metric == "gate") & (t.evaluation == "in_distribution")].value
    assert gate.min() > 0.9  # everything is routed to the weights
