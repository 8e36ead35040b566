"""docs/extending.md's worked example: a user hook file on the command line ends up as its own
section of the generated report (and in the results table), with no other code."""

import re
from pathlib import Path

from iclgd_lens.hooks import PROBES
from tiny import tiny_model_folder
from typer.testing import CliRunner

from iclgd_lens.cli import app
from iclgd_lens.engine.results import Results

DOC = Path(__file__).resolve().parents[1] / "docs" / "extending.md"


def test_hook_file_from_the_docs_gets_a_report_section(tmp_path):
    probe_code = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)[0]
    assert '@probe("mlp_out"' in probe_code
    hook_file = tmp_path / "mlp_probe.py"
    hook_file.write_text(probe_code)
    model = tiny_model_folder(tmp_path / "model")
    try:
        result = CliRunner().invoke(
            app,
            [
                "report",
                "--model",
                str(model),
                "--hooks",
                str(hook_file),
                "--k",
                "2",
                "--episodes",
                "1",
                "--queries",
                "4",
                "--out",
                str(tmp_path / "rep"),
                "--no-progress",
                "--threads",
                "1",
            ],
        )
    finally:
        PROBES.pop("mlp_out", None)
    assert result.exit_code == 0, result.output
    table = Results.load(tmp_path / "rep").table
    rows = table[(table.metric == "probe:mlp_out") & (table.comparison == "icl~gd")]
    assert sorted(rows.layer.unique()) == [0, 1] and rows.value.notna().all()
    index = (tmp_path / "rep" / "index.html").read_text()
    assert "probe:mlp_out" in index


def test_a_package_ships_probes_and_analyses_through_entry_points(tmp_path, monkeypatch):
    """docs/extending.md: an installed package's `iclgd_lens.hooks` entry point names a module
    whose @probe functions then count among compare()'s probes (and `list` shows them); its
    `iclgd_lens.analyses` one registers an analysis. The package here is a folder with a
    dist-info on sys.path, which importlib.metadata reads like any installed distribution."""
    from iclgd_lens import hooks
    from iclgd_lens.engine.compare import _probe_names
    from iclgd_lens.plugins import REGISTRY

    package = tmp_path / "ep_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "probes.py").write_text(
        "from iclgd_lens.hooks import probe\n"
        "@probe('ep_mlp', points=['blocks.{layer}.hook_mlp_out'])\n"
        "def ep_mlp(acts, ctx):\n"
        "    '''The MLP output at the read position.'''\n"
        "    return {}\n"
    )
    (package / "an.py").write_text("def plain(results):\n    return []\n")
    info = tmp_path / "ep_pkg-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: ep-pkg\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[iclgd_lens.hooks]\nmy_probes = ep_pkg.probes\n\n[iclgd_lens.analyses]\nep_plain = ep_pkg.an:plain\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(hooks, "_entry_points_loaded", False)
    try:
        assert "ep_mlp" in _probe_names(None)
        listed = CliRunner().invoke(app, ["list"]).stdout
        assert "ep_mlp: The MLP output at the read position." in listed and "ep_plain" in listed
    finally:
        PROBES.pop("ep_mlp", None)
        REGISTRY["analyses"].pop("ep_plain", None)


def test_a_failing_user_probe_names_the_way_out_and_unregister_removes_it():
    """A user probe that raises is recorded by every later default compare() until removed: its
    error says where it failed (here only on the untrained model's re-drawn weights) and how to
    remove it; `unregister` removes it and refuses built-in or unknown names."""
    import pytest
    from iclgd_lens.hooks import probe, unregister

    from iclgd_lens import compare, load_model
    from iclgd_lens.errors import IclgdError

    model = load_model()
    calls = {"n": 0, "fail_after": None}

    @probe("flaky_user_probe", points=["blocks.{layer}.hook_resid_post"])
    def flaky(acts, ctx):
        calls["n"] += 1
        if calls["fail_after"] is not None and calls["n"] > calls["fail_after"]:
            raise ValueError("boom")
        return {}

    kw = dict(k=2, n_episodes=2, n_queries=2, progress=False, artifacts=False)
    try:
        compare(model, baselines=False, **kw)  # counts the calls of the comparison itself
        calls["fail_after"], calls["n"] = calls["n"], 0
        with pytest.raises(IclgdError) as info:
            compare(model, baselines=["untrained"], **kw)  # the same calls, then the untrained pipeline's
        message = str(info.value)
        assert message.startswith(
            "in the untrained-model baseline: probe 'flaky_user_probe' raised ValueError: boom"
        ), message
        assert "remove it with iclgd_lens.hooks.unregister('flaky_user_probe')" in message
        assert "\n" not in message
    finally:
        unregister("flaky_user_probe")
    assert "flaky_user_probe" not in PROBES
    assert "flaky_user_probe" not in compare(model, baselines=False, **kw).config["probes"]
    with pytest.raises(IclgdError, match="'attn_out' is built in"):
        unregister("attn_out")
    with pytest.raises(IclgdError, match="no probe 'flaky_user_probe' is registered"):
        unregister("flaky_user_probe")


def _compare_with_probes(model, *probes_and_fns, **kw):
    """compare() with user probes registered for the call and removed after it."""
    from iclgd_lens.hooks import probe, unregister

    from iclgd_lens import compare

    names = []
    try:
        for name, fn in probes_and_fns:
            probe(name, points=["blocks.{layer}.hook_mlp_out"])(fn)
            names.append(name)
        return compare(model, k=2, n_episodes=2, n_queries=2, progress=False, artifacts=False, **kw)
    finally:
        for name in names:
            unregister(name)


def _mlp(acts, ctx):
    return acts["hook_mlp_out"][ctx.batch_index, ctx.read_pos]  # [batch, d_model]


def test_a_probe_of_some_layers_keeps_each_row_at_its_layer():
    """A probe that returns nothing at layers 0-1 (or skips GD at layer 0 only) gets NaN rows
    there and, at the layers it reads, exactly the values of the same probe reading every layer;
    it used to be stacked without its missing layers and filed under layers 0-1 (or crash)."""
    import numpy as np

    from iclgd_lens import load_model

    model = load_model()
    late = lambda acts, ctx: {"mlp_late": _mlp(acts, ctx)} if ctx.layer >= 2 else {}  # noqa: E731
    no_gd_at_0 = lambda acts, ctx: (  # noqa: E731
        {} if (ctx.layer == 0 and ctx.condition == "gd") else {"mlp_some": _mlp(acts, ctx)}
    )
    table = _compare_with_probes(
        model,
        ("mlp_every", lambda acts, ctx: {"mlp_every": _mlp(acts, ctx)}),
        ("mlp_late", late),
        ("mlp_some", no_gd_at_0),
        baselines=False,
    ).table
    rows = table[(table.comparison == "icl~gd") & (table["head"] == -1)]

    def values(metric):
        return rows[rows.metric == metric].sort_values(["episode", "query", "layer"])

    every, late_rows, some = values("probe:mlp_every"), values("probe:mlp_late"), values("probe:mlp_some")
    assert sorted(late_rows.layer.unique()) == [0, 1, 2, 3]
    assert late_rows[late_rows.layer < 2].value.isna().all()
    np.testing.assert_array_equal(
        late_rows[late_rows.layer >= 2].value.to_numpy(), every[every.layer >= 2].value.to_numpy()
    )
    assert some[some.layer == 0].value.isna().all()
    np.testing.assert_array_equal(
        some[some.layer > 0].value.to_numpy(), every[every.layer > 0].value.to_numpy()
    )


def test_a_compared_probe_of_one_number_per_row_is_refused_in_one_line():
    import pytest

    from iclgd_lens import load_model
    from iclgd_lens.errors import IclgdError

    with pytest.raises(IclgdError) as info:
        _compare_with_probes(
            load_model(),
            ("mlp_norm", lambda acts, ctx: {"mlp_norm": _mlp(acts, ctx).norm(dim=-1)}),
            baselines=False,
        )
    message = str(info.value)
    assert message.startswith("probe 'mlp_norm' returned 'mlp_norm' of shape (")
    assert "one number per row" in message and "compare=False" in message and "\n" not in message


def test_a_probe_without_a_gd_value_still_gets_its_icl_only_baselines():
    from iclgd_lens import load_model

    table = _compare_with_probes(
        load_model(),
        ("mlp_no_gd", lambda acts, ctx: {} if ctx.condition == "gd" else {"mlp_no_gd": _mlp(acts, ctx)}),
        baselines=["icl_perm", "random"],
    ).table
    comparisons = set(table[table.metric == "probe:mlp_no_gd"].comparison)
    assert comparisons == {"icl~icl_perm", "icl~random"}
