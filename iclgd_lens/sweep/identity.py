"""What a cell is, as data: its canonical configuration and the key (hash) the store files it under.

The configuration holds everything that changes a cell's numbers:
- the model: its name and a fingerprint of its files (SHA-256 of the weights, config and
  tokenizer files of an embedded model or a local folder; for a hub id the files of its snapshot
  in the local Hugging Face cache, whose blob names are already content hashes);
- the task: what the spec says (template, label words, columns) and the SHA-256 of the data
  file(s), plus a hash of the resolved examples (so a change in how a file is read counts too);
- every GD setting after the task's learning rate is resolved, k, n_episodes, n_queries, seed,
  baselines, the probes (resolved: the default set includes every probe registered with
  `iclgd_lens.hooks.probe` in the planning process), batching, device type, dtype and torch's
  thread count;
- the versions of the packages that change numbers (`results.versions()` without the page-only ones).

`cell_key` = the first 20 hex digits of the SHA-256 of that JSON (sorted keys). A changed
setting is a different key, so an old cell is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from iclgd_lens.errors import IclgdError
from iclgd_lens.sweep.spec import Cell, TaskRef

PAGE_ONLY_PACKAGES = ("plotly", "circuitsvis")
"""Versions recorded with results that change pages, not numbers: left out of a cell's key."""

MODEL_FILES = (".safetensors", ".bin", ".json", ".model", ".txt", ".pt", ".pth")
KEY_LENGTH = 20

_FILE_HASHES: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, per process


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 8 MB blocks (cached per process by path, size and mtime)."""
    stat = path.stat()
    memo = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo not in _FILE_HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(8 << 20), b""):
                digest.update(block)
        _FILE_HASHES[memo] = digest.hexdigest()
    return _FILE_HASHES[memo]


def folder_fingerprint(folder: Path, suffixes: tuple[str, ...] = MODEL_FILES) -> str:
    """SHA-256 over (relative name, file SHA-256) of the files in `folder` with `suffixes`."""
    digest = hashlib.sha256()
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in suffixes)
    for path in files:
        digest.update(f"{path.relative_to(folder)}\0{file_sha256(path)}\n".encode())
    return digest.hexdigest()


def model_identity(name: str, strict: bool = True) -> dict[str, Any]:
    """{"name", "source", "fingerprint"} of an embedded model, a local folder or a hub id."""
    from iclgd_lens.models import EMBEDDED_MODELS, embedded_model_path

    if name in EMBEDDED_MODELS:
        return {
            "name": name,
            "source": "embedded",
            "fingerprint": folder_fingerprint(embedded_model_path(name)),
        }
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise IclgdError(f"model folder {path} has no config.json (not a HF model folder)")
        return {"name": path.name, "source": "folder", "fingerprint": folder_fingerprint(path)}
    if "/" not in name or path.exists():
        raise IclgdError(
            f"unknown model {name!r}: not an embedded model, a model folder or a hub id org/name"
        )
    try:
        fingerprint = _hub_fingerprint(name)
    except IclgdError:
        if strict:
            raise
        fingerprint = "unresolved (not in the local Hugging Face cache)"
    return {"name": name, "source": "hub", "fingerprint": fingerprint}


def _hub_fingerprint(repo_id: str) -> str:
    """The hub model's files in the local HF cache: the snapshot's file names and the blobs they
    point to (named by their SHA-256 for weights); one line of error when it is not cached."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not in the cache (LocalEntryNotFoundError, ...)
        raise IclgdError(
            f"cannot fingerprint hub model {repo_id!r}: it is not in the local Hugging Face cache; "
            f"download it first (huggingface-cli download {repo_id}) or pass its local folder"
        ) from None
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in MODEL_FILES):
        target = Path(os.path.realpath(path))
        digest.update(f"{path.relative_to(folder)}\0{target.name}\n".encode())
    return digest.hexdigest()


def task_identity(ref: TaskRef, task) -> dict[str, Any]:
    """What the spec says about the task, the data files' SHA-256, and a hash of the resolved
    task (template, separator, label words, every example)."""
    out: dict[str, Any] = {k: v for k, v in asdict(ref).items() if v is not None}
    if ref.data is not None:
        path = Path(ref.data).expanduser()
        if path.is_file():
            out["data_sha256"] = file_sha256(path)
        elif path.is_dir():
            out["data_sha256"] = folder_fingerprint(path, (".jsonl", ".csv"))
    content = {
        "class": type(task).__name__,
        "name": task.name,
        "template": task.template,
        "separator": task.separator,
        "read_offset": task.read_offset,
        "label_words": list(task.label_words),
        "gd_lr": task.gd_lr,
        "train": [(e.text, e.label) for e in task.train],
        "test": [(e.text, e.label) for e in task.test],
    }
    out["content_sha256"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return out


def number_versions() -> dict[str, str | None]:
    """`results.versions()` without the packages that only change pages."""
    from iclgd_lens.engine.results import versions

    return {k: v for k, v in versions().items() if k not in PAGE_ONLY_PACKAGES}


def canonical_config(cell: Cell, model_id: dict, task) -> dict[str, Any]:
    """The cell's complete configuration as plain JSON types (what its key hashes)."""
    from iclgd_lens.engine.gd import GDConfig

    settings = json.loads(cell.settings)
    study = settings.pop("study", None)
    device = str(settings.pop("device") or "cpu").split(":")[0]  # the device type, not which one
    if not study:  # the probes the cell computes: the default set includes user-registered probes
        from iclgd_lens.engine.compare import _probe_names

        settings["probes"] = _probe_names(settings.get("probes"))
    config = {
        "kind": "study" if study else "compare",
        "model": model_id,
        "task": task_identity(cell.task, task),
        "k": cell.k,
        "seed": cell.seed,
        "gd": asdict(GDConfig.resolve(cell.gd.config(), task)),
        "gd_label": cell.gd.label,
        "device": device,
        **settings,
        "versions": number_versions(),
    }
    if study:
        config["study"] = study
    return config


def cell_key(config: dict[str, Any]) -> str:
    """The store key of a canonical configuration."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


def load_hash_cache(path: Path) -> None:
    """Add the file hashes saved in `path` (by path, size and mtime) to this process's cache, so
    a 13 GB checkpoint is hashed once per store, not once per command."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    for entry in saved if isinstance(saved, list) else []:
        try:
            _FILE_HASHES[(str(entry[0]), int(entry[1]), int(entry[2]))] = str(entry[3])
        except (TypeError, ValueError, IndexError):
            continue


def save_hash_cache(path: Path) -> None:
    """Write this process's file hashes to `path` (a temporary file renamed into place)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps([[*memo, digest] for memo, digest in sorted(_FILE_HASHES.items())]))
        os.replace(tmp, path)
    except OSError:
        pass  # a cache only: a read-only store still works


class Resolver:
    """Canonical configs and keys of many cells, each model fingerprinted and each (task, seed)
    resolved once (file hashes kept between commands: `load_hash_cache` / `save_hash_cache`)."""

    def __init__(self, strict: bool = True) -> None:
        self.strict = strict  # False: a hub model not yet downloaded gets a placeholder (listings)
        self._models: dict[str, dict] = {}
        self._tasks: dict[tuple[TaskRef, int], Any] = {}

    def model(self, name: str) -> dict:
        if name not in self._models:
            self._models[name] = model_identity(name, self.strict)
        return self._models[name]

    def task(self, ref: TaskRef, seed: int):
        if (ref, seed) not in self._tasks:
            self._tasks[(ref, seed)] = ref.resolve(seed)
        return self._tasks[(ref, seed)]

    def config(self, cell: Cell) -> dict:
        return canonical_config(cell, self.model(cell.model), self.task(cell.task, cell.seed))
