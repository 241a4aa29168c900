"""Feed-forward blocks through attention maps (Kobayashi, Kuribayashi, Yokoi & Inui, ICLR 2024).

Geva et al. read what one position's FFN writes. Kobayashi et al. ask how the FFN changes which input tokens
each output token draws on. For one layer, the layer's input vectors ``x_j`` are the atoms, and every
intermediate vector of position ``i`` is written as a sum of per-input-token vectors plus bias terms,
``v_i = Σ_j y_{i←j} + b_i``; the map entry is ``‖y_{i←j}‖``. The stages, in the order the model computes
them (:func:`stages_of` says which a family has):

- **ATB**, the residual stream after attention: ``x_i + post(Σ_h Σ_j A^h_ij f^h(x_j))``, with
  ``f^h(x) = (norm(x) W_V^h + b_V^h) W_O^h`` (norm-based attention, Kobayashi et al. 2020/2021). The
  attention weights ``A^h`` are the model's own (``output_attentions`` with eager attention: rotary
  embeddings, ALiBi, sliding windows and soft-capping are all inside them); the values are read from the
  model's value projection by a hook, so GQA, fused QKV layouts and value biases need no re-implementation.
  The residual ``x_i`` is token ``i``'s own; ``b_O`` is a bias term. ``post`` is Gemma 2/3's and OLMo 2's
  norm on the attention output (identity elsewhere).
- **ATBLN**, the FFN's input: ATB through the FFN's own input norm (pre-LN families; not for parallel
  blocks, not for OLMo 2, which has none).
- **ATBFF**, the FFN's output. Linear parts split exactly. The activation is split with integrated gradients
  (IG) from a zero baseline along the straight path that scales every summand (token summands and the bias
  summand, including the FFN's first bias) together, so the shares of all summands add up exactly to the
  FFN's hidden vector. Element-wise activations (``m = g(p)``, ``p = Σ_j p_j + p_b``) have the closed form
  ``share_j = p_j · g(p)/p``; the coefficients ``m`` are read from the model, so no activation is
  re-implemented. Gated FFNs (``m = act(a)·u``) have ``share_j = a_j · u·(act(a) − B)/a + u_j · B`` with
  ``B = ∫_0^1 act(α a) dα``: one 1-D integral per hidden unit (Gauss-Legendre, :func:`path_average`, read from a
  table of it, :func:`path_average_table`), checked against captum's IntegratedGradients and a brute-force
  Riemann sum in the tests. Where the FFN has a first-layer bias it is one more summand (the bias term's).
- **ATBFFLN**: Gemma 2/3's and OLMo 2's norm on the FFN output, one more stage before the residual.
- **ATBFFRES**: the layer's output, ATB plus the FFN block.
- **ATBFFRESLN**: the next norm, the one the next layer's attention reads (the final norm after the last
  layer). OLMo 2's attention reads the raw residual, so there only its last layer has this stage.

Every norm is split linearly with the statistic of the whole vector (:class:`NormSplit`): ``norm(Σ_j y_j + b)
= Σ_j g ⊙ C(y_j)/s + (g ⊙ C(b)/s + β)``, ``C`` centring for a LayerNorm, identity for an RMSNorm. So every
stage is exact (complete): the sum over ``j`` plus the bias terms equals the model's own vector, which
:func:`decompose` checks when asked (``check=True``).

The four maps the paper draws are :data:`MAIN_STAGES`. For a pre-LN model the FFN's input norm sits between
ATB and the FFN; ATBFF includes it (the extra map ATBLN separates it), and ATBFFRESLN is the next norm, the
place where the post-LN paper's last LN sits. For parallel blocks (GPT-J, NeoX) the FFN reads ``norm(x_i)``,
token ``i`` alone, so its map is diagonal: the FFN mixes no context within the layer there.

**Cost.** The attention part is pushed through the FFN's first matrices per head before the mixing
(``n·H·d·d_ff``, or ``d²·d_ff`` once per layer and batch through ``W_O·L·W1`` when the batch has more tokens than
``d/(H−1)``), so the only large cost is the ``n²·d_ff·d`` down-projection, computed sentence by sentence in chunks
of at most 16 query rows against the input tokens up to the chunk's last row (memory bounded by
``chunk_elements``; only the causal pairs, up to each chunk's corner). Sentences longer than ``max_tokens``
(default :data:`MAX_TOKENS`) are refused.

**Measures** (functions of a :class:`MapsResult`, all returning DataFrames): maps are normalised per row
(each query's contributions sum to 1; parameter ``normalise``). Contextualisation change of a component
(:func:`contextualization_change`) is ``1 − Spearman ρ`` between the maps before and after it, per sentence and
layer, over the flattened map (entries ``j ≤ i``; ``correlate="row"``: within each query row, averaged).
FF-amplification (:func:`amplification`) is the normalised map after the FFN minus the one it reads; the top
pairs per sentence and layer are classified (:func:`classify_pairs`: sub-word pieces of one word from the
tokenizer's offsets, tokens of one capitalised multi-word span, a frequent corpus bigram, other) and compared with
base rates (:func:`amplified_classes`). The first position (BOS, or the first token where the model has no BOS:
an attention sink) and self-pairs are excluded from that ranking. Cancellation (:func:`cancellation`): how much of
the FFN's change survives RES and the norms: the change of the whole block against the FFN's own change (the
paper's comparison), and the correlation of the later components' change with the FFN's change over map entries,
against a control in which the FFN's change is shuffled within each row. 95% intervals are seeded bootstraps over
sentences (:func:`ffnlib.stats.bootstrap`). :func:`measures` turns these frames into the estimates of the paper's
findings, which the findings registry (``ffnlib.findings``, notebook ``09_ff_attention_maps``) judges, each against
its baseline and against the same measures of a random-weights control (the notebook decomposes the first
``control_sentences`` sentences with the same architecture, randomly initialised: ``ffnlib.controls``).

**Where things are** (one concept per module; the API, ``__all__``, is re-exported here: use
``from ffnlib.related import contextualization as ctx``; the helpers the modules share have public names inside
these private modules):

- ``_layout``: the stages, the components between them, and the family's attention layout and FFN activation,
  declared in :class:`ffnlib.adapters.FamilySpec` (:func:`layout_of`, :func:`stages_of`);
- ``_norms``: :class:`NormSplit`, a norm split linearly;
- ``_linearise``: integrated gradients through the activation in closed form (:func:`gated_ig_coefficients`,
  :func:`elementwise_ig_ratio`, :func:`path_average`);
- ``_decompose``: one batch, one forward pass, every stage of every layer (:func:`decompose`, :class:`Decomposition`);
- ``_sentences``: the sentences and their tokens (:func:`sample_sentences`, :func:`token_table`);
- ``_maps``: many sentences, batched, checkpointed and cached (:func:`sentence_maps`, :class:`MapsResult`);
- ``_normalise``: maps normalised per query row (:func:`normalised_maps`, :func:`map_arrays`);
- ``_change``: contextualisation change (:func:`contextualization_change`);
- ``_pairs``: FF-amplified pairs and their classes (:func:`amplified_pairs`, :func:`amplified_classes`);
- ``_cancellation``: what RES and the norms undo (:func:`cancellation`);
- ``_resampling``: the intervals, through :func:`ffnlib.stats.bootstrap`;
- ``_measures``: the findings' measures and curves (:func:`measures`, :func:`curves`);
- ``_sizes``: the notebook's sizes per scale, from :data:`ffnlib.config.SCALES` (:func:`notebook_sizes`).
"""

from __future__ import annotations

from ._cancellation import cancellation, cancellation_per_sentence
from ._change import CORRELATE, contextualization_change, contextualization_per_sentence
from ._decompose import CHUNK_ELEMENTS, MAX_TOKENS, Decomposition, decompose, eager_attention
from ._layout import (CHECKED, COMPONENTS, LAYOUTS, MAIN_STAGES, STAGE_LABELS, STAGES, VALUE_LAYOUTS, LayerLayout,
                      before_ff, layout_of, stages_of)
from ._linearise import (check_activation, elementwise_ig_ratio, gated_ig_coefficients, ig_shares_by_riemann,
                         path_average, path_average_table)
from ._maps import MapsResult, sentence_maps
from ._measures import MEASURE_OF_CLASS, curves, measures
from ._normalise import NORMALISE, map_arrays, normalised_maps
from ._norms import NormSplit
from ._pairs import CLASSES, amplification, amplified_classes, amplified_pairs, classify_pairs, corpus_bigrams
from ._sentences import sample_sentences, token_table
from ._sizes import SCALE_SIZES, notebook_sizes

__all__ = ["MAX_TOKENS", "CHUNK_ELEMENTS", "STAGES", "MAIN_STAGES", "STAGE_LABELS", "COMPONENTS", "CHECKED",
           "LayerLayout", "VALUE_LAYOUTS", "LAYOUTS", "layout_of", "stages_of", "before_ff", "NormSplit",
           "path_average", "check_activation", "path_average_table", "gated_ig_coefficients",
           "elementwise_ig_ratio", "ig_shares_by_riemann", "eager_attention", "Decomposition", "decompose",
           "token_table", "sample_sentences", "MapsResult", "sentence_maps", "NORMALISE",
           "CLASSES", "normalised_maps", "CORRELATE", "contextualization_per_sentence", "contextualization_change",
           "corpus_bigrams", "classify_pairs", "amplification", "amplified_pairs", "amplified_classes",
           "cancellation_per_sentence", "cancellation", "MEASURE_OF_CLASS", "measures", "map_arrays", "SCALE_SIZES",
           "notebook_sizes", "curves"]
