"""Checks and hints for the exercise notebooks (``exercises/``): the student writes a function, a check runs it
on the real model and compares it with ffnlib's own result.

Each ``check_*`` takes the student's function (and the loaded model), and either prints what passed or raises
:class:`CheckFailed` with a message in a student's words: a wrong shape, a forgotten norm gain, an off-by-one.
Where a mistake is common, the check computes that mistake's result too and names it when the student's answer
matches it. A stub that still raises ``NotImplementedError`` fails with :class:`NotDoneYet`.
``hint("memory_coefficients")`` prints the exercise's next hint, one more each call.

The exercises, by notebook (``exercises/source/<set>/<set>.ipynb``; the student copies are generated from them
by nbgrader), one module each:

- 01 keys (Sec. 3, :mod:`.keys`): :func:`check_memory_coefficients`, :func:`check_trigger_prefix`;
- 02 values (Sec. 4, :mod:`.values`): :func:`check_value_distribution`, :func:`check_agrees`;
- 03 aggregation (Sec. 5, :mod:`.aggregation`): :func:`check_top_tokens`, :func:`check_fig11_case`;
- 05 one memory's card (Secs. 3-4, :mod:`.card`): :func:`check_trigger_pattern`, :func:`check_value_reading`, on
  the cards (:func:`ffnlib.card.memory_card`) that :func:`card_results` and :func:`card_memories` pick;
- 06 knowledge neurons (Dai et al., :mod:`.knowledge_neurons`): :func:`check_integrated_gradients`,
  :func:`check_coarse_neurons`;
- 07 MoEfication (Zhang et al., :mod:`.moefication`): :func:`check_expert_scores`, :func:`check_expert_ffn`;
- 08 ReLU vs softmax (Shen et al., :mod:`.relu_softmax`): :func:`check_softmax_memory`, :func:`check_top_mass`;
- 09 FF attention maps (Kobayashi et al., :mod:`.attention_maps`): :func:`check_norm_split`,
  :func:`check_activation_shares`.

What every check shares (calling the student's function, comparing, naming a mistake) is :mod:`.checking`; the
hints are :mod:`.hints`.
"""

from .aggregation import check_fig11_case, check_top_tokens
from .attention_maps import check_activation_shares, check_norm_split
from .card import CARD_TRIGGERS, card_memories, card_results, check_trigger_pattern, check_value_reading, exercise_cards
from .checking import CheckFailed, NotDoneYet
from .hints import HINTS, hint
from .keys import check_memory_coefficients, check_trigger_prefix
from .knowledge_neurons import answer_probability, check_coarse_neurons, check_integrated_gradients
from .moefication import check_expert_ffn, check_expert_scores
from .relu_softmax import check_softmax_memory, check_top_mass
from .values import check_agrees, check_value_distribution

__all__ = ["CheckFailed", "NotDoneYet", "hint", "HINTS", "answer_probability",
           "check_memory_coefficients", "check_trigger_prefix", "check_value_distribution", "check_agrees",
           "check_top_tokens", "check_fig11_case", "check_integrated_gradients", "check_coarse_neurons",
           "check_expert_scores", "check_expert_ffn", "check_norm_split", "check_activation_shares",
           "check_softmax_memory", "check_top_mass",
           # 05: the memory card
           "CARD_TRIGGERS", "card_results", "card_memories", "exercise_cards", "check_trigger_pattern",
           "check_value_reading"]
