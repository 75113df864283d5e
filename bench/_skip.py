"""What a benchmark does when the data it measures is absent (e.g. a fresh clone without the
shared COCO files next to the repository): it says which file is missing and how to give it,
then exits with :data:`SKIPPED`, which ``make bench`` counts as skipped rather than failed."""

from __future__ import annotations

import sys
from pathlib import Path

SKIPPED = 77  # the exit status of a benchmark whose input is absent (automake's "skipped")


def skip_unless_present(path: Path, hint: str) -> None:
    """Exit with :data:`SKIPPED` and a message on stderr unless ``path`` exists."""
    if not Path(path).exists():
        print(f"skipped: {path} not found ({hint})", file=sys.stderr)
        raise SystemExit(SKIPPED)
