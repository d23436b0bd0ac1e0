"""The pinned torch / torchvision / Ray set salmap is tested with (``constraints.txt``), shipped
inside the package so that an install without a clone can use it.

Needs nothing but the standard library, so it runs right after ``pip install --no-deps``::

    python -m pipeline.constraints > constraints.txt
    pip install -c constraints.txt <the salmap wheel, sdist or folder>
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "constraints.txt"  # a copy of the top-level file


def text() -> str:
    """The constraints file's text."""
    return PACKAGED.read_text()


def main() -> int:
    sys.stdout.write(text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
