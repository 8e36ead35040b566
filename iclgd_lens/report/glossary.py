"""The glossary: every metric id and comparison name, in one line each, with its range, which
direction means "GD-like", its unit and the paper it comes from (docs/metrics.md has the full
definitions). Every page links each metric name to its entry (`metric_link`), and the report
folder has a `glossary.html` page (`glossary_html`). The ranges are text for readers; the engine
clips intervals to the same ranges as numbers (`iclgd_lens.engine.ranges`, checked to agree).
"""

from __future__ import annotations

from typing import NamedTuple

from iclgd_lens.engine.metrics import UNDEFINED_BECAUSE
from iclgd_lens.report.templates import escape

GLOSSARY_PAGE = "glossary.html"


class Entry(NamedTuple):
    """One glossary line: what the number is, its range, the GD-like direction, unit and source."""

    definition: str
    range: str
    gd_like: str
    paper: str
    unit: str = ""


_COS = "[-1, 1]"
_HIGHER = "higher (1: the same direction as GD's update)"
METRICS: dict[str, Entry] = {
    "simaou": Entry(
        "cos(h_ICL - h_ZSL, h_GD - h_ZSL): the cosine of the update ICL and GD make to the attention "
        "output at the read position, per layer (raw form, the default)",
        _COS,
        _HIGHER,
        "Dai et al. 2023 (SimAOU)",
    ),
    "simaou_norm": Entry(
        "SimAOU on L2-normalised outputs, as in Dai's code: cos(h^_ICL - h^_ZSL, h^_GD - h^_ZSL), "
        "h^ = h/|h|; has a floor of about 1/4 for unrelated updates",
        _COS,
        "higher, but compare with its baselines: unrelated updates give about 0.25",
        "Dai et al. 2023 (their code)",
    ),
    "simam_before": Entry(
        "cos of the read position's pre-softmax attention map over the query's tokens, ICL vs ZSL",
        _COS,
        "the reference for simam_after (GD-like: after > before)",
        "Dai et al. 2023 (SimAM)",
    ),
    "simam_after": Entry(
        "cos of the read position's pre-softmax attention map over the query's tokens, ICL vs GD",
        _COS,
        "higher than simam_before",
        "Dai et al. 2023 (SimAM)",
    ),
    "simam_delta": Entry(
        "cos(m_ICL - m_ZSL, m_GD - m_ZSL) of the attention-map updates over the query's tokens; undefined "
        "at layer 0 of a rotary model",
        _COS,
        _HIGHER,
        "Deutch et al. 2024 (SimAM-delta)",
    ),
    "kendall_token": Entry(
        "Kendall's tau-b between ICL's attention over the demonstration tokens (summed over heads) and "
        "the GD query's affinity to GD's training tokens",
        _COS,
        "higher (1: the same ranking of demonstration tokens)",
        "Dai et al. 2023 (Kendall, token level)",
    ),
    "kendall_example": Entry(
        "Kendall's tau-b of the same two attentions summed per demonstration",
        _COS,
        "higher (1: the same ranking of demonstrations)",
        "Dai et al. 2023 (Kendall, example level)",
    ),
    "kendall_token_per_head": Entry(
        "per-head variant: tau-b of ICL's post-softmax attention on the demonstration tokens and the "
        "per-head GD query dotted with the ICL-pass queries",
        _COS,
        "higher",
        "this project (a variant of Dai et al. 2023)",
    ),
    "kendall_example_per_head": Entry(
        "per-head variant at the example level (summed per demonstration)",
        _COS,
        "higher",
        "this project (a variant of Dai et al. 2023)",
    ),
    "dw_cos": Entry(
        "Frobenius cosine of the implicit weight update of ICL (dW_ICL = sum of v k^T over demonstration "
        "tokens) and GD's (the change of sum of v k^T over the query's context), per kv head",
        _COS,
        _HIGHER,
        "Dai et al. 2023 (dual form)",
    ),
    "dw_action_cos": Entry(
        "cos(dW_ICL q, dW_GD q): the two implicit updates applied to the read position's query",
        _COS,
        _HIGHER,
        "Dai et al. 2023 (dual form)",
    ),
    "dual_form_cos": Entry(
        "cos of the linear-attention (dual form) prediction dW_ICL q with the real ICL update z_ICL - z_ZSL",
        _COS,
        "higher: the dual form explains ICL's update (exact for linear attention)",
        "Dai et al. 2023 (dual form)",
    ),
    "dual_form_rel_err": Entry(
        "relative error of the dual-form prediction after the best scalar fit, sqrt(1 - cos^2)",
        "[0, 1]",
        "lower",
        "Dai et al. 2023 (dual form)",
    ),
    "accuracy": Entry(
        "share of queries whose label word (first token) has the highest logit among the label words",
        "[0, 1]",
        "GD-like when ICL's and GD's accuracies are close; higher is better",
        "Dai et al. 2023",
        "fraction",
    ),
    "accuracy_vocab": Entry(
        "share of queries whose label token is the argmax over the whole vocabulary",
        "[0, 1]",
        "higher is better",
        "this project",
        "fraction",
    ),
    "rec2ftp": Entry(
        "Recall to fine-tuning predictions: of the queries GD fixes (wrong zero-shot, right after GD), the "
        "share ICL fixes too",
        "[0, 100]",
        "higher (100: ICL fixes every query GD fixes)",
        "Dai et al. 2023 (Rec2FTP)",
        "%",
    ),
    "token_overlap": Entry(
        "|top-10(p1) and top-10(p2)| / 10 of the two next-token distributions",
        "[0, 1]",
        "higher (1: the same ten likeliest tokens)",
        "Shen et al. 2024",
        "fraction",
    ),
    "overlap_cosine": Entry(
        "cosine of the two distributions restricted to their shared top-10 tokens (0 if none shared)",
        "[0, 1]",
        "higher",
        "Shen et al. 2024",
    ),
    "kl": Entry(
        "KL(p1 || p2) of the next-token distributions", "[0, inf)", "lower", "Shen et al. 2024", "nats"
    ),
    "js": Entry(
        "Jensen-Shannon divergence of the next-token distributions",
        "[0, ln 2]",
        "lower",
        "Shen et al. 2024",
        "nats",
    ),
    "sen": Entry(
        "order sensitivity: sum over the vocabulary of the std over demonstration orders of p",
        "[0, sqrt(n_permutations - 1)]",
        "GD-like when ICL's is as low as GD's",
        "Shen et al. 2024",
    ),
    "order_overlap": Entry(
        "top-10 token overlap of a method's distributions under another demonstration order",
        "[0, 1]",
        "higher: less order-sensitive",
        "Shen et al. 2024",
        "fraction",
    ),
    "attn_sen": Entry(
        "|std over orders of the attention output| / |mean update h - h_ZSL| at the read position",
        "[0, inf)",
        "lower: less order-sensitive",
        "this project (after Shen et al. 2024)",
    ),
    "icl_gd_overlap": Entry(
        "top-10 token overlap of ICL and GD under the same demonstration order",
        "[0, 1]",
        "higher",
        "Shen et al. 2024",
        "fraction",
    ),
}
PROBE = Entry(
    "a user probe's vector, compared like SimAOU: cos(v_ICL - v_ZSL, v_GD - v_ZSL)",
    _COS,
    _HIGHER,
    "this project",
)

COMPARISONS: dict[str, str] = {
    "icl~gd": "the headline: ICL's update against GD's update on the same demonstrations",
    "icl~icl_perm": "the ceiling: ICL against ICL under another demonstration order (Shen et al. 2024)",
    "icl~random": "floor: ICL's update against a random vector (Dai et al. 2023)",
    "icl~random_update": (
        "floor: ICL against GD replaced by a random update of equal norm (Deutch et al. 2024)"
    ),
    "untrained:icl~gd": (
        "floor: icl~gd measured in the same model with re-initialised weights (Deutch et al. 2024)"
    ),
    "icl~zsl": "ICL against zero-shot (no demonstrations)",
    "gd~zsl": "the GD model against zero-shot",
    "icl~dual_form": "ICL's update against its linear-attention (dual form) prediction",
    "zsl": "zero-shot: the query alone",
    "icl": "in-context: demonstrations + query",
    "gd": "the model fine-tuned by GD on the demonstrations, on the zero-shot prompt",
}


def entry(metric: str) -> Entry | None:
    """The glossary entry of a metric id (probes included); None for an id it does not know."""
    if metric in METRICS:
        return METRICS[metric]
    if str(metric).startswith("probe:"):
        return PROBE
    return None


def anchor(metric: str) -> str:
    """The id of a metric's entry on the glossary page."""
    return "m-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in str(metric))


def unit(metric: str) -> str:
    """The unit of a metric ("%" for rec2ftp, "nats" for KL/JS), or ""."""
    found = entry(metric)
    return found.unit if found else ""


def tooltip(metric: str) -> str:
    """One line for a title attribute: definition; range; GD-like direction; unit; paper."""
    found = entry(metric)
    if found is None:
        return "no glossary entry (a metric added by a plugin or a study)"
    parts = [found.definition, f"range {found.range}", f"GD-like: {found.gd_like}"]
    if found.unit:
        parts.append(f"unit: {found.unit}")
    parts.append(found.paper)
    return "; ".join(parts)


def metric_link(metric: str, page: str = GLOSSARY_PAGE) -> str:
    """A metric name as HTML: an <abbr> with its one-line definition, linking to its glossary entry.
    `page`: the glossary's address from the page the link sits on ("" for the same page). A metric
    without an entry (a study's own, a plugin's) is the <abbr> alone: no link to a missing entry."""
    name = f'<abbr title="{escape(tooltip(metric))}">{escape(metric)}</abbr>'
    if entry(metric) is None:
        return name
    return f'<a class="metric" href="{escape(page)}#{escape(anchor(metric))}">{name}</a>'


def glossary_html(metrics: list[str] | None = None) -> str:
    """The glossary as an HTML fragment: a table of the metrics (those in `metrics` first, then the
    rest), their undefined cases, and the comparisons."""
    names = list(dict.fromkeys([*(metrics or []), *METRICS]))
    rows = []
    for m in names:
        found = entry(m)
        if found is None:
            continue
        because = UNDEFINED_BECAUSE.get(m, "")
        rows.append(
            f'<tr id="{escape(anchor(m))}"><td><code>{escape(m)}</code></td><td>{escape(found.definition)}'
            + (f'<br><span class="note">undefined when {escape(because)}</span>' if because else "")
            + f"</td><td>{escape(found.range)}</td><td>{escape(found.gd_like)}</td>"
            f"<td>{escape(found.unit)}</td><td>{escape(found.paper)}</td></tr>"
        )
    metric_table = (
        '<table class="data glossary"><tr><th>metric</th><th>definition</th><th>range</th>'
        "<th>GD-like when</th><th>unit</th><th>paper</th></tr>" + "".join(rows) + "</table>"
    )
    comp_rows = "".join(
        f'<tr id="c-{escape(anchor(c)[2:])}"><td><code>{escape(c)}</code></td><td>{escape(text)}</td></tr>'
        for c, text in COMPARISONS.items()
    )
    comp_table = (
        '<table class="data glossary"><tr><th>comparison / condition</th><th>what it is</th></tr>'
        + comp_rows
        + "</table>"
    )
    return metric_table + "<h3>Comparisons and conditions</h3>" + comp_table
