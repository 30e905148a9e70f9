"""Choose studies by an analyst's SQL predicate and cut every catalog table down to them.

The predicate is evaluated over ``selection``: one row per study row, the ``studies`` columns joined
with the columns of its patient (sex, age_at_index, covid_status, test_method, ...). It runs in
a DuckDB of its own that holds only that table, with file access, Python replacement scans and
configuration changes disabled, so it can read nothing else and change nothing.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from schemas.catalog import TABLES

MAX_PREDICATE = 4000

# how each catalog table is cut down to the chosen studies (``chosen``: their study_uid)
_OBJECTS = ("(SELECT study_uid AS uid FROM chosen UNION ALL "
            "SELECT series_uid FROM series WHERE study_uid IN (SELECT study_uid FROM chosen) "
            "UNION ALL "
            "SELECT sop_uid FROM instances WHERE study_uid IN (SELECT study_uid FROM chosen) "
            "UNION ALL "
            "SELECT sop_uid FROM excluded_instances "
            "WHERE study_uid IN (SELECT study_uid FROM chosen))")
_PATIENTS = ("(SELECT patient_id FROM studies "
             "WHERE study_uid IN (SELECT study_uid FROM chosen))")
FILTERS: dict[str, str] = {
    "patients": f"patient_id IN {_PATIENTS}",
    "studies": "study_uid IN (SELECT study_uid FROM chosen)",
    "series": "study_uid IN (SELECT study_uid FROM chosen)",
    "instances": "study_uid IN (SELECT study_uid FROM chosen)",
    "excluded_instances": "study_uid IN (SELECT study_uid FROM chosen)",
    "clinical": f"patient_id IN {_PATIENTS}",
    "qc": f"uid IN {_OBJECTS}",
    "duplicates": f"uid IN {_OBJECTS} OR kept_uid IN {_OBJECTS}",
    "runs": ("(site_id, batch_id) IN (SELECT DISTINCT site_id, batch_id FROM studies "
             "WHERE study_uid IN (SELECT study_uid FROM chosen))"),
}


class PredicateError(ValueError):
    """The --where text is not one boolean SQL expression over the selection columns."""


def _columns(con: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [d[0] for d in con.execute(f"SELECT * FROM {view} LIMIT 0").description]


def selection_sql(con: duckdb.DuckDBPyConnection) -> str:
    """``SELECT s.*, p.* EXCLUDE (...) FROM studies s LEFT JOIN patients p USING
    (patient_id)``: the patient's columns that studies lacks, whatever the catalog holds."""
    shared = [c for c in _columns(con, "patients") if c in set(_columns(con, "studies"))]
    return (f"SELECT s.*, p.* EXCLUDE ({', '.join(shared)}) "
            "FROM studies s LEFT JOIN patients p USING (patient_id)")


def selection_table(con: duckdb.DuckDBPyConnection) -> pa.Table:
    """The relation predicates are written against: one row per study, with its patient."""
    return con.execute(f"{selection_sql(con)} ORDER BY study_uid").to_arrow_table()


def parse_predicate(where: str) -> duckdb.Expression:
    """One SQL expression, or PredicateError: no statement separator, no empty text."""
    if not where.strip():
        raise PredicateError("the predicate is empty")
    if len(where) > MAX_PREDICATE:
        raise PredicateError(f"the predicate is longer than {MAX_PREDICATE} characters")
    if ";" in where:
        raise PredicateError("the predicate may not contain ';': give one SQL expression")
    try:
        return duckdb.SQLExpression(where)
    except duckdb.Error as err:
        raise PredicateError(f"not a SQL expression: {str(err).splitlines()[0]}") from None


def select_studies(selection: pa.Table, where: str) -> list[str]:
    """study_uid of every selection row the predicate keeps, sorted, once each (a study
    resent in a later batch has a row in each batch; choosing one row chooses the study)."""
    expression = parse_predicate(where)
    with duckdb.connect(":memory:") as con:
        con.register("selection_rows", selection)
        con.execute("CREATE TABLE selection AS SELECT * FROM selection_rows")
        con.unregister("selection_rows")
        for setting in ("SET python_enable_replacements = false",
                        "SET enable_external_access = false",
                        "SET lock_configuration = true"):
            con.execute(setting)
        try:
            kept = con.table("selection").filter(expression)
            probe = con.table("selection").project(expression).limit(0)
            if [str(t) for t in probe.types] != ["BOOLEAN"]:
                raise PredicateError(f"the predicate gives {probe.types[0]}, not BOOLEAN")
            rows = kept.project("study_uid").distinct().order("study_uid").fetchall()
        except duckdb.Error as err:
            raise PredicateError(f"the predicate failed: {str(err).splitlines()[0]}") from None
    return [uid for (uid,) in rows]


def filtered_tables(con: duckdb.DuckDBPyConnection, study_uids: list[str]) -> dict[str, pa.Table]:
    """Every catalog table of ``con``'s views cut down to the studies, rows in a fixed order."""
    unruled = sorted(set(TABLES) - set(FILTERS))
    if unruled:
        raise KeyError(f"no rule cutting {', '.join(unruled)} down to studies: add one to "
                       "tasks.cohort.FILTERS")
    chosen = pa.table({"study_uid": pa.array(study_uids, pa.string())})
    con.register("chosen", chosen)
    try:
        return {table: con.execute(f"SELECT * FROM {table} WHERE {FILTERS[table]} "
                                   "ORDER BY ALL").to_arrow_table()
                for table in TABLES}
    finally:
        con.unregister("chosen")
