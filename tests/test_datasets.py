"""Paper-format tasks: local files, the hub path (with `datasets.load_dataset` replaced), bad data."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from iclgd_lens.errors import IclgdError
from iclgd_lens.tasks import QUERY_SEGMENT, Example, Task, encode_prompts, label_token_ids
from iclgd_lens.tasks.formats import PAPER_FORMATS, check_label_words, format_name, load_task

torch.set_num_threads(1)
FIXTURES = Path(__file__).parent / "fixtures"


def word_tokenizer(texts: list[str], split_punctuation: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over every word of `texts` that prepends <s>."""
    pre = (
        pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
        if split_punctuation
        else pre_tokenizers.WhitespaceSplit()
    )
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>"] + words)}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        name_or_path="test-words",
        add_bos_token=True,
    )


def task_tokenizer(task: Task) -> PreTrainedTokenizerFast:
    texts = [task.render_demo(e, task.label_words) for e in task.train + task.test]
    return word_tokenizer(texts + [" ".join(task.label_words)])


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---- the formats ------------------------------------------------------------------------
def test_paper_formats_are_complete_and_consistent():
    assert set(PAPER_FORMATS) == {"sst2", "sst5", "mr", "subj", "agnews", "cb", "rte"}
    for name, fmt in PAPER_FORMATS.items():
        assert fmt.template.count("{text}") == 1, name
        check_label_words(fmt.label_words)
        assert fmt.text_format.count("{") == len(fmt.text_fields), name
    assert PAPER_FORMATS["sst2"].template == "Sentence: {text} Label:"
    assert PAPER_FORMATS["sst5"].label_words == ("terrible", "bad", "neutral", "good", "great")
    assert PAPER_FORMATS["subj"].label_words == ("objective", "subjective")
    assert PAPER_FORMATS["cb"].label_words == ("True", "False", "Neither")
    assert format_name("SST-2") == "sst2" and format_name("ag_news") == "agnews"


# ---- local files ------------------------------------------------------------------------
def test_jsonl_with_split_column_ints_and_label_words():
    task = load_task(str(FIXTURES / "sst2.jsonl"))  # format from the file name
    assert task.name == "sst2" and task.template == "Sentence: {text} Label:"
    assert [e.label for e in task.train] == [1, 0, 1, 0, 1, 0]  # "Positive" -> 1, "negative" -> 0
    assert [e.label for e in task.test] == [1, 0, 1]  # the blank line is skipped, "1" -> 1
    assert task.train[0] == Example("a gripping and funny film", 1)
    prompt = task.icl_prompt(task.train[:1], task.test[0], task.label_words)
    assert (
        prompt
        == "Sentence: a gripping and funny film Label: Positive\nSentence: a warm and funny story Label:"
    )


def test_csv_pair_task_is_preformatted_into_text():
    task = load_task(str(FIXTURES / "cb.csv"))
    assert [e.label for e in task.train] == [0, 1, 2, 0] and [e.label for e in task.test] == [1, 2]
    assert task.train[2].text == "she said, maybe it rains Question: it rains True, False or Neither?"
    assert (
        task.render_query(task.test[0])
        == "the dog ran home Question: the dog slept True, False or Neither? Answer:"
    )


def test_folder_with_split_files_and_explicit_format(tmp_path):
    task = load_task(str(FIXTURES / "agnews"), task_format="AGNews")
    assert [e.label for e in task.train] == [1, 2, 0, 3] and [e.label for e in task.test] == [1, 3]
    copied = tmp_path / "mydata"
    copied.mkdir()
    (copied / "train.jsonl").write_text((FIXTURES / "agnews" / "train.jsonl").read_text())
    (copied / "test.csv").write_text((FIXTURES / "agnews" / "test.csv").read_text())
    with pytest.raises(IclgdError, match="task_format"):
        load_task(str(copied))  # the folder name says nothing about the format
    assert load_task(str(copied), task_format="agnews").test == task.test


def test_max_examples_is_a_seeded_sample_per_split():
    full = load_task(str(FIXTURES / "sst2.jsonl"))
    a = load_task(str(FIXTURES / "sst2.jsonl"), max_examples=3, seed=1)
    b = load_task(str(FIXTURES / "sst2.jsonl"), max_examples=3, seed=1)
    assert len(a.train) == 3 and len(a.test) == 3 and a.train == b.train
    assert set(a.train) <= set(full.train)


def test_label_word_and_template_overrides():
    task = load_task(
        str(FIXTURES / "sst2.jsonl"), label_words=["bad", "good"], template="Review: {text} Sentiment:"
    )
    assert task.label_words == ("bad", "good") and task.train[2].label == 1
    with pytest.raises(IclgdError, match="duplicated label words"):
        load_task(str(FIXTURES / "sst2.jsonl"), label_words=["good", "good"])
    with pytest.raises(IclgdError, match="2 classes but 3 label words"):
        load_task(str(FIXTURES / "sst2.jsonl"), label_words=["a", "b", "c"])
    with pytest.raises(IclgdError, match="exactly one field"):
        load_task(str(FIXTURES / "sst2.jsonl"), template="Sentence: {sentence} Label:")


def test_own_file_with_its_template_label_words_and_columns(tmp_path):
    """A file named after no paper format, read through its own columns (what --data does)."""
    data = tmp_path / "reviews.csv"
    data.write_text(
        "review,stars,text,label,split\n"
        "loved every minute,good,IGNORED,0,train\n"
        "a waste of time,bad,IGNORED,1,train\n"
        "fine acting,1,IGNORED,0,test\n"
    )
    task = load_task(
        str(data),
        template="Review: {text} Verdict:",
        label_words=["bad", "good"],
        text_column="review",
        label_column="stars",
    )
    assert task.name == "reviews" and task.template == "Review: {text} Verdict:"
    assert task.label_words == ("bad", "good")
    assert [(e.text, e.label) for e in task.train] == [("loved every minute", 1), ("a waste of time", 0)]
    assert [(e.text, e.label) for e in task.test] == [("fine acting", 1)]
    # the columns also apply to a paper-format file
    named = tmp_path / "sst2.jsonl"
    named.write_text(
        '{"sentence": "so good", "y": "Positive", "split": "train"}\n'
        '{"sentence": "so bad", "y": 0, "split": "test"}\n'
    )
    sst2 = load_task(str(named), text_column="sentence", label_column="y")
    assert sst2.template == PAPER_FORMATS["sst2"].template
    assert [(e.text, e.label) for e in sst2.train + sst2.test] == [("so good", 1), ("so bad", 0)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"template": "R: {text}"}, "say which paper format .*own template and label words"),
        (
            {"template": "R: {text}", "label_words": ["bad", "good"], "text_column": "body"},
            "text column 'body'",
        ),
        ({"template": "R: {text}", "label_words": ["bad", "good"], "label_column": "y"}, "label column 'y'"),
        ({"template": "R: {txt}", "label_words": ["bad", "good"]}, "exactly one field"),
    ],
)
def test_own_file_errors_name_what_is_missing(tmp_path, kwargs, message):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label,split\nok,good,train\nno,bad,test\n")
    with pytest.raises(IclgdError, match=message) as err:
        load_task(str(data), **kwargs)
    assert "\n" not in str(err.value)


# ---- bad data: one line that names the file and line --------------------------------------
@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"text": "ok", "label": 0, "split": "train"}', '{"text": "x", "split": "train"}'],
            r"bad\.jsonl:2: missing label",
        ),
        (
            ['{"text": "ok", "label": 0, "split": "train"}', '{"text": "x", "label": 2, "split": "train"}'],
            r"bad\.jsonl:2: label 2 out of range 0\.\.1",
        ),
        (['{"text": "ok", "label": -1, "split": "train"}'], r"bad\.jsonl:1: label -1 out of range"),
        (
            ['{"text": "ok", "label": "Neutral", "split": "train"}'],
            r"bad\.jsonl:1: label 'Neutral' is not one of the label words",
        ),
        (
            ['{"text": "ok", "label": 0, "split": "train"}', "", '{"label": 0, "split": "train"}'],
            r"bad\.jsonl:3: missing or empty text",
        ),
        (
            ['{"text": "ok", "label": 0, "split": "train"}', '{"text": "x", "label": 0'],
            r"bad\.jsonl:2: not valid JSON",
        ),
        (['{"text": "ok", "label": 0}'], r"bad\.jsonl:1: no 'split' column"),
    ],
)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, lines, message):
    path = write(
        tmp_path, "bad.jsonl", "\n".join(lines + ['{"text": "q", "label": 1, "split": "test"}']) + "\n"
    )
    with pytest.raises(IclgdError, match=message) as info:
        load_task(str(path), task_format="sst2")
    assert "\n" not in str(info.value)


def test_bad_csv_rows_name_file_and_line(tmp_path):
    path = write(tmp_path, "bad.csv", 'text,label,split\nfine,0,train\n"two\nlines",7,train\nq,1,test\n')
    with pytest.raises(
        IclgdError, match=r"bad\.csv:4: label 7 out of range"
    ):  # the quoted row ends on line 4
        load_task(str(path), task_format="mr")
    no_text = write(tmp_path, "notext.csv", "sentence_typo,label,split\nfine,0,train\nq,1,test\n")
    with pytest.raises(IclgdError, match=r"notext\.csv:2: missing or empty text field text \(or sentence\)"):
        load_task(str(no_text), task_format="sst2")


def test_missing_split_wrong_type_and_unknown_names(tmp_path):
    only_train = write(tmp_path, "sst2.jsonl", '{"text": "ok", "label": 0, "split": "train"}\n')
    with pytest.raises(IclgdError, match="no examples in split 'test'"):
        load_task(str(only_train))
    with pytest.raises(IclgdError, match="unsupported file type .txt"):
        load_task(str(write(tmp_path, "data.txt", "x")), task_format="sst2")
    with pytest.raises(IclgdError, match="does not exist"):
        load_task(str(tmp_path / "absent.jsonl"), task_format="sst2")
    with pytest.raises(IclgdError, match="unknown task format 'sst3'.*sst2"):
        load_task("sst3")
    with pytest.raises(IclgdError, match="both 'train'"):
        load_task(str(FIXTURES / "sst2.jsonl"), split_test="train")


# ---- the hub path ---------------------------------------------------------------------------
def test_hub_path_converts_a_datasets_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        rows = {
            "premise": ["p one", "p two"],
            "hypothesis": ["h one", "h two"],
            "idx": [0, 1],
            "label": [2, 0],
        }
        return datasets.Dataset.from_dict(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task("CB")
    assert calls == [("aps/super_glue", "cb", "train"), ("aps/super_glue", "cb", "validation")]
    assert task.train[0] == Example("p one Question: h one True, False or Neither?", 2)

    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda *a, **k: datasets.Dataset.from_dict({"sentence": ["s"], "label": [-1]}),
    )
    with pytest.raises(IclgdError, match=r"stanfordnlp/sst2 split 'train' row 0: label -1 out of range"):
        load_task("sst2")


def test_without_network_the_hub_path_is_offline_so_it_fails_at_once(monkeypatch):
    """No network: load_dataset runs in offline mode (the cache only; no minutes of retries) and
    the flags are restored afterwards; with a network it is left alone."""
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants as hub_constants

    import iclgd_lens.models as models

    seen = []

    def spy(*args, **kwargs):
        seen.append((datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE))
        raise ConnectionError("Couldn't reach 'stanfordnlp/sst2' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", spy)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    for reachable, offline in ((False, True), (True, False)):
        monkeypatch.setattr(models, "_hub_reachable", lambda: reachable)
        with pytest.raises(IclgdError, match="cannot download stanfordnlp/sst2.*no network"):
            load_task("sst2")
        assert seen.pop() == (offline, offline)
        assert (datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE) == (False, False)


def test_hub_path_errors_suggest_a_local_file(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'SetFit/subj' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(
        IclgdError,
        match=(
            "cannot download SetFit/subj.*no network.*local file.*subj.jsonl or subj.csv.*task_format='subj'"
        ),
    ):
        load_task("subj")

    def bad_split(path, name=None, split=None):
        if split != "dev":
            return datasets.Dataset.from_dict({"text": ["s"], "label": [0]})
        raise ValueError("Unknown split \"dev\". Should be one of ['train', 'test'].")

    monkeypatch.setattr(datasets, "load_dataset", bad_split)
    with pytest.raises(IclgdError, match="has no split 'dev'"):
        load_task("subj", split_test="dev")

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(IclgdError, match="needs the `datasets` package"):
        load_task("mr")


# ---- with a tokenizer: label words, context window, k = 0 ------------------------------------
def test_empty_demonstration_set_gives_the_zsl_prompt():
    task = load_task(str(FIXTURES / "sst2.jsonl"))
    tok = task_tokenizer(task)
    query = task.test[0]
    assert task.icl_prompt([], query, task.label_words) == task.zsl_prompt(query)
    (episode,) = task.episodes(k=0, n_episodes=1, n_queries=2, seed=0)
    assert episode.demos == ()
    icl = encode_prompts(tok, task, [episode.demos] * 2, episode.queries, [task.label_words] * 2)
    zsl = encode_prompts(tok, task, [()] * 2, episode.queries, [task.label_words] * 2)
    assert torch.equal(icl.input_ids, zsl.input_ids) and torch.equal(icl.read_pos, zsl.read_pos)
    assert (icl.input_ids[:, 0] == tok.bos_token_id).all()
    assert (icl.input_ids != tok.unk_token_id).all()  # the tokenizer covers the fixture


def test_prompt_longer_than_the_context_window_raises():
    task = load_task(str(FIXTURES / "sst2.jsonl"))
    tok = task_tokenizer(task)
    demos = task.train[:4]
    full = encode_prompts(tok, task, [demos], task.test[:1], [task.label_words])
    n_tokens = int(full.lengths[0])
    assert (
        encode_prompts(tok, task, [demos], task.test[:1], [task.label_words], max_length=n_tokens).lengths[0]
        == n_tokens
    )
    with pytest.raises(
        IclgdError, match=f"prompt of {n_tokens} tokens exceeds the context window of {n_tokens - 1}"
    ):
        encode_prompts(tok, task, [demos], task.test[:1], [task.label_words], max_length=n_tokens - 1)


def test_multi_token_label_words_scored_by_first_token_and_clashes_raise():
    tok = word_tokenizer(["World Sports Business Sci/Tech Sci/Fi"], split_punctuation=True)
    assert len(tok(" Sci/Tech", add_special_tokens=False)["input_ids"]) == 3  # Sci / Tech
    ids = label_token_ids(tok, ["World", "Sports", "Business", "Sci/Tech"])
    assert ids[3] == tok.convert_tokens_to_ids("Sci")
    with pytest.raises(IclgdError, match="share a first token"):
        label_token_ids(tok, ["World", "Sci/Tech", "Sci/Fi"])


def test_paper_label_words_are_distinct_single_tokens_in_a_word_tokenizer():
    for name, fmt in PAPER_FORMATS.items():
        tok = word_tokenizer([" ".join(fmt.label_words)])
        ids = label_token_ids(tok, fmt.label_words)
        assert len(set(ids)) == len(fmt.label_words), name


def test_check_label_words_rejects_bad_sets():
    with pytest.raises(IclgdError, match="duplicated label words \\['Positive'\\]"):
        check_label_words(["Positive", "Negative", " Positive"])
    with pytest.raises(IclgdError, match="at least two"):
        check_label_words(["Positive"])
    with pytest.raises(IclgdError, match="non-empty"):
        check_label_words(["Positive", " "])


def _byte_level_word_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """GPT-2's way with spaces: a space joins the word after it ("Ġw"), alone or not; the vocabulary
    is every piece GPT-2's pre-tokenizer makes of `texts`, and a lone space."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pieces = sorted({piece for t in texts for piece, _ in pre.pre_tokenize_str(t)} | {"Ġ"})
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *pieces])}
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _letters(text: str) -> str:
    return "".join(c for c in text if c not in " \n▁ĠĊ")


def _natural_segments(tok, task, demos, query):
    from iclgd_lens.tasks import _char_spans, _token_segments

    text = task.icl_prompt(demos, query, task.label_words)
    offsets = tok(text, return_offsets_mapping=True)["offset_mapping"]
    return _token_segments(offsets, _char_spans(task, demos, query, task.label_words)).tolist()


@pytest.mark.parametrize(
    "tokenizer_kind, separator, spliced, before",
    [
        ("sentencepiece", "\n", True, "\n"),
        ("sentencepiece", " ", False, None),
        ("byte-level", " ", True, "Ġ"),
    ],
)
def test_the_icl_prompt_reads_the_query_with_the_tokens_it_has_alone(
    tokenizer_kind, separator, spliced, before
):
    """SentencePiece marks the first word of a text ("▁w30" alone, "w30" after a newline), a
    byte-level BPE the word after a space ("Ġw30" after the separator, "w30" alone): the ICL
    prompt must carry the ZSL prompt's query tokens, or SimAM and the read position compare
    different tokens."""
    from tests.tiny import spm_like_tokenizer, tiny_task

    task = dataclasses.replace(tiny_task(), separator=separator)
    demos, queries = task.train[:3], task.test[:4]
    texts = [task.icl_prompt(demos, q, task.label_words) for q in queries] + [
        task.zsl_prompt(q) for q in queries
    ]
    tok = spm_like_tokenizer() if tokenizer_kind == "sentencepiece" else _byte_level_word_tokenizer(texts)
    icl = encode_prompts(tok, task, [demos] * 4, queries, [task.label_words] * 4)
    zsl = encode_prompts(tok, task, [()] * 4, queries, [task.label_words] * 4)
    natural = tok([task.icl_prompt(demos, q, task.label_words) for q in queries])["input_ids"]
    for b in range(4):
        icl_query = icl.input_ids[b][icl.segments[b] == QUERY_SEGMENT].tolist()
        zsl_query = zsl.input_ids[b][zsl.segments[b] == QUERY_SEGMENT].tolist()
        assert icl_query == zsl_query and tok.unk_token_id not in icl_query
        assert int(icl.input_ids[b, icl.read_pos[b]]) == zsl_query[-1]
        first_query = int((icl.segments[b] == QUERY_SEGMENT).nonzero()[0])
        if before is not None:  # the separator is still there, as a token of its own
            assert tok.convert_ids_to_tokens(int(icl.input_ids[b, first_query - 1])) == before
        length = int(icl.lengths[b])
        assert (icl.input_ids[b, :length].tolist() != natural[b]) == spliced
        # the demonstrations keep the text's own tokens, and no character of the text is lost
        pieces = "".join(tok.convert_ids_to_tokens(icl.input_ids[b, 1:length].tolist()))
        assert _letters(pieces) == _letters(task.icl_prompt(demos, queries[b], task.label_words))
        demo_tokens = icl.input_ids[b][icl.segments[b] > 0].tolist()
        assert demo_tokens == [
            t for t, s in zip(natural[b], _natural_segments(tok, task, demos, queries[b])) if s > 0
        ]
