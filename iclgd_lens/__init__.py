"""iclgd-lens: test, layer by layer, whether in-context learning in LLaMA models behaves like
gradient descent. Hook points on a TransformerLens `TransformerBridge` record attention-layer
updates during ICL and compare them with the implicit weight updates of GD.

    from iclgd_lens import load_model, compare, GDConfig
    model = load_model()                         # the embedded tiny-llama-icl, offline
    results = compare(model, gd=GDConfig.dai(), k=8)
    results.summary()

The public names are imported lazily, so `import iclgd_lens` stays fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "iclgd_lens.models",
    "original_state_dict": "iclgd_lens.models",
    "model_info": "iclgd_lens.models",
    "compare": "iclgd_lens.engine.compare",
    "GDConfig": "iclgd_lens.engine.gd",
    "train_deltas": "iclgd_lens.engine.gd",
    "delta_hooks": "iclgd_lens.engine.gd",
    "Results": "iclgd_lens.engine.results",
    "Recorder": "iclgd_lens.engine.record",
    "Recording": "iclgd_lens.engine.record",
    "probe": "iclgd_lens.hooks",
    "ReadContext": "iclgd_lens.hooks",
    "Task": "iclgd_lens.tasks",
    "Example": "iclgd_lens.tasks",
    "Episode": "iclgd_lens.tasks",
    "encode_prompts": "iclgd_lens.tasks",
    "default_task": "iclgd_lens.tasks.mapping",
    "load_task": "iclgd_lens.tasks.formats",
    "render_report": "iclgd_lens.report",
    "IclgdError": "iclgd_lens.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'iclgd_lens' has no attribute {name!r}")
