"""On resume: every committed Parquet file must still exist. Checked from one listing per unit
(not a request per file); a wave whose files are gone is withdrawn and redone, or, for a unit
this config no longer runs, reported as a failure (the run then exits non-zero)."""

from __future__ import annotations

from collections.abc import Callable

from salmap.workers.unit_id import data_prefix as unit_data_prefix

from .commit_record import CommitRecord
from .ledger import Ledger, record_key
from .storage import Store


def missing_files(store: Store, commits: dict[str, dict[str, CommitRecord]]) -> dict[tuple[str, str], list[str]]:
    """(unit id, wave id) -> the files its record lists that do not exist, from one listing of
    each unit's data folder."""
    out: dict[tuple[str, str], list[str]] = {}
    for unit_id, waves in sorted(commits.items()):
        there = set(store.list(unit_data_prefix(unit_id)))
        for wave_id, rec in sorted(waves.items()):
            gone = [f for f in rec.files if f not in there]
            if gone:
                out[(unit_id, wave_id)] = gone
    return out


def redo_waves_with_missing_files(store: Store, ledger: Ledger, commits: dict[str, dict[str, CommitRecord]],
                                  units: set[str], out: Callable[[str], None]) -> list[str]:
    """Withdraw the committed waves of ``units`` whose files are gone (their shards become
    pending, so this run redoes them); returns failure lines for the waves of other units."""
    failures = []
    for (unit_id, wave_id), gone in missing_files(store, commits).items():
        where = store.url(record_key(commits[unit_id][wave_id]))
        if unit_id in units:
            ledger.uncommit(unit_id, wave_id, unit_data_prefix(unit_id))
            commits[unit_id].pop(wave_id, None)
            out(f"salmap: committed wave {wave_id} of {unit_id} lost {len(gone)} file(s) "
                f"(e.g. {store.url(gone[0])}); its record {where} is withdrawn and the wave redone")
        else:
            failures.append(f"{unit_id}: committed wave {wave_id} lost {len(gone)} file(s) (e.g. "
                            f"{store.url(gone[0])}); run a config with unit {unit_id} to redo it, "
                            f"or move {where} away")
    return failures
