"""What both PACS protocols share: the query plan, retries with backoff, and retrieving a study
whole into a folder that a restarted ingest can resume from."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Protocol, TypeVar

from schemas.config import PacsSourceConfig, StudyQuery

T = TypeVar("T")
COMPLETE_MARKER = "complete.json"
UID_SYNTAX = re.compile(r"[0-9]+(?:\.[0-9]+)*")
MALFORMED_UID = "the PACS gave a malformed Study Instance UID; not retrieved"


def well_formed_uid(uid: str) -> bool:
    """Digits and dots, at most 64 characters (PS3.5 9.1): only such a UID from a PACS is put
    into a query, a URL or a path. Laxer than pydicom's ``UID.is_valid``, which refuses the
    leading zeros some PACS write into otherwise harmless UIDs."""
    return len(uid) <= 64 and UID_SYNTAX.fullmatch(uid) is not None


class PacsUnavailable(RuntimeError):
    """The PACS could not be asked (no association, connection refused, bad answer)."""


class RetrieveFailed(RuntimeError):
    """A study could not be retrieved whole; the message says why without naming the study."""


@dataclass(frozen=True, order=True)
class PacsStudy:
    study_uid: str
    instances: int | None  # as the PACS reported it (None: not reported)


class PacsClient(Protocol):
    def find_studies(self, matches: list[dict[str, str]]) -> list[list[PacsStudy]]: ...

    def count_instances(self, study_uid: str) -> int | None: ...

    def retrieve(self, study_uid: str, folder: Path) -> None: ...


def dicom_date_range(since: date | None, until: date | None) -> str:
    """A DICOM date range match (``20200301-20200331``, open at either end), or ''."""
    if since is None and until is None:
        return ""
    start = f"{since:%Y%m%d}" if since else ""
    end = f"{until:%Y%m%d}" if until else ""
    return f"{start}-{end}"


@dataclass(frozen=True)
class QueryPlan:
    """The study-level matches to send, and the line of the accession list each listed
    number is on (empty without a list)."""

    matches: list[dict[str, str]]
    accession_lines: dict[str, int]


def query_plan(query: StudyQuery,
               window: tuple[date | None, date | None] | None = None) -> QueryPlan:
    """One match per accession number and modality given, each within the date window
    (``window`` overrides the configured one, as a backfill does)."""
    since, until = window if window is not None else (query.since, query.until)
    dates = dicom_date_range(since, until)
    lines = read_accession_list(Path(query.accession_list)) if query.accession_list else {}
    accessions: list[str | None] = sorted(lines) or [None]
    modalities: list[str | None] = list(query.modalities) or [None]
    matches = []
    for accession in accessions:
        for modality in modalities:
            keys = {"StudyDate": dates, "AccessionNumber": accession,
                    "ModalitiesInStudy": modality}
            matches.append({k: v for k, v in keys.items() if v})
    return QueryPlan(matches, lines)


def read_accession_list(path: Path) -> dict[str, int]:
    """Accession numbers, one per line, each with the line it first appears on; blank lines
    and ``#`` comments are skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise PacsUnavailable(f"cannot read the accession list ({err.strerror})") from None
    numbers: dict[str, int] = {}
    for line_number, line in enumerate(lines, start=1):
        number = line.split("#", 1)[0].strip()
        if number:
            numbers.setdefault(number, line_number)
    return numbers


def merged(answers: list[list[PacsStudy]]) -> list[PacsStudy]:
    """The studies of all the answers to a query plan, once each, by UID."""
    return sorted({study.study_uid: study for answer in answers for study in answer}.values())


def unmatched_accessions(plan: QueryPlan, answers: list[list[PacsStudy]]) -> str | None:
    """A note naming, by line of the accession list, the numbers whose searches no study
    answered, or None; line numbers, never the numbers themselves, since those identify
    patients."""
    listed = plan.accession_lines
    answered = {keys.get("AccessionNumber")
                for keys, answer in zip(plan.matches, answers, strict=True) if answer}
    lines = sorted(line for number, line in listed.items() if number not in answered)
    if not lines:
        return None
    shown = ", ".join(map(str, lines[:20])) + (f" and {len(lines) - 20} more"
                                               if len(lines) > 20 else "")
    return (f"{len(lines)} of {len(listed)} accession numbers matched no study "
            f"(accession list lines {shown})")


def with_retries(action: Callable[[], T], source: PacsSourceConfig,
                 failure: type[RuntimeError], sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``action``; on ``failure``, try again up to ``source.retries`` times, waiting
    ``backoff_seconds`` and doubling the wait each time."""
    attempts = source.retries + 1
    for attempt in range(attempts):
        try:
            return action()
        except failure as err:
            last = err
        if attempt + 1 < attempts:
            sleep(source.backoff_seconds * 2 ** attempt)
    raise failure(f"{last} (after {attempts} attempts)")


def with_counts(client: PacsClient, studies: list[PacsStudy],
                source: PacsSourceConfig) -> list[PacsStudy]:
    """``studies``, each that came without an instance count counted series by series, so
    that a complete retrieve can still be told from a partial one. A study that cannot be
    counted (or counts to nothing, which a listed study cannot be) stays without a count:
    its retrieve is then refused and recorded, and the other studies go on."""
    def counted(study: PacsStudy) -> PacsStudy:
        if study.instances is not None or not well_formed_uid(study.study_uid):
            return study
        try:
            count = with_retries(lambda: client.count_instances(study.study_uid), source,
                                 PacsUnavailable)
        except PacsUnavailable:
            count = None
        return replace(study, instances=count or None)

    return [counted(study) for study in studies]


def retrieve_study(client: PacsClient, study: PacsStudy, folder: Path,
                   source: PacsSourceConfig) -> list[Path]:
    """The study's files, retrieved into ``folder`` and counted against what the PACS
    reported; a folder a previous run finished for the same count is reused as it is.
    Raises RetrieveFailed."""
    marker = folder / COMPLETE_MARKER
    if marker.exists():
        done = json.loads(marker.read_text())
        if done["instances"] == study.instances:
            return [folder / name for name in done["files"]]
    if study.instances is None:
        raise RetrieveFailed("the PACS reported no instance count for the study and it could "
                             "not be counted series by series, so a complete retrieve cannot "
                             "be told from a partial one")

    def attempt() -> list[Path]:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
        try:
            client.retrieve(study.study_uid, folder)
            failure = ""
        except RetrieveFailed as err:
            failure = f"; {err}"
        files = sorted(p for p in folder.iterdir() if p.suffix == ".dcm")
        if failure or len(files) != study.instances:
            raise RetrieveFailed(f"study incomplete: received {len(files)} of "
                                 f"{study.instances} instances{failure}")
        return files

    try:
        files = with_retries(attempt, source, RetrieveFailed)
    except RetrieveFailed:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    partial = marker.with_suffix(".tmp")
    partial.write_text(json.dumps({"instances": study.instances,
                                   "files": [p.name for p in files]}))
    os.replace(partial, marker)
    return files
