"""Study: causal tests of "ICL is GD" — put ICL's, GD's and the dual form's updates into the
forward pass and see what they do to the prediction.

Every published comparison (Dai et al., Deutch et al., Shen et al.) is correlational: it
measures how alike ICL's and GD's updates are. Here the updates are swapped into the forward
pass at the read position, and the change of the prediction is measured:

* **Activation patching.** In the zero-shot (ZSL) run, the attention output of layer l
  (`blocks.{l}.hook_attn_out`) at the read position is replaced by its value under ICL, under
  GD, under GD rescaled to ICL's update norm, or by a random update of ICL's norm; single
  layers, cumulative from the bottom (layers 0..l) and from the top (layers l..L-1). Measured:
  the fraction of ICL's label-word logit difference recovered and the reduction of KL(ICL || .).
  Patching every layer with ICL's values reproduces ICL's read-position logits exactly.
* **Update substitution.** In the ICL run at layer l, ICL's attention update h_ICL - h_ZSL at
  the read position is replaced by GD's h_GD - h_ZSL (as is, and rescaled to ICL's norm), by a
  random update of ICL's norm, by ICL's own update under another demonstration order (the
  ceiling), or removed (the update's own weight): how much does ICL's prediction change?
* **Dual-form transplant.** Dai's implicit weight update dW_ICL = sum_i v_i k_i^T (per kv head,
  over the demonstration tokens) is applied to the ZSL run, which has no demonstrations in
  context, by adding dW_ICL q to each head's output z at the read position (intervention
  hooks); variants: Dai's linear form, the same direction at ICL's update norm, the
  demonstrations' keys and values weighted as softmax attention would weight them, and a random
  update of ICL's norm. On von Oswald's linear self-attention layer the linear transplant *is*
  ICL (tests/test_causal.py).

    from iclgd_lens.analyses.causal import run
    result = run("tiny-llama-icl")          # 10-20 s on one CPU thread, everything included
    print(result.findings)

Definitions, choices and the measured numbers: docs/studies/causal.md.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import torch

from iclgd_lens import (
    GDConfig,
    IclgdError,
    Probe,
    Recorder,
    Task,
    added_context_mask,
    check_least_work,
    delta_hooks,
    encode_prompts,
    label_token_ids,
    metrics,
    permuted_demos,
    resolve_task,
    stats,
    train_deltas,
    untrained_copy,
    versions,
)
from iclgd_lens.study import StudyResult, as_bridge, checked_args, device_of, model_name

QUESTION = (
    "Put into the forward pass, do GD's attention updates (or Dai's dual-form weight update) do what "
    "ICL's do, layer by layer?"
)
COLUMNS = ["metric", "comparison", "scope", "layer", "head", "episode", "query", "value"]
"""The table: Results' columns plus `scope` (which layers an intervention touches)."""
QUERY_METRICS = ("logit_diff", "accuracy", "agreement", "kl_to_icl", "kl_to_gd")
"""One value per query of every run (conditions and interventions)."""
EPISODE_METRICS = ("recovered", "kl_reduction")
"""One value per episode (query -1): ratios of the episode's sums (see `episode_ratios`)."""
DUAL_FORM_METRICS = ("dual_form_cos", "dual_form_ratio")
"""Per head (head >= 0), comparison "transplant:linear", scope "single": how the linear transplant's
dz = dW_ICL q at layer l compares with ICL's real update z_ICL - z_ZSL (cosine; norm ratio)."""
RANGES = {
    "accuracy": (0.0, 1.0),
    "agreement": (0.0, 1.0),
    "kl_to_icl": (0.0, math.inf),
    "kl_to_gd": (0.0, math.inf),
    "kl_reduction": (-math.inf, 1.0),
    "dual_form_ratio": (0.0, math.inf),
}
"""The range of this study's own metrics (logit_diff and recovered are unbounded): the episode
intervals of `summary` and `head_summary` are clipped to it (docs/statistics.md)."""
PATCH_SOURCES = ("icl", "gd", "gd_scaled", "random")
HEAD_PATCH_SOURCES = ("icl", "gd", "gd_scaled", "random")
"""Per-head patching (comparison "patch_head:<source>", scope "head", head >= 0): one head's output
z at the read position of one layer replaced in the ZSL run."""
HEAD_SUBSTITUTES = ("none", "gd", "gd_scaled", "random")
"""Per-head substitution (comparison "subst_head:<substitute>", scope "head"): every head of every
layer carries ICL's z at the read position (which is ICL there, exactly) except head h of layer l,
which carries ZSL's z plus the substitute for its ICL update (none: the update removed)."""
SUBSTITUTES = ("gd", "gd_scaled", "random", "icl_perm", "none")
TRANSPLANTS = ("linear", "linear_scaled", "softmax", "random")
ROPE_MODES = ("icl_position", "zsl_position")
RESULT_TOL = 1e-5
"""All-layer patching with ICL's values must reproduce ICL's read-position logits to this."""

HookList = list[tuple[str, Callable]]


# ---- hooks ------------------------------------------------------------------------------------
def write_at_read(
    values: dict[int, torch.Tensor], read_pos: torch.Tensor, point: str = "hook_attn_out"
) -> HookList:
    """Intervention hooks: at `blocks.{l}.{point}`, each row's read position gets `values[l][row]`.

    `values[l]` is [batch, ...] (e.g. [batch, d_model] for `hook_attn_out`, [batch, heads, d_head]
    for `attn.hook_z`); every other position is left as computed.
    """

    def make(value: torch.Tensor) -> Callable:
        def hook(act: torch.Tensor, hook) -> torch.Tensor:
            out = act.clone()
            out[torch.arange(out.shape[0], device=out.device), read_pos] = value.to(out.dtype)
            return out

        return hook

    return [(f"blocks.{layer}.{point}", make(v)) for layer, v in sorted(values.items())]


def write_head_at_read(layer: int, head: int, value: torch.Tensor, read_pos: torch.Tensor) -> HookList:
    """Intervention hook: at `blocks.{layer}.attn.hook_z` [batch, pos, heads, d_head], head `head`
    of each row's read position gets `value[row]` ([batch, d_head]); every other head and position
    is left as computed."""

    def hook(act: torch.Tensor, hook) -> torch.Tensor:
        out = act.clone()
        out[torch.arange(out.shape[0], device=out.device), read_pos, head] = value.to(out.dtype)
        return out

    return [(f"blocks.{layer}.attn.hook_z", hook)]


def rotate(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """LLaMA's rotary embedding of q [batch, heads, d_head] with cos, sin [batch, d_head]
    (HF convention: q cos + rotate_half(q) sin). `record_runs` checks it against the model's own
    `attn.hook_rot_q` before it is used."""
    half = q.shape[-1] // 2
    rotated_half = torch.cat([-q[..., half:], q[..., :half]], dim=-1)
    return q * cos[:, None, :] + rotated_half * sin[:, None, :]


@dataclass
class DemoKV:
    """What the transplant needs from the ICL run of one layer.

    k, v: [batch, key_pos, heads_kv, d_head], the keys (post-rotary on a LLaMA) and values of
    the ICL prompt; mask: [batch, key_pos] bool, True on the demonstration tokens;
    cos, sin: [batch, d_head], the rotary tables at ICL's read position (None: no RoPE).
    """

    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor
    cos: torch.Tensor | None = None
    sin: torch.Tensor | None = None


def transplant_hooks(
    demo: dict[int, DemoKV],
    read_pos: torch.Tensor,
    *,
    mode: str = "linear",
    target_norm: dict[int, torch.Tensor] | None = None,
    directions: dict[int, torch.Tensor] | None = None,
    q_point: str = "attn.hook_q",
    scale: float | None = None,
) -> HookList:
    """Intervention hooks that add the demonstrations' dual-form update to z at the read position.

    For every layer l in `demo`: the live run's query at the read position is read at
    `blocks.{l}.{q_point}` (pre-rotary `attn.hook_q` by default, rotated with `demo[l].cos/sin`
    to ICL's read position; `attn.hook_rot_q` with cos = None keeps the run's own position), and
    at `blocks.{l}.attn.hook_z` the read position's z [batch, heads, d_head] gets dz added:

    * "linear": dz = dW_ICL q, dW_ICL = sum over demonstration tokens of v k^T per kv head (GQA:
      query head h uses kv head h // (heads / heads_kv)); no softmax, no 1/sqrt(d_head): Dai's
      dual form, exact for linear attention;
    * "linear_scaled": the same direction per head, at the norm `target_norm[l]` [batch, heads];
    * "random": `directions[l]` [batch, heads, d_head] (unit) at `target_norm[l]`;
    * "softmax": the demonstrations' keys and values appended to the live context with softmax
      weights: with s_i = q.k_i * scale over the demonstration tokens, lse_ctx the log-sum-exp of
      the live run's own scores at the read position (`attn.hook_attn_scores`), alpha =
      sigmoid(lse_demo - lse_ctx) and z_demo = softmax(s) v, z becomes (1 - alpha) z + alpha z_demo.
    """
    if mode not in TRANSPLANTS:
        raise IclgdError(f"unknown transplant mode {mode!r}; choose one of {', '.join(TRANSPLANTS)}")
    if mode in ("linear_scaled", "random") and target_norm is None:
        raise IclgdError(f"transplant mode {mode!r} needs target_norm")
    if mode == "random" and directions is None:
        raise IclgdError("transplant mode 'random' needs directions")
    hooks: HookList = []
    for layer, kv in sorted(demo.items()):
        store: dict[str, torch.Tensor] = {}

        def keep_q(act, hook, store=store):
            store["q"] = act[
                torch.arange(act.shape[0], device=act.device), read_pos
            ]  # [batch, heads, d_head]

        def keep_scores(act, hook, store=store):  # [batch, heads, q_pos, k_pos], masked
            store["lse"] = torch.logsumexp(
                act[torch.arange(act.shape[0], device=act.device), :, read_pos].float(), dim=-1
            )

        def add(act, hook, kv=kv, layer=layer, store=store):
            rows = torch.arange(act.shape[0], device=act.device)
            z = act[rows, read_pos].float()  # [batch, heads, d_head]
            q = store.pop("q").float()
            if kv.cos is not None:
                q = rotate(q, kv.cos.float(), kv.sin.float())
            if mode == "random":
                dz = directions[layer].float() * target_norm[layer].float()[..., None]
            elif mode == "softmax":
                group = q.shape[1] // kv.k.shape[2]
                k = kv.k.float().repeat_interleave(group, dim=2)  # [batch, key_pos, heads, d_head]
                v = kv.v.float().repeat_interleave(group, dim=2)
                s = torch.einsum("bhd,bphd->bhp", q, k) * (
                    scale if scale is not None else q.shape[-1] ** -0.5
                )
                s = s.masked_fill(~kv.mask[:, None, :], float("-inf"))
                lse_demo = torch.logsumexp(s, dim=-1)  # [batch, heads]
                z_demo = torch.einsum("bhp,bphd->bhd", torch.softmax(s, dim=-1), v)
                alpha = torch.sigmoid(lse_demo - store.pop("lse"))[..., None]
                dz = alpha * (z_demo - z)
            else:
                dz = metrics.dual_form_update(
                    q, kv.k.float(), kv.v.float(), kv.mask
                )  # [batch, heads, d_head]
                if mode == "linear_scaled":
                    norm = torch.linalg.vector_norm(dz, dim=-1, keepdim=True)
                    dz = (
                        torch.where(norm > 0, dz / norm.clamp_min(1e-30), torch.zeros_like(dz))
                        * target_norm[layer].float()[..., None]
                    )
            out = act.clone()
            out[rows, read_pos] = (z + dz).to(out.dtype)
            return out

        hooks.append((f"blocks.{layer}.{q_point}", keep_q))
        if mode == "softmax":
            hooks.append((f"blocks.{layer}.attn.hook_attn_scores", keep_scores))
        hooks.append((f"blocks.{layer}.attn.hook_z", add))
    return hooks


# ---- recording the clean runs -----------------------------------------------------------------
def _at_read(name: str, point: str) -> Probe:
    """A probe that keeps `point` at each row's read position (not registered: nothing else records it)."""
    key = Probe.short_name(f"blocks.{{layer}}.{point}")

    def fn(acts, ctx):
        return {name: acts[key][ctx.batch_index, ctx.read_pos]}

    return Probe(name, (f"blocks.{{layer}}.{point}",), fn, f"{point} at the read position", compare=False)


def _icl_extras() -> Probe:
    points = ("attn.hook_rot_k", "attn.hook_v", "attn.hook_cos", "attn.hook_sin", "attn.hook_attn_scores")

    def fn(acts, ctx):
        b, r = ctx.batch_index, ctx.read_pos
        cos = acts["attn.hook_cos"].expand(len(b), -1, -1)[b, r]  # [batch, d_head]
        sin = acts["attn.hook_sin"].expand(len(b), -1, -1)[b, r]
        return {
            "k": acts["attn.hook_rot_k"],
            "v": acts["attn.hook_v"],
            "cos": cos,
            "sin": sin,
            "scores": acts["attn.hook_attn_scores"][b, :, r],
        }

    return Probe(
        "icl_extras",
        tuple(f"blocks.{{layer}}.{p}" for p in points),
        fn,
        "keys and values of the prompt; RoPE tables and scores at the read position",
        compare=False,
    )


READ_PROBES = (
    _at_read("attn_out", "hook_attn_out"),
    _at_read("z", "attn.hook_z"),
    _at_read("q", "attn.hook_q"),
    _at_read("rot_q", "attn.hook_rot_q"),
)


@dataclass
class Runs:
    """The clean runs of one model on one set of episodes, every episode's queries as rows."""

    rows: torch.Tensor  # [batch] episode of each row
    query: torch.Tensor  # [batch] query index within its episode
    labels: torch.Tensor  # [batch]
    label_ids: torch.Tensor  # [batch, n_ways] first token of each label word of the row's episode
    zsl_enc: object
    icl_enc: object
    logits: dict[str, torch.Tensor]  # condition -> [batch, vocab] at the read position
    attn_out: dict[str, torch.Tensor]  # condition -> [n_layers, batch, d_model]
    z: dict[str, torch.Tensor]  # condition -> [n_layers, batch, heads, d_head]
    q: dict[
        str, torch.Tensor
    ]  # condition -> [n_layers, batch, heads, d_head] pre-rotary query at the read position
    rot_q: dict[str, torch.Tensor]  # condition -> [n_layers, batch, heads, d_head] post-rotary
    demo: dict[int, DemoKV]  # per layer, from the ICL run
    n_layers: int


def record_runs(bridge, task: Task, episodes, gd_config: GDConfig, seed: int, progress: bool = False) -> Runs:
    """ZSL, ICL, GD (the ZSL prompt with the episode's GD deltas) and ICL under another order,
    every episode's queries as rows of one batch each; what the interventions need."""
    tokenizer, device = bridge.tokenizer, device_of(bridge)
    if any(len(ep.demos) < 1 for ep in episodes):
        raise IclgdError("the causal study needs k >= 1 demonstrations")
    rows = torch.tensor([e for e, ep in enumerate(episodes) for _ in ep.queries], device=device)
    query = torch.tensor([q for ep in episodes for q in range(len(ep.queries))], device=device)
    queries = [q for ep in episodes for q in ep.queries]
    words = [ep.label_words for ep in episodes for _ in ep.queries]
    max_len = getattr(bridge.cfg, "n_ctx", None)
    enc = lambda demo_sets: encode_prompts(tokenizer, task, demo_sets, queries, words, max_length=max_len).to(
        device
    )
    zsl_enc = enc([()] * len(queries))
    icl_enc = enc([ep.demos for ep in episodes for _ in ep.queries])
    perm_enc = enc(
        [permuted_demos(ep.demos, seed + 1000 + e) for e, ep in enumerate(episodes) for _ in ep.queries]
    )
    label_ids = torch.tensor([label_token_ids(tokenizer, w) for w in words], device=device)
    labels = torch.tensor([q.label for q in queries], device=device)

    deltas = train_deltas(bridge, tokenizer, task, episodes, gd_config, progress=progress)
    recorder = Recorder(bridge, list(READ_PROBES))
    icl_recorder = Recorder(bridge, [*READ_PROBES, _icl_extras()])
    recs = {
        "zsl": recorder.run(zsl_enc, "zsl"),
        "gd": recorder.run(zsl_enc, "gd", interventions=delta_hooks(deltas, rows)),
        "icl": icl_recorder.run(icl_enc, "icl"),
        "icl_perm": recorder.run(perm_enc, "icl_perm"),
    }
    icl = recs["icl"]
    n_layers = icl["attn_out"].shape[0]
    mask = added_context_mask(icl_enc.segments, icl_enc.attention_mask)  # X': demonstrations, separators
    _check_rope_and_scale(icl, mask)
    demo = {l: DemoKV(icl["k"][l], icl["v"][l], mask, icl["cos"][l], icl["sin"][l]) for l in range(n_layers)}
    return Runs(
        rows,
        query,
        labels,
        label_ids,
        zsl_enc,
        icl_enc,
        {c: r.logits for c, r in recs.items()},
        {c: r["attn_out"] for c, r in recs.items()},
        {c: r["z"] for c, r in recs.items()},
        {c: r["q"] for c, r in recs.items()},
        {c: r["rot_q"] for c, r in recs.items()},
        demo,
        n_layers,
    )


def _check_rope_and_scale(icl, mask: torch.Tensor) -> None:
    """Guards of the transplant's two assumptions, on the ICL run: `rotate` is the model's RoPE
    (it maps hook_q to hook_rot_q), and the scores are q.k / sqrt(d_head)."""
    q, rot_q, cos, sin = icl["q"], icl["rot_q"], icl["cos"], icl["sin"]  # [L, batch, heads, d], [L, batch, d]
    for layer in range(q.shape[0]):
        mine = rotate(q[layer].float(), cos[layer].float(), sin[layer].float())
        err = float(
            (mine - rot_q[layer].float()).abs().max() / rot_q[layer].float().abs().max().clamp_min(1e-30)
        )
        if err > 1e-4:
            raise IclgdError(
                f"the model's rotary embedding is not LLaMA's rotate_half form (layer {layer}: "
                f"relative error {err:.1e}); the transplant cannot rotate queries"
            )
        k = icl["k"][layer].float()
        group = rot_q.shape[2] // k.shape[2]
        mine_s = (
            torch.einsum("bhd,bphd->bhp", rot_q[layer].float(), k.repeat_interleave(group, dim=2))
            * rot_q.shape[-1] ** -0.5
        )
        theirs = icl["scores"][layer].float()
        err = float(
            ((mine_s - theirs).abs() * mask[:, None]).max()
            / (theirs.abs() * mask[:, None]).max().clamp_min(1e-30)
        )
        if err > 1e-4:
            raise IclgdError(
                f"attention scores are not q.k / sqrt(d_head) (layer {layer}: relative error {err:.1e}); "
                "the softmax transplant needs the model's scale"
            )


# ---- the interventions ------------------------------------------------------------------------
def _unit_gaussian(shape, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    d = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (d / torch.linalg.vector_norm(d, dim=-1, keepdim=True)).float().to(device)


def _rescaled(update: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """`update` [..., d] at the norm `norm` [...]; zero updates stay zero."""
    n = torch.linalg.vector_norm(update, dim=-1, keepdim=True)
    return torch.where(n > 0, update / n.clamp_min(1e-30), torch.zeros_like(update)) * norm[..., None]


SCOPES = ("single", "bottom", "top")


def scopes(n_layers: int, kinds: Sequence[str] = SCOPES) -> list[tuple[str, int, list[int]]]:
    """(scope, layer, layers touched): "single" layer l; "bottom", cumulative from the bottom
    (layers 0..l); "top", cumulative from the top (layers l..L-1). Every layer at once is
    ("bottom", L-1) (= ("top", 0))."""
    touched = {
        "single": lambda l: [l],
        "bottom": lambda l: list(range(l + 1)),
        "top": lambda l: list(range(l, n_layers)),
    }
    return [(kind, l, touched[kind](l)) for kind in kinds for l in range(n_layers)]


def intervention_logits(
    bridge, runs: Runs, *, seed: int = 0, rope: str = "icl_position"
) -> dict[tuple[str, str, int], torch.Tensor]:
    """Read-position logits of every intervention: {(comparison, scope, layer): [batch, vocab]}
    (comparison "patch:<source>", "subst:<substitute>" or "transplant:<mode>"; `scopes`)."""
    if rope not in ROPE_MODES:
        raise IclgdError(f"unknown rope mode {rope!r}; choose one of {', '.join(ROPE_MODES)}")
    plain = Recorder(bridge, [])
    L = runs.n_layers
    h = runs.attn_out  # [L, batch, d_model]
    icl_update = h["icl"] - h["zsl"]
    icl_norm = torch.linalg.vector_norm(icl_update, dim=-1)  # [L, batch]
    gd_update = h["gd"] - h["zsl"]
    random_update = _unit_gaussian(icl_update.shape, seed + 7, icl_update.device) * icl_norm[..., None]
    patch_values = {
        "icl": h["icl"],
        "gd": h["gd"],
        "gd_scaled": h["zsl"] + _rescaled(gd_update, icl_norm),
        "random": h["zsl"] + random_update,
    }
    substitutes = {
        "gd": h["zsl"] + gd_update,
        "gd_scaled": h["zsl"] + _rescaled(gd_update, icl_norm),
        "random": h["zsl"] + random_update,
        "icl_perm": h["icl_perm"],
        "none": h["zsl"],
    }
    out: dict[tuple[str, str, int], torch.Tensor] = {}
    run = lambda enc, hooks: plain.run(enc, "intervention", interventions=hooks).logits
    for source, values in patch_values.items():
        for scope, layer, layers in scopes(L):
            out[(f"patch:{source}", scope, layer)] = run(
                runs.zsl_enc, write_at_read({l: values[l] for l in layers}, runs.zsl_enc.read_pos)
            )
    for name, values in substitutes.items():
        for scope, layer, layers in scopes(L, ("single", "bottom")):
            out[(f"subst:{name}", scope, layer)] = run(
                runs.icl_enc, write_at_read({l: values[l] for l in layers}, runs.icl_enc.read_pos)
            )
    z_norm = torch.linalg.vector_norm(
        runs.z["icl"].float() - runs.z["zsl"].float(), dim=-1
    )  # [L, batch, heads]
    directions = _unit_gaussian(runs.z["icl"].shape, seed + 11, z_norm.device)
    demo = (
        runs.demo
        if rope == "icl_position"
        else {l: DemoKV(kv.k, kv.v, kv.mask) for l, kv in runs.demo.items()}
    )
    q_point = "attn.hook_q" if rope == "icl_position" else "attn.hook_rot_q"
    for mode in TRANSPLANTS:
        for scope, layer, layers in scopes(L, ("single", "bottom")):
            hooks = transplant_hooks(
                {l: demo[l] for l in layers},
                runs.zsl_enc.read_pos,
                mode=mode,
                q_point=q_point,
                target_norm={l: z_norm[l] for l in layers},
                directions={l: directions[l] for l in layers},
            )
            out[(f"transplant:{mode}", scope, layer)] = run(runs.zsl_enc, hooks)
    return out


def head_patch_logits(bridge, runs: Runs, *, seed: int = 0) -> dict[tuple[str, int, int], torch.Tensor]:
    """Read-position logits of per-head interventions in the ZSL run, {(comparison, layer, head):
    [batch, vocab]}:

    * "patch_head:<source>" (denoising): one head's z at the read position of one layer is replaced
      by its value under ICL, under GD, GD's head update rescaled to ICL's head-update norm, or a
      random head update of ICL's norm (HEAD_PATCH_SOURCES). Patching every head of a layer with
      ICL's z is the layer's `patch:icl` (tests).
    * "subst_head:<substitute>" (noising): ICL's z at the read position of every head of every
      layer (= ICL's logits there) except head (layer, head), whose ICL update is removed or
      replaced (HEAD_SUBSTITUTES) — which heads ICL's effect needs, and whether GD's can stand in.
    """
    plain = Recorder(bridge, [])
    z_zsl, z_icl, z_gd = (runs.z[c].float() for c in ("zsl", "icl", "gd"))  # [L, batch, heads, d_head]
    icl_norm = torch.linalg.vector_norm(z_icl - z_zsl, dim=-1)  # [L, batch, heads]
    values = {
        "icl": z_icl,
        "gd": z_gd,
        "gd_scaled": z_zsl + _rescaled(z_gd - z_zsl, icl_norm),
        "random": z_zsl + _unit_gaussian(z_icl.shape, seed + 13, z_icl.device) * icl_norm[..., None],
    }
    n_layers, _, n_heads, _ = z_icl.shape
    values["none"] = z_zsl
    out = {}
    read = runs.zsl_enc.read_pos
    for name in HEAD_SUBSTITUTES:  # noising: ICL's z everywhere but one head
        for layer in range(n_layers):
            for head in range(n_heads):
                z = {l: z_icl[l] for l in range(n_layers)}
                z[layer] = z_icl[layer].clone()
                z[layer][:, head] = values[name][layer, :, head]
                out[(f"subst_head:{name}", layer, head)] = plain.run(
                    runs.zsl_enc, "intervention", interventions=write_at_read(z, read, "attn.hook_z")
                ).logits
    for source in HEAD_PATCH_SOURCES:  # denoising: ZSL everywhere but one head
        for layer in range(n_layers):
            for head in range(n_heads):
                hooks = write_head_at_read(layer, head, values[source][layer, :, head], runs.zsl_enc.read_pos)
                out[(f"patch_head:{source}", layer, head)] = plain.run(
                    runs.zsl_enc, "intervention", interventions=hooks
                ).logits
    return out


# ---- metrics ----------------------------------------------------------------------------------
def logit_diff(logits: torch.Tensor, label_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per row: the logit of the correct label word's first token minus the mean logit of the
    other label words of the row's episode. [batch, vocab] -> [batch]."""
    lab = logits.gather(1, label_ids).float()  # [batch, n_ways]
    correct = lab.gather(1, labels[:, None])[:, 0]
    others = (lab.sum(1) - correct) / (lab.shape[1] - 1)
    return correct - others


def query_metrics(logits: torch.Tensor, runs: Runs) -> dict[str, torch.Tensor]:
    """The per-query metrics of one run, each [batch]."""
    lab = logits.gather(1, runs.label_ids)
    icl_pick = runs.logits["icl"].gather(1, runs.label_ids).argmax(1)
    log_p = torch.log_softmax(logits.float(), -1)
    return {
        "logit_diff": logit_diff(logits, runs.label_ids, runs.labels),
        "accuracy": (lab.argmax(1) == runs.labels).float(),
        "agreement": (lab.argmax(1) == icl_pick).float(),
        "kl_to_icl": metrics.kl(torch.log_softmax(runs.logits["icl"].float(), -1), log_p),
        "kl_to_gd": metrics.kl(torch.log_softmax(runs.logits["gd"].float(), -1), log_p),
    }


def episode_ratios(
    per_query: dict[str, torch.Tensor],
    reference: dict[str, dict[str, torch.Tensor]],
    rows: torch.Tensor,
    n_episodes: int,
) -> dict[str, np.ndarray]:
    """Per episode (ratios of the episode's sums over its queries, NaN where the denominator is 0):

    recovered    = sum_q (LD_run - LD_ZSL) / sum_q (LD_ICL - LD_ZSL)
    kl_reduction = 1 - sum_q KL(ICL || run) / sum_q KL(ICL || ZSL)
    """

    def sums(x):
        return (
            torch.zeros(n_episodes, dtype=torch.float64, device=x.device)
            .index_add_(0, rows, x.double())
            .cpu()
            .numpy()
        )

    zsl, icl = reference["zsl"], reference["icl"]
    with np.errstate(invalid="ignore", divide="ignore"):
        den = sums(icl["logit_diff"] - zsl["logit_diff"])
        recovered = np.where(den != 0, sums(per_query["logit_diff"] - zsl["logit_diff"]) / den, np.nan)
        kl_den = sums(zsl["kl_to_icl"])
        kl_reduction = np.where(kl_den > 0, 1 - sums(per_query["kl_to_icl"]) / kl_den, np.nan)
    return {"recovered": recovered, "kl_reduction": kl_reduction}


def causal_table(
    bridge,
    task: Task,
    episodes,
    gd_config: GDConfig,
    *,
    seed: int = 0,
    rope: str = "icl_position",
    heads: bool = True,
    progress: bool = False,
) -> tuple[pd.DataFrame, dict]:
    """The tidy table of one model (COLUMNS), and run facts (the exactness check's error).
    `heads`: also patch every (layer, head) alone (`head_patch_logits`, scope "head")."""
    runs = record_runs(bridge, task, episodes, gd_config, seed, progress)
    logits = {(c, "none", -1, -1): runs.logits[c] for c in ("zsl", "icl", "gd", "icl_perm")}
    logits.update(
        {key + (-1,): lg for key, lg in intervention_logits(bridge, runs, seed=seed, rope=rope).items()}
    )
    if heads:
        logits.update(
            {(c, "head", l, h): lg for (c, l, h), lg in head_patch_logits(bridge, runs, seed=seed).items()}
        )
    reference = {c: query_metrics(runs.logits[c], runs) for c in ("zsl", "icl")}
    rows_np, query_np = runs.rows.cpu().numpy(), runs.query.cpu().numpy()
    n_ep = len(episodes)
    frames = []
    for (comparison, scope, layer, head), lg in logits.items():
        pq = query_metrics(lg, runs)
        for metric, values in pq.items():
            frames.append(
                pd.DataFrame(
                    {
                        "metric": metric,
                        "comparison": comparison,
                        "scope": scope,
                        "layer": layer,
                        "head": head,
                        "episode": rows_np,
                        "query": query_np,
                        "value": values.double().cpu().numpy(),
                    }
                )
            )
        for metric, values in episode_ratios(pq, reference, runs.rows, n_ep).items():
            frames.append(
                pd.DataFrame(
                    {
                        "metric": metric,
                        "comparison": comparison,
                        "scope": scope,
                        "layer": layer,
                        "head": head,
                        "episode": np.arange(n_ep),
                        "query": -1,
                        "value": values,
                    }
                )
            )
    frames.append(dual_form_rows(runs, rope))
    table = pd.concat(frames, ignore_index=True)[COLUMNS]
    all_layers = logits[("patch:icl", "bottom", runs.n_layers - 1, -1)]
    facts = {
        "all_layer_patch_max_abs_err": float((all_layers - runs.logits["icl"]).abs().max()),
        "n_layers": runs.n_layers,
        "n_demo_tokens_mean": float(runs.demo[0].mask.sum(1).float().mean()),
    }
    return table, facts


def dual_form_rows(runs: Runs, rope: str = "icl_position") -> pd.DataFrame:
    """Per layer, head and query: the linear transplant's dz = dW_ICL q (the clean ZSL query,
    rotated as `rope` says) against ICL's real update z_ICL - z_ZSL: cosine and norm ratio
    |dz| / |z_ICL - z_ZSL| (rows DUAL_FORM_METRICS)."""
    frames = []
    n_heads = runs.z["icl"].shape[2]
    for layer, kv in sorted(runs.demo.items()):
        if rope == "icl_position":
            q = rotate(runs.q["zsl"][layer].float(), kv.cos.float(), kv.sin.float())
        else:
            q = runs.rot_q["zsl"][layer].float()
        dz = metrics.dual_form_update(q, kv.k.float(), kv.v.float(), kv.mask)  # [batch, heads, d_head]
        true = runs.z["icl"][layer].float() - runs.z["zsl"][layer].float()
        values = {
            "dual_form_cos": torch.nn.functional.cosine_similarity(dz, true, dim=-1),
            "dual_form_ratio": torch.linalg.vector_norm(dz, dim=-1) / torch.linalg.vector_norm(true, dim=-1),
        }
        for metric, v in values.items():  # [batch, heads]
            frames.append(
                pd.DataFrame(
                    {
                        "metric": metric,
                        "comparison": "transplant:linear",
                        "scope": "single",
                        "layer": layer,
                        "head": np.tile(np.arange(n_heads), len(runs.rows)),
                        "episode": runs.rows.cpu().numpy().repeat(n_heads),
                        "query": runs.query.cpu().numpy().repeat(n_heads),
                        "value": v.double().cpu().numpy().ravel(),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


# ---- the study --------------------------------------------------------------------------------
@checked_args
def run(
    model="tiny-llama-icl",
    task: Task | None = None,
    *,
    k: int = 8,
    n_episodes: int = 8,
    n_queries: int = 8,
    seed: int = 0,
    gd: GDConfig | str = "dai",
    untrained: bool = True,
    rope: str = "icl_position",
    heads: bool = True,
    progress: bool = True,
) -> StudyResult:
    """Activation patching, update substitution and the dual-form transplant on one model.

    `model` is a name or a loaded bridge (never modified); `task` a Task or None (the embedded
    models' mapping task); `gd` a GDConfig or a preset name (a preset takes the task's `gd_lr`);
    `untrained` repeats everything on `untrained_copy(model, seed)` (comparisons prefixed
    `untrained:`); `rope` is where the transplant's query is rotated to ("icl_position": ICL's
    read position, so every query-demonstration pair keeps its ICL offset; "zsl_position": the
    ZSL run's own); `heads` adds per-head patching (one head of one layer at a time; scope
    "head"). Returns the tidy table (COLUMNS), figures and findings.
    """
    started = time.time()
    bridge = as_bridge(model)
    task = resolve_task(task, seed)
    if k < 1:
        raise IclgdError(f"the causal study needs k >= 1 demonstrations, got k={k}")
    gd_config = GDConfig.resolve(gd, task)
    check_least_work(bridge, task, k, n_episodes, n_queries, gd_config, untrained)  # before drawing
    episodes = task.episodes(k, n_episodes, n_queries, seed)
    table, facts = causal_table(
        bridge, task, episodes, gd_config, seed=seed, rope=rope, heads=heads, progress=progress
    )
    parts = [table]
    if untrained:
        copy = untrained_copy(bridge, seed=seed)
        base, base_facts = causal_table(
            copy, task, episodes, gd_config, seed=seed, rope=rope, heads=heads, progress=progress
        )
        parts.append(base.assign(comparison="untrained:" + base["comparison"]))
        facts["untrained_all_layer_patch_max_abs_err"] = base_facts["all_layer_patch_max_abs_err"]
        del copy
    table = pd.concat(parts, ignore_index=True)
    config = dict(
        model=model_name(bridge),
        task=task.name,
        k=k,
        n_episodes=n_episodes,
        n_queries=len(episodes[0].queries),
        seed=seed,
        gd={**gd_config.__dict__},
        untrained=untrained,
        rope=rope,
        heads=heads,
        **facts,
        versions=versions(),
        run_time_s=round(time.time() - started, 2),
    )
    return StudyResult("causal", QUESTION, table, figures(table), findings(table, facts), config)


# ---- summaries, figures, findings -------------------------------------------------------------
def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Episode-level mean and 95% t-interval per (metric, comparison, scope, layer): the
    queries of one episode are averaged first (`stats.episode_summary`)."""
    return stats.episode_summary(table, ["metric", "comparison", "scope", "layer"], ranges=RANGES)


def head_summary(table: pd.DataFrame) -> pd.DataFrame:
    """The same per (metric, comparison, layer, head) of per-head patching (scope "head")."""
    return stats.episode_summary(
        table[table.scope == "head"], ["metric", "comparison", "layer", "head"], ranges=RANGES
    )


def _line(sub: pd.DataFrame, title: str, **kw):
    sub = sub.assign(err_plus=sub.ci_high - sub["mean"], err_minus=sub["mean"] - sub.ci_low)
    fig = px.line(
        sub,
        x="layer",
        y="mean",
        color="comparison",
        markers=True,
        error_y="err_plus",
        error_y_minus="err_minus",
        facet_col="scope",
        facet_row="metric",
        category_orders={"scope": list(SCOPES)},
        title=title,
        labels={
            "layer": "layer l (single: l; bottom: 0..l; top: l..L-1)",
            "mean": "mean [95% CI over episodes]",
        },
        **kw,
    )
    fig.update_yaxes(matches=None, showticklabels=True)
    return fig


def figures(table: pd.DataFrame) -> list:
    """Patching (recovered fraction, KL reduction), substitution (KL to ICL, agreement) and
    transplant (accuracy, KL to ICL, KL to GD) against the layer, 95% episode intervals."""
    s = summary(table[~table.comparison.str.startswith("untrained:")])
    figs = []
    patch = s[s.comparison.str.startswith("patch:") & s.metric.isin(EPISODE_METRICS)]
    if not patch.empty:
        figs.append(
            _line(patch, "Activation patching into ZSL at the read position: share of ICL's effect recovered")
        )
    subst = s[s.comparison.str.startswith("subst:") & s.metric.isin(["kl_to_icl", "agreement", "accuracy"])]
    if not subst.empty:
        figs.append(
            _line(
                subst,
                "Update substitution in the ICL run: ICL's attention update at the read position replaced",
            )
        )
    trans = s[
        s.comparison.str.startswith("transplant:")
        & s.metric.isin(["accuracy", "kl_to_icl", "kl_to_gd", "recovered"])
    ]
    if not trans.empty:
        figs.append(
            _line(
                trans, "Dual-form transplant into ZSL: dW_ICL q added to each head's z at the read position"
            )
        )
    heads = head_summary(table[~table.comparison.str.startswith("untrained:")])
    heads = heads[heads.metric == "recovered"]
    if not heads.empty:
        figs.append(_head_heatmaps(heads))
    return figs


def _head_heatmaps(heads: pd.DataFrame):
    """Layer x head heatmaps of the share of ICL's effect recovered by patching one head, per source,
    on one colour scale (values written in the cells)."""
    from plotly.subplots import make_subplots

    wanted = [f"patch_head:{s}" for s in HEAD_PATCH_SOURCES] + [f"subst_head:{s}" for s in HEAD_SUBSTITUTES]
    sources = [c for c in wanted if c in set(heads.comparison)]
    fig = make_subplots(rows=2, cols=4, subplot_titles=sources)
    bound = float(np.nanmax(np.abs(heads["mean"].to_numpy()))) if heads["mean"].notna().any() else 1.0
    for i, comparison in enumerate(sources):
        grid = heads[heads.comparison == comparison].pivot(index="layer", columns="head", values="mean")
        fig.add_trace(
            go.Heatmap(
                z=grid.to_numpy(),
                x=[f"head {h}" for h in grid.columns],
                y=[f"layer {l}" for l in grid.index],
                zmin=-bound,
                zmax=bound,
                colorscale="RdBu",
                showscale=i == 0,
                colorbar={"title": "recovered"},
                text=np.round(grid.to_numpy(), 2),
                texttemplate="%{text}",
                hovertemplate="%{y}, %{x}: %{z:.3f}<extra></extra>",
            ),
            row=1 + i // 4,
            col=1 + i % 4,
        )
    fig.update_layout(
        title="One head at the read position, patched into ZSL (patch_head) or its ICL update removed or "
        "replaced (subst_head): share of ICL's effect recovered (episode means)",
        height=620,
    )
    return fig


def _get(s: pd.DataFrame, metric: str, comparison: str, scope: str, layer: int) -> pd.Series | None:
    row = s[(s.metric == metric) & (s.comparison == comparison) & (s.scope == scope) & (s.layer == layer)]
    return None if row.empty else row.iloc[0]


def _fmt(row) -> str:
    if row is None or pd.isna(row["mean"]):
        return "n/a"
    ci = "" if pd.isna(row.ci_low) else f" [{row.ci_low:.2f}, {row.ci_high:.2f}]"
    return f"{row['mean']:.2f}{ci}"


def _paired(table: pd.DataFrame, metric: str, a: str, b: str, scope: str, layer: int):
    def per_episode(comparison):
        sub = table[
            (table.metric == metric)
            & (table.comparison == comparison)
            & (table.scope == scope)
            & (table.layer == layer)
        ]
        return stats.episode_means(sub.value.to_numpy(), sub.episode.to_numpy())

    return stats.paired_test(per_episode(a), per_episode(b))


def verdict(table: pd.DataFrame, s: pd.DataFrame, L: int, alpha: float = 0.05) -> str:
    """The study's answer in one line: does GD's update, put into the forward pass at every layer,
    do what ICL's does? "stands in" if GD's direction at ICL's size recovers at least half of ICL's
    effect and more than a random update of that size (paired over episodes, p < alpha); "partly"
    if only the latter; otherwise "does not"."""
    gd = _get(s, "recovered", "patch:gd_scaled", "bottom", L - 1)
    rand = _get(s, "recovered", "patch:random", "bottom", L - 1)
    if gd is None or rand is None or pd.isna(gd["mean"]):
        return "Verdict: undefined (no all-layer patching rows)."
    test = _paired(table, "recovered", "patch:gd_scaled", "patch:random", "bottom", L - 1)
    better = test.p_value < alpha and test.diff_mean > 0
    word = (
        "stands in for"
        if better and gd["mean"] >= 0.5
        else "partly stands in for"
        if better
        else "does not stand in for"
    )
    transplant = _get(s, "recovered", "transplant:linear_scaled", "bottom", L - 1)
    return (
        f"Verdict: GD's update {word} ICL's here. Patched into the zero-shot run at every layer at "
        f"ICL's size, GD's direction recovers {_fmt(gd)} of ICL's effect (ICL's own update: 1.00; "
        f"a random update of the same size {_fmt(rand)}; paired over episodes p = {test.p_value:.3f}); "
        f"Dai's dual form, applied as a weight update at ICL's size, recovers {_fmt(transplant)}."
    )


def findings(table: pd.DataFrame, facts: dict | None = None) -> str:
    """One line per experiment, computed from the table (episode-level means, [95% t-interval])."""
    s = summary(table)
    L = int(table.loc[table.layer >= 0, "layer"].max()) + 1
    lines = [verdict(table, s, L)]
    if facts and "all_layer_patch_max_abs_err" in facts:
        lines.append(
            "Patching the read position's attention output with ICL's at every layer reproduces ICL's "
            f"logits (max |diff| {facts['all_layer_patch_max_abs_err']:.1e})."
        )
    acc = {c: _get(s, "accuracy", c, "none", -1) for c in ("zsl", "icl", "gd", "icl_perm")}
    lines.append(
        "Accuracy: "
        + ", ".join(
            f"{c.upper() if c != 'icl_perm' else 'ICL (other order)'} {_fmt(r)}" for c, r in acc.items()
        )
        + "."
    )
    # patching
    best = {}
    for source in PATCH_SOURCES:
        vals = [(_get(s, "recovered", f"patch:{source}", "single", l), l) for l in range(L)]
        vals = [(r, l) for r, l in vals if r is not None and not pd.isna(r["mean"])]
        if vals:
            best[source] = max(vals, key=lambda t: t[0]["mean"])
    if best:
        parts = [f"{src} {_fmt(r)} (layer {l})" for src, (r, l) in best.items()]
        line = "Patching one layer into ZSL, best share of ICL's logit-diff effect recovered: " + "; ".join(
            parts
        )
        if "gd_scaled" in best:
            l = best["gd_scaled"][1]
            test = _paired(table, "recovered", "patch:gd_scaled", "patch:random", "single", l)
            line += (
                f"; GD rescaled vs random at layer {l}: diff {test.diff_mean:+.2f}, p = {test.p_value:.3f}"
            )
        lines.append(line + ".")
        bottom = ", ".join(f"0..{l} {_fmt(_get(s, 'recovered', 'patch:icl', 'bottom', l))}" for l in range(L))
        top = ", ".join(f"{l}..{L - 1} {_fmt(_get(s, 'recovered', 'patch:icl', 'top', l))}" for l in range(L))
        lines.append(
            f"ICL's own values patched into ZSL, cumulatively from the bottom: {bottom}; from the top: {top}."
        )
        all_gd = _get(s, "recovered", "patch:gd", "bottom", L - 1)
        all_gds = _get(s, "recovered", "patch:gd_scaled", "bottom", L - 1)
        all_rand = _get(s, "recovered", "patch:random", "bottom", L - 1)
        klr = _get(s, "kl_reduction", "patch:gd_scaled", "bottom", L - 1)
        lines.append(
            f"All layers patched: GD recovers {_fmt(all_gd)} as is, {_fmt(all_gds)} rescaled (KL reduction "
            f"{_fmt(klr)}); a random update of ICL's norm {_fmt(all_rand)}."
        )
    # per-head patching
    hs = head_summary(table[~table.comparison.str.startswith("untrained:")])
    hs = hs[(hs.metric == "recovered") & hs["mean"].notna()]
    if not hs.empty:
        parts = []
        for source in HEAD_PATCH_SOURCES:
            sub = hs[hs.comparison == f"patch_head:{source}"]
            if not sub.empty:
                top = sub.loc[sub["mean"].idxmax()]
                parts.append(f"{source} layer {int(top.layer)} head {int(top['head'])} {_fmt(top)}")
        lines.append(
            "Patching one head into ZSL, the head that recovers most of ICL's effect: "
            + "; ".join(parts)
            + "."
        )
        removed = hs[hs.comparison == "subst_head:none"]
        if not removed.empty:
            worst = removed.loc[removed["mean"].idxmin()]
            l, h = int(worst.layer), int(worst["head"])
            at = hs[(hs.layer == l) & (hs["head"] == h)]
            others = [
                f"{name} {_fmt(at[at.comparison == f'subst_head:{name}'].iloc[0])}"
                for name in HEAD_SUBSTITUTES[1:]
                if (at.comparison == f"subst_head:{name}").any()
            ]
            lines.append(
                f"ICL with one head's update removed: layer {l} head {h} matters most (recovered "
                f"{_fmt(worst)}); its update replaced by " + ", ".join(others) + "."
            )
    # substitution
    none = [(_get(s, "kl_to_icl", "subst:none", "single", l), l) for l in range(L)]
    none = [(r, l) for r, l in none if r is not None]
    if none:
        _, l = max(none, key=lambda t: t[0]["mean"])
        parts = [f"{name} {_fmt(_get(s, 'kl_to_icl', f'subst:{name}', 'single', l))}" for name in SUBSTITUTES]
        agree = [
            f"{name} {_fmt(_get(s, 'agreement', f'subst:{name}', 'bottom', L - 1))}" for name in SUBSTITUTES
        ]
        lines.append(
            f"Substituting ICL's update at layer {l} (where removing it matters most), "
            "KL(ICL || substituted): "
            + ", ".join(parts)
            + ". All layers at once, agreement with ICL's label: "
            + ", ".join(agree)
            + "."
        )
    # transplant
    t_all = {
        m: tuple(
            _get(s, metric, f"transplant:{m}", "bottom", L - 1)
            for metric in ("accuracy", "kl_to_icl", "kl_to_gd")
        )
        for m in TRANSPLANTS
    }
    ratio = [
        (
            _get(s, "dual_form_ratio", "transplant:linear", "single", l),
            _get(s, "dual_form_cos", "transplant:linear", "single", l),
        )
        for l in range(L)
    ]
    if all(r is not None for r, _ in ratio):
        lines.append(
            "Linear dual form dW_ICL q against ICL's real update of z, per layer (norm ratio; cosine; "
            "mean over heads): "
            + ", ".join(f"layer {l} {_fmt(r)}; {_fmt(c)}" for l, (r, c) in enumerate(ratio))
            + "."
        )
    if any(v[0] is not None for v in t_all.values()):
        lines.append(
            "Dual-form transplant into ZSL at all layers (accuracy; KL to ICL; KL to GD): "
            + "; ".join(f"{m} {_fmt(a)}; {_fmt(ki)}; {_fmt(kg)}" for m, (a, ki, kg) in t_all.items())
            + f". Reference KL(ICL || ZSL) {_fmt(_get(s, 'kl_to_icl', 'zsl', 'none', -1))}, "
            f"KL(GD || ZSL) {_fmt(_get(s, 'kl_to_gd', 'zsl', 'none', -1))}."
        )
    # untrained
    u_acc = {c: _get(s, "accuracy", f"untrained:{c}", "none", -1) for c in ("zsl", "icl", "gd")}
    if u_acc["icl"] is not None:
        u_kl = _get(s, "kl_to_icl", "untrained:zsl", "none", -1)
        u_rec = _get(s, "kl_reduction", "untrained:patch:gd_scaled", "bottom", L - 1)
        lines.append(
            f"Untrained copy: accuracy ZSL {_fmt(u_acc['zsl'])}, ICL {_fmt(u_acc['icl'])}, "
            f"GD {_fmt(u_acc['gd'])}; KL(ICL || ZSL) {_fmt(u_kl)}; all-layer GD-rescaled patch KL reduction "
            f"{_fmt(u_rec)}."
        )
    return "\n".join(lines)
