"""Section 4: values represent distributions over the output vocabulary.

A value v_i, read as the model reads its residual stream at the end, is the distribution
``p_i = softmax(head(g ⊙ v_i))`` (g: the final norm's gain; see ``Adapter.logits_from_values``).
For gated FFNs a negative coefficient writes ``-v_i``, so the negative side is projected too.

**Projection** (:func:`project_values`). Every value of every layer goes through the model's own head,
in chunks of rows whose working memory (the chunk's logits plus one work buffer of the same size) stays
under ``memory_limit_mb``: Gemma 3's 262,144-token vocabulary times 2,048 values is 2 GiB per layer and
is never held at once. Per value (and sign) we keep the top-k tokens with their probabilities
(``torch.softmax`` of the value's logits, bit for bit), the maximal probability, and optionally, in the same
pass, the rank of one given target token (rank 0 = the top token; the rank is the number of tokens with a
strictly larger logit). Each finished layer is checkpointed atomically, so a killed run resumes; the
finished result is cached by its manifest.
For a gated model the ``-v_i`` logits are the exact negation of the ``v_i`` logits (the head is linear
without bias), so both sides come from one matrix product.

**Agreement** (:func:`value_agreement`, Fig. 4). A memory *agrees* when its value's top token equals
the token that follows the prefix of its key's top-1 trigger example (``next_token`` of the trigger with
``rank == 0``: the token at ``position + 1``, the authors' corrected offset). The negative side
(``sign=-1``: ``-v_i`` against the most negative coefficients' triggers) is kept apart.

- A trigger whose prefix is the whole sentence has no next token (``next_token == -1``). With
  ``end_of_sentence="disagree"`` (default, as the authors' code, which used ``<s>`` as the target, which a
  value's top token practically never is) such a memory stays in the denominator and counts as not agreeing; with ``"exclude"``
  it is left out of the rate (and its end-of-sentence triggers out of the top-50 shares).
- Memories without any trigger example are left out (they are counted in ``with_trigger``).
- Baselines: the random one, ``1/|V|``; and an empirical one that pairs each value with *another* key's
  triggers of the same layer and sign (a seeded random derangement of the memories): the same measures
  computed on the partner's triggers say how often a value's top token follows an unrelated prefix (frequent
  tokens such as "," or " the" do so often; 1/|V| ignores that).
- Also per memory: how many of the key's top-``n_triggers`` triggers are followed by the value's top token
  (the authors' code counted the same for Table 2 / "46 of the top 100").

**Confidence** (:func:`agreement_by_confidence`, :func:`confident_values`; Fig. 6, Table 2): agreement as a
function of the value's maximal probability, and the most confident values.

**The measures** (:func:`section4_measures`): each finding's number with its 95% interval (a seeded bootstrap
over memories), layers matched by relative depth; ``ffnlib.findings`` judges them against the same measures
on a random-weights control.

The probabilities are those of ``head(g ⊙ v_i)``: the norm's 1/RMS scale is left out, as the paper's
model (no final norm) had no such scale. Rankings and top tokens do not depend on it.
"""

from ._agreement import (BINNINGS, END_OF_SENTENCE, PAPER_UPPER_FROM, agreement_by_confidence, agreement_by_depth,
                         agreement_by_layer, check_next_tokens, confident_examples, confident_summary, confident_values,
                         derangement, value_agreement)
from ._measures import section4_measures
from ._projection import (KEYS, ValueProjection, cached_projection_tops, project_values, projection_chunk_rows,
                          ranks_in_rows, target_ranks, top_trigger_targets, value_logits, value_top_tokens)

__all__ = ["KEYS", "END_OF_SENTENCE", "BINNINGS", "PAPER_UPPER_FROM", "value_logits", "value_top_tokens",
           "ValueProjection", "projection_chunk_rows", "top_trigger_targets", "project_values",
           "cached_projection_tops", "target_ranks", "check_next_tokens", "value_agreement", "agreement_by_layer",
           "agreement_by_depth", "agreement_by_confidence", "confident_values", "confident_summary",
           "confident_examples", "section4_measures", "ranks_in_rows", "derangement"]
