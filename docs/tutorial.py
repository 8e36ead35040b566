# %% [markdown]
# # iclgd-lens in a notebook
#
# A runnable walk-through on the embedded `tiny-llama-icl` (offline, a laptop CPU, about a
# minute). Open it as a notebook with Jupytext or VS Code (`# %%` cells), or run it as a
# script: `python docs/tutorial.py`. The test suite runs it as a notebook with nbclient
# (`tests/test_notebook.py`) and checks that its figures are inline HTML.
#
# The same cells run on LLaMa-7B on a GPU: `load_model("meta-llama/Llama-2-7b-hf",
# device="cuda", dtype="bf16")`.

# %%
import torch

from iclgd_lens import GDConfig, Recorder, compare, default_task, encode_prompts, load_model, probe

torch.set_num_threads(2)
model = load_model("tiny-llama-icl")  # a TransformerLens TransformerBridge
task = default_task()  # fresh 2-way mappings of item categories to label words, per episode
episode = task.episodes(k=4, n_episodes=1, n_queries=3, seed=0)[0]
print(task.icl_prompt(episode.demos, episode.queries[0], episode.label_words))

# %% [markdown]
# ## 1. Attach recording hooks, run, detach
# A `Recorder` attaches probes (hook functions) to the bridge. As a context manager the hooks
# are removed on exit, also after an exception; `attach(...)` without `with` returns a handle
# whose `.remove()` detaches them.

# %%
n = len(episode.queries)
icl_prompts = encode_prompts(
    model.tokenizer, task, [episode.demos] * n, list(episode.queries), [episode.label_words] * n
)
zsl_prompts = encode_prompts(
    model.tokenizer, task, [()] * n, list(episode.queries), [episode.label_words] * n
)

recorder = Recorder(model, probes=["attn_out", "scores"])
with recorder.attach(icl_prompts, "icl"):
    model(icl_prompts.input_ids, attention_mask=icl_prompts.attention_mask)
icl = recorder.recording("icl")
print({name: tuple(t.shape) for name, t in icl.values.items()})  # [n_layers, batch, ...]

handle = recorder.attach(zsl_prompts, "zsl")  # explicit handle
model(zsl_prompts.input_ids, attention_mask=zsl_prompts.attention_mask)
handle.remove()
zsl = recorder.recording("zsl")
assert all(len(hp.fwd_hooks) == 0 for hp in model.hook_dict.values())  # nothing left attached

# the ICL update of the attention output at the read position, per layer
update = (icl["attn_out"] - zsl["attn_out"]).norm(dim=-1).mean(-1)
print("|h_ICL - h_ZSL| per layer:", [round(float(u), 3) for u in update])

# %% [markdown]
# ## 2. A whole comparison: ICL vs GD, layer by layer, with baselines

# %%
results = compare(
    model, task, gd=GDConfig.dai(lr=1e-2), k=4, n_episodes=2, n_queries=6, seed=0, progress=False
)
summary = results.summary()
print(
    summary[(summary.metric == "simaou") & (summary["head"] == -1)][
        ["comparison", "layer", "mean", "ci_low", "ci_high"]
    ]
)
results  # in a notebook this cell shows the HTML summary (Results._repr_html_)

# %% [markdown]
# ## 3. Figures inline, offline
# Every report figure is a plotly figure. `notebook.use()` makes plotly draw figures in cells as
# plain HTML that needs no network and no plotly extension: it renders in Jupyter Notebook,
# JupyterLab, VS Code and in exported HTML (plotly.js is embedded with the first figure of each
# cell, so every figure cell draws on its own after re-runs and in exports;
# `notebook.use(library="once")` embeds it once per session). Same colours as the report:
# icl~gd strong and solid, the floors muted and dashed, the ICL~ICL ceiling dotted.

# %%
from iclgd_lens.report import notebook
from iclgd_lens.report.figures import head_heatmap_figure, layer_curve_figure

notebook.use()
notebook.show(head_heatmap_figure(results, layer=1))  # per-head means, values in the cells
fig = layer_curve_figure(results, "simaou")
fig  # the cell's last value: drawn inline like any plotly figure

# %% [markdown]
# ## 4. Your own hook function
# One decorated function: the hook points it needs, what to keep. It is then recorded in ZSL,
# ICL and GD and compared layer by layer (`probe:mlp_out` in the table and the report).


# %%
@probe("mlp_out", points=["blocks.{layer}.hook_mlp_out"])
def mlp_out(acts, ctx):
    """MLP output at the read position."""
    if ctx.condition == "icl_prefix":  # the shared demonstrations: nothing to read there
        return {}
    return {"mlp_out": acts["hook_mlp_out"][ctx.batch_index, ctx.read_pos]}  # [batch, d_model]


results = compare(
    model,
    task,
    gd=GDConfig.dai(lr=1e-2),
    k=4,
    n_episodes=1,
    n_queries=6,
    baselines=("random",),
    progress=False,
    artifacts=False,
)
mlp = results.summary().query("metric == 'probe:mlp_out' and comparison == 'icl~gd'")
print(mlp[["layer", "mean"]])
assert len(mlp) == model.cfg.n_layers
