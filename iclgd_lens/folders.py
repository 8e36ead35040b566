"""Output folders written all at once: a report, a sweep report, a trained model.

The place is checked before any work (`check_target`), the folder is built beside it and moved
there only when complete (`written_in_place`), and nothing that is not an earlier output of the
same kind is ever replaced: the user's files stay theirs, and a run that fails or is interrupted
leaves no half-written folder behind."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from iclgd_lens.errors import IclgdError


def check_target(out: str | os.PathLike, is_ours: Callable[[Path], bool], what: str) -> None:
    """Refuse, in one line, a place `out` that could not take a folder of `what` ("report",
    "model"): an existing file, a non-empty folder that `is_ours` does not recognise, or a parent
    that is a file or cannot be written (a folder is made and removed there at once, so that a
    long run does not end in an unwritable place; nothing is left behind)."""
    out = Path(out).absolute()
    if out.is_file() or out.is_symlink():
        raise IclgdError(f"{what} folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_ours(out):
        raise IclgdError(f"refusing to replace {out}: it is not empty and holds no iclgd-lens {what}")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise IclgdError(f"cannot write the {what} into {out.parent}: {parent} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as err:
        raise IclgdError(f"cannot write the {what} into {out.parent}: {err.strerror or err}") from None


@contextmanager
def written_in_place(out: str | os.PathLike, what: str, *, keep_others: bool = False) -> Iterator[Path]:
    """An empty folder beside `out` to write into; when the block ends without an error it
    becomes `out` (an earlier folder there is replaced only then, and put back if the swap itself
    fails); on any error, Ctrl-C included, it is removed and `out` is left as it was. Check the
    place with `check_target` first.

    `keep_others`: the finished files are moved into `out` one by one instead (each replaced
    whole), so that files of an earlier output that the new one does not write stay, e.g. the
    model card beside a retrained model's weights."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:  # a read-only or missing place: the user's to fix, in one line
        raise IclgdError(f"cannot write the {what} into {out.parent}: {err.strerror or err}") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        _move_files_into(tmp, out) if keep_others else _swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_in(tmp: Path, out: Path) -> None:
    """Put the finished folder `tmp` at `out`, replacing an earlier one there (put back if the
    swap itself fails)."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _move_files_into(tmp: Path, out: Path) -> None:
    """Move every file of the finished folder `tmp` into `out` (each one replaced whole), then
    remove `tmp`."""
    out.mkdir(exist_ok=True)
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)
    tmp.rmdir()
