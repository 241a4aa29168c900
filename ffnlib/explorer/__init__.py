"""The memory explorer's analyses: what a memory stores, what a prompt uses, what an edit changes.

Three views, each a plain function returning a dataclass (the widgets in ``ffnlib.widgets.explorer``
and the static atlas in ``ffnlib.widgets.atlas`` only render them, with ``ffnlib.widgets.render``):

- **Memory view** (:func:`memory_view`): one memory ``(layer, i)``: its top trigger examples (mined by
  ``ffnlib.keys.mine_trigger_examples``) with the prefix's last token marked, the top tokens of its value
  ``v_i`` (and of ``-v_i`` for gated FFNs, whose coefficients can be negative), its coefficient over a
  corpus sample (:class:`CoefficientSample`) and the Section 3 pattern measures of its triggers.
- **Prompt view** (:func:`analyse_prompt`): for each layer, the memories that contribute most to the
  next-token prediction at the prompt's last position, ranked by ``|m_i|·||v_i||`` as LM-Debugger ranks
  sub-updates, each with the top tokens of ``v_i`` (or ``-v_i`` when ``m_i < 0``), and the residual's top
  prediction before and after the FFN (``Adapter.logits_from_residual``).
- **Attribution** (:func:`attribute_prediction`, the prompt view's "attribute" action): the memories with the
  largest knowledge-neuron attribution (integrated gradients, Dai et al. 2022, through
  ``ffnlib.related.knowledge_neurons.knowledge_attribution``) for the model's prediction at the prompt's last
  position, each with the top tokens of its value.
- **Interventions** (:func:`compare_intervention`): the next-token distribution and a short greedy
  continuation with and without edits made by ``ffnlib.interventions.intervene``.
- **Contributions** (:func:`contribution_maps`): for the prompt and one layer, the four maps of Kobayashi et al.
  (ICLR 2024; ``ffnlib.related.contextualization``): how much each input token contributes to each position after
  attention (ATB), through the FFN (ATBFF), after the FFN's residual (ATBFFRES) and through the next norm
  (ATBFFRESLN), each row normalised to sum to 1.

With a run's results folder, the memory view also shows the memory's card (``ffnlib.card.memory_card``: what
every notebook found about it). :func:`notable_memories` ranks the memories the static atlas lists by what they are
notable for (top value agreement, knowledge neurons, most active, least stable across corpus sizes).

Search (:func:`search_value_token`, :func:`search_trigger_word`) jumps to memories whose value promotes
a token, or whose trigger examples contain a word. "Memories like this one" (:func:`similar_by_value`,
:func:`similar_by_triggers`) lists the memories of the model, across all layers, nearest to one memory: by the
correlation of their values' logits over the vocabulary, or by the trigger examples their keys share, each with the
similarity of random pairs of memories as a base rate. :class:`Explorer` holds the state the widgets show.
"""

from ._common import top_tokens, value_norms
from ._contributions import ContributionMaps, contribution_maps
from ._interventions import InterventionComparison, compare_intervention, format_edits, greedy_continuation, parse_edits
from ._memory import MemorySide, MemoryView, key_rows, layer_key_measures, memory_view, pattern_measures
from ._notable import NOTABLE, NOTABLE_COLUMNS, Notable, notable_memories
from ._prompt import PromptAnalysis, PromptAttribution, analyse_prompt, attribute_prediction
from ._sample import CoefficientSample
from ._search import SEARCH_BY, ValueIndex, search_trigger_word, search_value_token
from ._similar import SIMILAR_BY, SimilarMemories, TriggerSets, similar_by_triggers, similar_by_value
from ._state import Explorer

__all__ = ["Explorer", "PromptAnalysis", "PromptAttribution", "ContributionMaps", "InterventionComparison",
           "MemoryView", "MemorySide", "CoefficientSample", "ValueIndex", "analyse_prompt", "attribute_prediction",
           "contribution_maps", "compare_intervention", "memory_view", "key_rows", "value_norms",
           "parse_edits", "format_edits", "greedy_continuation", "search_value_token", "search_trigger_word",
           "top_tokens", "pattern_measures", "layer_key_measures", "SEARCH_BY", "NOTABLE", "NOTABLE_COLUMNS", "Notable",
           "notable_memories", "SIMILAR_BY", "SimilarMemories", "TriggerSets", "similar_by_value",
           "similar_by_triggers"]
