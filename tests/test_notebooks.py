"""Every notebook, executed by papermill with small parameters (scale="ci"), in suite order, into the results
folder that tests/test_browser.py and tests/test_site.py reuse."""

from pathlib import Path

import nbformat
import pytest

from ffnlib.suite import NOTEBOOK_DIR, execute

# one pytest-xdist worker runs this file, tests/test_browser.py and tests/test_site.py (`make test` uses
# --dist loadgroup): they share one ci-scale results folder, so the notebooks run once. The suite runner's other
# tests are in tests/test_suite.py, free to run on another worker.
pytestmark = pytest.mark.xdist_group("ci-results")

NOTEBOOKS = sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb"))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Shared with tests/test_browser.py (one test session mines the ci-scale triggers once) and
    tests/test_site.py (which builds the course site from the notebooks executed here)."""
    folder = tmp_path_factory.getbasetemp() / "ci-results"
    folder.mkdir(exist_ok=True)
    return folder


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", "") or str(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_at_ci_scale(name, results):
    out = results / "executed" / name  # kept: tests/test_site.py builds the course site from them
    out.parent.mkdir(exist_ok=True)
    execute(NOTEBOOK_DIR / name, out, {"scale": "ci", "results_dir": str(results), "seed": 0})
    nb = nbformat.read(out, as_version=4)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert (results / "smollm2-135m" / "ci" / "summaries" / f"{Path(name).stem}.json").exists() \
        or name.startswith("05"), "each suite notebook saves the numbers it reports"
