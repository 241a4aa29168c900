"""Exercises 05 · one memory's card (:func:`ffnlib.card.memory_card`): say what the memory stores, its key's
pattern (Section 3) and the token its value writes, and whether that token follows its top trigger (Section 4).

The cards are read from the run's results when notebooks 01 and 02 cached the layer's trigger examples and value
projection there (:func:`card_results`); otherwise those two are computed for that layer alone, on at most
``CARD_SENTENCES`` of the scale's mined sentences, and cached beside the run's results.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..card import PATTERN_TOP, RunResults, layer_agreement, memory_card, open_results
from ..errors import ResultsError
from .checking import CheckFailed, call_student, name_of, passed

__all__ = ["CARD_SENTENCES", "CARD_TRIGGERS", "MIN_LABELLED", "card_results", "card_memories", "exercise_cards",
           "check_trigger_pattern", "check_value_reading"]

CARD_SENTENCES = 160  # sentences mined for the exercise when the run's results lack the layer (scale ci's)
CARD_TRIGGERS = PATTERN_TOP  # a key's top triggers, on the card and in its pattern measures
MIN_LABELLED = 5  # fewer triggers with a topic label than this: no topic share (ffnlib.keys.key_measures)
UNLABELLED = "Uncategorized"  # the corpus's topic for no topic (left out of the topic share, as in key_measures)


def card_results(run, layer: int) -> RunResults:
    """The results the exercise's cards read: ``run.out`` when notebooks 01 and 02 cached ``layer``'s trigger
    examples and value projection there; else both computed now for ``layer`` alone (notebook 01's mining and
    notebook 02's projection, on at most ``CARD_SENTENCES`` of the scale's sentences), cached in
    ``run.out/exercises/layer-<layer>`` so that a second run reads them."""
    from ..corpus import load_corpus
    from ..keys import mine_trigger_examples
    from ..values import project_values, top_trigger_targets

    loaded = run.loaded
    layer = loaded.adapter.check_layer(layer)
    results = open_results(loaded, run.out)
    if layer_agreement(results, layer) is not None:
        return results
    folder = run.out / "exercises" / f"layer-{layer}"
    wanted = run.scale.mining_sentences
    sentences = load_corpus(run.scale.corpus, split="train", seed=run.seed,
                            max_sentences=CARD_SENTENCES if wanted is None else min(wanted, CARD_SENTENCES))
    examples = mine_trigger_examples(loaded, sentences, k=min(run.scale.top_k, len(sentences)), layers=[layer],
                                     out_dir=folder, progress=False)
    project_values(loaded, layers=[layer], targets=top_trigger_targets(examples.triggers), out_dir=folder,
                   progress=False)
    print(f"Mined the trigger examples of layer {layer} on {len(examples.sentences)} sentences and projected its "
          f"values (notebooks 01 and 02 had not cached them in {run.out}).")
    return open_results(loaded, folder)


def card_memories(results: RunResults, layer: int, n_agreeing: int = 4, n_lower: int = 2, n_random: int = 2,
                  seed: int = 0) -> list[int]:
    """The memories whose cards the checks read: the ``n_agreeing`` most confident values that agree with their
    key's top trigger (either sign), ``n_lower`` whose value follows only a lower trigger, and ``n_random`` seeded
    random ones. The first is the memory the notebook shows."""
    per_memory = layer_agreement(results, layer)
    if per_memory is None:
        raise ResultsError(f"No trigger examples and value projection of layer {layer} in the results: get them "
                           "with card_results(run, layer).")
    by_confidence = per_memory.sort_values(["max_prob", "memory"], ascending=[False, True])
    agreeing = by_confidence[by_confidence["agrees"]]["memory"]
    lower = by_confidence[~by_confidence["agrees"] & (by_confidence["n_agreeing"] >= 2)]["memory"]
    chosen = list(dict.fromkeys(agreeing.tolist()))[:n_agreeing] or by_confidence["memory"].head(1).tolist()
    chosen += [m for m in dict.fromkeys(lower.tolist()) if m not in chosen][:n_lower]
    rest = sorted(set(per_memory["memory"].tolist()) - set(chosen))
    chosen += np.random.default_rng(seed).choice(rest, size=min(n_random, len(rest)), replace=False).tolist()
    return [int(m) for m in chosen]


def exercise_cards(loaded, layer: int, results: RunResults, memories=None) -> list:
    """The cards (:class:`ffnlib.card.MemoryCard`, ``CARD_TRIGGERS`` triggers per sign) of ``memories``
    (default: :func:`card_memories`)."""
    memories = card_memories(results, layer) if memories is None else memories
    return [memory_card(loaded, layer, int(m), results=results, n_triggers=CARD_TRIGGERS) for m in memories]


# ---- the student's answers, and what they are compared with -------------------------------------------------
PATTERN_KEYS = ("last_token", "last_token_share", "topic", "topic_share")
VALUE_KEYS = ("promotes", "agrees")


def _answer(fn, keys: tuple[str, ...], *args) -> dict:
    got = call_student(fn, *args)
    missing = sorted(set(keys) - set(got)) if isinstance(got, dict) else None
    if missing is None or missing:
        raise CheckFailed(f"`{name_of(fn)}` should return a dict with the keys {list(keys)}; it returned "
                          + (f"a dict without {missing}." if missing else f"{type(got).__name__}."))
    return got


def _plain(value):
    """A numpy scalar as the Python number it holds (for messages)."""
    return value.item() if isinstance(value, np.generic) else value


def _missing(value) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and math.isnan(value))


def _fits(got, want) -> bool:
    """Whether an answer fits what is wanted: a set (any of tied values), None or NaN (no answer), a number (to
    1e-6), or a value."""
    if isinstance(want, (set, frozenset)):
        try:
            return not _missing(got) and got in want
        except TypeError:  # an unhashable answer (a list, a Series) is none of the wanted values
            return False
    if _missing(want) or _missing(got):
        return _missing(want) and _missing(got)
    if isinstance(want, (int, float, np.number)) and not isinstance(want, (bool, np.bool_)):
        return isinstance(got, (int, float, np.number)) and abs(float(got) - float(want)) < 1e-6
    return bool(got == want)


def _all_fit(answers: list[dict], wanted: list[dict]) -> bool:
    return all(_fits(got[key], want[key]) for got, want in zip(answers, wanted) for key in want)


def _most_common(column: pd.Series, denominator: int | None = None) -> tuple[set, float, int]:
    """(the most common values: a set when tied, their share of the column or of ``denominator``, the count of
    values) of a column, missing values left out."""
    counts = column.value_counts()
    if not len(counts):
        return set(), float("nan"), 0
    top = counts.max()
    return set(counts[counts == top].index), float(top / (denominator or counts.sum())), int(counts.sum())


def _pattern(rows: pd.DataFrame, token: str = "last_token", topics: str = "labelled") -> dict:
    """The pattern of trigger rows: the most common ``token`` and its share; the most common topic and its share
    among the labelled triggers, none with fewer than MIN_LABELLED (``topics="labelled"``, as ffnlib's
    key_measures); or, as a slip would have it, among all the triggers (``"all"``), among those with any topic
    ("Uncategorized" included, ``"any"``), or whatever their number (``"few"``)."""
    last, share, _ = _most_common(rows[token])
    column = rows["topic"] if topics in ("all", "any") else rows["topic"][rows["topic"] != UNLABELLED]
    topic, topic_share, labelled = _most_common(column, len(rows) if topics == "all" else None)
    if topics == "labelled" and labelled < MIN_LABELLED:
        topic, topic_share = None, float("nan")
    return {"last_token": last, "last_token_share": share, "topic": topic, "topic_share": topic_share}


def _pattern_cases(cards) -> list[tuple]:
    """(card, sign, the sign's trigger rows, what is wanted) for every sign of every card whose table reproduces
    the card's pattern (its most common last token, its share and the topic share): a token whose text another
    token shares would make the table ambiguous, and such a case is left out."""
    cases = []
    for card in cards:
        if card.triggers is None or card.pattern is None:
            raise CheckFailed(f"The card of memory {card.memory} has no trigger examples: {card.missing}.")
        for row in card.pattern.itertuples():
            rows = card.triggers[card.triggers["sign"] == row.sign]
            want = _pattern(rows)
            if len(rows) and row.most_common_last_token in want["last_token"] and _fits(
                    row.its_share, want["last_token_share"]) and _fits(row.topic_concentration, want["topic_share"]):
                cases.append((card, int(row.sign), rows, want))
    return cases


def _first_difference(fn, cases: list[tuple], answers: list[dict], wanted: list[dict], keys: tuple[str, ...]):
    """Say where the first answer differs from the card's."""
    for key in keys:
        wrong = [i for i, (got, want) in enumerate(zip(answers, wanted)) if not _fits(got[key], want[key])]
        if not wrong:
            continue
        over_one = [answers[i][key] for i in wrong if isinstance(answers[i][key], (int, float, np.number))
                    and not _missing(answers[i][key]) and answers[i][key] > 1]
        if key.endswith("share") and over_one:
            raise CheckFailed(f"`{name_of(fn)}`: {key} should be a share (a count over the number of triggers), "
                              f"not a count: you returned {_plain(over_one[0])!r}.")
        card, sign, rows = cases[wrong[0]][:3]
        got, want = _plain(answers[wrong[0]][key]), wanted[wrong[0]][key]
        shown = " or ".join(repr(w) for w in sorted(want, key=str)) if isinstance(want, set) else repr(_plain(want))
        raise CheckFailed(f"`{name_of(fn)}`: for memory {card.memory} (sign {sign:+d}, {len(rows)} triggers) your "
                          f"{key} is {got!r}; the card says {shown} ({len(wrong)} of {len(cases)} cards' signs "
                          f"differ in {key}). `hint({name_of(fn)!r})` gives a hint.")


def check_trigger_pattern(fn, loaded, layer: int, results: RunResults, cards=None) -> None:
    """``fn(triggers, sign)`` -> {"last_token", "last_token_share", "topic", "topic_share"}: the pattern of the
    key's trigger examples of ``sign`` (a card's ``triggers`` table), against the card's own ``pattern``
    (``ffnlib.card``, from ``ffnlib.keys.key_measures``), on the cards of :func:`card_memories`."""
    cards = exercise_cards(loaded, layer, results) if cards is None else cards
    cases = _pattern_cases(cards)
    answers = [_answer(fn, PATTERN_KEYS, card.triggers.copy(), sign) for card, sign, _, _ in cases]
    wanted = [want for *_, want in cases]
    if _all_fit(answers, wanted):
        passed(fn, f"the same pattern as the cards of {len(cards)} memories of layer {layer}: the shared last token "
                   "and the topic of each sign's trigger examples.")
        return
    topic_rules = (f"the topic share counts only the triggers with a topic label: leave out those without one "
                   f"(missing) and those labelled {UNLABELLED!r}; with fewer than {MIN_LABELLED} labelled triggers "
                   "there is no topic (None for both).")
    slips = [("you counted the token that FOLLOWS each trigger (next_token). The key's pattern is in its trigger "
              "examples themselves: the last token of each prefix, where the key fires (last_token). The token "
              "after it is what the value should predict (exercise 2).",
              [_pattern(rows, "next_token") for _, _, rows, _ in cases]),
             ("you counted the triggers of both signs. Keep the rows of `sign` only: a key's most positive and its "
              "most negative triggers are two patterns (one makes the memory write +v, the other -v).",
              [_pattern(card.triggers) for card, *_ in cases])]
    slips += [(topic_rules, [_pattern(rows, topics=topics) for _, _, rows, _ in cases])
              for topics in ("all", "any", "few")]
    for message, slipped in slips:
        if _all_fit(answers, slipped):
            raise CheckFailed(f"`{name_of(fn)}`: {message}")
    _first_difference(fn, cases, answers, wanted, PATTERN_KEYS)


def _value_cases(cards) -> list[tuple]:
    """(card, sign, the sign's trigger rows, what is wanted) for every sign of every card whose tables decide
    agreement as the token ids do (two tokens with one text would not; such a case is left out)."""
    cases = []
    for card in cards:
        if card.value_agreement is None or card.value_tokens is None:
            raise CheckFailed(f"The card of memory {card.memory} has no value agreement: {card.missing}.")
        for row in card.value_agreement.itertuples():
            reading = _reading(card, int(row.sign))
            want = {"promotes": row.top_token_text, "agrees": bool(row.agrees)}
            if reading == want:
                cases.append((card, int(row.sign), card.triggers[card.triggers["sign"] == row.sign], want))
    return cases


def _reading(card, sign: int, tokens_sign: int | None = None, column: str = "next_token",
             any_trigger: bool = False) -> dict:
    """The top token of the value as written with ``sign`` and whether it follows the key's top trigger of that
    sign, read from the card's tables; ``tokens_sign``, ``column`` and ``any_trigger`` make the usual slips."""
    tokens = card.value_tokens[card.value_tokens["sign"] == (sign if tokens_sign is None else tokens_sign)]
    tokens = tokens.sort_values("rank")
    rows = card.triggers[card.triggers["sign"] == sign].sort_values("rank")
    if tokens.empty or rows.empty:
        return {"promotes": None, "agrees": None}
    top = tokens["token"].iloc[0]
    follows = rows[column].eq(top).any() if any_trigger else rows[column].iloc[0] == top
    return {"promotes": top, "agrees": bool(follows)}


def check_value_reading(fn, loaded, layer: int, results: RunResults, cards=None) -> None:
    """``fn(triggers, value_tokens, sign)`` -> {"promotes", "agrees"}: the token the memory writes when its key
    fires with ``sign`` (the top token of ``sign * v``), and whether it is the token after the key's top trigger;
    against the card's ``value_agreement`` (``ffnlib.values.value_agreement``), on the cards of
    :func:`card_memories`."""
    cards = exercise_cards(loaded, layer, results) if cards is None else cards
    cases = _value_cases(cards)
    answers = [_answer(fn, VALUE_KEYS, card.triggers.copy(), card.value_tokens.copy(), sign)
               for card, sign, _, _ in cases]
    wanted = [want for *_, want in cases]
    if _all_fit(answers, wanted):
        agreeing = sum(want["agrees"] for want in wanted)
        passed(fn, f"the same reading as the cards' value agreement for {len(cards)} memories of layer {layer} "
                   f"({agreeing} of {len(cases)} values agree with their key's top trigger).")
        return
    if any(not isinstance(got["promotes"], str) for got in answers):
        raise CheckFailed(f"`{name_of(fn)}`: promotes should be the token's text (the `token` column of "
                          "value_tokens), a str.")
    slips = [("you read the tokens of the other sign. A memory writes m_i·v_i: with a positive coefficient (the "
              "key's top triggers, sign +1) that is +v_i, with a negative one (sign -1) it is -v_i. Read the "
              "value_tokens rows of the same sign as the triggers.",
              [_reading(card, sign, tokens_sign=-sign) for card, sign, *_ in cases]),
             ("you compared the value's top token with the LAST token of the top trigger. The value predicts the "
              "token that FOLLOWS the trigger prefix: next_token. This is the paper's off-by-one trap.",
              [_reading(card, sign, column="last_token") for card, sign, *_ in cases]),
             ("agreement is about the key's TOP trigger (rank 0): you said True when any of its triggers is "
              "followed by the value's top token.",
              [_reading(card, sign, any_trigger=True) for card, sign, *_ in cases])]
    for message, slipped in slips:
        if _all_fit(answers, slipped):
            raise CheckFailed(f"`{name_of(fn)}`: {message}")
    _first_difference(fn, cases, answers, wanted, VALUE_KEYS)
