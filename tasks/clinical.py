"""Clinical join: link each de-identified study to its patient's clinical record.

Both sides are already pseudonymized with the same key and shifted by the same per-patient
offset, so ``days_from_index`` is exact although no real date is known here.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

from schemas.pipeline import OK, STUDY_LINKS


def join_clinical(deidentified: pa.Table, patients: pa.Table) -> pa.Table:
    """One row per study: its patient, (shifted) date, days from the index date, and linkage."""
    instances = deidentified.filter(pc.equal(deidentified["status"], OK))
    con = duckdb.connect()
    con.register("instances", instances)
    con.register("patients", patients)
    links = con.execute(
        """
        SELECT s.study_uid, s.patient_id, s.study_date,
               CAST(s.study_date - p.index_date AS INTEGER) AS days_from_index,
               p.patient_id IS NOT NULL AS has_clinical
        FROM (SELECT study_uid, min(patient_id) AS patient_id, min(study_date) AS study_date
              FROM instances GROUP BY study_uid) s
        LEFT JOIN patients p USING (patient_id)
        ORDER BY s.study_uid
        """
    ).to_arrow_table()
    con.close()
    return links.cast(STUDY_LINKS)
