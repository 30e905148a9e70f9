"""Patient ID remapping (old ID -> current ID), applied before any pseudonym is computed.

The tip sheet's sites reissue patient IDs; images keep the old one, clinical data the new one.
Chains (a -> b -> c) resolve to their end; a cycle is a data error and stops the run.
"""

from __future__ import annotations

from tasks.deidentify.keys import normalize_patient_id
from tasks.deidentify.tabular import read_rows


class RemapError(ValueError):
    """The remap file cannot be used; the message never quotes an ID."""


def load_remap(path: str | None) -> dict[str, str]:
    """Read an ``old_id,new_id`` table (CSV, Excel or Parquet) into a mapping from each old ID
    to its final current ID."""
    if not path:
        return {}
    edges: dict[str, str] = {}
    try:
        header, rows = read_rows(path)
    except OSError:
        raise RemapError("the ID remap file is missing or unreadable") from None
    missing = {"old_id", "new_id"} - set(header)
    if missing:
        raise RemapError(f"ID remap file lacks column {min(missing)!r}")
    for line, row in enumerate(rows, start=2):
        old = normalize_patient_id(row["old_id"] or "")
        new = normalize_patient_id(row["new_id"] or "")
        if not old or not new or old == new:
            continue
        if old in edges and edges[old] != new:
            raise RemapError(f"ID remap file maps one old ID to two new IDs (line {line})")
        edges[old] = new
    return {old: _follow(old, edges) for old in edges}


def _follow(start: str, edges: dict[str, str]) -> str:
    seen = {start}
    current = edges[start]
    while current in edges:
        if current in seen:
            raise RemapError(f"ID remap file has a cycle of {len(seen)} IDs")
        seen.add(current)
        current = edges[current]
    return current


def current_id(patient_id: str, remap: dict[str, str]) -> str:
    """The current form of a normalized patient ID."""
    return remap.get(patient_id, patient_id)
