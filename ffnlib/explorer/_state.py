"""The explorer's state: what its widgets show, and the actions they call, as plain methods."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

import pandas as pd

from ..card import MemoryCard, memory_card, open_results
from ..errors import ParameterError
from ._common import check_memory, top_tokens
from ._contributions import ContributionMaps, contribution_maps
from ._interventions import InterventionComparison, compare_intervention, parse_edits
from ._memory import MemoryView, memory_view
from ._prompt import PromptAnalysis, PromptAttribution, analyse_prompt, attribute_prediction
from ._sample import CoefficientSample
from ._search import SEARCH_BY, ValueIndex, search_trigger_word, search_value_token, trigger_sentence_index
from ._similar import SIMILAR_BY, SimilarMemories, TriggerSets, similar_by_triggers, similar_by_value

__all__ = ["Explorer"]


@dataclass
class Explorer:
    """What the explorer widgets show, and the actions they call, as plain methods (tested without a browser).

    ``triggers``: a ``TriggerExamples`` (``None`` disables trigger examples and the trigger search);
    ``sample``: a :class:`CoefficientSample` for the histogram (``None`` leaves it out); ``card_results``: the run's
    results folder (or an open ``ffnlib.card.RunResults``) whose memory card (``ffnlib.card.memory_card``, with the
    run's ``seed``) the memory view shows under the memory (``None`` leaves it out); ``n_similar``: how many
    memories like the shown one (:meth:`like_this`, by value and by triggers) it lists (0 leaves them out).
    """

    loaded: object
    triggers: object = None
    sample: CoefficientSample | None = None
    n_triggers: int = 10
    k_tokens: int = 10
    top_memories: int = 5
    max_new_tokens: int = 10
    layer: int = 0
    memory: int = 0
    view: MemoryView | None = None
    results: pd.DataFrame | None = None
    analysis: PromptAnalysis | None = None
    attribution: PromptAttribution | None = None
    top_attributed: int = 10
    steps: int = 20
    comparison: InterventionComparison | None = None
    contributions_view: ContributionMaps | None = None
    edits: dict = field(default_factory=dict)
    card_results: object = None
    seed: int = 0
    card: MemoryCard | None = None
    n_similar: int = 5
    similar: dict = field(default_factory=dict)  # "value" / "triggers" -> SimilarMemories of the shown memory
    _index: dict | None = field(default=None, repr=False)
    _values: ValueIndex | None = field(default=None, repr=False)
    _trigger_sets: TriggerSets | None = field(default=None, repr=False)

    @property
    def adapter(self):
        return self.loaded.adapter

    @property
    def sentence_index(self) -> dict | None:
        if self._index is None and self.triggers is not None:
            self._index = trigger_sentence_index(self.triggers)
        return self._index

    # memory view
    def show_memory(self, layer: int, memory: int) -> MemoryView:
        self.view = memory_view(self.loaded, self.triggers, layer, memory, self.n_triggers, self.k_tokens,
                                self.sample)
        self.layer, self.memory = self.view.layer, self.view.memory
        self.similar = {}
        if self.n_similar:
            self.similar["value"] = self.like_this("value")
            if self.triggers is not None and (self.layer, self.memory, 1) in self.trigger_sets:
                self.similar["triggers"] = self.like_this("triggers")
        if self.card_results is not None:
            # opened once: each file is read once, and a layer's triggers are taken from ours
            self.card_results = open_results(self.loaded, self.card_results, triggers=self.triggers)
            if self.card is not None and self.card.layer != self.layer:
                self.card_results.forget_layer(self.card.layer)  # one layer's rows in memory at a time
            self.card = memory_card(self.loaded, self.layer, self.memory, results=self.card_results, seed=self.seed)
        return self.view

    @property
    def value_index(self) -> ValueIndex:
        if self._values is None:
            self._values = ValueIndex(self.loaded)
        return self._values

    @property
    def trigger_sets(self) -> TriggerSets:
        if self._trigger_sets is None:
            self._trigger_sets = TriggerSets(self.triggers)
        return self._trigger_sets

    def like_this(self, by: str = "value", layer: int | None = None, memory: int | None = None, sign: int = 1,
                  limit: int | None = None) -> SimilarMemories:
        """The memories most like one (default: the shown one), by its value's distribution over the vocabulary
        (``by="value"``, :func:`similar_by_value`) or by shared trigger examples (``"triggers"``,
        :func:`similar_by_triggers`)."""
        if by not in SIMILAR_BY:
            raise ParameterError(f"Find similar memories by one of {SIMILAR_BY}, got {by!r}.")
        layer, memory = self.layer if layer is None else layer, self.memory if memory is None else memory
        limit = self.n_similar if limit is None else limit
        if by == "value":
            return similar_by_value(self.loaded, layer, memory, sign, limit=limit, index=self.value_index,
                                    seed=self.seed)
        return similar_by_triggers(self.loaded, self.triggers, layer, memory, sign, limit=limit,
                                   index=self.trigger_sets, seed=self.seed)

    def search(self, query: str, by: str = "value token", limit: int = 20) -> pd.DataFrame:
        if by not in SEARCH_BY:
            raise ParameterError(f"Search by one of {SEARCH_BY}, got {by!r}.")
        if by == "value token":
            self.results = search_value_token(self.loaded, query, limit=limit, index=self.value_index)
        else:
            self.results = search_trigger_word(self.loaded, self.triggers, query, limit=limit,
                                               index=self.sentence_index)
        return self.results

    # prompt view
    def analyse(self, prompt: str) -> PromptAnalysis:
        self.analysis = analyse_prompt(self.loaded, prompt, top_memories=self.top_memories)
        return self.analysis

    def attribute(self, prompt: str) -> PromptAttribution:
        """The prompt view's "attribute" action (see :func:`attribute_prediction`)."""
        self.attribution = attribute_prediction(self.loaded, prompt, top=self.top_attributed, steps=self.steps)
        return self.attribution

    def contributions(self, prompt: str, layer: int) -> ContributionMaps:
        self.contributions_view = contribution_maps(self.loaded, prompt, layer)
        return self.contributions_view

    # interventions
    def set_edits(self, edits: Mapping[tuple[int, int], float] | str) -> dict:
        edits = parse_edits(edits) if isinstance(edits, str) else dict(edits)
        for layer, memory in edits:
            check_memory(self.adapter, layer, memory)
        self.edits = {(self.adapter.check_layer(layer), memory): float(v) for (layer, memory), v in edits.items()}
        return self.edits

    def add_edits(self, memories: Iterable[tuple[int, int]], value: float = 0.0) -> dict:
        edits = dict(self.edits)
        for layer, memory in memories:
            edits[(int(layer), int(memory))] = float(value)
        return self.set_edits(edits)

    def apply(self, prompt: str) -> InterventionComparison:
        """Compare the prompt without and with the edits; the top token of each edited memory's ``v_i`` (and
        ``-v_i`` for gated FFNs) is always listed in ``changes``, so its direct effect shows."""
        track = []
        for layer, memory in list(self.edits)[:20]:
            for table in top_tokens(self.loaded, layer, [memory] * (2 if self.adapter.gated else 1),
                                    [1, -1] if self.adapter.gated else [1], k=1):
                track.append(int(table["token_id"].iloc[0]))
        self.comparison = compare_intervention(self.loaded, prompt, self.edits, max_new_tokens=self.max_new_tokens,
                                               track=track)
        return self.comparison
