"""The memory card: everything the suite found about one memory (k_i, v_i), on one page.

Each analysis looks at the same memory from one side: notebook 01 at its key's trigger examples, 02 at its
value's tokens, 03 at how it takes part in the layer's prediction, 06 at the facts it helps recall, 07 at the
expert it is grouped into, 10 at how its trigger set moves with the corpus. :func:`memory_card` joins them,
reading what the suite has already computed and cached in a results folder (``results_dir/<model>/<scale>``,
and the random-weights control's under ``results_dir/controls/``): it recomputes nothing that is cached, and
for every section it cannot fill it says what is missing and which notebook computes it (``card.missing``).
Each number with a counterpart for every memory of the layer is placed among the layer's memories and among the
control's (``card.percentiles``).

Usage::

    from ffnlib.models import load_model
    from ffnlib.card import memory_card, open_results

    loaded = load_model("smollm2-135m")
    card = memory_card(loaded, 20, 1066, results="results", scale="ci")
    card.triggers, card.value_tokens, card.missing
    card.to_dict()                                         # JSON-able

    run = open_results(loaded, "results", scale="ci")      # many cards: each file is read once
    cards = [memory_card(loaded, 20, m, results=run) for m in range(5)]

Every memory of a layer at once, to rank memories (the atlas's index): :func:`layer_agreement` (02),
:func:`layer_survival` (10), :func:`knowledge_neurons` (06).

The card sits above the analyses (``keys``, ``values``, ``aggregation``, ``related``) and below the widgets:
it reads the analyses through their public functions and the files they persist.
"""

from ._aggregation import PER_MEMORY_ANALYSIS, PER_MEMORY_COLUMNS
from ._card import MemoryCard, jsonable, memory_card
from ._corpus import layer_survival, survival
from ._folder import RunResults, open_results
from ._keys import PATTERN_TOP
from ._knowledge import knowledge_neurons
from ._part import FIELD_NOTEBOOKS, needs
from ._percentiles import PERCENTILE_COLUMNS, Measure, percentile, percentile_table
from ._values import layer_agreement

__all__ = ["MemoryCard", "memory_card", "RunResults", "open_results", "FIELD_NOTEBOOKS", "needs", "Measure",
           "percentile", "percentile_table", "PERCENTILE_COLUMNS", "survival", "jsonable", "PER_MEMORY_ANALYSIS",
           "PER_MEMORY_COLUMNS", "layer_agreement", "layer_survival", "knowledge_neurons", "PATTERN_TOP"]
