"""The memory explorer as ipywidgets: three tabs (memory, prompt, interventions) over an
:class:`ffnlib.explorer.Explorer`.

This module only wires widgets to the explorer's methods and renders with ``ffnlib.widgets.render`` (and the
memory's card, when the explorer has a run's results, with ``ffnlib.widgets.card_view``); every callback is a plain
method (``show_memory``, ``search``, ``pick_result``, ``analyse``, ``attribute``, ``open_contributor``,
``show_contributions``, ``add_selected``, ``clear_edits``, ``apply``, ``follow``) that tests call directly or through
``button.click()``.

Links between views: in the memory view, a trigger example opens the prompt view on its prefix, a memory listed
under "Memories like this one" opens its memory view, and in the card a fact opens the prompt view on its prompt and
an expert mate opens its memory view. A link writes its target (JSON)
into a hidden text box of the explorer (one inline ``onclick``: widget HTML runs no script), whose change calls
:meth:`ExplorerWidget.follow`.

Errors a user can cause (a bad layer, an unknown token, unreadable edits) are shown in the view, not raised.
"""

from __future__ import annotations

import html
import json
from contextlib import contextmanager

import ipywidgets as w

from ..errors import FFNLibError
from ..explorer import SEARCH_BY, Explorer, format_edits
from .card_view import render_card
from .render import (attribution_label, contributor_label, render_attribution, render_contribution_maps, render_error,
                     render_intervention, render_memory_view, render_prompt_analysis, render_search_results,
                     render_similar, search_label)

__all__ = ["MODES", "ExplorerWidget", "explorer_widget"]

MODES = ("switch off", "set coefficient to")
# a link's click: its target (data-link) into the explorer's hidden text box, as typing would
_FOLLOW = ("var b=this.closest('.ffn-explorer'),i=b&&b.querySelector('.ffn-link-target input');"
           "if(i){i.value=this.dataset.link;i.dispatchEvent(new Event('change',{bubbles:true}));}return false;")


def _classed(widget, *names):
    for name in names:
        widget.add_class(name)
    return widget


class ExplorerWidget:
    """The explorer's user interface. ``ExplorerWidget(explorer)`` displays itself in a notebook."""

    def __init__(self, explorer: Explorer, prompt: str = "The capital of France is"):
        self.explorer = explorer
        adapter = explorer.adapter
        # memory view
        self.layer = _classed(w.BoundedIntText(value=explorer.layer, min=0, max=adapter.n_layers - 1,
                                               description="layer", layout=w.Layout(width="150px")), "ffn-layer")
        self.memory = _classed(w.BoundedIntText(value=explorer.memory, min=0, max=adapter.d_ff - 1,
                                                description="memory", layout=w.Layout(width="170px")), "ffn-memory")
        self.show_button = _classed(w.Button(description="Show memory", button_style="primary"), "ffn-show")
        self.query = _classed(w.Text(placeholder="a token (e.g. Paris) or a word", description="search",
                                     layout=w.Layout(width="320px")), "ffn-query")
        self.search_by = _classed(w.Dropdown(options=list(SEARCH_BY), value=SEARCH_BY[0],
                                             layout=w.Layout(width="140px")), "ffn-search-by")
        self.search_button = _classed(w.Button(description="Search"), "ffn-search")
        self.results = _classed(w.Select(options=[], rows=6, layout=w.Layout(width="620px")), "ffn-results")
        self.memory_out = _classed(w.HTML(), "ffn-memory-out")
        self.link_target = _classed(w.Text(value="", layout=w.Layout(display="none")), "ffn-link-target")
        # prompt view
        self.prompt = _classed(w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px")),
                               "ffn-prompt-input")
        self.analyse_button = _classed(w.Button(description="Analyse", button_style="primary"), "ffn-prompt-run")
        self.attribute_button = _classed(w.Button(description="Attribute", tooltip=(
            "the memories with the largest integrated-gradients attribution for the prediction (a few seconds)")),
            "ffn-attribute")
        self.contributors = _classed(w.Select(options=[], rows=6, description="memories",
                                              layout=w.Layout(width="620px")), "ffn-contributors")
        self.open_button = _classed(w.Button(description="Show in memory view", layout=w.Layout(width="170px")),
                                    "ffn-open")
        self.prompt_out = _classed(w.HTML(), "ffn-prompt-out")
        # prompt view: the contributions panel (the four maps of Kobayashi et al. for one layer)
        self.maps_layer = _classed(w.BoundedIntText(value=0, min=0, max=adapter.n_layers - 1, description="layer",
                                                    layout=w.Layout(width="150px")), "ffn-maps-layer")
        self.maps_button = _classed(w.Button(description="Contributions"), "ffn-maps-run")
        self.maps_out = _classed(w.HTML(), "ffn-maps-out")
        # interventions
        self.edit_prompt = _classed(w.Text(value=prompt, description="prompt", layout=w.Layout(width="520px")),
                                    "ffn-edit-prompt")
        self.candidates = _classed(w.SelectMultiple(options=[], rows=6, description="memories",
                                                    layout=w.Layout(width="620px")), "ffn-candidates")
        self.mode = _classed(w.Dropdown(options=list(MODES), value=MODES[0], layout=w.Layout(width="170px")),
                             "ffn-mode")
        self.value = _classed(w.FloatText(value=10.0, layout=w.Layout(width="90px")), "ffn-value")
        self.add_button = _classed(w.Button(description="Add selected"), "ffn-add")
        self.edits = _classed(w.Text(value="", placeholder="layer:memory (off) or layer:memory=value, ...",
                                     description="edits", layout=w.Layout(width="520px")), "ffn-edits")
        self.clear_button = _classed(w.Button(description="Clear"), "ffn-clear")
        self.new_tokens = _classed(w.BoundedIntText(value=explorer.max_new_tokens, min=0, max=64,
                                                    description="new tokens", layout=w.Layout(width="170px")),
                                   "ffn-new-tokens")
        self.apply_button = _classed(w.Button(description="Apply", button_style="warning"), "ffn-apply")
        self.edit_out = _classed(w.HTML(), "ffn-edit-out")

        self.show_button.on_click(lambda _: self.show_memory())
        self.search_button.on_click(lambda _: self.search())
        self.results.observe(lambda change: self.pick_result(change["new"]), names="value")
        self.analyse_button.on_click(lambda _: self.analyse())
        self.attribute_button.on_click(lambda _: self.attribute())
        self.open_button.on_click(lambda _: self.open_contributor())
        self.maps_button.on_click(lambda _: self.show_contributions())
        self.add_button.on_click(lambda _: self.add_selected())
        self.clear_button.on_click(lambda _: self.clear_edits())
        self.apply_button.on_click(lambda _: self.apply())
        self.link_target.observe(lambda change: self._followed(change["new"]), names="value")

        memory_tab = w.VBox([w.HBox([self.layer, self.memory, self.show_button]),
                             w.HBox([self.query, self.search_by, self.search_button]), self.results, self.memory_out,
                             self.link_target])
        contributions = w.Accordion(children=[w.VBox([w.HBox([self.maps_layer, self.maps_button]), self.maps_out])])
        contributions.set_title(0, "contributions")
        prompt_tab = w.VBox([w.HBox([self.prompt, self.analyse_button, self.attribute_button]),
                             w.HBox([self.contributors, self.open_button]), self.prompt_out, contributions])
        edit_tab = w.VBox([self.edit_prompt, self.candidates, w.HBox([self.mode, self.value, self.add_button]),
                           w.HBox([self.edits, self.clear_button]), w.HBox([self.new_tokens, self.apply_button]),
                           self.edit_out])
        self.tabs = _classed(w.Tab(children=[memory_tab, prompt_tab, edit_tab]), "ffn-explorer")
        for i, title in enumerate(("Memory", "Prompt", "Interventions")):
            self.tabs.set_title(i, title)
        self.widget = self.tabs

    def _repr_mimebundle_(self, **kwargs):
        return self.widget._repr_mimebundle_(**kwargs)

    @contextmanager
    def _busy(self, button: w.Button, out: w.HTML):
        label = button.description
        button.disabled, button.description = True, "Working…"
        try:
            yield
        except FFNLibError as exc:
            out.value = render_error(exc)
        finally:
            button.disabled, button.description = False, label

    # ---- memory view ----
    def show_memory(self, layer: int | None = None, memory: int | None = None) -> None:
        if layer is not None:
            self.layer.value = int(layer)
        if memory is not None:
            self.memory.value = int(memory)
        with self._busy(self.show_button, self.memory_out):
            view = self.explorer.show_memory(int(self.layer.value), int(self.memory.value))
            card = render_card(self.explorer.card, self.link) if self.explorer.card is not None else ""
            below = render_similar(self.explorer.similar, self.link) + card
            self.memory_out.value = render_memory_view(view, self.explorer.loaded.name, link=self.link, below=below)

    @staticmethod
    def link(target: dict) -> str:
        """The attributes of a link to ``target`` (``ffnlib.widgets.render.memory_target`` / ``prompt_target``)."""
        return (f'href="#" data-link="{html.escape(json.dumps(target), quote=True)}" '
                f'onclick="{html.escape(_FOLLOW, quote=True)}"')

    def follow(self, target: dict | str) -> None:
        """Open a link's target: a memory in the memory view, or a prompt in the prompt view (analysed)."""
        try:
            target = json.loads(target) if isinstance(target, str) else dict(target)
            view = target["view"]
            if view == "memory":
                self.tabs.selected_index = 0
                self.show_memory(int(target["layer"]), int(target["memory"]))
            elif view == "prompt":
                self.prompt.value = str(target["prompt"])
                self.tabs.selected_index = 1
                self.analyse()
            else:
                raise ValueError(view)
        except (ValueError, KeyError, TypeError) as exc:
            self.memory_out.value = render_error(ValueError(f"Cannot follow the link {target!r}: {exc!r}"))

    def _followed(self, value: str) -> None:
        if value:
            self.link_target.value = ""  # the same link can be followed again
            self.follow(value)

    def search(self) -> None:
        with self._busy(self.search_button, self.memory_out):
            by = self.search_by.value
            frame = self.explorer.search(self.query.value, by=by)
            self.results.options = [(search_label(r, by), (int(r.layer), int(r.memory)))
                                    for r in frame.itertuples()]
            if frame.empty:
                self.memory_out.value = render_search_results(frame, by)
            elif self.results.value == self.results.options[0][1]:  # jump to the best result
                self.show_memory(*self.results.value)
            else:
                self.results.value = self.results.options[0][1]  # (pick_result shows it)

    def pick_result(self, choice) -> None:
        if choice:
            self.show_memory(*choice)

    # ---- prompt view ----
    def analyse(self) -> None:
        with self._busy(self.analyse_button, self.prompt_out):
            analysis = self.explorer.analyse(self.prompt.value)
            self.prompt_out.value = render_prompt_analysis(analysis)
            options = [(contributor_label(r), (int(r.layer), int(r.memory)))
                       for r in analysis.contributors(20).itertuples()]
            self.contributors.options = options
            self.candidates.options = options
            self.edit_prompt.value = analysis.prompt

    def show_contributions(self, layer: int | None = None) -> None:
        """The contributions panel: the four maps of the prompt at the chosen layer."""
        if layer is not None:
            self.maps_layer.value = int(layer)
        with self._busy(self.maps_button, self.maps_out):
            view = self.explorer.contributions(self.prompt.value, int(self.maps_layer.value))
            self.maps_out.value = render_contribution_maps(view)

    def attribute(self) -> None:
        """The memories with the largest attribution for the prediction; they become the selectable memories."""
        with self._busy(self.attribute_button, self.prompt_out):
            attribution = self.explorer.attribute(self.prompt.value)
            self.prompt_out.value = render_attribution(attribution)
            options = [(attribution_label(r), (int(r.layer), int(r.memory))) for r in attribution.memories.itertuples()]
            self.contributors.options = options
            self.candidates.options = options
            self.edit_prompt.value = attribution.prompt

    def open_contributor(self) -> None:
        if self.contributors.value:
            self.tabs.selected_index = 0
            self.show_memory(*self.contributors.value)

    # ---- interventions ----
    def add_selected(self) -> None:
        with self._busy(self.add_button, self.edit_out):
            self.explorer.set_edits(self.edits.value)
            amount = 0.0 if self.mode.value == MODES[0] else float(self.value.value)
            self.explorer.add_edits(self.candidates.value, amount)
            self.edits.value = format_edits(self.explorer.edits)

    def clear_edits(self) -> None:
        self.explorer.set_edits({})
        self.edits.value = ""

    def apply(self) -> None:
        with self._busy(self.apply_button, self.edit_out):
            self.explorer.set_edits(self.edits.value)
            self.explorer.max_new_tokens = int(self.new_tokens.value)
            self.edit_out.value = render_intervention(self.explorer.apply(self.edit_prompt.value))


def explorer_widget(loaded, triggers=None, sample=None, prompt: str = "The capital of France is", results=None,
                    seed: int = 0, **settings) -> ExplorerWidget:
    """Build the explorer for a loaded model, mined trigger examples and a :class:`CoefficientSample`.

    ``results``: the run's results folder (``run.out``), whose memory card the memory view shows (``seed``: the
    run's). ``settings`` go to :class:`ffnlib.explorer.Explorer` (n_triggers, k_tokens, top_memories, max_new_tokens).
    """
    return ExplorerWidget(Explorer(loaded, triggers=triggers, sample=sample, card_results=results, seed=seed,
                                   **settings), prompt=prompt)
