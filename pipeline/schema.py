"""The Parquet output schema: one row per (sample, model, method, target).

Derived from the one column declaration, :mod:`salmap.workers.columns`.
"""

from __future__ import annotations

from salmap.workers.columns import BOX, COLUMNS, METRIC_COLUMNS, output_schema, saliency_type

__all__ = ["BOX", "COLUMNS", "METRIC_COLUMNS", "output_schema", "saliency_type"]
