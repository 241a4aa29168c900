"""The course site (``make book``, ffnlib.book): built offline from the notebooks executed at scale="ci" (those
tests/test_notebooks.py ran in this test run, or run here), the exercises' student copies and the committed
reports, the docs pages (user guide, verdict rules, reports' provenance, scaling, teaching) and the API reference
generated from the docstrings; then opened page by page in headless Chromium (Playwright), with every request that
leaves 127.0.0.1 blocked: every page opens, every figure loads, every internal link leads to a page, math is typeset by the
bundled MathJax, and the exercise pages show their check cells.

``FFNLIB_TEST_RESULTS=<results_dir>`` builds from ``<results_dir>/executed/`` (as tests/test_browser.py reuses it).
"""

from __future__ import annotations

import functools
import http.server
import pkgutil
import threading
import urllib.parse
from pathlib import Path

import nbformat
import pytest
from ci_results import ci_results_dir

import ffnlib
from ffnlib import book
from ffnlib.errors import FFNLibError
from ffnlib.suite import NOTEBOOK_DIR, SUITE

# the ci-scale notebooks executed by tests/test_notebooks.py (same worker, same results folder)
pytestmark = pytest.mark.xdist_group("ci-results")
ROOT = Path(__file__).resolve().parents[1]


def test_the_course_has_every_notebook_exercise_set_and_report_once():
    pages = book.pages()
    assert len(pages) == len(set(pages))
    notebooks = {p.split("/")[1] for p in pages if p.startswith("notebooks/")}
    assert notebooks == {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")}
    exercises = {p.split("/")[1] for p in pages if p.startswith("exercises/")}
    assert exercises == {f"{d.name}_exercises" for d in (ROOT / "exercises" / "source").iterdir() if d.is_dir()}
    reports = {p.split("/")[2] for p in pages if p.startswith("docs/reports/")}
    assert reports == {d.name for d in (ROOT / "docs" / "reports").iterdir() if (d / "report.md").exists()}
    assert all(part.goals and part.time for part in book.COURSE)
    # each exercise set sits in the same part as the notebook it practises
    for part in book.COURSE:
        for page in part.pages:
            if page.startswith("exercises/"):
                assert f"notebooks/{page.split('/')[1].removesuffix('_exercises')}" in part.pages


def test_a_missing_executed_notebook_is_a_clear_error(tmp_path):
    with pytest.raises(FFNLibError, match=r"No executed notebook .*00_quickstart.ipynb: run the notebooks at scale=ci"):
        book.stage(tmp_path / "nothing", tmp_path / "src")


def test_widget_outputs_are_dropped_and_their_text_kept():
    nb = nbformat.v4.new_notebook(metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {}}})
    cell = nbformat.v4.new_code_cell("bar")
    cell.outputs = [nbformat.v4.new_output("display_data", data={book.WIDGET_VIEW: {"model_id": "x"},
                                                                 "text/plain": "100%|##| 3/3"})]
    nb.cells = [cell]
    book.clean_notebook(nb)
    assert "widgets" not in nb.metadata and cell.outputs[0]["data"] == {"text/plain": "100%|##| 3/3"}


def docs_pages() -> list[str]:
    """The docs/ pages of the site (user guide, verdicts, reports' provenance, scaling, teaching, API reference) and
    the API reference's generated module pages: one per public module of the package (a subpackage's private
    ``_x`` modules are documented on its page, through its ``__all__``)."""
    pages = sorted(f"docs/{p.relative_to(ROOT / 'docs').with_suffix('').as_posix()}"
                   for p in (ROOT / "docs").rglob("*.md") if "reports" not in p.parts)
    modules = sorted(m.name for m in pkgutil.walk_packages(ffnlib.__path__, "ffnlib.")
                     if not any(part.startswith("_") for part in m.name.split(".")))
    return pages + [f"docs/generated/{name}" for name in ["ffnlib", *modules]]


def test_the_docs_pages_and_the_api_reference_are_part_of_the_site(site):
    for name in docs_pages():
        assert (site / f"{name}.html").exists(), f"{name} was not built"
    for name in ("index", "install", "verdicts", "reports", "scaling", "teaching", "api", "guide/index"):
        assert f"docs/{name}" in docs_pages(), f"docs/{name}.md is missing"
    guides = {p.split("/")[-1] for p in docs_pages() if p.startswith("docs/guide/")} - {"index"}
    assert guides == {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")}, "a user guide page per notebook"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    results = ci_results_dir(tmp_path_factory, SUITE)  # normally already there, from tests/test_notebooks.py
    return book.build(results / "executed", tmp_path_factory.mktemp("book"))


@pytest.fixture(scope="module")
def served(site):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


def test_the_site_builds_without_warnings_and_loads_nothing_from_the_network(site):
    assert (site / "index.html").exists()
    warnings = (site.parent / "warnings.txt").read_text().strip()
    assert not warnings, warnings
    for page in site.rglob("*.html"):
        html = page.read_text()
        for tag in ("<script", "<link"):
            for chunk in html.split(tag)[1:]:
                head = chunk.split(">", 1)[0]
                assert "http://" not in head and "https://" not in head, (page, head)


def test_every_page_opens_with_its_figures_links_math_and_checks_in_a_browser(served, site):
    from test_browser import CHROMIUM, CHROMIUM_ARGS, ensure_chromium, ensure_playwright

    problem = ensure_chromium() or ensure_playwright()
    if problem:
        pytest.skip(f"No browser for the site test: {problem}.")
    from playwright.sync_api import sync_playwright

    outside: list[str] = []

    def route(r):
        if urllib.parse.urlsplit(r.request.url).hostname == "127.0.0.1":
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    pages = ["index", "instructors"] + book.pages() + docs_pages()
    seen_links: set[str] = set()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.route("**/*", route)
            for name in pages:
                response = page.goto(f"{served}/{name}.html", wait_until="load")
                assert response and response.status == 200, name
                images = page.eval_on_selector_all(
                    "img", "els => els.map(e => [e.getAttribute('src'), e.complete && e.naturalWidth > 0])")
                assert all(ok for _, ok in images), (name, [src for src, ok in images if not ok])
                if name.startswith("docs/reports/") or name in ("notebooks/01_keys", "notebooks/02_values"):
                    assert images, f"{name} shows no figure"
                for href in page.eval_on_selector_all("a[href]", "els => els.map(e => e.href)"):
                    if href.startswith(served):
                        seen_links.add(href.split("#")[0])
                body = page.inner_text("article")
                if name.startswith("exercises/"):
                    stem = name.split("/")[1]
                    nb = nbformat.read(ROOT / "exercises" / "release" / stem.removesuffix("_exercises")
                                       / f"{stem}.ipynb", as_version=4)
                    checks = [c.source for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade")]
                    assert checks and all(c.strip() in body for c in checks), name  # each check cell, whole
                    assert body.count("raise NotImplementedError()") >= len(checks)  # a stub per exercise
                if name == "notebooks/00_quickstart":  # the bundled MathJax typeset the formulas
                    page.wait_for_selector("mjx-container", timeout=15000)
                if name.startswith("docs/generated/"):  # an API page: the module's name, docstring and members
                    module = name.split("/")[-1]
                    assert page.inner_text("article h1").startswith(module), name
                    assert len(body) > len(module) + 40, f"{name} is empty"
                if name == "docs/generated/ffnlib.models":
                    for member in ("ffnlib.models.load_model", "ffnlib.models.check_model", "ffnlib.models.LoadedModel"):
                        assert page.locator(f'dt[id="{member}"]').count() == 1, member
            for href in sorted(seen_links):  # every internal link leads to a page of the site
                path = urllib.parse.urlsplit(href).path
                target = site / urllib.parse.unquote(path).lstrip("/")
                if target.is_dir():
                    target = target / "index.html"
                assert target.exists(), f"broken link {href}"
        finally:
            browser.close()
    assert not outside, f"the site asked the network for {outside[:5]}"
    assert len(seen_links) > len(pages)
