"""Retrieval: a PACS batch's studies, each retrieved whole into the site's private zone, as work
units for the one pass. A study that cannot be retrieved whole (or whose UID is malformed, so
it is never asked for) is one refused object with its reason.

Studies an earlier, interrupted run received whole are taken from the private zone without
asking the PACS again; they stay there until a published batch holds them.
"""

from __future__ import annotations

from schemas.config import DicomWebSourceConfig, DimseSourceConfig
from tasks import pacs
from tasks.ledger import BatchRef
from tasks.sources import UnitObject, WorkUnit
from tasks.zones import WorkDir


def retrieve_batch(batch: BatchRef, source: DimseSourceConfig | DicomWebSourceConfig,
                   work: WorkDir) -> list[WorkUnit]:
    """One unit per study retrieved whole (its files keyed by study and SOP Instance UID),
    and one unit of the studies refused, each with its reason."""
    units: list[WorkUnit] = []
    refused: list[UnitObject] = []
    with pacs.open_client(source, receive=True) as client:
        for obj in batch.objects:
            if not pacs.well_formed_uid(obj.key):
                refused.append(UnitObject(obj.key, problem=pacs.MALFORMED_UID))
                continue
            study = pacs.PacsStudy(obj.key, obj.size if obj.size >= 0 else None)
            folder = work.received_study(obj.key)
            try:
                files = pacs.retrieve_study(client, study, folder, source)
            except pacs.RetrieveFailed as err:
                refused.append(UnitObject(obj.key, problem=str(err)))
                continue
            units.append(WorkUnit(str(folder), tuple(UnitObject(p.name, p.stat().st_size)
                                                     for p in files), keyed_by_sop=obj.key))
    if refused:
        units.append(WorkUnit(str(work.root), tuple(refused)))
    return units
