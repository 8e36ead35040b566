"""The training script: micro runs are seconds long, seeded, and save a loadable model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import AutoTokenizer, LlamaForCausalLM

from iclgd_lens.models.making.tokenizer import build_tokenizer
from iclgd_lens.models.making.training import MICRO, TrainConfig, make_batch, train
from iclgd_lens.tasks import encode_prompts
from iclgd_lens.tasks.mapping import LABEL_WORDS, World, default_task

torch.set_num_threads(1)


def micro_losses(seed: int, variant: str = "icl") -> list[float]:
    _, _, log = train(TrainConfig(variant=variant, seed=seed, **MICRO), log=lambda msg: None)
    return log["losses"]


@pytest.mark.parametrize("variant", ["icl", "iclobj"])
def test_same_seed_same_losses_other_seed_other_losses(variant):
    first, again, other = micro_losses(0, variant), micro_losses(0, variant), micro_losses(1, variant)
    assert len(first) == MICRO["steps"]
    assert first == again
    assert first != other


def test_script_writes_a_loadable_model_and_log(tmp_path):
    out = tmp_path / "micro"
    cmd = [
        sys.executable,
        "-m",
        "iclgd_lens.cli",
        "train",
        "--variant",
        "icl",
        "--out",
        str(out),
        "--micro",
        "--steps",
        "3",
    ]
    proc = subprocess.run(
        cmd, check=True, capture_output=True, text=True, timeout=120
    )  # `iclgd-lens train ...`
    assert proc.stdout.strip() == str(out) and "saved to" in proc.stderr
    log = json.loads((out / "training_log.json").read_text())
    assert log["seed"] == 0 and len(log["losses"]) == 3 and log["config"]["steps"] == 3
    assert log["command"].startswith("iclgd-lens train --variant icl --out ") and log["command"].endswith(
        "--steps 3 --micro"
    )
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()}
    assert set(modes.values()) == {0o644}, modes  # ordinary files (safetensors writes 0o600)
    model = LlamaForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA
    ids = tokenizer("cow = alpha\ndog =", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id
    assert model(ids).logits.shape == (1, ids.shape[1], len(tokenizer))


def test_saving_replaces_an_earlier_model_keeps_its_card_and_refuses_other_folders(tmp_path, monkeypatch):
    """A retrained model replaces the earlier one's files whole (its README stays); a folder of
    someone else's files, or a place under a file, is refused before training starts; a failure
    while saving leaves the earlier model as it was and no temporary folder behind."""
    from iclgd_lens import IclgdError

    config = TrainConfig(variant="icl", seed=0, **{**MICRO, "steps": 2})
    out = tmp_path / "model"
    train(config, out=out, log=lambda msg: None)
    (out / "README.md").write_text("my card")
    first_weights = (out / "model.safetensors").read_bytes()
    train(TrainConfig(variant="icl", seed=1, **{**MICRO, "steps": 2}), out=out, log=lambda msg: None)
    assert (out / "README.md").read_text() == "my card"
    assert (out / "model.safetensors").read_bytes() != first_weights
    assert json.loads((out / "training_log.json").read_text())["seed"] == 1

    def no_training(*args, **kwargs):
        raise AssertionError("training started before the place was checked")

    import iclgd_lens.models.making.training as training

    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "config.json").write_text("{}")
    (tmp_path / "a_file.txt").write_text("x")
    with monkeypatch.context() as patch:
        patch.setattr(training, "LlamaForCausalLM", no_training)
        with pytest.raises(IclgdError, match="refusing to replace .*holds no iclgd-lens model"):
            train(config, out=tmp_path / "theirs", log=lambda msg: None)
        with pytest.raises(IclgdError, match="cannot write the model into .*is not a folder"):
            train(config, out=tmp_path / "a_file.txt" / "m", log=lambda msg: None)
    assert (tmp_path / "theirs" / "config.json").read_text() == "{}"

    kept = {p.name: p.read_bytes() for p in out.iterdir()}

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        train(config, out=out, log=lambda msg: None)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file.txt", "model", "theirs"]


def test_tokenizer_round_trips_and_matches_task_prompts(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.name_or_path and loaded.pad_token_id is not None
    task = default_task()
    episode = task.episodes(k=4, n_episodes=1, n_queries=2, seed=3)[0]
    enc = encode_prompts(loaded, task, [episode.demos] * 2, list(episode.queries), [episode.label_words] * 2)
    assert loaded.unk_token_id not in enc.input_ids.tolist()[0]
    assert (enc.input_ids[:, 0] == loaded.bos_token_id).all()
    tokens = loaded.convert_ids_to_tokens(enc.input_ids[0].tolist())
    assert tokens[int(enc.read_pos[0])] == "="  # the read position predicts the label word
    assert tokens.count("\n") == 4  # one separator token after each demonstration


def test_icl_batches_train_every_token_iclobj_only_label_words():
    import random

    tokenizer, world = build_tokenizer(), World()
    label_ids = set(tokenizer.convert_tokens_to_ids(list(LABEL_WORDS)))
    ids, targets = make_batch("icl", world, tokenizer, random.Random(0), 2, 64)
    assert (targets[:, :-1] == ids[:, 1:]).all()
    ids, targets = make_batch("iclobj", world, tokenizer, random.Random(0), 2, 64)
    kept = targets[targets != -100].tolist()
    assert kept and set(kept) <= label_ids
    assert (targets[:, :-1][torch.isin(ids[:, 1:], torch.tensor(sorted(label_ids)))] != -100).all()


def test_mapping_task_episodes_hold_out_queries_and_redraw_labels():
    task = default_task()
    episodes = task.episodes(k=16, n_episodes=20, n_queries=4, seed=0)
    assert len({ep.label_words for ep in episodes}) > 1
    for ep in episodes:
        assert len(ep.demos) == 16 and len(ep.queries) == 4 and len(ep.label_words) == 2
        assert not {q.text for q in ep.queries} & {d.text for d in ep.demos}
        assert sorted(q.label for q in ep.queries) == [0, 0, 1, 1]
        category_of = {item: c for c, items in task.world.categories.items() for item in items}
        for label in (0, 1):
            cats = {category_of[ex.text] for ex in ep.demos + ep.queries if ex.label == label}
            assert len(cats) <= 1


@pytest.mark.parametrize("name", ["tiny-llama-icl", "tiny-llama-iclobj"])
def test_script_reproduces_the_first_losses_of_the_shipped_model(name):
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "iclgd_lens" / "models" / name
    shipped = json.loads((folder / "training_log.json").read_text())
    config = {k: v for k, v in shipped["config"].items() if k in TrainConfig.__dataclass_fields__}
    config.update(
        steps=4, eval_every=0, eval_ks=tuple(config["eval_ks"])
    )  # warmup lr does not depend on steps
    config.setdefault("length_curriculum", ())  # logs written before the curriculum existed
    _, _, log = train(TrainConfig(**config), log=lambda msg: None)
    assert log["losses"] == pytest.approx(shipped["losses"][:4], abs=1e-3)


def test_length_curriculum_keeps_tokens_per_step_and_ends_at_seq_len():
    from iclgd_lens.models.making.training import batch_shape

    config = TrainConfig(variant="iclobj")
    shapes = [batch_shape(step, config) for step in range(config.steps)]
    assert shapes[0][1] < config.seq_len and shapes[-1] == (config.batch_size, config.seq_len)
    assert {b * n for b, n in shapes} == {config.batch_size * config.seq_len}
    assert [n for _, n in shapes] == sorted(n for _, n in shapes)  # never shorter again
    assert batch_shape(0, TrainConfig(variant="icl")) == (32, 128)
