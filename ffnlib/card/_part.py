"""What each section of a card reads, and how it says what it lacks: the notebook that computes it."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FIELD_NOTEBOOKS", "Part", "needs"]

# every DataFrame field of a card -> the notebook whose results fill it
FIELD_NOTEBOOKS = {
    "triggers": "01_keys", "pattern": "01_keys", "removal": "01_keys",
    "value_tokens": "02_values", "value_agreement": "02_values",
    "aggregation": "03_aggregation",
    "facts": "06_knowledge_neurons", "suppression": "06_knowledge_neurons",
    "experts": "07_moefication", "router": "07_moefication",
    "corpus_size": "10_corpus_size",
    "percentiles": "01_keys",
}


def needs(field_name: str, why: str, notebook: str | None = None) -> str:
    """The line a card shows for a field it cannot fill: ``run notebook <notebook>: <why>``."""
    return f"run notebook {notebook or FIELD_NOTEBOOKS[field_name]}: {why}"


@dataclass
class Part:
    """What one section adds to a card: its fields (a DataFrame, or None with a line in ``missing``), the numbers
    placed against the layer and the control (``ffnlib.card.Measure``), and notes on where each came from."""

    fields: dict = field(default_factory=dict)
    missing: dict = field(default_factory=dict)
    measures: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)

    def lack(self, field_name: str, why: str, notebook: str | None = None) -> None:
        self.fields[field_name] = None
        self.missing[field_name] = needs(field_name, why, notebook)
