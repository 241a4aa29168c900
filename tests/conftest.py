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
