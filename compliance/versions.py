"""Code and data versions for Dagster assets, so "what changed" is visible in the UI.

Code version = the first 12 hex digits of the sha256 of the source files that define an asset's
logic: its asset module plus the library modules it calls (e.g. `labels` = assets/ingestion.py +
ingestion/labels.py). It changes exactly when one of those files changes, with nothing to
remember to bump; an edit to a comment also counts as a change (the safe side: a rebuild is
proposed, never silently skipped). Data version = the Delta table version an asset wrote
(`<table>@v<N>`): a replayed, unchanged daily batch writes no new Delta version, so its data
version does not move either.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from dagster import DataVersion

from ground.settings import PROJECT_ROOT


@functools.lru_cache(maxsize=256)
def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def source_version(*paths: str | Path) -> str:
    """12-hex sha256 over the named source files (absolute, or relative to the project root), in the given order."""
    h = hashlib.sha256()
    for p in paths:
        full = Path(p) if Path(p).is_absolute() else PROJECT_ROOT / p
        if not full.exists():
            raise FileNotFoundError(f"code_version source {full} does not exist: fix the path in the asset's "
                                    "code_version=source_version(...)")
        h.update(full.relative_to(PROJECT_ROOT).as_posix().encode() if full.is_relative_to(PROJECT_ROOT) else b"")
        h.update(_digest(str(full)).encode())
    return h.hexdigest()[:12]


def delta_data_version(table: str, version: int) -> DataVersion:
    """The data version of an asset stored as a Delta table: the table version it wrote."""
    return DataVersion(f"{table}@v{int(version)}")
