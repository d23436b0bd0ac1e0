"""The unit id ``<model>__<method>``: built, parsed and turned into its data folder here only.

A unit is one (model, method) pair; its id names its actor pool, its commit records
(``_commits/<unit>/``), its progress counter and its rows' folder (``data/<model>/<method>``).
The id lives in workers (the actor builds it for its progress reporter) because workers must
never import pipeline; pipeline, report and export read it through this module.
"""

from __future__ import annotations

from typing import NamedTuple

SEPARATOR = "__"


class UnitId(NamedTuple):
    """A parsed unit id (unpacks as ``model, method``); ``str()`` gives the id back."""

    model: str
    method: str

    @classmethod
    def parse(cls, unit_id: str) -> UnitId:
        """Split ``<model>__<method>`` at its first separator (a model name has none); an id
        without one is a model with an empty method."""
        model, _, method = unit_id.partition(SEPARATOR)
        return cls(model, method)

    def __str__(self) -> str:
        return format_unit_id(self.model, self.method)

    @property
    def data_prefix(self) -> str:
        """The folder of the unit's rows under the run: ``data/<model>/<method>``."""
        return f"data/{self.model}/{self.method}"


def format_unit_id(model: str, method: str) -> str:
    """The id of the unit of ``model`` explained with ``method``."""
    return f"{model}{SEPARATOR}{method}"


def parse_unit_id(unit_id: str) -> UnitId:
    """``<model>__<method>`` -> ``UnitId(model, method)``."""
    return UnitId.parse(unit_id)


def unit_parts(unit_id: str) -> list[str]:
    """The names a user may call the unit by alone: its model and its method (as the id has
    them; one part where the id has no separator)."""
    return unit_id.split(SEPARATOR, 1)


def data_prefix(unit_id: str) -> str:
    """The folder of the unit's rows under the run: ``data/<model>/<method>``."""
    return UnitId.parse(unit_id).data_prefix
