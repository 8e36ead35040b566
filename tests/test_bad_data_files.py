"""Bad data files and templates of `--data` / `load_task`: one line that names the file (and line),
exit 2 on the command line, IclgdError in Python, never a traceback; files Excel writes (a UTF-8
byte order mark) read as they are."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from test_datasets import word_tokenizer
from transformers.utils import logging as transformers_logging
from typer.testing import CliRunner

from iclgd_lens.cli import app
from iclgd_lens.errors import IclgdError
from iclgd_lens.tasks import Example, Task, encode_prompts
from iclgd_lens.tasks.formats import check_template, load_task

torch.set_num_threads(1)
runner = CliRunner()
FAST = ["--k", "2", "--episodes", "2", "--queries", "2", "--no-progress", "--threads", "1"]
WORDS = ["alpha", "beta"]
ROWS = [
    ("cow", 0, "train"),
    ("apple", 1, "train"),
    ("dog", 0, "train"),
    ("pear", 1, "train"),
    ("goat", 0, "test"),
    ("lemon", 1, "test"),
]
LONG = " ".join(["cow"] * 300)  # more tokens than the embedded models' context window of 256


def jsonl(rows) -> str:
    return "".join(
        json.dumps({"text": t, "label": y, "split": s}, ensure_ascii=False) + "\n" for t, y, s in rows
    )


def csv_text(rows, newline: str = "\n") -> str:
    return newline.join(["text,label,split", *(f"{t},{y},{s}" for t, y, s in rows)]) + newline


def make_files(folder: Path) -> None:
    """The bad (and the good-but-unusual) files of the cases below."""
    (folder / "bad_utf8_first.jsonl").write_bytes(b'\xff\xfe{"text": "cow"}\n')
    (folder / "bad_utf8_third.jsonl").write_bytes(
        jsonl(ROWS[:2]).encode() + '{"text": "caf\u00e9", "label": 0, "split": "train"}\n'.encode("latin-1")
    )
    (folder / "bad_utf8.csv").write_bytes(csv_text(ROWS[:2], "\r\n").encode() + b"\xe9t\xe9,0,train\r\n")
    for name, label in (("superscript", "\u00b2"), ("dashdash", "--1"), ("arabic_digit", "\u0663")):
        (folder / f"{name}.jsonl").write_text(jsonl([("cow", label, "train"), *ROWS[1:]]), encoding="utf-8")
    (folder / "good.jsonl").write_text(jsonl(ROWS), encoding="utf-8")
    (folder / "long_query.jsonl").write_text(jsonl([*ROWS[:4], (LONG, 0, "test")]), encoding="utf-8")
    long_train = [(LONG, y, "train") for _, y, _ in ROWS[:4]] + ROWS[4:]
    (folder / "long_train.jsonl").write_text(jsonl(long_train), encoding="utf-8")
    (folder / "short_row.csv").write_text(csv_text(ROWS) + "cow,0\n")  # a row cut short: no split value
    (folder / "huge_field.csv").write_text(csv_text(ROWS[:2]) + '"' + "cow " * 40000 + '",0,train\n')
    (folder / "deep.jsonl").write_text(jsonl(ROWS[:2]) + "[" * 100000 + "]" * 100000 + "\n")
    (folder / "surrogate.jsonl").write_text(
        jsonl(ROWS[:1]) + '{"text": "cow \\ud800", "label": 0, "split": "train"}\n'
    )
    (folder / "blank_text.jsonl").write_text(jsonl([*ROWS[:2], ("   ", 0, "train"), *ROWS[3:]]))


# (case id, the options after `report`; {dir} is the case's folder) -> a fragment the one line must contain
CLI_CASES = [
    (
        "data-not-utf8-jsonl",
        ["--data", "{dir}/bad_utf8_first.jsonl"],
        "bad_utf8_first.jsonl:1: not UTF-8 text",
    ),
    (
        "data-not-utf8-jsonl-line-3",
        ["--data", "{dir}/bad_utf8_third.jsonl"],
        "bad_utf8_third.jsonl:3: not UTF-8",
    ),
    ("data-not-utf8-csv", ["--data", "{dir}/bad_utf8.csv"], "bad_utf8.csv:4: not UTF-8 text"),
    (
        "label-superscript-two",
        ["--data", "{dir}/superscript.jsonl"],
        "superscript.jsonl:1: label '²' is not one",
    ),
    ("label-double-minus", ["--data", "{dir}/dashdash.jsonl"], "dashdash.jsonl:1: label '--1' is not one"),
    (
        "label-arabic-digit",
        ["--data", "{dir}/arabic_digit.jsonl"],
        "arabic_digit.jsonl:1: label '٣' is not one",
    ),
    ("template-format-spec", ["--template", "{text:d} ="], "'{text:d} =' must use the bare field {text}"),
    ("template-nested-spec", ["--template", "{text:>{w}} ="], "'{text:>{w}} =' must use the bare field"),
    ("template-bad-conversion", ["--template", "{text!z} ="], "'{text!z} =' must use the bare field"),
    ("template-conversion", ["--template", "{text!r} ="], "'{text!r} =' must use the bare field"),
    ("data-without-template", ["--template", None, "--label-words", None], "--template and --label-words"),
    ("query-longer-than-the-context", ["--data", "{dir}/long_query.jsonl"], "is 301 tokens by itself"),
    (
        "training-texts-longer-than-the-context",
        ["--data", "{dir}/long_train.jsonl"],
        "no k > 0 fits; shorten the training texts",
    ),
    ("csv-row-without-its-split", ["--data", "{dir}/short_row.csv"], "short_row.csv:8: no 'split' column"),
    (
        "csv-field-beyond-csvs-limit",
        ["--data", "{dir}/huge_field.csv"],
        "huge_field.csv:4: not a readable CSV row",
    ),
    ("json-nested-too-deeply", ["--data", "{dir}/deep.jsonl"], "deep.jsonl:3: JSON nested too deeply"),
    (
        "text-with-a-lone-surrogate",
        ["--data", "{dir}/surrogate.jsonl"],
        "surrogate.jsonl:2: text is not valid Unicode",
    ),
    ("text-only-whitespace", ["--data", "{dir}/blank_text.jsonl"], "blank_text.jsonl:3: empty text"),
]


def cli_argv(options: list, folder: Path, out: Path) -> list[str]:
    """`report` on good.jsonl with its template and label words, the case's options winning (None
    drops an option)."""
    chosen = {
        "--data": str(folder / "good.jsonl"),
        "--template": "{text} =",
        "--label-words": ",".join(WORDS),
    }
    chosen.update({options[i]: options[i + 1] for i in range(0, len(options), 2)})
    argv = ["report", *FAST, "--out", str(out)]
    for name, value in chosen.items():
        if value is not None:
            argv += [name, value.replace("{dir}", str(folder))]
    return argv


@pytest.mark.parametrize("options,fragment", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_data_file_on_the_command_line_is_one_line(options, fragment, tmp_path):
    make_files(tmp_path)
    out = tmp_path / "report"
    result = runner.invoke(app, cli_argv(options, tmp_path, out))
    lines = [line for line in result.stderr.splitlines() if line.strip()]  # --no-progress: nothing else
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert len(lines) == 1 and "error" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert fragment in lines[0], lines[0]
    assert not out.exists()


# ---- the same in Python --------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, message",
    [
        ("bad_utf8_first.jsonl", r"bad_utf8_first\.jsonl:1: not UTF-8 text \(byte 0xff\)"),
        ("bad_utf8_third.jsonl", r"bad_utf8_third\.jsonl:3: not UTF-8 text \(byte 0xe9\)"),
        ("bad_utf8.csv", r"bad_utf8\.csv:4: not UTF-8 text"),
        ("superscript.jsonl", r"superscript\.jsonl:1: label '²' is not one of the label words"),
        ("dashdash.jsonl", r"dashdash\.jsonl:1: label '--1' is not one of the label words"),
        ("arabic_digit.jsonl", r"arabic_digit\.jsonl:1: label '٣' is not one of the label words"),
    ],
)
def test_bad_data_file_in_python_is_one_line(tmp_path, name, message):
    make_files(tmp_path)
    with pytest.raises(IclgdError, match=message) as err:
        load_task(str(tmp_path / name), template="{text} =", label_words=WORDS)
    assert "\n" not in str(err.value)


def test_integer_labels_in_ascii_digits_still_read(tmp_path):
    data = tmp_path / "ids.jsonl"
    data.write_text(jsonl([("cow", " 1 ", "train"), ("dog", "0", "test"), ("pig", "-0", "test")]))
    task = load_task(str(data), template="{text} =", label_words=WORDS)
    assert [e.label for e in task.train + task.test] == [1, 0, 0]


@pytest.mark.parametrize("template", ["{text:d} =", "{text:>{w}} =", "{text!z} =", "{text!r} =", "{text:<9}"])
def test_template_with_a_format_spec_or_conversion_is_refused(template):
    with pytest.raises(IclgdError, match="must use the bare field {text}") as err:
        check_template(template)
    assert template in str(err.value) and "\n" not in str(err.value)


def test_bare_text_field_and_literal_braces_still_pass():
    assert check_template("{{label}}: {text} =") == "{{label}}: {text} ="
    assert Task("t", "{{x}} {text} =", tuple(WORDS)).render_query(Example("cow", 0)) == "{x} cow ="


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_byte_order_mark_is_ignored(tmp_path, suffix):
    """Excel saves "CSV UTF-8" with a BOM; without utf-8-sig the header's first column is '\\ufefftext'."""
    data = tmp_path / f"bom{suffix}"
    body = csv_text(ROWS, "\r\n") if suffix == ".csv" else jsonl(ROWS)
    data.write_bytes(b"\xef\xbb\xbf" + body.encode())
    task = load_task(str(data), template="{text} =", label_words=WORDS)
    assert [(e.text, e.label) for e in task.train] == [(t, y) for t, y, s in ROWS if s == "train"]
    assert [e.text for e in task.test] == ["goat", "lemon"]


def test_a_file_in_no_format_names_the_command_line_flags_and_the_python_arguments(tmp_path):
    make_files(tmp_path)
    with pytest.raises(IclgdError) as err:
        load_task(str(tmp_path / "good.jsonl"), label_words=WORDS)
    message = str(err.value)
    assert "--template" in message and "--label-words" in message and "task_format=" in message
    assert "\n" not in message


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _long_task() -> tuple[Task, object]:
    task = Task("long", "{text} =", tuple(WORDS), train=(Example("dog", 1),), test=(Example(LONG, 0),))
    tokenizer = word_tokenizer([LONG, "dog =", " ".join(WORDS)])
    tokenizer.model_max_length = 256
    return task, tokenizer


@pytest.mark.parametrize("demos", [(), (Example("dog", 1),)], ids=["zsl", "icl"])
def test_a_query_longer_than_the_context_says_so_without_a_tokenizer_warning(demos):
    task, tokenizer = _long_task()
    records, verbosity = _Records(), transformers_logging.get_verbosity()
    library = logging.getLogger("transformers")
    library.addHandler(records)
    transformers_logging.set_verbosity_warning()  # the warning would be seen, whatever ran before
    try:
        with pytest.raises(
            IclgdError, match=r"query 'cow cow .*\.\.\.' of task 'long' is 30\d tokens by itself"
        ):
            encode_prompts(tokenizer, task, [demos], [task.test[0]], [WORDS], max_length=256)
    finally:
        library.removeHandler(records)
        transformers_logging.set_verbosity(verbosity)
    assert not [m for m in records.messages if "sequence length" in m], records.messages


def test_a_prompt_too_long_only_for_its_demonstrations_still_asks_for_a_smaller_k():
    task, tokenizer = _long_task()
    demos = tuple(Example("dog", 1) for _ in range(100))
    with pytest.raises(
        IclgdError, match=r"prompt of \d+ tokens exceeds the context window of 256; use fewer"
    ):
        encode_prompts(tokenizer, task, [demos], [Example("dog", 0)], [WORDS], max_length=256)
