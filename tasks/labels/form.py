"""The labelling form as FHIR R4: a Questionnaire built from the label schema, and one
pre-filled QuestionnaireResponse per published study (de-identified ids and clinical values
from the catalog), for a form shown beside the research PACS viewer.

fhir.resources carries R4 as its ``R4B`` package (4.3.0; Questionnaire and
QuestionnaireResponse are unchanged from R4 4.0.1).
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
from fhir.resources.R4B.questionnaire import Questionnaire
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse

from schemas.label_schema import LabelSchema

STUDY_SYSTEM = "urn:dicom:uid"  # FHIR's system for DICOM UIDs; values are urn:oid:<uid>
PATIENT_SYSTEM = "urn:radrepo:patient"
READER_SYSTEM = "urn:radrepo:reader"
PREFILL_TYPES = {"VARCHAR": "string", "INTEGER": "integer", "BIGINT": "integer",
                 "DOUBLE": "decimal", "BOOLEAN": "boolean"}
ANSWER_KEYS = {"string": "valueString", "text": "valueString", "integer": "valueInteger",
               "decimal": "valueDecimal", "boolean": "valueBoolean"}


def study_reference(study_uid: str) -> dict:
    """A FHIR Reference to the published ImagingStudy by its DICOM Study Instance UID."""
    return {"type": "ImagingStudy",
            "identifier": {"system": STUDY_SYSTEM, "value": f"urn:oid:{study_uid}"}}


def prefill_items(schema: LabelSchema) -> list[tuple[str, str, str]]:
    """(link id, text, FHIR type) of each read-only item filled from the catalog."""
    out = [("patient_id", "Patient (de-identified)", "string"),
           ("study_uid", "Study Instance UID (de-identified)", "string")]
    numeric = {"days_from_index", "age_at_index"}
    for column in (*schema.prefill.study, *schema.prefill.patient):
        out.append((column, column.replace("_", " "),
                    "integer" if column in numeric else "string"))
    for name in schema.prefill.clinical:
        out.append((f"clinical_{name}", f"{name} (nearest the index date)", "decimal"))
    return out


def questionnaire(schema: LabelSchema) -> Questionnaire:
    """The schema's Questionnaire: read-only catalog items, then the reader's questions."""
    items = [{"linkId": link, "text": text, "type": kind, "readOnly": True}
             for link, text, kind in prefill_items(schema)]
    items.append({"linkId": schema.reader_item, "text": "Reader id", "type": "string",
                  "required": True})
    items.append({"linkId": schema.role_item, "text": "Reader role", "type": "choice",
                  "required": True, "answerOption": [
                      {"valueCoding": {"system": f"{schema.answer_system}:role", "code": role,
                                       "display": role}} for role in schema.roles]})
    for item in schema.items:
        entry = {"linkId": item.link_id, "text": item.text, "type": item.type,
                 "required": item.required}
        if item.answers:
            entry["answerOption"] = [
                {"valueCoding": {"system": schema.answer_system, "code": a.code,
                                 "display": a.display}} for a in item.answers]
        items.append(entry)
    return Questionnaire.model_validate({
        "resourceType": "Questionnaire", "id": schema.id, "url": schema.url,
        "version": schema.version, "title": schema.title, "status": "active",
        "subjectType": ["ImagingStudy"], "item": items})


def _study_rows(con: duckdb.DuckDBPyConnection, schema: LabelSchema) -> list[dict]:
    study_cols = "".join(f", s.{c}" for c in schema.prefill.study)
    patient_cols = "".join(f", p.{c}" for c in schema.prefill.patient)
    sql = (f"SELECT s.site_id, s.study_uid, s.patient_id{study_cols}{patient_cols} "
           "FROM studies s LEFT JOIN patients p USING (site_id, patient_id) "
           "WHERE s.status = 'published' ORDER BY s.site_id, s.study_uid")
    result = con.execute(sql)
    names = [d[0] for d in result.description]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


def _nearest_clinical(con: duckdb.DuckDBPyConnection, names: tuple[str, ...]) -> dict:
    """(site, patient, name) -> the value measured nearest the index date."""
    if not names:
        return {}
    rows = con.execute(
        "SELECT site_id, patient_id, name, value FROM clinical WHERE name IN "
        f"({', '.join('?' for _ in names)}) AND value IS NOT NULL "
        "QUALIFY row_number() OVER (PARTITION BY site_id, patient_id, name "
        "ORDER BY abs(coalesce(day, 0)), day) = 1", list(names)).fetchall()
    return {(s, p, n): v for s, p, n, v in rows}


def prefilled_responses(con: duckdb.DuckDBPyConnection,
                        schema: LabelSchema) -> list[QuestionnaireResponse]:
    """One in-progress QuestionnaireResponse per published study, catalog items filled in."""
    clinical = _nearest_clinical(con, schema.prefill.clinical)
    out = []
    for row in _study_rows(con, schema):
        values = {k: v for k, v in row.items() if k != "site_id"}
        for name in schema.prefill.clinical:
            values[f"clinical_{name}"] = clinical.get((row["site_id"], row["patient_id"], name))
        items = []
        for link, text, kind in prefill_items(schema):
            value = values.get(link)
            item = {"linkId": link, "text": text}
            if value is not None:
                item["answer"] = [{ANSWER_KEYS[kind]: value}]
            items.append(item)
        out.append(QuestionnaireResponse.model_validate({
            "resourceType": "QuestionnaireResponse",
            "id": f"{schema.id}-{row['study_uid'].replace('2.25.', '')}"[:64],
            "questionnaire": f"{schema.url}|{schema.version}",
            "status": "in-progress",
            "subject": study_reference(row["study_uid"]),
            "item": items}))
    return out


def write_form(con: duckdb.DuckDBPyConnection, schema: LabelSchema, out: Path) -> int:
    """Write questionnaire.json and responses/<study>.json under ``out``; the responses count."""
    (out / "responses").mkdir(parents=True, exist_ok=True)
    (out / "questionnaire.json").write_text(_pretty(questionnaire(schema)))
    responses = prefilled_responses(con, schema)
    for response in responses:
        uid = response.subject.identifier.value.removeprefix("urn:oid:")
        (out / "responses" / f"{uid}.json").write_text(_pretty(response))
    return len(responses)


def _pretty(resource) -> str:
    return json.dumps(json.loads(resource.model_dump_json(exclude_none=True)), indent=1) + "\n"
