"""A sweep: the axes of a research grid (models x tasks x k x GD settings x seeds) and its cells.

    spec = SweepSpec.from_toml("grid.toml")           # or SweepSpec(models=[...], k=[1, 2, 4], ...)
    cells(spec)                                       # the cross product, minus `exclude`, with `zip`

A TOML spec holds the same fields as the dataclass (docs/sweeps.md):

    name = "grid"
    models = ["tiny-llama-icl", "tiny-llama-iclobj"]   # embedded names, local folders, hub ids
    tasks = ["default", "sst2", {data = "mine.csv", template = "Review: {text} Verdict:",
             label_words = ["bad", "good"], text_column = "review", label_column = "stars"}]
    k = [1, 2, 4, 8]
    seeds = [0, 1]
    gd = ["dai", {preset = "shen", lr = [1e-3, 1e-4], epochs = [20, 200]}]  # list values: a grid
    exclude = [{model = "tiny-llama-iclobj", k = 8}]
    zip = [["task", "gd"]]                              # pair the i-th task with the i-th GD setting

A cell is one compare() call (or, with `[study]`, one study run) and is identified in the store by
the hash of its resolved configuration (`identity.py`), never by its position in the grid.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from iclgd_lens.errors import IclgdError
from iclgd_lens.limits import MAX_SEED, MAX_THREADS

AXES = ("model", "task", "k", "gd", "seed")
"""The axes of a sweep, in the order cells are listed (and run: cells of one model together)."""

GD_FIELDS = ("params", "layer", "optimizer", "lr", "epochs", "batch_size", "loss_on", "layer_causal")
"""GDConfig fields a spec may set beside `preset` (a list value makes a grid over that field)."""

TASK_KEYS = (
    "name",
    "data",
    "format",
    "template",
    "label_words",
    "text_column",
    "label_column",
    "max_examples",
    "split_train",
    "split_test",
    "gd_lr",
)
"""Keys of a task table in a spec; `data` (a file or folder) or `name` (built in / paper) is required."""

PRESETS_DIR = Path(__file__).parent / "presets"


@dataclass(frozen=True)
class TaskRef:
    """A task as a spec names it: built in ("default"), a paper format, or a local data file with
    its prompt template, label words and columns (`formats.load_task`)."""

    name: str = "default"
    data: str | None = None
    format: str | None = None
    template: str | None = None
    label_words: tuple[str, ...] | None = None
    text_column: str | None = None
    label_column: str | None = None
    max_examples: int | None = None
    split_train: str = "train"
    split_test: str | None = None
    gd_lr: float | None = None  # the task's own GD learning rate (a preset without lr takes it)

    @property
    def label(self) -> str:
        """The short name reports and `exclude` use."""
        return self.name

    def resolve(self, seed: int):
        """The Task (the embedded models' default task for "default")."""
        from iclgd_lens.tasks import resolve_task
        from iclgd_lens.tasks.formats import load_task

        if self.data is None and self.name == "default":
            task = resolve_task(None, seed)
        else:
            task = self._load(load_task, seed)
        if self.gd_lr is not None:
            task.gd_lr = float(self.gd_lr)  # a fresh Task: nobody else holds it
        return task

    def _load(self, load_task, seed: int):
        return load_task(
            self.data or self.name,
            split_train=self.split_train,
            split_test=self.split_test,
            max_examples=self.max_examples,
            task_format=self.format,
            label_words=self.label_words,
            template=self.template,
            text_column=self.text_column,
            label_column=self.label_column,
            seed=seed,
        )


@dataclass(frozen=True)
class GDRef:
    """One GD setting: a preset and the fields it overrides (None: the preset's / the task's lr)."""

    preset: str = "dai"
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        parts = [self.preset] + [
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.overrides
        ]
        return " ".join(parts)

    def config(self):
        """The GDConfig (its lr still None when the task's own is meant)."""
        from iclgd_lens.engine.gd import GDConfig

        return GDConfig.preset(self.preset, **dict(self.overrides))


@dataclass(frozen=True)
class Cell:
    """One point of the grid: what one job computes."""

    model: str
    task: TaskRef
    k: int
    gd: GDRef
    seed: int
    settings: str  # the spec's scalar settings (n_episodes, device, study, ...) as sorted JSON
    # the labels `cells()` gave the model and task, unique within the spec ("": the short name)
    model_tag: str = field(default="", compare=False)
    task_tag: str = field(default="", compare=False)

    def setting(self, name: str, default: Any = None) -> Any:
        return json.loads(self.settings).get(name, default)

    @property
    def model_label(self) -> str:
        """The model's short name (a folder's name, else the name as given), or the longer one
        `cells()` chose where two models of the spec share a short name."""
        return self.model_tag or _model_short_name(self.model)

    @property
    def task_label(self) -> str:
        """The task's short name, or the longer one `cells()` chose where two tasks share it."""
        return self.task_tag or self.task.label

    @property
    def labels(self) -> dict[str, Any]:
        """Axis name -> the value a person reads (what `exclude` and the sweep report use)."""
        return {
            "model": self.model_label,
            "task": self.task_label,
            "k": self.k,
            "gd": self.gd.label,
            "seed": self.seed,
        }


@dataclass
class SweepSpec:
    """A research grid. Every list field is an axis; the scalar fields apply to every cell.

    `gd` entries are preset names or dicts {preset, lr, epochs, params, batch_size, layer_causal, ...}
    whose list values expand into a grid. `tasks` entries are names ("default", a paper format, a
    data file) or dicts with TASK_KEYS. `baselines` is True / False / a list of names; `probes`
    None (the default set) or a list. `threads` is torch's thread count in every job (it can
    change the last bits, so it is part of each cell's identity). `study` (a dict with `name` and
    the study's parameters) makes every cell a run of that study instead of a comparison.
    """

    name: str = "sweep"
    models: list[str] = field(default_factory=lambda: ["tiny-llama-icl"])
    tasks: list[Any] = field(default_factory=lambda: ["default"])
    k: list[int] = field(default_factory=lambda: [8])
    gd: list[Any] = field(default_factory=lambda: ["dai"])
    seeds: list[int] = field(default_factory=lambda: [0])
    n_episodes: int = 8
    n_queries: int = 6
    baselines: Any = True
    probes: list[str] | None = None
    batch_size: int = 128
    share_prefix: bool = True
    artifacts: bool = True
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    check_resources: bool = True
    exclude: list[dict] = field(default_factory=list)
    zip: list[list[str]] = field(default_factory=list)
    study: dict | None = None
    store: str | None = None  # default store folder (relative to the spec file)
    description: str = ""

    # ---- reading -----------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict, *, base: Path | None = None, where: str = "sweep spec") -> "SweepSpec":
        """A spec from a dict (a parsed TOML file); relative data and model paths are read
        against `base` (the spec file's folder). One-line IclgdError for unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise IclgdError(f"{where}: unknown key {unknown[0]!r}; keys are {', '.join(sorted(known))}")
        data = dict(data)
        for name in ("models", "tasks", "k", "gd", "seeds"):
            if name in data and not isinstance(data[name], list):
                data[name] = [data[name]]
        _check_store(data.get("store"))  # before it is read against `base`
        if base is not None:
            for model in data.get("models", []):  # named as the spec spells it
                _check_model_path(model, base)
            data["tasks"] = [_rebase_task(t, base) for t in data.get("tasks", ["default"])]
            data["models"] = [_rebase_model(m, base) for m in data.get("models", ["tiny-llama-icl"])]
            if isinstance(data.get("exclude"), list):  # a model named by its relative path, as in models
                data["exclude"] = [
                    {**rule, "model": _rebase_model(rule["model"], base)}
                    if isinstance(rule, dict) and isinstance(rule.get("model"), str)
                    else rule
                    for rule in data["exclude"]
                ]
            if data.get("store"):
                data["store"] = (
                    str((base / data["store"]).resolve())
                    if not Path(data["store"]).is_absolute()
                    else data["store"]
                )
        spec = cls(**data)
        spec.check()
        return spec

    @classmethod
    def from_toml(cls, path: str | Path) -> "SweepSpec":
        """Read a TOML spec (standard-library `tomllib`)."""
        path = Path(path)
        if not path.is_file():
            raise IclgdError(
                f"sweep spec {path} not found (a .toml file, or a preset: {', '.join(preset_names())})"
            )
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise IclgdError(
                    "reading a sweep spec needs Python >= 3.11 (tomllib) or the tomli package"
                ) from None
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
            raise IclgdError(f"{path} is not valid TOML: {err}") from None
        except RecursionError:
            raise IclgdError(f"{path}: nested too deeply to read as TOML") from None
        except OSError as err:
            raise IclgdError(f"cannot read the sweep spec {path}: {err.strerror or err}") from None
        return cls.from_dict(data, base=path.resolve().parent, where=str(path))

    def with_settings(self, **changes) -> "SweepSpec":
        """A copy with fields changed (e.g. from the command line's --set); checked again."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise IclgdError(
                f"sweep spec has no setting {unknown[0]!r}; settings are {', '.join(sorted(known))}"
            )
        for name in ("models", "tasks", "k", "gd", "seeds"):
            if name in changes and not isinstance(changes[name], list):
                changes[name] = [changes[name]]
        spec = replace(self, **changes)
        spec.check()
        return spec

    def check(self) -> None:
        """Every axis non-empty and of the right type; exclude/zip name real axes."""
        for name in ("models", "tasks", "k", "gd", "seeds"):
            if not getattr(self, name):
                raise IclgdError(f"sweep spec: {name} needs at least one value")
        if not all(isinstance(m, str) and m for m in self.models):
            raise IclgdError(f"sweep spec: models are names or paths (strings), got {self.models!r}")
        for model in self.models:
            _check_model_path(model)
        for name in ("k", "seeds"):
            values = getattr(self, name)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise IclgdError(f"sweep spec: {name} takes whole numbers >= 0, got {values!r}")
        if max(self.k) == 0:  # as `report --k 0`: zero-shot alone has nothing for GD to train on
            raise IclgdError(
                "sweep spec: k = [0] alone trains nothing; give a k >= 1 "
                "(0 may stand beside other k, for zero-shot accuracy)"
            )
        if max(self.seeds) > MAX_SEED:
            raise IclgdError(f"sweep spec: seeds must be at most {MAX_SEED}, got {max(self.seeds)}")
        for name in ("n_episodes", "n_queries", "threads", "batch_size"):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
                raise IclgdError(f"sweep spec: {name} must be a whole number >= 1, got {value!r}")
        if self.threads > MAX_THREADS:
            raise IclgdError(f"sweep spec: threads must be from 1 to {MAX_THREADS}, got {self.threads}")
        if not (isinstance(self.baselines, bool) or isinstance(self.baselines, list)):
            raise IclgdError(
                f"sweep spec: baselines is true, false or a list of names, got {self.baselines!r}"
            )
        for group in self.zip:
            if not isinstance(group, list) or len(group) < 2 or any(a not in AXES for a in group):
                raise IclgdError(
                    f"sweep spec: each zip entry lists two or more axes of {', '.join(AXES)}, got {group!r}"
                )
        zipped = [a for group in self.zip for a in group]
        if len(zipped) != len(set(zipped)):
            raise IclgdError(f"sweep spec: an axis appears in two zip groups: {self.zip!r}")
        for rule in self.exclude:
            if not isinstance(rule, dict) or not rule or any(a not in AXES for a in rule):
                raise IclgdError(
                    f"sweep spec: each exclude entry maps axes ({', '.join(AXES)}) to values, got {rule!r}"
                )
        if self.study is not None and not (
            isinstance(self.study, dict) and isinstance(self.study.get("name"), str)
        ):
            raise IclgdError(
                f'sweep spec: study is a table with a name (e.g. name = "causal"), got {self.study!r}'
            )
        for name in ("name", "description"):
            if not isinstance(getattr(self, name), str):
                raise IclgdError(f"sweep spec: {name} is text, got {getattr(self, name)!r}")
        _check_store(self.store)
        for name in ("share_prefix", "artifacts", "check_resources"):
            if not isinstance(getattr(self, name), bool):
                value = getattr(self, name)
                raise IclgdError(
                    f"sweep spec: {name} is true or false (a TOML boolean, unquoted), got {value!r}"
                )
        self._check_compare_settings()
        if self.study is not None:
            self._check_study()
        self.task_refs()
        by_label: dict[str, GDRef] = {}
        for ref in self.gd_refs():
            other = by_label.setdefault(ref.label, ref)
            if other != ref:
                raise IclgdError(
                    f"sweep spec: two GD settings read alike as {ref.label!r} ({dict(other.overrides)} and "
                    f"{dict(ref.overrides)}; labels show 6 significant digits): make them differ there"
                )

    def _check_compare_settings(self) -> None:
        """dtype, device, probes and baselines, with the resolvers compare() and load_model use.
        The device is checked for its form only (cpu, cuda, cuda:N, mps): the machine that plans
        a sweep may have no GPU while the one that runs its cells has; a device missing there
        fails those cells, one line each."""
        from iclgd_lens.models import resolve_dtype

        try:
            resolve_dtype(self.dtype)
        except IclgdError as err:
            raise IclgdError(f"sweep spec: {err}") from None
        _check_device(self.device)
        if self.probes is not None:
            names = [self.probes] if isinstance(self.probes, str) else self.probes
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise IclgdError(
                    f"sweep spec: probes is a list of probe names (or leave it out for the default set), "
                    f"got {self.probes!r}"
                )
            from iclgd_lens.hooks import get_probes

            try:
                get_probes(names)
            except IclgdError as err:
                raise IclgdError(f"sweep spec: {err}") from None
        if isinstance(self.baselines, list):
            from iclgd_lens.engine.compare import _chosen_baselines

            if not all(isinstance(b, str) for b in self.baselines):
                raise IclgdError(f"sweep spec: baselines lists names, got {self.baselines!r}")
            try:
                _chosen_baselines(self.baselines)
            except IclgdError as err:
                raise IclgdError(f"sweep spec: {err}") from None

    def _check_study(self) -> None:
        """The study exists and takes the parameters the [study] table gives, of the right types
        (what `iclgd-lens study NAME --set` checks)."""
        import inspect

        from iclgd_lens.plugins import load_study
        from iclgd_lens.study import check_study_args

        name = self.study["name"]
        try:
            run = load_study(name)
        except IclgdError as err:
            raise IclgdError(f"sweep spec: {err}") from None
        params = {k: v for k, v in self.study.items() if k != "name"}
        accepted = inspect.signature(run).parameters
        unknown = sorted(set(params) - set(accepted))
        if unknown and not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
            raise IclgdError(
                f"sweep spec: study {name!r} has no parameter {unknown[0]!r}; "
                f"it takes {', '.join(accepted) or 'none'}"
            )
        try:
            check_study_args(run, params, name)
        except IclgdError as err:
            raise IclgdError(f"sweep spec: {err}") from None

    # ---- axes ----------------------------------------------------------------------------
    def task_refs(self) -> list[TaskRef]:
        return [_task_ref(t) for t in self.tasks]

    def gd_refs(self) -> list[GDRef]:
        out: list[GDRef] = []
        for entry in self.gd:
            out.extend(_gd_refs(entry))
        return out

    def settings(self) -> str:
        """The scalar settings every cell shares (part of each cell's identity), as sorted JSON."""
        names = (
            "n_episodes",
            "n_queries",
            "baselines",
            "probes",
            "batch_size",
            "share_prefix",
            "artifacts",
            "device",
            "dtype",
            "threads",
            "check_resources",
            "study",
        )
        try:
            return json.dumps({n: getattr(self, n) for n in names}, sort_keys=True)
        except TypeError as err:
            raise IclgdError(f"sweep spec: a setting is not plain data ({err})") from None


def _check_store(store: Any) -> None:
    if store is not None and not isinstance(store, str):
        raise IclgdError(f'sweep spec: store is a folder (text, e.g. store = "grid-store"), got {store!r}')


DEVICE_TYPES = ("cpu", "cuda", "mps")
"""Device types a spec may name (with an index for cuda: cuda:1)."""


def _check_device(device: Any) -> None:
    """cpu, cuda, cuda:N or mps (None: cpu). "auto" is refused: a cell's key records the device
    type, so the spec names the one its cells run on."""
    if device is None:
        return
    ok = isinstance(device, str)
    if ok:
        kind, sep, index = device.partition(":")
        ok = kind in DEVICE_TYPES and (not sep or (kind == "cuda" and index.isdigit()))
    if not ok:
        raise IclgdError(
            f"sweep spec: device is {', '.join(repr(d) for d in DEVICE_TYPES)} or 'cuda:N', got {device!r}"
            + (
                "; name the device the cells run on (it is part of each cell's key)"
                if device == "auto"
                else ""
            )
        )


def _rebase_task(entry: Any, base: Path) -> Any:
    """A task's data path read against the spec's folder (names of built-in tasks unchanged)."""
    if isinstance(entry, dict) and entry.get("data") and not Path(entry["data"]).expanduser().is_absolute():
        return {**entry, "data": str(base / entry["data"])}
    if isinstance(entry, str) and ("/" in entry or entry.endswith((".jsonl", ".csv"))):
        path = Path(entry).expanduser()
        return entry if path.is_absolute() else str(base / path)
    return entry


def looks_like_path(name: str) -> bool:
    """Whether a model name is a folder's path rather than an embedded name or a hub id org/name:
    it starts with ./, ../, /, ~ or has more separators than org/name."""
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    return name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _check_model_path(name: Any, base: Path | None = None) -> None:
    """A model given as a path must be an existing folder (read against `base` for ./ and ../);
    otherwise it would be taken for a hub id that is not downloaded."""
    if not isinstance(name, str) or not looks_like_path(name):
        return
    path = Path(name).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if not path.exists():
        raise IclgdError(f"sweep spec: model folder {name} does not exist")


def _rebase_model(name: str, base: Path) -> str:
    """A model given as a relative folder (./m, ../m) read against the spec's folder."""
    if isinstance(name, str) and name.startswith(("./", "../")):
        return str((base / name).resolve())
    return name


def _task_ref(entry: Any) -> TaskRef:
    if isinstance(entry, TaskRef):
        return entry
    if isinstance(entry, str):
        is_file = "/" in entry or entry.endswith((".jsonl", ".csv")) or Path(entry).expanduser().exists()
        if is_file and entry != "default":
            return TaskRef(name=Path(entry).stem or entry, data=entry)
        return TaskRef(name=entry)
    if isinstance(entry, dict):
        unknown = sorted(set(entry) - set(TASK_KEYS))
        if unknown:
            raise IclgdError(
                f"sweep spec: task key {unknown[0]!r} unknown; task keys are {', '.join(TASK_KEYS)}"
            )
        if not entry.get("data") and not entry.get("name"):
            raise IclgdError(
                f"sweep spec: a task table needs `data` (a file or folder) or `name`, got {entry!r}"
            )
        _check_task_values(entry)
        values = dict(entry)
        if values.get("label_words") is not None:
            values["label_words"] = tuple(values["label_words"])
        values.setdefault("name", Path(str(values.get("data"))).stem)
        return TaskRef(**values)
    raise IclgdError(f"sweep spec: a task is a name, a data file or a table, got {entry!r}")


TASK_TEXT_KEYS = (
    "name",
    "data",
    "format",
    "template",
    "text_column",
    "label_column",
    "split_train",
    "split_test",
)
"""Task keys whose value is text."""


def _check_task_values(entry: dict) -> None:
    """The values of a task table have the types TaskRef needs (checked before any cell runs):
    text keys are text, `label_words` a list of texts (a string is not split into letters),
    `max_examples` a whole number >= 1, `gd_lr` a positive number."""
    for key in TASK_TEXT_KEYS:
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise IclgdError(f"sweep spec: task {key} is text, got {entry[key]!r}")
    words = entry.get("label_words")
    if words is not None and not (
        isinstance(words, (list, tuple)) and words and all(isinstance(w, str) for w in words)
    ):
        raise IclgdError(
            f'sweep spec: task label_words is a list of texts (e.g. ["bad", "good"]), got {words!r}'
        )
    count = entry.get("max_examples")
    if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and count >= 1):
        raise IclgdError(f"sweep spec: task max_examples is a whole number >= 1, got {count!r}")
    lr = entry.get("gd_lr")
    if lr is not None and not (
        isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr) and lr > 0
    ):
        raise IclgdError(f"sweep spec: task gd_lr is a positive number, got {lr!r}")


def _gd_refs(entry: Any) -> list[GDRef]:
    """One spec entry -> its GD settings (a dict's list values make a grid, in the listed order)."""
    if isinstance(entry, GDRef):
        return [entry]
    if isinstance(entry, str):
        refs = [GDRef(entry)]
    elif isinstance(entry, dict):
        values = dict(entry)
        preset = values.pop("preset", "dai")
        if not isinstance(preset, str):
            raise IclgdError(
                f"sweep spec: a GD preset is one name (list several settings as separate entries), "
                f"got {preset!r}"
            )
        unknown = sorted(set(values) - set(GD_FIELDS))
        if unknown:
            raise IclgdError(
                f"sweep spec: GD setting {unknown[0]!r} unknown; settings are preset, {', '.join(GD_FIELDS)}"
            )
        names = list(values)
        grids = [v if isinstance(v, list) else [v] for v in values.values()]
        if any(not g for g in grids):
            raise IclgdError(f"sweep spec: a GD grid list is empty in {entry!r}")
        refs = [GDRef(preset, tuple(zip(names, combo))) for combo in itertools.product(*grids)]
    else:
        raise IclgdError(f"sweep spec: a GD setting is a preset name or a table, got {entry!r}")
    for ref in refs:
        ref.config()  # unknown presets / bad values fail here, before any work
    return refs


# ---- labels ---------------------------------------------------------------------------------
def _model_short_name(model: str) -> str:
    """A folder's name for a path, else the name as given (a hub id, an embedded model)."""
    path = Path(model).expanduser()
    return path.name if model.startswith(("/", ".", "~")) and path.name else model


def _path_tail(path: str, parts: int) -> str:
    """The last `parts` components of `path` (the whole path when it has fewer)."""
    pieces = Path(path).expanduser().parts
    return "/".join(pieces[-parts:]) if pieces else path


def _tails(paths: list[str]) -> dict[str, str]:
    """Each path's shortest tail (last components) that no other of `paths` shares."""
    out = {}
    for path in paths:
        longest = len(Path(path).expanduser().parts)
        n = 1
        while n < longest and any(_path_tail(o, n) == _path_tail(path, n) for o in paths if o != path):
            n += 1
        out[path] = _path_tail(path, n)
    return out


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def _unique(labels: dict[Any, str]) -> dict[Any, str]:
    """Number the labels that are still shared (a last resort: every value keeps its own)."""
    counts: dict[str, int] = {}
    for label in labels.values():
        counts[label] = counts.get(label, 0) + 1
    seen: dict[str, int] = {}
    out = {}
    for value, label in labels.items():
        if counts[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            label = f"{label} #{seen[label]}"
        out[value] = label
    return out


def model_labels(models: list[str]) -> dict[str, str]:
    """Model -> its label: the short name, or as much of the path as tells apart two folders of
    the same name (`a/llama`, `b/llama`), so a report never pools two models' cells."""
    labels = {m: _model_short_name(m) for m in dict.fromkeys(models)}
    for short in set(labels.values()):
        group = [m for m in labels if labels[m] == short]
        if len(group) > 1:
            labels.update(_tails(group))
    return _unique(labels)


def task_labels(refs: list[TaskRef]) -> dict[TaskRef, str]:
    """TaskRef -> its label: the name, or where two tasks of the spec share a name, the name with
    the settings in which they differ (`default gd_lr=0.3`) and, for two files of the same stem,
    as much of their path as tells them apart, so a report never pools two tasks' cells."""
    labels = {r: r.label for r in dict.fromkeys(refs)}
    for name in set(labels.values()):
        group = [r for r in labels if labels[r] == name]
        if len(group) < 2:
            continue
        differing = [
            f.name
            for f in fields(TaskRef)
            if f.name not in ("name", "data") and len({getattr(r, f.name) for r in group}) > 1
        ]
        data_tails = _tails(sorted({r.data for r in group if r.data is not None}))
        data_differ = len({r.data for r in group}) > 1
        for ref in group:
            head = data_tails[ref.data] if data_differ and ref.data is not None else ref.label
            extra = [f"{f}={_value_text(getattr(ref, f))}" for f in differing if getattr(ref, f) is not None]
            labels[ref] = " ".join([head, *extra])
    return _unique(labels)


# ---- the grid ------------------------------------------------------------------------------
def cells(spec: SweepSpec) -> list[Cell]:
    """The cells of `spec`: the cross product of its axes (zipped axes advance together; an axis
    of length 1 in a zip group is repeated), without the cells an `exclude` entry matches."""
    axes: dict[str, list] = {
        "model": list(spec.models),
        "task": spec.task_refs(),
        "k": list(spec.k),
        "gd": spec.gd_refs(),
        "seed": list(spec.seeds),
    }
    # groups of axes that vary together: each zip group, then every other axis on its own
    groups: list[list[str]] = [list(g) for g in spec.zip]
    groups += [[a] for a in AXES if not any(a in g for g in groups)]
    group_rows = []
    for group in groups:
        lengths = {len(axes[a]) for a in group if len(axes[a]) != 1}
        if len(lengths) > 1:
            sizes = ", ".join(f"{a}: {len(axes[a])}" for a in group)
            raise IclgdError(f"sweep spec: zipped axes must have the same length (or 1); got {sizes}")
        n = lengths.pop() if lengths else 1
        group_rows.append([{a: axes[a][i if len(axes[a]) > 1 else 0] for a in group} for i in range(n)])
    settings = spec.settings()
    model_tags, task_tags = model_labels(axes["model"]), task_labels(axes["task"])
    out, seen, matched = [], set(), [False] * len(spec.exclude)
    for combo in itertools.product(*group_rows):
        values = {a: v for part in combo for a, v in part.items()}
        model, task = values["model"], values["task"]
        cell = Cell(
            model,
            task,
            values["k"],
            values["gd"],
            values["seed"],
            settings,
            model_tags[model],
            task_tags[task],
        )
        hits = [i for i, rule in enumerate(spec.exclude) if _matches(rule, cell)]
        for i in hits:
            matched[i] = True
        if hits or cell in seen:
            continue
        seen.add(cell)
        out.append(cell)
    out.sort(key=lambda c: spec.models.index(c.model))  # stable: one model's cells together
    if not out:
        raise IclgdError("sweep spec: every cell is excluded; nothing to run")
    for rule in (r for r, hit in zip(spec.exclude, matched) if not hit):
        warnings.warn(
            f"sweep spec: exclude {rule!r} matches no cell (a typo? exclude reads the labels --dry-run "
            f"lists, e.g. {out[0].labels})",
            stacklevel=2,
        )
    return out


def _matches(rule: dict, cell: Cell) -> bool:
    labels = cell.labels
    return all(labels[a] == v or (a == "model" and str(v) == cell.model) for a, v in rule.items())


# ---- presets -----------------------------------------------------------------------------------
def preset_names() -> list[str]:
    """The named paper sweeps shipped with the package (`presets/*.toml`)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_spec(name_or_path: str | Path) -> SweepSpec:
    """A spec file, or a preset by name (`dai2023`, `shen2024`, `deutch2024`)."""
    path = Path(name_or_path)
    if not path.exists() and str(name_or_path) in preset_names():
        return SweepSpec.from_toml(PRESETS_DIR / f"{name_or_path}.toml")
    return SweepSpec.from_toml(path)


def on_data_dir(spec: SweepSpec, data_dir: str | Path) -> tuple[SweepSpec, list[str]]:
    """A preset's paper tasks read from the user's folder: task `sst2` from DIR/sst2.jsonl,
    DIR/sst2.csv or DIR/sst2/ (train and test files). Tasks with no data there are dropped
    (their names returned) together with their zipped partners; none found is an error."""
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise IclgdError(f"--data-dir {folder} is not a folder")
    keep, missing = [], []
    for i, ref in enumerate(spec.task_refs()):
        found = [
            p
            for p in (folder / f"{ref.name}.jsonl", folder / f"{ref.name}.csv", folder / ref.name)
            if p.exists()
        ]
        if found:
            keep.append((i, replace(ref, data=str(found[0]), format=ref.format or ref.name)))
        else:
            missing.append(ref.name)
    if not keep:
        raise IclgdError(
            f"--data-dir {folder} holds none of the tasks of {spec.name} "
            f"({', '.join(r.name for r in spec.task_refs())}); name files after the task "
            "(sst2.jsonl, cb.csv, agnews/ with train and test files)"
        )
    changes: dict[str, Any] = {"tasks": [ref for _, ref in keep]}
    index = [i for i, _ in keep]
    for group in spec.zip:  # keep the zipped partners of the tasks kept
        if "task" in group:
            for axis in group:
                if axis != "task":
                    field_name = {"model": "models", "seed": "seeds"}.get(axis, axis)
                    values = getattr(spec, field_name)
                    if len(values) > 1:
                        changes[field_name] = [values[i] for i in index]
    return spec.with_settings(**changes), missing
