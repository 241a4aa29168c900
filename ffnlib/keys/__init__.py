"""Section 3: keys capture input patterns.

A memory's *trigger examples* are the corpus prefixes that make its coefficient largest. The coefficient
of memory i for a prefix is m_i at the prefix's last token (for gated FFNs ``act(gate_i·x)·(up_i·x)``,
which can be negative: the most negative coefficients make the memory write ``-v_i``).

- :func:`mine_trigger_examples` streams a sentence corpus through the model and keeps, for every layer
  and memory, the top-k prefixes (and for gated models the k most negative). As in the authors' code a
  sentence gives at most one prefix per key (the position of its maximum); ``per_sentence="all"`` keeps
  every position. Memory use is bounded by layers x d_ff x k whatever the corpus size: each batch is
  reduced inside the forward pass, layer by layer, and merged into a running top-k state. The engine
  (the state and its exact merge, the miner, batches, checkpoints) is :mod:`ffnlib.mining`; this package
  holds what Section 3 asks of it. Runs checkpoint and resume; results are cached by manifest
  (:func:`trigger_request` names the result, for this process and for the Dask path alike).
- :func:`trigger_table` / :func:`trigger_html`: one key's trigger examples, readable.
- :func:`removal_experiment` (Fig. 3): remove the first, the last or a random token of each trigger
  prefix and measure the change of that key's coefficient.
- :func:`layer_pattern_measures` (Fig. 2 analogue, automatic): shallow patterns (triggers sharing
  their last token / bigram) and semantic patterns (topic concentration), against random keys.
- :func:`summarise_annotations`: human annotations (written with ``ffnlib.widgets.annotation``).
"""

from ..batching import plan_batches
from ..mining import TopKState, corpus_fingerprint, merge, prepare_sentences, read_coefficients
from ._annotations import ANNOTATION_COLUMNS, PATTERN_KINDS, covered_ranks, read_annotations, summarise_annotations
from ._examples import TRIGGER_COLUMNS, TriggerExamples, trigger_html, trigger_table
from ._measures import section3_measures
from ._mine import mine_trigger_examples
from ._patterns import (key_measures, key_pattern_measures, key_pattern_table, layer_pattern_measures, pattern_trend,
                        random_triggers, with_tokens)
from ._removal import REMOVAL_VARIANTS, random_removals, removal_experiment, removal_plan, removal_summary
from ._request import (MINING_PLAN, RESULT_VERSION, SNAPSHOT_FLOOR, TriggerRequest, auto_snapshot_floor,
                       check_snapshot_floor, prefix_order, snapshot_request, trigger_request)
from ._snapshots import (keep_snapshot, load_cached_triggers, load_snapshot_state, load_trigger_examples,
                         save_snapshot_state, save_trigger_examples, snapshot_sizes, state_frame,
                         trigger_examples_from_state, trigger_snapshot)

__all__ = ["TopKState", "merge", "TriggerExamples", "mine_trigger_examples", "load_trigger_examples",
           "load_cached_triggers", "save_snapshot_state", "load_snapshot_state",
           "prepare_sentences", "corpus_fingerprint", "plan_batches", "trigger_table", "trigger_html",
           "read_coefficients", "removal_experiment", "removal_summary", "key_measures", "key_pattern_measures",
           "random_triggers", "layer_pattern_measures", "key_pattern_table", "pattern_trend", "section3_measures",
           "trigger_request", "trigger_examples_from_state", "save_trigger_examples", "read_annotations",
           "summarise_annotations", "covered_ranks", "ANNOTATION_COLUMNS", "PATTERN_KINDS",
           # also part of the package's surface (used by ffnlib.distributed, notebooks, tests and benchmarks)
           "RESULT_VERSION", "MINING_PLAN", "SNAPSHOT_FLOOR", "TRIGGER_COLUMNS", "REMOVAL_VARIANTS", "TriggerRequest",
           "auto_snapshot_floor", "check_snapshot_floor", "prefix_order", "snapshot_request", "keep_snapshot",
           "snapshot_sizes", "trigger_snapshot", "state_frame", "removal_plan", "random_removals", "with_tokens"]
