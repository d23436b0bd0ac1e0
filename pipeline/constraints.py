"""The package set salmap is tested with (a copy of the repository's ``constraints-lock.txt``:
every package and version of the test environment, torch / torchvision / Ray included),
shipped inside the package so that an install without a clone can use it.

Needs nothing but the standard library, so it runs right after ``pip install --no-deps``::

    python -m salmap.pipeline.constraints > constraints.txt
    pip install -c constraints.txt <the salmap wheel, sdist or folder>
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGED = Path(__file__).resolve().parent / "constraints.txt"  # a copy of constraints-lock.txt


def text() -> str:
    """The constraints file's text."""
    return PACKAGED.read_text()


def main() -> int:
    """``python -m salmap.pipeline.constraints``: print the tested package set."""
    sys.stdout.write(text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
