"""PACS sources: find studies (C-FIND or QIDO-RS) and retrieve them whole (C-MOVE to radrepo's
storage SCP, or WADO-RS) into the private zone, checking each against the instance count the
PACS reported."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from schemas.config import DicomWebSourceConfig, DimseSourceConfig
from tasks.pacs.dicomweb import DicomWebClient
from tasks.pacs.dimse import DimseClient
from tasks.pacs.study import (
    MALFORMED_UID,
    PacsClient,
    PacsStudy,
    PacsUnavailable,
    RetrieveFailed,
    merged,
    query_plan,
    retrieve_study,
    unmatched_accessions,
    well_formed_uid,
    with_counts,
    with_retries,
)

__all__ = ["MALFORMED_UID", "PacsStudy", "PacsUnavailable", "RetrieveFailed", "merged",
           "open_client", "query_plan", "retrieve_study", "unmatched_accessions", "well_formed_uid",
           "with_counts", "with_retries"]


@contextmanager
def open_client(source: DimseSourceConfig | DicomWebSourceConfig,
                receive: bool = False) -> Iterator[PacsClient]:
    """A client for the source's PACS; with ``receive``, ready to retrieve (for DIMSE, with
    radrepo's storage SCP listening for the C-MOVE)."""
    if source.kind == "dimse":
        with DimseClient(source, receive) as client:
            yield client
    else:
        with DicomWebClient(source) as client:
            yield client
