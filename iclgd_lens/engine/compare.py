"""One ICL-vs-GD comparison end to end: episodes -> GD deltas -> recordings -> tidy Results.

    from iclgd_lens import load_model, compare
    model = load_model()                      # the embedded tiny-llama-icl
    results = compare(model, k=8)             # default task, Dai's GD preset, every baseline
    results.summary().query("metric == 'simaou'")

For each episode (a demonstration set) and each of its queries, three conditions are
recorded with the same probes: ZSL (query alone), ICL (demonstrations + query, the
demonstrations run once per episode and shared through the KV cache), GD (query alone with
the episode's GD weight deltas applied by hooks). Baselines are recorded beside them:
ICL under another demonstration order, GD replaced by a random update of equal norm, Dai's
uniform random vector, and the whole pipeline on the untrained model (the model's attention and
MLP weights re-drawn in place for that pipeline, the trained ones parked in host memory and put
back bitwise, also on errors: `baselines.untrained_in_place`). The user's model is left as it
was (tested bitwise); during the call it must not be used elsewhere.
"""

from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import asdict
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from iclgd_lens.engine.artifacts import example_artifacts
from iclgd_lens.engine.gd import Deltas, GDConfig, train_deltas
from iclgd_lens.engine.memory import RANDOM_UPDATE_BYTES, plan_compare
from iclgd_lens.engine.record import Recorder, Recording
from iclgd_lens.engine.results import Results, versions
from iclgd_lens.engine.table import episode_table
from iclgd_lens.errors import IclgdError
from iclgd_lens.limits import MAX_SEED
from iclgd_lens.tasks import Episode, Task, encode_prompts, label_token_ids, permuted_demos, resolve_task

ALL_BASELINES = ("random", "random_update", "icl_perm", "untrained")
"""Baselines recorded beside every similarity (Dai; Deutch et al.; Shen et al.)."""


def compare(
    model,
    task: Task | str | None = None,
    *,
    gd: GDConfig | str = "dai",
    k: int = 8,
    n_episodes: int = 8,
    n_queries: int = 6,
    seed: int = 0,
    baselines: Sequence[str] | bool = True,
    probes: Sequence[str] | None = None,
    share_prefix: bool = True,
    batch_size: int = 128,
    progress: bool = True,
    artifacts: bool = True,
    check_resources: bool = True,
    max_memory: int | None = None,
) -> Results:
    """Compare ICL with GD on `task`, layer by layer, and return the tidy Results.

    `task` is a Task, a task name or data file (`load_task`), or None (the embedded models'
    default task). Everything that can be checked is checked before any model work (the
    prompts fit the context window, the probes' hook points exist); the global random state is
    left alone (every draw has its own seeded generator). `check_resources`: refuse, before any
    work, a GD whose weight deltas alone would not fit the device's memory, or a request whose
    estimated work is far beyond the device (`estimate_flops`; False: try anyway).

    `gd` is a GDConfig or a preset name ("dai", "shen", "shen-single-layer", "deutch"); a
    preset takes the task's own learning rate (`Task.gd_lr`) where it has one, as Dai et al.
    tuned one per task.
    `baselines` is True (all of ALL_BASELINES), False, or a subset of names.
    `probes` names the probes to record (default: iclgd_lens.hooks.DEFAULT_PROBES plus every
    probe registered by the user). `batch_size` bounds the rows of one forward pass.
    `max_memory` (bytes, weights included): take the largest batch size (at most `batch_size`)
    whose peak the memory model predicts to fit (`iclgd_lens.engine.memory.plan_compare`), and
    refuse a comparison that fits with none, before any work. The batch size changes only the
    shape of the passes: rows agree across batch sizes to float rounding, not always bitwise
    (docs/performance.md, "Batch size and rounding").
    Episodes are the statistical unit (their queries share demonstrations and GD run): the
    default 8 episodes let the exact paired test reach p = 0.0078 (docs/statistics.md).
    """
    started = time.time()
    _check_arguments(model, k, n_episodes, n_queries, seed, batch_size, max_memory)
    _warn_attached_hooks(model)
    task = resolve_task(task, seed)
    gd_config = GDConfig.resolve(gd, task)
    chosen = _chosen_baselines(baselines)
    probe_names = _probe_names(probes)
    Recorder(model, probe_names)  # refuses probes whose hook points the model lacks, before any work
    _warn_recorded_only(probe_names)
    check_k_fits(model.tokenizer, _context_window(model), task, k)
    if check_resources:  # a lower bound, before drawing: millions of episodes are refused, not drawn
        check_least_work(
            model, task, k, n_episodes, n_queries, gd_config, "untrained" in chosen, override=OVERRIDE_CHECK
        )
    episodes = task.episodes(k, n_episodes, n_queries, seed)
    check_prompts_fit(model, task, episodes)
    if check_resources:
        _check_delta_memory(model, gd_config, n_episodes, ("untrained" in chosen))
        _check_work(model, task, episodes, gd_config, ("untrained" in chosen))
    if max_memory is not None:  # the largest batch size up to `batch_size` that the memory model fits
        plan = plan_compare(
            model,
            task,
            gd=gd_config,
            k=k,
            n_episodes=n_episodes,
            n_queries=n_queries,
            seed=seed,
            probes=probe_names,
            baselines=chosen,
            batch_size=batch_size,
            max_memory=max_memory,
        )
        if not plan.fits:
            raise IclgdError(
                f"the memory model predicts {format_bytes(plan.total_bytes)} even with "
                f"batch_size={plan.batch_size}, more than max_memory={format_bytes(max_memory)} "
                f"(peak phase {plan.phase!r}); use fewer episodes or queries per call, or fewer probes "
                "or baselines"
            )
        batch_size = plan.batch_size
    if k == 0:
        warnings.warn(
            "k=0: with no demonstrations ICL is the zero-shot run and GD trains on nothing, so every "
            "update is zero and its cosines read 0; only the zero-shot accuracy means anything",
            stacklevel=2,
        )
    n_queries_drawn = len(episodes[0].queries)
    if n_queries_drawn < n_queries:
        warnings.warn(
            f"task {task.name!r} gives {n_queries_drawn} queries per episode, not the {n_queries} asked for",
            stacklevel=2,
        )

    once = functools.partial(  # the comparison and the untrained baseline differ in model, baselines, label
        _compare_once,
        task=task,
        episodes=episodes,
        gd_config=gd_config,
        probe_names=probe_names,
        seed=seed,
        share_prefix=share_prefix,
        batch_size=batch_size,
        progress=progress,
        encodings={},  # the prompts' encodings, shared by both
    )
    table, deltas = once(model, chosen=chosen)
    # the report's example reuses this comparison's GD deltas; they are dropped before the untrained
    # baseline trains its own, so that two sets of deltas are never held at once
    art = example_artifacts(model, task, episodes[0], deltas) if artifacts and deltas is not None else {}
    del deltas
    parts = [table]
    if "untrained" in chosen:  # the model itself with re-drawn attention/MLP weights, put back after
        from iclgd_lens.engine.baselines import untrained_in_place

        with untrained_in_place(model, seed=seed) as untrained:
            try:
                base = once(untrained, chosen=(), desc="untrained")[0]  # (its deltas are dropped here)
            except IclgdError as err:  # a probe or GD failing only on re-drawn weights: say where
                raise IclgdError(f"in the untrained-model baseline: {err}") from err
        base = base[base["comparison"] == "icl~gd"].assign(comparison="untrained:icl~gd")
        parts.append(base)
    table = pd.concat(parts, ignore_index=True)
    table["k"] = k
    config = {
        "model": _model_info(model),
        "task": {
            "name": task.name,
            "template": task.template,
            "separator": task.separator,
            "read_offset": task.read_offset,
        },
        "k": k,
        "n_episodes": n_episodes,
        "n_queries": n_queries_drawn,
        "n_queries_requested": n_queries,
        "seed": seed,
        "gd": asdict(gd_config),
        "baselines": list(chosen),
        "probes": probe_names,
        "share_prefix": share_prefix,
        "batch_size": batch_size,
        "versions": versions(),  # provenance
        "run_time_s": round(time.time() - started, 2),
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
    }
    return Results(table=table, config=config, artifacts=art)


# ---- one pass over all episodes ------------------------------------------------------------
def _compare_once(
    model,
    task,
    episodes,
    gd_config,
    chosen,
    probe_names,
    seed,
    share_prefix,
    batch_size,
    progress,
    encodings: dict,
    desc="compare",
) -> tuple[pd.DataFrame, "Deltas | None"]:
    """The rows of every episode on `model`, and the GD deltas they were computed with (None at k = 0).
    `encodings`: prompts encoded by an earlier call on the same tokenizer and episodes, filled here."""
    tokenizer = model.tokenizer
    device = _device(model)
    k = len(episodes[0].demos)
    dai_kendall = {"scores", "query_vectors"} <= set(probe_names)
    deltas = (
        train_deltas(
            model,
            tokenizer,
            task,
            episodes,
            gd_config,
            progress=progress,
            record_queries=dai_kendall,
            progress_label="GD" if desc == "compare" else f"GD ({desc})",
        )
        if k > 0
        else None
    )
    with_random_update = deltas is not None and "random_update" in chosen
    recorder = Recorder(model, probe_names)
    max_len = _context_window(model)
    rotary = getattr(model.cfg, "positional_embedding_type", "rotary") == "rotary"

    # The conditions of a group of episodes (at most batch_size query rows, at least one episode)
    # are recorded, turned into rows, and dropped before the next group: recordings are bounded by
    # one group, not by every query of every episode (the passes are the same batch_size chunks).
    queries = [q for episode in episodes for q in episode.queries]
    words = [episode.label_words for episode in episodes for _ in episode.queries]
    row_episode = torch.tensor(
        [e for e, episode in enumerate(episodes) for _ in episode.queries], device=device
    )
    if "zsl" not in encodings:
        encodings["zsl"] = encode_prompts(
            tokenizer, task, [()] * len(queries), queries, words, max_length=max_len
        ).to(device)
    zsl_enc = encodings["zsl"]
    # ZSL does not depend on the demonstrations: when every episode asks the same queries with the
    # same label words (Dai's protocol), it runs once on one episode's rows and is shared
    shared_zsl = deltas is not None and all(
        (e.queries, e.label_words) == (episodes[0].queries, episodes[0].label_words) for e in episodes
    )
    zsl = (
        recorder.run_batched(zsl_enc.rows(0, len(episodes[0].queries)), "zsl", batch_size=batch_size)
        if shared_zsl
        else None
    )
    perms = (
        [permuted_demos(ep.demos, seed + 1000 + e) for e, ep in enumerate(episodes)]
        if "icl_perm" in chosen and k > 1
        else None
    )
    frames = []
    with tqdm(total=len(episodes), desc=desc, disable=not progress) as bar:  # closed on an error too
        for group in _episode_groups(episodes, batch_size):
            start = sum(len(episodes[e].queries) for e in range(group[0]))
            stop = start + sum(len(episodes[e].queries) for e in group)
            alone = zsl_enc.rows(start, stop)
            query_alone = {
                "zsl": zsl if shared_zsl else recorder.run_batched(alone, "zsl", batch_size=batch_size)
            }
            if deltas is not None:
                query_alone["gd"] = recorder.run_batched(
                    alone, "gd", batch_size=batch_size, deltas=deltas, row_episode=row_episode[start:stop]
                )
            if with_random_update:
                query_alone["gd_random"] = _random_update(
                    recorder, alone, deltas, group, episodes, seed, batch_size
                )
            if deltas is None:
                query_alone["gd"] = query_alone["zsl"]
            _check_finite(query_alone, gd_config)
            icl_encs = [
                _encoded(
                    encodings, ("icl", e), tokenizer, task, episodes[e], episodes[e].demos, max_len, device
                )
                for e in group
            ]
            icl = _icl_all(recorder, icl_encs, "icl", share_prefix and k > 0, batch_size)
            perm = None
            if perms is not None:
                perm_encs = [
                    _encoded(
                        encodings, ("icl_perm", e), tokenizer, task, episodes[e], perms[e], max_len, device
                    )
                    for e in group
                ]
                perm = _icl_all(recorder, perm_encs, "icl_perm", share_prefix, batch_size)
            _check_finite({"icl": Recording("icl", logits=torch.cat([q.logits for _, q in icl]))}, gd_config)

            offset = 0
            for i, e in enumerate(group):
                episode = episodes[e]
                n = len(episode.queries)
                rec: dict[str, Recording] = {
                    name: r if (shared_zsl and name == "zsl") else r.rows(offset, offset + n)
                    for name, r in query_alone.items()
                }
                rec["icl_prefix"], rec["icl"] = icl[i]
                if perm is not None:
                    rec["icl_perm"] = perm[i][1]
                offset += n
                labels = torch.tensor([q.label for q in episode.queries], device=device)
                label_ids = label_token_ids(tokenizer, episode.label_words)
                train_queries = (
                    (deltas.train_queries[e], deltas.train_token_demo[e])
                    if deltas is not None and deltas.train_queries
                    else None
                )
                frames.append(
                    episode_table(
                        rec,
                        labels,
                        label_ids,
                        episode=e,
                        chosen=chosen,
                        seed=seed + e,
                        rotary=rotary,
                        train_queries=train_queries,
                        compared=recorder.compared_keys(),
                    )
                )
                bar.update(1)
            del query_alone, icl, perm, rec
    return pd.concat(frames, ignore_index=True), deltas


def _random_update(recorder, alone, deltas: Deltas, group, episodes, seed: int, batch_size: int) -> Recording:
    """The random-update condition of one group's query rows (`alone`), drawn and run for chunks
    of the group's episodes (`Deltas.scaled_random_like`: each episode's update is the same
    whichever episodes are drawn together)."""
    size = max(1, RANDOM_UPDATE_BYTES // deltas.dense_bytes_per_episode())
    parts, start = [], 0
    for first in range(0, len(group), size):
        chunk = group[first : first + size]
        counts = torch.tensor([len(episodes[e].queries) for e in chunk])
        stop = start + int(counts.sum())
        parts.append(
            recorder.run_batched(
                alone.rows(start, stop),
                "gd_random",
                batch_size=batch_size,
                deltas=deltas.scaled_random_like(seed + 1, episodes=chunk),
                row_episode=torch.arange(len(chunk)).repeat_interleave(counts),
            )
        )
        start = stop
    return Recording.concat(parts)


def _episode_groups(episodes: list[Episode], batch_size: int) -> list[list[int]]:
    """Consecutive episodes whose queries fill at most `batch_size` rows (one episode at least):
    the groups `_icl_all` runs together, so that a group's passes are the same as before."""
    groups, rows = [[]], 0
    for e, episode in enumerate(episodes):
        n = len(episode.queries)
        if groups[-1] and rows + n > batch_size:
            groups.append([])
            rows = 0
        groups[-1].append(e)
        rows += n
    return groups


def _encoded(encodings: dict, key, tokenizer, task: Task, episode: Episode, demos, max_len, device):
    """An episode's ICL prompts with `demos` (its queries, its label words), encoded once per
    compare() call: `encodings[key]`, filled on first use."""
    if key not in encodings:
        n = len(episode.queries)
        encodings[key] = encode_prompts(
            tokenizer, task, [demos] * n, list(episode.queries), [episode.label_words] * n, max_length=max_len
        ).to(device)
    return encodings[key]


def _icl_all(
    recorder: Recorder, encs: list, condition: str, share_prefix: bool, batch_size: int
) -> list[tuple[Recording, Recording]]:
    """(demonstration recording, query recording) per episode. With a shared prefix, episodes
    are run together (their prefixes in one pass, their queries in another) in groups of at most
    `batch_size` query rows; otherwise each episode's full prompts in one pass."""
    if not share_prefix:
        return [_icl(recorder, enc, condition, False) for enc in encs]
    out, group = [], []
    for i, enc in enumerate(encs):
        group.append(enc)
        last = i == len(encs) - 1
        if last or sum(len(g.input_ids) for g in group) + len(encs[i + 1].input_ids) > batch_size:
            prefix, queries = recorder.run_shared_prefixes(group, condition, max_rows=batch_size)
            start = 0
            for g, member in enumerate(group):
                n = len(member.input_ids)
                out.append((prefix.rows(g, g + 1), queries.rows(start, start + n)))
                start += n
            group = []
    return out


def _icl(recorder: Recorder, enc, condition: str, share_prefix: bool) -> tuple[Recording | None, Recording]:
    """The ICL condition, with the shared demonstrations run once when possible."""
    if share_prefix:
        prefix, rec = recorder.run_shared_prefix(enc, condition)
        return prefix, rec
    rec = recorder.run(enc, condition)
    return rec, rec


# ---- checks before any model work ----------------------------------------------------------
def _check_arguments(model, k, n_episodes, n_queries, seed, batch_size, max_memory) -> None:
    """compare()'s own arguments, each refused in one line before anything else is looked at
    (a bool is not taken for a count; a float count is refused rather than rounded)."""
    if not all(hasattr(model, name) for name in ("cfg", "hook_dict", "tokenizer")):
        hint = (
            "; wrap a Hugging Face model with load_model(hf_model=..., tokenizer=...)"
            if hasattr(model, "config") and hasattr(model, "forward")
            else ""
        )
        raise IclgdError(
            "compare() needs a model from iclgd_lens.load_model (a TransformerLens TransformerBridge "
            f"with its tokenizer), got {type(model).__name__}{hint}"
        )
    for name, value, least in (
        ("k", k, 0),
        ("n_episodes", n_episodes, 1),
        ("n_queries", n_queries, 1),
        ("batch_size", batch_size, 1),
    ):
        if not _is_int(value) or value < least:
            raise IclgdError(f"{name} must be an integer >= {least}, got {value!r}")
    if not (_is_int(seed) and 0 <= seed <= MAX_SEED):
        raise IclgdError(f"seed must be an integer from 0 to {MAX_SEED}, got {seed!r}")
    if max_memory is not None and not (
        isinstance(max_memory, (int, float)) and not isinstance(max_memory, bool) and max_memory > 0
    ):
        raise IclgdError(
            f"max_memory must be a positive number of bytes (e.g. 40e9) or None, got {max_memory!r}"
        )


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def format_bytes(n: float) -> str:
    """A byte count for messages, in the largest binary unit that keeps it >= 1 (B, KiB, MiB, GiB)."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _warn_attached_hooks(model) -> None:
    """Warn when hooks are already on the model's hook points (`model.add_hook`, or a
    `Recorder.attach` never removed): they act on every condition, ZSL, ICL, GD and the
    baselines alike, and a probe left from another run can fail on these prompts' shapes."""
    points = {id(p): (name, p) for name, p in getattr(model, "hook_dict", {}).items()}.values()
    names = [name for name, p in points if getattr(p, "fwd_hooks", None) or getattr(p, "bwd_hooks", None)]
    if names:
        warnings.warn(
            f"{len(names)} hook point(s) already have hooks attached ({', '.join(sorted(names)[:3])}"
            f"{', ...' if len(names) > 3 else ''}): they act on every condition (ZSL, ICL, GD, baselines); "
            "if they are left from Recorder.attach or model.add_hook, remove them (model.reset_hooks())",
            stacklevel=3,
        )


def check_k_fits(tokenizer, n_ctx: int | None, task: Task, k: int) -> None:
    """k demonstrations of at least this task's shortest rendering must fit the context window:
    an impossible k fails here, in milliseconds, instead of after GD has trained on them (the
    CLI calls it before the model is even loaded)."""
    if n_ctx is None or k == 0 or not task.train:
        return
    demo = min(task.train[:64], key=lambda e: len(e.text))
    text = task.render_demo(demo, task.label_words) + task.separator
    per_demo = len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
    if per_demo + 1 >= n_ctx:  # one demonstration and BOS already fill the window
        raise IclgdError(
            f"the shortest training example of task {task.name!r} is {per_demo} tokens as a demonstration, "
            f"but the model's context window is {n_ctx}: no k > 0 fits; shorten the training texts"
        )
    need = 1 + k * per_demo + 1  # BOS, the demonstrations, at least one token of the query
    largest = (n_ctx - 2) // max(per_demo, 1)
    if need > n_ctx:
        raise IclgdError(
            f"k={k} demonstrations need at least {need} tokens (BOS, {per_demo} per demonstration and the "
            f"query), but the model's context window is {n_ctx}; choose k <= {largest}"
        )


def check_prompts_fit(model, task: Task, episodes: list[Episode]) -> None:
    """Every episode's longest ICL prompt fits the context window (checked before GD trains)."""
    n_ctx = _context_window(model)
    if n_ctx is None or not episodes[0].demos:
        return
    for episode in episodes:
        longest = max(episode.queries, key=lambda q: len(task.render_query(q)))
        encode_prompts(
            model.tokenizer, task, [episode.demos], [longest], [episode.label_words], max_length=n_ctx
        )


def _check_delta_memory(model, gd_config: GDConfig, n_episodes: int, untrained: bool) -> None:
    """The GD deltas of all episodes (dense at worst; Adam keeps two more moments) must fit the
    device's memory beside the model; say the estimate and how to ask for it anyway."""
    from iclgd_lens.engine.gd import projection_paths

    n_layers = model.cfg.n_layers
    entries = 0
    for path in projection_paths(gd_config, n_layers):
        module = model.get_submodule(path)
        weight = getattr(getattr(module, "original_component", module), "weight", None)
        entries += weight.numel() if weight is not None else 0
    element = 4 if gd_config.delta_dtype else next(model.parameters()).element_size()
    copies = 3 if gd_config.optimizer == "adam" else 2  # deltas + their gradients (+ Adam's moments)
    need = entries * n_episodes * element * copies
    device = _device(model)
    # the untrained baseline parks the trained weights in host memory: a second copy only on a CPU
    copies_of_model = 2 if untrained and device.type == "cpu" else 1
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) * copies_of_model
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
    else:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need + model_bytes > total:
        gb = format_bytes
        raise IclgdError(
            f"GD ({gd_config.params}, {gd_config.optimizer}) on {n_episodes} episodes needs about {gb(need)} "
            f"of weight deltas beside {gb(model_bytes)} of model, more than the {gb(total)} of "
            f"{device.type}; use fewer episodes or a smaller parameter set, or pass check_resources=False "
            "(--no-resource-check) to try anyway"
        )


MAX_FLOPS = {"cpu": 2e15, "cuda": 5e18}
"""Estimated work refused without check_resources=False: ~6 hours at 100 GFLOP/s on a CPU,
~1.5 hours at 1 PFLOP/s on a GPU."""


def estimate_flops(
    model, task: Task, episodes: "list[Episode] | tuple[Episode, int]", gd_config: GDConfig, untrained: bool
) -> float:
    """Forward-pass work of a comparison, 2 x parameters x tokens: GD's training tokens three
    times (forward, backward), the ICL prefixes and queries, and the query-alone conditions
    (ZSL, GD, random update, ICL under another order); twice for the untrained-model baseline.
    `episodes`: the episodes, or (one episode, how many times it stands for)."""
    tokenizer = model.tokenizer

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) + 1

    counted = [(e, 1) for e in episodes] if isinstance(episodes, list) else [episodes]
    tokens = 0
    for episode, times in counted:
        demo = sum(n_tokens(task.render_demo(d, episode.label_words)) for d in episode.demos)
        query = sum(n_tokens(task.render_query(q)) for q in episode.queries)
        tokens += times * (3 * gd_config.epochs * demo + 2 * (demo + query) + 3 * query)
    n_params = sum(p.numel() for p in model.parameters())
    return 2.0 * n_params * tokens * (2 if untrained else 1)


def _shortest_episodes(task: Task, k: int, n_episodes: int, n_queries: int) -> tuple[Episode, int]:
    """An episode of the task's shortest texts standing for all `n_episodes`: the least work the
    request can be (`estimate_flops`), known before any episode is drawn."""
    if not task.train or not task.test:
        return Episode((), (), tuple(task.label_words)), 0
    demo = min(task.train[:64], key=lambda e: len(e.text))
    query = min(task.test[:64], key=lambda e: len(e.text))
    n_queries = min(n_queries, len(task.test))
    return Episode((demo,) * k, (query,) * n_queries, tuple(task.label_words)), n_episodes


def check_least_work(
    model,
    task: Task,
    k: int,
    n_episodes: int,
    n_queries: int,
    gd_config: GDConfig,
    untrained: bool,
    device: str | None = None,
    override: str = "",
) -> None:
    """Refuse, before any episode is drawn, a request whose least possible work (every text the
    task's shortest) is beyond the device (MAX_FLOPS): what compare() checks first, so that a
    billion episodes are refused in a second, not drawn for hours. The studies that draw their
    own episodes and the sweep's estimate call it too. `device`: the device type the work would
    run on (default: the model's); `override`: how the caller's user can run it anyway, if they can
    (said in the error)."""
    _check_work(
        model,
        task,
        _shortest_episodes(task, k, n_episodes, n_queries),
        gd_config,
        untrained,
        device,
        override,
    )


OVERRIDE_CHECK = "pass check_resources=False (--no-resource-check) to run it anyway"
"""How a compare() user runs a request beyond MAX_FLOPS anyway."""


def _check_work(
    model,
    task: Task,
    episodes,
    gd_config: GDConfig,
    untrained: bool,
    device: str | None = None,
    override: str = OVERRIDE_CHECK,
) -> None:
    """Refuse, with the estimate, a request far beyond the device (MAX_FLOPS)."""
    flops = estimate_flops(model, task, episodes, gd_config, untrained)
    device = device or _device(model).type
    limit = MAX_FLOPS.get(device, MAX_FLOPS["cuda"])
    if flops > limit:
        raise IclgdError(
            f"this comparison is about {flops / 1e12:,.3g} TFLOP of work, beyond what a {device} "
            f"finishes in hours (limit {limit / 1e12:,.3g} TFLOP); use fewer episodes, queries or epochs"
            + (f", or {override}" if override else "")
        )


def _check_finite(recordings: dict[str, Recording], gd_config: GDConfig) -> None:
    """Stop, with the learning rate named, if any condition's outputs stopped being finite
    (e.g. GD deltas so large that activations overflow): never a report of NaNs."""
    for condition, rec in recordings.items():
        if rec is not None and rec.logits is not None and not bool(torch.isfinite(rec.logits).all()):
            cause = (
                f"with GD at lr={gd_config.lr:g} ({gd_config.describe()}); lower the learning rate"
                if condition.startswith("gd")
                else "(the model itself)"
            )
            raise IclgdError(f"the {condition} condition's output logits are not finite {cause}")


# ---- small helpers -------------------------------------------------------------------------
def _chosen_baselines(baselines) -> tuple[str, ...]:
    if baselines is True:
        return ALL_BASELINES
    if baselines is False or baselines is None:
        return ()
    if isinstance(baselines, str):  # one name, not its characters
        baselines = [baselines]
    unknown = [b for b in baselines if b not in ALL_BASELINES]
    if unknown:
        raise IclgdError(f"unknown baseline(s) {unknown}; choose from {list(ALL_BASELINES)}")
    return tuple(baselines)


def _warn_recorded_only(names: list[str]) -> None:
    """A user's probe declared compare=False adds nothing to compare()'s table or report: say so,
    instead of a run in which that probe silently leaves no trace."""
    from iclgd_lens.hooks import get_probes

    for p in get_probes(names):
        if not p.compare and not p.built_in:
            warnings.warn(
                f"probe {p.name!r} is declared compare=False: compare() runs it in every condition but "
                "keeps none of its values (no table rows, no report section); read them with a Recorder "
                "(docs/extending.md, 'Recording without comparing'), or return vectors and drop "
                "compare=False to have them compared",
                stacklevel=3,
            )


def _probe_names(probes) -> list[str]:
    from iclgd_lens.hooks import DEFAULT_PROBES, PROBES, get_probes

    get_probes([])  # loads the built-in probes
    if isinstance(probes, str):  # one name, not its characters
        return [probes]
    if probes is not None:
        return list(probes)
    user = [n for n in PROBES if n not in DEFAULT_PROBES]
    return list(DEFAULT_PROBES) + user


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _context_window(model) -> int | None:
    return getattr(model.cfg, "n_ctx", None)


def _model_info(model) -> dict:
    try:
        from iclgd_lens.models import model_info

        return model_info(model)
    except Exception:  # a model that is not a bridge (e.g. in tests)
        return {"name": getattr(model.cfg, "model_name", "?")}
