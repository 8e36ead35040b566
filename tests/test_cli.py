"""Tests of the `iclgd-lens` CLI: render, study, list, help, and one-line errors with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from test_results import make_results
from typer.testing import CliRunner

from iclgd_lens import analyses as analyses_pkg
from iclgd_lens.cli import app, parse_settings
from iclgd_lens.errors import IclgdError
from iclgd_lens.study import StudyResult, parse_numbers

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "error" in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    return make_results(n_layers=2, n_episodes=2, n_queries=2).save(tmp_path_factory.mktemp("saved") / "run")


def test_render_writes_the_report(saved, tmp_path):
    result = run("render", saved / "results.json", "--out", tmp_path / "rep")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "rep" / "index.html")
    assert (tmp_path / "rep" / "layer_01.html").is_file()
    result = run("render", saved, "--out", tmp_path / "one", "--single-file")
    assert result.exit_code == 0 and (tmp_path / "one" / "report.html").is_file()


def test_render_with_an_analyses_file(saved, tmp_path):
    plugin = tmp_path / "my_analyses.py"
    plugin.write_text(
        "from iclgd_lens.analyses import analysis\n"
        "@analysis('cli-test-analysis')\n"
        "def table_only(results):\n"
        "    return [results.summary().head(2)]\n"
    )
    try:
        result = run("render", saved, "--out", tmp_path / "rep", "--analyses", plugin)
        assert result.exit_code == 0, result.output
        assert "Analysis: cli-test-analysis" in (tmp_path / "rep" / "index.html").read_text()
    finally:
        analyses_pkg.ANALYSES.pop("cli-test-analysis", None)
    bad = tmp_path / "bad.py"
    bad.write_text("raise RuntimeError('boom')\n")
    assert_one_line_error(run("render", saved, "--out", tmp_path / "rep2", "--analyses", bad), "boom")
    assert not (tmp_path / "rep2").exists()


def test_render_errors_are_one_line(saved, tmp_path):
    assert_one_line_error(run("render", tmp_path / "missing.json"), "not found")
    assert_one_line_error(run("render"), "Missing argument")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("mine")
    assert_one_line_error(run("render", saved, "--out", precious), "refusing")
    assert (precious / "notes.txt").read_text() == "mine"


def test_usage_errors_are_one_line():
    assert_one_line_error(run("report", "--no-such-option"), "--no-such-option")
    assert_one_line_error(run("report", "--queries", "0"), "--queries")
    assert_one_line_error(run("frobnicate"), "frobnicate")
    assert_one_line_error(run("report", "--k", "2,x"), "--k", "'x'")


def test_study_errors_are_one_line():
    assert_one_line_error(run("study", "no-such-study"), "unknown study", "order-sensitivity")
    missing = [
        n
        for n, target in analyses_pkg.STUDIES.items()
        if __import__("importlib").util.find_spec(target.partition(":")[0]) is None
    ]
    if missing:
        assert_one_line_error(run("study", missing[0]), "not available")


def fake_study(*, n: int = 3, seed: int = 0) -> StudyResult:
    """A study for the CLI test (found through STUDIES as test_cli:fake_study)."""
    table = pd.DataFrame({"i": range(n), "value": [seed + i for i in range(n)]})
    return StudyResult(
        name="fake",
        question="Does the CLI pass settings through?",
        table=table,
        findings=f"{n} rows, seed {seed}",
        config={"n": n},
    )


def test_study_runs_and_passes_settings(tmp_path, monkeypatch):
    monkeypatch.setitem(analyses_pkg.STUDIES, "fake", "test_cli:fake_study")
    result = run("study", "fake", "--set", "n=5", "--seed", "7", "--out", tmp_path / "s", "--threads", "1")
    assert result.exit_code == 0, result.output
    text = (tmp_path / "s" / "index.html").read_text()
    assert "Does the CLI pass settings through?" in text and "5 rows, seed 7" in text
    assert pd.read_csv(tmp_path / "s" / "study_fake.csv")["value"].tolist() == [7, 8, 9, 10, 11]
    again = run("study", "fake", "--set", "n=2", "--out", tmp_path / "s", "--threads", "1")  # its own folder
    assert again.exit_code == 0, again.output
    assert pd.read_csv(tmp_path / "s" / "study_fake.csv")["value"].tolist() == [0, 1]
    assert_one_line_error(run("study", "fake", "--set", "bogus=1", "--out", tmp_path / "t"), "bogus")
    assert_one_line_error(run("study", "fake", "--set", "noequals"), "name=value")


def test_list_and_help():
    result = run("list")
    assert result.exit_code == 0, result.output
    for name in ("tiny-llama-icl", "dai", "deutch", "order-sensitivity", "icl-vs-iwl", "dai2023", "shen2024"):
        assert name in result.stdout
    probes = result.stdout.split("probes:")[1].split("studies:")[0].strip().splitlines()
    assert len(probes) >= 7 and all(line.rstrip().endswith(".") for line in probes), probes  # whole sentences
    lines = result.stdout.splitlines()
    for i, line in enumerate(lines):  # every heading has entries or says why it has none
        if not line.startswith(" ") and (i + 1 == len(lines) or not lines[i + 1].startswith(" ")):
            assert "(" in line, f"empty heading: {line!r}"
    for command in ([], ["report"], ["render"], ["study"], ["sweep"], ["list"], ["train"]):
        result = run(*command, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout
    assert "--variant" in run("train", "--help").stdout and "train" in run("--help").stdout


def test_train_bad_options_exit_2_with_one_line(tmp_path):
    assert_one_line_error(run("train", "--out", tmp_path / "m"), "--variant")  # required
    assert_one_line_error(run("train", "--variant", "icl"), "--out")
    assert_one_line_error(
        run("train", "--variant", "icl", "--out", tmp_path / "m", "--steps", "many"), "--steps"
    )
    assert_one_line_error(
        run("train", "--variant", "icl", "--out", tmp_path / "m", "--threads", "0"), "--threads"
    )
    assert_one_line_error(
        run("train", "--variant", "big", "--out", tmp_path / "m"), "--variant", "icl, iclobj", "'big'"
    )
    assert_one_line_error(
        run("train", "--variant", "icl", "--out", tmp_path / "m", "--epochs", "2"), "--epochs"
    )
    assert not (tmp_path / "m").exists()


def test_k_numbers_and_settings():
    assert parse_numbers(["8"], "--k", minimum=0) == [8]
    assert parse_numbers(["1,2", "8", "2"], "--k", minimum=0) == [1, 2, 8]
    with pytest.raises(IclgdError):
        parse_numbers(["-1"], "--k", minimum=0)
    assert parse_settings(["n=3", "name=abc", "ks=[1, 2]", "lr=1e-3"]) == {
        "n": 3,
        "name": "abc",
        "ks": [1, 2],
        "lr": 1e-3,
    }


def test_console_entry_prints_no_traceback(tmp_path):
    """The real process: exit 2 and one stderr line, through `python -m iclgd_lens.cli`."""
    proc = subprocess.run(
        [sys.executable, "-m", "iclgd_lens.cli", "render", str(tmp_path / "nope.json")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr and "not found" in proc.stderr


@pytest.mark.slow
def test_report_end_to_end_on_a_tiny_model_folder(tmp_path):
    """`iclgd-lens report` on a tiny random LLaMA saved in HF format (a k sweep, two episodes)."""
    import torch
    from tiny import tiny_model_folder

    torch.set_num_threads(1)
    tiny_model_folder(tmp_path / "model")
    result = run(
        "report",
        "--model",
        tmp_path / "model",
        "--k",
        "1,2",
        "--episodes",
        "2",
        "--queries",
        "2",
        "--out",
        tmp_path / "rep",
        "--no-progress",
        "--threads",
        "1",
    )
    assert result.exit_code == 0, result.output
    loaded = __import__("iclgd_lens.engine.results", fromlist=["Results"]).Results.load(tmp_path / "rep")
    assert sorted(loaded.table["k"].unique()) == [1, 2]
    assert "Metrics as a function of k" in (tmp_path / "rep" / "index.html").read_text()
    assert (tmp_path / "rep" / "layer_01.html").is_file()


def ctrl_c_swallowed_by_a_destructor() -> None:
    """Ctrl-C arriving while a destructor runs, as it can inside torch or transformers: Python
    raises KeyboardInterrupt in the __del__, prints "Exception ignored" and carries on."""
    import signal

    class Swallows:
        def __del__(self):
            signal.raise_signal(signal.SIGINT)
            for _ in range(100):  # bytecodes for the pending signal to be raised in
                pass

    Swallows()


def test_a_ctrl_c_a_destructor_swallowed_still_interrupts_and_leaves_no_report(saved, tmp_path, monkeypatch):
    """The interrupt is remembered: the report is not put in place, one line, exit 130 (without
    the latch the render finished and exited 0 after printing a traceback)."""
    import iclgd_lens.report as report

    real = report.render_report

    def render_report(*args, **kwargs):
        ctrl_c_swallowed_by_a_destructor()
        return real(*args, **kwargs)

    monkeypatch.setattr(report, "render_report", render_report)
    result = run("render", str(saved), "--out", str(tmp_path / "rep"))
    assert result.exit_code == 130, result.output
    assert result.output.strip().splitlines() == [
        "iclgd-lens: error: interrupted; no output was left half-written"
    ]
    assert not (tmp_path / "rep").exists() and not list(tmp_path.glob(".rep.tmp-*"))
    monkeypatch.undo()
    result = run("render", str(saved), "--out", str(tmp_path / "rep"))  # the latch is cleared afterwards
    assert result.exit_code == 0, result.output


def test_an_interrupt_raised_in_execd_code_exits_130_under_python_dash_m(saved, tmp_path):
    """A KeyboardInterrupt leaving code run by exec() of a string (as dataclasses make methods)
    sets CPython's 'unhandled KeyboardInterrupt' flag; under `python -m` the process then died by
    SIGINT (-2) after printing the one line, instead of exiting 130."""
    plugin = tmp_path / "interrupting.py"
    plugin.write_text(
        "from iclgd_lens.analyses import analysis\n"
        "@analysis('interrupting')\n"
        "def interrupting(results):\n"
        "    exec('raise KeyboardInterrupt')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "iclgd_lens.cli", "render", str(saved), "--out", str(tmp_path / "rep")]
        + ["--analyses", str(plugin)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-500:])
    assert (
        proc.stderr.strip().splitlines()[-1]
        == "iclgd-lens: error: interrupted; no output was left half-written"
    )
    assert not (tmp_path / "rep").exists()


def test_sigterm_during_render_leaves_no_temporary_folder(saved, tmp_path):
    """SIGTERM unwinds like Ctrl-C: the half-written report folder is removed, exit 130."""
    import signal
    import time

    out = tmp_path / "rep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "iclgd_lens.cli", "render", str(saved), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".rep.tmp-*")) and proc.poll() is None:
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.skip("the render finished before the signal could be sent")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert not list(tmp_path.glob(".rep.tmp-*")) and not out.exists()
    assert "Traceback" not in err.decode()
    assert err.decode().splitlines()[-1] == "iclgd-lens: error: interrupted; no output was left half-written"
