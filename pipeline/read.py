"""Reading committed output: only files listed in commit records, never partial waves."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from .ledger import committed_files, load_commits
from .storage import Store


def read_run(run: str, unit: str | None = None, endpoint: str | None = None,
             storage: object = None, commits: dict | None = None) -> pads.Dataset:
    """A pyarrow dataset of a run's committed rows (``run`` = ``<run.output>/<run.id>``).

    Units with different map shapes have different ``saliency`` types; pass ``unit``
    (``<model>__<method>``) to read one, or read all and drop the ``saliency`` column.
    ``commits`` (from :func:`pipeline.ledger.load_commits`) saves reading the commit records
    again when several units are read one after the other.
    """
    store = Store.open(run, storage if storage is not None else ({"endpoint": endpoint} if endpoint else None))
    if commits is None:
        commits = load_commits(store)
    if unit is not None and unit not in commits:
        raise ValueError(f"unit {unit!r} has no committed rows in {run}; units: {', '.join(sorted(commits))}")
    units = [unit] if unit is not None else sorted(commits)
    groups = [[store.path(f) for f in committed_files(commits, u)] for u in units]
    groups = [g for g in groups if g]
    if not groups:
        raise ValueError(f"{run} has no committed rows yet")
    datasets = [pads.dataset(g, filesystem=store.fs, format="parquet") for g in groups]
    if len(datasets) == 1:
        return datasets[0]
    paths = [p for g in groups for p in g]
    schemas = {str(d.schema.remove_metadata()) for d in datasets}
    if len(schemas) == 1:
        return pads.dataset(paths, filesystem=store.fs, format="parquet")
    # units store maps of different shapes: the union leaves the map column out
    common = datasets[0].schema
    for d in datasets[1:]:
        common = pa.schema([f for f in common if f.name in d.schema.names and
                            (f.name == "saliency" or d.schema.field(f.name).type == f.type)])
    common = pa.schema([f for f in common if f.name != "saliency"])
    return pads.dataset(paths, filesystem=store.fs, format="parquet", schema=common)
