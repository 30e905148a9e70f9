"""Push the release's complete batches to a research PACS (STOW-RS or C-STORE), resumably.

A push ledger in the private zone records every instance the PACS confirmed, keyed by SOP
Instance UID and SHA-256, so a rerun sends only what has not arrived (nothing twice) and an
interrupted push resumes where it stopped. Afterwards each study's instance count is asked back
(QIDO-RS or C-FIND); a study the PACS holds fewer instances of is forgotten by the ledger, so the
next push sends it again.
"""

from __future__ import annotations

import io
import re
import secrets
import sqlite3
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pyarrow.parquet as pq
from pydicom import dcmread
from pynetdicom import AE

from schemas.config import DicomWebResearchPacs, DimseResearchPacs, ResearchPacsConfig
from tasks.pacs.dicomweb import DicomWebClient, http_client
from tasks.pacs.dimse import DimseClient
from tasks.pacs.study import PacsUnavailable
from tasks.zones import Release

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_UID = "00081155"
FAILURE_REASON = "00081197"
STORED = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and the C-STORE warnings (stored anyway)
MAX_CONTEXTS = 128
DIMSE_COMMIT_EVERY = 16


class PushError(RuntimeError):
    """The push cannot start or the release is inconsistent; the message names no file."""


@dataclass(frozen=True, order=True)
class PushItem:
    """One published instance to send, as its batch's manifest and catalog describe it."""

    path: str
    sop_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    sha256: str
    site_id: str
    batch_id: str


@dataclass
class PushResult:
    planned: int = 0
    already_sent: int = 0
    sent: int = 0
    failed: Counter = field(default_factory=Counter)  # reason -> instances the PACS refused
    studies_verified: int = 0
    # study uid -> (instances sent, instances the PACS holds)
    short_studies: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.short_studies


def push_plan(release: Release) -> list[PushItem]:
    """Every DICOM file of every complete batch, from its manifest, with its catalog UIDs."""
    items = []
    for site_id, batch_id in release.complete_batches():
        listed = {r["path"]: r["sha256"] for r in release.manifest(site_id, batch_id).to_pylist()
                  if r["path"].startswith("dicom/")}
        described = {}
        for relative in release.catalog_files("instances", site_id, batch_id):
            with release.fs.open(release.path(relative), "rb") as fh:
                for row in pq.read_table(fh, columns=["path", "sop_uid", "study_uid",
                                                      "sop_class_uid", "transfer_syntax",
                                                      "sha256"]).to_pylist():
                    described[row["path"]] = row
        missing = sorted(set(listed) - set(described))
        if missing:
            raise PushError(f"batch {site_id}/{batch_id}: {len(missing)} manifest file(s) have "
                            "no row in the instances catalog")
        for path, sha in sorted(listed.items()):
            row = described[path]
            if row["sha256"] != sha:
                raise PushError(f"batch {site_id}/{batch_id}: manifest and instances catalog "
                                "disagree on a file's SHA-256")
            items.append(PushItem(path, row["sop_uid"], row["study_uid"], row["sop_class_uid"],
                                  row["transfer_syntax"], sha, site_id, batch_id))
    return items


class PushLedger:
    """What reached one research PACS: (sop_uid, sha256) rows in a SQLite file."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.con = sqlite3.connect(path)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute("CREATE TABLE IF NOT EXISTS sent (sop_uid TEXT NOT NULL, "
                         "sha256 TEXT NOT NULL, study_uid TEXT NOT NULL, site_id TEXT NOT NULL, "
                         "batch_id TEXT NOT NULL, sent_at TEXT NOT NULL, "
                         "PRIMARY KEY (sop_uid, sha256))")
        self.con.commit()

    def close(self) -> None:
        self.con.close()

    def sent(self) -> set[tuple[str, str]]:
        return set(self.con.execute("SELECT sop_uid, sha256 FROM sent"))

    def record(self, items: list[PushItem]) -> None:
        """Record confirmed instances in one transaction."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        self.con.executemany("INSERT OR IGNORE INTO sent VALUES (?, ?, ?, ?, ?, ?)",
                             [(i.sop_uid, i.sha256, i.study_uid, i.site_id, i.batch_id, now)
                              for i in items])
        self.con.commit()

    def forget_study(self, study_uid: str) -> None:
        self.con.execute("DELETE FROM sent WHERE study_uid = ?", (study_uid,))
        self.con.commit()


def ledger_path(work_dir: str, name: str) -> Path:
    """The push ledger of one research PACS, in the private zone."""
    if not NAME_PATTERN.fullmatch(name):
        raise PushError("a research PACS name is letters, digits, '-' and '_' (at most 32)")
    return Path(work_dir) / "push" / name / "ledger.sqlite"


Sender = Callable[[list[PushItem]], tuple[list[PushItem], Counter]]


def push_release(release: Release, target: ResearchPacsConfig, ledger: PushLedger,
                 on_sent: Callable[[int], None] | None = None,
                 plan: list[PushItem] | None = None) -> PushResult:
    """Send what the ledger does not hold, record each confirmed instance, then verify counts.

    ``plan`` is every complete batch's files unless given (e.g. a frozen release's);
    ``on_sent`` is called with the number sent so far after each ledger commit."""
    plan = push_plan(release) if plan is None else plan
    done = ledger.sent()
    todo = [i for i in plan if (i.sop_uid, i.sha256) not in done]
    result = PushResult(planned=len(plan), already_sent=len(plan) - len(todo))
    with _sender(release, target) as send:
        for chunk in _chunks(todo, _chunk_size(target)):
            stored, failed = send(chunk)
            ledger.record(stored)
            result.sent += len(stored)
            result.failed.update(failed)
            if on_sent is not None:
                on_sent(result.sent)
    want = Counter(i.study_uid for i in plan)
    got = study_counts(target, sorted(want)) if want else {}
    for uid, n in sorted(want.items()):
        if got.get(uid) is None or got[uid] < n:
            result.short_studies[uid] = (n, got.get(uid))
            ledger.forget_study(uid)
    result.studies_verified = len(want) - len(result.short_studies)
    return result


def _chunk_size(target: ResearchPacsConfig) -> int:
    return target.files_per_request if target.kind == "dicomweb" else DIMSE_COMMIT_EVERY


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


@contextmanager
def _sender(release: Release, target: ResearchPacsConfig) -> Iterator[Sender]:
    if target.kind == "dicomweb":
        with _stow_client(target) as http:
            yield lambda chunk: stow(http, release, chunk)
    else:
        with _store_scu(target) as store:
            yield lambda chunk: store(release, chunk)


@contextmanager
def _stow_client(target: DicomWebResearchPacs) -> Iterator[httpx.Client]:
    with http_client(target) as http:
        yield http


def stow(http: httpx.Client, release: Release,
         chunk: list[PushItem]) -> tuple[list[PushItem], Counter]:
    """One STOW-RS request for ``chunk``; the items the PACS confirmed, and failures by reason."""
    boundary = secrets.token_hex(16)
    body = io.BytesIO()
    for item in chunk:
        data = release.read_bytes(item.path)
        if data is None:
            raise PushError(f"a file of batch {item.site_id}/{item.batch_id} is missing from "
                            "the release")
        body.write(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
        body.write(data)
        body.write(b"\r\n")
    body.write(f"--{boundary}--\r\n".encode())
    try:
        reply = http.post("/studies", content=body.getvalue(), headers={
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Accept": "application/dicom+json"})
    except httpx.TransportError as err:
        raise PacsUnavailable(f"STOW-RS: {type(err).__name__}") from None
    if reply.status_code not in (200, 202, 409):
        raise PacsUnavailable(f"STOW-RS answered HTTP {reply.status_code}")
    try:
        answer = reply.json() if reply.content else {}
    except ValueError:
        raise PacsUnavailable("STOW-RS answer is not DICOM JSON") from None
    confirmed = {ref.get(REFERENCED_SOP_UID, {}).get("Value", [None])[0]
                 for ref in answer.get(REFERENCED_SOP_SEQUENCE, {}).get("Value", [])}
    failed = Counter()
    for ref in answer.get(FAILED_SOP_SEQUENCE, {}).get("Value", []):
        reason = (ref.get(FAILURE_REASON, {}).get("Value") or [None])[0]
        failed[f"STOW-RS failure reason {reason:#06x}" if isinstance(reason, int)
               else "STOW-RS failure"] += 1
    stored = [i for i in chunk if i.sop_uid in confirmed]
    unanswered = len(chunk) - len(stored) - sum(failed.values())
    if unanswered > 0:
        failed["STOW-RS did not confirm the instance"] += unanswered
    return stored, failed


@contextmanager
def _store_scu(target: DimseResearchPacs) -> Iterator[Callable]:
    """A C-STORE function over associations opened as the contexts of each chunk need."""
    ae = AE(ae_title=target.calling_ae)
    for timeout in ("acse_timeout", "dimse_timeout", "network_timeout"):
        setattr(ae, timeout, target.timeout_seconds)
    state: dict = {"assoc": None, "contexts": set()}

    def close() -> None:
        if state["assoc"] is not None and state["assoc"].is_established:
            state["assoc"].release()
        state["assoc"], state["contexts"] = None, set()

    def associate(contexts: set[tuple[str, str]]):
        if state["assoc"] is not None and state["assoc"].is_established \
                and contexts <= state["contexts"]:
            return state["assoc"]
        close()
        wanted = sorted(contexts | state["contexts"])
        if len(wanted) > MAX_CONTEXTS:
            wanted = sorted(contexts)
        ae.requested_contexts = []
        for sop_class, syntax in wanted:
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(target.host, target.port, ae_title=target.called_ae)
        if not assoc.is_established:
            raise PacsUnavailable(f"association with {target.called_ae} at {target.host}:"
                                  f"{target.port} failed")
        state["assoc"], state["contexts"] = assoc, set(wanted)
        return assoc

    def store(release: Release, chunk: list[PushItem]) -> tuple[list[PushItem], Counter]:
        contexts = {(i.sop_class_uid, i.transfer_syntax) for i in chunk}
        stored, failed = [], Counter()
        for item in chunk:
            data = release.read_bytes(item.path)
            if data is None:
                raise PushError(f"a file of batch {item.site_id}/{item.batch_id} is missing "
                                "from the release")
            dataset = dcmread(io.BytesIO(data))
            code = None
            for _ in range(2):  # a lost association is opened again once for the same instance
                status = associate(contexts).send_c_store(dataset)
                code = status.get("Status") if status else None
                if code is not None:
                    break
                close()
            if code in STORED:
                stored.append(item)
            elif code is None:
                raise PacsUnavailable("C-STORE got no answer (connection lost or timed out)")
            else:
                failed[f"C-STORE status {code:#06x}"] += 1
        return stored, failed

    try:
        yield store
    finally:
        close()


def study_counts(target: ResearchPacsConfig, study_uids: list[str]) -> dict[str, int | None]:
    """How many instances of each study the PACS holds (QIDO-RS or C-FIND); 0 if none."""
    client = DicomWebClient(target) if target.kind == "dicomweb" else DimseClient(target)
    with client:
        answers = client.find_studies([{"StudyInstanceUID": uid} for uid in study_uids])
        counts: dict[str, int | None] = {}
        for uid, found in zip(study_uids, answers, strict=True):
            match = [s for s in found if s.study_uid == uid]
            if not match:
                counts[uid] = 0
            elif match[0].instances is not None:
                counts[uid] = match[0].instances
            else:
                counts[uid] = client.count_instances(uid)
        return counts
