"""Import a user's Python file (probes, analyses) so that its decorators register."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from iclgd_lens.errors import IclgdError


def import_python_file(path: str | Path, kind: str) -> None:
    """Import `path` under a private module name; IclgdError with one line if that fails.

    `kind` ("hooks", "analyses") only names the file in error messages.
    """
    path = Path(path)
    if not path.is_file() or path.suffix != ".py":
        raise IclgdError(f"{kind} file not found or not a .py file: {path}")
    module_name = f"_iclgd_user_{kind}_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise IclgdError(f"cannot import {kind} file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except IclgdError:
        raise
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise IclgdError(f"error while importing {kind} file {path}: {type(err).__name__}: {err}") from None
