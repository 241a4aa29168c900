"""Knowledge neurons (Dai et al., ACL 2022) in the key-value view of Geva et al.

Dai et al. look for the few FFN neurons that express a relational fact ("The capital of France is" ->
Paris). In Geva et al.'s terms a neuron is a **memory**: its activation is the coefficient ``m_i`` (the input
of the FFN's ``down`` module at the last prompt position), and its value ``v_i`` is what the memory writes.

**The attribution** is :func:`knowledge_attribution`: integrated gradients of the answer's probability with
respect to the coefficients of one layer at the last prompt position, from a zero baseline (Dai's choice),
for every memory of every layer. ``implementation="captum"`` runs captum's ``IntegratedGradients`` naively (a
forward pass of the whole prompt per step); ``"fast"`` (default) gives the same numbers: a change at the
last position of layer l cannot change earlier positions, so the prompt's keys and values are cached once
and, per layer, only the last position runs again, from layer l upward, with the m steps as one batch.

Choices (each a parameter; defaults follow the authors' code, Hunter-DDM/knowledge-neurons):

- target: the probability of the answer's first token (with its leading space), ``"first_token"``; or the
  whole answer's log-probability, ``"answer_logprob"``;
- m = 20 steps, a left Riemann sum (``alpha = 0, 1/m, ..., (m-1)/m``, as their ``scaled_input``);
- coarse neurons of a prompt: attribution >= t x the prompt's maximum, t = 0.2;
- refining over a fact's prompts (one per template): keep the neurons found in at least
  ``max(p x prompts, 3)`` of them; p starts at 0.7 and moves by 0.05 (up to 6 tries per relation) until a
  relation's facts have 2-5 neurons on average;
- **sign**. Our FFNs are gated: ``m_i = act(gate_i.x)(up_i.x)`` can be negative (the memory then writes
  ``-v_i``). The positive side (``sign=+1``: memories with ``m_i > 0`` and a positive attribution) is Dai's
  and the default; the negative side (``m_i < 0``, positive attribution: writing ``-v_i`` helps the answer)
  is found and reported separately;
- fact update: lambda1 = 1, lambda2 = 8 (swept by :func:`lambda2_sweep`); a success needs the new answer on
  top **and** held-out perplexity within ``max_perplexity_ratio`` = 1.5 x the unedited model's (ours, not
  theirs: :func:`edit_success`; Dai's rank-only count is kept as ``success_unbounded``).

The experiments return DataFrames; every model change is undone on exit (hooks removed, weights restored bit for
bit). :func:`measures` turns them into the notebook's findings, against controls.

Each concept is a private module whose functions have public names; import them from here
(``from ffnlib.related import knowledge_neurons as kn; kn.<name>``). In the order the notebook uses them:

- ``_facts``: facts from ``countryinfo`` (offline) or BIG-bench qa_wikidata; ``_prompts``: our PARAREL-style
  templates (``data/knowledge_neurons/templates.json``) and the prompts built from them;
- ``_evaluation``: running prompts (answer probability and rank, optionally with coefficients scaled at the last
  position), accuracy per relation, the facts the model knows, the held-out sentences (their perplexity:
  ``ffnlib.evaluate``, the library's one held-out evaluation);
- ``_integrated_gradients``: the captum path and the fast path; ``_attribution``: one prompt's attribution and
  many prompts', cached and checkpointed;
- ``_neurons``: coarse neurons, the refining rule, relation neurons, random controls;
- ``_experiments``: suppress/amplify, specificity, same-answer effect, erasing; ``_editing``: fact updates and the
  lambda2 sweep; ``_views``: values, trigger examples and layers in the key-value view;
- ``_scales``: sizes per scale; ``_summary``: the findings' measures, per-group means and curves.
"""

from ._attribution import (IMPLEMENTATIONS, KEEP_RATIO, Attribution, Attributions, attribute_prompts,
                           knowledge_attribution, score_rows)
from ._editing import (MAX_PERPLEXITY_RATIO, edit_facts, edit_success, edited_values, lambda2_sweep, sweep_table,
                       update_vectors)
from ._evaluation import (accuracy_by_relation, answer_probabilities, evaluate_prompts, heldout_token_lists,
                          select_facts)
from ._experiments import erase_relations, same_answer_effect, specificity, suppress_amplify, suppress_each
from ._facts import (BIGBENCH_VERSION, FACT_SOURCES, countryinfo_facts, load_facts, sample_facts, wikidata_facts,
                     wikidata_facts_from_task)
from ._integrated_gradients import (METHODS, TARGETS, captum_integrated_gradients, fast_integrated_gradients,
                                    integration_points)
from ._neurons import coarse_neurons, find_knowledge_neurons, neurons_per_fact, random_like, refine, relation_neurons
from ._prompts import ANSWER, SUBJECT, TEMPLATES_PATH, build_prompts, check_template, encode_answer, load_templates
from ._scales import KN_SCALES, KNScale, kn_scale
from ._summary import binomial_interval, curves, measures, summarise
from ._views import cached_trigger_examples, layer_view, trigger_view, value_view

__all__ = [
    # facts, templates and prompts
    "FACT_SOURCES", "BIGBENCH_VERSION", "countryinfo_facts", "wikidata_facts_from_task", "wikidata_facts",
    "load_facts", "sample_facts", "TEMPLATES_PATH", "SUBJECT", "ANSWER", "check_template", "load_templates",
    "encode_answer", "build_prompts",
    # running prompts
    "answer_probabilities", "evaluate_prompts", "accuracy_by_relation", "select_facts", "heldout_token_lists",
    # the attribution
    "TARGETS", "METHODS", "IMPLEMENTATIONS", "KEEP_RATIO", "integration_points", "captum_integrated_gradients",
    "fast_integrated_gradients", "Attribution", "knowledge_attribution", "Attributions", "score_rows",
    "attribute_prompts",
    # neurons
    "coarse_neurons", "refine", "find_knowledge_neurons", "neurons_per_fact", "relation_neurons", "random_like",
    # experiments, editing, views
    "suppress_amplify", "suppress_each", "specificity", "same_answer_effect", "erase_relations", "edited_values",
    "update_vectors",
    "MAX_PERPLEXITY_RATIO", "edit_success", "edit_facts", "lambda2_sweep", "sweep_table", "value_view",
    "cached_trigger_examples", "trigger_view", "layer_view",
    # scales and the report's numbers
    "KNScale", "KN_SCALES", "kn_scale", "summarise", "binomial_interval", "measures", "curves",
]
