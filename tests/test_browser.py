"""End to end in a real browser: JupyterLab (headless, 127.0.0.1, token) runs notebooks/05_explorer.ipynb at
scale="ci" in headless Chromium driven by Playwright; the test types a prompt and clicks through the three views,
checks what renders against the model run in this process, opens a knowledge neuron's memory card and follows a link
of each kind (an expert mate, a trigger example, a fact, a memory like this one), then opens the static atlas pages
and follows theirs.
It runs after tests/test_notebooks.py (tests/conftest.py), whose results the cards read.

Set-up: Debian's Chromium (``apt-get install -y chromium`` when missing and we are root) and the ``playwright``
package (installed into this environment at the version of the lock file, constraints.txt, when missing). The test is
skipped, saying why, only where neither can be installed. Playwright's own browser download is not used.

``FFNLIB_SCREENSHOTS=docs/screenshots pytest tests/test_browser.py`` also saves the screenshots that
docs/guide/05_explorer.md and docs/card.md show there;
``FFNLIB_TEST_RESULTS=<results_dir>`` reuses a results folder where the ci-scale trigger examples are cached
(the fixture ``ci_results`` mines them otherwise, before the browser starts).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest
from ci_results import ci_results_dir

# one pytest-xdist worker runs this file, tests/test_notebooks.py and tests/test_site.py (--dist loadgroup): they
# share one ci-scale results folder, which this file's fixture mines first
pytestmark = pytest.mark.xdist_group("ci-results")

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PROMPT = "The Eiffel Tower is in the city of"
NOTEBOOK = "05_explorer.ipynb"
CARD_NOTEBOOKS = ("06_knowledge_neurons", "07_moefication")  # a knowledge neuron's facts, and its expert mates


# ---- set-up -------------------------------------------------------------------------------------------
def _pinned_playwright() -> str:
    """The lock's playwright (constraints.txt), or the ``browser`` extra's range where the lock has none."""
    lock = [line.strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    pinned = next((line for line in lock if line.lower().startswith("playwright==")), None)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    return pinned or next((r for r in extras.get("browser", []) if r.lower().startswith("playwright")), "playwright")


def ensure_chromium() -> str | None:
    """Path of a Chromium binary, installing Debian's package if needed and possible; else why not."""
    if CHROMIUM.exists():
        return None
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return f"{CHROMIUM} is missing and cannot be installed here (needs apt-get and root)"
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(command, capture_output=True, text=True, env={**os.environ,
                                                                             "DEBIAN_FRONTEND": "noninteractive"})
        if done.returncode != 0:
            return f"`{' '.join(command)}` failed: {done.stderr.strip()[-300:]}"
    return None if CHROMIUM.exists() else f"apt-get installed chromium but {CHROMIUM} is still missing"


def ensure_playwright() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
        return None
    except ImportError:
        pass
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", _pinned_playwright()],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return f"pip could not install {_pinned_playwright()}: {done.stderr.strip()[-300:]}"
    try:
        import playwright.sync_api  # noqa: F401,F811
        return None
    except ImportError as exc:
        return f"playwright was installed but cannot be imported: {exc}"


@pytest.fixture(scope="module")
def browser():
    problem = ensure_chromium() or ensure_playwright()
    if problem:
        pytest.skip(f"No browser for the end-to-end test: {problem}.")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory) -> Path:
    """A results folder holding the ci-scale trigger examples, mined exactly as notebooks 01, 02 and 05 mine
    them (same request, so the notebook loads them from the cache). Mining is the slow part of the notebook;
    doing it here keeps the browser's wait short. The folder is the test run's ``ci-results`` (shared with
    any other test that uses it) or ``$FFNLIB_TEST_RESULTS``."""
    from ffnlib.config import get_scale
    from ffnlib.corpus import load_corpus
    from ffnlib.keys import mine_trigger_examples
    from ffnlib.models import load_model

    results = ci_results_dir(tmp_path_factory)
    scale = get_scale("ci")
    mine_trigger_examples(load_model("smollm2-135m"),
                          load_corpus("wiki", split="train", seed=0, max_sentences=scale.mining_sentences),
                          k=scale.top_k, checkpoint_every=scale.checkpoint_every,
                          out_dir=results / "smollm2-135m" / "ci", progress=False)
    return ci_results_dir(tmp_path_factory, CARD_NOTEBOOKS)  # normally there already, from test_notebooks.py


@pytest.fixture(scope="module")
def lab(tmp_path_factory, ci_results):
    """A JupyterLab server on 127.0.0.1 with a token, serving a folder with the explorer notebook prepared by
    papermill with scale="ci" (and a small histogram sample and atlas)."""
    import papermill

    base = tmp_path_factory.mktemp("lab")
    root, config = base / "root", base / "config"
    results = ci_results
    root.mkdir()
    (config / "labconfig").mkdir(parents=True)
    # no "news" pop-up over the notebook; every cell stays in the page (no windowing of long notebooks)
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    tracker = base / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    papermill.execute_notebook(str(ROOT / "notebooks" / NOTEBOOK), str(root / NOTEBOOK), prepare_only=True,
                               parameters={"scale": "ci", "results_dir": str(results), "sample_sentences": 16,
                                           "atlas_per_layer": 1, "atlas_notable": 2, "atlas_mates": 1},
                               progress_bar=False)
    token, port = secrets.token_hex(16), _free_port()
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(config), "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
           "IPYTHONDIR": str(base / "ipython"), "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    log = open(base / "jupyter.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}", "--ServerApp.open_browser=False",
         f"--LabApp.workspaces_dir={base / 'workspaces'}", f"--LabApp.user_settings_dir={base / 'settings'}",
         "--LabServerApp.check_for_updates_class=jupyterlab.handlers.announcements.NeverCheckForUpdate",
         "--LabApp.extension_manager=readonly",
         "--ServerApp.terminals_enabled=False", *(["--allow-root"] if os.geteuid() == 0 else [])],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"JupyterLab did not start: {(base / 'jupyter.log').read_text()[-2000:]}")
            time.sleep(0.3)
        yield {"url": url, "token": token, "results": results, "root": root, "log": base / "jupyter.log"}
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _expected_prediction(prompt: str) -> str:
    import torch

    from ffnlib.models import load_model

    loaded = load_model("smollm2-135m")
    with torch.no_grad():
        logits = loaded.model(torch.tensor([loaded.encode(prompt)])).logits[0, -1]
    return loaded.token_strings([int(logits.argmax())])[0]


def _shot(page, locator, path: Path, max_height: int = 1100) -> Path:
    """A screenshot of ``locator``'s top part (scrolled to the top of the window), at most ``max_height`` high."""
    locator.evaluate("element => element.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(300)
    box = locator.bounding_box()
    viewport = page.viewport_size
    height = min(box["height"], max_height, viewport["height"] - box["y"])
    page.screenshot(path=path, clip={"x": box["x"], "y": box["y"], "width": box["width"], "height": height})
    return path


def _save(shots: dict[str, Path], tmp_path: Path) -> None:
    target = os.environ.get("FFNLIB_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        for name, path in shots.items():
            shutil.copyfile(path, Path(target) / f"{name}.png")


# ---- the test -----------------------------------------------------------------------------------------
def test_explorer_notebook_runs_and_its_views_render_in_a_browser(browser, lab, tmp_path):
    expected = _expected_prediction(PROMPT)
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    page.set_default_timeout(30_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        _use_the_explorer(page, lab, tmp_path, expected, errors)
    except Exception:
        page.screenshot(path=tmp_path / "failure.png")
        print(f"screenshot of the failure: {tmp_path / 'failure.png'}; JupyterLab log:\n"
              f"{lab['log'].read_text()[-3000:]}")
        raise
    _check_the_atlas(browser, lab, tmp_path)


class _Phases:
    """Seconds spent in each phase of the test (printed, to see where the time goes)."""

    def __init__(self):
        self.start = self.last = time.monotonic()

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        print(f"[browser test] {name}: {now - self.last:.1f} s (total {now - self.start:.1f} s)")
        self.last = now


def _use_the_explorer(page, lab, tmp_path, expected, errors):
    phase = _Phases()
    page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK}?token={lab['token']}&reset")
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=60_000)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    page.wait_for_timeout(1500)
    dialog = page.locator(".jp-Dialog")
    if dialog.count():  # JupyterLab may ask which kernel to use: the notebook's own (python3)
        assert "Select Kernel" in dialog.text_content()
        dialog.locator("button.jp-mod-accept").click()
        dialog.wait_for(state="detached")

    phase("JupyterLab and the kernel ready")
    page.keyboard.press("Control+b")  # hide the file browser: a wider notebook
    # run the whole notebook from the menu, as a user would
    started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|\d+)\]"))
    for attempt in range(3):  # under load a menu click can be lost: check that the first cell started, else again
        page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
        page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()
        try:
            started.first.wait_for(state="attached", timeout=60_000)
            break
        except Exception:
            page.keyboard.press("Escape")  # close a menu left open
    page.get_by_text(re.compile(r"^atlas: ")).wait_for(state="attached", timeout=480_000)  # the last cell ran (4 min under load)
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=60_000)
    phase("notebook run (Run All Cells)")
    assert page.locator(".jp-OutputArea-output", has_text="Loaded cached trigger examples").count() == 1
    explorer = page.locator(".ffn-explorer")
    explorer.scroll_into_view_if_needed()
    explorer.wait_for(state="visible")
    assert not page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] >> "
                            "text=Traceback").count()
    assert page.locator(".jp-RenderedText", has_text="Error").count() == 0

    shots: dict[str, Path] = {}

    # prompt view: type a prompt, click Analyse
    explorer.locator(".lm-TabBar-tab", has_text="Prompt").click()
    prompt_input = explorer.locator(".ffn-prompt-input input")
    prompt_input.fill(PROMPT)
    explorer.locator("button.ffn-prompt-run").click()
    table = explorer.locator(".ffn-prompt-out .ffn-prompt-table")
    table.wait_for(timeout=60_000)
    page.wait_for_function("() => document.querySelector('.ffn-prompt-out').textContent.includes("
                           f"{json.dumps(PROMPT.split()[-1])})")
    rows = table.locator("tr[data-layer]")
    assert rows.count() == 30  # SmolLM2's layers
    first = explorer.locator(".ffn-prompt-out .ffn-prediction .ffn-tok").first.text_content()
    assert first == expected, (first, expected)
    last_after = rows.nth(29).locator("td").nth(2).locator(".ffn-tok").text_content()
    assert last_after == expected  # the residual after the last FFN is what the model predicts
    assert rows.nth(0).locator("td").nth(3).locator("div").count() == 5  # five memories per layer
    contributors = explorer.locator(".ffn-contributors select option")
    assert contributors.count() == 20
    shots["prompt_view"] = _shot(page, explorer, tmp_path / "prompt_view.png")
    phase("prompt view")

    # interventions: switch off the three top contributors, apply
    explorer.locator(".lm-TabBar-tab", has_text="Interventions").click()
    candidates = explorer.locator(".ffn-candidates select")
    labels = candidates.locator("option").all_text_contents()[:3]
    chosen = [tuple(map(int, re.match(r"L(\d+)\s#(\d+)", label).groups())) for label in labels]
    candidates.select_option(index=[0, 1, 2])
    explorer.locator("button.ffn-add").click()
    edits = ", ".join(f"{layer}:{memory}" for layer, memory in chosen)  # in the list's order
    page.wait_for_function(f"() => document.querySelector('.ffn-edits input').value === {json.dumps(edits)}")
    explorer.locator("button.ffn-apply").click()
    result = explorer.locator(".ffn-edit-out .ffn-intervention")
    result.wait_for(timeout=60_000)
    assert all(f"L{layer} #{memory} off" in result.locator("h3").text_content() for layer, memory in chosen)
    assert result.locator(".ffn-continuations tr").count() == 2
    assert all(PROMPT in t for t in result.locator(".ffn-continuations td.ffn-prefix").all_text_contents())
    assert result.locator(".ffn-changes tr").count() > 10
    shots["interventions"] = _shot(page, explorer, tmp_path / "interventions.png")
    phase("interventions")

    # memory view: search a token its value promotes; the best hit opens
    explorer.locator(".lm-TabBar-tab", has_text="Memory").click()
    explorer.locator(".ffn-query input").fill("Paris")
    explorer.locator("button.ffn-search").click()
    view = explorer.locator(".ffn-memory-out .ffn-memory-view")
    view.wait_for(timeout=60_000)
    assert explorer.locator(".ffn-results select option").count() == 20
    assert view.locator(".ffn-side").count() == 2  # gated: v and -v
    assert view.locator(".ffn-triggers mark").count() == 20  # 10 trigger examples per side, last token marked
    assert view.locator(".ffn-histogram rect.ffn-hist-bar").count() == 40
    assert "Pattern measures" in view.text_content()
    tokens = view.locator(".ffn-side").nth(0).locator(".ffn-top-tokens .ffn-tok").all_text_contents()
    negated = view.locator(".ffn-side").nth(1).locator(".ffn-top-tokens .ffn-tok").all_text_contents()
    assert any("Paris" in t for t in tokens[:10] + negated[:10])
    shots["memory_view"] = _shot(page, explorer, tmp_path / "memory_view.png")
    phase("memory view (search)")
    _follow_the_card(page, explorer, lab, tmp_path, shots)
    phase("memory card and its links")
    assert not errors, errors
    page.close()
    _save(shots, tmp_path)


def _card_memory(results: Path) -> tuple[int, int]:
    """A knowledge neuron (positive side) of notebook 06 in a layer notebook 07 MoEfied: its card has facts and
    expert mates."""
    import pandas as pd

    run = results / "smollm2-135m" / "ci"
    moefied = json.loads((run / "summaries" / "07_moefication.json").read_text())["layers"]
    neurons = pd.read_csv(run / "tables" / "06_neurons.csv")
    neurons = neurons[neurons["layer"].isin(moefied) & (neurons["sign"] == 1)]
    assert len(neurons), "notebook 06 found a knowledge neuron in a layer notebook 07 MoEfied"
    return int(neurons["layer"].iloc[0]), int(neurons["memory"].iloc[0])


def _prompt_analysed(page, explorer, prompt: str) -> None:
    """Wait until the prompt view shows ``prompt``'s analysis (its tokens, whitespace aside)."""
    tail = json.dumps(" ".join(prompt.split())[-24:])
    page.wait_for_function("() => { const v = document.querySelector('.ffn-prompt-out .ffn-prompt-view > p');"
                           f"return v && v.textContent.replace(/\\s+/g, ' ').includes({tail}); }}", timeout=60_000)
    assert explorer.locator(".ffn-prompt-input input").input_value() == prompt
    assert explorer.locator(".ffn-prompt-out .ffn-prompt-table tr[data-layer]").count() == 30


def _open_memory(page, explorer, layer: int, memory: int, how) -> None:
    how()
    page.wait_for_selector(f".ffn-memory-out .ffn-card[data-layer='{layer}'][data-memory='{memory}']",
                           timeout=60_000)


def _follow_the_card(page, explorer, lab, tmp_path, shots):
    """Open a knowledge neuron's card, and follow a link of each kind: expert mate (and back), trigger, fact, a
    memory like this one."""
    layer, memory = _card_memory(lab["results"])
    explorer.locator(".lm-TabBar-tab", has_text="Memory").click()

    def show():
        explorer.locator(".ffn-layer input").fill(str(layer))
        explorer.locator(".ffn-memory input").fill(str(memory))
        explorer.locator(".ffn-memory input").press("Tab")  # the number is sent when the box loses the focus
        explorer.locator("button.ffn-show").click()

    _open_memory(page, explorer, layer, memory, show)
    card = explorer.locator(".ffn-memory-out .ffn-card")
    assert card.locator("section").count() == 3  # a section per paper, under today's memory view
    assert explorer.locator(".ffn-memory-out .ffn-triggers mark").count() == 20
    assert card.locator(".ffn-card-facts tr").count() >= 2 and card.locator(".ffn-card-percentiles tr").count() > 6
    assert card.locator(".ffn-card-suppression tr").count() >= 2  # each neuron suppressed alone (notebook 06)
    assert card.locator(".ffn-card-router tr").count() >= 2  # the trained router's picks of its expert (07)
    page.set_viewport_size({"width": 1400, "height": 1800})  # the whole card, for docs/card.md
    shots["memory_card"] = _shot(page, card, tmp_path / "memory_card.png", max_height=1750)
    page.set_viewport_size({"width": 1400, "height": 1200})
    # an expert mate opens its memory view, whose card links back to this memory
    mate_link = card.locator(".ffn-mates[data-split='kmeans'] a.ffn-link").first
    mate = int(mate_link.text_content().lstrip("#"))
    _open_memory(page, explorer, layer, mate, mate_link.click)
    assert explorer.locator(".ffn-memory-out .ffn-memory-view h3").first.text_content().startswith(
        f"Layer {layer}, memory {mate}")
    back = explorer.locator(".ffn-memory-out .ffn-mates[data-split='kmeans'] a.ffn-link", has_text=f"#{memory}")
    _open_memory(page, explorer, layer, memory, back.first.click)
    # a trigger example opens the prompt view on its prefix
    example = explorer.locator(".ffn-memory-out .ffn-triggers a.ffn-link").first
    text = example.text_content()
    example.click()
    _prompt_analysed(page, explorer, text)
    # a fact opens the prompt view on its prompt
    explorer.locator(".lm-TabBar-tab", has_text="Memory").click()
    fact = explorer.locator(".ffn-memory-out .ffn-fact-prompt a.ffn-link").first
    prompt = fact.text_content()
    fact.click()
    _prompt_analysed(page, explorer, prompt)
    # a memory like this one (by value, then by shared trigger examples) opens its memory view
    explorer.locator(".lm-TabBar-tab", has_text="Memory").click()
    assert explorer.locator(".ffn-memory-out .ffn-similar-list").count() == 2
    like = explorer.locator(".ffn-memory-out .ffn-similar-list[data-by='value'] a.ffn-link").first
    like_layer, like_memory = (int(x) for x in re.match(r"L(\d+) #(\d+)", like.text_content()).groups())
    _open_memory(page, explorer, like_layer, like_memory, like.click)


def _check_the_atlas(browser, lab, tmp_path):
    """The static atlas, from disk, without a kernel."""
    shots: dict[str, Path] = {}
    atlas = lab["results"] / "smollm2-135m" / "ci" / "atlas"
    manifest = json.loads((atlas / "atlas.json").read_text())
    layers = sorted({layer for layer, _ in manifest["memories"]})
    page = browser.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.goto((atlas / "index.html").as_uri())
    assert "Memory atlas" in page.locator("h3").first.text_content()
    assert page.locator(".ffn-atlas-index a").count() == len(layers) == 3  # scale ci: 3 layers spread over the depth
    page.locator(".ffn-atlas-index a").first.click()
    page.wait_for_selector(".ffn-atlas-layer")
    links = page.locator(".ffn-atlas-layer a")
    assert links.count() == sum(layer == layers[0] for layer, _ in manifest["memories"])
    layer0, memory0 = manifest["memories"][0]  # the layer's chosen memory (atlas_per_layer=1) comes first
    assert links.first.text_content() == f"#{memory0}"
    links.first.click()
    page.wait_for_selector(".ffn-memory-view")
    heading = page.locator(".ffn-memory-view h3").first.text_content()
    assert heading.startswith(f"Layer {layer0}, memory {memory0}")
    assert page.locator(".ffn-triggers mark").count() == 40  # 20 trigger examples per side in the atlas
    assert page.locator(".ffn-top-tokens").count() == 2
    shots["atlas_memory"] = tmp_path / "atlas_memory.png"
    page.screenshot(path=shots["atlas_memory"], full_page=True)
    page.locator("a", has_text="next").click()
    page.wait_for_selector(".ffn-memory-view")
    layer1, memory1 = manifest["memories"][1]
    assert page.locator(".ffn-memory-view h3").first.text_content().startswith(f"Layer {layer1}, memory {memory1}")
    # index -> a knowledge neuron's card page -> an expert mate's page -> the index
    page.goto((atlas / "index.html").as_uri())
    neurons = page.locator(".ffn-notable[data-reason='knowledge_neuron'] a")
    assert neurons.count() >= 1 and page.locator(".ffn-notable").count() == 4
    neuron = neurons.first.text_content()  # "L29 #238"
    neurons.first.click()
    page.wait_for_selector(".ffn-card")
    layer, memory = (int(x) for x in re.match(r"L(\d+) #(\d+)", neuron).groups())
    assert page.locator(".ffn-memory-view h3").first.text_content().startswith(f"Layer {layer}, memory {memory}")
    assert page.locator(".ffn-card-facts tr").count() >= 2 and page.locator(".ffn-card section").count() == 3
    mates = page.locator(".ffn-mates a.ffn-link")
    assert mates.count() >= 1  # mates with a page link to it (atlas_mates=1: at least its first k-means mate)
    mate = int(mates.first.text_content().lstrip("#"))
    mates.first.click()
    page.wait_for_selector(".ffn-card")
    assert page.locator(".ffn-memory-view h3").first.text_content().startswith(f"Layer {layer}, memory {mate}")
    page.locator("a", has_text="atlas index").first.click()
    page.wait_for_selector(".ffn-notable")
    assert requested and all(url.startswith("file://") for url in requested), requested  # offline
    page.close()
    _save(shots, tmp_path)
