"""Notebook tools built on the analyses: the memory explorer's widgets and the annotation widget."""

__all__: list[str] = []
