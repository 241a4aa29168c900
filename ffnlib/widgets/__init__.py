"""Notebook tools built on the analyses: the memory explorer (widgets, HTML, static atlas) and the annotation widget."""

__all__: list[str] = []
