"""Bad input, as a table: for every case one line naming the problem (exit 2 on the command line,
IclgdError in Python), no traceback, no partial output, an earlier report left as it was, and
the model (state_dict, hooks) unchanged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from iclgd_lens.hooks import PROBES, get_probes
from typer.testing import CliRunner

from iclgd_lens import GDConfig, IclgdError, compare, load_model, resolve_task
from iclgd_lens.cli import app
from iclgd_lens.folders import MANIFEST

get_probes(None)  # the built-in probes are registered before any case takes a snapshot of the registry
runner = CliRunner()
FAST = ["--episodes", "2", "--queries", "2", "--no-progress", "--threads", "1"]

PROBE_FILES = {
    "raises.py": "def f(acts, ctx):\n    raise RuntimeError('my bug')\n",
    "floats.py": "def f(acts, ctx):\n    return {'x': 1.0}\n",
    "not_a_dict.py": "def f(acts, ctx):\n    return [1, 2]\n",
    "wrong_batch.py": "def f(acts, ctx):\n    return {'x': acts['hook_mlp_out'][:1, 0]}\n",
    "unknown_point.py": None,  # written below: a hook point the model lacks
    "builtin_name.py": None,  # a probe called like a built-in one
}


def probe_file(folder: Path, name: str) -> Path:
    point, probe_name = "blocks.{layer}.hook_mlp_out", name.removesuffix(".py")
    body = PROBE_FILES[name]
    if name == "unknown_point.py":
        point, body = "blocks.{layer}.hook_nope", "def f(acts, ctx):\n    return {}\n"
    if name == "builtin_name.py":
        probe_name, body = "attn_out", "def f(acts, ctx):\n    return {}\n"
    path = folder / name
    path.write_text(
        f"from iclgd_lens.hooks import probe\n{body}probe({probe_name!r}, points=[{point!r}])(f)\n"
    )
    return path


def make_inputs(folder: Path) -> dict[str, Path]:
    """Bad files of every kind, made once per case in the case's own folder."""
    (folder / "bad.jsonl").write_text('{"text": "a", "label": 0}\nnot json\n')
    (folder / "syntax.py").write_text("def broken(:\n")
    (folder / "corrupt.json").write_text("{not json")
    (folder / "no_table.json").write_text(json.dumps({"config": {}}))
    (folder / "table_a_number.json").write_text(json.dumps({"table": 5}))
    (folder / "table_of_numbers.json").write_text(json.dumps({"table": [1, 2]}))
    (folder / "config_a_number.json").write_text(json.dumps({"table": [], "config": 3}))
    (folder / "no_rows.json").write_text(json.dumps({"table": [], "config": {}}))
    (folder / "garbage.parquet").write_bytes(b"PAR1 nope")
    (folder / "a_file.txt").write_text("x")
    gpt2 = folder / "gpt2_folder"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(
        json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    )
    (folder / "no_config").mkdir()
    damaged = folder / "damaged"
    damaged.mkdir()
    shipped = Path(__file__).resolve().parents[1] / "iclgd_lens" / "models" / "tiny-llama-icl"
    for f in shipped.iterdir():
        if f.suffix in (".json", ".safetensors"):
            data = f.read_bytes()
            (damaged / f.name).write_bytes(data[:1000] if f.suffix == ".safetensors" else data)
    (folder / "value_a_word.json").write_text(
        json.dumps({"table": [{"metric": "simaou", "comparison": "icl~gd", "layer": 0, "value": "high"}]})
    )
    config = json.loads((shipped / "config.json").read_text())
    for name, text in (
        ("config_a_list", "[1, 2]"),
        ("config_wrong_types", json.dumps({**config, "hidden_size": "big"})),
        ("config_wider_than_weights", json.dumps({**config, "hidden_size": 256})),
        ("config_no_layers", json.dumps({**config, "num_hidden_layers": 0})),
    ):
        (folder / name).mkdir()
        for f in shipped.iterdir():
            if f.is_file():
                (folder / name / f.name).write_bytes(f.read_bytes())
        (folder / name / "config.json").write_text(text)
    (folder / "sweep.toml").write_text(f'models = ["{damaged}"]\nk = [2]\nn_episodes = 2\nn_queries = 2\n')
    os.mkfifo(folder / "fifo")  # a pipe: reading it would block until another program writes
    (folder / "pipe").mkdir()
    os.mkfifo(folder / "pipe" / "sst2.jsonl")
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (folder / "deep.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    foreign = folder / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    return {"folder": folder}


# (case id, command line; {dir} is the case's folder) -> a fragment the one line must contain
CLI_CASES = [
    ("k-not-a-number", ["report", "--k", "abc"], "whole numbers"),
    ("k-negative", ["report", "--k", "-1"], ">= 0"),
    ("k-zero-alone", ["report", "--k", "0"], "--k 0 alone compares nothing"),
    ("k-too-large-for-the-context", ["report", "--k", "100000"], "context window"),
    ("k-list-with-garbage", ["report", "--k", "1,x"], "whole numbers"),
    ("lr-zero", ["report", "--lr", "0"], "learning rate"),
    ("lr-negative", ["report", "--lr", "-1"], "learning rate"),
    ("lr-nan", ["report", "--lr", "nan"], "learning rate"),
    ("lr-that-overflows", ["report", "--lr", "1e30"], "not finite"),
    ("epochs-zero", ["report", "--epochs", "0"], "epochs"),
    ("batch-size-zero", ["report", "--batch-size", "0"], "batch_size"),
    ("unknown-gd-preset", ["report", "--gd", "adamw"], "unknown GD preset"),
    ("unknown-model", ["report", "--model", "nope"], "unknown model"),
    ("model-not-a-llama", ["report", "--model", "{dir}/gpt2_folder"], "supports"),
    ("model-folder-without-config", ["report", "--model", "{dir}/no_config"], "config.json"),
    ("model-damaged-weights", ["report", "--model", "{dir}/damaged"], "damaged or incomplete"),
    ("model-is-a-file", ["report", "--model", "{dir}/a_file.txt"], "not a model folder"),
    ("model-config-a-list", ["report", "--model", "{dir}/config_a_list"], "cannot read the config"),
    ("model-config-wrong-types", ["report", "--model", "{dir}/config_wrong_types"], "hidden_size"),
    (
        "model-config-wider-than-its-weights",
        ["report", "--model", "{dir}/config_wider_than_weights"],
        "do not match its config.json",
    ),
    ("model-without-layers", ["report", "--model", "{dir}/config_no_layers"], "num_hidden_layers=0"),
    ("sweep-dry-run-damaged-weights", ["sweep", "{dir}/sweep.toml", "--dry-run"], "damaged or incomplete"),
    (
        "sweep-dry-run-unknown-executor",
        ["sweep", "{dir}/sweep.toml", "--dry-run", "--executor", "nope"],
        "unknown executor",
    ),
    ("render-value-a-word", ["render", "{dir}/value_a_word.json"], "row 0 of 'table' has value 'high'"),
    ("unknown-task", ["report", "--task", "nope"], "nope"),
    ("malformed-task-file", ["report", "--task", "{dir}/bad.jsonl"], "bad.jsonl"),
    ("missing-task-file", ["report", "--task", "{dir}/missing.jsonl"], "missing.jsonl"),
    ("bad-dtype", ["report", "--dtype", "int8"], "unsupported dtype"),
    ("bad-device", ["report", "--device", "gpu"], "unknown device"),
    ("missing-hooks-file", ["report", "--hooks", "{dir}/missing.py"], "missing.py"),
    ("hooks-file-with-syntax-error", ["report", "--hooks", "{dir}/syntax.py"], "SyntaxError"),
    ("probe-raises", ["report", "--hooks", "{dir}/raises.py"], "probe 'raises' raised RuntimeError: my bug"),
    ("probe-returns-a-float", ["report", "--hooks", "{dir}/floats.py"], "expected a tensor"),
    ("probe-returns-a-list", ["report", "--hooks", "{dir}/not_a_dict.py"], "expected a dict"),
    ("probe-wrong-batch", ["report", "--hooks", "{dir}/wrong_batch.py"], "expected [batch="),
    ("probe-unknown-hook-point", ["report", "--hooks", "{dir}/unknown_point.py"], "blocks.0.hook_nope"),
    ("probe-named-like-a-built-in", ["report", "--hooks", "{dir}/builtin_name.py"], "built-in probe"),
    ("missing-analyses-file", ["report", "--analyses", "{dir}/missing.py"], "missing.py"),
    ("out-is-a-file", ["report", "--out", "{dir}/a_file.txt"], "not a folder"),
    ("out-is-someone-elses-folder", ["report", "--out", "{dir}/foreign"], "refusing to replace"),
    ("queries-zero", ["report", "--queries", "0"], "--queries"),
    ("episodes-zero", ["report", "--episodes", "0"], "--episodes"),
    ("unknown-option", ["report", "--bogus"], "--bogus"),
    ("render-missing-file", ["render", "{dir}/missing.json"], "not found"),
    ("render-corrupt-json", ["render", "{dir}/corrupt.json"], "cannot read"),
    ("render-json-without-table", ["render", "{dir}/no_table.json"], "no 'table'"),
    ("render-garbage-parquet", ["render", "{dir}/garbage.parquet"], "Parquet"),
    ("render-table-a-number", ["render", "{dir}/table_a_number.json"], "list of rows"),
    ("render-table-of-numbers", ["render", "{dir}/table_of_numbers.json"], "list of rows"),
    ("render-config-a-number", ["render", "{dir}/config_a_number.json"], "'config' must be an object"),
    ("render-no-rows", ["render", "{dir}/no_rows.json"], "no result rows"),
    ("unknown-study", ["study", "nope"], "unknown study"),
    ("study-unknown-setting", ["study", "k-sweep", "--set", "bogus=1"], "bogus"),
    ("study-setting-without-value", ["study", "k-sweep", "--set", "noequals"], "name=value"),
    ("study-setting-broken-json", ["study", "k-sweep", "--set", "ks=[1,2"], "not valid JSON"),
    ("train-unknown-variant", ["train", "--variant", "bogus", "--out", "{dir}/m"], "bogus"),
    ("unknown-command", ["frobnicate"], "frobnicate"),
    ("seed-beyond-the-generators", ["report", "--seed", "99999999999999999999999"], "--seed"),
    ("threads-beyond-any-machine", ["report", "--threads", "100000000000"], "--threads"),
    (
        "train-seed-beyond-the-generators",
        ["train", "--variant", "icl", "--out", "{dir}/m", "--seed", "1" + "0" * 22],
        "--seed",
    ),
    (
        "train-threads-beyond-any-machine",
        ["train", "--variant", "icl", "--out", "{dir}/m", "--threads", "10" * 6],
        "--threads",
    ),
    ("study-seed-beyond-the-generators", ["study", "k-sweep", "--seed", "1" + "0" * 22], "--seed"),
    (
        "sweep-dry-run-into-a-users-folder",
        ["sweep", "{dir}/sweep.toml", "--dry-run", "--store", "{dir}/foreign"],
        "refusing to write a store",
    ),
    (
        "sweep-status-of-a-users-folder",
        ["sweep", "{dir}/sweep.toml", "--status", "--store", "{dir}/foreign"],
        "refusing to write a store",
    ),
    ("out-is-a-pipe", ["report", "--out", "{dir}/fifo"], "exists and is not a folder"),
    ("out-is-a-device", ["report", "--out", "/dev/null"], "exists and is not a folder"),
    ("out-name-too-long", ["report", "--out", "{dir}/" + "o" * 300], "File name too long"),
    ("task-name-too-long", ["report", "--task", "a" * 5000], "too long"),
    ("data-file-a-pipe", ["report", "--task", "{dir}/pipe/sst2.jsonl"], "not a regular file"),
    ("render-json-nested-too-deeply", ["render", "{dir}/deep.json"], "nested too deeply"),
    ("sweep-spec-nested-too-deeply", ["sweep", "{dir}/deep.toml", "--dry-run"], "nested too deeply"),
    (
        "set-value-nested-too-deeply",
        ["study", "k-sweep", "--set", "ks=" + "[" * 60_000 + "]" * 60_000],
        "nested",
    ),
    (
        "train-steps-beyond-any-run",
        ["train", "--variant", "icl", "--out", "{dir}/m", "--steps", "1" + "0" * 21],
        "--steps",
    ),
    (
        "study-a-billion-episodes",
        ["study", "causal", "--set", "k=2", "--set", "n_episodes=1000000000", "--set", "n_queries=1"],
        "TFLOP of work",
    ),
]


@pytest.mark.parametrize("argv,fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_input(argv, fragment, tmp_path):
    make_inputs(tmp_path)
    for name in PROBE_FILES:
        probe_file(tmp_path, name)
    old = tmp_path / "old-report"
    old.mkdir()
    (old / "index.html").write_text("the earlier report")
    (old / MANIFEST).write_text('{"what": "report", "files": ["index.html"]}')  # as a report leaves it
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    if argv[0] == "report":
        argv = (
            argv[:1] + FAST + argv[1:] + ([] if "--out" in argv else ["--out", str(old)])
        )  # the case's options win
    before = set(PROBES)
    try:
        result = runner.invoke(app, argv)
    finally:
        for name in set(PROBES) - before:
            PROBES.pop(name)
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # --no-progress: nothing else
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]
    assert (old / "index.html").read_text() == "the earlier report" and sorted(
        p.name for p in old.iterdir()
    ) == [MANIFEST, "index.html"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary folder was left behind"
    assert (tmp_path / "foreign" / "thesis.tex").read_text() == "mine"


@pytest.fixture(scope="module")
def model():
    return load_model()


API_CASES = [
    ("task-of-a-wrong-type", dict(task=3.0), "task must be"),
    ("unknown-task-name", dict(task="nope"), "nope"),
    ("negative-k", dict(k=-1), "k"),
    ("k-beyond-the-context", dict(k=100000), "context window"),
    ("unknown-baseline", dict(baselines=["bogus"]), "unknown baseline"),
    ("unknown-probe", dict(probes=["nope"]), "unknown probe"),
    ("gd-of-a-wrong-type", dict(gd=0.1), "GDConfig or a preset name"),
    ("unknown-gd-preset", dict(gd="adamw"), "unknown GD preset"),
    ("diverging-gd", dict(gd=GDConfig.dai(lr=1e30)), "lr=1e+30"),
    ("zero-episodes", dict(n_episodes=0), "n_episodes"),
    ("float-k", dict(k=2.5), "k must be an integer"),
    ("k-as-a-string", dict(k="2"), "k must be an integer"),
    ("bool-episodes", dict(n_episodes=True), "n_episodes must be an integer"),
    ("float-queries", dict(n_queries=2.0), "n_queries must be an integer"),
    ("zero-batch-size", dict(batch_size=0), "batch_size must be an integer >= 1"),
    ("negative-batch-size", dict(batch_size=-1), "batch_size must be an integer >= 1"),
    ("float-batch-size", dict(batch_size=2.5), "batch_size must be an integer >= 1"),
    ("no-seed", dict(seed=None), "seed must be an integer"),
    ("seed-beyond-the-generators", dict(seed=10**23), "seed must be an integer from 0 to 2147483647"),
    ("negative-seed", dict(seed=-1), "seed must be an integer from 0"),
    ("max-memory-as-a-string", dict(max_memory="8GB"), "max_memory must be a positive number"),
    ("zero-max-memory", dict(max_memory=0), "max_memory must be a positive number"),
    ("tiny-max-memory-in-its-unit", dict(max_memory=1000), "max_memory=1000 B"),
    ("unknown-baseline-as-a-string", dict(baselines="bogus"), "unknown baseline(s) ['bogus']"),
    ("unknown-probe-as-a-string", dict(probes="nope"), "unknown probe(s) ['nope']"),
]


@pytest.mark.parametrize("kwargs,fragment", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_bad_python_input(model, kwargs, fragment):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    kwargs = {"k": 2, "n_episodes": 2, "n_queries": 2, "progress": False, "artifacts": False, **kwargs}
    with pytest.raises(IclgdError) as info:
        compare(model, **kwargs)
    assert "\n" not in str(info.value) and fragment in str(info.value), str(info.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(hp.fwd_hooks for hp in model.hook_dict.values())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("not_a_bridge", ["tiny-llama-icl", None, "hf"])
def test_compare_on_something_that_is_no_bridge_is_one_line(model, not_a_bridge):
    """A model name, None, or the Hugging Face model itself (which needs load_model(hf_model=...))."""
    if not_a_bridge == "hf":
        from transformers import LlamaConfig, LlamaForCausalLM

        not_a_bridge = LlamaForCausalLM(
            LlamaConfig(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                vocab_size=64,
            )
        )
    with pytest.raises(IclgdError) as info:
        compare(not_a_bridge, k=2, n_episodes=2, n_queries=2, progress=False)
    message = str(info.value)
    assert "\n" not in message and "needs a model from iclgd_lens.load_model" in message, message
    if not isinstance(not_a_bridge, (str, type(None))):
        assert "load_model(hf_model=" in message


def test_one_name_as_a_string_is_one_baseline_or_probe(model):
    """baselines="random" / probes="attn_out" name one thing, not one per character."""
    kw = dict(k=2, n_episodes=2, n_queries=2, progress=False, artifacts=False)
    results = compare(model, baselines="random", probes="attn_out", **kw)
    assert results.config["baselines"] == ["random"] and results.config["probes"] == ["attn_out"]
    baselines = {c for c in results.table["comparison"] if c not in ("zsl", "icl", "gd", "icl~zsl", "gd~zsl")}
    assert baselines == {"icl~gd", "icl~random"}, baselines
    assert set(results.table["metric"]) >= {"simaou", "simaou_norm"} and "simam" not in set(
        results.table["metric"]
    )


def test_compare_leaves_the_global_random_state_alone_and_repeats_bitwise(model):
    rng = torch.get_rng_state()
    kw = dict(k=2, n_episodes=2, n_queries=2, progress=False, artifacts=False)
    first = compare(model, **kw).table
    torch.manual_seed(12345)  # another global state must not change the numbers
    second = compare(model, **kw).table
    assert first.equals(second)
    torch.set_rng_state(rng)


def test_gd_too_big_for_the_device_is_refused_up_front(model, monkeypatch):
    """The estimate of the deltas' memory is checked before any work; check_resources=False overrides."""
    import iclgd_lens.engine.compare as compare_module

    monkeypatch.setattr(
        compare_module.os, "sysconf", lambda name: 1 if name == "SC_PAGE_SIZE" else 1024
    )  # a 1 KB machine
    with pytest.raises(IclgdError, match="needs about .* of weight deltas .* check_resources=False") as info:
        compare(model, k=2, n_episodes=2, n_queries=2, progress=False, artifacts=False)
    assert "\n" not in str(info.value)
    result = compare(
        model,
        k=2,
        n_episodes=2,
        n_queries=2,
        baselines=False,
        progress=False,
        artifacts=False,
        check_resources=False,
    )
    assert len(result.table)


def test_a_place_the_report_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    """A read-only --out (root ignores file modes, so the refusal is simulated where it happens)."""
    import tempfile

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    result = runner.invoke(app, ["render", str(_saved(tmp_path)), "--out", str(tmp_path / "ro" / "rep")])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "cannot write the report" in lines[0], result.output
    assert "Permission denied" in lines[0] and not (tmp_path / "ro" / "rep").exists()


@pytest.mark.parametrize("command", [["report", *FAST], ["study", "k-sweep"]])
@pytest.mark.parametrize("place", ["under_a_file", "read_only"])
def test_an_unwritable_out_is_refused_before_any_work(tmp_path, monkeypatch, command, place):
    """The place of the report is checked before the model is loaded or the study runs."""
    import tempfile

    import iclgd_lens.models
    import iclgd_lens.plugins

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the report's place was checked")

    monkeypatch.setattr(iclgd_lens.models, "load_model", no_work)
    monkeypatch.setattr(iclgd_lens.plugins, "load_study", lambda name: no_work)
    (tmp_path / "a_file.txt").write_text("mine")
    out = tmp_path / "a_file.txt" / "rep"
    if place == "read_only":  # root ignores file modes, so the refusal is simulated where it happens
        out = tmp_path / "ro" / "rep"

        def read_only(*args, **kwargs):
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkdtemp", read_only)
    result = runner.invoke(app, [*command, "--out", str(out)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "cannot write the report" in lines[0], result.output
    assert (tmp_path / "a_file.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == [
        "a_file.txt"
    ]


def _saved(folder: Path) -> Path:
    from test_results import make_results

    return make_results(n_layers=2, n_episodes=2, n_queries=2).save(folder / "run")


def test_work_far_beyond_the_machine_is_refused_up_front(model, monkeypatch):
    import iclgd_lens.engine.compare as compare_module

    kw = dict(k=2, n_episodes=2, n_queries=2, progress=False, artifacts=False)
    flops = compare_module.estimate_flops(
        model,
        resolve_task(None, 0),
        resolve_task(None, 0).episodes(2, 2, 2, 0),
        GDConfig.dai(),
        True,
    )
    monkeypatch.setitem(compare_module.MAX_FLOPS, "cpu", flops / 2)  # a machine half as big as this request
    with pytest.raises(IclgdError, match="TFLOP of work.*check_resources=False") as info:
        compare(model, **kw)
    assert "\n" not in str(info.value)
    assert len(compare(model, baselines=False, check_resources=False, **kw).table)


def test_millions_of_episodes_are_refused_before_a_single_one_is_drawn(model, monkeypatch):
    """The work estimate has a lower bound from the task's shortest texts, checked before the
    episodes are drawn: ten million episodes are refused in a moment instead of drawn for minutes."""
    from iclgd_lens.tasks import Task

    task = resolve_task(None, 0)

    def no_drawing(*args, **kwargs):
        raise AssertionError("episodes were drawn before the work was checked")

    monkeypatch.setattr(type(task), "episodes", no_drawing)
    assert issubclass(type(task), Task)
    with pytest.raises(IclgdError, match="TFLOP of work"):
        compare(model, task, k=2, n_episodes=10_000_000, n_queries=2, progress=False)


@pytest.mark.parametrize("n_ctx", [16, 17, 19, 40])
def test_the_context_window_error_names_the_largest_k_that_fits(n_ctx):
    """The k the error suggests passes the check and one more does not; the tokens it says k
    needs are more than the window."""
    import re

    from iclgd_lens.engine.compare import check_k_fits

    model = load_model("tiny-llama-icl")
    task = resolve_task(None)
    with pytest.raises(IclgdError) as e:
        check_k_fits(model.tokenizer, n_ctx, task, 64)
    message = str(e.value)
    need, window, hinted = (
        int(x)
        for x in re.search(r"at least (\d+) tokens.*window is (\d+); choose k <= (\d+)", message).groups()
    )
    assert need > window == n_ctx and "\n" not in message
    check_k_fits(model.tokenizer, n_ctx, task, hinted)
    with pytest.raises(IclgdError):
        check_k_fits(model.tokenizer, n_ctx, task, hinted + 1)


def test_a_probe_error_under_progress_bars_is_a_line_of_its_own(tmp_path):
    """With progress bars on (the default), the error is not printed onto a half-drawn bar: the
    bars are closed before it, so it starts its own line; it names the probe's file."""
    path = probe_file(tmp_path, "wrong_batch.py")
    try:
        result = runner.invoke(
            app,
            ["report", "--hooks", str(path), "--episodes", "2", "--queries", "2", "--threads", "1"]
            + ["--out", str(tmp_path / "out")],
        )
    finally:
        PROBES.pop("wrong_batch", None)
    assert result.exit_code == 2
    lines = result.stderr.split("\n")  # not splitlines(): a bar redraws itself after "\r"
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("iclgd-lens: error: probe 'wrong_batch'")
    assert "fix it in wrong_batch.py" in errors[0] and "leave out its --hooks file" in errors[0]
    assert not (tmp_path / "out").exists()


def test_an_earlier_report_that_cannot_be_removed_whole_is_refused_before_any_work(tmp_path, monkeypatch):
    """A report folder with a write-protected folder inside could not be removed after the swap
    (its old copy would stay beside the new one for good): refused in one line, left as it was.
    (As root every folder is writable, so the permission test itself is stood in for.)"""
    from iclgd_lens import folders

    old = tmp_path / "old-report"
    (old / "assets").mkdir(parents=True)
    (old / "index.html").write_text("the earlier report")
    (old / "assets" / "a.js").write_text("x")
    (old / MANIFEST).write_text('{"what": "report", "files": ["index.html", "assets/a.js"]}')
    monkeypatch.setattr(folders, "_writable", lambda folder: folder.name != "assets")
    result = runner.invoke(app, ["report", *FAST, "--out", str(old)])
    assert result.exit_code == 2 and "assets is write-protected" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (old / "index.html").read_text() == "the earlier report"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old-report"]  # no copy or temporary beside it
