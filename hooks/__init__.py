"""Probes: the hook functions iclgd-lens records with, and how to add your own.

A probe is one decorated function. It names the hook points it needs (templates with
`{layer}`), receives their activations for one layer together with a `ReadContext`, and
returns named tensors with a leading batch dimension. Only what it returns is kept: the
slicing (read position, demonstration tokens) happens inside the hook, so no full cache is
ever built. Every registered probe is recorded in all conditions (ZSL, ICL, GD); one declared
`compare=True` (the default) has each returned vector compared layer by layer as a delta
cosine, and its curve appears in the report as `probe:<key>` without more code. Two probes
may not return the same key (the recorder refuses it).

    from iclgd_lens.hooks import probe, ReadContext

    @probe("mlp_out", points=["blocks.{layer}.hook_mlp_out"])
    def mlp_out(acts, ctx: ReadContext):
        return {"mlp_out": acts["hook_mlp_out"][ctx.batch_index, ctx.read_pos]}  # [batch, d_model]

`acts` is keyed by the point name without the `blocks.{layer}.` prefix. Return `{}` to skip a
condition (e.g. a probe that only makes sense on the demonstrations).

User probes live in any file: `iclgd_lens.plugins.load_file("my_probes.py", "probes")` (the
CLI's `--hooks`) imports it, and the decorator registers what it defines; `unregister(name)`
removes one again (every registered probe is recorded by a default `compare()`). Installed packages
can expose probes through the entry-point group `iclgd_lens.hooks` (iclgd_lens.plugins).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from iclgd_lens.errors import IclgdError
from iclgd_lens.plugins import REGISTRY, register

ProbeFn = Callable[[dict[str, torch.Tensor], "ReadContext"], dict[str, torch.Tensor]]


@dataclass
class ReadContext:
    """Where to read, for one forward pass of one condition at one layer.

    A pass may continue a shared prefix (the demonstrations, run once per episode and kept in
    the KV cache); then the key dimension of attention tensors is `prefix_len` longer than the
    query dimension. `read_pos` indexes this pass's positions, `key_read_pos` the key
    dimension; `segments` and `attention_mask` cover the key dimension (prefix included).
    """

    condition: str  # "zsl", "icl", "gd", "icl_prefix" (the shared demonstrations), or a baseline name
    layer: int
    read_pos: torch.Tensor  # [batch] position in this pass that predicts the label
    segments: torch.Tensor  # [batch, key_pos]: i+1 demo i, -1 query tokens, 0 other/padding
    attention_mask: torch.Tensor  # [batch, key_pos]
    prefix_len: int = 0
    n_heads: int = 1
    n_kv_heads: int = 1

    @property
    def batch_index(self) -> torch.Tensor:
        """arange(batch), for advanced indexing `x[ctx.batch_index, ctx.read_pos]`."""
        return torch.arange(self.read_pos.shape[0], device=self.read_pos.device)

    @property
    def key_read_pos(self) -> torch.Tensor:
        """The read position in the key dimension: [batch]."""
        return self.read_pos + self.prefix_len

    @property
    def pass_segments(self) -> torch.Tensor:
        """Segments of this pass's own positions: [batch, pos]."""
        return self.segments[:, self.prefix_len :]


@dataclass(frozen=True)
class Probe:
    """A named hook function and the hook points it reads (templates with `{layer}`)."""

    name: str
    points: tuple[str, ...]
    fn: ProbeFn
    description: str = ""
    compare: bool = True  # compare every returned vector across conditions as a delta cosine, `probe:<key>`
    # (False: the engine's named metrics consume the outputs, e.g. attn_out -> simaou, or they are no vectors)

    @property
    def built_in(self) -> bool:
        """Whether iclgd-lens ships this probe (a user's can be unregistered, a built-in one not)."""
        return _built_in(self.fn)

    def point_names(self, layer: int) -> list[str]:
        return [p.format(layer=layer) for p in self.points]

    @staticmethod
    def short_name(point: str) -> str:
        """`blocks.{layer}.attn.hook_z` -> `attn.hook_z` (the key in `acts`)."""
        prefix = "blocks.{layer}."
        return point[len(prefix) :] if point.startswith(prefix) else point


PROBES: dict[str, Probe] = REGISTRY["probes"]
"""Every registered probe by name (built-in ones and those loaded from users' files): the
plug-in registry's "probes" (iclgd_lens.plugins)."""


def _built_in(fn: ProbeFn) -> bool:
    return getattr(fn, "__module__", "").startswith("iclgd_lens.hooks.")


def _first_sentence(doc: str) -> str:
    """A docstring's first sentence on one line (a probe's description in `iclgd-lens list`)."""
    text = " ".join(doc.split())
    end = text.find(". ")
    return text if end < 0 else text[: end + 1]


def probe(
    name: str, points: list[str] | tuple[str, ...], *, description: str = "", compare: bool = True
) -> Callable[[ProbeFn], ProbeFn]:
    """Register a hook function as a probe (see the module docstring for the contract)."""
    if not points:
        raise IclgdError(f"probe {name!r} must name at least one hook point")
    if isinstance(points, str):
        raise IclgdError(
            f"probe {name!r}: points must be a list of hook point names, got the string {points!r}"
        )

    def decorate(fn: ProbeFn) -> ProbeFn:
        if name in DEFAULT_PROBES and not _built_in(fn):
            raise IclgdError(
                f"probe name {name!r} is a built-in probe's; give yours another name (built-in: "
                f"{', '.join(DEFAULT_PROBES)})"
            )
        register(
            "probes",
            name,
            Probe(name, tuple(points), fn, description or _first_sentence(fn.__doc__ or ""), compare),
        )
        return fn

    return decorate


def unregister(name: str) -> None:
    """Remove a probe registered by the user (a probe that fails is recorded by every later
    default `compare()` until it is removed or redefined). Built-in probes cannot be removed:
    leave them out with `compare(probes=[...])`."""
    _load_builtin()
    if name not in PROBES:
        raise IclgdError(f"no probe {name!r} is registered; registered: {sorted(PROBES)}")
    if PROBES[name].built_in:
        raise IclgdError(f"probe {name!r} is built in; leave it out with compare(probes=[...]) instead")
    del PROBES[name]


def get_probes(names: list[str] | None = None) -> list[Probe]:
    """The probes to record: `names` in order, or the default set."""
    _load_builtin()
    if names is None:
        names = list(DEFAULT_PROBES)
    missing = [n for n in names if n not in PROBES]
    if missing:
        raise IclgdError(f"unknown probe(s) {missing}; registered: {sorted(PROBES)}")
    return [PROBES[n] for n in names]


DEFAULT_PROBES = (
    "attn_out",
    "head_out",
    "scores",
    "demo_attention",
    "query_vectors",
    "kv_outer",
    "resid_out",
)
"""What `compare` records unless told otherwise."""


_entry_points_loaded = False


def _load_builtin() -> None:
    """The built-in probes, and once per process those installed packages ship through the
    entry-point group `iclgd_lens.hooks` (docs/extending.md)."""
    global _entry_points_loaded
    from iclgd_lens.hooks import attention, keys_values, residual, scores  # noqa: F401  (registers)

    if not _entry_points_loaded:
        from iclgd_lens.plugins import load_entry_points

        _entry_points_loaded = True
        load_entry_points("probes")


__all__ = ["probe", "unregister", "Probe", "ReadContext", "PROBES", "get_probes", "DEFAULT_PROBES"]
