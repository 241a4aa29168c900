"""The explorer's views as self-contained HTML (inline CSS and SVG, no script), and its selection lists' labels."""

from __future__ import annotations

import html
from typing import Mapping

import numpy as np
import pandas as pd

from ..explorer import (ContributionMaps, InterventionComparison, MemoryView, PromptAnalysis, PromptAttribution,
                        SimilarMemories)
from ..related import contextualization as ctx

__all__ = ["STYLE", "MEASURE_NOTES", "token_html", "memory_target", "prompt_target", "link_html", "render_top_tokens",
           "render_triggers", "render_measures",
           "render_histogram", "render_memory_view", "render_similar", "render_search_results",
           "render_prompt_analysis",
           "render_contribution_maps", "render_attribution", "render_intervention", "render_error", "search_label",
           "contributor_label", "attribution_label"]


STYLE = """
<style>
.ffn-view { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; font-size: 13px; color: #222; }
.ffn-view h3 { font-size: 15px; margin: 10px 0 6px; }
.ffn-view h4 { font-size: 13px; margin: 8px 0 4px; color: #444; }
.ffn-view table { border-collapse: collapse; margin: 4px 0 10px; }
.ffn-view th, .ffn-view td { border-bottom: 1px solid #e3e3e3; padding: 2px 8px; text-align: left;
  vertical-align: top; }
.ffn-view th { background: #f4f4f4; font-weight: 600; }
.ffn-view td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ffn-tok { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre; background: #eef2f7;
  border-radius: 3px; padding: 0 3px; margin: 0 1px; }
.ffn-neg .ffn-tok { background: #f7eeee; }
.ffn-prefix { font-family: Georgia, serif; }
.ffn-prefix mark { background: #ffd866; padding: 0 1px; border-radius: 2px; }
.ffn-next { color: #999; font-style: italic; }
.ffn-bar { display: inline-block; height: 9px; background: #5b8def; vertical-align: middle; margin-right: 4px; }
.ffn-neg .ffn-bar { background: #e0685b; }
.ffn-sides, .ffn-similar-lists { display: flex; flex-wrap: wrap; gap: 24px; }
.ffn-side, .ffn-similar-list { flex: 1 1 420px; min-width: 320px; }
.ffn-similar td:first-child { white-space: nowrap; }
.ffn-changed { color: #b35900; font-weight: 600; }
.ffn-note { color: #666; font-size: 12px; }
.ffn-error { color: #b00020; font-weight: 600; }
.ffn-up { color: #1a7f37; } .ffn-down { color: #b00020; }
a.ffn-link { color: inherit; text-decoration: underline dotted #2456b3; cursor: pointer; }
a.ffn-link:hover { background: #e8effc; }
</style>
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def token_html(token: str) -> str:
    """A token as a monospace chip, whitespace visible (new lines as ⏎)."""
    return f'<span class="ffn-tok">{_e(token.replace(chr(10), "⏎"))}</span>'


def memory_target(layer: int, memory: int) -> dict:
    """A link's target: the memory view of memory ``memory`` of ``layer``."""
    return {"view": "memory", "layer": int(layer), "memory": int(memory)}


def prompt_target(prompt: str) -> dict:
    """A link's target: the prompt view of ``prompt``."""
    return {"view": "prompt", "prompt": str(prompt)}


def link_html(link, target: dict, inner: str, title: str = "") -> str:
    """``inner`` (HTML) as a link to ``target`` when ``link(target)`` gives the anchor's attributes (the explorer's
    widget and the static atlas each make their own), else ``inner`` as it is."""
    attributes = link(target) if link is not None else None
    if not attributes:
        return inner
    return f'<a class="ffn-link" data-view="{_e(target["view"])}" title="{_e(title)}" {attributes}>{inner}</a>'


def _sign_name(sign: int) -> str:
    return "+v" if sign > 0 else "−v"


def _p(value: float) -> str:
    return f"{value:.3f}" if value >= 0.001 else f"{value:.1e}"


def render_top_tokens(frame: pd.DataFrame, title: str = "") -> str:
    top = max(float(frame["probability"].max()), 1e-30) if len(frame) else 1.0
    rows = "".join(
        f'<tr><td class="num">{int(r.rank) + 1}</td><td>{token_html(r.token)}</td>'
        f'<td><span class="ffn-bar" style="width:{max(1, round(100 * float(r.probability) / top))}px"></span>'
        f'{_p(float(r.probability))}</td></tr>' for r in frame.itertuples())
    head = f"<h4>{_e(title)}</h4>" if title else ""
    return f'{head}<table class="ffn-top-tokens"><tr><th>#</th><th>token</th><th>probability</th></tr>{rows}</table>'


def render_triggers(frame: pd.DataFrame, title: str = "", link=None) -> str:
    """A trigger table; with ``link``, each example links to the prompt view of its prefix (through its marked last
    token, the position where the memory fires)."""
    head = f"<h4>{_e(title)}</h4>" if title else ""
    if frame.empty:
        return head + '<p class="ffn-note">No trigger examples.</p>'
    def example(r) -> str:
        text = f"{_e(r.prefix)}<mark>{_e(r.last_token)}</mark>"
        return link_html(link, prompt_target(r.prefix + r.last_token), text, "open this prefix in the prompt view")

    rows = "".join(
        f'<tr><td class="num">{int(r.rank) + 1}</td><td class="num">{float(r.coefficient):.3g}</td>'
        f'<td class="ffn-prefix">{example(r)}<span class="ffn-next">{_e(r.next_token)}</span></td></tr>'
        for r in frame.itertuples())
    return (f'{head}<table class="ffn-triggers"><tr><th>#</th><th>m</th>'
            f'<th>trigger example (last token marked, next token in grey)</th></tr>{rows}</table>')


MEASURE_NOTES = {
    "triggers": "trigger examples of this side",
    "shallow_token": "share of triggers whose last token is shared with at least 2 others (shallow pattern)",
    "shallow_bigram": "the same for the last two tokens",
    "labelled": "triggers with a topic label",
    "topic_concentration": "share of the most common topic among labelled triggers (semantic pattern)",
    "most_common_last_token": "the most common last token",
    "its_share": "share of triggers ending with it",
}


def render_measures(measures: Mapping) -> str:
    if not measures:
        return ""

    def cell(name, value):
        if value is None:
            return "n/a"
        if isinstance(value, float):
            return f"{value:.2f}"
        return token_html(value) if name == "most_common_last_token" else _e(value)

    rows = "".join(f'<tr><td title="{_e(MEASURE_NOTES.get(k, ""))}">{_e(k.replace("_", " "))}</td>'
                   f'<td class="num">{cell(k, v)}</td></tr>' for k, v in measures.items())
    return f'<h4>Pattern measures (Section 3)</h4><table class="ffn-measures">{rows}</table>'


def render_histogram(values: np.ndarray | None, bins: int = 40, width: int = 520, height: int = 140,
                     marks: Mapping[str, float] | None = None, title: str = "") -> str:
    """An inline SVG histogram of ``values`` (log-scaled counts), with vertical lines at ``marks``."""
    if values is None or len(values) == 0:
        return ""
    values = np.asarray(values, dtype=np.float64)
    marks = {k: float(v) for k, v in (marks or {}).items() if v is not None and np.isfinite(v)}
    low = min(values.min(), *marks.values()) if marks else values.min()
    high = max(values.max(), *marks.values()) if marks else values.max()
    if high <= low:
        high = low + 1.0
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    left, bottom, plot_w, plot_h = 40, height - 22, width - 50, height - 40
    scale = np.log1p(counts) / max(np.log1p(counts).max(), 1e-12)
    bar_w = plot_w / bins

    def x_of(v):
        return left + (v - low) / (high - low) * plot_w

    bars = "".join(
        f'<rect class="ffn-hist-bar" x="{left + i * bar_w:.1f}" y="{bottom - s * plot_h:.1f}" '
        f'width="{max(bar_w - 1, 1):.1f}" height="{s * plot_h:.1f}" fill="#8aa9d6">'
        f'<title>[{edges[i]:.3g}, {edges[i + 1]:.3g}): {c}</title></rect>'
        for i, (c, s) in enumerate(zip(counts, scale)))
    def label(i, name, v):
        right = x_of(v) > left + plot_w / 2
        x = x_of(v) - 3 if right else x_of(v) + 3
        return (f'<text x="{x:.1f}" y="{bottom - plot_h + 10 + 11 * i}" font-size="10" fill="#d9534f" '
                f'text-anchor="{"end" if right else "start"}">{_e(name)}</text>')

    lines = "".join(
        f'<line x1="{x_of(v):.1f}" x2="{x_of(v):.1f}" y1="{bottom - plot_h:.1f}" y2="{bottom}" stroke="#d9534f" '
        f'stroke-dasharray="3,2"/>{label(i, name, v)}' for i, (name, v) in enumerate(marks.items()))
    axis = (f'<line x1="{left}" x2="{left + plot_w}" y1="{bottom}" y2="{bottom}" stroke="#555"/>'
            f'<text x="{left}" y="{height - 6}" font-size="10">{low:.3g}</text>'
            f'<text x="{left + plot_w}" y="{height - 6}" font-size="10" text-anchor="end">{high:.3g}</text>'
            f'<text x="{left + plot_w / 2}" y="{height - 6}" font-size="10" text-anchor="middle">coefficient m</text>'
            f'<text x="4" y="{bottom - plot_h + 8}" font-size="10">count</text>'
            f'<text x="4" y="{bottom - plot_h + 19}" font-size="9" fill="#777">(log)</text>')
    head = f"<h4>{_e(title)}</h4>" if title else ""
    return (f'{head}<svg class="ffn-histogram" width="{width}" height="{height}" '
            f'xmlns="http://www.w3.org/2000/svg">{bars}{lines}{axis}</svg>')


def render_memory_view(view: MemoryView, model_name: str = "", link=None, below: str = "") -> str:
    """The memory view; ``link`` makes its trigger examples links (see :func:`link_html`), ``below`` (HTML, e.g.
    the memory's card, ``ffnlib.widgets.card_view.render_card``) is shown under it."""
    sides = []
    for side in view.sides:
        label = "positive side: v" if side.sign > 0 else "negative side: −v (m < 0)"
        cls = "ffn-side" + (" ffn-neg" if side.sign < 0 else "")
        triggers_title = ("Top trigger examples (largest m)" if side.sign > 0
                          else "Top trigger examples (most negative m)")
        sides.append(f'<div class="{cls}" data-sign="{side.sign}"><h3>{_e(label)}</h3>'
                     f'{render_top_tokens(side.top_tokens, "Top tokens of " + ("v" if side.sign > 0 else "−v"))}'
                     f'{render_triggers(side.triggers, triggers_title, link)}{render_measures(side.measures)}</div>')
    marks = {}
    for side in view.sides:
        if not side.triggers.empty:
            marks[f"top-1 trigger ({_sign_name(side.sign)})"] = float(side.triggers["coefficient"].iloc[0])
    hist = render_histogram(view.sample, marks=marks,
                            title=f"Coefficient over a corpus sample ({view.n_sample_sentences} sentences, "
                                  f"{0 if view.sample is None else len(view.sample)} tokens)")
    where = f" · {_e(model_name)}" if model_name else ""
    return (f'{STYLE}<div class="ffn-view ffn-memory-view" data-layer="{view.layer}" data-memory="{view.memory}">'
            f'<h3>Layer {view.layer}, memory {view.memory}{where}</h3>'
            f'<p class="ffn-note">||v|| = {view.value_norm:.3g}</p>{hist}'
            f'<div class="ffn-sides">{"".join(sides)}</div>{below}</div>')


def render_similar(similar: Mapping[str, SimilarMemories], link=None) -> str:
    """The memory view's "Memories like this one" section: a table per measure (``ffnlib.explorer.Explorer.similar``),
    each memory a link to its memory view (with ``link``, see :func:`link_html`), and the base rates under it."""
    if not similar:
        return ""
    lists = []
    for by, found in similar.items():
        shared = by == "triggers"
        head = ("<tr><th>memory</th><th>side</th><th>similarity</th>" + ("<th>shared</th>" if shared else "")
                + "<th>top tokens of its value</th></tr>")
        rows = "".join(
            f'<tr class="{"ffn-neg" if r.sign < 0 else ""}" data-layer="{r.layer}" data-memory="{r.memory}">'
            f'<td>{link_html(link, memory_target(r.layer, r.memory), f"L{r.layer} #{r.memory}", "open this memory")}'
            f'</td><td>{_sign_name(r.sign)}</td><td class="num">{r.similarity:.3f}</td>'
            + (f'<td class="num">{r.shared}</td>' if shared else "")
            + f'<td>{" ".join(token_html(t) for t in r.top_tokens)}</td></tr>' for r in found.memories.itertuples())
        table = (f'<table>{head}{rows}</table>' if rows else
                 '<p class="ffn-note">No other memory shares a trigger example with this one.</p>')
        base = found.random_pairs
        rate = (f'Median over the {found.n_compared} other memories: {found.median:.3f}; random pairs of memories: '
                f'median {base["median"]:.3f}, 95th percentile {base["p95"]:.3f}, 99th {base["p99"]:.3f} '
                f'({base["n_pairs"]} pairs).' if base.get("n_pairs") else
                f'Median over the {found.n_compared} other memories: {found.median:.3f}.')
        lists.append(f'<div class="ffn-similar-list" data-by="{_e(by)}"><h4>By {_e(by)}: '
                     f'{_e(found.measure)}</h4>{table}<p class="ffn-note">{_e(rate)}</p></div>')
    return (f'<section class="ffn-similar"><h3>Memories like this one</h3><p class="ffn-note">The nearest memories '
            f'of all layers (this one left out), each through its nearer side (v or −v).</p>'
            f'<div class="ffn-similar-lists">{"".join(lists)}</div></section>')


def render_search_results(frame: pd.DataFrame, by: str) -> str:
    if frame is None or frame.empty:
        return f'{STYLE}<div class="ffn-view ffn-search"><p class="ffn-note">No memory found.</p></div>'
    if by == "value token":
        head = "<tr><th>layer</th><th>memory</th><th>side</th><th>token</th><th>rank in value</th><th>p</th></tr>"
        rows = "".join(f"<tr><td>{r.layer}</td><td>{r.memory}</td><td>{_sign_name(r.sign)}</td><td>"
                       f"{token_html(r.token)}</td><td class='num'>{r.rank + 1}</td><td class='num'>"
                       f"{r.probability:.3f}</td></tr>" for r in frame.itertuples())
    else:
        head = ("<tr><th>layer</th><th>memory</th><th>side</th><th>ending with it</th><th>containing it</th>"
                "<th>of triggers</th></tr>")
        rows = "".join(f"<tr><td>{r.layer}</td><td>{r.memory}</td><td>{_sign_name(r.sign)}</td>"
                       f"<td class='num'>{r.last}</td><td class='num'>{r.anywhere}</td>"
                       f"<td class='num'>{r.n_triggers}</td></tr>" for r in frame.itertuples())
    return f'{STYLE}<div class="ffn-view ffn-search"><table>{head}{rows}</table></div>'


def search_label(row, by: str) -> str:
    """A one-line label of a search result (for a selection list)."""
    if by == "value token":
        return (f"L{row.layer} #{row.memory} {_sign_name(row.sign)}: {row.token!r} rank {row.rank + 1}, "
                f"p={row.probability:.3f}")
    return f"L{row.layer} #{row.memory} {_sign_name(row.sign)}: {row.last} end / {row.anywhere} contain"


def contributor_label(row) -> str:
    tokens = " ".join(repr(t) for t in list(row.top_tokens)[:3])
    return f"L{row.layer} #{row.memory} m={row.coefficient:+.2f} → {tokens}"


def render_prompt_analysis(analysis: PromptAnalysis) -> str:
    prediction = " ".join(f"{token_html(r.token)}<span class='ffn-note'>{r.probability:.2f}</span>"
                          for r in analysis.prediction.itertuples())
    by_layer = {layer: frame for layer, frame in analysis.memories.groupby("layer")}
    rows = []
    for r in analysis.layers.itertuples():
        memories = "".join(
            f'<div class="{"ffn-neg" if m.sign < 0 else ""}">#{m.memory} <span class="ffn-note">m={m.coefficient:+.2f}'
            f' |m|·||v||={m.score:.2f}</span> → {" ".join(token_html(t) for t in m.top_tokens)}</div>'
            for m in by_layer[r.layer].itertuples())
        changed = ' class="ffn-changed"' if r.changed else ""
        rows.append(f'<tr data-layer="{r.layer}"><td class="num">{r.layer}</td>'
                    f'<td>{token_html(r.before_token)} <span class="ffn-note">{r.before_prob:.2f}</span></td>'
                    f'<td{changed}>{token_html(r.after_token)} <span class="ffn-note">{r.after_prob:.2f}</span></td>'
                    f'<td>{memories}</td></tr>')
    prompt = "".join(token_html(t) for t in analysis.tokens)
    return (f'{STYLE}<div class="ffn-view ffn-prompt-view"><h3>Prompt</h3><p>{prompt}</p>'
            f'<h4>Next-token prediction</h4><p class="ffn-prediction">{prediction}</p>'
            f'<h4>Layer by layer, at the last position</h4>'
            f'<p class="ffn-note">Residual top token before and after the FFN (probability), and the memories with '
            f'the largest |m|·||v||, each with the top tokens of v (of −v, in red, when m &lt; 0). An orange '
            f'"after" means the FFN changed the top token.</p>'
            f'<table class="ffn-prompt-table"><tr><th>layer</th><th>before FFN</th><th>after FFN</th>'
            f'<th>top memories</th></tr>{"".join(rows)}</table></div>')


def _map_svg(matrix: np.ndarray, tokens: list[str], title: str, cell: int = 14) -> str:
    """One map as an inline SVG heatmap: rows are the positions i, columns the input tokens j (darker: more)."""
    n = len(tokens)
    label = 90
    width, height = label + n * cell + 4, 18 + n * cell + label
    top = float(matrix.max()) if matrix.size and matrix.max() > 0 else 1.0
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" class="ffn-map">',
             f'<text x="{label}" y="12" font-size="12" font-weight="600">{_e(title)}</text>']
    for i in range(n):
        y = 18 + i * cell
        parts.append(f'<text x="{label - 4}" y="{y + cell - 3}" font-size="10" text-anchor="end" '
                     f'font-family="monospace">{_e(tokens[i][:12])}</text>')
        for j in range(i + 1):
            shade = float(matrix[i, j]) / top
            parts.append(f'<rect x="{label + j * cell}" y="{y}" width="{cell - 1}" height="{cell - 1}" '
                         f'fill="rgb(33,102,172)" fill-opacity="{shade:.3f}"><title>{_e(tokens[i])} ← '
                         f'{_e(tokens[j])}: {float(matrix[i, j]):.3f}</title></rect>')
    for j in range(n):
        x = label + j * cell + cell - 4
        y = 18 + n * cell + 4
        parts.append(f'<text x="{x}" y="{y}" font-size="10" font-family="monospace" text-anchor="end" '
                     f'transform="rotate(-90 {x} {y})">{_e(tokens[j][:12])}</text>')
    return "".join(parts) + "</svg>"


def render_contribution_maps(view: ContributionMaps) -> str:
    maps = "".join(f'<div class="ffn-side">{_map_svg(view.maps[stage], view.tokens, stage)}'
                   f'<div class="ffn-note">{_e(ctx.STAGE_LABELS[stage])}</div></div>' for stage in view.stages)
    return (f'{STYLE}<div class="ffn-view ffn-contributions"><h3>Contributions at layer {view.layer}</h3>'
            f'<p class="ffn-note">Row i: how position i\'s vector shares itself among the input tokens j ≤ i '
            f'(norm of each token\'s part, each row summing to 1; Kobayashi et al., ICLR 2024). ATB: after attention '
            f'and its residual; ATBFF: the FFN\'s output (its input norm included); ATBFFRES: the layer\'s output; '
            f'ATBFFRESLN: through the norm the next layer reads.</p><div class="ffn-sides">{maps}</div></div>')


def attribution_label(row) -> str:
    tokens = " ".join(repr(t) for t in list(row.top_tokens)[:3])
    return f"L{row.layer} #{row.memory} IG={row.score:.3g} m={row.coefficient:+.2f} → {tokens}"


def render_attribution(attribution: PromptAttribution) -> str:
    rows = "".join(
        f'<tr class="{"ffn-neg" if r.sign < 0 else ""}" data-layer="{r.layer}" data-memory="{r.memory}">'
        f'<td class="num">{r.layer}</td><td class="num">{r.memory}</td><td class="num">{r.score:.3g}</td>'
        f'<td class="num">{r.coefficient:+.2f}</td><td>{" ".join(token_html(t) for t in r.top_tokens)}</td></tr>'
        for r in attribution.memories.itertuples())
    prompt = "".join(token_html(t) for t in attribution.tokens)
    return (f'{STYLE}<div class="ffn-view ffn-attribution"><h3>Attribution</h3><p>{prompt} → '
            f'{token_html(attribution.token)} <span class="ffn-note">p = {attribution.probability:.3f}</span></p>'
            f'<p class="ffn-note">The memories with the largest integrated-gradients attribution (Dai et al.\'s '
            f'knowledge-neuron score: zero baseline, {attribution.steps} points, {len(attribution.layers)} layers) for '
            f'this prediction at the last position, each with the top tokens of its value (of −v, in red, when '
            f'm &lt; 0).</p><table class="ffn-attribution-table"><tr><th>layer</th><th>memory</th><th>score</th>'
            f'<th>m</th><th>value top tokens</th></tr>{rows}</table></div>')


def render_intervention(comparison: InterventionComparison) -> str:
    rows = "".join(
        f'<tr><td>{token_html(r.token)}</td><td class="num">{r.p_before:.3f}</td><td class="num">{r.p_after:.3f}</td>'
        f'<td class="num {"ffn-up" if r.logit_change > 0 else "ffn-down"}">{r.logit_change:+.2f}</td>'
        f'<td class="num {"ffn-up" if r.logprob_change > 0 else "ffn-down"}">{r.logprob_change:+.2f}</td></tr>'
        for r in comparison.changes.itertuples())
    edits = ", ".join(f"L{layer} #{memory} {'off' if v == 0 else f'm={v:g}'}"
                      for (layer, memory), v in comparison.edits.items())
    return (f'{STYLE}<div class="ffn-view ffn-intervention"><h3>Interventions: {_e(edits)}</h3>'
            f'<h4>Greedy continuation</h4><table class="ffn-continuations">'
            f'<tr><td>without</td><td class="ffn-prefix">{_e(comparison.prompt)}<mark>'
            f'{_e(comparison.continuation_before)}</mark></td></tr>'
            f'<tr><td>with</td><td class="ffn-prefix">{_e(comparison.prompt)}<mark>'
            f'{_e(comparison.continuation_after)}</mark></td></tr></table>'
            f'<h4>Next-token distribution</h4><table class="ffn-changes"><tr><th>token</th><th>p without</th>'
            f'<th>p with</th><th>logit change</th><th>log-prob change</th></tr>{rows}</table></div>')


def render_error(error: Exception) -> str:
    return f'{STYLE}<div class="ffn-view"><p class="ffn-error">{_e(error)}</p></div>'
