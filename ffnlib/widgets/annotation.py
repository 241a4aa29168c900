"""Human annotation of key patterns, as the paper's experts did (Section 3.1).

The paper's annotators saw a key's top-25 trigger prefixes, wrote the patterns they saw (a pattern
needs at least 3 prefixes), labelled each shallow or semantic, and marked which prefixes it covers.

:class:`AnnotationSession` holds that logic (no browser needed: tests drive it directly);
:func:`annotation_widget` puts ipywidgets around it. Annotations are appended to a CSV file
(``data/annotations/annotations.csv`` by default) with the columns of ``ffnlib.keys.ANNOTATION_COLUMNS``;
``ffnlib.keys.summarise_annotations`` summarises them.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from ..errors import ParameterError
from ..keys import ANNOTATION_COLUMNS, PATTERN_KINDS, TriggerExamples, read_annotations, trigger_table
from ..reference import DATA_DIR
from ..storage import atomic_write_bytes

__all__ = ["DEFAULT_PATH", "MIN_COVER", "Pattern", "AnnotationSession", "annotation_widget"]

DEFAULT_PATH = DATA_DIR / "annotations" / "annotations.csv"
MIN_COVER = 3  # the paper: a pattern needs at least 3 prefixes


@dataclass
class Pattern:
    description: str
    kind: str
    covered: set[int] = field(default_factory=set)


class AnnotationSession:
    """Annotate random keys: pick a key, add patterns, tick the prefixes each covers, save.

    ``layers``: the layers keys are drawn from (default: every mined layer); ``n``: triggers shown per
    key (the paper: 25); ``sign``: +1 top coefficients, -1 most negative (gated models).
    """

    def __init__(self, examples: TriggerExamples, tokenizer, path=DEFAULT_PATH, annotator: str = "anonymous",
                 layers=None, n: int = 25, sign: int = 1, seed: int | None = None):
        self.examples, self.tokenizer = examples, tokenizer
        self.path = Path(path)
        self.annotator = str(annotator).strip() or "anonymous"
        mined = examples.layers
        self.layers = mined if layers is None else list(layers)
        bad = sorted(set(self.layers) - set(mined))
        if bad or not self.layers:
            raise ParameterError(f"Layers {bad or self.layers} were not mined; mined layers: {mined}.")
        if sign not in examples.triggers["sign"].unique():
            raise ParameterError(f"No trigger examples with sign {sign}.")
        self.n, self.sign = n, sign
        self.d_ff = int(examples.triggers["memory"].max()) + 1
        self.rng = random.Random(seed)
        self.layer = self.memory = None
        self.triggers: pd.DataFrame = pd.DataFrame()
        self.patterns: list[Pattern] = []

    # ---- choosing a key --------------------------------------------------------------------------
    def next_key(self, layer: int | None = None, memory: int | None = None) -> pd.DataFrame:
        """Show a key (a random one unless given): its top-n triggers as text. Unsaved patterns are dropped."""
        self.layer = self.rng.choice(self.layers) if layer is None else layer
        self.memory = self.rng.randrange(self.d_ff) if memory is None else memory
        if self.layer not in self.layers or not 0 <= self.memory < self.d_ff:
            raise ParameterError(f"No key ({layer}, {memory}): layers {self.layers}, memories 0..{self.d_ff - 1}.")
        self.triggers = trigger_table(self.examples, self.tokenizer, self.layer, self.memory, self.sign, self.n)
        self.patterns = []
        return self.triggers

    def _need_key(self) -> None:
        if self.layer is None:
            raise ParameterError("No key shown yet: call next_key() first.")

    # ---- patterns ---------------------------------------------------------------------------------
    def add_pattern(self, description: str, kind: str) -> int:
        """Add a pattern (``kind`` "shallow" or "semantic"); returns its id."""
        self._need_key()
        description = " ".join(str(description).split())
        if not description:
            raise ParameterError("Describe the pattern (e.g. 'ends with \"the\"' or 'about sports').")
        if kind not in PATTERN_KINDS:
            raise ParameterError(f"kind must be one of {PATTERN_KINDS}, got {kind!r}.")
        self.patterns.append(Pattern(description, kind))
        return len(self.patterns) - 1

    def _pattern(self, pattern_id: int) -> Pattern:
        if not isinstance(pattern_id, int) or not 0 <= pattern_id < len(self.patterns):
            raise ParameterError(f"No pattern {pattern_id!r}: there are {len(self.patterns)}.")
        return self.patterns[pattern_id]

    def remove_pattern(self, pattern_id: int) -> None:
        self._pattern(pattern_id)
        del self.patterns[pattern_id]

    def tick(self, pattern_id: int, rank: int, covered: bool = True) -> None:
        """Mark (or unmark) the prefix of rank ``rank`` as covered by the pattern."""
        pattern = self._pattern(pattern_id)
        if not isinstance(rank, int) or not 0 <= rank < len(self.triggers):
            raise ParameterError(f"rank must be in 0..{len(self.triggers) - 1}, got {rank!r}.")
        (pattern.covered.add if covered else pattern.covered.discard)(rank)

    def coverage(self) -> float:
        """Share of the shown prefixes covered by at least one pattern."""
        covered = set().union(*[p.covered for p in self.patterns]) if self.patterns else set()
        return len(covered) / len(self.triggers) if len(self.triggers) else 0.0

    # ---- saving ------------------------------------------------------------------------------------
    def rows(self) -> pd.DataFrame:
        """The rows ``save`` appends: one per pattern (a key with none gets one row of kind "none")."""
        self._need_key()
        short = [p.description for p in self.patterns if len(p.covered) < MIN_COVER]
        if short:
            raise ParameterError(f"Patterns {short} cover fewer than {MIN_COVER} prefixes; as in the paper a pattern "
                                 f"needs at least {MIN_COVER}. Tick more prefixes or remove them.")
        now = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        base = {"model": self.examples.manifest.get("model"), "layer": self.layer, "memory": self.memory,
                "sign": self.sign, "n_triggers": len(self.triggers), "annotator": self.annotator, "saved_at": now}
        rows = [{**base, "pattern_id": i, "pattern": p.description, "kind": p.kind,
                 "covered": ";".join(str(r) for r in sorted(p.covered))} for i, p in enumerate(self.patterns)]
        if not rows:
            rows = [{**base, "pattern_id": -1, "pattern": "", "kind": "none", "covered": ""}]
        return pd.DataFrame(rows)[ANNOTATION_COLUMNS]

    def save(self) -> Path:
        """Append this key's annotation to the CSV file (rewritten atomically)."""
        new = self.rows()
        old = read_annotations(self.path) if self.path.exists() else pd.DataFrame(columns=ANNOTATION_COLUMNS)
        frame = pd.concat([old[ANNOTATION_COLUMNS], new], ignore_index=True) if len(old) else new
        buf = io.StringIO()
        frame.to_csv(buf, index=False)
        atomic_write_bytes(self.path, buf.getvalue().encode())
        return self.path

    def load(self) -> pd.DataFrame:
        """Everything saved in the CSV file so far."""
        return read_annotations(self.path)


def annotation_widget(session: AnnotationSession):
    """An ipywidgets UI around ``session``: the key's triggers with a checkbox each, a pattern editor,
    and buttons for the next key and saving."""
    import html

    import ipywidgets as w

    header = w.HTML()
    description = w.Text(placeholder="pattern, e.g. ends with 'the' / about music", layout=w.Layout(width="50%"))
    kind = w.Dropdown(options=list(PATTERN_KINDS), value="shallow", layout=w.Layout(width="120px"))
    add = w.Button(description="Add pattern")
    current = w.Dropdown(description="Ticking for", options=[], layout=w.Layout(width="60%"))
    rows_box = w.VBox()
    next_button, save_button = w.Button(description="Next key"), w.Button(description="Save", button_style="success")
    status = w.HTML()
    checks: list = []
    updating = {"on": False}

    def refresh_checks(*_):
        updating["on"] = True
        pid = current.value
        for rank, box in enumerate(checks):
            box.value = pid is not None and rank in session.patterns[pid].covered
            box.disabled = pid is None
        updating["on"] = False
        status.value = f"{len(session.patterns)} pattern(s), {session.coverage():.0%} of prefixes covered."

    def on_tick(change, rank):
        if updating["on"] or current.value is None:
            return
        session.tick(current.value, rank, change["new"])
        refresh_checks()

    def show_key(*_):
        table = session.next_key()
        header.value = (f"<b>Layer {session.layer}, memory {session.memory}</b> — top {len(table)} trigger "
                        "prefixes (last token marked, next token in grey)")
        checks.clear()
        lines = []
        for r in table.itertuples():
            box = w.Checkbox(value=False, indent=False, layout=w.Layout(width="30px"))
            box.observe(lambda change, rank=int(r.rank): on_tick(change, rank), names="value")
            checks.append(box)
            text = (f"<span style='font-family:monospace'>{r.rank:2d} ({r.coefficient:.2f})</span> "
                    f"{html.escape(r.prefix)}<mark><b>{html.escape(r.last_token)}</b></mark> "
                    f"<span style='color:#888'>{html.escape(r.next_token)}</span>")
            lines.append(w.HBox([box, w.HTML(text)]))
        rows_box.children = lines
        current.options, current.value = [], None
        refresh_checks()

    def on_add(*_):
        try:
            pid = session.add_pattern(description.value, kind.value)
        except ParameterError as exc:
            status.value = f"<span style='color:red'>{html.escape(str(exc))}</span>"
            return
        current.options = [(f"{i}: {p.description} ({p.kind})", i) for i, p in enumerate(session.patterns)]
        current.value = pid
        description.value = ""
        refresh_checks()

    def on_save(*_):
        try:
            path = session.save()
        except ParameterError as exc:
            status.value = f"<span style='color:red'>{html.escape(str(exc))}</span>"
            return
        status.value = f"Saved to {html.escape(str(path))}."

    add.on_click(on_add)
    current.observe(refresh_checks, names="value")
    next_button.on_click(show_key)
    save_button.on_click(on_save)
    show_key()
    return w.VBox([header, w.HBox([description, kind, add]), current, rows_box,
                   w.HBox([next_button, save_button]), status])
