"""Bad sweep specs, sweep options and study parameters: one line (exit 2 on the command line,
IclgdError in Python), no traceback, checked before anything is written (no store, no empty
folder, no fingerprints.json), and the user's files left as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from iclgd_lens.cli import app
from iclgd_lens.errors import IclgdError

runner = CliRunner()

OK = """
k = [2]
n_episodes = 2
n_queries = 2
threads = 1
"""


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (files with their bytes), to compare before and after."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(folder.rglob("*"))
    }


def one_error_line(result, fragment: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]


# (case id, what the spec adds to OK) -> a fragment the one line must contain
SPEC_CASES = [
    ("store-a-number", "store = 5", "store is a folder"),
    ("store-a-list", 'store = ["a"]', "store is a folder"),
    ("name-a-number", "name = 5", "name is text"),
    ("dtype-int8", 'dtype = "int8"', "unsupported dtype 'int8'"),
    ("probes-unknown", 'probes = ["nope"]', "unknown probe(s) ['nope']"),
    ("probes-not-names", "probes = [1]", "probes is a list of probe names"),
    ("baselines-unknown", 'baselines = ["nope"]', "unknown baseline(s) ['nope']"),
    ("device-a-number", "device = 5", "device is 'cpu'"),
    ("device-unknown", 'device = "gpu"', "got 'gpu'"),
    ("device-cuda-bad-index", 'device = "cuda:x"', "got 'cuda:x'"),
    ("device-auto", 'device = "auto"', "name the device the cells run on"),
    ("share-prefix-a-string", 'share_prefix = "no"', "share_prefix is true or false"),
    ("check-resources-a-string", 'check_resources = "yes"', "check_resources is true or false"),
    ("artifacts-a-number", "artifacts = 1", "artifacts is true or false"),
    ("threads-too-many", "threads = 100000", "threads must be from 1 to 1024"),
    ("seed-too-large", "seeds = [1099511627776]", "seeds must be at most 2147483647"),
    (
        "gd-layer-causal-a-string",
        'gd = [{preset = "dai", layer_causal = "false"}]',
        "layer_causal must be true",
    ),
    ("gd-layer-causal-yes", 'gd = [{preset = "deutch", layer_causal = "yes"}]', "layer_causal must be true"),
    ("gd-preset-a-list", 'gd = [{preset = ["dai", "shen"]}]', "a GD preset is one name"),
    ("gd-labels-alike", 'gd = [{preset = "dai", lr = [0.001, 0.0010000001]}]', "two GD settings read alike"),
    (
        "task-gd-lr-a-string",
        'tasks = [{name = "default", gd_lr = "fast"}]',
        "task gd_lr is a positive number",
    ),
    ("task-gd-lr-nan", 'tasks = [{name = "default", gd_lr = nan}]', "task gd_lr is a positive number"),
    ("task-label-words-a-string", 'tasks = [{name = "sst2", label_words = "ab"}]', "label_words is a list"),
    ("task-template-a-number", 'tasks = [{name = "sst2", template = 5}]', "task template is text"),
    ("task-max-examples-zero", 'tasks = [{name = "sst2", max_examples = 0}]', "max_examples is a whole"),
    ("model-folder-missing", 'models = ["./nope"]', "model folder ./nope does not exist"),
    (
        "model-abs-folder-missing",
        'models = ["/nonexistent/llama"]',
        "model folder /nonexistent/llama does not",
    ),
    ("study-unknown", '[study]\nname = "nope"', "unknown study 'nope'"),
    (
        "study-unknown-parameter",
        '[study]\nname = "causal"\nnope = 1',
        "study 'causal' has no parameter 'nope'",
    ),
    ("study-bool-a-string", '[study]\nname = "causal"\nuntrained = "no"', "untrained must be true or false"),
    ("study-text-a-number", '[study]\nname = "causal"\nrope = 5', "rope must be text"),
    (
        "study-int-a-float",
        '[study]\nname = "order-sensitivity"\nn_permutations = 2.5',
        "n_permutations must be a whole number",
    ),
]


def spec_file(folder: Path, extra: str) -> Path:
    body = OK.replace("threads = 1\n", "") if extra.startswith("threads") else OK
    body = body.replace("k = [2]\n", "k = [2]\n" + (extra + "\n" if not extra.startswith("[") else ""))
    path = folder / "spec.toml"
    path.write_text(body + (extra + "\n" if extra.startswith("[") else ""))
    return path


@pytest.mark.parametrize("mode", ["run", "--dry-run", "--status"])
@pytest.mark.parametrize("extra,fragment", [c[1:] for c in SPEC_CASES], ids=[c[0] for c in SPEC_CASES])
def test_a_bad_spec_is_one_line_before_anything_is_written(tmp_path, monkeypatch, extra, fragment, mode):
    monkeypatch.chdir(tmp_path)
    spec = spec_file(tmp_path, extra)
    before = tree(tmp_path)
    argv = ["sweep", str(spec), "--store", str(tmp_path / "store")] + ([] if mode == "run" else [mode])
    one_error_line(runner.invoke(app, argv), fragment)
    assert tree(tmp_path) == before  # no store, no iclgd-store/, the spec unchanged


# (case id, extra command line) -> fragment; the spec itself is fine
OPTION_CASES = [
    ("set-store-a-number", ["--set", "store=5"], "store is a folder"),
    ("set-share-prefix-a-string", ["--set", "share_prefix=no"], "share_prefix is true or false"),
    ("set-device-unknown", ["--set", "device=gpu"], "got 'gpu'"),
    ("set-k-zero-alone", ["--set", "k=0"], "k = [0] alone trains nothing"),
    ("unknown-submitit-cluster", ["--executor", "submitit", "--cluster", "foo"], "unknown cluster 'foo'"),
    ("negative-mem-gb", ["--executor", "submitit", "--cluster", "local", "--mem-gb", "-1"], "--mem-gb"),
    ("zero-mem-gb", ["--executor", "submitit", "--cluster", "local", "--mem-gb", "0"], "--mem-gb"),
    ("negative-mem-gb-local-executor", ["--mem-gb", "-1"], "--mem-gb"),
    ("model-option-folder-missing", ["--model", "./nope"], "model folder ./nope does not exist"),
    ("store-is-someone-elses-folder", ["--store", "{dir}/foreign"], "refusing to write a store into"),
]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_bad_sweep_options_are_one_line_before_anything_is_written(tmp_path, monkeypatch, argv, fragment):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text(OK)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "thesis.tex").write_text("mine")
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    store = [] if "--store" in argv else ["--store", str(tmp_path / "store")]
    before = tree(tmp_path)
    one_error_line(runner.invoke(app, ["sweep", str(tmp_path / "spec.toml"), *store, *argv]), fragment)
    assert tree(tmp_path) == before
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "mine"


@pytest.mark.parametrize("place", ["missing", "empty-folder", "empty-store"])
@pytest.mark.parametrize("mode", ["--status", "--dry-run"])
def test_listing_a_sweep_writes_nothing(tmp_path, monkeypatch, place, mode):
    """--status and --dry-run leave the store as it was (no fingerprints.json, no folders), even
    when the model's files are hashed anew."""
    from iclgd_lens.sweep import identity
    from iclgd_lens.sweep.store import Store

    monkeypatch.setattr(identity, "_FILE_HASHES", {})  # as in a fresh process
    monkeypatch.chdir(tmp_path)
    (tmp_path / "spec.toml").write_text(OK)
    root = tmp_path / "store"
    if place == "empty-folder":
        root.mkdir()
    elif place == "empty-store":
        Store(root).create()
    before = tree(tmp_path)
    result = runner.invoke(app, ["sweep", str(tmp_path / "spec.toml"), "--store", str(root), mode])
    assert result.exit_code == 0, result.output
    assert "1 cells (1 missing)" in result.stdout
    assert tree(tmp_path) == before


def test_run_sweep_in_python_checks_everything_before_the_store_is_made(tmp_path):
    from iclgd_lens.sweep import SweepSpec, plan, run_sweep

    ok = SweepSpec(k=[2], n_episodes=2, n_queries=2)
    bad = [
        (dict(spec=SweepSpec(dtype="int8")), "unsupported dtype"),
        (dict(spec=SweepSpec(share_prefix="no")), "share_prefix is true or false"),
        (dict(spec=SweepSpec(k=[0, 0], n_episodes=2, n_queries=2)), "k = \\[0\\] alone trains nothing"),
        (dict(spec=SweepSpec(study={"name": "causal", "k": 1.5})), "k must be a whole number"),
        (dict(spec=ok, executor="submitit", cluster="foo"), "unknown cluster"),
        (dict(spec=ok, executor="submitit", cluster="local", mem_gb=-1), "mem_gb"),
        (dict(spec=ok, executor="local", bogus=1), "takes no option 'bogus'"),
        (dict(spec=ok, executor="ray", num_cpus=0), "num_cpus"),
    ]
    for kwargs, fragment in bad:
        with pytest.raises(IclgdError, match=fragment) as info:
            run_sweep(store=tmp_path / "store", **kwargs)
        assert "\n" not in str(info.value)
        assert not (tmp_path / "store").exists(), kwargs
    assert not list(tmp_path.iterdir())
    (tmp_path / "store").mkdir()
    plan(ok, tmp_path / "store")  # planning reads the store, never writes it
    assert not list((tmp_path / "store").iterdir())


def test_a_sweep_that_runs_still_saves_its_fingerprints(tmp_path):
    from iclgd_lens.sweep import SweepSpec, run_sweep

    summary = run_sweep(SweepSpec(k=[1], n_episodes=2, n_queries=2, baselines=False), tmp_path / "store")
    assert len(summary.computed) == 1 and not summary.failed
    assert (tmp_path / "store" / "fingerprints.json").is_file()


# ---- study parameters --------------------------------------------------------------------------------
# (study, --set) -> fragment: every study checks its int / float / bool / str parameters up front
STUDY_CASES = [
    ("order-sensitivity", "k=abc", "k must be a whole number, got 'abc'"),
    ("order-sensitivity", "n_permutations=abc", "n_permutations must be a whole number"),
    ("order-sensitivity", "seed=abc", "seed must be a whole number"),
    ("causal", "k=1.5", "k must be a whole number, got 1.5"),
    ("causal", "heads=1", "heads must be true or false"),
    ("weight-properties", "d_x=abc", "d_x must be a whole number"),
    ("weight-properties", "lr=abc", "lr must be a finite number"),
    ("weight-properties", "lr=NaN", "lr must be a finite number"),
    ("gd-trajectories", "k=abc", "k must be a whole number"),
    ("k-sweep", "n_episodes=true", "n_episodes must be a whole number"),
    ("iclobj-vs-emergent", "alpha=abc", "alpha must be a finite number"),
    ("icl-vs-iwl", "steps=1.5", "steps must be a whole number or null"),
    ("conflict-probe", "ft_epochs=abc", "ft_epochs must be a whole number"),
]


@pytest.mark.parametrize("name,setting,fragment", STUDY_CASES, ids=[f"{c[0]}-{c[1]}" for c in STUDY_CASES])
def test_a_study_parameter_of_the_wrong_type_is_one_line(tmp_path, monkeypatch, name, setting, fragment):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app,
        ["study", name, "--set", setting, "--out", str(tmp_path / "rep"), "--no-progress", "--threads", "1"],
    )
    one_error_line(result, f"study {name!r}: {fragment}")
    assert not list(tmp_path.iterdir())


def test_study_functions_check_their_arguments_in_python_too():
    """The built-in studies' `run` refuse a wrong type before any work; whole floats become ints."""
    from iclgd_lens.analyses import causal, order_sensitivity, weight_properties

    from iclgd_lens.study import check_study_args

    for call, fragment in [
        (lambda: order_sensitivity.run(k="abc"), "study 'order-sensitivity': k must be a whole number"),
        (lambda: causal.run(k=1.5), "study 'causal': k must be a whole number"),
        (lambda: weight_properties.run(d_x="abc"), "study 'weight-properties': d_x must be a whole number"),
    ]:
        with pytest.raises(IclgdError, match=fragment):
            call()
    checked = check_study_args(causal.run, {"k": 2.0, "untrained": False, "model": object()})
    assert checked["k"] == 2 and type(checked["k"]) is int and checked["untrained"] is False


# ---- render --store --------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["results-file", "store-folder"])
def test_render_store_applies_only_to_a_spec(tmp_path, what):
    if what == "results-file":
        from test_results import make_results

        source = make_results(n_layers=2, n_episodes=2, n_queries=2).save(tmp_path / "run")
    else:
        source = tmp_path / "a-store"
        (source / "cells").mkdir(parents=True)
    before = tree(tmp_path)
    result = runner.invoke(
        app, ["render", str(source), "--store", str(tmp_path / "other"), "--out", str(tmp_path / "rep")]
    )
    one_error_line(result, "--store applies only to a sweep spec")
    assert tree(tmp_path) == before


def plugin_study(n: int = 3, scale: float = 1.0, seed: int = 0):
    """A study from outside the package (no decorator): the CLI checks its parameters itself."""
    import pandas as pd

    from iclgd_lens.study import StudyResult

    return StudyResult("plugin", "?", pd.DataFrame({"v": [scale * i for i in range(n)]}))


@pytest.mark.parametrize(
    "setting,fragment", [("n=abc", "n must be a whole number"), ("scale=x", "scale must be")]
)
def test_a_plugin_study_parameter_of_the_wrong_type_is_one_line(tmp_path, monkeypatch, setting, fragment):
    from iclgd_lens import analyses

    monkeypatch.setitem(analyses.STUDIES, "plugin", "test_bad_specs:plugin_study")
    result = runner.invoke(app, ["study", "plugin", "--set", setting, "--out", str(tmp_path / "rep")])
    one_error_line(result, f"study 'plugin': {fragment}")
    assert not list(tmp_path.iterdir())


def test_a_damaged_cell_record_is_one_line(tmp_path):
    """cell.json that parses but is no record (a list) is refused naming the file, not an
    AttributeError in the report."""
    from iclgd_lens.sweep.store import CELL_JSON, Store

    store = Store(tmp_path / "store")
    store.create()
    store.cell_dir("0" * 20).mkdir(parents=True)
    (store.cell_dir("0" * 20) / CELL_JSON).write_text("[1]")
    with pytest.raises(IclgdError, match=r"cell.json is not a cell record") as info:
        store.cell_info("0" * 20)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("place", ["missing", "empty-folder"])
def test_an_executor_that_does_not_start_leaves_no_store(tmp_path, monkeypatch, place):
    """`--executor ray --ray-address ray://host:1` fails in one line; the new store it would have
    filled is gone again (an empty folder given as the store stays, empty)."""
    from iclgd_lens.sweep import SweepSpec, executors, run_sweep

    def unreachable(todo, store, done, **options):
        raise IclgdError("ray: cannot start or reach a cluster: connection refused")

    monkeypatch.setattr(executors, "run_ray", unreachable)
    root = tmp_path / "store"
    if place == "empty-folder":
        root.mkdir()
    before = tree(tmp_path)
    spec = SweepSpec(k=[1], n_episodes=2, n_queries=2)
    with pytest.raises(IclgdError, match="cannot start or reach"):
        run_sweep(spec, root, executor="ray", address="ray://127.0.0.1:1")
    assert tree(tmp_path) == before


@pytest.mark.parametrize("kind", ["odd-head-dim", "gpt2"])
def test_a_dry_run_over_a_model_folder_it_cannot_use_is_one_line(tmp_path, monkeypatch, kind):
    """--dry-run reads each folder's config to estimate the cells: a config transformers refuses
    (an odd head_dim) or another architecture is one line there too, as in the run."""
    import json

    from tiny import tiny_model_folder
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / kind
    if kind == "gpt2":
        GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=64)).save_pretrained(folder)
        fragment = "is a GPT2LMHeadModel"
    else:
        tiny_model_folder(folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "head_dim": 15}))
        fragment = "cannot read the config of folder"
    monkeypatch.chdir(tmp_path)
    spec = tmp_path / "spec.toml"
    spec.write_text(f'models = ["{folder}"]\n' + OK)
    result = runner.invoke(app, ["sweep", str(spec), "--store", str(tmp_path / "store"), "--dry-run"])
    one_error_line(result, fragment)
    assert not (tmp_path / "store").exists()
