"""The memory card (ffnlib.card) on the ci-scale results of the default model that tests/test_notebooks.py computes
(this file runs after it, in the same worker: tests/conftest.py orders it so), or on ``$FFNLIB_TEST_RESULTS``. Run on
its own, the fixture executes the notebooks the card reads (01, 02, 03, 06, 07, 10) first, as test_notebooks does."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ci_results import ci_results_dir
from ffnlib.card import FIELD_NOTEBOOKS, MemoryCard, memory_card, open_results, percentile, survival
from ffnlib.suite import SUITE

# the same worker and results folder as tests/test_notebooks.py (`make test` runs --dist loadgroup)
pytestmark = pytest.mark.xdist_group("ci-results")

READ = ("01_keys", "02_values", "03_aggregation", "06_knowledge_neurons", "07_moefication", "10_corpus_size")


@pytest.fixture(scope="module")
def ci_results(tmp_path_factory) -> Path:
    return ci_results_dir(tmp_path_factory, READ)  # normally there already, from tests/test_notebooks.py


@pytest.fixture(scope="module")
def run(smollm, ci_results):
    return open_results(smollm, ci_results, scale="ci")


def _named_notebook(line: str) -> str:
    assert line.startswith("run notebook "), line
    name = line.removeprefix("run notebook ").split(":")[0].split()[0]
    assert name in SUITE, line
    return name


def _check_filled_or_named(card: MemoryCard) -> None:
    for name in card.tables():
        value = getattr(card, name)
        if value is None:
            assert name in card.missing, f"{name} is empty and names no notebook"
            _named_notebook(card.missing[name])
        else:
            assert name not in card.missing, f"{name} is filled and also listed as missing"
            assert hasattr(value, "columns"), f"{name} is neither a DataFrame nor None"
    json.loads(json.dumps(card.to_dict()))  # JSON-able


def _kn(run):
    neurons = run.table("06_neurons")
    if neurons is None or neurons.empty:
        pytest.skip("notebook 06 found no knowledge neuron at scale ci")
    return neurons.iloc[0]


def test_every_field_is_filled_or_names_the_notebook_that_computes_it(smollm, run):
    neuron = _kn(run)
    card = memory_card(smollm, int(neuron["layer"]), int(neuron["memory"]), results=run)
    _check_filled_or_named(card)
    # what the ci run computes is read, not reported missing
    for name in ("triggers", "pattern", "value_tokens", "value_agreement", "aggregation", "facts", "suppression",
                 "corpus_size", "percentiles"):
        assert getattr(card, name) is not None, card.missing.get(name)
    assert set(card.triggers["sign"]) == {1, -1} and (card.triggers.groupby("sign").size() == 10).all()
    assert card.notes["value_tokens"].startswith("notebook 02's projection")
    # the value's top token is the one notebook 02 projected, and agreement compares it with the top trigger's next
    top = card.value_tokens[(card.value_tokens["sign"] == 1) & (card.value_tokens["rank"] == 0)]["token_id"].item()
    agreement = card.value_agreement.set_index("sign").loc[1]
    assert agreement["top_token"] == top
    assert agreement["agrees"] == (agreement["trigger_next_token"] == top)
    # the corpus-size snapshots end with the whole corpus, where the whole top-k set is kept
    whole = card.corpus_size[card.corpus_size["sentences"] == card.corpus_size["sentences"].max()]
    assert (whole["kept_share"] == 1.0).all() and card.corpus_size["sentences"].nunique() >= 2


def test_a_knowledge_neurons_card_lists_the_fact_it_was_found_for(smollm, run):
    neuron = _kn(run)
    card = memory_card(smollm, int(neuron["layer"]), int(neuron["memory"]), results=run)
    facts = card.facts[(card.facts["fact_id"] == neuron["fact_id"]) & (card.facts["sign"] == neuron["sign"])]
    assert len(facts) == 1 and facts["relation"].item() == neuron["relation"]
    assert facts["subject"].item() and facts["answer"].item(), card.notes.get("facts")
    assert facts["mean_score"].item() > 0  # its attribution for that fact, read from 06's cached attribution
    # suppressing it alone, at the fact's prompts, beside a random memory of its layer (notebook 06's rows)
    alone = card.suppression.set_index(["fact_id", "sign"]).loc[(int(neuron["fact_id"]), int(neuron["sign"]))]
    each = run.table("06_suppress_each")
    mine = each[(each["layer"] == neuron["layer"]) & (each["memory"] == neuron["memory"])
                & (each["fact_id"] == neuron["fact_id"]) & (each["sign"] == neuron["sign"])]
    assert alone["prompts"] == (mine["kind"] == "knowledge").sum() > 0
    assert alone["change"] == pytest.approx(mine.loc[mine["kind"] == "knowledge", "change"].mean())
    assert np.isfinite(alone["random_change"])


def test_a_cards_aggregation_is_notebook_03s_per_memory_row(smollm, run):
    from ffnlib.participation import MEMORY_COLUMNS

    card = memory_card(smollm, 15, 321, results=run)
    assert card.aggregation is not None, card.missing.get("aggregation")
    name = run.find(analysis="section5-memories")[0]
    row = run.load(name).set_index(["layer", "memory"]).loc[(15, 321)]
    for column in MEMORY_COLUMNS:
        assert card.aggregation[column].item() == row[column]
    placed = card.percentiles[card.percentiles["section"] == "aggregation"]
    assert len(placed) == 3 and placed["control_percentile"].notna().all()  # the ci run has a control


def test_an_expert_mates_card_lists_the_first_memory_as_its_mate(smollm, run):
    layers = (run.summary("07_moefication") or {}).get("layers")
    assert layers, "notebook 07 records the layers it MoEfied"
    layer = int(layers[0])
    first = memory_card(smollm, layer, 0, results=run)
    assert first.experts is not None, first.missing.get("experts")
    assert {"kmeans", "coactivation", "random"} <= set(first.experts["split"])
    size = run.summary("07_moefication")["expert_size"]
    for row in first.experts.itertuples():
        assert row.size == size and len(row.mates) == size - 1 and 0 not in row.mates
        mate = memory_card(smollm, layer, int(row.mates[-1]), results=run)
        theirs = mate.experts.set_index("split").loc[row.split]
        assert theirs["expert"] == row.expert and 0 in theirs["mates"]
    # the trained router's picks of the memory's expert, at each share kept; a mate's expert is the same expert
    assert first.router is not None, first.missing.get("router")
    assert set(first.router["split"]) <= set(first.experts["split"]) and len(first.router)
    assert first.router["picked_rate"].between(0, 1).all()
    kmeans = first.router[first.router["split"] == "kmeans"].reset_index(drop=True)
    mate = memory_card(smollm, layer, int(first.experts.set_index("split").loc["kmeans", "mates"][0]), results=run)
    theirs = mate.router[mate.router["split"] == "kmeans"].reset_index(drop=True)
    assert kmeans[["share", "expert", "picked_rate"]].equals(theirs[["share", "expert", "picked_rate"]])


def test_a_card_on_an_empty_results_folder_names_the_notebooks_for_every_section(smollm, run, tmp_path):
    card = memory_card(smollm, 27, 100, results=tmp_path)
    _check_filled_or_named(card)
    assert card.results is None
    assert set(card.missing) == set(FIELD_NOTEBOOKS) - {"value_tokens"}
    named = {_named_notebook(line) for line in card.missing.values()}
    assert {"01_keys", "03_aggregation", "06_knowledge_neurons", "07_moefication", "10_corpus_size"} <= named
    # only the value's top tokens are computed (from the weights), and they are the ones notebook 02 cached
    cached = memory_card(smollm, 27, 100, results=run).value_tokens
    assert card.value_tokens["token_id"].tolist() == cached["token_id"].tolist()
    np.testing.assert_allclose(card.value_tokens["probability"], cached["probability"], rtol=1e-4)


def test_percentiles_are_in_0_100_against_the_layer_and_the_control(smollm, run):
    card = memory_card(smollm, 15, 321, results=run)
    table = card.percentiles
    assert set(table["section"]) >= {"keys", "values", "corpus_size"}
    assert table["layer_percentile"].between(0, 100).all() and (table["layer_memories"] == smollm.adapter.d_ff).any()
    control = table["control_percentile"].dropna()
    assert len(control) and control.between(0, 100).all(), "the ci run has a random-weights control"
    assert card.control and card.control == run.control_name


def test_percentile_and_survival():
    assert percentile(4.0, [1, 2, 3, 4]) == 87.5 and percentile(0.0, [1, 2]) == 0.0
    assert percentile(5.0, [1, 2]) == 100.0 and np.isnan(percentile(1.0, [np.nan]))
    whole = np.array([[[1, 2, 3, 4]]])
    assert survival(np.array([[[4, 9, 1, 7]]]), whole).tolist() == [[0.5]]
