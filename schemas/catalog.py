"""The release catalog: one pyarrow schema per table, with the data dictionary beside it.

Every table is stored as Parquet under ``catalog/<table>/site_id=<s>/batch_id=<b>/part-0.parquet``;
the partition columns live in the path, not in the files. Each table and column is declared
here once, with its description: writers use the schemas, ``catalog.duckdb`` carries the
descriptions as comments, and the release's ``catalog/README.md`` is generated from them.
The derived views (``VIEWS``) are SQL over the tables, described the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

PARTITION_COLUMNS: tuple[str, ...] = ("site_id", "batch_id")

PARTITION_DESCRIPTIONS: dict[str, str] = {
    "site_id": "The site's code in the consortium config (a code, never a hospital name); "
               "the first partition of every table.",
    "batch_id": "The batch the row was published in: the source's weekly folder name, the "
                "PACS query window or the S3 prefix; the second partition of every table.",
}


@dataclass(frozen=True)
class Table:
    """A catalog table: what one row is, and each column with its type and meaning."""

    description: str
    columns: tuple[tuple[str, pa.DataType, str], ...]

    @property
    def schema(self) -> pa.Schema:
        return pa.schema([(name, type_) for name, type_, _ in self.columns])

    @property
    def column_descriptions(self) -> dict[str, str]:
        return {name: text for name, _, text in self.columns}


_DAYS = ("days from the patient's index date (the COVID encounter) to the study date: "
         "study_date - index_date, negative before the index date, positive after; both dates "
         "carry the patient's one shift, so the interval is exact")

DOCS: dict[str, Table] = {
    "patients": Table(
        "One row per pseudonymous patient with at least one published file, written in the "
        "batch that first published one of the patient's files.",
        (
            ("patient_id", pa.string(), "Pseudonym: keyed HMAC of the site and the current "
             "source patient ID (after the ID remap); the same in DICOM PatientID and every "
             "table."),
            ("siteid", pa.string(), "RICORD's SITEID: a six-digit code derived from the "
             "site_id with the key, also written to DICOM ClinicalTrialSiteID; tells sites "
             "apart without naming them."),
            ("sex", pa.string(), "F, M or O from the clinical export; null without a clinical "
             "record or an empty cell."),
            ("age_at_index", pa.int32(), "Age in whole years at the index date; 90 for every "
             "age above 89; null without a clinical record."),
            ("covid_status", pa.string(), "positive, negative or unknown; why unknown is in "
             "covid_status_reason."),
            ("covid_status_reason", pa.string(), "Where covid_status comes from: result (the "
             "export's test result column, mapped), no_result (the result cell is empty, "
             "e.g. a serology or clinical diagnosis without an RT-PCR result), "
             "unrecognised_result (a value radrepo does not map), no_clinical_record (the "
             "patient has no row in the clinical export)."),
            ("test_method", pa.string(), "How COVID was tested, as the export says (e.g. "
             "PCR, serology, clinical); null without a clinical record or an empty cell."),
            ("index_date", pa.date32(), "The index date (COVID encounter), shifted by the "
             "patient's date offset like every date of the patient."),
            ("has_clinical", pa.bool_(), "Whether the patient has a clinical record; false "
             "means images without one (their studies carry qc rule no_clinical_record)."),
        ),
    ),
    "studies": Table(
        "One row per study and batch it arrived in (quarantined files excepted): published "
        "when at least one of its files in that batch is published, else excluded with the "
        "main reason; a copy re-sent in a later batch gives the study a row there too "
        "(study_overview has one row per study).",
        (
            ("study_uid", pa.string(), "Study Instance UID as published (2.25. UID derived "
             "with the key); a split exam's parts carry the first part's UID."),
            ("patient_id", pa.string(), "The patient's pseudonym (patients.patient_id)."),
            ("siteid", pa.string(), "RICORD's SITEID of the site (see patients.siteid)."),
            ("study_date", pa.date32(), "Study date, shifted by the patient's date offset."),
            ("study_time", pa.time64("us"), "Study time of day (not shifted); the earliest "
             "of the study's files."),
            ("days_from_index", pa.int32(), _DAYS.capitalize() + "; null without a clinical "
             "record."),
            ("modalities", pa.string(), "Comma-separated, sorted modalities of the study's "
             "published series; empty for an excluded study."),
            ("all_modalities", pa.string(), "Comma-separated, sorted modalities of every "
             "series that came in, excluded ones included."),
            ("description", pa.string(), "Study Description as kept by the de-identification "
             "profile."),
            ("n_series", pa.int32(), "Published series of the study."),
            ("n_instances", pa.int32(), "Published files of the study (rows in instances)."),
            ("n_excluded", pa.int32(), "Excluded files of the study (rows in "
             "excluded_instances); quarantined files are counted only in runs.counts."),
            ("status", pa.string(), "published or excluded."),
            ("reason", pa.string(), "For an excluded study, the most common reason of its "
             "files: qc:<rule>, outside_window:<modality> or duplicate:<kind>; null when "
             "published."),
        ),
    ),
    "series": Table(
        "One row per series and batch it arrived in: published when at least one of its "
        "files in that batch is.",
        (
            ("series_uid", pa.string(), "Series Instance UID as published."),
            ("study_uid", pa.string(), "The series' study (studies.study_uid)."),
            ("modality", pa.string(), "DICOM Modality of the series' first file."),
            ("body_part", pa.string(), "Body Part Examined."),
            ("view_position", pa.string(), "View Position (radiographs): PA, AP, LL, ..."),
            ("slice_thickness", pa.float64(), "Smallest Slice Thickness of the series, mm; "
             "null when no file has one."),
            ("description", pa.string(), "Series Description as kept by the profile."),
            ("image_type", pa.string(), "Image Type of the first file, values joined by \\."),
            ("n_instances", pa.int32(), "Published files of the series."),
            ("n_excluded", pa.int32(), "Excluded files of the series."),
            ("text_tokens_removed", pa.int32(), "Words the allow-list text cleaning removed "
             "from the series' kept free text (descriptions, protocol names), summed over its "
             "files; never which words."),
            ("status", pa.string(), "published or excluded."),
            ("reason", pa.string(), "For an excluded series, the most common reason of its "
             "files (as studies.reason); null when published."),
        ),
    ),
    "instances": Table(
        "One row per published DICOM file.",
        (
            ("sop_uid", pa.string(), "SOP Instance UID as published."),
            ("series_uid", pa.string(), "The file's series."),
            ("study_uid", pa.string(), "The file's study."),
            ("sop_class_uid", pa.string(), "SOP Class UID (what kind of object)."),
            ("instance_number", pa.int32(), "Instance Number."),
            ("path", pa.string(), "Path of the file from the release root: "
             "dicom/<site_id>/<patient_id>/<study_uid>/<series_uid>/<sop_uid>.dcm."),
            ("size_bytes", pa.int64(), "File size in bytes."),
            ("sha256", pa.string(), "SHA-256 of the published file."),
            ("pixel_sha256", pa.string(), "SHA-256 of the Pixel Data value (equal pixels, "
             "equal hash: what finds double stores)."),
            ("rows", pa.int32(), "Image rows."),
            ("columns", pa.int32(), "Image columns."),
            ("transfer_syntax", pa.string(), "Transfer Syntax UID of the published file."),
        ),
    ),
    "excluded_instances": Table(
        "One row per excluded file (QC, inclusion window or duplicate): not published, kept "
        "here so qc and duplicates rows about it join.",
        (
            ("sop_uid", pa.string(), "SOP Instance UID (pseudonymized like a published one)."),
            ("series_uid", pa.string(), "The file's series."),
            ("study_uid", pa.string(), "The file's study."),
            ("sop_class_uid", pa.string(), "SOP Class UID."),
            ("modality", pa.string(), "DICOM Modality."),
            ("instance_number", pa.int32(), "Instance Number."),
            ("size_bytes", pa.int64(), "Size of the de-identified file in bytes."),
            ("sha256", pa.string(), "SHA-256 of the de-identified file."),
            ("pixel_sha256", pa.string(), "SHA-256 of the Pixel Data value."),
            ("reason", pa.string(), "qc:<rule>, outside_window:<modality> or "
             "duplicate:<kind>: the first that applies, in that order."),
        ),
    ),
    "clinical": Table(
        "One row per clinical measurement of a published patient (long form).",
        (
            ("patient_id", pa.string(), "The patient's pseudonym."),
            ("name", pa.string(), "Measurement name from the config (e.g. wcc, crp, po2)."),
            ("value", pa.float64(), "Measured value."),
            ("unit", pa.string(), "Unit from the config (e.g. 10^9/L, mg/L, kPa)."),
            ("day", pa.int32(), "Days from the index date to the measurement: measured date - "
             "index date, negative before; null when the export has no measurement date "
             "(the config's clinical.measured_on)."),
        ),
    ),
    "qc": Table(
        "One row per QC rule outcome (schemas/qc_rules.yaml) or clinical-join outcome.",
        (
            ("level", pa.string(), "What uid names: instance (a SOP Instance UID, in "
             "instances or excluded_instances), series (series.series_uid) or study "
             "(studies.study_uid)."),
            ("uid", pa.string(), "The object the outcome is about, at its level."),
            ("study_uid", pa.string(), "The study of that object as published (a split "
             "exam's later part: the study it was merged into); joins studies.study_uid."),
            ("rule", pa.string(), "Rule id from schemas/qc_rules.yaml, or inclusion_window / "
             "no_clinical_record from the clinical join."),
            ("outcome", pa.string(), "excluded (the object's files are not published) or "
             "flagged (published, reported)."),
            ("detail", pa.string(), "What the rule found, for a reviewer; never an "
             "identifier."),
        ),
    ),
    "duplicates": Table(
        "One row per object dedupe excluded or merged, with its evidence.",
        (
            ("uid", pa.string(), "The copy: at level instance a SOP Instance UID (in "
             "excluded_instances), at level study the Study Instance UID of a split exam's "
             "later part (no longer a study of its own)."),
            ("level", pa.string(), "What uid and kept_uid name: instance (resent, "
             "uid_conflict, double_store) or study (split_merged)."),
            ("kind", pa.string(), "resent (same SOP Instance UID, same bytes), uid_conflict "
             "(same SOP Instance UID, different bytes), double_store (the same images "
             "stored again under new UIDs: same patient, date and time, identical pixels), "
             "split_merged (a later part of an exam split in two, merged into the first)."),
            ("kept_uid", pa.string(), "What was kept instead, at the same level: the "
             "published (or earlier) file's SOP Instance UID, or the study merged into."),
            ("evidence", pa.string(), "Why, in words: what matched and where the kept copy "
             "is."),
        ),
    ),
    "runs": Table(
        "One row per pipeline run of a batch: a log, so a rerun or backfill adds rows (see "
        "latest_runs for one per batch).",
        (
            ("run_id", pa.string(), "Prefect flow run id (or local-<time> without a server)."),
            ("flow", pa.string(), "Flow name (site_batch)."),
            ("code_version", pa.string(), "radrepo version that ran."),
            ("profile", pa.string(), "De-identification method description written to the "
             "files."),
            ("started", pa.timestamp("ms", tz="UTC"), "When the run started (UTC)."),
            ("finished", pa.timestamp("ms", tz="UTC"), "When the run finished (UTC)."),
            ("files_in", pa.int64(), "Objects that came in (the batch's source index)."),
            ("published", pa.int64(), "Files published."),
            ("excluded", pa.int64(), "Files excluded (QC, inclusion window, duplicate)."),
            ("quarantined", pa.int64(), "Objects quarantined (kept in the private zone)."),
            ("counts", pa.string(), "JSON: the counts above by reason, clinical rows read, "
             "skipped and without images, files skipped as already ingested."),
        ),
    ),
}

PATIENTS = DOCS["patients"].schema
STUDIES = DOCS["studies"].schema
SERIES = DOCS["series"].schema
INSTANCES = DOCS["instances"].schema
EXCLUDED_INSTANCES = DOCS["excluded_instances"].schema
CLINICAL = DOCS["clinical"].schema
QC = DOCS["qc"].schema
DUPLICATES = DOCS["duplicates"].schema
RUNS = DOCS["runs"].schema

MANIFEST = pa.schema(
    [
        ("path", pa.string()),
        ("size_bytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)

TABLES: dict[str, pa.Schema] = {name: doc.schema for name, doc in DOCS.items()}


@dataclass(frozen=True)
class View:
    """A derived view: its SQL over the table views, and each column's meaning."""

    description: str
    sql: str
    columns: dict[str, str]


CATALOG_INFO = ("catalog_info", "One row about this catalog.duckdb: views_sha256 is the "
                "SHA-256 of the view statements, so an unchanged catalog is not rewritten.",
                {"views_sha256": "SHA-256 of the CREATE VIEW and COMMENT statements."})

BATCHES_DOC = ("One row per COMPLETE batch: what every other view reads.",
               {"site_id": PARTITION_DESCRIPTIONS["site_id"],
                "batch_id": PARTITION_DESCRIPTIONS["batch_id"]})

VIEWS: dict[str, View] = {
    "latest_runs": View(
        "The latest run of each batch (by finished time): sum its counts, not those of runs, "
        "which holds every rerun and backfill.",
        "SELECT * FROM runs QUALIFY row_number() OVER (PARTITION BY site_id, batch_id "
        "ORDER BY finished DESC, run_id DESC) = 1",
        {"site_id": PARTITION_DESCRIPTIONS["site_id"],
         "batch_id": PARTITION_DESCRIPTIONS["batch_id"],
         **DOCS["runs"].column_descriptions},
    ),
    "study_overview": View(
        "One row per study: where it comes from, its patient's clinical context, the "
        "measurements nearest the study, QC outcomes, file counts and where its files are.",
        """
        WITH st AS (  -- one row per study: a study that arrived in several batches is one
            SELECT site_id, study_uid, list(batch_id ORDER BY batch_id) AS batch_ids,
                   arg_max(siteid, n_instances) AS siteid,
                   arg_max(patient_id, n_instances) AS patient_id,
                   arg_max(study_date, n_instances) AS study_date,
                   arg_max(study_time, n_instances) AS study_time,
                   arg_max(days_from_index, n_instances) AS days_from_index,
                   array_to_string(list_sort(list_distinct(flatten(
                       list(string_split(modalities, ',')) FILTER (WHERE modalities <> ''))
                   )), ',') AS modalities,
                   array_to_string(list_sort(list_distinct(flatten(
                       list(string_split(all_modalities, ',')))
                   )), ',') AS all_modalities,
                   arg_max(description, n_instances) AS description,
                   CASE WHEN sum(n_instances) > 0 THEN 'published' ELSE 'excluded' END AS status,
                   CASE WHEN sum(n_instances) = 0 THEN arg_max(reason, n_excluded) END AS reason,
                   sum(n_series) AS n_series, sum(n_instances) AS n_instances,
                   sum(n_excluded) AS n_excluded
            FROM studies GROUP BY site_id, study_uid
        ), qc_by_study AS (
            SELECT site_id, study_uid,
                   list(DISTINCT rule ORDER BY rule) FILTER (WHERE outcome = 'flagged')
                       AS qc_flags,
                   list(DISTINCT rule ORDER BY rule) FILTER (WHERE outcome = 'excluded')
                       AS qc_exclusions
            FROM qc GROUP BY ALL
        ), nearest AS (
            SELECT site_id, study_uid,
                   list({'name': name, 'value': value, 'unit': unit, 'day': day}
                        ORDER BY name) AS nearest_measurements
            FROM (SELECT st.site_id, st.study_uid, c.name, c.value, c.unit, c.day
                  FROM studies st JOIN clinical c USING (site_id, patient_id)
                  QUALIFY row_number() OVER (
                      PARTITION BY st.site_id, st.study_uid, c.name
                      ORDER BY abs(c.day - st.days_from_index) NULLS LAST, c.day, c.value) = 1)
            GROUP BY site_id, study_uid
        )
        SELECT st.site_id, st.batch_ids, st.siteid, st.study_uid, st.patient_id,
               st.study_date, st.study_time, st.days_from_index, st.modalities,
               st.all_modalities, st.description, st.status, st.reason,
               p.sex, p.age_at_index, p.covid_status, p.covid_status_reason, p.test_method,
               n.nearest_measurements,
               coalesce(q.qc_flags, []) AS qc_flags,
               coalesce(q.qc_exclusions, []) AS qc_exclusions,
               st.n_series, st.n_instances, st.n_excluded,
               CASE WHEN st.n_instances > 0 THEN 'dicom/' || st.site_id || '/' || st.patient_id
                    || '/' || st.study_uid || '/' END AS dicom_folder
        FROM st
        LEFT JOIN patients p ON p.site_id = st.site_id AND p.patient_id = st.patient_id
        LEFT JOIN qc_by_study q ON q.site_id = st.site_id AND q.study_uid = st.study_uid
        LEFT JOIN nearest n ON n.site_id = st.site_id AND n.study_uid = st.study_uid
        """,
        {
            "site_id": PARTITION_DESCRIPTIONS["site_id"],
            "batch_ids": "The batches the study's files arrived in (a copy re-sent later "
                         "adds its batch), sorted.",
            "siteid": DOCS["studies"].column_descriptions["siteid"],
            "study_uid": DOCS["studies"].column_descriptions["study_uid"],
            "patient_id": DOCS["studies"].column_descriptions["patient_id"],
            "study_date": DOCS["studies"].column_descriptions["study_date"],
            "study_time": DOCS["studies"].column_descriptions["study_time"],
            "days_from_index": DOCS["studies"].column_descriptions["days_from_index"],
            "modalities": DOCS["studies"].column_descriptions["modalities"],
            "all_modalities": DOCS["studies"].column_descriptions["all_modalities"],
            "description": DOCS["studies"].column_descriptions["description"],
            "status": "published when any file of the study is published (in any batch), "
                      "else excluded.",
            "reason": "For an excluded study, the reason of its batch row with the most "
                      "excluded files (as studies.reason); null when published.",
            "sex": DOCS["patients"].column_descriptions["sex"] + " Null also when no file of "
                   "the patient is published.",
            "age_at_index": DOCS["patients"].column_descriptions["age_at_index"],
            "covid_status": DOCS["patients"].column_descriptions["covid_status"] + " Null "
                            "when no file of the patient is published (no patients row).",
            "covid_status_reason": DOCS["patients"].column_descriptions["covid_status_reason"],
            "test_method": DOCS["patients"].column_descriptions["test_method"],
            "nearest_measurements": "Per measurement name, the patient's measurement whose "
                                    "day is nearest the study's days_from_index (ties: the "
                                    "earlier): a list of {name, value, unit, day}; null "
                                    "without measurements.",
            "qc_flags": "Rules that flagged the study, one of its series or files (sorted).",
            "qc_exclusions": "Rules that excluded the study, one of its series or files.",
            "n_series": DOCS["studies"].column_descriptions["n_series"] + " Summed over its "
                       "batches.",
            "n_instances": DOCS["studies"].column_descriptions["n_instances"] + " Summed over its "
                       "batches.",
            "n_excluded": DOCS["studies"].column_descriptions["n_excluded"] + " Summed over its "
                       "batches.",
            "dicom_folder": "Folder of the study's published files from the release root "
                            "(dicom/<site_id>/<patient_id>/<study_uid>/); null when none is "
                            "published.",
        },
    ),
    "site_summary": View(
        "RICORD's descriptive table, one row per site: published patients and studies, "
        "studies by modality, age, sex, COVID status and test method.",
        """
        WITH people AS (
            SELECT site_id, any_value(siteid) AS siteid, count(*) AS patients,
                   round(avg(age_at_index), 1) AS age_mean,
                   round(stddev_samp(age_at_index), 1) AS age_sd,
                   min(age_at_index) AS age_min,
                   quantile_cont(age_at_index, 0.5) AS age_median,
                   max(age_at_index) AS age_max,
                   count(*) FILTER (WHERE sex = 'F') AS female,
                   count(*) FILTER (WHERE sex = 'M') AS male,
                   count(*) FILTER (WHERE sex IS NULL OR sex NOT IN ('F', 'M'))
                       AS sex_other_or_unknown,
                   count(*) FILTER (WHERE covid_status = 'positive') AS covid_positive,
                   count(*) FILTER (WHERE covid_status = 'negative') AS covid_negative,
                   count(*) FILTER (WHERE covid_status = 'unknown') AS covid_unknown,
                   histogram(coalesce(test_method, 'missing')) AS patients_by_test_method
            FROM patients GROUP BY site_id
        ), study_counts AS (
            SELECT site_id, count(*) FILTER (WHERE files > 0) AS studies,
                   count(*) FILTER (WHERE files = 0) AS studies_excluded,
                   sum(files) AS files,
                   list_aggregate(flatten(list(modalities) FILTER (WHERE files > 0)),
                                  'histogram') AS studies_by_modality
            FROM (SELECT site_id, study_uid, sum(n_instances) AS files,
                         list_distinct(flatten(list(string_split(modalities, ','))
                                               FILTER (WHERE modalities <> ''))) AS modalities
                  FROM studies GROUP BY site_id, study_uid)
            GROUP BY site_id
        )
        SELECT site_id, siteid, patients, coalesce(studies, 0) AS studies,
               coalesce(studies_excluded, 0) AS studies_excluded, coalesce(files, 0) AS files,
               studies_by_modality, age_mean, age_sd, age_min, age_median, age_max,
               female, male, sex_other_or_unknown, covid_positive, covid_negative,
               covid_unknown, patients_by_test_method
        FROM people
        LEFT JOIN study_counts USING (site_id)
        ORDER BY site_id
        """,
        {
            "site_id": PARTITION_DESCRIPTIONS["site_id"],
            "siteid": DOCS["patients"].column_descriptions["siteid"],
            "patients": "Published patients (patients rows) of the site.",
            "studies": "Published studies (a study counts once, whatever its batches).",
            "studies_excluded": "Studies of which no file is published in any batch.",
            "files": "Published files (rows in instances).",
            "studies_by_modality": "Published studies per modality (a map); a study with two "
                                   "modalities counts under each.",
            "age_mean": "Mean age at index, years (ages above 89 count as 90).",
            "age_sd": "Sample standard deviation of the age at index, years.",
            "age_min": "Youngest age at index, years.",
            "age_median": "Median age at index, years.",
            "age_max": "Oldest age at index, years (90 means 90 or older).",
            "female": "Patients with sex F.",
            "male": "Patients with sex M.",
            "sex_other_or_unknown": "Patients with another or no recorded sex.",
            "covid_positive": "Patients with covid_status positive.",
            "covid_negative": "Patients with covid_status negative.",
            "covid_unknown": "Patients with covid_status unknown (see covid_status_reason).",
            "patients_by_test_method": "Patients per test method (a map; missing: none "
                                       "recorded).",
        },
    ),
    "dictionary": View(
        "This data dictionary: one row per view (column null) and per column, with its type "
        "and description, read from the comments of catalog.duckdb.",
        """
        SELECT "table", "column", type, description FROM (
            SELECT view_name AS "table", NULL AS "column", -1 AS position, NULL AS type,
                   comment AS description
            FROM duckdb_views() WHERE database_name = current_database() AND NOT internal
            UNION ALL
            SELECT table_name, NULL, -1, NULL, comment
            FROM duckdb_tables() WHERE database_name = current_database()
            UNION ALL
            SELECT table_name, column_name, column_index, data_type, comment
            FROM duckdb_columns() WHERE database_name = current_database() AND NOT internal)
        ORDER BY "table", position
        """,
        {"table": "The table or view.", "column": "The column; null on the row about the "
         "table itself.", "type": "DuckDB type of the column.",
         "description": "What the table, view or column holds."},
    ),
}

# Tables appended to after publication (labels come back from readers): their files sit in the
# labelled study's partition beside, not inside, the batch's manifest.
APPENDED_DOCS: dict[str, Table] = {
    "labels": Table(
        "One row per reader's answer to one item of the labelling form about one published "
        "study (radrepo labels import).",
        (
            ("study_uid", pa.string(), "The published study the label is about."),
            ("patient_id", pa.string(), "The study's published patient pseudonym."),
            ("item", pa.string(), "The questionnaire item (link id), e.g. appearance."),
            ("answer", pa.string(), "The answer code of a choice item, or the answer as text."),
            ("answer_kind", pa.string(), "The item's type: choice, text, string, integer, ..."),
            ("reader_id", pa.string(), "The reader, pseudonymized with the release's keyed "
             "hash."),
            ("role", pa.string(), "The reader's role, e.g. reader or adjudicator."),
            ("adjudicates", pa.bool_(), "True when the role's answer decides the consensus."),
            ("authored", pa.timestamp("ms", tz="UTC"), "When the reader answered (if given)."),
            ("source", pa.string(), "fhir or csv: the kind of file the label came in."),
            ("input_sha256", pa.string(), "SHA-256 of the file the label was imported from."),
            ("questionnaire", pa.string(), "Canonical url|version of the form answered."),
        ),
    ),
    "segmentations": Table(
        "One row per DICOM SEG object imported against a published series and published "
        "under its study.",
        (
            ("sop_uid", pa.string(), "The SEG object's SOP Instance UID."),
            ("series_uid", pa.string(), "The SEG object's own series."),
            ("study_uid", pa.string(), "The published study it belongs to."),
            ("patient_id", pa.string(), "The study's published patient pseudonym."),
            ("referenced_series_uid", pa.string(), "The published series it segments."),
            ("n_referenced_instances", pa.int32(), "Published images it references."),
            ("n_segments", pa.int32(), "Segments in the object."),
            ("segment_labels", pa.string(), "The segments' labels, joined by |."),
            ("path", pa.string(), "Where the SEG file is published, from the release root."),
            ("size_bytes", pa.int64(), "The published file's size in bytes."),
            ("sha256", pa.string(), "The published file's SHA-256."),
        ),
    ),
}
APPENDED_TABLES: dict[str, pa.Schema] = {name: doc.schema for name, doc in APPENDED_DOCS.items()}
LABELS = APPENDED_TABLES["labels"]
SEGMENTATIONS = APPENDED_TABLES["segmentations"]

_LABEL_KEYS = {"site_id": PARTITION_DESCRIPTIONS["site_id"],
               "batch_id": PARTITION_DESCRIPTIONS["batch_id"],
               "study_uid": "The published study.",
               "item": "The questionnaire item (link id)."}
VIEWS["label_votes"] = View(
    "Each reader's latest answer per study and choice item of the labelling form.",
    """
SELECT site_id, batch_id, study_uid, item, reader_id, role, adjudicates, answer, authored
FROM labels
WHERE answer_kind = 'choice'
QUALIFY row_number() OVER (
    PARTITION BY study_uid, item, reader_id, role
    ORDER BY authored DESC NULLS LAST, answer) = 1
    """,
    {**_LABEL_KEYS, **{c: APPENDED_DOCS["labels"].column_descriptions[c]
                       for c in ("reader_id", "role", "adjudicates", "answer", "authored")}},
)
VIEWS["label_consensus"] = View(
    "Per study and choice item: the readers' majority (more than half of them), or the "
    "latest adjudicator's answer, which decides whenever there is one; without either the "
    "study needs adjudication.",
    """
WITH votes AS (
    SELECT site_id, batch_id, study_uid, item, answer, count(*) AS n
    FROM label_votes WHERE NOT adjudicates GROUP BY ALL
), tally AS (
    SELECT site_id, batch_id, study_uid, item, CAST(sum(n) AS INTEGER) AS n_readers,
           CAST(max(n) AS INTEGER) AS top_votes, arg_max(answer, n) AS top_answer
    FROM votes GROUP BY ALL
), adjudicated AS (
    SELECT site_id, batch_id, study_uid, item, answer
    FROM label_votes WHERE adjudicates
    QUALIFY row_number() OVER (PARTITION BY study_uid, item
                               ORDER BY authored DESC NULLS LAST, answer) = 1
)
SELECT site_id, batch_id, study_uid, item,
       coalesce(t.n_readers, 0) AS n_readers,
       CASE WHEN t.top_votes * 2 > t.n_readers THEN t.top_answer END AS majority,
       a.answer AS adjudicated,
       CASE WHEN a.answer IS NOT NULL THEN a.answer
            WHEN t.top_votes * 2 > t.n_readers THEN t.top_answer END AS consensus,
       CASE WHEN a.answer IS NOT NULL THEN 'adjudicated'
            WHEN t.top_votes * 2 > t.n_readers THEN 'majority'
            ELSE 'needs_adjudication' END AS status
FROM tally t FULL JOIN adjudicated a USING (site_id, batch_id, study_uid, item)
    """,
    {**_LABEL_KEYS,
     "n_readers": "Readers (not adjudicators) who answered the item.",
     "majority": "The answer more than half of the readers gave; null without one.",
     "adjudicated": "The latest adjudicator's answer; null without one.",
     "consensus": "The adjudicated answer if any, else the majority; null when neither.",
     "status": "adjudicated, majority or needs_adjudication."},
)
