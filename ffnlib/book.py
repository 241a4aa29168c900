"""The course site: the narrative notebooks with their outputs at scale="ci", the exercise notebooks (student
copies) and the committed reports, as a static HTML site built offline with Sphinx and MyST-NB.

    python -m ffnlib.book --results results --out _build/book        (what `make book` runs)

The executed notebooks come from ``<results>/<model>/ci/notebooks/``; when some are missing the ci-scale suite
runs first (about 15 minutes on two cores the first time; cached results make a rerun quicker). The site is
written to ``<out>/html/index.html``. Nothing on it loads from the network: MathJax is bundled
(sphinx-mathjax-offline) and notebook widget outputs, whose JavaScript would come from a CDN, are dropped (their
text stays).

The course's order, each part's learning goals and its time are declared once, in :data:`COURSE`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import nbformat

from .errors import FFNLibError

__all__ = ["ROOT", "BOOK_DIR", "NOTEBOOK_DIR", "EXERCISE_DIR", "DOCS_DIR", "REPORT_DIR", "INTERACTIVE", "WIDGET_VIEW",
           "Part", "COURSE", "pages", "stage", "clean_notebook", "build", "main"]

ROOT = Path(__file__).resolve().parents[1]
BOOK_DIR = ROOT / "book"
NOTEBOOK_DIR = ROOT / "notebooks"
EXERCISE_DIR = ROOT / "exercises" / "release"
DOCS_DIR = ROOT / "docs"  # the user guide, verdict rules, reports, scaling, teaching and the API reference
REPORT_DIR = DOCS_DIR / "reports"
INTERACTIVE = ("05_explorer",)  # shown without outputs: its widgets need a running kernel
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@dataclass(frozen=True)
class Part:
    """One part of the course: its pages in order (``notebooks/<name>``, ``exercises/<name>``,
    ``docs/reports/<name>/report``), what a student should be able to do after it, and how long it takes."""

    title: str
    goals: tuple[str, ...]
    pages: tuple[str, ...]
    time: str
    assign: str


COURSE: tuple[Part, ...] = (
    Part("Part 1 · A feed-forward layer is a key-value memory: the keys (Section 3)",
         ("write FF(x) = Σᵢ mᵢ vᵢ and check it numerically on a real model;",
          "compute the memory coefficients of a plain and of a gated FFN;",
          "find a key's trigger examples, and tell shallow (n-gram) patterns from semantic (topic) ones;",
          "read the removal experiment (Fig. 3) against a random-weights model of the same architecture."),
         ("notebooks/00_quickstart", "notebooks/01_keys", "exercises/01_keys_exercises"),
         "about 1 h 30: 45 min reading and running the notebooks, 30 min of exercises",
         "00 and 01 to read and run, then exercises 01."),
    Part("Part 2 · Values predict what follows their keys' patterns (Section 4)",
         ("read a value as a distribution over the vocabulary through the final norm's gain and the head;",
          "avoid the trigger/next-token off-by-one when measuring agreement;",
          "judge an agreement rate against a baseline and an interval, not against zero."),
         ("notebooks/02_values", "exercises/02_values_exercises"),
         "about 1 h: 30 min notebook, 25 min exercises",
         "02 to read, then exercises 02."),
    Part("Part 3 · A layer's output is a composition of memories (Section 5)",
         ("project the residual, the FFN's output and the layer's output to their top tokens;",
          "sort each prediction into the four cases of Fig. 11 and read how the cases change with depth;",
          "say what the active-memory counts of Fig. 7 do and do not show."),
         ("notebooks/03_aggregation", "exercises/03_aggregation_exercises"),
         "about 1 h: 30 min notebook, 20 min exercises",
         "03 to read, then exercises 03."),
    Part("Part 4 · Across models, by hand, and with more data",
         ("compare the paper's findings across models (two pretrained, one trained here) and with the paper's own numbers;",
          "explore one prompt's memories interactively in JupyterLab;",
          "say what one memory stores from its card: its key's pattern, the token its value writes with each sign, "
          "and whether that token follows its top trigger;",
          "say which findings change as the mined corpus grows, with intervals."),
         ("notebooks/04_compare_models", "notebooks/05_explorer", "exercises/05_explorer_exercises",
          "notebooks/10_corpus_size"),
         "about 1 h of reading and 20 min of exercises; the explorer as long as curiosity lasts",
         "reading, and exercises 05 (one memory's card); 05 is a good starting point for a small project."),
    Part("Part 5 · Related work through the key-value view",
         ("attribute a fact to memories with integrated gradients, and read knowledge neurons as keys and values "
          "(Dai et al., 2022);",
          "split a layer's memories into experts and measure what routing keeps (MoEfication, Zhang et al., 2022);",
          "compare a ReLU FFN with a softmax memory trained alike, and say what concentrates the softmax "
          "(Shen et al., 2023);",
          "read a feed-forward block as an attention map over the input tokens (Kobayashi et al., 2024)."),
         ("notebooks/06_knowledge_neurons", "exercises/06_knowledge_neurons_exercises", "notebooks/07_moefication",
          "exercises/07_moefication_exercises", "notebooks/08_relu_vs_softmax",
          "exercises/08_relu_vs_softmax_exercises", "notebooks/09_ff_attention_maps",
          "exercises/09_ff_attention_maps_exercises"),
         "about 4 h: 30 min per notebook, 20-30 min per exercise set",
         "06 and its exercises; 07, 08 and 09 with theirs as a second week, or one of them each."),
    Part("Reports: the paper's findings on our three models",
         ("read a verdict (holds, partly, does not hold) together with its control and interval.",
          "say which findings hold on the paper's kind of FFN (plain ReLU) and not on the gated models."),
         ("docs/reports/smollm2-135m-default/report", "docs/reports/gemma3-270m-default/report",
          "docs/reports/wiki-relu-lm-default/report"),
         "45 min", "reading, alongside parts 1-3."),
)


def pages() -> list[str]:
    return [page for part in COURSE for page in part.pages]


def _index() -> str:
    lines = ["# Transformer feed-forward layers are key-value memories: a course", "",
             "A course built on *Transformer Feed-Forward Layers Are Key-Value Memories* (Geva, Schuster, Berant "
             "and Levy, EMNLP 2021) and the work around it, run on small real language models that fit on a "
             "laptop's CPU. Each part has narrative notebooks, shown here with their outputs at the small `ci` "
             "scale, and an exercise notebook in which you write the core computations yourself; a check right "
             "after each exercise compares your answer with the library's.", "",
             "Run everything yourself with `make run` (the notebooks) and open the exercises in JupyterLab; the "
             "[page for instructors](instructors.md) says what to assign and how the checks work.", ""]
    for part in COURSE:
        lines += [f"## {part.title}", "", "After this part you can:", ""]
        lines += [f"- {goal}" for goal in part.goals]
        lines += ["", f"*Time:* {part.time}.", ""]
        lines += [f"- {{doc}}`{page}`" for page in part.pages]
        # the sidebar's section for the part (hidden here: the list above shows its pages)
        lines += ["", "```{toctree}", ":hidden:", f":caption: {part.title.split(' · ')[0]}", ""]
        lines += list(part.pages) + ["```", ""]
    lines += ["## The library's documentation", "",
              "The [user guide, verdict rules, reports and API reference](docs/index.md) of the `ffnlib` package "
              "the notebooks are built on.", "",
              "```{toctree}", ":hidden:", "", "instructors", "docs/index", "```", ""]
    return "\n".join(lines)


def _parts_table() -> str:
    rows = ["| part | pages | time | assign |", "|---|---|---|---|"]
    for part in COURSE:
        names = ", ".join(f"[{p.split('/')[2]}]({p}.md)" if p.startswith("docs/reports/") else f"[{Path(p).name}]({p}.ipynb)" for p in part.pages)
        rows.append(f"| {part.title.split(' · ')[0]} | {names} | {part.time} | {part.assign} |")
    return "\n".join(rows) + "\n"


def clean_notebook(nb) -> None:
    """Drop what would make a page fetch from the network: ipywidget views (their text fallback stays) and the
    widget state that makes MyST-NB load the widget manager."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            data = out.get("data")
            if data and WIDGET_VIEW in data:
                del data[WIDGET_VIEW]
                data.setdefault("text/plain", "")


def _notebook(name: str, executed: Path) -> nbformat.NotebookNode:
    path = executed / f"{name}.ipynb"
    if name in INTERACTIVE:
        nb = nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=4)
        note = ("```{note}\nThis notebook is interactive: its widgets need a running Python kernel. It is shown "
                "here without outputs; open it in JupyterLab (`.venv/bin/jupyter lab notebooks/05_explorer.ipynb`)."
                "\n```")
        nb.cells.insert(1, nbformat.v4.new_markdown_cell(note))
        return nb
    if path.exists():
        return nbformat.read(path, as_version=4)
    raise FFNLibError(f"No executed notebook {path}: run the notebooks at scale=ci first "
                      f"(`python -m ffnlib.suite --scale ci --results <results>`), or let `python -m ffnlib.book` "
                      "run them.")


def stage(executed: Path, src: Path) -> Path:
    """Lay out the site's sources in ``src``: configuration, index, instructors' page, notebooks, exercises, and
    docs/ (user guide, reports with their figures, the API reference's page)."""
    if src.exists():
        shutil.rmtree(src)
    src.mkdir(parents=True)
    for name in ("conf.py", "instructors.md"):
        shutil.copy(BOOK_DIR / name, src / name)
    shutil.copytree(BOOK_DIR / "_templates", src / "_templates")
    # the docs keep the repository's layout (docs/..., notebooks/...), so their relative links work in both
    shutil.copytree(DOCS_DIR, src / "docs", ignore=shutil.ignore_patterns("generated", "_build"))
    (src / "index.md").write_text(_index())
    (src / "_parts.md").write_text(_parts_table())
    for page in pages():
        kind, rest = page.split("/", 1)
        if kind == "notebooks":
            nb = _notebook(rest, executed)
        elif kind == "exercises":
            path = EXERCISE_DIR / rest.removesuffix("_exercises") / f"{rest}.ipynb"
            if not path.exists():
                raise FFNLibError(f"No student copy {path}: run `make exercises`.")
            nb = nbformat.read(path, as_version=4)
        else:  # a committed report, copied with docs/
            report = ROOT / f"{page}.md"
            if not report.exists():
                raise FFNLibError(f"No committed report {report}: run `make run` and `make publish`.")
            continue
        clean_notebook(nb)
        (src / kind).mkdir(exist_ok=True)
        nbformat.write(nb, src / kind / f"{rest}.ipynb")
    return src


def build(executed: Path, out: Path) -> Path:
    """Stage and build the site; returns the HTML folder (open ``index.html``). Sphinx's warnings are kept in
    ``<out>/warnings.txt``."""
    out = Path(out).resolve()
    src = stage(Path(executed), out / "src")
    html = out / "html"
    warnings = out / "warnings.txt"
    done = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-w", str(warnings), str(src),
                           str(html)], capture_output=True, text=True)
    if done.returncode != 0:
        raise FFNLibError(f"sphinx-build failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return html


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--results", default="results")
    parser.add_argument("--out", default="_build/book")
    parser.add_argument("--rerun", action="store_true", help="run the ci-scale notebooks again even if executed")
    args = parser.parse_args(argv)
    from .storage import slug
    from .suite import SUITE, run_suite

    executed = Path(args.results) / slug(args.model) / "ci" / "notebooks"
    missing = [n for n in SUITE if not (executed / f"{n}.ipynb").exists()]
    try:
        if missing or args.rerun:
            print(f"[ffnlib.book] running the notebooks at scale=ci first ({len(missing)} not executed yet) ...")
            run_suite(args.model, "ci", args.results)
        html = build(executed, Path(args.out))
    except FFNLibError as exc:
        print(f"ffnlib.book: {exc}", file=sys.stderr)
        return 2
    print(f"[ffnlib.book] the site is in {html}; open {html / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
