"""Labels back in: completed QuestionnaireResponses (JSON files or Bundles) and CSV exports
(study, reader, label, value), checked against the label schema and the published catalog, and
appended to the release's ``labels`` table.

A response or CSV line that fails a check is rejected whole, named by file and index or line;
nothing else is lost. A label keyed by anything but a published study (an MRN, an original UID)
is refused, and no message quotes the value: it may be an identifier.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.questionnaireresponse import QuestionnaireResponse
from pydantic import ValidationError

from schemas.catalog import LABELS
from schemas.label_schema import LabelSchema
from tasks.deidentify.keys import PseudonymKeys
from tasks.deidentify.text import IdentifierMatcher
from tasks.labels.form import STUDY_SYSTEM
from tasks.zones import Release, table_bytes

PSEUDONYM = re.compile(r"P[0-9A-F]{16}")
PUBLISHED_UID = re.compile(r"2\.25\.[1-9][0-9]{0,38}")
CSV_COLUMNS = ("study", "reader", "label", "value")
DONE_STATUSES = ("completed", "amended")
FHIR_STATUSES = ("in-progress", "completed", "amended", "entered-in-error", "stopped")
ITEM_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


class LabelRejected(ValueError):
    """One response or CSV line that cannot be imported; the message quotes no value."""


@dataclass(frozen=True)
class Rejection:
    where: str  # file name and resource index or line number
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.why}"


@dataclass
class ImportResult:
    labels: int = 0
    already_imported: int = 0
    segmentations: int = 0
    rejected: list[Rejection] = field(default_factory=list)


@dataclass(frozen=True)
class PublishedStudy:
    site_id: str
    batch_id: str
    patient_id: str


def published_studies(con: duckdb.DuckDBPyConnection) -> dict[str, PublishedStudy]:
    """Study UID -> where the published study lives, from the catalog views."""
    rows = con.execute("SELECT study_uid, site_id, batch_id, patient_id FROM studies "
                       "WHERE status = 'published'").fetchall()
    return {uid: PublishedStudy(site, batch, patient) for uid, site, batch, patient in rows}


class LabelChecker:
    """The checks every label passes: schema vocabulary, published keys, no identifiers."""

    def __init__(self, schema: LabelSchema, studies: dict[str, PublishedStudy],
                 keys: PseudonymKeys, identifiers: IdentifierMatcher | None = None):
        self.schema = schema
        self.studies = studies
        self.keys = keys
        self.identifiers = identifiers

    def shown(self, name: str) -> str:
        """A name from the input, quoted only when it looks like an item name and is no
        identifier seen at a source."""
        if ITEM_NAME.fullmatch(name) and not (self.identifiers and
                                              self.identifiers.in_text(name)):
            return f"'{name}'"
        return "an item (name not shown)"

    def study(self, value: str | None, what: str = "subject") -> tuple[str, PublishedStudy]:
        uid = (value or "").strip().removeprefix("urn:oid:")
        if not uid:
            raise LabelRejected(f"no {what}: labels are keyed by a published study UID")
        if uid in self.studies:
            return uid, self.studies[uid]
        if self.identifiers is not None and self.identifiers.in_text(uid):
            raise LabelRejected(f"{what} is an original identifier seen at a source, not a "
                                "published study UID (value not shown)")
        if not PUBLISHED_UID.fullmatch(uid):
            raise LabelRejected(f"{what} is not a published study UID (not a 2.25 UID; an "
                                "original identifier such as an MRN or accession? value not "
                                "shown)")
        raise LabelRejected(f"{what}: unknown study, no published study has this UID")

    def patient(self, value: str, study: PublishedStudy) -> None:
        if value == study.patient_id:
            return
        if not PSEUDONYM.fullmatch(value):
            raise LabelRejected("patient_id is not a published patient pseudonym (an original "
                                "identifier? value not shown)")
        raise LabelRejected("patient_id is not the published patient of the study")

    def reader(self, value: str | None) -> str:
        reader = (value or "").strip()
        if not reader:
            raise LabelRejected(f"no answer to '{self.schema.reader_item}' (the reader id)")
        return "R" + self.keys.opaque("reader", reader.lower()).upper()

    def role(self, value: str | None) -> str:
        role = (value or self.schema.roles[0]).strip()
        if role not in self.schema.roles:
            raise LabelRejected(f"role is not one of {', '.join(self.schema.roles)}")
        return role

    def answer(self, link_id: str, code: str | None, system: str | None,
               text: str | None) -> tuple[str, str]:
        """(answer, kind) for one item; a choice must be a code of the schema's vocabulary."""
        item = self.schema.item(link_id)
        if item is None:
            raise LabelRejected(f"{self.shown(link_id)} is not an item of the questionnaire")
        if item.type == "choice":
            codes = [a.code for a in item.answers]
            if code not in codes or system not in (None, self.schema.answer_system):
                raise LabelRejected(f"answer to '{link_id}' is not one of {', '.join(codes)}")
            return code, "choice"
        if text is None or text == "":
            raise LabelRejected(f"answer to '{link_id}' is empty")
        if self.identifiers is not None and self.identifiers.in_text(text):
            raise LabelRejected(f"answer to '{link_id}' carries an identifier seen at a source "
                                "(value not shown)")
        return text, item.type

    def rows(self, study_value: str | None, patient: str | None, reader: str | None,
             role: str | None, answers: list[tuple[str, str | None, str | None, str | None]],
             authored: datetime | None, source: str, input_sha256: str,
             questionnaire: str, whole_form: bool = True) -> list[dict]:
        """Label rows for one reader's answers on one study, or LabelRejected; a whole form
        (not a CSV line, which holds one answer) must answer every required item."""
        uid, study = self.study(study_value)
        if patient is not None:
            self.patient(patient, study)
        reader_id, role = self.reader(reader), self.role(role)
        out = []
        for link_id, code, system, text in answers:
            answer, kind = self.answer(link_id, code, system, text)
            out.append({"site_id": study.site_id, "batch_id": study.batch_id,
                        "study_uid": uid, "patient_id": study.patient_id, "item": link_id,
                        "answer": answer, "answer_kind": kind, "reader_id": reader_id,
                        "role": role, "adjudicates": role == self.schema.adjudicator_role,
                        "authored": authored, "source": source,
                        "input_sha256": input_sha256, "questionnaire": questionnaire})
        if not out:
            raise LabelRejected("no answers")
        required = {i.link_id for i in self.schema.items if i.required and whole_form}
        missing = sorted(required - {r["item"] for r in out})
        if missing:
            raise LabelRejected(f"no answer to required item(s) {', '.join(missing)}")
        return out


def _value_text(answer) -> str | None:
    for key in ("valueString", "valueInteger", "valueDecimal", "valueBoolean", "valueDate",
                "valueDateTime"):
        value = getattr(answer, key, None)
        if value is not None:
            return str(value).lower() if isinstance(value, bool) else str(value)
    return None


def _response_rows(checker: LabelChecker, response: QuestionnaireResponse,
                   input_sha256: str) -> list[dict]:
    schema = checker.schema
    canonical = (response.questionnaire or "").split("|")
    if canonical[0] != schema.url or (len(canonical) > 1 and canonical[1] != schema.version):
        raise LabelRejected(f"answers another questionnaire, not {schema.url}|{schema.version}")
    if response.status not in DONE_STATUSES:
        raise LabelRejected(f"status is {response.status!r}, not completed"
                            if response.status in FHIR_STATUSES else "status is not completed")
    subject = None
    if response.subject is not None and response.subject.identifier is None:
        raise LabelRejected(f"subject is not an identifier of system {STUDY_SYSTEM}")
    if response.subject is not None:
        ident = response.subject.identifier
        if ident.system not in (None, STUDY_SYSTEM):
            raise LabelRejected(f"subject identifier system is not {STUDY_SYSTEM}")
        subject = ident.value
    values: dict[str, str | None] = {}
    answers = []
    prefilled = {"patient_id", "study_uid", *schema.prefill.study, *schema.prefill.patient,
                 *(f"clinical_{n}" for n in schema.prefill.clinical)}
    for item in response.item or []:
        given = list(item.answer or [])
        if len(given) > 1:
            raise LabelRejected(f"{checker.shown(item.linkId)} has more than one answer")
        if item.linkId in (schema.reader_item, schema.role_item, "patient_id", "study_uid"):
            if given:
                coding = given[0].valueCoding
                values[item.linkId] = coding.code if coding is not None else _value_text(
                    given[0])
            continue
        if item.linkId in prefilled or not given:
            continue
        coding = given[0].valueCoding
        answers.append((item.linkId, coding.code if coding else None,
                        coding.system if coding else None, _value_text(given[0])))
    if subject is None:
        subject = values.get("study_uid")
    elif values.get("study_uid") not in (None, subject.removeprefix("urn:oid:")):
        raise LabelRejected("subject and the study_uid item name different studies")
    authored = None
    if response.authored is not None:
        authored = response.authored if isinstance(response.authored, datetime) else \
            datetime.fromisoformat(str(response.authored))
        authored = authored.astimezone(UTC) if authored.tzinfo else authored.replace(tzinfo=UTC)
    return checker.rows(subject, values.get("patient_id"), values.get(schema.reader_item),
                        values.get(schema.role_item), answers, authored, "fhir", input_sha256,
                        f"{schema.url}|{schema.version}")


def _fhir_resources(data: bytes) -> list[tuple[int, dict | None]]:
    """(index, resource) pairs of a JSON file: one resource, or a Bundle's entries."""
    parsed = json.loads(data)
    if isinstance(parsed, dict) and parsed.get("resourceType") == "Bundle":
        Bundle.model_validate(parsed)
        return [(i, entry.get("resource")) for i, entry in enumerate(parsed.get("entry") or [])]
    return [(0, parsed)]


def read_fhir(checker: LabelChecker, name: str, data: bytes, result: ImportResult) -> list[dict]:
    """Label rows of a JSON file of QuestionnaireResponses; rejections go into ``result``."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        resources = _fhir_resources(data)
    except (ValueError, ValidationError):
        result.rejected.append(Rejection(name, "not a FHIR JSON resource or Bundle"))
        return []
    rows = []
    for index, resource in resources:
        where = f"{name} resource {index}"
        try:
            if not isinstance(resource, dict) or \
                    resource.get("resourceType") != "QuestionnaireResponse":
                raise LabelRejected("not a QuestionnaireResponse")
            try:
                response = QuestionnaireResponse.model_validate(resource)
            except ValidationError as err:
                first = err.errors()[0]
                raise LabelRejected("not a valid FHIR R4 QuestionnaireResponse ("
                                    + ".".join(str(p) for p in first["loc"]) + ")") from None
            rows += _response_rows(checker, response, sha)
        except LabelRejected as err:
            result.rejected.append(Rejection(where, str(err)))
    return rows


def read_csv(checker: LabelChecker, name: str, data: bytes, result: ImportResult) -> list[dict]:
    """Label rows of a CSV export: study, reader, label, value, optional role and authored."""
    sha = hashlib.sha256(data).hexdigest()
    try:
        reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
        header = [c.strip() for c in reader.fieldnames or []]
    except UnicodeDecodeError:
        result.rejected.append(Rejection(name, "not UTF-8 text"))
        return []
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        result.rejected.append(Rejection(name, f"no column(s) {', '.join(missing)}"))
        return []
    rows = []
    for line, raw in enumerate(reader, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()
               if isinstance(v, str)}
        try:
            authored = None
            if row.get("authored"):
                try:
                    authored = datetime.fromisoformat(row["authored"])
                except ValueError:
                    raise LabelRejected("authored is not an ISO date-time") from None
                authored = (authored.astimezone(UTC) if authored.tzinfo
                            else authored.replace(tzinfo=UTC))
            rows += checker.rows(row.get("study"), row.get("patient_id") or None,
                                 row.get("reader"), row.get("role") or None,
                                 [(row.get("label", ""), row.get("value"), None,
                                   row.get("value"))],
                                 authored, "csv", sha,
                                 f"{checker.schema.url}|{checker.schema.version}",
                                 whole_form=False)
        except LabelRejected as err:
            result.rejected.append(Rejection(f"{name} line {line}", str(err)))
    return rows


LABEL_KEY = ("study_uid", "item", "reader_id", "role", "answer", "authored")


def existing_keys(release: Release) -> set[tuple]:
    """The keys of every label already in the release."""
    keys = set()
    for site, batch in release.complete_batches():
        for relative in release.catalog_files("labels", site, batch):
            with release.fs.open(release.path(relative), "rb") as fh:
                for r in pq.read_table(fh, columns=list(LABEL_KEY)).to_pylist():
                    keys.add(tuple(r[k] for k in LABEL_KEY))
    return keys


def append_labels(release: Release, rows: list[dict], result: ImportResult) -> None:
    """Write the new rows, one Parquet file per study partition, named by their content."""
    seen = existing_keys(release)
    fresh: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        key = tuple(row[k] for k in LABEL_KEY)
        if key in seen:
            result.already_imported += 1
            continue
        seen.add(key)
        fresh.setdefault((row["site_id"], row["batch_id"]), []).append(row)
    for (site, batch), part in sorted(fresh.items()):
        part.sort(key=lambda r: tuple(str(r[k]) for k in LABEL_KEY))
        table = pa.Table.from_pylist([{f.name: r[f.name] for f in LABELS} for r in part],
                                     schema=LABELS)
        data = table_bytes(table)
        name = f"labels-{hashlib.sha256(data).hexdigest()[:16]}.parquet"
        release.write_bytes(f"{release.partition('labels', site, batch)}/{name}", data)
        result.labels += table.num_rows


def input_files(paths: list[Path]) -> list[Path]:
    """The files named, and the files under the folders named, sorted."""
    out = []
    for path in paths:
        out += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return out
