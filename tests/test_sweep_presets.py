"""Paper presets (their grids against the published settings, and a run on local fixtures with a
model of one's own) and `report --data` with one's own file, template, label words and columns."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_datasets import word_tokenizer
from tiny import tiny_model_folder
from typer.testing import CliRunner

from iclgd_lens.cli import app
from iclgd_lens.sweep import Store, cells, load_spec, preset_names
from iclgd_lens.tasks.formats import load_task

FIXTURES = Path(__file__).parent / "fixtures"

# docs/science.md, section 3: Dai et al.'s k and learning rates per task (1.3B model)
DAI = {
    "sst2": (32, 5e-4),
    "sst5": (32, 1.6e-4),
    "mr": (32, 3e-3),
    "subj": (32, 3e-3),
    "agnews": (22, 0.2),
    "cb": (19, 0.08),
}


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def word_model(folder: Path, texts: list[str]) -> Path:
    """A random 2-layer LLaMA with a word-level tokenizer over `texts`, saved as a HF folder."""
    return tiny_model_folder(folder, tokenizer=word_tokenizer(texts), max_positions=512)


def task_texts(task) -> list[str]:
    return [task.render_demo(e, task.label_words) for e in task.train + task.test] + [
        " ".join(task.label_words)
    ]


def test_presets_hold_the_published_grids():
    assert set(preset_names()) >= {"dai2023", "shen2024", "deutch2024"}
    dai = cells(load_spec("dai2023"))
    assert {(c.task.name, c.k, c.task.gd_lr) for c in dai} == {(t, k, lr) for t, (k, lr) in DAI.items()}
    assert {c.gd.label for c in dai} == {"dai"}
    config = dai[0].gd.config()
    assert (config.params, config.optimizer, config.epochs, config.batch_size, config.loss_on) == (
        "kv",
        "sgd",
        1,
        1,
        "all_tokens",
    )

    deutch = cells(load_spec("deutch2024"))
    assert len(deutch) == 6 * 2 * 5
    assert {c.seed for c in deutch} == set(range(5))
    causal = {c.gd.label: c.gd.config().layer_causal for c in deutch}
    assert causal == {"dai": False, "deutch": True}
    assert {(c.task.name, c.k, c.task.gd_lr) for c in deutch} == {(t, k, lr) for t, (k, lr) in DAI.items()}

    shen = cells(load_spec("shen2024"))
    assert {c.k for c in shen} == {1, 2, 4, 8}
    configs = {c.gd.label: c.gd.config() for c in shen}
    assert {g.lr for g in configs.values()} == {1e-3, 1e-4, 1e-5}
    assert {g.params for g in configs.values()} == {"all", "v_single"}
    assert all(g.epochs == 200 and g.loss_on == "label_tokens" for g in configs.values())
    assert len(shen) == 2 * 4 * 6


def test_dai2023_runs_on_your_own_model_and_data_folder(tmp_path):
    tasks = [load_task(str(FIXTURES / name)) for name in ("sst2.jsonl", "cb.csv", "agnews")]
    model = word_model(tmp_path / "my-model", [t for task in tasks for t in task_texts(task)])
    store = tmp_path / "store"
    args = ["sweep", "dai2023", "--model", model, "--data-dir", FIXTURES, "--store", store]
    small = ["--set", "k=[1]", "--set", "n_episodes=2", "--set", "n_queries=2", "--set", "baselines=false"]
    result = cli(*args, *small)
    assert result.exit_code == 0, result.output
    assert "3 computed, 0 already in the store, 0 failed" in result.stdout
    assert "no data for sst5, mr, subj" in result.stderr
    the_store = Store(store)
    configs = {
        the_store.cell_info(k)["labels"]["task"]: the_store.cell_info(k)["config"]
        for k in the_store.done_keys()
    }
    assert set(configs) == {"sst2", "cb", "agnews"}
    for name, config in configs.items():
        assert config["gd"]["lr"] == DAI[name][1]  # Dai's learning rate for the task
        assert config["model"]["source"] == "folder" and config["task"]["data_sha256"]
    sst2 = the_store.load_results(
        next(k for k in the_store.done_keys() if the_store.cell_info(k)["labels"]["task"] == "sst2")
    )
    assert sst2.config["task"]["template"] == "Sentence: {text} Label:"
    again = cli(*args, *small)
    assert "0 computed, 3 already in the store" in again.stdout

    listing = cli(*args, *small, "--dry-run")
    assert listing.exit_code == 0 and listing.stdout.count("TFLOP  memory") == 3


def test_report_with_own_data_file_template_label_words_and_columns(tmp_path):
    data = tmp_path / "reviews.csv"
    rows = ["review,stars,split"]
    rows += [
        f"{w} film,{'good' if i % 2 else 'bad'},train"
        for i, w in enumerate(["great", "awful", "fine", "dull"] * 3)
    ]
    rows += [f"{w} plot,{'good' if i % 2 else 'bad'},test" for i, w in enumerate(["grand", "poor"] * 2)]
    data.write_text("\n".join(rows) + "\n")
    task = load_task(
        str(data),
        template="Review: {text} Verdict:",
        label_words=["bad", "good"],
        text_column="review",
        label_column="stars",
    )
    model = word_model(tmp_path / "m", task_texts(task))
    out = tmp_path / "report"
    result = cli(
        "report",
        "--model",
        model,
        "--data",
        data,
        "--template",
        "Review: {text} Verdict:",
        "--label-words",
        "bad,good",
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--k",
        "2",
        "--episodes",
        "2",
        "--queries",
        "2",
        "--no-progress",
        "--threads",
        "1",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    from iclgd_lens.engine.results import Results

    saved = Results.load(out / "results.json")
    assert (
        saved.config["task"]["template"] == "Review: {text} Verdict:"
        and saved.config["task"]["name"] == "reviews"
    )

    missing = cli("report", "--template", "Review: {text} Verdict:")
    assert missing.exit_code == 2 and "pass --data FILE too" in missing.stderr
    both = cli("report", "--data", data, "--task", "sst2")
    assert both.exit_code == 2 and "give one of them" in both.stderr


@pytest.mark.parametrize(
    "args, message", [(["nope.toml"], "not found"), (["dai2023", "--set", "colour=1"], "no setting 'colour'")]
)
def test_sweep_command_bad_input_is_one_line(tmp_path, args, message):
    result = cli("sweep", *args, "--store", tmp_path / "s")
    assert result.exit_code == 2 and message in result.stderr
    assert len([line for line in result.stderr.splitlines() if line.strip()]) == 1
