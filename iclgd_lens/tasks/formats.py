"""The classification tasks of the papers (Dai et al. 2023 and successors) in their prompt format.

`PAPER_FORMATS` holds, per task, the template, the label words (index = dataset label id),
where the data live on the Hugging Face hub, and which columns make the input text.
`load_task` builds a `tasks.Task` from the hub (needs the `datasets` package and the network,
or its cache) or from a local `.jsonl` / `.csv` file in one of these formats.

Pair tasks (CB, RTE) have two input columns; `Task.template` has a single `{text}` field, so
the pair is pre-formatted into `text` with `PaperFormat.text_format` (Dai-style
"{premise} Question: {hypothesis} True, False or Neither?") and the template adds the
answer cue ("{text} Answer:").

Label words that tokenize into several tokens are scored by their first token
(`tasks.label_token_ids`, as in Dai et al.); two words sharing a first token raise there.

Local files: columns `text` and `label` (pair tasks may give `premise` and `hypothesis`
instead of `text`); `label` is the integer id or the label word itself. The train/test split
comes from a `split` column, or from a folder holding `train.jsonl` / `test.jsonl` (or .csv).
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import random
import re
import string
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

from iclgd_lens.errors import IclgdError
from iclgd_lens.tasks import Example, Task


class PaperFormat(NamedTuple):
    """How one paper task is prompted and where its data live."""

    template: str  # Task.template, one {text} field
    label_words: tuple[str, ...]  # label_words[i] is the word of dataset label id i
    hf_dataset: str  # datasets.load_dataset path
    text_fields: tuple[str, ...]  # dataset columns that make the input text
    hf_config: str | None = None  # datasets.load_dataset config name
    text_format: str = "{0}"  # how the text_fields' values combine into `text`
    test_split: str = "test"  # the labelled split used for queries
    label_field: str = "label"
    text_column: str | None = None  # a local file's own text column (read instead of text_fields)


PAPER_FORMATS: dict[str, PaperFormat] = {
    "sst2": PaperFormat(
        "Sentence: {text} Label:",
        ("Negative", "Positive"),
        "stanfordnlp/sst2",
        ("sentence",),
        test_split="validation",
    ),
    "sst5": PaperFormat(
        "Sentence: {text} Label:", ("terrible", "bad", "neutral", "good", "great"), "SetFit/sst5", ("text",)
    ),
    "mr": PaperFormat(
        "Review: {text} Sentiment:",
        ("Negative", "Positive"),
        "cornell-movie-review-data/rotten_tomatoes",
        ("text",),
    ),
    "subj": PaperFormat("Input: {text} Type:", ("objective", "subjective"), "SetFit/subj", ("text",)),
    "agnews": PaperFormat(
        "Article: {text} Answer:",
        ("World", "Sports", "Business", "Technology"),
        "fancyzhx/ag_news",
        ("text",),
    ),
    "cb": PaperFormat(
        "{text} Answer:",
        ("True", "False", "Neither"),
        "aps/super_glue",
        ("premise", "hypothesis"),
        hf_config="cb",
        text_format="{0} Question: {1} True, False or Neither?",
        test_split="validation",
    ),
    "rte": PaperFormat(
        "{text} Answer:",
        ("True", "False"),
        "aps/super_glue",
        ("premise", "hypothesis"),
        hf_config="rte",
        text_format="{0} Question: {1} True or False?",
        test_split="validation",
    ),
}
"""Paper tasks by name. Templates and label words of SST-2/SST-5/MR/Subj/AGNews/CB follow
docs/science.md, section 3 (Dai et al.); the AGNews template and the CB/RTE pair formats are our
choice in the same style. CB labels: 0 entailment, 1 contradiction, 2 neutral; RTE: 0
entailment, 1 not_entailment. SST-2, CB and RTE use the labelled validation split as test."""


def format_name(name: str) -> str:
    """The PAPER_FORMATS key for a spelling like "SST-2", "ag_news", "AGNews" (raises if unknown)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in PAPER_FORMATS:
        raise IclgdError(f"unknown task format {name!r}; paper formats: {', '.join(PAPER_FORMATS)}")
    return key


def check_label_words(words: Sequence[str]) -> tuple[str, ...]:
    """At least two non-empty, distinct label words (tokenizer checks come later, in
    tasks.label_token_ids)."""
    words = tuple(words)
    if len(words) < 2:
        raise IclgdError(f"a task needs at least two label words, got {list(words)}")
    if any(not isinstance(w, str) or not w.strip() for w in words):
        raise IclgdError(f"label words must be non-empty strings, got {list(words)}")
    stripped = [w.strip() for w in words]
    duplicates = sorted({w for w in stripped if stripped.count(w) > 1})
    if duplicates:
        raise IclgdError(
            f"duplicated label words {duplicates} in {list(words)}; each class needs its own word"
        )
    return tuple(stripped)


def check_template(template: str) -> str:
    """A template must contain the single bare field `{text}` (no format spec, no conversion) and
    no other fields; `{{` and `}}` stand for literal braces."""
    try:
        parsed = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template) if f is not None]
    except ValueError as error:
        raise IclgdError(f"template {template!r} is not a valid format string: {error}") from None
    fields = [f for f, _, _ in parsed]
    if fields != ["text"]:
        raise IclgdError(f"template {template!r} must contain exactly one field {{text}} (found {fields})")
    _, spec, conv = parsed[0]
    if spec or conv is not None:
        found = "{text" + (f"!{conv}" if conv is not None else "") + (f":{spec}" if spec else "") + "}"
        raise IclgdError(
            f"template {template!r} must use the bare field {{text}}, without a format spec or "
            f"conversion (found {found}); write literal braces as {{{{ and }}}}"
        )
    return template


# ---- loading ----------------------------------------------------------------------------
def load_task(
    name_or_path: str,
    *,
    split_train: str = "train",
    split_test: str | None = None,
    max_examples: int | None = None,
    task_format: str | None = None,
    label_words: Sequence[str] | None = None,
    template: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
) -> Task:
    """A paper task from the hub or from a local file, as a `Task`.

    `name_or_path`: a paper task name (see PAPER_FORMATS; loaded with `datasets.load_dataset`),
    a `.jsonl`/`.csv` file with a `split` column, or a folder with `{split}.jsonl`/`.csv`
    files. For local data `task_format` names the paper format (template and label words);
    it defaults to the file or folder name when that is a format name. `split_test` defaults
    to the format's labelled test split (hub) or "test" (local). `max_examples` keeps that
    many examples per split, drawn with `seed` (all examples, in file order, when None).
    `label_words` / `template` override the format's. A local file in no paper format needs
    both `template` and `label_words` (its own prompt format); `text_column` / `label_column`
    name the columns holding the input text and the label (default `text`, `label`).
    """
    if max_examples is not None and max_examples <= 0:
        raise IclgdError(f"max_examples must be a positive integer, got {max_examples}")
    path = Path(name_or_path).expanduser()
    is_local = (
        path.exists()
        or path.suffix.lower() in (".jsonl", ".csv")
        or "/" in name_or_path
        or "\\" in name_or_path
    )
    if is_local:
        if not path.exists():
            raise IclgdError(f"data file {name_or_path} does not exist")
        if not (path.is_file() or path.is_dir()):
            raise IclgdError(f"data file {name_or_path} is not a regular file (a pipe or a device?)")
        stem = path.stem if path.is_file() else path.name
        named = stem.lower().replace("-", "").replace("_", "") in PAPER_FORMATS
        own = task_format is None and not named and template is not None and label_words is not None
        if task_format is None and not own:
            try:
                task_format = format_name(stem)
            except IclgdError:
                raise IclgdError(
                    f"say which paper format {path} is in (name the file after one, or task_format=... "
                    f"in Python: one of {', '.join(PAPER_FORMATS)}), or give its own template and label "
                    "words (--template and --label-words; template= and label_words= in Python)"
                ) from None
        key = stem if own else format_name(task_format)
    else:
        own = False
        key = format_name(name_or_path)
    fmt = (
        PaperFormat(check_template(template), check_label_words(label_words), "", ("text",))
        if own
        else PAPER_FORMATS[key]
    )
    if text_column is not None:
        fmt = fmt._replace(text_column=text_column)
    if label_column is not None:
        fmt = fmt._replace(label_field=label_column)
    words = check_label_words(label_words if label_words is not None else fmt.label_words)
    if len(words) != len(fmt.label_words) and label_words is not None:
        raise IclgdError(
            f"task {key!r} has {len(fmt.label_words)} classes but {len(words)} label words were given"
        )
    task_template = check_template(template if template is not None else fmt.template)
    test_split = split_test or ("test" if is_local else fmt.test_split)
    if split_train == test_split:
        raise IclgdError(
            f"split_train and split_test are both {split_train!r}; "
            "demonstrations and queries must come from different splits"
        )
    if is_local:
        train, test = (_local_split(path, split, fmt, words) for split in (split_train, test_split))
        source = str(path)
    else:
        train, test = (_hub_split(key, fmt, split, words) for split in (split_train, test_split))
        source = f"{fmt.hf_dataset}" + (f"/{fmt.hf_config}" if fmt.hf_config else "")
    if max_examples is not None:
        rng = random.Random(seed)
        train, test = (rng.sample(rows, min(max_examples, len(rows))) for rows in (train, test))
    return Task(
        name=key,
        template=task_template,
        label_words=words,
        train=tuple(train),
        test=tuple(test),
        description=f"{key} in the paper format, from {source} ({split_train}/{test_split})",
    )


def _example(record: dict[str, Any], fmt: PaperFormat, words: Sequence[str], where: str) -> Example:
    """One row -> Example, with errors that say where the bad row is."""
    if fmt.text_column is not None:  # the user named the column: nothing else is read
        text = record.get(fmt.text_column)
        if text in (None, ""):
            raise IclgdError(f"{where}: missing or empty text column {fmt.text_column!r}")
    elif "text" in record and record["text"] not in (None, ""):
        text = record["text"]
    elif all(record.get(f) not in (None, "") for f in fmt.text_fields) and fmt.text_fields != ("text",):
        text = fmt.text_format.format(*(record[f] for f in fmt.text_fields))
    else:
        wanted = "text" + (f" (or {', '.join(fmt.text_fields)})" if fmt.text_fields != ("text",) else "")
        raise IclgdError(f"{where}: missing or empty text field {wanted}")
    if not isinstance(text, str):
        raise IclgdError(f"{where}: text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise IclgdError(f"{where}: empty text (only whitespace)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (valid JSON "\ud800"), which no tokenizer takes
        raise IclgdError(f"{where}: text is not valid Unicode (a lone surrogate)") from None
    label = record.get(fmt.label_field)
    if label is None or label == "":
        raise IclgdError(
            f"{where}: missing label" + (f" column {fmt.label_field!r}" if fmt.label_field != "label" else "")
        )
    return Example(" ".join(text.split()), _label_id(label, words, where, (fmt.label_words,)))


_INTEGER = re.compile(r"-?[0-9]+")  # an integer id as text: ASCII digits only (not "²", "٣", "--1")


def _label_id(label: Any, words: Sequence[str], where: str, aliases: Sequence[Sequence[str]] = ()) -> int:
    """An integer id (or its string) in range, or a label word (case-insensitive) of `words`
    or of `aliases` (the format's own words, when the user chose other prompt words)."""
    if isinstance(label, bool):
        raise IclgdError(f"{where}: label {label!r} is neither an integer id nor a label word")
    if isinstance(label, float) and label.is_integer():
        label = int(label)
    if isinstance(label, str):
        label = label.strip()
        for names in (words, *aliases):
            lowered = [w.lower() for w in names]
            if label.lower() in lowered:
                return lowered.index(label.lower())
        if _INTEGER.fullmatch(label):
            label = int(label)
        else:
            raise IclgdError(
                f"{where}: label {label!r} is not one of the label words {list(words)} nor an integer id"
            )
    if not isinstance(label, int):
        raise IclgdError(f"{where}: label {label!r} is neither an integer id nor a label word")
    if not 0 <= label < len(words):
        raise IclgdError(
            f"{where}: label {label} out of range 0..{len(words) - 1} ({len(words)} label words "
            f"{list(words)})"
        )
    return label


def _read_text(file: Path) -> str:
    """The file's text: UTF-8, a leading byte order mark (as Excel writes) ignored. (`load_task`
    reads regular files only: a pipe would block until another program writes to it.)"""
    try:
        data = file.read_bytes()
    except OSError as error:
        raise IclgdError(f"{file}: cannot read the file ({error.strerror or error})") from None
    if data.startswith(codecs.BOM_UTF8):
        data = data[len(codecs.BOM_UTF8) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        before = data[: error.start]  # lines end in \n, \r\n or \r, as the readers below count them
        line_no = before.count(b"\n") + before.count(b"\r") - before.count(b"\r\n") + 1
        raise IclgdError(
            f"{file}:{line_no}: not UTF-8 text (byte 0x{data[error.start]:02x}); save the file as UTF-8"
        ) from None


def _read_rows(file: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """(line number, record) for each row of a .jsonl or .csv file (UTF-8, with or without a BOM)."""
    suffix = file.suffix.lower()
    if suffix == ".jsonl":
        with io.StringIO(_read_text(file), newline=None) as handle:  # newlines as open() reads them
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise IclgdError(f"{file}:{line_no}: not valid JSON ({error.msg})") from None
                except RecursionError:
                    raise IclgdError(f"{file}:{line_no}: JSON nested too deeply to be a record") from None
                if not isinstance(record, dict):
                    raise IclgdError(f"{file}:{line_no}: each line must be a JSON object with text and label")
                yield line_no, record
    elif suffix == ".csv":
        with io.StringIO(_read_text(file), newline="") as handle:  # as open(newline="") for csv
            reader = csv.DictReader(handle)
            if not reader.fieldnames:
                raise IclgdError(f"{file}: empty CSV file (expected a header with text,label)")
            try:
                for record in reader:
                    yield reader.line_num, record
            except csv.Error as error:  # e.g. a field over csv's size limit
                raise IclgdError(f"{file}:{reader.line_num + 1}: not a readable CSV row ({error})") from None
    else:
        raise IclgdError(f"{file}: unsupported file type {suffix or '(none)'}; use .jsonl or .csv")


def _local_split(path: Path, split: str, fmt: PaperFormat, words: Sequence[str]) -> list[Example]:
    """The examples of one split from a file with a `split` column, or from `{split}.jsonl|csv` in a
    folder."""
    if path.is_dir():
        files = [path / f"{split}{ext}" for ext in (".jsonl", ".csv") if (path / f"{split}{ext}").is_file()]
        if not files:
            raise IclgdError(f"folder {path} has no {split}.jsonl or {split}.csv")
        rows = [(f"{files[0]}:{n}", r) for n, r in _read_rows(files[0])]
    else:
        all_rows = list(_read_rows(path))
        if all_rows and not all(r.get("split") is not None for _, r in all_rows):  # a CSV row cut short: None
            missing = next(n for n, r in all_rows if r.get("split") is None)
            raise IclgdError(
                f"{path}:{missing}: no 'split' column; give every row a split ({split!r}, ...) "
                "or pass a folder with train.jsonl and test.jsonl"
            )
        rows = [(f"{path}:{n}", r) for n, r in all_rows if str(r["split"]).strip() == split]
    if not rows:
        raise IclgdError(f"{path}: no examples in split {split!r}")
    return [_example(record, fmt, words, where) for where, record in rows]


@contextlib.contextmanager
def _offline_unless_hub_reachable(datasets):
    """While loading: if the hub does not answer (no network), `datasets` and `huggingface_hub` in
    offline mode, so a dataset in the local cache still loads and a missing one fails at once,
    not after minutes of download retries. The flags are restored afterwards."""
    from huggingface_hub import constants

    from iclgd_lens.models import _hub_reachable

    if _hub_reachable():
        yield
        return
    before = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = before


def _hub_split(key: str, fmt: PaperFormat, split: str, words: Sequence[str]) -> list[Example]:
    """One split of a paper task through `datasets.load_dataset`."""
    hint = (
        f"or use a local file with text,label columns named {key}.jsonl or {key}.csv "
        f"(or any name with task_format={key!r} in Python)"
    )
    try:
        import datasets
    except ImportError:
        raise IclgdError(
            f"loading {key!r} from the hub needs the `datasets` package (pip install "
            f"'iclgd-lens[datasets]'), {hint}"
        ) from None
    try:
        with _offline_unless_hub_reachable(datasets):
            dataset = datasets.load_dataset(fmt.hf_dataset, fmt.hf_config, split=split)
    except ValueError as error:
        if "split" in str(error).lower():
            raise IclgdError(
                f"{fmt.hf_dataset} has no split {split!r}: {str(error).splitlines()[0]}"
            ) from None
        raise IclgdError(
            f"could not load {fmt.hf_dataset} ({key}): {str(error).splitlines()[0]}; {hint}"
        ) from None
    except (ConnectionError, OSError, TimeoutError):
        raise IclgdError(
            f"cannot download {fmt.hf_dataset} ({key}): no network or not in the HF cache; {hint}"
        ) from None
    except Exception as error:  # datasets raises its own types (DatasetNotFoundError, ...)
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise IclgdError(f"could not load {fmt.hf_dataset} ({key}): {first_line}; {hint}") from None
    where = f"{fmt.hf_dataset}" + (f"/{fmt.hf_config}" if fmt.hf_config else "") + f" split {split!r} row"
    return [_example(dict(record), fmt, words, f"{where} {i}") for i, record in enumerate(dataset)]
