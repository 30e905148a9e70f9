"""The Dask cluster a run fans de-identification out on: an existing scheduler or a local one."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from distributed import Client, LocalCluster

from schemas.config import DaskConfig


@contextmanager
def dask_client(cfg: DaskConfig, scheduler: str | None = None) -> Iterator[Client]:
    """A client on ``scheduler`` (or the configured one); else a LocalCluster on 127.0.0.1."""
    address = scheduler or cfg.scheduler
    if address:
        with Client(address) as client:
            yield client
        return
    with LocalCluster(
        n_workers=cfg.workers,
        threads_per_worker=cfg.threads_per_worker,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.WARNING,
    ) as cluster, Client(cluster) as client:
        yield client
