"""Section 5: how the memories of a layer, and then the layers, make the model's prediction.

The paper ran 4,000 validation prefixes through its model and asked two questions.

**Within a layer (Sec. 5.1).** The FFN output is ``Σ_i m_i v_i``. How many memories are active per
example (Fig. 7), and does the layer's top prediction come from one memory (Fig. 8)? A memory's own
prediction is the top token of its value read as the model reads its residual stream (``v_i`` for a
positive coefficient; ``-v_i`` for a negative one, which only gated FFNs produce in quantity).

**Across layers (Sec. 5.2).** The residual stream carries a prediction from layer to layer. How often
does the residual's top token (before the FFN is added) already equal the model's final prediction
(Fig. 9), how much probability does it give that token (Fig. 10), and when the FFN is added, does the
output keep the residual's token, take the FFN's, or become a third token (Fig. 11)?

Choices, and where they come from:

- **Examples**: held-out sentences of the corpus (document-disjoint from the mining split), one random
  position per sentence, as the authors' code did. The position is never a BOS token and always has a
  next token (``position`` in ``len(bos) .. len(ids) - 2``), so every example has a target
  (``next_token``). The position is drawn from ``numpy.random.default_rng([seed, sentence_id])``, so a
  smaller run is a subset of a larger one. The model reads only the prefix ``ids[:position + 1]``
  (causal attention makes this identical to reading the whole sentence).
- **Projection**: residual vectors (before the FFN, after it) go through the model's full final norm
  and head (``Adapter.logits_from_residual``), as the model does at its end. The FFN output's own top
  prediction uses the same function on the FFN output. With an RMSNorm the norm's scale is one
  positive number per vector, so the top token equals that of ``head(g ⊙ ffn_output)``, the value-style
  projection; the paper's model had no final norm, so for it all readings coincide.
- **Active memories** (``active_rule``): ``"relative"`` counts memory ``i`` as active when
  ``|m_i| > active_threshold · max_j |m_j|`` (default for gated FFNs, whose coefficients are rarely
  exactly zero); ``"positive"`` when ``m_i > 0`` (the paper's rule, default for ReLU FFNs). Both counts
  are stored for every example (``n_relative``, ``n_positive``); ``n_active`` is the chosen rule.
- **90%-norm number** (``n_norm``): rank the sub-updates ``m_i v_i`` by their size ``|m_i|·||v_i||``;
  ``n_norm`` is the smallest ``k`` such that the ``k`` largest sizes add up to at least
  ``norm_share`` (0.9) of the sum of all sizes. This is cheap (no partial sums of vectors) and an
  upper bound on how concentrated the update is: cancellation between sub-updates is ignored.
- **Zero agreement**: the layer's top prediction differs from the prediction of every active memory.
  The layer's prediction is taken two ways: the FFN output's projection (``agree_ffn``; the paper's
  text) and the layer output, residual + FFN (``agree_output``; the authors' code). The columns hold
  how many active memories agree (0 = zero agreement); ``agree_*_positive`` the same with the paper's
  rule (memories with ``m_i > 0``), whatever ``active_rule`` is.
- **Stop words / short prefixes**: among (example, layer) pairs where at least one active memory
  agrees, the share whose *target* (the layer's top prediction token, decoded, stripped, lowercased) is
  a spaCy English stop word, and the share whose prefix is shorter than 5 tokens (BOS not counted).
  The paper's model had a word-level vocabulary; our tokens are sub-words, so "5 tokens" is shorter.
- **Cases of Fig. 11** (:func:`classify`): ``residual`` (output top = residual top ≠ FFN top),
  ``ffn`` (output top = FFN top ≠ residual top), ``agreement`` (all three equal), ``composition``
  (output top is neither).

In this package, ``_analyse`` computes the per-example table and ``_measures`` reads the findings from it.

Everything for a batch comes from one forward pass (hooks on all layers; the forward stops after the
last layer, since the model's final logits are ``logits_from_residual(residual_after[last])``). All
vocabulary projections of a batch go through the head as one stacked tensor (in chunks of bounded
memory). Each batch's rows are written atomically to ``out_dir`` so that an interrupted run resumes;
the finished table is saved with a manifest and reused when the same request comes again.
"""

from ._analyse import (ACTIVE_RULES, AggregationResult, active_mask, agreeing_memories, aggregation_request,
                       analyse_aggregation, analyse_batch, check_examples, check_settings, classify,
                       load_cached_aggregation, memory_counts, memory_predictions, memory_top_tokens, project_tops,
                       resolve_examples, sample_examples, stop_word_flags)
from ._measures import (AGAINST, CASES, SHORT_PREFIX, agreement_breakdown, composition_examples, curves, layer_summary,
                        paper_curves, section5_measures, side_by_side)

__all__ = ["ACTIVE_RULES", "CASES", "AGAINST", "SHORT_PREFIX", "classify", "memory_counts", "active_mask",
           "memory_predictions", "agreeing_memories", "sample_examples", "memory_top_tokens", "stop_word_flags",
           "project_tops", "analyse_batch", "AggregationResult", "check_examples", "resolve_examples", "check_settings",
           "aggregation_request", "load_cached_aggregation", "analyse_aggregation", "layer_summary",
           "agreement_breakdown", "composition_examples", "paper_curves", "section5_measures", "curves", "side_by_side"]
