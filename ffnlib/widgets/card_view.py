"""The memory card (``ffnlib.card.MemoryCard``) as self-contained HTML: a section per paper, each table of the card
with the notes on where it came from, and for each section the card cannot fill, the notebook that computes it.

Links between views go through ``link`` (see ``ffnlib.widgets.render.link_html``): a fact links to the prompt view
of its prompt, an expert mate to its own memory view. The explorer's widget and the static atlas each give their
own ``link``; without one the card has no links.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

from ..card import MemoryCard
from .render import link_html, memory_target, prompt_target, token_html

__all__ = ["CARD_STYLE", "PAPERS", "render_card"]

CARD_STYLE = """
<style>
.ffn-card { border-top: 2px solid #c9d6ea; margin-top: 14px; padding-top: 4px; line-height: 1.35; }
.ffn-card section { margin: 6px 0 12px; }
.ffn-card h4.ffn-paper { font-size: 14px; color: #1d3f72; border-bottom: 1px solid #e3e3e3; padding-bottom: 2px; }
.ffn-card h5 { font-size: 12px; margin: 8px 0 2px; color: #444; }
.ffn-missing { color: #8a5a00; font-size: 12px; margin: 2px 0 6px; }
.ffn-mates { line-height: 1.7; max-width: 720px; }
.ffn-mates { font-variant-numeric: tabular-nums; word-spacing: 3px; }
</style>
"""

# the card's sections: paper -> (title, the card's fields it shows)
PAPERS = {
    "geva": ("Keys, values and how they add up · Geva et al. 2021 (notebooks 01, 02, 03, 10)",
             ("pattern", "removal", "value_agreement", "aggregation", "corpus_size", "percentiles")),
    "dai": ("Knowledge neurons · Dai et al. 2022 (notebook 06)", ("facts", "suppression")),
    "moefication": ("Experts · MoEfication, Zhang et al. 2022 (notebook 07)", ("experts", "router")),
}
_TITLES = {"pattern": "The pattern of its trigger examples (01)",
           "removal": "Removing tokens of its trigger prefixes (01)",
           "value_agreement": "Does its value predict what follows its triggers? (02)",
           "aggregation": "Its part in the layer's prediction on held-out text (03)",
           "corpus_size": "Its top-k trigger set across corpus sizes (10)",
           "percentiles": "Among the layer's memories and the random-weights control's",
           "facts": "The facts it is a knowledge neuron for", "suppression": "Suppressing it",
           "experts": "Its expert under each split, and the expert's other memories", "router": "The router's picks"}


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _num(value, digits: int = 3) -> str:
    if hasattr(value, "item"):
        value = value.item()
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 100:
        value = int(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return _e(value)


def _share(value) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.0%}"


def _rate(value) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):.1%}"


def _side(sign) -> str:
    return "+v" if int(sign) > 0 else ("−v" if int(sign) < 0 else "±v")


def _table(head: list[str], rows: list[list[str]], cls: str = "") -> str:
    header = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><tr>{header}</tr>{body}</table>'


def _pattern(card: MemoryCard, link) -> str:
    rows = [[_side(r.sign), (token_html(r.most_common_last_token) if r.most_common_last_token else "–")
             + f" {_share(r.its_share)}", _share(r.shallow_token), _share(r.topic_concentration),
             f"{_share(r.layer_shallow_token)} · {_share(r.layer_topic_concentration)}",
             f"{_share(r.random_shallow_token)} · {_share(r.random_topic_concentration)}"]
            for r in card.pattern.itertuples()]
    return _table(["side", "most common last token (share)", "shared last token", "topic concentration",
                   "layer mean (shared · topic)", "random keys (shared · topic)"], rows, "ffn-card-pattern")


def _removal(card: MemoryCard, link) -> str:
    rows = [[_e(r.variant), _num(r.prefixes), _num(r.mean_change_pct), _num(r.median_change_pct),
             _num(r.layer_mean_change_pct)] for r in card.removal.itertuples()]
    return _table(["removed", "prefixes", "mean change of m (%)", "median (%)", "layer mean (%)"], rows)


def _agreement(card: MemoryCard, link) -> str:
    rows = [[_side(r.sign), f"{token_html(r.top_token_text)} {_num(r.max_prob)}", token_html(r.trigger_next_token_text),
             _num(bool(r.agrees)), f"{int(r.n_agreeing)} of {int(r.n_triggers)}",
             _num(int(r.target_rank)) if r.target_rank >= 0 else "–"] for r in card.value_agreement.itertuples()]
    return _table(["side", "value's top token (p)", "next token of its top trigger", "agrees",
                   "top triggers followed by it", "rank of that next token in the value"], rows, "ffn-card-agreement")


def _aggregation(card: MemoryCard, link) -> str:
    names = {"active_rate": "active", "mean_update_share": "mean share of the layer's update",
             "agreeing_rate": "agrees with the layer's prediction", "n_examples": "held-out examples"}
    frame = card.aggregation[[c for c in names if c in card.aggregation.columns]]
    rows = [[_num(v) if c == "n_examples" else _rate(v) for c, v in zip(frame.columns, row)]
            for row in frame.itertuples(index=False)]
    return _table([names[c] for c in frame.columns], rows, "ffn-card-aggregation")


def _corpus(card: MemoryCard, link) -> str:
    frame = card.corpus_size
    sizes = sorted(frame["sentences"].unique())
    tokens = frame.drop_duplicates("sentences").set_index("sentences")["tokens"]
    rows = []
    for sign, group in frame.groupby("sign", sort=False):
        kept = group.set_index("sentences")["kept_share"]
        rows.append([_side(sign)] + [_share(kept.get(size)) for size in sizes])
    head = ["side"] + [f"{size} sentences ({int(tokens[size])} tokens)" for size in sizes]
    return _table(head, rows, "ffn-card-corpus")


def _percentiles(card: MemoryCard, link) -> str:
    def among(percentile, memories) -> str:
        return f'{_num(percentile)} <span class="ffn-note">of {int(memories):,}</span>' if memories else "–"

    rows = [[_e(r.measure), _side(r.sign), _num(r.value), among(r.layer_percentile, r.layer_memories),
             among(r.control_percentile, r.control_memories)] for r in card.percentiles.itertuples()]
    notes = sorted({r for r in card.percentiles["control_note"].dropna()})
    extra = "".join(f'<p class="ffn-missing">{_e(n)}</p>' for n in notes)
    return _table(["measure", "side", "value", "percentile in the layer", "in the control's layer"], rows,
                  "ffn-card-percentiles") + extra


def _facts(card: MemoryCard, link) -> str:
    if card.facts.empty:
        return '<p class="ffn-note">Not a knowledge neuron of any fact notebook 06 attributed.</p>'
    rows = []
    for r in card.facts.itertuples():
        fact = f"{_e(r.subject)} → {_e(r.answer)}" if r.subject else f"fact #{int(r.fact_id)}"
        prompt = (link_html(link, prompt_target(r.prompt), _e(r.prompt), "open the fact's prompt in the prompt view")
                  if isinstance(r.prompt, str) and r.prompt else "–")
        rows.append([_e(r.relation), fact, f'<span class="ffn-fact-prompt">{prompt}</span>', _side(r.sign),
                     _share(r.share), _num(r.mean_ratio), _num(r.mean_score)])
    return _table(["relation", "fact", "prompt", "side", "share of its prompts", "attribution / largest",
                   "mean attribution"], rows, "ffn-card-facts")


def _suppression(card: MemoryCard, link) -> str:
    frame = card.suppression
    if frame.empty:
        return ""
    facts = {} if card.facts is None else {int(r.fact_id): f"{r.subject} → {r.answer}" for r in
                                           card.facts.itertuples() if isinstance(r.subject, str) and r.subject}
    rows = [[_e(facts.get(int(r.fact_id), f"fact #{int(r.fact_id)}")), _e(r.relation), _side(r.sign), _num(r.prompts),
             _change(r.change), _change(r.random_change)] for r in frame.itertuples()]
    return _table(["fact", "relation", "side", "prompts", "answer's probability, it suppressed alone",
                   "a random memory of the layer suppressed alone"], rows, "ffn-card-suppression")


def _change(value) -> str:
    return "–" if value is None or not math.isfinite(float(value)) else f"{float(value):+.1%}"


def _experts(card: MemoryCard, link) -> str:
    rows = []
    for r in card.experts.itertuples():
        mates = " ".join(link_html(link, memory_target(card.layer, m), f"#{int(m)}", f"memory {int(m)}'s view")
                         for m in r.mates)
        rows.append([_e(r.split), _num(int(r.expert)), _num(int(r.size)),
                     f'<div class="ffn-mates" data-split="{_e(r.split)}">{mates}</div>'])
    return _table(["split", "expert", "memories", "its other memories (mates)"], rows, "ffn-card-experts")


def _router(card: MemoryCard, link) -> str:
    rows = [[_e(r.split), _share(r.share), _num(int(r.expert)), _rate(r.picked_rate), _rate(r.uniform_rate)]
            for r in card.router.itertuples()]
    return _table(["split", "experts kept", "expert", "tokens where the router picks it",
                   "a router picking every expert equally"], rows, "ffn-card-router")


_RENDER = {"pattern": _pattern, "removal": _removal, "value_agreement": _agreement, "aggregation": _aggregation,
           "corpus_size": _corpus, "percentiles": _percentiles, "facts": _facts, "suppression": _suppression,
           "router": _router, "experts": _experts}


def _field(card: MemoryCard, name: str, link) -> str:
    head = f"<h5>{_e(_TITLES[name])}</h5>"
    note = card.notes.get(name)
    note = f'<p class="ffn-note">{_e(note)}</p>' if note else ""
    if getattr(card, name) is None:
        line = card.missing.get(name, "not in the results")
        return f'{head}<p class="ffn-missing" data-field="{name}">{_e(line)}</p>{note}'
    return head + (_RENDER[name](card, link) if name in _RENDER else "") + note


def render_card(card: MemoryCard, link=None) -> str:
    """The card as HTML: a section per paper (:data:`PAPERS`); missing parts name the notebook that computes them."""
    sections = "".join(
        f'<section data-paper="{paper}"><h4 class="ffn-paper">{_e(title)}</h4>'
        + "".join(_field(card, name, link) for name in names) + "</section>"
        for paper, (title, names) in PAPERS.items())
    where = (f"read from …/{'/'.join(Path(card.results).parts[-2:])}" if card.results
             else card.notes.get("results", "no results"))
    control = f"; control: {card.control}" if card.control else ""
    return (f'{CARD_STYLE}<div class="ffn-card" data-layer="{card.layer}" data-memory="{card.memory}">'
            f'<h3>Memory card · layer {card.layer}, memory {card.memory}</h3>'
            f'<p class="ffn-note">What the suite\'s notebooks found about this memory ({_e(where)}{_e(control)}; '
            f'ffnlib.card.memory_card).</p>{sections}</div>')
