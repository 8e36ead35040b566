"""Every page type in a real browser: Playwright for Python driving the system Chromium.

Playwright (a maintained driver) starts `/usr/bin/chromium` (`executable_path`: no browser is
downloaded) headless, in a context that is offline. Each page of a report (index, every layer
page, the glossary), a single-file report, a study's page and a sweep's pages is opened from
file://, and the test fails on a console error, an uncaught exception, a dialog (a hostile
string that ran would `alert`), or any request that is not file:/data:/blob:; it waits until
every plotly figure has drawn its SVG and every circuitsvis widget has rendered, checks that
the hostile strings are shown as text, and keeps a screenshot of each page under
tests/artifacts/.

Without Chromium the module is skipped, except under `CI=true`, where a missing browser is a
failed install and fails. Install: `apt-get update && apt-get install -y chromium`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pandas as pd
import plotly.express as px
import pytest
from test_results import EVIL_IMG_TOKEN, EVIL_TOKEN, make_results

from iclgd_lens.report import render_report
from iclgd_lens.study import StudyResult

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).parent / "artifacts"
CHROMIUM = next(
    (
        p
        for p in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser"))
        if p and Path(p).exists()
    ),
    None,
)
SWEEP_PAGES = Path(__file__).parent / "sweep_pages.py"
if CHROMIUM is None:
    if os.environ.get("CI") == "true":  # under CI a missing browser is a failed install, not a reason to skip
        pytest.fail(
            "chromium is not installed but CI=true: .ci/install must install it "
            "(apt-get install -y chromium)",
            pytrace=False,
        )
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

if os.environ.get("CI") == "true":
    import playwright.sync_api as sync_api  # under CI a missing Playwright fails here, loudly
else:
    sync_api = pytest.importorskip("playwright.sync_api")

READY = """() => {
    const graphs = [...document.querySelectorAll('.plotly-graph-div')];
    const widgets = [...document.querySelectorAll('.circuitsvis-widget')];
    return document.readyState === 'complete'
        && graphs.every(g => g.classList.contains('js-plotly-plot') && g.querySelector('svg.main-svg'))
        && widgets.every(w => w.childElementCount > 0 && w.innerText.length > 0);
}"""
STATE = """() => {
    const graphs = [...document.querySelectorAll('.plotly-graph-div')];
    const widgets = [...document.querySelectorAll('.circuitsvis-widget')];
    return {
      graphs: graphs.length,
      graphs_rendered: graphs.filter(
        g => g.classList.contains('js-plotly-plot') && g.querySelector('svg.main-svg')
      ).length,
      widgets: widgets.length,
      widgets_rendered: widgets.filter(w => w.childElementCount > 0 && w.innerText.length > 0).length,
      widget_canvases: widgets.map(w => w.querySelectorAll('canvas').length),
      svg_text: [...document.querySelectorAll('svg text')].map(t => t.textContent).join('\\n'),
      text: document.body ? document.body.innerText : '',
      images: document.querySelectorAll('main img').length,
    };
}"""


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--host-resolver-rules=MAP * ~NOTFOUND"],
        )
        try:
            yield chromium
        finally:
            chromium.close()


def open_page(browser, path: Path, screenshot: str | None = None, timeout_ms: int = 60_000) -> dict:
    """Open `path` offline; return what rendered and every problem seen."""
    context = browser.new_context(offline=True, viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    problems: dict[str, list] = {"console_errors": [], "exceptions": [], "dialogs": [], "requests": []}
    page.on(
        "console",
        lambda m: problems["console_errors"].append(m.text) if m.type in ("error", "assert") else None,
    )
    page.on("pageerror", lambda e: problems["exceptions"].append(str(e)))
    page.on("request", lambda r: problems["requests"].append(r.url))

    def on_dialog(dialog):
        problems["dialogs"].append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    try:
        page.goto(path.as_uri(), wait_until="load")
        try:
            page.wait_for_function(READY, timeout=timeout_ms)
        except sync_api.TimeoutError:
            pass  # the state below says what did not render
        # circuitsvis draws its zoomed pattern when scrolled into view: visit every widget
        for widget in page.locator(".circuitsvis-widget").all():
            widget.scroll_into_view_if_needed()
        page.wait_for_timeout(500)  # late errors
        state = page.evaluate(STATE)
        if screenshot:
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            height = min(page.evaluate("document.body.scrollHeight"), 8000)
            page.screenshot(
                path=str(ARTIFACTS / screenshot),
                full_page=True,
                clip={"x": 0, "y": 0, "width": 1280, "height": height},
            )
    finally:
        context.close()
    state.update(problems)
    return state


def assert_clean(state: dict) -> None:
    assert state["dialogs"] == [], f"a dialog opened (a hostile string ran): {state['dialogs']}"
    assert state["exceptions"] == [], f"uncaught exceptions: {state['exceptions']}"
    assert state["console_errors"] == [], f"console errors: {state['console_errors']}"
    remote = [u for u in state["requests"] if not u.startswith(("file:", "data:", "blob:"))]
    assert remote == [], f"network requests from an offline page: {remote}"
    assert state["images"] == 0, "a hostile <img> became an element"
    assert state["graphs"] == state["graphs_rendered"], (
        f"{state['graphs'] - state['graphs_rendered']} figures blank"
    )
    assert state["widgets"] == state["widgets_rendered"], "a circuitsvis widget did not render"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("browser") / "report"
    render_report(make_results(), out, analyses={})
    return out


def test_every_page_of_a_report_renders_offline(browser, report_dir):
    pages = sorted(report_dir.glob("*.html"))
    assert [p.name for p in pages] == ["glossary.html", "index.html"] + [
        f"layer_{l:02d}.html" for l in range(4)
    ]
    for page in pages:
        state = open_page(browser, page, f"report_{page.stem}.png")
        assert_clean(state)
        expected = page.read_text().count('class="plotly-graph-div"')
        assert state["graphs"] == expected, page.name
        if page.name == "index.html":
            assert expected >= 8 and "Verdict" in state["text"].split("Headline")[0]
            assert EVIL_IMG_TOKEN in state["text"]  # the hostile model and task names, as text
        if page.name.startswith("layer_"):
            assert expected >= 4 and state["widgets"] == 3  # ZSL, ICL, GD attention views
            assert min(state["widget_canvases"]) > 4  # 4 head thumbnails + the zoomed pattern, drawn
            for token in (EVIL_TOKEN, EVIL_IMG_TOKEN):
                assert token in state["svg_text"], token  # the top-tokens figure labels it as the text it is
        if page.name == "glossary.html":
            assert "simam_delta" in state["text"] and "GD-like" in state["text"]


def test_single_file_report_renders(browser, tmp_path):
    path = render_report(make_results(n_layers=2), tmp_path / "single", single_file=True, analyses={})
    state = open_page(browser, path, "report_single_file.png")
    assert_clean(state)
    assert state["graphs"] > 0 and state["widgets"] == 6
    assert "Glossary" in state["text"]


def hostile_study() -> StudyResult:
    """A study with a k axis, a layer axis and hostile strings in its table, findings and figure."""
    table = pd.DataFrame(
        {
            "k": [1, 2, 4, 8, 16, 32, 64] * 2,
            "comparison": ["icl~gd"] * 7 + ["icl~random_update"] * 7,
            "mean": [0.1, 0.15, 0.2, 0.22, 0.25, 0.27, 0.3] + [0.0] * 7,
            "note": [EVIL_IMG_TOKEN] * 14,
        }
    )
    fig_k = px.line(table, x="k", y="mean", color="comparison", log_x=True, markers=True, title=EVIL_TOKEN)
    layers = pd.DataFrame({"layer": [0, 1, 2, 3], "mean": [0.1, 0.3, 0.2, 0.4], "method": ["icl"] * 4})
    fig_layer = px.line(layers, x="layer", y="mean", color="method", markers=True)
    return StudyResult(
        name="k-sweep",
        question=f"Does it grow with k? {EVIL_IMG_TOKEN}",
        table=table,
        figures=[fig_k, fig_layer],
        findings=f"It grows. {EVIL_TOKEN}",
        config={"model": EVIL_IMG_TOKEN, "n_layers": 4},
    )


def test_a_study_page_renders_with_its_labelled_k_axis(browser, tmp_path):
    from iclgd_lens.engine.results import TABLE_COLUMNS, Results

    empty = Results(pd.DataFrame(columns=list(TABLE_COLUMNS)), {"study": "k-sweep", "n_layers": 4}, {})
    path = render_report(empty, tmp_path / "study", study_results=[hostile_study()], analyses={})
    assert sorted(p.name for p in path.parent.glob("*.html")) == ["glossary.html", "index.html"]
    state = open_page(browser, path, "study_k_sweep.png")
    assert_clean(state)
    assert state["graphs"] == 2
    assert EVIL_IMG_TOKEN in state["text"] and EVIL_TOKEN in state["text"]
    ticks = state["svg_text"].split("\n")
    for k in ("1", "2", "4", "8", "16", "32", "64"):
        assert k in ticks, f"k = {k} is not labelled"
    assert "0.5" not in ticks and "1.5" not in ticks  # the layer axis ticks whole layers
    for heading in ("Verdict", "Headline", "Layer-wise"):
        assert heading not in state["text"]  # a study's page has no empty report sections


@pytest.mark.skipif(
    not SWEEP_PAGES.exists(), reason="tests/sweep_pages.py (the sweep report builder) is absent"
)
def test_every_page_of_a_sweep_report_renders(browser, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_pages", SWEEP_PAGES)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    made = Path(module.make_sweep_report(tmp_path))
    root = made if made.is_dir() else made.parent
    pages = sorted(root.rglob("*.html"))
    assert pages and (root / "index.html") in pages, f"no sweep index in {root}"
    for page in pages:
        name = "_".join(page.relative_to(root).with_suffix("").parts)
        state = open_page(browser, page, f"sweep_{name}.png")
        assert_clean(state)
        assert state["graphs"] == page.read_text().count('class="plotly-graph-div"'), page.name
        if page == root / "index.html":
            assert state["graphs"] > 0
