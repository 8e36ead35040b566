"""Output folders written all at once: a report, a sweep report, a trained model.

The place is checked before any work (`check_target`), the folder is built beside it and moved
there only when complete (`written_in_place`), and nothing that is not an earlier output of the
same kind is ever replaced: the user's files stay theirs, and a run that fails or is interrupted
leaves no half-written folder behind."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from iclgd_lens import interrupts
from iclgd_lens.errors import IclgdError

MANIFEST = ".iclgd-lens-files.json"
"""Written into every folder that replaces its predecessor whole (a report): the files iclgd-lens
wrote there. A later run replaces the folder only while it holds no other file."""


def files_below(folder: Path) -> list[str]:
    """Every file (and link) below `folder`, as sorted relative POSIX paths, the manifest excluded."""
    found = []
    for root, dirs, files in os.walk(folder):
        base = Path(root).relative_to(folder)
        found += [(base / name).as_posix() for name in files]
        found += [(base / name).as_posix() for name in dirs if (Path(root) / name).is_symlink()]
    return sorted(f for f in found if f != MANIFEST)


def foreign_files(folder: Path, what: str) -> list[str] | None:
    """Files below `folder` that iclgd-lens did not write there (not in its manifest); None when
    the folder has no manifest of a `what` (then nothing in it is known to be ours)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text("utf-8"))
        written = set(manifest["files"]) if manifest.get("what") == what else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if written is None:
        return None
    return [f for f in files_below(folder) if f not in written]


def _refuse_foreign(out: Path, what: str) -> None:
    """Refuse to replace `out` whole unless every file in it is one iclgd-lens wrote there."""
    foreign = foreign_files(out, what)
    if foreign is None:
        raise IclgdError(
            f"refusing to replace {out}: it holds no record of the files iclgd-lens wrote there (a {what} "
            "from an older version, or not one); move or delete it yourself, or choose another folder"
        )
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise IclgdError(
            f"refusing to replace {out}: it holds files iclgd-lens did not write ({shown}); "
            "move them out, or choose another folder"
        )


def check_target(
    out: str | os.PathLike, is_ours: Callable[[Path], bool], what: str, *, whole: bool = False
) -> None:
    """Refuse, in one line, a place `out` that could not take a folder of `what` ("report",
    "model"): an existing file, a non-empty folder that `is_ours` does not recognise, or a parent
    that is a file or cannot be written (a folder is made and removed there at once, so that a
    long run does not end in an unwritable place; nothing is left behind). `whole`: the new
    folder will replace `out` whole, so `out` may hold only files its manifest lists; an earlier
    folder with a write-protected folder inside is refused too (it could not be removed whole).
    A path the system cannot look at (too long, in an unreadable folder) is refused in one line."""
    out = Path(out).absolute()
    try:
        _check_target(out, is_ours, what, whole)
    except OSError as err:
        raise IclgdError(f"cannot use {out} as the {what} folder: {err.strerror or err}") from None


def _check_target(out: Path, is_ours: Callable[[Path], bool], what: str, whole: bool) -> None:
    if out.is_symlink():
        raise IclgdError(f"{what} folder {out} is a symbolic link; name the folder itself")
    if out.exists() and not out.is_dir():  # a file, a FIFO, a device (/dev/null)
        raise IclgdError(f"{what} folder {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not is_ours(out):
            raise IclgdError(f"refusing to replace {out}: it is not empty and holds no iclgd-lens {what}")
        if whole:
            _refuse_foreign(out, what)
            locked = [d for d in [out, *(p for p in out.rglob("*") if p.is_dir())] if not _writable(d)]
            if locked:
                raise IclgdError(
                    f"refusing to replace {out}: {locked[0]} is write-protected, so the earlier {what} "
                    "could not be removed whole; make it writable yourself, or choose another folder"
                )
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise IclgdError(f"cannot write the {what} into {out.parent}: {parent} is not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=parent))
    except OSError as err:
        raise IclgdError(f"cannot write the {what} into {out.parent}: {err.strerror or err}") from None


def _writable(folder: Path) -> bool:
    """Whether this process may remove entries of `folder` (write and search permission)."""
    return os.access(folder, os.W_OK | os.X_OK)


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
    made = [p for p in [out.parent, *out.parent.parents] if not p.exists()]  # removed again on failure
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except OSError as err:  # a read-only or missing place: the user's to fix, in one line
        raise IclgdError(f"cannot write the {what} into {out.parent}: {err.strerror or err}") from None
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
        interrupts.check()  # a Ctrl-C that a destructor swallowed: the output is not put in place
        for file in tmp.rglob("*"):  # libraries that write privately (safetensors: 0o600) get ordinary files
            if file.is_file() and not file.is_symlink():
                os.chmod(file, 0o644)
        if keep_others:
            _move_files_into(tmp, out)
        else:
            manifest = {"what": what, "files": files_below(tmp)}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1), "utf-8")
            _swap_in(tmp, out, what)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # innermost first; only folders this call made and that stayed empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _swap_in(tmp: Path, out: Path, what: str) -> None:
    """Put the finished folder `tmp` at `out`, replacing an earlier one there (put back if the
    swap itself fails). Files that appeared in `out` since it was checked are never deleted: the
    new folder is then kept beside it, and the error says where."""
    if out.exists() and any(out.iterdir()):
        try:
            _refuse_foreign(out, what)
        except IclgdError as err:
            beside = out.parent / f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            os.replace(tmp, beside)
            raise IclgdError(f"{err}; the new {what} is at {beside}") from None
    try:
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
    except OSError as err:  # e.g. an immutable or busy folder: the earlier one stays as it was
        raise IclgdError(f"cannot put the {what} at {out}: {err.strerror or err}") from None
    shutil.rmtree(old, ignore_errors=True)


def _move_files_into(tmp: Path, out: Path) -> None:
    """Move every file of the finished folder `tmp` into `out` (each one replaced whole), then
    remove `tmp`."""
    out.mkdir(exist_ok=True)
    for path in sorted(tmp.iterdir()):
        os.replace(path, out / path.name)
    tmp.rmdir()
