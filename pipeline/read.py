"""Reading committed output: only files listed in commit records, never partial waves.

:func:`read_run` gives a pyarrow dataset; :func:`read_frame` a pandas DataFrame, optionally
with each row's map as a float32 ``[h, w]`` array; :func:`read_batches` the same rows as
DataFrames of bounded size, for runs too large to hold; :func:`maps` one unit's maps as one
``[N, h, w]`` array. A unit can be named ``<model>__<method>``, or by its method (or model)
alone when that is unambiguous.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
from salmap.workers.unit_id import unit_parts

from .ledger import COMMITS, MANIFEST_KEY, committed_files
from .rollup import committed_file_lists
from .storage import Store

MAP_COLUMN = "saliency"
# binary and map columns left out of printouts and of read_frame's default columns
HEAVY_COLUMNS = ("saliency", "saliency_png", "pseudo_mask_png", "label_map_png")


class RunNotFound(ValueError):
    """The path holds no salmap run (no manifest, no commit records)."""


class UnitNotFound(ValueError):
    """No committed unit matches the name given (the message lists the run's units)."""


def _store(run: str, endpoint: str | None, storage: Any) -> Store:
    return Store.open(run, storage if storage is not None else
                      ({"endpoint": endpoint} if endpoint else None))


def _commits(run: str, store: Store, commits: dict | None) -> dict:
    if commits is not None:
        return commits
    if not store.exists(MANIFEST_KEY) and not store.list(COMMITS):
        raise RunNotFound(f"{run}: not found (no salmap run there: no {MANIFEST_KEY}, "
                          f"no {COMMITS}/)")
    return committed_file_lists(store)  # the records' file lists only, not their aggregates


def resolve_unit(name: str, units: list[str]) -> str:
    """``<model>__<method>``, or a method or model name that belongs to exactly one unit."""
    if name in units:
        return name
    by_part = [u for u in units if name in unit_parts(u)]
    if len(by_part) == 1:
        return by_part[0]
    if len(by_part) > 1:
        raise UnitNotFound(f"unit {name!r} is ambiguous: {', '.join(sorted(by_part))}; "
                           "name it as <model>__<method>")
    options = sorted({*units, *(p for u in units for p in unit_parts(u))})
    close = difflib.get_close_matches(name, options, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    listed = ", ".join(sorted(units)) or "none yet"
    raise UnitNotFound(f"no committed unit {name!r}{hint}; units: {listed}")


def read_run(run: str, unit: str | None = None, endpoint: str | None = None,
             storage: object = None, commits: dict | None = None) -> pads.Dataset:
    """A pyarrow dataset of a run's committed rows (``run`` = ``<run.output>/<run.id>``).

    Units with different map shapes have different ``saliency`` types; pass ``unit`` to read
    one, or read all and the ``saliency`` column is left out. ``commits`` (from
    :func:`salmap.pipeline.ledger.load_commits`) saves reading the commit records again when
    several units are read one after the other. Raises :class:`RunNotFound` when ``run``
    holds no run and :class:`UnitNotFound` for an unknown or ambiguous ``unit``.
    """
    store = _store(run, endpoint, storage)
    commits = _commits(run, store, commits)
    if unit is not None:
        unit = resolve_unit(unit, list(commits))
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
                            (f.name == MAP_COLUMN or d.schema.field(f.name).type == f.type)])
    common = pa.schema([f for f in common if f.name != MAP_COLUMN])
    return pads.dataset(paths, filesystem=store.fs, format="parquet", schema=common)


def units(run: str, endpoint: str | None = None, storage: object = None) -> list[str]:
    """The run's units that have committed rows."""
    store = _store(run, endpoint, storage)
    return sorted(u for u, waves in _commits(run, store, None).items() if waves)


def to_maps(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A ``saliency`` column (``arrow.fixed_shape_tensor``) -> float32 ``[N, h, w]``; rows
    without a map (error rows) are NaN."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    typ = column.type
    if not isinstance(typ, pa.FixedShapeTensorType):
        raise TypeError(f"not a map column: {typ} (expected arrow.fixed_shape_tensor)")
    h, w = typ.shape
    storage = column.storage if isinstance(column, pa.ExtensionArray) else column
    size = h * w
    flat = storage.values.slice(storage.offset * size, len(storage) * size)
    out = flat.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(storage), h, w)
    out[~storage.is_valid().to_numpy(zero_copy_only=False)] = np.nan
    return out


def maps(run: str, unit: str | None = None, endpoint: str | None = None,
         storage: object = None) -> np.ndarray:
    """One unit's maps as float32 ``[N, h, w]``, in the row order of ``read_frame(run, unit)``
    (NaN maps on error rows). ``unit`` may be omitted when the run has one unit."""
    ds = read_run(run, unit=_single(run, unit, endpoint, storage), endpoint=endpoint,
                  storage=storage)
    return to_maps(ds.to_table(columns=[MAP_COLUMN]).column(MAP_COLUMN))


def _single(run: str, unit: str | None, endpoint: str | None, storage: object) -> str:
    if unit is not None:
        return unit
    found = units(run, endpoint, storage)
    if len(found) != 1:
        raise UnitNotFound(f"{run} has {len(found)} units ({', '.join(found)}): name one")
    return found[0]


def read_frame(run: str, unit: str | None = None, columns: list[str] | None = None,
               maps: bool = False, endpoint: str | None = None,
               storage: object = None):
    """The committed rows as a pandas DataFrame.

    ``columns``: the columns to read (default: every column except the map and the PNGs).
    ``maps=True`` adds the ``saliency`` column with each row's map as a float32 ``[h, w]``
    numpy array (None on error rows); units with different map shapes can be read together.
    """
    import pandas as pd

    store = _store(run, endpoint, storage)
    commits = _commits(run, store, None)
    wanted = [resolve_unit(unit, list(commits))] if unit is not None else \
        sorted(u for u, w in commits.items() if w)
    frames = []
    for u in wanted:
        ds = read_run(run, unit=u, endpoint=endpoint, storage=storage, commits=commits)
        names = ds.schema.names
        cols = [c for c in (columns or names) if c in names and (columns or c not in HEAVY_COLUMNS)]
        if columns:
            missing = [c for c in columns if c not in names]
            if missing:
                raise KeyError(f"{u}: no column {', '.join(missing)}; columns: {', '.join(names)}")
        if maps and MAP_COLUMN not in cols:
            cols.append(MAP_COLUMN)
        table = ds.to_table(columns=cols)
        rest = table.drop_columns([MAP_COLUMN]) if MAP_COLUMN in cols else table
        df = rest.to_pandas()
        if MAP_COLUMN in cols:
            arr = to_maps(table.column(MAP_COLUMN))
            df[MAP_COLUMN] = [None if np.isnan(m).all() else m for m in arr]
        frames.append(df)
    if not frames:
        raise ValueError(f"{run} has no committed rows yet")
    return pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]


def read_batches(run: str, unit: str | None = None, columns: list[str] | None = None,
                 batch_rows: int = 65_536, endpoint: str | None = None,
                 storage: object = None) -> Iterator[Any]:
    """The committed rows as pandas DataFrames of at most ``batch_rows`` rows, one unit after
    the other: :func:`read_frame` for runs too large to hold at once (memory stays that of one
    batch). ``columns`` as in :func:`read_frame` (no maps)."""
    store = _store(run, endpoint, storage)
    commits = _commits(run, store, None)
    wanted = [resolve_unit(unit, list(commits))] if unit is not None else \
        sorted(u for u, w in commits.items() if w)
    import pyarrow.parquet as pq

    for u in wanted:
        files = committed_files(commits, u)
        if not files:
            continue
        with store.fs.open_input_file(store.path(files[0])) as src:
            names = pq.ParquetFile(src).schema_arrow.names
        cols = [c for c in (columns or names) if c in names and (columns or c not in HEAVY_COLUMNS)]
        if columns and [c for c in columns if c not in names]:
            missing = ", ".join(c for c in columns if c not in names)
            raise KeyError(f"{u}: no column {missing}; columns: {', '.join(names)}")
        for f in files:  # one file at a time: no scanner read-ahead across the unit's files
            with store.fs.open_input_file(store.path(f)) as src:
                for batch in pq.ParquetFile(src).iter_batches(batch_size=batch_rows, columns=cols):
                    if batch.num_rows:
                        yield batch.to_pandas()


def count_rows(ds: pads.Dataset) -> int:
    """The rows of a dataset from its files' footers, one file at a time (bounded memory)."""
    import pyarrow.parquet as pq

    total = 0
    for f in ds.files:
        with ds.filesystem.open_input_file(f) as src:
            total += pq.ParquetFile(src).metadata.num_rows
    return total


def head(ds: pads.Dataset, n: int, columns: list[str]) -> pa.Table:
    """The first ``n`` rows of a dataset, read file by file until there are enough."""
    import pyarrow.parquet as pq

    batches: list[pa.RecordBatch] = []
    got = 0
    for f in ds.files:
        if got >= n:
            break
        with ds.filesystem.open_input_file(f) as src:
            pf = pq.ParquetFile(src)
            for batch in pf.iter_batches(batch_size=max(1, n), columns=[
                    c for c in columns if c in pf.schema_arrow.names]):
                batches.append(batch.slice(0, n - got))
                got += batches[-1].num_rows
                if got >= n:
                    break
    if not batches:
        return ds.schema.empty_table().select([c for c in columns if c in ds.schema.names])
    return pa.Table.from_batches(batches).slice(0, n)
