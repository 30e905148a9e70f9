"""The pipeline's steps, and the shared modules a step may import.

A step is a module or package that a flow or the CLI calls to do one part of the work. A step
imports only shared modules, ``schemas``, and modules of its own package (``tasks.labels.*``
among themselves); never another step. A shared module imports only other shared modules.
``tests/test_module_layout.py`` holds every module under ``tasks/`` to this.
"""

SHARED_MODULES: frozenset[str] = frozenset({
    "tasks.zones",  # the release and the work folder, and every path inside them
    "tasks.catalog_query",  # the catalog's views and the connections that read them
    "tasks.catalog_dictionary",  # the catalog's descriptions, as COMMENTs and as README
    "tasks.cohort",  # the studies an analyst's predicate chooses, and the tables cut to them
    "tasks.frozen",  # a frozen release as its readers find it
    "tasks.audit",  # the audit trail of a frozen release
    "tasks.duckdb_remote",  # DuckDB reading Parquet in S3
    "tasks.dicom_time",  # DICOM TM values as times of day
    "tasks.failures",  # failures of a whole site
    "tasks.kill_point",  # where fault-injection tests kill the process
    "tasks.site_lock",  # one writer per site
    "tasks.ledger",  # the private zone's records of what came in
    "tasks.sources",  # a source's objects, and the one safe way to open an entry
    "tasks.pacs",  # the PACS clients (DIMSE, DICOMweb; pushing is a step of its own)
    "tasks.pacs.dicomweb",
    "tasks.pacs.dimse",
    "tasks.pacs.study",
    # definitions of the de-identification package every step judges by, with no step in
    # them: the profile, the pseudonym keys, and the one way text and identifiers are matched
    "tasks.deidentify.profile",
    "tasks.deidentify.keys",
    "tasks.deidentify.text",
})
