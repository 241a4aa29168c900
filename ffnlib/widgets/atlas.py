"""A static HTML atlas of mined memories: opens in any browser, no kernel needed.

``export_atlas(loaded, triggers, "results/.../atlas")`` writes

- ``index.html``: the model, the corpus and how memories were chosen, with one link per layer;
- ``layers/layer_LL.html``: one row per chosen memory of layer LL (its top trigger with the last token
  marked, its value's top tokens, its largest coefficient), each linking to its page;
- ``memories/L{LL}_M{MMMMM}.html``: a memory's page, as the explorer's memory view shows it (trigger
  examples, top tokens of ``v`` and, for gated FFNs, of ``-v``, pattern measures, and the coefficient
  histogram when a :class:`ffnlib.explorer.CoefficientSample` is given);
- ``atlas.json``: what was written (the list of pages and the selection).

Pages are written for a chosen subset only: the ``per_layer`` memories of each layer with the largest
``criterion`` (``"max_coefficient"``: the largest |coefficient| of any trigger example, either sign;
``"mean_coefficient"``: the mean |coefficient| of the top-``k`` triggers of the positive side), or an
explicit list ``memories=[(layer, memory), ...]``. A 46k-memory model never gets 46k files by default.
Every file is written atomically; a rerun replaces the pages and removes memory pages no longer chosen.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Iterable

import pandas as pd

from ..errors import ParameterError
from ..explorer import CoefficientSample, memory_view
from ..storage import atomic_write_bytes, ensure_dir, write_json
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
            f'{STYLE}<style>body {{ margin: 20px; }} a {{ color: #2456b3; }}</style></head>'
            f'<body class="ffn-view">{nav}{body}</body></html>').encode("utf-8")


def memory_page_name(layer: int, memory: int) -> str:
    return f"L{layer:02d}_M{memory:05d}.html"


def export_atlas(loaded, triggers, out_dir, memories: Iterable[tuple[int, int]] | None = None, per_layer: int = 3,
                 criterion: str = "max_coefficient", n_triggers: int = 20, k_tokens: int = 15,
                 sample: CoefficientSample | None = None, negative: bool | None = None) -> Path:
    """Write the atlas (see the module docstring) to ``out_dir`` and return the path of ``index.html``."""
    if triggers is None:
        raise ParameterError("The atlas needs mined trigger examples (ffnlib.keys.mine_trigger_examples).")
    adapter = loaded.adapter
    if memories is None:
        chosen = select_memories(triggers, per_layer, criterion)
        how = f"the {per_layer} memories per layer with the largest {criterion.replace('_', ' ')}"
    else:
        pairs = [(adapter.check_layer(int(layer)), int(memory)) for layer, memory in memories]
        if not pairs:
            raise ParameterError("memories is empty: give (layer, memory) pairs, or None to choose per layer.")
        chosen = pd.DataFrame(pairs, columns=["layer", "memory"]).drop_duplicates().reset_index(drop=True)
        chosen["score"] = float("nan")
        how = f"an explicit list of {len(chosen)} memories"
    out = ensure_dir(out_dir)
    memory_dir, layer_dir = ensure_dir(out / "memories"), ensure_dir(out / "layers")
    name = html.escape(loaded.name)
    pages, layer_rows = [], {}
    ordered = list(chosen.itertuples())
    if sample is not None:
        sample.prefetch((int(r.layer), int(r.memory)) for r in ordered)  # one pass for all pages
    for position, row in enumerate(ordered):
        layer, memory = int(row.layer), int(row.memory)
        view = memory_view(loaded, triggers, layer, memory, n_triggers=n_triggers, k_tokens=k_tokens,
                           sample=sample, negative=negative)
        links = ['<a href="../index.html">atlas index</a>',
                 f'<a href="../layers/layer_{layer:02d}.html">layer {layer}</a>']
        if position > 0:
            prev = ordered[position - 1]
            links.append(f'<a href="{memory_page_name(int(prev.layer), int(prev.memory))}">previous</a>')
        if position + 1 < len(ordered):
            nxt = ordered[position + 1]
            links.append(f'<a href="{memory_page_name(int(nxt.layer), int(nxt.memory))}">next</a>')
        page = memory_page_name(layer, memory)
        atomic_write_bytes(memory_dir / page, _page(f"{loaded.name} · layer {layer}, memory {memory}",
                                                    render_memory_view(view, loaded.name), " · ".join(links)))
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
        layer_rows.setdefault(layer, []).append(
            f'<tr><td><a href="../memories/{page}">#{memory}</a></td><td class="num">{best:.3g}</td>'
            f'<td>{top_trigger}</td><td>{tokens}</td><td>{negative_tokens}</td></tr>')
    layer_pages = []
    negative_head = "<th>top tokens of −v</th>" if adapter.gated else "<th></th>"
    for layer, rows in sorted(layer_rows.items()):
        body = (f'<h3>{name} · layer {layer}</h3><p class="ffn-note">{len(rows)} memories: {html.escape(how)}.</p>'
                f'<table class="ffn-atlas-layer"><tr><th>memory</th><th>max |m|</th><th>top trigger example</th>'
                f'<th>top tokens of v</th>{negative_head}</tr>{"".join(rows)}</table>')
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
    body = (f'<h3>Memory atlas · {name}</h3>'
            f'<p>{described["layers"]} layers × {described["d_ff"]} memories; '
            f'{"gated FFN (memories can write −v)" if adapter.gated else "plain FFN"}; '
            f'{"4-bit-quantized weights, dequantized" if described.get("quantized") else "full-precision weights"}.'
            f'</p><p class="ffn-note">Trigger examples mined from {corpus}. Pages for {html.escape(how)}.</p>'
            f'<ul class="ffn-atlas-index">{items}</ul>')
    atomic_write_bytes(out / "index.html", _page(f"{loaded.name} · memory atlas", body))
    keep = {Path(p).name for p in pages + layer_pages}
    for folder, pattern in ((memory_dir, _PAGE), (layer_dir, _LAYER_PAGE)):
        for stale in folder.iterdir():
            if pattern.match(stale.name) and stale.name not in keep:
                stale.unlink()
    write_json(out / "atlas.json", {"model": loaded.name, "selection": how, "criterion": criterion,
                                    "memories": [[int(r.layer), int(r.memory)] for r in ordered],
                                    "pages": ["index.html", *layer_pages, *pages]})
    return out / "index.html"


__all__ = ["export_atlas", "select_memories", "memory_page_name", "CRITERIA"]
