"""Figures: each function takes a result (a DataFrame or dataclass) and returns a matplotlib Figure; one
module per analysis (``keys``, ``values``, ``aggregation``, ...)."""

__all__: list[str] = []
