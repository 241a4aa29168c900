"""The ci-scale results folder the ``ci-results`` test group shares (tests/conftest.py orders the group so that
tests/test_notebooks.py fills it first, in the same worker): ``<basetemp>/ci-results``, or ``$FFNLIB_TEST_RESULTS``
to reuse the results of an earlier run."""

from __future__ import annotations

import os
from pathlib import Path


def ci_results_dir(tmp_path_factory, notebooks=()) -> Path:
    """The shared results folder; each of ``notebooks`` whose summary is not there yet is executed at scale ci
    (its executed copy in ``<folder>/executed/``), as tests/test_notebooks.py runs it."""
    from ffnlib.suite import NOTEBOOK_DIR, execute

    results = Path(os.environ.get("FFNLIB_TEST_RESULTS") or tmp_path_factory.getbasetemp() / "ci-results")
    results.mkdir(parents=True, exist_ok=True)
    summaries = results / "smollm2-135m" / "ci" / "summaries"
    for name in notebooks:
        executed = results / "executed" / f"{name}.ipynb"
        if not (summaries / f"{name}.json").exists() or not executed.exists():
            executed.parent.mkdir(parents=True, exist_ok=True)
            execute(NOTEBOOK_DIR / f"{name}.ipynb", executed, {"scale": "ci", "results_dir": str(results), "seed": 0})
    return results
