"""DICOMweb: QIDO-RS study search and WADO-RS study retrieve (multipart/related, streamed to
files part by part, in the transfer syntax the PACS stored)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import httpx

from schemas.config import DicomWebSourceConfig
from tasks.pacs.study import PacsStudy, PacsUnavailable, RetrieveFailed

# httpx logs each request's URL at INFO: study UIDs and accession numbers would reach logs
for _name in ("httpx", "httpcore"):
    logging.getLogger(_name).setLevel(logging.WARNING)

STUDY_UID = "0020000D"
SOP_UID = "00080018"
STUDY_INSTANCES = "00201208"
PAGE = 500
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


def http_client(endpoint) -> httpx.Client:
    """An httpx client on a DICOMweb root (a source or a research PACS: url, username,
    password_env, timeout_seconds), with basic auth when a username is set."""
    auth = None
    if endpoint.username:
        password = os.environ.get(endpoint.password_env or "")
        if password is None:
            raise PacsUnavailable(f"the DICOMweb password variable {endpoint.password_env} "
                                  "is not set")
        auth = (endpoint.username, password)
    return httpx.Client(base_url=endpoint.url.rstrip("/"), auth=auth,
                        timeout=endpoint.timeout_seconds)


class DicomWebClient:
    def __init__(self, source: DicomWebSourceConfig):
        self.http = http_client(source)
        url = self.http.base_url
        self.location = f"{url.scheme}://{url.host}" + (f":{url.port}" if url.port else "")

    def __enter__(self) -> DicomWebClient:
        return self

    def __exit__(self, *exc) -> None:
        self.http.close()

    def find_studies(self, matches: list[dict[str, str]]) -> list[list[PacsStudy]]:
        """The studies answering each of ``matches`` (QIDO-RS study keys), in order."""
        answers = []
        for keys in matches:
            items = self._search_all("/studies", {**keys, "includefield": STUDY_INSTANCES},
                                     STUDY_UID)
            answers.append([study for item in items if (study := _study(item))])
        return answers

    def count_instances(self, study_uid: str) -> int | None:
        """The study's instances, listed by QIDO-RS, for a PACS that reports no count per
        study; None when an instance comes without its SOP Instance UID."""
        uids = [_value(item, SOP_UID)
                for item in self._search_all(f"/studies/{study_uid}/instances", {}, SOP_UID)]
        return None if None in uids else len(set(uids))

    def _search_all(self, path: str, params: dict, key: str) -> list[dict]:
        """Every item of a QIDO-RS search, one per value of ``key``. Pages are asked for until
        one is empty or brings no new ``key``, so a server that caps its pages below ours
        loses nothing and one that ignores ``offset`` cannot loop."""
        found: dict[str, dict] = {}
        while True:
            page = self._search(path, {**params, "limit": PAGE, "offset": len(found)})
            before = len(found)
            for item in page:
                found.setdefault(str(_value(item, key)), item)
            if len(found) == before:
                return list(found.values())

    def _search(self, path: str, params: dict) -> list[dict]:
        try:
            reply = self.http.get(path, params=params, headers={
                "Accept": "application/dicom+json"})
        except httpx.TransportError as err:
            raise PacsUnavailable(f"QIDO-RS at {self.location}: {type(err).__name__}") from None
        if reply.status_code == 204:
            return []
        if not reply.is_success:
            raise PacsUnavailable(f"QIDO-RS at {self.location} answered HTTP "
                                  f"{reply.status_code}")
        try:
            found = reply.json()
        except ValueError:
            found = None
        if not isinstance(found, list) or not all(isinstance(i, dict) for i in found):
            raise PacsUnavailable(f"QIDO-RS at {self.location}: the answer is not a DICOM JSON "
                                  "list (is the url the DICOMweb root?)")
        return found

    def retrieve(self, study_uid: str, folder: Path) -> None:
        """WADO-RS one study; each part of the multipart answer becomes one file."""
        counter = iter(range(1 << 30))

        def new_part() -> BinaryIO:
            return (folder / f"{next(counter):06d}.dcm").open("wb")

        try:
            with self.http.stream("GET", f"/studies/{study_uid}",
                                  headers={"Accept": ACCEPT_DICOM}) as reply:
                if not reply.is_success:
                    raise RetrieveFailed(f"WADO-RS answered HTTP {reply.status_code}")
                boundary = multipart_boundary(reply.headers.get("content-type", ""))
                write_parts(reply.iter_bytes(), boundary, new_part)
        except httpx.HTTPError as err:
            raise RetrieveFailed(f"WADO-RS: {type(err).__name__}") from None


def _value(item: dict, tag: str):
    """The first value of ``tag`` in a DICOM JSON item, or None."""
    return (item.get(tag, {}).get("Value") or [None])[0]


def _study(item: dict) -> PacsStudy | None:
    uid = _value(item, STUDY_UID)
    if not uid:
        return None
    count = _value(item, STUDY_INSTANCES)
    return PacsStudy(uid, int(count) if count is not None else None)


def multipart_boundary(content_type: str) -> bytes:
    """The boundary parameter of a multipart/related Content-Type."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/related":
        raise RetrieveFailed(f"WADO-RS answered {kind.strip() or 'no content type'}, "
                             "not multipart/related")
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode()
    raise RetrieveFailed("WADO-RS answer has no multipart boundary")


def write_parts(chunks: Iterable[bytes], boundary: bytes,
                new_part: Callable[[], BinaryIO]) -> int:
    """Stream a multipart body into one file per part (headers dropped); returns the number
    of parts. Raises RetrieveFailed if the body ends before its closing boundary."""
    delimiter = b"\r\n--" + boundary
    buffer = b"\r\n"  # the first delimiter has no CRLF of its own before it
    out: BinaryIO | None = None
    in_headers = False
    parts = 0
    try:
        for chunk in chunks:
            buffer += chunk
            while True:
                if in_headers:
                    end = buffer.find(b"\r\n\r\n")
                    if end < 0:
                        break
                    buffer = buffer[end + 4:]
                    in_headers = False
                    out = new_part()
                    parts += 1
                found = buffer.find(delimiter)
                if found < 0 or len(buffer) < found + len(delimiter) + 2:
                    if out is not None:
                        keep = found if found >= 0 else max(0, len(buffer) - len(delimiter) - 1)
                        out.write(buffer[:keep])
                        buffer = buffer[keep:]
                    break
                if out is not None:
                    out.write(buffer[:found])
                    out.close()
                    out = None
                buffer = buffer[found + len(delimiter):]
                if buffer.startswith(b"--"):
                    return parts
                in_headers = True
    finally:
        if out is not None:
            out.close()
    raise RetrieveFailed("WADO-RS answer ended before its closing boundary")
