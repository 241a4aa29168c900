"""A static HTML atlas of mined memories: opens in any browser, no kernel, no network, no script.

``export_atlas(loaded, triggers, "results/.../atlas", results=run.out)`` writes

- ``index.html``: the model, the corpus and how memories were chosen, one link per layer, and, with ``results``, the
  memories notable for something (``ffnlib.explorer.notable_memories``): top value agreement, every knowledge neuron
  notebook 06 found, most active on the held-out sample, least stable across corpus sizes;
- ``layers/layer_LL.html``: one row per memory of layer LL with a page (its top trigger with the last token
  marked, its value's top tokens, its largest coefficient, why it has a page), each linking to its page;
- ``memories/L{LL}_M{MMMMM}.html``: a memory's page, as the explorer's memory view shows it (trigger
  examples, top tokens of ``v`` and, for gated FFNs, of ``-v``, pattern measures, and the coefficient
  histogram when a :class:`ffnlib.explorer.CoefficientSample` is given), and with ``results`` its card
  (``ffnlib.card.memory_card``, ``ffnlib.widgets.card_view``), whose expert mates link to their own pages;
- ``atlas.json``: what was written (the list of pages, the selection, why each memory has a page).

Pages are written for a chosen subset only: the ``per_layer`` memories of each layer with the largest
``criterion`` (``"max_coefficient"``: the largest |coefficient| of any trigger example, either sign;
``"mean_coefficient"``: the mean |coefficient| of the top-``k`` triggers of the positive side), or an
explicit list ``memories=[(layer, memory), ...]``; with ``results`` also every notable memory and ``mates`` of the
expert mates of each page's memory (notebook 07's k-means split), so that a card's mates can be followed. A
46k-memory model never gets 46k files by default. Every file is written atomically; a rerun replaces the pages and
removes memory pages no longer chosen.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..card import memory_card, open_results
from ..errors import ParameterError
from ..explorer import NOTABLE, CoefficientSample, layer_key_measures, memory_view, notable_memories
from ..storage import atomic_write_bytes, ensure_dir, write_json
from .card_view import CARD_STYLE, render_card
from .render import STYLE, render_memory_view, token_html

CRITERIA = ("max_coefficient", "mean_coefficient")
_PAGE = re.compile(r"^L\d+_M\d+\.html$")
_LAYER_PAGE = re.compile(r"^layer_\d+\.html$")


def select_memories(triggers, per_layer: int = 3, criterion: str = "max_coefficient",
                    layers: Iterable[int] | None = None) -> pd.DataFrame:
    """The ``per_layer`` memories of each layer with the largest ``criterion`` (layer, memory, score)."""
    if criterion not in CRITERIA:
        raise ParameterError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    if isinstance(per_layer, bool) or not isinstance(per_layer, int) or per_layer <= 0:
        raise ParameterError(f"per_layer must be a positive int, got {per_layer!r}.")
    table = triggers.triggers
    if layers is not None:
        table = table[table["layer"].isin(list(layers))]
    if criterion == "max_coefficient":
        strongest = table[table["rank"] == 0]  # rank 0 holds each side's largest |coefficient|
        score = strongest.assign(score=strongest["coefficient"].abs()).groupby(["layer", "memory"])["score"].max()
    else:
        positive = table[table["sign"] == 1]
        score = positive.assign(score=positive["coefficient"].abs()).groupby(["layer", "memory"])["score"].mean()
    frame = score.reset_index().sort_values(["layer", "score", "memory"], ascending=[True, False, True],
                                            kind="stable")
    return frame.groupby("layer", sort=True).head(per_layer).reset_index(drop=True)


def _page(title: str, body: str, up: str = "") -> bytes:
    nav = f'<p class="ffn-note">{up}</p>' if up else ""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'{STYLE}{CARD_STYLE}<style>body {{ margin: 20px; }} a {{ color: #2456b3; }}</style></head>'
            f'<body class="ffn-view">{nav}{body}</body></html>').encode("utf-8")


def memory_page_name(layer: int, memory: int) -> str:
    return f"L{layer:02d}_M{memory:05d}.html"


def _mates(card, n: int) -> list[int]:
    """The first ``n`` expert mates of a card's memory under notebook 07's k-means split (else its first split)."""
    if card is None or card.experts is None or card.experts.empty or n <= 0:
        return []
    splits = card.experts.set_index("split")["mates"]
    return [int(m) for m in (splits["kmeans"] if "kmeans" in splits.index else splits.iloc[0])[:n]]


def _pages(loaded, chosen: pd.DataFrame, how: str, run, notable, mates: int, seed: int) -> tuple[list, dict, dict]:
    """The memories that get a page, in page order (layer, then the chosen ones first), why each has one, and
    their cards (none without ``run``)."""
    reasons: dict[tuple[int, int], list[str]] = {}
    for r in chosen.itertuples():
        reasons.setdefault((int(r.layer), int(r.memory)), []).append(how)
    cards = {}
    if run is not None:
        for r in notable.table.itertuples() if notable is not None else ():
            reasons.setdefault((r.layer, r.memory), []).append(f"{NOTABLE[r.reason][0].lower()} (#{r.rank})")
        for layer in sorted({layer for layer, _ in reasons}):  # a layer at a time: its rows are read once
            here = [pair for pair in reasons if pair[0] == layer]
            for pair in here:
                cards[pair] = memory_card(loaded, *pair, results=run, seed=seed)
            for pair in here:
                for mate in _mates(cards[pair], mates):
                    reasons.setdefault((layer, mate), []).append(f"expert mate of #{pair[1]}")
                    if (layer, mate) not in cards:
                        cards[(layer, mate)] = memory_card(loaded, layer, mate, results=run, seed=seed)
            run.forget_layer(layer)
    first = {(int(r.layer), int(r.memory)): i for i, r in enumerate(chosen.itertuples())}
    order = sorted(reasons, key=lambda pair: (pair[0], first.get(pair, len(first)), pair[1]))
    return order, reasons, cards


def _static_link(pages: set):
    """The atlas's links: to the page of a memory that has one (a static page has no prompt view)."""
    def link(target: dict) -> str | None:
        pair = (target.get("layer"), target.get("memory"))
        return f'href="{memory_page_name(*pair)}"' if target["view"] == "memory" and pair in pages else None
    return link


def _fact_names(card) -> str | None:
    """A knowledge neuron's facts as their card names them (subject → answer), or None."""
    if card is None or card.facts is None or card.facts.empty or not card.facts["subject"].notna().any():
        return None
    return "; ".join(f"{r.subject} → {r.answer} ({r.relation})" for r in card.facts.itertuples() if r.subject)


def _notable_html(notable, cards: dict) -> str:
    """The index's lists of notable memories, each linking to the memory's page."""
    parts = ['<h3>Notable memories</h3><p class="ffn-note">Each links to the memory\'s page and card.</p>']
    for reason, (title, what) in NOTABLE.items():
        rows = notable.of(reason)
        head = f'<section class="ffn-notable" data-reason="{reason}"><h4>{html.escape(title)}</h4>' \
               f'<p class="ffn-note">{html.escape(what)}. {html.escape(notable.notes.get(reason, ""))}</p>'
        if reason in notable.missing:
            parts.append(f'{head}<p class="ffn-missing">{html.escape(notable.missing[reason])}</p></section>')
            continue
        body = []
        for r in rows.itertuples():
            detail = (_fact_names(cards.get((r.layer, r.memory))) if reason == "knowledge_neuron" else None) or r.detail
            side = {1: "+v", -1: "−v"}.get(r.sign, "±v")
            body.append(f'<tr><td class="num">{r.rank}</td><td><a href="memories/{memory_page_name(r.layer, r.memory)}"'
                        f'>L{r.layer} #{r.memory}</a></td><td>{side}</td><td class="num">{r.score:.3g}</td>'
                        f'<td>{html.escape(detail)}</td></tr>')
        table = (f'<table class="ffn-atlas-notable"><tr><th>#</th><th>memory</th><th>side</th><th>score</th>'
                 f'<th>why</th></tr>{"".join(body)}</table>' if body else '<p class="ffn-note">None.</p>')
        parts.append(f"{head}{table}</section>")
    return "".join(parts)


def export_atlas(loaded, triggers, out_dir, memories: Iterable[tuple[int, int]] | None = None, per_layer: int = 3,
                 criterion: str = "max_coefficient", n_triggers: int = 20, k_tokens: int = 15,
                 sample: CoefficientSample | None = None, negative: bool | None = None, results=None, seed: int = 0,
                 notable: int = 10, mates: int = 2, layers: Iterable[int] | None = None) -> Path:
    """Write the atlas (see the module docstring) to ``out_dir`` and return the path of ``index.html``.

    ``results``: the run's results folder (``run.out``) or an open ``ffnlib.card.RunResults``: each page then shows
    the memory's card (``seed``: the run's), and the index the ``notable`` memories of each kind (``None``: no
    lists), which get pages too, with ``mates`` expert mates of every page's memory. ``layers``: the layers the
    atlas chooses memories from and ranks (default all).
    """
    if triggers is None:
        raise ParameterError("The atlas needs mined trigger examples (ffnlib.keys.mine_trigger_examples).")
    adapter = loaded.adapter
    layers = None if layers is None else sorted({adapter.check_layer(int(layer)) for layer in layers})
    if memories is None:
        chosen = select_memories(triggers, per_layer, criterion, layers=layers)
        how = f"the {per_layer} memories per layer with the largest {criterion.replace('_', ' ')}"
    else:
        pairs = [(adapter.check_layer(int(layer)), int(memory)) for layer, memory in memories]
        if not pairs:
            raise ParameterError("memories is empty: give (layer, memory) pairs, or None to choose per layer.")
        chosen = pd.DataFrame(pairs, columns=["layer", "memory"]).drop_duplicates().reset_index(drop=True)
        chosen["score"] = float("nan")
        how = f"an explicit list of {len(chosen)} memories"
    run = None if results is None else open_results(loaded, results, triggers=triggers)
    found = None if run is None or notable is None else notable_memories(loaded, run, layers, notable, sample)
    ordered, reasons, cards = _pages(loaded, chosen, "chosen: " + how, run, found, mates, seed)
    out = ensure_dir(out_dir)
    memory_dir, layer_dir = ensure_dir(out / "memories"), ensure_dir(out / "layers")
    name = html.escape(loaded.name)
    link = _static_link(set(ordered))
    pages, layer_rows = [], {}
    if sample is not None:
        sample.prefetch(ordered)  # one pass for all pages
    measures = (None, None)  # (layer, its keys' pattern measures), computed once per layer
    for position, (layer, memory) in enumerate(ordered):
        if measures[0] != layer and layer in triggers.layers:
            measures = (layer, layer_key_measures(triggers, layer))
        view = memory_view(loaded, triggers, layer, memory, n_triggers=n_triggers, k_tokens=k_tokens, sample=sample,
                           negative=negative, key_measures=measures[1] if measures[0] == layer else None)
        links = ['<a href="../index.html">atlas index</a>',
                 f'<a href="../layers/layer_{layer:02d}.html">layer {layer}</a>']
        if position > 0:
            links.append(f'<a href="{memory_page_name(*ordered[position - 1])}">previous</a>')
        if position + 1 < len(ordered):
            links.append(f'<a href="{memory_page_name(*ordered[position + 1])}">next</a>')
        why = "; ".join(reasons[(layer, memory)])
        card = cards.get((layer, memory))
        page = memory_page_name(layer, memory)
        body = render_memory_view(view, loaded.name, link=link, below=render_card(card, link) if card else "")
        atomic_write_bytes(memory_dir / page, _page(f"{loaded.name} · layer {layer}, memory {memory}", body,
                                                    " · ".join(links) + f" · why here: {html.escape(why)}"))
        pages.append(f"memories/{page}")
        positive = view.side(1)
        top_trigger = ""
        if positive is not None and not positive.triggers.empty:
            t = positive.triggers.iloc[0]
            top_trigger = (f'<span class="ffn-prefix">{html.escape(t.prefix[-80:])}<mark>'
                           f'{html.escape(t.last_token)}</mark></span>')
        tokens = " ".join(token_html(tok) for tok in positive.top_tokens["token"].head(5)) if positive else ""
        negative_tokens = ""
        if view.side(-1) is not None:
            negative_tokens = "<span class='ffn-neg'>" + " ".join(
                token_html(tok) for tok in view.side(-1).top_tokens["token"].head(5)) + "</span>"
        best = max((abs(float(s.triggers["coefficient"].iloc[0])) for s in view.sides if not s.triggers.empty),
                   default=float("nan"))
        why_cell = f'<td class="ffn-note">{html.escape(why)}</td>' if run is not None else ""
        layer_rows.setdefault(layer, []).append(
            f'<tr><td><a href="../memories/{page}">#{memory}</a></td><td class="num">{best:.3g}</td>'
            f'<td>{top_trigger}</td><td>{tokens}</td><td>{negative_tokens}</td>{why_cell}</tr>')
    layer_pages = []
    negative_head = "<th>top tokens of −v</th>" if adapter.gated else "<th></th>"
    why_head = "<th>why here</th>" if run is not None else ""
    for layer, rows in sorted(layer_rows.items()):
        body = (f'<h3>{name} · layer {layer}</h3><p class="ffn-note">{len(rows)} memories: {html.escape(how)}'
                f'{"; notable ones and expert mates (see the index)" if run is not None else ""}.</p>'
                f'<table class="ffn-atlas-layer"><tr><th>memory</th><th>max |m|</th><th>top trigger example</th>'
                f'<th>top tokens of v</th>{negative_head}{why_head}</tr>{"".join(rows)}</table>')
        page = f"layer_{layer:02d}.html"
        atomic_write_bytes(layer_dir / page, _page(f"{loaded.name} · layer {layer}", body,
                                                   '<a href="../index.html">atlas index</a>'))
        layer_pages.append(f"layers/{page}")
    manifest = getattr(triggers, "manifest", {}) or {}
    corpus = (f"{manifest['sentences']} sentences (corpus fingerprint {manifest.get('corpus', '?')}), "
              f"top {manifest.get('k', '?')} per memory" if "sentences" in manifest else "the mined corpus sample")
    corpus = html.escape(corpus)
    items = "".join(f'<li><a href="layers/layer_{layer:02d}.html">layer {layer}</a> '
                    f'({len(rows)} memories)</li>' for layer, rows in sorted(layer_rows.items()))
    described = loaded.describe()
    cards_note = (f" Each memory's page shows its card: what notebooks 01, 02, 03, 06, 07 and 10 found about it, read "
                  f"from {html.escape(str(run.folder))}." if run is not None else "")
    body = (f'<h3>Memory atlas · {name}</h3>'
            f'<p>{described["layers"]} layers × {described["d_ff"]} memories; '
            f'{"gated FFN (memories can write −v)" if adapter.gated else "plain FFN"}; '
            f'{"4-bit-quantized weights, dequantized" if described.get("quantized") else "full-precision weights"}.'
            f'</p><p class="ffn-note">Trigger examples mined from {corpus}. Pages for {html.escape(how)}.'
            f'{cards_note}</p>'
            f'<ul class="ffn-atlas-index">{items}</ul>{_notable_html(found, cards) if found is not None else ""}')
    atomic_write_bytes(out / "index.html", _page(f"{loaded.name} · memory atlas", body))
    keep = {Path(p).name for p in pages + layer_pages}
    for folder, pattern in ((memory_dir, _PAGE), (layer_dir, _LAYER_PAGE)):
        for stale in folder.iterdir():
            if pattern.match(stale.name) and stale.name not in keep:
                stale.unlink()
    write_json(out / "atlas.json", {
        "model": loaded.name, "selection": how, "criterion": criterion, "cards": run is not None,
        "memories": [list(pair) for pair in ordered], "pages": ["index.html", *layer_pages, *pages],
        "reasons": {memory_page_name(*pair): reasons[pair] for pair in ordered},
        "notable": {} if found is None else {
            reason: [[int(r.layer), int(r.memory)] for r in found.of(reason).itertuples()] for reason in NOTABLE},
        "notable_missing": {} if found is None else found.missing})
    return out / "index.html"


__all__ = ["export_atlas", "select_memories", "memory_page_name", "CRITERIA"]
