import os

import matplotlib
import pytest

matplotlib.use("Agg")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
