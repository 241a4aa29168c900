"""The report of a run: for every finding, the paper's claim, our measured numbers and a verdict.

Each suite notebook saves a summary (``summaries/<notebook>.json``) with:

- ``findings``: a list of ``{"section", "finding", "paper", "ours", "verdict", "figure", "paper_figure"}``,
  where ``verdict`` is ``"holds"``, ``"partly"`` or ``"does not hold"`` and ``ours`` states measured numbers;
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
from .storage import atomic_write_bytes

VERDICTS = ("holds", "partly", "does not hold", "not measured")  # "not measured": e.g. needs human annotation
SECTION_OF = {"01": "Sec. 3", "02": "Sec. 4", "03": "Sec. 5"}  # notebook number -> paper section


@dataclass(frozen=True)
class Finding:
    section: str
    finding: str
    paper: str
    ours: str
    verdict: str
    figure: str | None = None  # our figure, relative to the run folder
    paper_figure: str | None = None  # the paper's numbers drawn by us, relative to the run folder

    def __post_init__(self):
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def verdict(share_ok: float, partly: float = 0.5) -> str:
    """``holds`` when a claim holds in (nearly) all the places it is tested, ``partly`` when in many."""
    return "holds" if share_ok >= 0.85 else ("partly" if share_ok >= partly else "does not hold")


def normalise_verdict(text: str) -> str:
    """Map a notebook's worded verdict ("holds: at chance level", "the direction holds, but ...") to one
    of :data:`VERDICTS`."""
    text = text.strip().lower().lstrip("(")
    if text.startswith("no verdict"):
        return "not measured"
    if text.startswith(VERDICTS):
        return next(v for v in VERDICTS if text.startswith(v))
    if text.startswith(("differs", "not ", "no ")):
        return "does not hold"
    return "partly"  # a qualified verdict: "the direction holds, but ...", "only against 1/|V| ..."


def _findings(name: str, summary: dict) -> list[dict]:
    """A summary's findings; a ``comparison`` table (finding, paper, ours, verdict) is read as findings."""
    findings = list(summary.get("findings") or [])
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
        f["verdict"] = normalise_verdict(f["verdict"])
        for key in ("figure", "paper_figure"):  # a table's empty cell arrives as NaN
            f[key] = f.get(key) if isinstance(f.get(key), str) and f.get(key) else None
        section = str(f.get("section") or "")
        f["section"] = f"Sec. {section}" if section[:1].isdigit() else section  # "5 (Fig. 7)" -> "Sec. 5 (Fig. 7)"
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
            return (f"{model['model']} ({model.get('class')}, {model.get('layers')} layers x {model.get('d_ff')} "
                    f"memories, {'gated' if model.get('gated') else 'plain'} FFN{quant})")
    return "unknown model"


def render_markdown(run_dir: str | Path, summaries: dict[str, dict]) -> str:
    run_dir = Path(run_dir)
    lines = [f"# ffnlib report: the paper versus ours", "",
             f"- Model: {_model_line(summaries)}",
             f"- Run folder: `{run_dir.parent.name}/{run_dir.name}` (model / scale)",
             "- Paper: Geva, Schuster, Berant & Levy, *Transformer Feed-Forward Layers Are Key-Value Memories*, "
             "EMNLP 2021 (16-layer ReLU LM on WikiText-103).",
             "- Our corpus is ~1% of WikiText-103 (embedded Wikipedia text); see each notebook for sizes.", ""]
    counts = {v: 0 for v in VERDICTS}
    table = ["| section | finding | paper | ours | verdict |", "|---|---|---|---|---|"]
    for name, summary in summaries.items():
        for f in summary.get("findings", []):
            counts[f["verdict"]] += 1
            cells = [str(f[c]).replace("|", "\\|") for c in ("section", "finding", "paper", "ours")]
            table.append("| " + " | ".join(cells) + f" | **{f['verdict']}** |")
    lines += [f"Verdicts: {counts['holds']} hold, {counts['partly']} partly, {counts['does not hold']} do not hold, "
              f"{counts['not measured']} not measured.",
              "", *table, ""]
    for name, summary in summaries.items():
        figures = [(f, f.get("figure"), f.get("paper_figure")) for f in summary.get("findings", []) if f.get("figure")]
        if not figures:
            continue
        lines += [f"## {name}", ""]
        for f, ours, paper in figures:
            lines.append(f"**{f['finding']}** — {f['verdict']}: {f['ours']}")
            lines.append("")
            lines.append(f"![ours]({ours})" + (f" ![paper]({paper})" if paper else ""))
            lines.append("")
        manifests = summary.get("manifests") or {}
        if manifests:
            lines.append("<details><summary>Manifests of the results shown</summary>\n")
            lines.append("```json\n" + json.dumps(manifests, indent=1, sort_keys=True, default=str) + "\n```")
            lines.append("</details>\n")
    return "\n".join(lines)


def render_html(run_dir: str | Path, summaries: dict[str, dict]) -> str:
    esc = html.escape
    rows, sections = [], []
    for name, summary in summaries.items():
        for f in summary.get("findings", []):
            rows.append(f"<tr><td>{esc(f['section'])}</td><td>{esc(f['finding'])}</td><td>{esc(str(f['paper']))}</td>"
                        f"<td>{esc(str(f['ours']))}</td><td class='v {f['verdict'].replace(' ', '-')}'>"
                        f"{esc(f['verdict'])}</td></tr>")
            if f.get("figure"):
                paper = (f"<figure><img src='{esc(f['paper_figure'])}'><figcaption>paper</figcaption></figure>"
                         if f.get("paper_figure") else "")
                sections.append(f"<h3>{esc(f['section'])}: {esc(f['finding'])}</h3><p><b>{esc(f['verdict'])}</b>: "
                                f"{esc(str(f['ours']))}</p><div class='pair'><figure><img src='{esc(f['figure'])}'>"
                                f"<figcaption>ours</figcaption></figure>{paper}</div>")
        if summary.get("manifests"):
            sections.append(f"<details><summary>{esc(name)}: manifests</summary><pre>"
                            f"{esc(json.dumps(summary['manifests'], indent=1, sort_keys=True, default=str))}</pre></details>")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}.holds{background:#d8f5d0}"
             ".partly{background:#fff3c4}.does-not-hold{background:#f8d0d0}.not-measured{background:#eee}.pair{display:flex;gap:1em}"
             ".pair img{max-width:560px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>ffnlib report</title><style>{style}</style>"
            f"</head><body><h1>ffnlib report: the paper versus ours</h1><p>Model: {esc(_model_line(summaries))}</p>"
            f"<table><tr><th>section</th><th>finding</th><th>paper</th><th>ours</th><th>verdict</th></tr>"
            f"{''.join(rows)}</table>{''.join(sections)}</body></html>")


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


def publish_report(run_dir: str | Path, dest: str | Path) -> Path:
    """Copy a run's ``report.md`` and the PNG figures it shows into ``dest`` (e.g. ``docs/reports/<model>-<scale>``),
    so that readers see the findings, figures included, without running anything. Returns the copied report."""
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
    atomic_write_bytes(dest / "report.md", text.encode())
    return dest / "report.md"


def main(argv=None) -> int:
    """``python -m ffnlib.report RUN_DIR [--publish DEST]``: (re)write a run's report, and optionally copy it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("run_dir", help="results/<model>/<scale>")
    parser.add_argument("--publish", metavar="DEST", help="also copy report.md and its figures to DEST")
    args = parser.parse_args(argv)
    try:
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
