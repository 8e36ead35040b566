"""The content-addressed results store: one folder per cell, named by the cell's key.

    STORE/cells/<key>/cell.json         the canonical configuration, the key, the axis labels
    STORE/cells/<key>/results.parquet   the tidy table (+ columns cell, model, task, gd, seed)
    STORE/cells/<key>/results.json      the same with config and artifacts (Results.load)
    STORE/cells/<key>/study.json        (study cells) StudyResult.save; study.parquet its table
    STORE/failed/<key>.json             a cell that raised: its one-line error (removed on success)
    STORE/runs/<key>.json               when, where and how long a cell ran (not part of the cell)
    STORE/tmp/                          cells in flight (renamed into cells/ when complete)

A cell folder is built in STORE/tmp and renamed into place in one `os.rename`, so cells/ only
ever holds complete cells; an existing cell is never replaced. A folder there without cell.json
(a copy cut short) or without its data files (deleted by hand: "damaged" in `--status`) is
incomplete: the next run computes that cell again and replaces the folder. Every file is
plain Parquet or JSON: `pd.read_parquet`, `pyarrow.dataset.dataset(STORE/cells, format="parquet")`
and DuckDB's `read_parquet('STORE/cells/*/results.parquet')` read the whole store (docs/sweeps.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from iclgd_lens.errors import IclgdError

CELL_JSON = "cell.json"
DATA_FILES = (("results.json", "results.parquet"), ("study.json", "study.parquet"))
"""The files a complete cell holds beside cell.json: a compare cell's pair, or a study cell's."""
TIMING_KEYS = ("run_time_s", "started")
"""Config entries that differ between two runs of the same cell: kept in runs/, not in the cell."""


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True, allow_nan=False) + "\n", encoding="utf-8")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())[:500]


class Store:
    """A results store folder (created on first write)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).expanduser()
        if self.root.exists() and not self.root.is_dir():
            raise IclgdError(f"store {self.root} exists and is not a folder")

    def is_store(self) -> bool:
        """Whether the folder is a store already (it has cells/: `create` makes it first)."""
        return (self.root / "cells").is_dir()

    def check_place(self) -> None:
        """Refuse, before anything is written, a folder of the user's that is not a store: a
        store goes into a new or empty folder, or an existing store."""
        if self.root.is_dir() and not self.is_store() and any(self.root.iterdir()):
            raise IclgdError(
                f"refusing to write a store into {self.root}: it is not empty and holds no "
                "iclgd-lens store (no cells/ folder); give a new or empty folder, or an existing store"
            )

    # ---- paths and status ----------------------------------------------------------------
    def cell_dir(self, key: str) -> Path:
        return self.root / "cells" / key

    def failure_path(self, key: str) -> Path:
        return self.root / "failed" / f"{key}.json"

    @staticmethod
    def is_complete(folder: Path) -> bool:
        """Whether a cell folder holds cell.json and its data files (see DATA_FILES)."""
        return (folder / CELL_JSON).is_file() and any(
            all((folder / name).is_file() for name in files) for files in DATA_FILES
        )

    def status(self, key: str) -> str:
        """ "done" (a complete cell folder), "damaged" (cell.json without its data files: computed
        again by the next run), "failed" (its last run raised) or "missing"."""
        folder = self.cell_dir(key)
        if self.is_complete(folder):
            return "done"
        if (folder / CELL_JSON).is_file():
            return "damaged"
        return "failed" if self.failure_path(key).is_file() else "missing"

    def failure(self, key: str) -> str:
        """The one-line error of a failed cell (or that its failure record cannot be read)."""
        path = self.failure_path(key)
        try:
            error = json.loads(path.read_text(encoding="utf-8"))["error"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"(its failure record {path} cannot be read)"
        return str(error)

    def done_keys(self) -> list[str]:
        folder = self.root / "cells"
        return sorted(p.name for p in folder.iterdir() if self.is_complete(p)) if folder.is_dir() else []

    def cell_info(self, key: str) -> dict:
        """cell.json of a done cell: {"key", "kind", "labels", "config"}."""
        path = self.cell_dir(key) / CELL_JSON
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise IclgdError(f"cannot read {path}: {err}") from None
        if not isinstance(info, dict) or not isinstance(info.get("labels", {}), dict):
            raise IclgdError(
                f"{path} is not a cell record (an object with 'key', 'kind', 'labels', 'config')"
            )
        return info

    # ---- writing ---------------------------------------------------------------------------
    def create(self) -> None:
        """The store's folders (cells, failed, runs, tmp)."""
        try:
            for sub in ("cells", "failed", "runs", "tmp"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise IclgdError(f"cannot write the store {self.root}: {err.strerror or err}") from None

    def write_cell(self, key: str, info: dict, write: Callable[[Path], dict | None]) -> bool:
        """Build cell `key` in a temporary folder with `write(folder)` (which returns timing
        facts, or None), add cell.json, and rename it into cells/. Returns False when the cell
        was already there (another job finished it first; ours is dropped, never swapped in).
        On any exception (KeyboardInterrupt included) the temporary folder is removed."""
        self.create()
        tmp = Path(
            tempfile.mkdtemp(prefix=f"{key}~{socket.gethostname()}~{os.getpid()}~", dir=self.root / "tmp")
        )
        try:
            os.chmod(tmp, 0o755)
            timing = write(tmp) or {}
            _write_json(tmp / CELL_JSON, info)
            if not self._move_into_place(tmp, self.cell_dir(key)):
                shutil.rmtree(tmp, ignore_errors=True)
                return False
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.failure_path(key).unlink(missing_ok=True)
        _write_json(self.root / "runs" / f"{key}.json", {"host": socket.gethostname(), **timing})
        return True

    @staticmethod
    def _move_into_place(tmp: Path, target: Path) -> bool:
        """Rename `tmp` to `target`; False when a complete cell is there already. A folder there
        without cell.json or its data files is incomplete: it is removed and replaced."""
        try:
            os.rename(tmp, target)
            return True
        except OSError:
            if Store.is_complete(target):
                return False
            if not target.is_dir():
                raise
        shutil.rmtree(target, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if Store.is_complete(target):  # another job filed it in the meantime
                return False
            raise
        return True

    def record_failure(self, key: str, labels: dict, error: BaseException | str) -> str:
        """Keep a failed cell's one-line error (the next run tries it again)."""
        self.create()
        if isinstance(error, BaseException):
            text = str(error) if type(error).__name__ == "IclgdError" else f"{type(error).__name__}: {error}"
        else:
            text = error
        line = _one_line(text) or "failed without a message"
        _write_json(
            self.failure_path(key), {"key": key, "labels": labels, "error": line, "time": time.time()}
        )
        return line

    def clean_stale(self) -> list[str]:
        """Remove temporary folders of this host whose process is gone (a killed job's
        leftovers). Folders of live processes and of other hosts are left alone."""
        removed = []
        folder = self.root / "tmp"
        if not folder.is_dir():
            return removed
        host = socket.gethostname()
        for path in folder.iterdir():
            parts = path.name.split("~")
            if len(parts) < 4 or parts[1] != host or not parts[2].isdigit():
                continue
            if not _alive(int(parts[2])):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
        return removed

    # ---- reading -----------------------------------------------------------------------------
    def load_results(self, key: str):
        from iclgd_lens.engine.results import Results

        with self._damaged_hint(key):
            return Results.load(self.cell_dir(key) / "results.json")

    def load_study(self, key: str):
        from iclgd_lens.study import StudyResult

        with self._damaged_hint(key):
            return StudyResult.load(self.cell_dir(key))

    @contextlib.contextmanager
    def _damaged_hint(self, key: str):
        """A cell file that cannot be read says how to get the cell back."""
        try:
            yield
        except IclgdError as err:
            folder = self.cell_dir(key)
            raise IclgdError(
                f"{err} (remove the folder {folder} and rerun the sweep to compute that cell again)"
            ) from None

    def cells_frame(self) -> pd.DataFrame:
        """One row per done cell: key, kind and its axis labels (model, task, k, gd, seed)."""
        rows = []
        for key in self.done_keys():
            info = self.cell_info(key)
            rows.append({"cell": key, "kind": info.get("kind", "compare"), **info.get("labels", {})})
        return pd.DataFrame(
            rows, columns=["cell", "kind", "model", "task", "k", "gd", "seed"] if not rows else None
        )

    def table(self) -> pd.DataFrame:
        """Every compare cell's tidy table stacked (what the DuckDB one-liner reads)."""
        files = [self.cell_dir(k) / "results.parquet" for k in self.done_keys()]
        files = [f for f in files if f.is_file()]
        if not files:
            return pd.DataFrame()
        return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
