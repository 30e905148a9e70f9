"""The local Dask cluster a run starts when no scheduler is configured listens on loopback."""

from __future__ import annotations

import os

from flows.cluster import local_cluster
from infra.orthanc import LOOPBACK, listening_addresses


def test_local_cluster_listens_on_loopback_only_its_http_routes_on_a_free_port():
    with local_cluster(1) as cluster, cluster.get_client() as client:
        pids = [os.getpid(), *client.run(os.getpid).values()]  # scheduler here, one worker
        http_port = cluster.scheduler.http_server.port
        addresses = [a for pid in pids for a in listening_addresses(pid)]
        assert f"{http_port:04X}" in {a.split(":")[1] for a in addresses}
        assert http_port != 8787  # Dask's default, which a second cluster would collide on
        assert len(addresses) >= 3  # scheduler, its HTTP routes, the worker
        assert all(a.split(":")[0] in LOOPBACK for a in addresses)
