"""The sentences the maps are drawn for, and their tokens as the model reads them (with words and capitalised
spans, for the pair classes)."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
import pandas as pd

from ...config import check_int
from ...errors import CorpusError, ParameterError

__all__ = ["token_table", "sample_sentences"]

_WORD = re.compile(r"\w+")


def token_table(loaded, texts: Sequence[str]) -> pd.DataFrame:
    """One row per token of each text as the model reads it (BOS included): ``sentence``, ``position``,
    ``token_id``, ``token`` (decoded alone), ``start``/``end`` (character offsets from the tokenizer; -1 for BOS),
    ``word`` (index of the ``\\w+`` run the token's first word character falls in; -1 for none), ``capitalised``
    (that word starts with a capital letter) and ``span`` (index of the run of two or more consecutive capitalised
    words, separated by spaces only, that the word belongs to; -1 for none)."""
    bos = list(getattr(loaded, "bos", []))
    encoded = loaded.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for sentence, (text, ids, offsets) in enumerate(zip(texts, encoded["input_ids"], encoded["offset_mapping"])):
        char_word = np.full(len(text) + 1, -1)
        words = list(_WORD.finditer(text))
        for w, match in enumerate(words):
            char_word[match.start():match.end()] = w
        capital = [m.group()[0].isupper() for m in words]
        span_of, span, current = [-1] * len(words), -1, []
        for w in range(len(words) + 1):  # runs of capitalised words joined by whitespace only
            joined = (w < len(words) and capital[w] and current
                      and not text[words[w - 1].end():words[w].start()].strip())
            if joined:
                current.append(w)
                continue
            if len(current) >= 2:
                span += 1
                for member in current:
                    span_of[member] = span
            current = [w] if w < len(words) and capital[w] else []
        tokens = loaded.token_strings(bos + list(ids))
        for position, token_id in enumerate(bos + list(ids)):
            if position < len(bos):
                rows.append((sentence, position, token_id, tokens[position], -1, -1, -1, False, -1))
                continue
            start, end = offsets[position - len(bos)]
            inside = char_word[start:end]
            inside = inside[inside >= 0]
            word = int(inside[0]) if len(inside) else -1
            rows.append((sentence, position, int(token_id), tokens[position], int(start), int(end), word,
                         bool(capital[word]) if word >= 0 else False, span_of[word] if word >= 0 else -1))
    return pd.DataFrame(rows, columns=["sentence", "position", "token_id", "token", "start", "end", "word",
                                       "capitalised", "span"])


def sample_sentences(loaded, n_sentences: int, seed: int = 0, min_tokens: int = 8, max_tokens: int = 40,
                     corpus="wiki", split: str = "heldout") -> pd.DataFrame:
    """``n_sentences`` sentences of the corpus (held-out split by default, shuffled by ``seed``) whose token count
    as the model reads them is in ``[min_tokens, max_tokens]``: ``sentence_id``, ``text``, ``n_tokens``."""
    from ...corpus import load_corpus

    n_sentences = check_int("n_sentences", n_sentences)
    min_tokens, max_tokens = check_int("min_tokens", min_tokens), check_int("max_tokens", max_tokens)
    if min_tokens > max_tokens:
        raise ParameterError(f"min_tokens={min_tokens} is larger than max_tokens={max_tokens}.")
    table = load_corpus(corpus, split=split, seed=seed, max_sentences=max(4 * n_sentences, 200))
    lengths = np.array([len(ids) for ids in loaded.tokenizer(table["text"].tolist(), add_special_tokens=False)[
        "input_ids"]]) + len(getattr(loaded, "bos", []))
    keep = table[(lengths >= min_tokens) & (lengths <= max_tokens)].assign(
        n_tokens=lengths[(lengths >= min_tokens) & (lengths <= max_tokens)])
    if len(keep) < n_sentences:
        raise CorpusError(f"Only {len(keep)} of {len(table)} {split} sentences have {min_tokens}-{max_tokens} tokens; "
                          f"ask for fewer sentences or widen the range.")
    return keep.head(n_sentences)[["sentence_id", "text", "n_tokens"]].reset_index(drop=True)
