"""The report of a run: for every finding, the paper's claim, our measured numbers and a verdict.

Each suite notebook saves a summary (``summaries/<notebook>.json``) with:

- ``findings``: a list of ``{"section", "finding", "paper", "ours", "control", "verdict", "rule", "figure", ...}``
  rows, judged by the findings registry (``ffnlib.findings.findings_rows``): ``ours`` and ``control`` state
  measured numbers with their 95% intervals, ``verdict`` is one of ``ffnlib.findings.VERDICTS``;
- ``curves``: per-layer series, ``{name: {"label": str, "values": [...], "paper": [...] or null}}``;
- ``manifests``: the manifest of every cached result the numbers came from;
- ``model``: ``loaded.describe()``.

``write_report(run_dir)`` turns those into ``report.md`` and ``report.html`` in ``run_dir``. Nothing in the
report is hard-coded: every number comes from the summaries the run wrote.
"""

from __future__ import annotations

import html
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import FFNLibError, ResultsError
from .storage import atomic_write_bytes, write_json
from .version import describe_versions

from .findings import ARCHITECTURAL, FINDINGS, SIZE_SHARE, VERDICTS

__all__ = ["SECTION_OF", "COLUMNS", "Finding", "normalise_verdict", "load_summaries", "RULES_TEXT",
           "CORPUS_SIZE_HEADER", "CORPUS_SIZE_TEXT", "render_markdown", "render_html", "write_report",
           "add_summaries", "publish_report", "verdict_counts", "headline_table", "main"]

SECTION_OF = {"01": "Sec. 3", "02": "Sec. 4", "03": "Sec. 5"}  # notebook number -> paper section
COLUMNS = ("section", "finding", "paper", "ours", "control", "verdict")


@dataclass(frozen=True)
class Finding:
    """One row of the report (a summary's ``findings`` entry, judged by ``ffnlib.findings``)."""

    section: str
    finding: str
    paper: str
    ours: str
    verdict: str
    control: str = ""
    figure: str | None = None  # our figure, relative to the run folder
    paper_figure: str | None = None  # the paper's numbers drawn by us, relative to the run folder
    rule: str = ""

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def normalise_verdict(text: str) -> str:
    """Map a worded verdict ("holds: at chance level", "the direction holds, but ...") to one of
    :data:`VERDICTS`."""
    text = text.strip().lower().lstrip("(")
    if text.startswith("no verdict"):
        return "not measured"
    if text.startswith(ARCHITECTURAL.split(" (")[0]):
        return ARCHITECTURAL
    if text.startswith(VERDICTS):
        return next(v for v in VERDICTS if text.startswith(v))
    if text.startswith(("differs", "not ", "no ")):
        return "does not hold"
    return "partly"  # a qualified verdict: "the direction holds, but ...", "only against 1/|V| ..."


def _findings(name: str, summary: dict) -> list[dict]:
    """A summary's findings in the report's form; a ``comparison`` table (finding, paper, ours, verdict) of
    an older summary is read as findings too."""
    findings = [dict(f) for f in summary.get("findings") or []]
    seen = {f["finding"] for f in findings}
    for row in summary.get("comparison") or []:
        if row["finding"] in seen:
            continue
        worded = str(row["verdict"]).strip()
        if worded.startswith("(") and worded.endswith(")"):  # "(no verdict: ...)": drop the enclosing pair only
            worded = worded[1:-1]
        ours = row["ours"] if worded.lower() == normalise_verdict(worded) else f"{row['ours']} ({worded})"
        findings.append({"section": row.get("section", SECTION_OF.get(name[:2], name)), "finding": row["finding"],
                         "paper": row["paper"], "ours": ours, "verdict": worded, "figure": row.get("figure"),
                         "paper_figure": row.get("paper_figure")})
    for f in findings:
        f["verdict"] = normalise_verdict(str(f["verdict"]))
        for key in ("figure", "paper_figure"):  # a table's empty cell arrives as NaN
            f[key] = f.get(key) if isinstance(f.get(key), str) and f.get(key) else None
        section = str(f.get("section") or "")
        f["section"] = f"Sec. {section}" if section[:1].isdigit() else section  # "5 (Fig. 7)" -> "Sec. 5 (Fig. 7)"
        if f.get("figure_ref") and f["figure_ref"] not in f["section"]:
            f["section"] = f"{f['section']} ({f['figure_ref']})"
        detail = f.get("ours_detail")
        f["ours_cell"] = f"{f['ours']}; {detail}" if detail else str(f["ours"])
        f["control_cell"] = str(f.get("control") or "—")
    return findings


def load_summaries(run_dir: str | Path) -> dict[str, dict]:
    """The summaries a run wrote, each with its ``findings`` in the report's form."""
    folder = Path(run_dir) / "summaries"
    out = {}
    for path in sorted(folder.glob("*.json")):
        summary = json.loads(path.read_text())
        summary["findings"] = _findings(path.stem, summary)
        out[path.stem] = summary
    return out


def _model_line(summaries: dict[str, dict]) -> str:
    for summary in summaries.values():
        model = summary.get("model")
        if isinstance(model, dict) and "model" in model:
            quant = ", 4-bit quantized weights (dequantized to fp32)" if model.get("quantized") else ""
            precision = model.get("precision", "float32")  # summaries before the precision parameter: float32
            return (f"{model['model']} ({model.get('class')}, {model.get('layers')} layers x {model.get('d_ff')} "
                    f"memories, {'gated' if model.get('gated') else 'plain'} FFN{quant}), computing in {precision}")
    return "unknown model"


def _control_line(summaries: dict[str, dict]) -> str:
    names = sorted({f.get("control_name") for s in summaries.values() for f in s["findings"] if f.get("control_name")})
    if not names:
        return "none (verdicts against each finding's own baseline only)"
    sizes = _control_sizes(summaries)
    draws = max(len(name.split(", ")) for name in names)
    drawn = ("" if draws == 1 else f"; drawn {draws} times, each finding's control number being the mean over the "
             "draws, with an interval that covers the draws and the sampled units (ffnlib.stats.over_draws)")
    return (f"the same architecture with random weights (its own initialiser from its config, seeded; "
            f"{'; '.join(names)}), run on the same corpus with the same parameters"
            + (f", on smaller samples: {sizes}" if sizes else "") + drawn)


def _control_sizes(summaries: dict[str, dict]) -> str:
    """The control's sample sizes where they differ from the trained model's (the default scale samples the
    control's removal experiment and Section 5 more sparsely, to keep the suite within its time budget)."""
    parts = []
    keys_summary = summaries.get("01_keys") or {}
    theirs = (keys_summary.get("control") or {}).get("removal_keys")
    ours = keys_summary.get("removal_keys")
    if theirs and theirs != ours:
        parts.append(f"{theirs} keys per layer in the removal experiment" + (f" (ours {ours})" if ours else ""))
    aggregation = summaries.get("03_aggregation") or {}

    def examples(summary: dict) -> int | None:
        return ((summary.get("manifests") or {}).get("aggregation") or {}).get("n_examples")

    theirs, ours = examples(aggregation.get("control") or {}), examples(aggregation)
    if theirs and theirs != ours:
        parts.append(f"the first {theirs:,} held-out examples in Section 5" + (f" (ours {ours:,})" if ours else ""))
    return "; ".join(parts)


RULES_TEXT = f"""Each "ours" number carries a 95% interval: a seeded bootstrap (1,000 resamples) over the unit that was
sampled (keys for Section 3, memories for Section 4, held-out examples for Section 5), or an exact binomial
interval for a count out of 100. The control column is the same measure on the random-weights control.

- **holds**: ours lies beyond the control in the paper's direction with non-overlapping 95% intervals (and beyond
  its own baseline likewise, where it has one), and where the paper gives a number, the interval's conservative
  end reaches {SIZE_SHARE:.0%} of the paper's size;
- **partly**: the direction holds significantly, the size does not;
- **holds without training too (architectural)**: ours shows the effect, but so does the control, and ours does
  not beat it: the same architecture shows it untrained;
- **does not hold**: the remaining cases; **not measured**: no number (e.g. it needs human annotation).

Claimed ranges (e.g. 10-50% of memories active) hold when our interval lies within the range and the control's
does not. Overlapping intervals never give "holds".

The related-work findings (notebooks 06, 07) compare memories, experts or methods within the trained model: each is
judged against its own baseline only (random memories of the same layers, random experts, random memories at the
same share), and the control column says so. Where the paper claims that little is lost (e.g. over 95% of the
performance kept), the size asked is stated in the finding's rule: at most twice the paper's loss."""


def _corpus_size_rows(summary: dict) -> list[list[str]]:
    """The corpus-size table (notebook 10): per finding, ours at the smallest and the largest snapshot, the
    slope per doubling, the trend, the line's value at the paper's corpus size and whether it reaches the
    paper's number."""
    from .findings import finding

    data = summary.get("corpus_size") or {}
    verdicts = data.get("verdicts") or []
    rows = []
    for t in data.get("trends") or []:
        f = finding(t["key"])
        mine = [v for v in verdicts if v["key"] == t["key"]]
        first, last = (mine[0], mine[-1]) if mine else ({}, {})
        scale, unit = (100, " pp") if f.percent else (1, "")

        def num(x, fmt="{:+.3f}"):
            return "n/a" if x is None or x != x else fmt.format(x * scale)

        slope = (f"{num(t['slope_per_doubling'])}{unit} [{num(t['slope_low'])}, {num(t['slope_high'])}]"
                 if t.get("points", 0) >= 3 else "n/a")
        at = (f"{f.fmt(t['at_paper'])} [{f.fmt(t['at_paper_low'])}, {f.fmt(t['at_paper_high'])}]"
              if t.get("at_paper") == t.get("at_paper") else "n/a")
        rows.append([f.claim, f"{first.get('ours', 'n/a')} ({first.get('verdict', '')})",
                     f"{last.get('ours', 'n/a')} ({last.get('verdict', '')})", slope, str(t["trend"]), at,
                     f.paper, str(t["reaches_paper"])])
    return rows


CORPUS_SIZE_HEADER = ("finding", "smallest snapshot (verdict)", "whole corpus (verdict)", "slope per doubling [95% CI]",
                      "trend", "line at the paper's corpus [band]", "paper", "reaches the paper")
CORPUS_SIZE_TEXT = ("Notebook 10 re-reads notebook 01's mining pass at every doubling of the corpus (each snapshot equals "
                    "a run on that prefix of the corpus) and fits a straight line in log(tokens) per finding. The line's "
                    "value at the paper's corpus is **an extrapolation from about 1% of the data**, and its band is rough "
                    "(the sizes are nested prefixes, their errors correlated). *No detectable trend*: the slope's "
                    "interval contains zero. *Reaches the paper* \"no\": even the band's favourable end stays short of "
                    "the paper's number at its corpus size, so corpus size alone does not explain the gap, by this "
                    "extrapolation.")


def _added_parts(summaries: dict[str, dict]) -> list[tuple[str, str]]:
    """(notebook, where it came from) for each summary added from another run (:func:`add_summaries`)."""
    return [(name, summary["added_from"]) for name, summary in summaries.items() if summary.get("added_from")]


def render_markdown(run_dir: str | Path, summaries: dict[str, dict]) -> str:
    run_dir = Path(run_dir)
    lines = ["# ffnlib report: the paper versus ours", "",
             f"- Model: {_model_line(summaries)}",
             f"- Control: {_control_line(summaries)}",
             f"- Code: {describe_versions({name: s.get('code') for name, s in summaries.items()})}",
             f"- Run folder: `{run_dir.parent.name}/{run_dir.name}` (model / scale, and the precision unless float32)",
             "- Paper: Geva, Schuster, Berant & Levy, *Transformer Feed-Forward Layers Are Key-Value Memories*, "
             "EMNLP 2021 (16-layer ReLU LM on WikiText-103).",
             "- Our corpus is ~1% of WikiText-103 (embedded Wikipedia text); see each notebook for sizes."]
    parts = [f"`{name}` from `{source}`" for name, source in _added_parts(summaries)]
    if parts:
        lines.append(f"- Made in parts: {', '.join(parts)}; the rest from this run. Each part's manifests say what "
                     "it was computed from.")
    lines.append("")
    counts = verdict_counts(summaries)
    table = ["| section | finding | paper | ours [95% CI] | random-init control [95% CI] | verdict |",
             "|---|---|---|---|---|---|"]
    rules = []
    for name, summary in summaries.items():
        for f in summary.get("findings", []):
            cells = [str(f[c]).replace("|", "\\|") for c in ("section", "finding", "paper", "ours_cell", "control_cell")]
            table.append("| " + " | ".join(cells) + f" | **{f['verdict']}** |")
            if f.get("rule"):
                measure = f" Measure: {f['measure']}." if f.get("measure") else ""
                rules.append(f"- **{f['finding']}** ({f['section']}).{measure} Rule: {f['rule']}.")
    lines += [f"Verdicts: {counts['holds']} hold, {counts['partly']} partly, {counts[ARCHITECTURAL]} hold without "
              f"training too (architectural), {counts['does not hold']} do not hold, {counts['not measured']} not "
              "measured.", "", *table, ""]
    skipped = [f"- `{name}` stopped with nothing to analyse: {summary['skipped']}; its findings are not measured."
               for name, summary in summaries.items() if summary.get("skipped")]
    lines += [*skipped, ""] if skipped else []
    for name, summary in summaries.items():
        figures = [(f, f.get("figure"), f.get("paper_figure")) for f in summary.get("findings", []) if f.get("figure")]
        if not figures:
            continue
        lines += [f"## {name}", ""]
        for f, ours, paper in figures:
            lines.append(f"**{f['finding']}** — {f['verdict']}: {f['ours_cell']} (control: {f['control_cell']})")
            lines.append("")
            lines.append(f"![ours]({ours})" + (f" ![paper]({paper})" if paper else ""))
            lines.append("")
        manifests = summary.get("manifests") or {}
        if manifests:
            lines.append("<details><summary>Manifests of the results shown</summary>\n")
            lines.append("```json\n" + json.dumps(manifests, indent=1, sort_keys=True, default=str) + "\n```")
            lines.append("</details>\n")
    corpus = summaries.get("10_corpus_size")
    if corpus and corpus.get("corpus_size"):
        sizes = ", ".join(f"{s:,}" for s in corpus.get("sizes", []))
        lines += ["## Findings against corpus size", "", CORPUS_SIZE_TEXT, "",
                  f"Snapshots at {sizes} sentences ({corpus['tokens'][0]:,} to {corpus['tokens'][-1]:,} tokens); the "
                  f"paper's corpus: {corpus.get('paper_tokens', 0):,} tokens.", "",
                  "| " + " | ".join(CORPUS_SIZE_HEADER) + " |", "|" + "---|" * len(CORPUS_SIZE_HEADER)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in _corpus_size_rows(corpus)]
        lines += ["", f"![corpus size]({corpus['corpus_size']['figure']})", ""]
    lines += ["## How the findings are judged", "", RULES_TEXT, ""]
    if rules:
        lines += ["Per finding:", "", *rules, ""]
    return "\n".join(lines)


def render_html(run_dir: str | Path, summaries: dict[str, dict]) -> str:
    esc = html.escape
    rows, sections, rules = [], [], []
    for name, summary in summaries.items():
        for f in summary.get("findings", []):
            css = "architectural" if f["verdict"] == ARCHITECTURAL else f["verdict"].replace(" ", "-")
            rows.append(f"<tr><td>{esc(f['section'])}</td><td>{esc(f['finding'])}</td><td>{esc(str(f['paper']))}</td>"
                        f"<td>{esc(f['ours_cell'])}</td><td>{esc(f['control_cell'])}</td>"
                        f"<td class='v {css}'>{esc(f['verdict'])}</td></tr>")
            if f.get("rule"):
                rules.append(f"<li><b>{esc(f['finding'])}</b>: {esc(f.get('measure') or '')}. Rule: {esc(f['rule'])}."
                             f"</li>")
            if f.get("figure"):
                paper = (f"<figure><img src='{esc(f['paper_figure'])}'><figcaption>paper</figcaption></figure>"
                         if f.get("paper_figure") else "")
                sections.append(f"<h3>{esc(f['section'])}: {esc(f['finding'])}</h3><p><b>{esc(f['verdict'])}</b>: "
                                f"{esc(f['ours_cell'])} (control: {esc(f['control_cell'])})</p><div class='pair'>"
                                f"<figure><img src='{esc(f['figure'])}'><figcaption>ours</figcaption></figure>{paper}"
                                "</div>")
        if summary.get("manifests"):
            sections.append(f"<details><summary>{esc(name)}: manifests</summary><pre>"
                            f"{esc(json.dumps(summary['manifests'], indent=1, sort_keys=True, default=str))}</pre></details>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}.holds{background:#d8f5d0}"
             ".partly{background:#fff3c4}.does-not-hold{background:#f8d0d0}.not-measured{background:#eee}"
             ".architectural{background:#dde7f8}.pair{display:flex;gap:1em}.pair img{max-width:560px}")
    corpus = summaries.get("10_corpus_size")
    if corpus and corpus.get("corpus_size"):
        head = "".join(f"<th>{esc(c)}</th>" for c in CORPUS_SIZE_HEADER)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in _corpus_size_rows(corpus))
        sections.append(f"<h2>Findings against corpus size</h2><p>{esc(CORPUS_SIZE_TEXT.replace('**', ''))}</p>"
                        f"<table><tr>{head}</tr>{body}</table>"
                        f"<figure><img src='{esc(corpus['corpus_size']['figure'])}'></figure>")
    added = [f"{name} from {source}" for name, source in _added_parts(summaries)]
    parts = f"<p>Made in parts: {esc(', '.join(added))}; the rest from this run.</p>" if added else ""
    rules_html = "<h2>How the findings are judged</h2><pre style='white-space:pre-wrap'>" + esc(RULES_TEXT) + "</pre>"
    if rules:
        rules_html += "<ul>" + "".join(rules) + "</ul>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ffnlib report</title><style>{style}</style>"
            f"</head><body><h1>ffnlib report: the paper versus ours</h1><p>Model: {esc(_model_line(summaries))}</p>"
            f"<p>Control: {esc(_control_line(summaries))}</p>"
            f"<p>Code: {esc(describe_versions({name: s.get('code') for name, s in summaries.items()}))}</p>{parts}"
            f"<table><tr><th>section</th><th>finding</th><th>paper</th><th>ours [95% CI]</th>"
            f"<th>random-init control [95% CI]</th><th>verdict</th></tr>"
            f"{''.join(rows)}</table>{''.join(sections)}{rules_html}</body></html>")


def write_report(run_dir: str | Path) -> list[Path]:
    """Write ``report.md`` and ``report.html`` into ``run_dir`` from its summaries."""
    run_dir = Path(run_dir)
    summaries = load_summaries(run_dir)
    if not summaries:
        raise ResultsError(f"No summaries in {run_dir / 'summaries'}: run the notebooks first (make run), and give "
                           "the run's folder, results/<model>/<scale>.")
    md, page = run_dir / "report.md", run_dir / "report.html"
    atomic_write_bytes(md, render_markdown(run_dir, summaries).encode())
    atomic_write_bytes(page, render_html(run_dir, summaries).encode())
    return [md, page]


def _run_identity(folder: Path) -> tuple[str, str]:
    """(model, scale) of a run folder (``results/<model>/<scale>``) or of a published copy (its ``run.json``)."""
    folder = folder.resolve()
    stamp = folder / "run.json"
    if stamp.exists():
        run = json.loads(stamp.read_text())
        return str(run["model"]), str(run["scale"])
    return folder.parent.name, folder.name


def _figures_named(obj) -> set[str]:
    """The figures (``figures/....png``) a summary names, anywhere in it."""
    if isinstance(obj, str):
        return {obj} if obj.startswith("figures/") and obj.endswith(".png") else set()
    values = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, list) else ()
    return set().union(*(_figures_named(v) for v in values)) if values else set()


def _shown_path(path: Path) -> str:
    """A path as the report records it: relative to the working folder when it lies under it (no machine's
    absolute paths in committed reports)."""
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def add_summaries(run_dir: str | Path, source: str | Path) -> list[str]:
    """Add to a run the notebooks that ``source`` summarised and the run has not: for a report made in parts, when
    no one machine runs the whole suite (each part is a run of some notebooks, ``--notebooks``). ``source`` is
    another run folder of the same model and scale, or a copy published with its summaries. The run's own
    summaries win, and a notebook added earlier is replaced (the other part may have been run again); each added
    one keeps its manifests and records where it came from (``added_from``, shown in the report), and the figures
    it names are copied with it, never over a figure of the run's own notebooks. Returns the notebooks added."""
    run_dir, source = Path(run_dir), Path(source)
    theirs = sorted((source / "summaries").glob("*.json"))
    if not theirs:
        raise ResultsError(f"{source} has no summaries/*.json to add: give a run folder (results/<model>/<scale>) "
                           "or a report published with its summaries (python -m ffnlib.report RUN --publish DEST).")
    ours, its = _run_identity(run_dir), _run_identity(source)
    if ours != its:
        raise ResultsError(f"{source} holds {its[0]} at scale {its[1]}, and {run_dir} is {ours[0]} at scale "
                           f"{ours[1]}: a report is made of one model at one scale.")
    own = {}  # the run's own summaries (not added from elsewhere) and the figures they name
    for path in (run_dir / "summaries").glob("*.json"):
        summary = json.loads(path.read_text())
        if not summary.get("added_from"):
            own[path.stem] = _figures_named(summary)
    own_figures = set().union(*own.values()) if own else set()
    added = []
    for path in theirs:
        if path.stem in own:
            continue
        summary = json.loads(path.read_text())
        for name in sorted(_figures_named(summary) - own_figures):
            if (source / name).exists():  # a figure the source's report did not show may not have been published
                atomic_write_bytes(run_dir / name, (source / name).read_bytes())
        summary["added_from"] = summary.get("added_from") or _shown_path(source)
        write_json(run_dir / "summaries" / path.name, summary)
        added.append(path.stem)
    return added


def publish_report(run_dir: str | Path, dest: str | Path) -> Path:
    """Copy a run's ``report.md`` and the PNG figures it shows into ``dest`` (e.g. ``docs/reports/<model>-<scale>``),
    so that readers see the findings, figures included, without running anything. The summaries it was made from
    go with it (``summaries/``, and the run's model and scale in ``run.json``), so that a later run can add to it
    (:func:`add_summaries`). Returns the copied report."""
    run_dir, dest = Path(run_dir), Path(dest)
    report = run_dir / "report.md"
    if not report.exists():
        raise ResultsError(f"{report} does not exist: run the suite first (make run MODEL=... SCALE=...).")
    text = report.read_text()
    shown = sorted(set(re.findall(r"\]\((figures/[^)\s]+\.png)\)", text)))
    missing = [name for name in shown if not (run_dir / name).exists()]
    if missing:
        raise ResultsError(f"{report} shows figures that are not in {run_dir}: {missing}.")
    if dest.exists():
        shutil.rmtree(dest)  # a stale copy's figures must not linger
    for name in shown:
        atomic_write_bytes(dest / name, (run_dir / name).read_bytes())
    for path in sorted((run_dir / "summaries").glob("*.json")):
        atomic_write_bytes(dest / "summaries" / path.name, path.read_bytes())
    model, scale = _run_identity(run_dir)
    write_json(dest / "run.json", {"model": model, "scale": scale})
    atomic_write_bytes(dest / "report.md", text.encode())
    return dest / "report.md"


def verdict_counts(summaries: dict[str, dict], paper_only: bool = False) -> dict[str, int]:
    """How many findings got each verdict (:data:`ffnlib.findings.VERDICTS`) in a run's summaries; ``paper_only``:
    only the paper's own (Sections 3-5, notebooks 01-03)."""
    counts = {v: 0 for v in VERDICTS}
    for name, summary in summaries.items():
        if paper_only and name[:2] not in SECTION_OF:
            continue
        for f in summary.get("findings", []):
            counts[f["verdict"]] += 1
    return counts


def headline_table(folders) -> str:
    """The README's table of verdict counts, one pair of rows per report folder (a run folder or a published copy
    with its summaries): the paper's findings, then all of them, naming the notebooks a report lacks. Made by
    ``python -m ffnlib.report --headline docs/reports/*-default``."""
    lines = ["| report | findings | holds | partly | architectural | does not hold | not measured |",
             "|---|---|---|---|---|---|---|"]
    registered = sorted({f.notebook for f in FINDINGS})
    for folder in map(Path, folders):
        summaries = load_summaries(folder)
        if not summaries:
            raise ResultsError(f"{folder} has no summaries/*.json: give a run folder (results/<model>/<scale>) or a "
                               "report published with its summaries (python -m ffnlib.report RUN --publish DEST).")
        model = next((s["model"] for s in summaries.values() if isinstance(s.get("model"), dict)), {})
        name = _run_identity(folder)[0]
        form = f"{'gated' if model.get('gated') else 'plain'} FFN, {model.get('layers', '?')} layers"
        missing = [n.split("_")[0] for n in registered if n not in summaries]
        for label, paper_only in (("the paper's", True), ("all", False)):
            counts = verdict_counts(summaries, paper_only)
            total = sum(counts.values())
            label = f"{label} {total}" + ("" if paper_only or not missing else
                                          f" (no notebook {', '.join(missing)})")
            report = f"[{name}]({folder.as_posix()}/report.md) ({form})" if paper_only else ""
            lines.append(f"| {report} | {label} | {counts['holds']} | {counts['partly']} | {counts[ARCHITECTURAL]} | "
                         f"{counts['does not hold']} | {counts['not measured']} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    """``python -m ffnlib.report RUN_DIR [--add DIR ...] [--publish DEST]``: (re)write a run's report, with the
    notebooks of other runs of the same model and scale added where asked, and optionally copy it.
    ``python -m ffnlib.report --headline DIR ...``: print the README's table of verdict counts."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir", nargs="?", help="results/<model>/<scale>")
    parser.add_argument("--publish", metavar="DEST", help="also copy report.md, its figures and summaries to DEST")
    parser.add_argument("--add", metavar="DIR", action="append", default=[],
                        help="first add the notebooks summarised in DIR (a run folder or a published copy of the "
                             "same model and scale) that this run has not run: a report made in parts")
    parser.add_argument("--headline", metavar="DIR", nargs="+",
                        help="print the README's table of verdict counts for these reports (run folders or published "
                             "copies with their summaries) instead")
    args = parser.parse_args(argv)
    if (args.run_dir is None) == (args.headline is None):
        parser.error("give a run folder, or --headline with report folders")
    try:
        if args.headline:
            print(headline_table(args.headline), end="")
            return 0
        for source in args.add:
            added = add_summaries(args.run_dir, source)
            print(f"added from {source}: {', '.join(added) or 'nothing (this run has all its notebooks)'}")
        paths = write_report(args.run_dir)
        if args.publish:
            paths.append(publish_report(args.run_dir, args.publish))
    except FFNLibError as exc:
        print(f"ffnlib: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
