"""Clinical join: link each de-identified study to its patient's clinical record, and apply
the inclusion windows.

Both sides are already pseudonymized with the same key and shifted by the same per-patient
offset, so ``days_from_index`` is exact although no real date is known here.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from schemas.catalog import QC
from schemas.config import Window
from schemas.pipeline import OK, STUDY_LINKS


@dataclass(frozen=True)
class ClinicalJoin:
    """Study links, studies outside their window (study_uid -> reason), their files (seq ->
    reason) and the qc rows."""

    links: pa.Table
    outside_window: dict[str, str]
    outcomes: pa.Table
    files_outside: dict[int, str]


def window_for(modalities: list[str], windows: dict[str, Window]) -> tuple[str, Window] | None:
    """The strictest window among the study's modalities (a CT study with a screen save is
    judged as CT); None when no modality has one."""
    known = [(m, windows[m]) for m in sorted(set(modalities)) if m in windows]
    if not known:
        return None
    return min(known, key=lambda mw: (mw[1].before if mw[1].before is not None else 10**9))


def _outside(days: int, window: Window) -> str | None:
    if window.before is not None and days < -window.before:
        return f"{-days} days before the index date; the window starts {window.before} before"
    if window.after is not None and days > window.after:
        return f"{days} days after the index date; the window ends {window.after} after"
    return None


def join_clinical(deidentified: pa.Table, patients: pa.Table,
                  windows: dict[str, Window]) -> ClinicalJoin:
    """One link row per study; studies outside their inclusion window; studies whose patient
    has no clinical record are kept and flagged."""
    instances = deidentified.filter(pc.equal(deidentified["status"], OK))
    con = duckdb.connect()
    con.register("instances", instances)
    con.register("patients", patients)
    rows = con.execute(
        """
        SELECT s.study_uid, s.patient_id, s.study_date,
               CAST(s.study_date - p.index_date AS INTEGER) AS days_from_index,
               p.patient_id IS NOT NULL AS has_clinical, s.modalities
        FROM (SELECT study_uid, min(patient_id) AS patient_id, min(study_date) AS study_date,
                     list(DISTINCT modality) AS modalities
              FROM instances GROUP BY study_uid) s
        LEFT JOIN patients p USING (patient_id)
        ORDER BY s.study_uid
        """
    ).fetchall()
    con.close()
    links, outside, outcomes = [], {}, []
    for study_uid, patient_id, study_date, days, has_clinical, modalities in rows:
        links.append({"study_uid": study_uid, "patient_id": patient_id, "study_date": study_date,
                      "days_from_index": days, "has_clinical": has_clinical})
        if not has_clinical:
            outcomes.append({"level": "study", "uid": study_uid, "study_uid": study_uid,
                             "rule": "no_clinical_record",
                             "outcome": "flagged", "detail": "no clinical record for the "
                             "patient (is an ID remap missing?)"})
            continue
        found = window_for([m for m in modalities if m], windows)
        detail = _outside(days, found[1]) if found and days is not None else None
        if detail:
            outside[study_uid] = f"outside_window:{found[0]}"
            outcomes.append({"level": "study", "uid": study_uid, "study_uid": study_uid,
                             "rule": "inclusion_window",
                             "outcome": "excluded", "detail": f"{found[0]} study {detail}"})
    files = {seq: outside[study] for seq, study in zip(
        instances.column("seq").to_pylist(), instances.column("study_uid").to_pylist(),
        strict=True) if study in outside}
    return ClinicalJoin(links=pa.Table.from_pylist(links, schema=STUDY_LINKS),
                        outside_window=outside,
                        outcomes=pa.Table.from_pylist(outcomes, schema=QC),
                        files_outside=files)
