"""A discovered batch taken through the one pass as ``site_batch`` takes it, without Prefect or a
cluster: what the tests of discovery, reading and the PACS and S3 sources look at."""

from __future__ import annotations

from flows.one_pass import BatchPass, batch_context, read_batch, work_units
from schemas.config import SiteConfig
from tasks.deidentify import DeidContext, PseudonymKeys
from tasks.ledger import BatchRef, write_batch_records

KEYS = PseudonymKeys(b"unit-test-secret-123456")


def take_batch(site: SiteConfig, batch: BatchRef, work_dir: str) -> BatchPass:
    """``batch`` read, de-identified and gated into ``work_dir`` (its records kept there)."""
    ctx = batch_context(work_dir, site.site_id, batch.batch_id,
                        DeidContext(KEYS, site.site_id, (), {}))
    done = read_batch(work_units(batch, site.source, work_dir), ctx)
    write_batch_records(work_dir, site.site_id, batch.batch_id, done.index, done.quarantine,
                        done.identifiers)
    return done
