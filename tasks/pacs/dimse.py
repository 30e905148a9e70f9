"""DIMSE: C-FIND at study level, and C-MOVE to radrepo's own storage SCP (pynetdicom).

The SCP writes each received object as the PACS sent it (file meta added, nothing decoded),
named by a hash of its SOP Instance UID so a re-sent object replaces itself. It accepts
C-STOREs only from the configured PACS AE title and only while a C-MOVE is running.
"""

from __future__ import annotations

import hashlib
import logging
from io import BytesIO
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelMove,
)

from schemas.config import DimseSourceConfig
from tasks.pacs.study import PacsStudy, PacsUnavailable, RetrieveFailed

# pynetdicom's INFO and DEBUG lines quote UIDs and the query results: keep them out of logs
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

PENDING = (0xFF00, 0xFF01)
SUCCESS = 0x0000
NOT_AUTHORIZED = 0x0124  # PS3.7 C.5.22: Refused: Not Authorized
CANNOT_UNDERSTAND = 0xC000
OUT_OF_RESOURCES = 0xA700


class DimseClient:
    def __init__(self, source: DimseSourceConfig, receive: bool = False):
        self.source = source
        self.ae = AE(ae_title=source.calling_ae)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(self.ae, timeout, source.timeout_seconds)
        self.ae.maximum_pdu_size = 0  # no limit: the PACS sends big PDUs, far fewer of them
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        self.ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        self.receive = receive
        self._receiving: tuple[str, Path] | None = None  # (study UID, folder) of the C-MOVE
        self._server = None

    def __enter__(self) -> DimseClient:
        if self.receive:
            for context in AllStoragePresentationContexts:
                self.ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
            self.ae.require_calling_aet = [self.source.called_ae]
            try:
                self._server = self.ae.start_server(
                    (self.source.storage_host, self.source.storage_port), block=False,
                    evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
            except OSError as err:
                raise PacsUnavailable(
                    f"cannot listen for C-STORE on {self.source.storage_host}:"
                    f"{self.source.storage_port} ({err.strerror})") from None
        return self

    def __exit__(self, *exc) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _associate(self):
        where = f"{self.source.called_ae} at {self.source.host}:{self.source.port}"
        assoc = self.ae.associate(self.source.host, self.source.port,
                                  ae_title=self.source.called_ae)
        if not assoc.is_established:
            why = ("rejected by the PACS" if assoc.is_rejected
                   else "failed (refused, aborted or timed out)")
            raise PacsUnavailable(f"association with {where} {why}")
        return assoc

    def find_studies(self, matches: list[dict[str, str]]) -> list[list[PacsStudy]]:
        """The studies answering each of ``matches`` (study-level C-FIND keys), in order."""
        assoc = self._associate()
        try:
            answers = []
            for keys in matches:
                identifiers = _find(assoc, "STUDY", {"StudyInstanceUID": "",
                                                     "NumberOfStudyRelatedInstances": "", **keys})
                answers.append([study for i in identifiers if (study := _study(i))])
            return answers
        finally:
            assoc.release()

    def count_instances(self, study_uid: str) -> int | None:
        """The study's instances, counted series by series (series-level C-FIND, and image
        level for a series that reports no count), for a PACS that reports none per study;
        None when an answer lacks the UID or count it was asked for."""
        assoc = self._associate()
        try:
            total = 0
            for series in _find(assoc, "SERIES", {"StudyInstanceUID": study_uid,
                                                  "SeriesInstanceUID": "",
                                                  "NumberOfSeriesRelatedInstances": ""}):
                count = str(series.get("NumberOfSeriesRelatedInstances") or "").strip()
                series_uid = str(series.get("SeriesInstanceUID") or "").strip()
                if count.isdigit():
                    total += int(count)
                    continue
                if not series_uid:
                    return None
                images = [str(i.get("SOPInstanceUID") or "").strip() for i in _find(
                    assoc, "IMAGE", {"StudyInstanceUID": study_uid,
                                     "SeriesInstanceUID": series_uid, "SOPInstanceUID": ""})]
                if "" in images:
                    return None
                total += len(set(images))
            return total
        finally:
            assoc.release()

    def retrieve(self, study_uid: str, folder: Path) -> None:
        """C-MOVE one study to our storage SCP, whose handler writes it into ``folder``."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_uid
        self._receiving = (study_uid, folder)
        try:
            try:
                assoc = self._associate()
            except PacsUnavailable:
                # the reason is published in the run record: it names no host or AE title
                raise RetrieveFailed("association with the PACS failed") from None
            final = None
            try:
                for status, _ in assoc.send_c_move(query, self.source.calling_ae,
                                                   StudyRootQueryRetrieveInformationModelMove):
                    final = status.get("Status") if status else None
            finally:
                assoc.release()
        finally:
            self._receiving = None
        if final != SUCCESS:
            raise RetrieveFailed(_status_text("C-MOVE", final))

    def _on_store(self, event) -> int:
        """Keep an object of the study being moved; refuse anything else (a late store from
        an earlier, timed-out move must not stand in for a missing instance)."""
        receiving = self._receiving
        if receiving is None:
            return NOT_AUTHORIZED
        study_uid, folder = receiving
        data = event.encoded_dataset()
        try:
            header = dcmread(BytesIO(data), stop_before_pixels=True,
                             specific_tags=["StudyInstanceUID"])
        except Exception:  # noqa: BLE001 - whatever cannot be read is refused
            return CANNOT_UNDERSTAND
        if str(header.get("StudyInstanceUID", "")) != study_uid:
            return NOT_AUTHORIZED
        uid = str(event.request.AffectedSOPInstanceUID)
        target = folder / (hashlib.sha256(uid.encode()).hexdigest()[:32] + ".dcm")
        try:
            target.write_bytes(data)
        except OSError:
            return OUT_OF_RESOURCES
        return SUCCESS


def _find(assoc, level: str, keys: dict[str, str]) -> list[Dataset]:
    """The identifiers a Study Root C-FIND at ``level`` answers with."""
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    found = []
    for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
        code = status.get("Status") if status else None
        if code in PENDING and identifier is not None:
            found.append(identifier)
        elif code != SUCCESS:
            raise PacsUnavailable(_status_text("C-FIND", code))
    return found


def _study(identifier: Dataset) -> PacsStudy | None:
    uid = str(identifier.get("StudyInstanceUID") or "").strip()
    if not uid:
        return None
    count = identifier.get("NumberOfStudyRelatedInstances")
    return PacsStudy(uid, int(count) if count not in (None, "") else None)


def _status_text(operation: str, code: int | None) -> str:
    if code is None:
        return f"{operation} got no answer (connection lost or timed out)"
    return f"{operation} ended with status 0x{code:04X}"
