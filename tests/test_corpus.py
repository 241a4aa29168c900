"""The embedded Wikipedia corpus and users' own text."""

import pandas as pd
import pytest

import ffnlib
from ffnlib.corpus import load_corpus


def test_real_corpus_sizes_sources_and_topics(wiki):
    assert 35_000 < len(wiki) < 60_000
    assert set(wiki.source) == {"wiki-extracts", "wiki-articles"}
    extracts = wiki[wiki.source == "wiki-extracts"]
    assert extracts.doc_id.nunique() > 9_900
    assert extracts.topic.notna().all() and extracts.topic.nunique() == 12
    assert wiki[wiki.source == "wiki-articles"].topic.isna().all()
    assert wiki.sentence_id.is_unique and (wiki.sentence_id.diff().dropna() == 1).all()


def test_articles_are_deduplicated_by_title_against_extracts(wiki):
    extract_titles = set(wiki[wiki.source == "wiki-extracts"].title.str.lower())
    article_titles = set(wiki[wiki.source == "wiki-articles"].title.str.lower())
    assert article_titles and not (article_titles & extract_titles)
    assert "anarchism" in extract_titles  # present in both sources: kept once, as the extract


def test_no_markup_is_left_in_sentences(wiki):
    text = wiki[wiki.source == "wiki-articles"].text
    assert not text.str.contains(r"\[\[|\]\]|\{\{|'''|==", regex=True).any()


def test_heldout_split_is_disjoint_by_document_and_about_ten_percent(wiki):
    train, held = load_corpus("wiki", split="train"), load_corpus("wiki", split="heldout")
    assert not set(train.doc_id) & set(held.doc_id)
    assert len(train) + len(held) == len(wiki)
    assert 0.06 < held.doc_id.nunique() / wiki.doc_id.nunique() < 0.14


def test_shuffle_is_deterministic_by_seed_and_limits_apply(smollm):
    a, b = load_corpus(seed=3, max_sentences=50), load_corpus(seed=3, max_sentences=50)
    assert a.sentence_id.tolist() == b.sentence_id.tolist()
    assert a.sentence_id.tolist() != load_corpus(seed=4, max_sentences=50).sentence_id.tolist()
    limited = load_corpus(seed=3, max_tokens=500, tokenizer=smollm.tokenizer)
    lengths = [len(smollm.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in limited.text]
    assert sum(lengths) <= 500 < sum(lengths) + 200


def test_user_text_folder(tmp_path):
    (tmp_path / "a.txt").write_text("The cat sat on the mat. It was warm there. Birds sang outside.")
    (tmp_path / "b.txt").write_text("Rain fell all night long. The river rose.")
    table = load_corpus(tmp_path, split="all")
    assert sorted(table.text) == sorted(["The cat sat on the mat.", "It was warm there.", "Birds sang outside.",
                                         "Rain fell all night long.", "The river rose."])
    assert set(table.title) == {"a", "b"}


def test_non_utf8_file_is_named_in_the_error(tmp_path):
    (tmp_path / "latin.txt").write_bytes("Caf\xe9 au lait est bon.".encode("latin-1"))
    with pytest.raises(ffnlib.CorpusError, match="latin.txt is not UTF-8"):
        load_corpus(tmp_path, split="all")


@pytest.mark.parametrize("content", ["", "Hi. Ok."])
def test_empty_corpus_or_nothing_left_after_filtering(tmp_path, content):
    (tmp_path / "tiny.txt").write_text(content)
    with pytest.raises(ffnlib.CorpusError, match="no sentences"):
        load_corpus(tmp_path / "tiny.txt", split="all")


@pytest.mark.parametrize("kwargs", [{"split": "test"}, {"max_sentences": 0}, {"max_sentences": 2.5},
                                    {"seed": "x"}, {"max_tokens": 10}])
def test_bad_parameters(kwargs):
    with pytest.raises(ffnlib.ParameterError):
        load_corpus("wiki", **kwargs)


def test_unknown_corpus_name():
    with pytest.raises(ffnlib.CorpusError, match="Unknown corpus"):
        load_corpus("wikitext-103")


# ---- "wiki+": BIG-bench's English Wikipedia paragraphs added (scale="full") ------------------------------
ENGLISH = ("Xara Flare is a vector format that was introduced in 1997 by Xara.\nIt was open and developers could "
           "export to it.\nThe key design goal was a compact file for fast download over the internet.")
GERMAN = "Eine Skyline ist die Teilansicht einer Stadt.\nSkylines haben einen Wiedererkennungswert für eine Stadt."
RUSSIAN = "«Цвет волшебства» — юмористическое фэнтези.\nПервая книга из цикла «Плоский мир»."


def test_only_new_english_documents_are_added():
    from ffnlib import corpus

    assert corpus.is_english(ENGLISH) and not corpus.is_english(GERMAN) and not corpus.is_english(RUSSIAN)
    known_text = "Anarchism is a political philosophy and movement that is sceptical of authority."
    known = {corpus.normal_text(known_text)}
    task = {"examples": [{"input": ENGLISH}, {"input": GERMAN}, {"input": ENGLISH}, {"input": RUSSIAN},
                         {"input": known_text + "\n" + known_text.upper()}]}
    docs, counts = corpus.bigbench_documents(task, known)
    assert counts == {"documents": 5, "not_english": 2, "duplicates": 1, "already_in_wiki": 1}
    assert [d["title"] for d in docs] == ["paragraph_segmentation #0"] and docs[0]["source"] == corpus.BIGBENCH_SOURCE
    with pytest.raises(ffnlib.CorpusError, match="no 'examples' list"):
        corpus.bigbench_documents({"name": "x"}, known)


def test_wiki_plus_keeps_the_embedded_rows_and_holds_out_by_document(wiki, monkeypatch, tmp_path):
    from ffnlib import bigbench, corpus
    from ffnlib.config import get_scale

    small = wiki.iloc[:300]
    duplicate = small["text"].iloc[5]  # a sentence we have already: dropped from the new document
    paragraphs = [f"Document {i} is about the history of a small town in the north.\nThe town was founded in "
                  f"the {1100 + i}s by monks from the south.\n{duplicate}\nIt is known for the old bridge over the river."
                  for i in range(60)]  # the last sentence repeats in every document: kept once
    monkeypatch.setattr(corpus, "wiki_sentences", lambda: small)
    monkeypatch.setattr(corpus, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(bigbench, "task", lambda name, *a, **kw: {"examples": [{"input": p} for p in paragraphs]})
    table = corpus.wiki_plus_sentences()
    embedded, added = table.iloc[:300], table.iloc[300:]
    pd.testing.assert_frame_equal(embedded, small)  # the embedded rows and ids unchanged
    assert len(added) == 2 * 60 + 1 and (added["source"] == corpus.BIGBENCH_SOURCE).all()
    assert added["text"].is_unique
    assert not added["text"].isin(small["text"]).any()
    assert added["sentence_id"].min() > small["sentence_id"].max() and table["sentence_id"].is_unique
    assert added["doc_id"].min() > small["doc_id"].max()
    assert (added.groupby("doc_id")["heldout"].nunique() == 1).all() and added["heldout"].any()  # by document
    assert (tmp_path / "corpus").glob("wiki+-*.parquet")
    assert load_corpus("wiki+", split="all").sentence_id.sort_values().tolist() == table.sentence_id.tolist()
    assert get_scale("full").corpus == "wiki+" and get_scale("default").corpus == "wiki"
