"""The one registry of what plugs into iclgd-lens: probes, report analyses and studies.

Each kind is a plain dict `name -> thing` in `REGISTRY`; the decorators that users write
(`@probe` in iclgd_lens.hooks, `@analysis` in iclgd_lens.analyses) call `register`. Things
come from three places, the same for every kind:

- built in (the modules of hooks/ and analyses/ register on import; studies are listed as
  "module:function" and imported only when asked for, `load_study`);
- a user's Python file (`load_file`, the CLI's `--hooks` / `--analyses`): importing it runs
  its decorators;
- installed packages, through the entry-point groups in `ENTRY_POINT_GROUPS`
  (`load_entry_points`): an entry point names a module (whose decorators register on import)
  or the object itself (registered under the entry point's name).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable

from iclgd_lens.errors import IclgdError

KINDS = ("probes", "analyses", "studies")
ENTRY_POINT_GROUPS = {
    "probes": "iclgd_lens.hooks",
    "analyses": "iclgd_lens.analyses",
    "studies": "iclgd_lens.studies",
}

REGISTRY: dict[str, dict[str, Any]] = {kind: {} for kind in KINDS}
"""kind -> {name: probe | analysis function | study ("module:function" or a function)}."""


def register(kind: str, name: str, thing: Any) -> Any:
    """Add `thing` under `name` (a later registration of the same name replaces it)."""
    if kind not in REGISTRY:
        raise IclgdError(f"unknown plug-in kind {kind!r}; kinds: {', '.join(KINDS)}")
    if not isinstance(name, str) or not name.strip():
        raise IclgdError(f"a {kind[:-1]} needs a non-empty name")
    REGISTRY[kind][name] = thing
    return thing


def load_entry_points(kind: str) -> dict[str, Any]:
    """Import what installed packages declare for `kind`; returns the registry of that kind
    (with the built-in studies, which iclgd_lens.analyses lists, when kind is "studies")."""
    if kind == "studies":
        importlib.import_module("iclgd_lens.analyses")
    for ep in entry_points(group=ENTRY_POINT_GROUPS[kind]):
        try:
            obj = ep.load()
        except Exception as err:  # a broken plugin is the plugin's fault: say which one
            raise IclgdError(f"cannot load {kind[:-1]} entry point {ep.name!r} ({ep.value}): {err}") from None
        if (
            kind != "probes" and callable(obj) and ep.name not in REGISTRY[kind]
        ):  # probes register through @probe
            register(kind, ep.name, obj)
    return REGISTRY[kind]


def load_file(path: str | Path, kind: str) -> list[str]:
    """Import a user's Python file so that its decorators register; returns the new names of
    `kind` (`kind` also names the file in error messages). One line of IclgdError on failure."""
    path = Path(path)
    label = {"probes": "hooks"}.get(kind, kind)
    if not path.is_file() or path.suffix != ".py":
        raise IclgdError(f"{label} file not found or not a .py file: {path}")
    before = set(REGISTRY[kind])
    module_name = f"_iclgd_user_{label}_{path.stem}_{abs(hash(str(path.resolve()))) % 10**8}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise IclgdError(f"cannot import {label} file {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except IclgdError:
        raise
    except Exception as err:
        sys.modules.pop(module_name, None)
        raise IclgdError(f"error while importing {label} file {path}: {type(err).__name__}: {err}") from None
    return sorted(set(REGISTRY[kind]) - before)


def load_study(name: str) -> Callable[..., Any]:
    """The `run` function of study `name`; IclgdError if unknown or its module is not installed."""
    studies = load_entry_points("studies")
    if name not in studies:
        raise IclgdError(f"unknown study {name!r}; studies: {', '.join(studies)}")
    target = studies[name]
    if callable(target):
        return target
    module_name, _, func_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):  # the study module itself is missing
            raise IclgdError(
                f"study {name!r} is not available: module {module_name} is not installed"
            ) from None
        raise IclgdError(f"study {name!r} needs a missing module: {err}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise IclgdError(f"study {name!r}: {module_name} has no function {func_name}()")
    return fn
