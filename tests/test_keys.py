"""Section 3 (keys capture input patterns): ``ffnlib.keys``'s analyses of the mined trigger examples, its plots and
the annotation widget logic.

The removal experiment is checked against a direct recomputation and against a model whose answer is known by
hand; the pattern measures on hand-built tables. Mining itself is tested in tests/test_mining.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from ffnlib import CorpusError, ParameterError  # noqa: E402
from ffnlib import keys, mining  # noqa: E402
from ffnlib.capture import capture  # noqa: E402
from ffnlib.corpus import load_corpus  # noqa: E402
from tiny_llama import mine, tiny_llama, wrap  # noqa: E402


@pytest.fixture(scope="module")
def tiny(smollm):
    return wrap(tiny_llama(), smollm.tokenizer)


@pytest.fixture(scope="module")
def sentences(wiki):
    return load_corpus(wiki, split="train", seed=0, max_sentences=40)


# ---- views ---------------------------------------------------------------------------------------------
def test_trigger_table_and_html(tiny, sentences):
    ex = mine(tiny, sentences)
    table = keys.trigger_table(ex, tiny.tokenizer, layer=1, memory=3, n=4)
    assert list(table["rank"]) == [0, 1, 2, 3]
    assert {"prefix", "last_token", "coefficient", "next_token"} <= set(table.columns)
    index = ex.token_index()
    for r in table.itertuples():
        ids = index[r.sentence_id]
        assert r.prefix + r.last_token == tiny.tokenizer.decode(ids[: r.position + 1])
        assert r.next_token == (tiny.tokenizer.decode(ids[r.position + 1: r.position + 2]))
    page = keys.trigger_html(ex, tiny.tokenizer, 1, 3, sign=-1, n=3)
    assert page.count("<mark>") == 3 and "most negative" in page
    with pytest.raises(ParameterError, match="No trigger examples"):
        ex.of(7, 0)


def test_html_escapes_text(tiny, sentences):
    odd = pd.DataFrame({"sentence_id": [0, 1, 2], "text": ["a <b>bold</b> & co", "x < y", "plain words here"]})
    ex = mine(tiny, odd, k=2)
    page = keys.trigger_html(ex, tiny.tokenizer, 0, 0, n=2)
    assert "<b>bold" not in page and ("&lt;" in page or "&amp;" in page)


# ---- removal experiment -------------------------------------------------------------------------------
def test_removal_equals_direct_recomputation(tiny, sentences):
    ex = mine(tiny, sentences, k=6)
    removal = keys.removal_experiment(tiny, ex, n_keys=3, top=6, seed=1, batch_tokens=200, progress=False)
    assert set(removal["variant"]) == {"first", "last", "random"}
    assert len(removal) == len(removal[["layer", "memory", "rank", "variant"]].drop_duplicates())
    index = ex.token_index()
    first, last = removal["variant"] == "first", removal["variant"] == "last"
    assert (removal.loc[first, "removed"] == 0).all() and (removal.loc[last, "removed"] == removal.loc[last, "position"]).all()
    assert removal["removed"].between(0, removal["position"]).all()
    with torch.inference_mode(), capture(tiny, what=("coefficients",)) as acts:
        for r in removal.itertuples():
            ids = list(index[r.sentence_id][: r.position + 1])
            del ids[r.removed]
            tiny.model(input_ids=torch.tensor([ids]))
            expected = float(acts.coefficients[r.layer][0, -1, r.memory])
            assert abs(r.new_coefficient - expected) <= 1e-5 * max(1, abs(expected)), r
    np.testing.assert_allclose(removal["relative_change"],
                               (removal["new_coefficient"] - removal["coefficient"]) / removal["coefficient"].abs(),
                               rtol=1e-6)
    summary = keys.removal_summary(removal, n_layers=3)
    assert set(summary.columns) >= {"layer", "variant", "mean_change_pct", "median_change_pct", "prefixes"}
    assert summary["prefixes"].sum() == len(removal)


def test_removal_on_a_model_that_only_sees_the_last_token(smollm, sentences):
    """With every attention output zeroed, each coefficient depends only on the current token: removing
    the first token changes nothing, and removing the last gives the coefficient of the token before,
    computed here by hand from that single token."""
    model = tiny_llama(seed=3)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
    loaded = wrap(model, smollm.tokenizer, name="no-attention")
    ex = mine(loaded, sentences, k=4, negative=False)
    removal = keys.removal_experiment(loaded, ex, n_keys=4, top=4, seed=0, progress=False)
    first = removal[removal["variant"] == "first"]
    np.testing.assert_allclose(first["relative_change"], 0, atol=1e-5)
    index = ex.token_index()
    last = removal[removal["variant"] == "last"]
    with torch.inference_mode(), capture(loaded, what=("coefficients",)) as acts:
        for r in last.itertuples():
            loaded.model(input_ids=torch.tensor([[index[r.sentence_id][r.position - 1]]]))
            assert abs(r.new_coefficient - float(acts.coefficients[r.layer][0, 0, r.memory])) < 1e-5
    random_ = removal[removal["variant"] == "random"]
    kept_last = random_[random_["removed"] != random_["position"]]
    np.testing.assert_allclose(kept_last["relative_change"], 0, atol=1e-5)
    assert (last["relative_change"].abs() > 1e-3).mean() > 0.5


def test_removal_cache_and_bad_inputs(tiny, sentences, tmp_path):
    ex = mine(tiny, sentences, k=4)
    a = keys.removal_experiment(tiny, ex, n_keys=2, top=3, out_dir=tmp_path, progress=False)
    b = keys.removal_experiment(tiny, ex, n_keys=2, top=3, out_dir=tmp_path, progress=False)
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(ParameterError, match="variant"):
        keys.removal_experiment(tiny, ex, variants=("middle",), progress=False)
    with pytest.raises(ParameterError, match="top=9"):
        keys.removal_experiment(tiny, ex, n_keys=2, top=9, progress=False)
    with pytest.raises(ParameterError, match="n_keys"):
        keys.removal_experiment(tiny, ex, n_keys=10_000, progress=False)
    with pytest.raises(ParameterError, match="not mined"):
        keys.removal_experiment(tiny, mine(tiny, sentences, k=4, layers=[0]), n_keys=2, top=2, layers=[2],
                                progress=False)


# ---- pattern measures ------------------------------------------------------------------------------------
def _hand_built() -> keys.TriggerExamples:
    """25 sentences. Key (0, 0): 10 triggers end in token 7 (5 of them after token 50), 15 distinct last
    tokens; 12 sentences about Arts, 4 about History, the rest unlabelled. Key (0, 1): all distinct."""
    token_ids, topics = [], []
    for i in range(25):
        if i < 5:
            ids = [300 + i, 50, 7]
        elif i < 10:
            ids = [300 + i, 60 + i, 7]
        else:
            ids = [300 + i, 400 + i, 500 + i]
        token_ids.append(ids)
        topics.append("Arts" if i < 12 else "History" if i < 16 else None)
    sentences = pd.DataFrame({"sentence_id": np.arange(25), "text": [f"s{i}" for i in range(25)],
                              "title": "t", "topic": topics, "token_ids": token_ids})
    rows = []
    for memory, pos in ((0, 2), (1, 0)):
        for rank in range(25):
            rows.append((0, memory, 1, rank, 25.0 - rank, rank, pos, -1))
    triggers = pd.DataFrame(rows, columns=keys.TRIGGER_COLUMNS)
    manifest = {"layers": [0], "k": 25, "negative": False, "n_bos": 0, "model": "hand"}
    return keys.TriggerExamples(triggers, sentences, manifest)


def test_key_measures_on_a_hand_built_table():
    ex = _hand_built()
    per_key = keys.key_measures(keys.with_tokens(ex, ex.triggers)).set_index("memory")
    assert per_key.loc[0, "shallow_token"] == pytest.approx(10 / 25)
    assert per_key.loc[0, "shallow_bigram"] == pytest.approx(5 / 25)
    assert per_key.loc[0, "topic_concentration"] == pytest.approx(12 / 16)
    assert per_key.loc[0, "labelled"] == 16
    # key 1: position 0 -> last tokens 300+i all distinct, no previous token
    assert per_key.loc[1, "shallow_token"] == 0 and per_key.loc[1, "shallow_bigram"] == 0
    few = keys.key_measures(keys.with_tokens(ex, ex.triggers.head(6)), min_labelled=7)
    assert np.isnan(few["topic_concentration"].iloc[0])
    one = keys.key_pattern_measures(None, ex, ex.of(0, 0))
    assert one["shallow_token"] == pytest.approx(0.4)


def test_trigger_tokens_are_read_from_each_trigger_s_own_sentence(tiny, sentences):
    """``with_tokens`` (vectorised) against reading each row's sentence one by one; a row that is not a
    token of the mined sentences is an error, not a token of the next sentence."""
    ex = keys.mine_trigger_examples(tiny, sentences, k=4)
    got = keys.with_tokens(ex, ex.triggers)
    index, topics = ex.token_index(), dict(zip(ex.sentences["sentence_id"], ex.sentences["topic"]))
    for row in got.sample(200, random_state=0).itertuples():
        ids = index[row.sentence_id]
        assert row.last_token == ids[row.position]
        assert row.previous_token == (ids[row.position - 1] if row.position - 1 >= ex.n_bos else -1)
        assert row.topic == topics[row.sentence_id] or (pd.isna(row.topic) and pd.isna(topics[row.sentence_id]))
    assert (got["previous_token"] == -1).any()  # triggers at the first real token
    too_far = ex.triggers.head(1).assign(position=len(index[int(ex.triggers["sentence_id"].iloc[0])]))
    with pytest.raises(ParameterError, match="not a token of the mined sentences"):
        keys.with_tokens(ex, too_far)
    with pytest.raises(ParameterError, match="not a token of the mined sentences"):
        keys.with_tokens(ex, ex.triggers.head(1).assign(sentence_id=-5))
    with pytest.raises(ParameterError, match="not a token of the mined sentences"):
        keys.with_tokens(ex, ex.triggers.head(1).assign(position=-1))
    assert keys.with_tokens(ex, ex.triggers.head(0)).empty


def test_layer_measures_and_trend():
    ex = _hand_built()
    measures = keys.layer_pattern_measures(ex, n_layers=1, random_keys=50)
    row = measures.iloc[0]
    assert row["shallow_token"] == pytest.approx((0.4 + 0) / 2)
    assert row["topic_base_rate"] == pytest.approx(12 / 16) and row["most_common_topic"] == "Arts"
    assert 0 <= row["random_shallow_token"] <= 1
    fake = pd.DataFrame({"relative_depth": np.arange(1, 11) / 10, "shallow_token": np.linspace(0.6, 0.1, 10),
                         "topic_concentration": np.linspace(0.3, 0.6, 10), "random_topic_concentration": 0.3})
    trend = keys.pattern_trend(fake)
    assert trend["shallow_lower"] > trend["shallow_upper"] and trend["semantic_excess_upper"] > trend[
        "semantic_excess_lower"]
    assert trend["shallow_depth_correlation"] < 0 < trend["semantic_depth_correlation"]
    fake["topic_concentration"] = np.linspace(0.6, 0.3, 10)
    assert keys.pattern_trend(fake)["semantic_depth_correlation"] < 0


def test_section3_measures_on_constructed_keys():
    """Removal rows and per-key patterns built by hand: each measure is the number it should be."""
    n_layers = 4
    rows = []
    for layer in range(n_layers):
        for memory in range(30):
            last = -0.8 if layer < 2 else -0.4  # lower layers (depth <= 9/16: layers 0, 1) hurt more
            for variant, change in (("last", last), ("first", -0.1), ("random", -0.2)):
                rows.append({"layer": layer, "memory": memory, "rank": 0, "variant": variant,
                             "relative_change": change})
    removal = pd.DataFrame(rows)
    patterns = pd.DataFrame({"layer": np.repeat(np.arange(n_layers), 30), "memory": np.tile(np.arange(30), n_layers),
                             "shallow_token": np.repeat([0.6, 0.5, 0.2, 0.1], 30),
                             "topic_concentration": np.repeat([0.3, np.nan, 0.5, 0.7], 30)})
    ours, details = keys.section3_measures(removal, patterns, n_layers, seed=0)
    assert ours["last_hurts_most"].value == pytest.approx((0.5 * -0.6 + 0.5 * -0.2))
    assert ours["last_hurts_more_in_lower"].value == pytest.approx(-0.4)
    assert ours["shallow_lower"].value == pytest.approx(0.55 - 0.15)
    assert ours["semantic_upper"].value == pytest.approx(0.6 - 0.3)
    assert all(e.low <= e.value <= e.high for e in ours.values())
    assert ours["last_hurts_most"].unit == "keys" and ours["last_hurts_most"].n == 120
    assert "last -60%" in details["last_hurts_most"]


# ---- annotations -------------------------------------------------------------------------------------------
def test_annotation_session_add_tick_save_reload(smollm, tmp_path):
    from ffnlib.widgets.annotation import AnnotationSession

    path = tmp_path / "notes.csv"
    session = AnnotationSession(_hand_built(), smollm.tokenizer, path=path, annotator="tester", seed=0, n=25)
    with pytest.raises(ParameterError, match="next_key"):
        session.add_pattern("x", "shallow")
    shown = session.next_key(layer=0, memory=0)
    assert len(shown) == 25
    p = session.add_pattern("ends with token 7", "shallow")
    for rank in range(10):
        session.tick(p, rank)
    q = session.add_pattern("about the arts", "semantic")
    for rank in (0, 1, 10, 11):
        session.tick(q, rank)
    session.tick(q, 11, covered=False)
    assert session.coverage() == pytest.approx(11 / 25)
    with pytest.raises(ParameterError, match="kind"):
        session.add_pattern("x", "deep")
    with pytest.raises(ParameterError, match="rank"):
        session.tick(p, 25)
    session.save()
    session.next_key(layer=0, memory=1)
    short = session.add_pattern("too few", "semantic")
    session.tick(short, 0)
    with pytest.raises(ParameterError, match="at least 3"):
        session.save()
    session.remove_pattern(short)
    session.save()  # a key with no pattern
    saved = session.load()
    assert len(saved) == 3 and list(saved.columns) == keys.ANNOTATION_COLUMNS
    assert saved.loc[0, "covered"] == "0;1;2;3;4;5;6;7;8;9" and saved.loc[1, "covered"] == "0;1;10"
    summary = keys.summarise_annotations(saved, n_layers=1)
    assert summary["keys"] == 2
    assert summary["patterns_per_key"] == pytest.approx(1.0)  # 2 patterns and 0 patterns
    assert summary["coverage"] == pytest.approx((11 / 25 + 0) / 2)
    assert keys.summarise_annotations(keys.read_annotations(tmp_path / "none"))["keys"] == 0


def test_annotation_widget_builds(smollm):
    from ffnlib.widgets.annotation import AnnotationSession, annotation_widget

    session = AnnotationSession(_hand_built(), smollm.tokenizer, path="/nonexistent/never-written.csv", seed=1)
    box = annotation_widget(session)
    assert session.layer == 0 and len(box.children) == 6


# ---- bad inputs ---------------------------------------------------------------------------------------------
def test_bad_inputs_raise_ffnlib_errors(tiny, sentences):
    with pytest.raises(ParameterError, match="k must be a positive int"):
        mine(tiny, sentences, k=0)
    with pytest.raises(ParameterError, match="larger than the number of sentences"):
        mine(tiny, sentences, k=41)
    with pytest.raises(ParameterError, match="k must be an int"):
        mine(tiny, sentences, k=True)
    with pytest.raises(ParameterError, match="per_sentence"):
        mine(tiny, sentences, per_sentence="first")
    with pytest.raises(ParameterError, match="out of range"):
        mine(tiny, sentences, layers=[3])
    with pytest.raises(ParameterError, match="empty"):
        mine(tiny, sentences, layers=[])
    with pytest.raises(ParameterError, match="negative"):
        mine(tiny, sentences, negative="yes")
    with pytest.raises(CorpusError, match="empty"):
        mine(tiny, sentences.iloc[:0])
    blank = sentences.copy()
    blank.loc[2, "text"] = "   "
    with pytest.raises(CorpusError, match=f"sentence_id \\[{blank.loc[2, 'sentence_id']}\\]"):
        mine(tiny, blank)
    dup = sentences.copy()
    dup.loc[1, "sentence_id"] = dup.loc[0, "sentence_id"]
    with pytest.raises(CorpusError, match="unique"):
        mine(tiny, dup)
    with pytest.raises(CorpusError, match="column"):
        mine(tiny, sentences.drop(columns="text"))


# ---- plots ------------------------------------------------------------------------------------------------
def test_plots_return_figures(tiny, sentences):
    import matplotlib.figure

    from ffnlib.plots import keys as plots

    ex = mine(tiny, sentences, k=4)
    removal = keys.removal_experiment(tiny, ex, n_keys=2, top=3, progress=False)
    fig = plots.plot_removal(keys.removal_summary(removal, n_layers=3), paper={"last": (-67.5, -20)})
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes[0].lines) >= 4
    measures = keys.layer_pattern_measures(ex, n_layers=3, top=4, random_keys=20)
    assert isinstance(plots.plot_pattern_measures(measures), matplotlib.figure.Figure)
    per_layer = pd.DataFrame({"layer": [0, 1], "relative_depth": [0.5, 1.0], "patterns_per_key": [2, 3],
                              "coverage": [0.5, 0.7]})
    assert isinstance(plots.plot_annotation_summary(per_layer), matplotlib.figure.Figure)


def test_random_removal_is_uniform_over_the_prefix():
    """Each prefix takes the first draw of its sentence's stream that falls inside it: uniform over its
    tokens, even when a longer prefix of the same sentence shares the stream."""
    rng = np.random.default_rng(0)
    n = 3000
    sentence_ids = np.repeat(np.arange(n), 2)
    positions = np.tile([4, 20], n)  # a short and a long prefix in each 30-token sentence
    index = {i: list(range(30)) for i in range(n)}
    removed = keys.random_removals(sentence_ids, positions, index, 1, rng)  # with a BOS token
    short, long_ = removed[0::2], removed[1::2]
    assert short.min() == 1 and short.max() == 4 and long_.min() == 1 and long_.max() == 20
    counts = np.bincount(short, minlength=5)[1:]
    assert np.all(np.abs(counts / n - 1 / 4) < 0.03), counts
    counts = np.bincount(long_, minlength=21)[1:]
    assert np.all(np.abs(counts / n - 1 / 20) < 0.015), counts


def test_top_k_by_score_falls_back_to_the_exact_sort_only_where_scores_tie():
    """Rows whose first k+1 scores all differ are settled by a top-k on the scores; rows with a tie there
    (at the k-th place, inside the top k, or among empty -inf slots) are sorted by key: both agree with
    the two stable sorts everywhere."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(40, 30, generator=g)
    keys_ = torch.stack([torch.randperm(1000, generator=g)[:30] for _ in range(40)])
    k = 6
    top = scores.topk(k + 1, dim=1)
    scores[0, top.indices[0, k]] = top.values[0, k - 1]  # a tie at the k-th place: the key decides who stays
    scores[1, top.indices[1, 3]] = top.values[1, 2]  # a tie inside the top k: the key decides the order
    scores[2, 10:] = float("-inf")  # empty slots below the top k + 1: no tie there, the fast path
    scores[3, :] = float("-inf")
    scores[3, 5] = 1.0  # one real candidate, then empty slots
    fast = mining.top_sorted(scores, keys_, k)
    exact = mining.sort_exact(scores, keys_, k)
    assert torch.equal(fast[0], exact[0]) and torch.equal(fast[1], exact[1])
    assert fast[1][0, k - 1] == min(keys_[0, top.indices[0, k]], keys_[0, top.indices[0, k - 1]])
    assert fast[1][1, 2] == min(keys_[1, top.indices[1, 2]], keys_[1, top.indices[1, 3]])


def test_trigger_table_finds_sentences_by_any_id():
    """Sentence ids far apart (a lookup table would be huge) and close together give the same table."""
    g = torch.Generator().manual_seed(3)
    ids = np.array([5, 1, 3, 0, 4, 2])
    table = pd.DataFrame({"sentence_id": ids, "token_ids": [[7, 8, 9][: 1 + i % 3] + [i] for i in range(6)]})
    scores = torch.rand(1, 1, 2, 3, generator=g).sort(-1, descending=True).values
    sentence = torch.randint(0, 6, (1, 1, 2, 3), generator=g)
    position = torch.randint(0, 2, (1, 1, 2, 3), generator=g)
    near = keys.state_frame(mining.TopKState([0], [1], scores, (torch.as_tensor(ids)[sentence] << 20) | position), table)
    far_ids = ids * (1 << 36)
    far = keys.state_frame(mining.TopKState([0], [1], scores, (torch.as_tensor(far_ids)[sentence] << 20) | position),
                           table.assign(sentence_id=far_ids))
    assert (far["sentence_id"] == near["sentence_id"] * (1 << 36)).all()
    pd.testing.assert_frame_equal(far.drop(columns="sentence_id"), near.drop(columns="sentence_id"))
    tokens = dict(zip(ids, table["token_ids"]))
    for r in near.itertuples():
        ids_ = tokens[r.sentence_id]
        assert r.next_token == (ids_[r.position + 1] if r.position + 1 < len(ids_) else -1)


def test_sentences_longer_than_the_model_reads_are_left_out_whole_with_a_warning(smollm, sentences, wiki):
    """A model with learned positions (wiki-relu-lm: 128) cannot read a longer sentence: it is left out, said in a
    warning, everywhere sentences are tokenized for the model (mining, MoEfication, Section 5's examples)."""
    from ffnlib import aggregation

    model = tiny_llama(layers=1)
    model.config.max_position_embeddings = 24
    short = wrap(model, smollm.tokenizer, name="short-context")
    assert short.max_positions == 24
    everything = mining.prepare_sentences(wrap(tiny_llama(layers=1), smollm.tokenizer), sentences)
    fits = everything["token_ids"].map(len) <= 24
    assert 0 < fits.sum() < len(fits)  # the sample has both kinds
    with pytest.warns(UserWarning, match=rf"{(~fits).sum()} of 40 sentences are longer than the 24 positions "
                                         r"short-context reads \(BOS included\) and are left out"):
        table = mining.prepare_sentences(short, sentences)
    assert table["sentence_id"].tolist() == everything.loc[fits, "sentence_id"].tolist()
    with pytest.warns(UserWarning, match="left out"):
        examples = mine(short, sentences, layers=[0])
    assert set(examples.triggers["sentence_id"]) <= set(table["sentence_id"])
    heldout = aggregation.sample_examples(short, 30, corpus=wiki)
    assert 0 < len(heldout) < 30 and heldout["token_ids"].map(len).max() <= 24
    model.config.max_position_embeddings = 2
    with pytest.raises(CorpusError, match="Every sentence is longer than the 2 positions short-context reads"):
        mining.prepare_sentences(short, sentences)
