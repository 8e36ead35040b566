"""iclgd-lens: test, layer by layer, whether in-context learning in LLaMA models behaves like
gradient descent. Hook points on a TransformerLens `TransformerBridge` record attention-layer
updates during ICL and compare them with the implicit weight updates of GD.

    from iclgd_lens import load_model, compare, GDConfig
    model = load_model()                         # the embedded tiny-llama-icl, offline
    results = compare(model, gd=GDConfig.dai(), k=8)
    results.summary()

Everything listed in `__all__` is the public API (what hooks/, analyses/ and users' own
probes and studies import). The names are imported lazily, so `import iclgd_lens` stays fast;
`dir(iclgd_lens)` lists them for tab completion.
"""

from __future__ import annotations

import importlib

__version__ = "0.4.2"

_EXPORTS = {
    # models
    "load_model": "iclgd_lens.models",
    "original_state_dict": "iclgd_lens.models",
    "model_info": "iclgd_lens.models",
    # tasks
    "Task": "iclgd_lens.tasks",
    "Example": "iclgd_lens.tasks",
    "Episode": "iclgd_lens.tasks",
    "encode_prompts": "iclgd_lens.tasks",
    "label_token_ids": "iclgd_lens.tasks",
    "permuted_demos": "iclgd_lens.tasks",
    "resolve_task": "iclgd_lens.tasks",
    "QUERY_SEGMENT": "iclgd_lens.tasks",
    "added_context_mask": "iclgd_lens.tasks",
    "default_task": "iclgd_lens.tasks.mapping",
    "MappingTask": "iclgd_lens.tasks.mapping",
    "World": "iclgd_lens.tasks.mapping",
    "load_task": "iclgd_lens.tasks.formats",
    # engine
    "compare": "iclgd_lens.engine.compare",
    "check_least_work": "iclgd_lens.engine.compare",
    "GDConfig": "iclgd_lens.engine.gd",
    "Deltas": "iclgd_lens.engine.gd",
    "train_deltas": "iclgd_lens.engine.gd",
    "delta_hooks": "iclgd_lens.engine.gd",
    "demo_order": "iclgd_lens.engine.gd",
    "PARAM_SETS": "iclgd_lens.engine.gd",
    "PRESETS": "iclgd_lens.engine.gd",
    "Recorder": "iclgd_lens.engine.record",
    "Recording": "iclgd_lens.engine.record",
    "Results": "iclgd_lens.engine.results",
    "versions": "iclgd_lens.engine.results",
    "untrained_copy": "iclgd_lens.engine.baselines",
    "untrained_in_place": "iclgd_lens.engine.baselines",
    "random_vector_like": "iclgd_lens.engine.baselines",
    # probes, analyses, studies
    "probe": "iclgd_lens.hooks",
    "Probe": "iclgd_lens.hooks",
    "ReadContext": "iclgd_lens.hooks",
    "analysis": "iclgd_lens.analyses",
    "StudyResult": "iclgd_lens.study",
    # report, errors
    "render_report": "iclgd_lens.report",
    "IclgdError": "iclgd_lens.errors",
}
_MODULES = {
    "metrics": "iclgd_lens.engine.metrics",  # pure metric functions of tensors
    "stats": "iclgd_lens.engine.stats",  # episode-level intervals and paired tests
    "style": "iclgd_lens.report.style",  # the report's visual language, for figures of your own
}

__all__ = sorted([*_EXPORTS, *_MODULES])


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(_MODULES[name])
    raise AttributeError(f"module 'iclgd_lens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
