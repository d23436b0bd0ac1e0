"""salmap: saliency maps, pseudo-labels and faithfulness metrics for whole image datasets, on Ray.

``import salmap`` is the entry point: :func:`salmap.run` runs a job, :func:`salmap.read` and
:func:`salmap.maps` read its committed rows, :class:`salmap.Explainer` explains images in
memory (all from :mod:`salmap.pipeline.api`). ``salmap.pipeline`` is the driver (config,
planning, reading shards, fan-out, commits, CLI, report); ``salmap.workers`` is what runs
inside an actor (models, methods, metrics) and never imports the driver.
"""

from __future__ import annotations

import os
from typing import Any

# In a source checkout the two subpackages are the repository's top-level folders pipeline/ and
# workers/ (an installed wheel carries them inside salmap/, and an editable install maps them).
_here = os.path.dirname(os.path.abspath(__file__))
_root = os.path.dirname(_here)
if not os.path.isdir(os.path.join(_here, "pipeline")) and os.path.isfile(
        os.path.join(_root, "pipeline", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

__version__ = "0.1.0"
__all__ = ["Explainer", "run", "read", "maps", "__version__"]


def __getattr__(name: str) -> Any:
    """The API names, imported on first use (``import salmap`` alone stays cheap)."""
    if name in ("Explainer", "run", "read", "maps", "api"):
        from .pipeline import api

        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'salmap' has no attribute {name!r}")
