"""Remove the stray top-level folders the pyiqa wheel drops into site-packages (build/, docs/, options/,
tests/, ResultsCalibra/): they are not part of pyiqa's package and `tests/` would shadow ours.

Only files that pyiqa's own RECORD lists are removed.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

STRAY = {"build", "docs", "options", "tests", "ResultsCalibra"}


def main() -> None:
    dist = importlib.metadata.distribution("pyiqa")
    removed = set()
    for file in dist.files or []:
        top = file.parts[0]
        if top in STRAY:
            path = Path(dist.locate_file(file))
            if path.exists():
                path.unlink()
                removed.add(Path(dist.locate_file(top)))
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"pruned pyiqa's stray folders: {', '.join(sorted(p.name for p in removed)) or 'none'}")


if __name__ == "__main__":
    main()
