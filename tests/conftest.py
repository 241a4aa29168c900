import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest-xdist) on CI's two cores: one torch thread each, inherited by the
    # notebooks' kernels (two threads per process on two busy cores made every test several times slower)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M, dequantized GGUF), loaded once per test session."""
    from ffnlib.models import load_model

    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def wiki():
    """The whole embedded sentence table."""
    from ffnlib.corpus import wiki_sentences

    return wiki_sentences()


# the test files marked xdist_group("ci-results")
CI_RESULTS_GROUP = ("tests/test_browser.py", "tests/test_card.py", "tests/test_card_views.py", "tests/test_notebooks.py",
                    "tests/test_site.py")


@pytest.hookimpl(optionalhook=True)  # an xdist hook: pytest without xdist (or -p no:xdist) never calls it
def pytest_xdist_node_collection_finished(node, ids):
    """`make test` runs with ``--dist loadgroup`` so that tests/test_browser.py, test_notebooks.py and test_site.py
    share one worker and one ci-results folder, and the ci-scale notebooks run once. pytest-xdist marks a grouped
    test by appending ``@<group>`` to its node id; under pytest 9.2 that no longer takes effect (pytest-xdist#1386):
    the groups were silently split and every notebook ran two or three times. Refuse to run split groups."""
    shared = [i for i in ids if i.partition("::")[0] in CI_RESULTS_GROUP]
    workers = node.config.getoption("numprocesses", None)
    if isinstance(workers, int) and workers < 2:  # one worker: nothing can be split
        return
    if node.config.getvalue("dist") == "loadgroup" and any("@" not in i.rpartition("]")[2] for i in shared):
        raise pytest.UsageError(
            "pytest-xdist's --dist loadgroup is not grouping the tests marked xdist_group: this pytest drops xdist's "
            "group suffix (pytest-xdist#1386). Install the pinned test dependencies: pip install -e '.[test]'")


# read the ci-scale results that an earlier file of the group computes
AFTER_CI_RESULTS = {"tests/test_card.py": "tests/test_notebooks.py",
                    "tests/test_card_views.py": "tests/test_notebooks.py",
                    "tests/test_browser.py": "tests/test_notebooks.py"}


def pytest_collection_modifyitems(config, items):
    """tests/test_card.py, test_card_views.py and test_browser.py read the ci-scale results folder that
    tests/test_notebooks.py fills (same xdist group, same worker): run their tests right after that file's, not before
    it (by name), so the notebooks run once and the cards they show are filled."""
    for reader, writer in AFTER_CI_RESULTS.items():
        moved = [item for item in items if item.nodeid.startswith(f"{reader}::")]
        rest = [item for item in items if not item.nodeid.startswith(f"{reader}::")]
        last = max((i for i, item in enumerate(rest) if item.nodeid.startswith(f"{writer}::")), default=None)
        if moved and last is not None:
            items[:] = rest[: last + 1] + moved + rest[last + 1:]
