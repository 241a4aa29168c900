"""Analyses of related papers, each in the key-value view of Geva et al. (one module per paper)."""

__all__: list[str] = []
