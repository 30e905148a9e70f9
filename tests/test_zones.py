"""The private zone's layout as ``WorkDir`` names it is the one a published run leaves."""

from __future__ import annotations

import pyarrow.parquet as pq

from schemas.config import load_config
from schemas.pipeline import LEDGER
from tasks.zones import Release, WorkDir, all_identifier_files


def test_work_dir_names_what_a_published_run_left(published_config):
    cfg = load_config(published_config)
    release = Release(cfg.release, cfg.release_storage_options)
    lists, ledgers, quarantined = [], 0, 0
    for site in cfg.sites:
        zone = WorkDir(cfg.work_dir, site.site_id)
        batches = [b for s, b in release.complete_batches() if s == site.site_id]
        assert batches
        if zone.ledger.is_file():  # a zip batch is remembered by its batch id instead
            ledger = pq.read_table(zone.ledger, schema=LEDGER)
            assert set(ledger.column("batch_id").to_pylist()) == set(batches)
            ledgers += 1
        for batch_id in batches:
            assert zone.index(batch_id).is_file()
            assert not zone.pending(batch_id).exists()  # settled after COMPLETE
            assert not zone.staging(batch_id).exists()
            assert not zone.republish(batch_id).exists()
            quarantined += zone.quarantine_list(batch_id).is_file()  # the corpus's bad files
        assert zone.identifier_files() == sorted(zone.identifiers(b) for b in batches)
        assert zone.republishing() == set()
        lists += zone.identifier_files()
    assert ledgers and quarantined
    assert all_identifier_files(cfg.work_dir) == sorted(lists)
