"""The memory card in the explorer's memory view and in the static atlas (ffnlib.widgets.card_view), on the ci-scale
results that tests/test_notebooks.py computes (the same worker and folder as tests/test_card.py, whose fixtures this
file shares; tests/conftest.py runs it after test_notebooks). The links are followed as a click does: the target
written into the explorer's hidden box, or an atlas page's href opened."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch

from ffnlib.capture import capture
from ffnlib.card import knowledge_neurons
from ffnlib.explorer import NOTABLE, Explorer
from ffnlib.keys import load_trigger_examples
from ffnlib.widgets.atlas import export_atlas, memory_page_name
from ffnlib.widgets.explorer import ExplorerWidget
from test_card import ci_results, run  # noqa: F401  (the shared ci-results fixtures)

pytestmark = pytest.mark.xdist_group("ci-results")


@pytest.fixture(scope="module")
def triggers(run):
    """The run's trigger examples, loaded whole, as notebook 05 has them."""
    name = next(n for n, r in run.manifests().items()
                if r.get("analysis") == "trigger_examples" and not n.endswith("-sentences"))
    return load_trigger_examples(run.folder, name, run.manifests()[name])


@pytest.fixture(scope="module")
def neuron(run):
    """A knowledge neuron of notebook 06 in a layer notebook 07 MoEfied: its card has facts and expert mates."""
    moefied = set((run.summary("07_moefication") or {}).get("layers") or [])
    neurons = knowledge_neurons(run)
    mine = None if neurons is None else neurons[neurons["layer"].isin(moefied) & (neurons["sign"] == 1)]
    if mine is None or mine.empty:
        pytest.skip("notebook 06 found no knowledge neuron in a layer notebook 07 MoEfied at scale ci")
    return int(mine["layer"].iloc[0]), int(mine["memory"].iloc[0])


def expert_size(run) -> int:
    """Notebook 07's expert size."""
    return int(run.summary("07_moefication")["expert_size"])


def _links(page: str) -> list[dict]:
    return [json.loads(html.unescape(t)) for t in re.findall(r'data-link="([^"]*)"', page)]


def test_the_memory_view_shows_the_card_and_follows_each_kind_of_link(smollm, run, triggers, neuron):
    layer, memory = neuron
    ui = ExplorerWidget(Explorer(smollm, triggers, card_results=run, n_triggers=3))
    ui.show_memory(layer, memory)
    card, page = ui.explorer.card, ui.memory_out.value
    assert (card.layer, card.memory) == (layer, memory) and 'class="ffn-triggers"' in page  # today's view, then
    assert page.index('class="ffn-triggers"') < page.index('class="ffn-card"')  # the card under it
    assert [p for p in re.findall(r'data-paper="(\w+)"', page)] == ["geva", "dai", "moefication"]
    for field in card.missing:  # a section the run lacks names the notebook that computes it
        line = re.search(rf'data-field="{field}">([^<]*)<', page).group(1)
        assert html.unescape(line) == card.missing[field] and line.startswith("run notebook ")
    links = _links(page)
    facts = [t for t in links if t["view"] == "prompt" and t["prompt"] in set(card.facts["prompt"])]
    # the card's memory links (the memories like this one, listed above the card, are tests/test_similar.py's)
    mates = [t for t in _links(page[page.index('class="ffn-card"'):]) if t["view"] == "memory"]
    examples = [t for t in links if t["view"] == "prompt" and t not in facts]
    assert len(facts) == len(card.facts) and all(r.subject in r.prompt for r in card.facts.itertuples())
    assert len(mates) == sum(len(m) for m in card.experts["mates"]) and {t["layer"] for t in mates} == {layer}
    assert len(examples) == 3 * len(ui.explorer.view.sides)
    # a trigger example opens the prompt view on its prefix, whose last position is where the memory fires
    example, top = examples[0], ui.explorer.view.sides[0].triggers.iloc[0]
    assert example["prompt"] == top.prefix + top.last_token
    ui.link_target.value = json.dumps(example)
    assert ui.tabs.selected_index == 1 and ui.prompt.value == example["prompt"] and ui.explorer.analysis is not None
    assert ui.link_target.value == ""  # emptied: the same link can be clicked again
    with capture(smollm, layer, what=("coefficients",)) as acts, torch.no_grad():
        smollm.model(torch.tensor([smollm.encode(example["prompt"])]))
    assert float(acts.coefficients[layer][0, -1, memory]) == pytest.approx(top.coefficient, rel=0.02)
    # a fact opens the prompt view on the prompt notebook 06 asked
    ui.link_target.value = json.dumps(facts[0])
    assert ui.prompt.value == card.facts["prompt"].iloc[0] and ui.explorer.analysis.prompt == ui.prompt.value
    # an expert mate opens its memory view, whose card lists this memory as its mate under the same split
    kmeans = card.experts.set_index("split").loc["kmeans"]
    mate = next(t for t in mates if t["memory"] == kmeans["mates"][0])
    ui.link_target.value = json.dumps(mate)
    assert ui.tabs.selected_index == 0 and (ui.explorer.view.layer, ui.explorer.view.memory) == (layer, mate["memory"])
    theirs = ui.explorer.card.experts.set_index("split").loc["kmeans"]
    assert theirs["expert"] == kmeans["expert"] and memory in theirs["mates"]
    ui.follow("not a link")
    assert 'class="ffn-error"' in ui.memory_out.value


def test_a_card_without_results_names_the_notebook_of_every_section(smollm, triggers, tmp_path):
    ui = ExplorerWidget(Explorer(smollm, triggers, card_results=tmp_path, n_triggers=2))
    ui.show_memory(5, 7)
    page = html.unescape(ui.memory_out.value)
    for notebook in ("01_keys", "03_aggregation", "06_knowledge_neurons", "07_moefication", "10_corpus_size"):
        assert f"run notebook {notebook}" in page  # (the value's top tokens come from the weights: 02 is not needed)
    card = ui.memory_out.value[ui.memory_out.value.index('class="ffn-card"'):]
    assert "Top tokens of v" in page and not [t for t in _links(card) if t["view"] == "memory"]


def test_the_atlas_writes_a_card_page_per_memory_and_an_index_of_notable_ones(smollm, run, triggers, neuron,
                                                                                 tmp_path):
    layer, memory = neuron
    out = tmp_path / "atlas"
    index = export_atlas(smollm, triggers, out, memories=[(layer, memory)], n_triggers=3, k_tokens=3, results=run,
                         notable=2, mates=1, layers=[layer])
    atlas = json.loads((out / "atlas.json").read_text())
    pages = {tuple(pair) for pair in atlas["memories"]}
    # every knowledge neuron of notebook 06 in the atlas's layer has a page, and the index lists it
    neurons = knowledge_neurons(run)
    assert {(layer, int(m)) for m in neurons[neurons["layer"] == layer]["memory"]} <= pages
    front = index.read_text()
    for reason in NOTABLE:
        assert f'data-reason="{reason}"' in front
    listed = set(re.findall(r'href="memories/(L\d+_M\d+\.html)"', front))
    assert listed and all((out / "memories" / name).exists() for name in listed)
    assert "no held-out coefficient sample" in front  # "most active" needs the sample, and says so
    # the card page of the neuron: its facts, and its expert mates linking to their own pages where they have one
    page = (out / "memories" / memory_page_name(layer, memory)).read_text()
    assert 'class="ffn-card"' in page and "ffn-card-facts" in page and "data-link" not in page
    mates = re.findall(r'<div class="ffn-mates" data-split="kmeans">(.*?)</div>', page)[0]
    linked = re.findall(r'href="(L\d+_M\d+\.html)"', mates)
    assert linked and all((out / "memories" / name).exists() for name in linked)
    assert len(re.findall(r"#\d+", mates)) == expert_size(run) - 1  # mates without a page are listed, unlinked
    first = memory_page_name(layer, int(re.findall(r"#(\d+)", mates)[0]))
    assert first in linked and f"expert mate of #{memory}" in atlas["reasons"][first]  # mates=1: its first mate
    # static and offline: no script, nothing fetched
    for path in out.rglob("*.html"):
        text = path.read_text()
        assert "<script" not in text and not re.search(r'(src|href)="(https?:)?//', text), path
