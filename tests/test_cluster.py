"""The local Dask cluster a run starts when no scheduler is configured listens on loopback."""

from __future__ import annotations

import os
from pathlib import Path

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


def test_a_run_s_local_cluster_spills_into_the_work_folder_only(tmp_path):
    import tempfile

    import dask

    from flows.cluster import dask_client
    from schemas.config import parse_config

    work = tmp_path / "work"
    config = parse_config({"release": str(tmp_path / "release"), "work_dir": str(work),
                           "dask": {"workers": 1},
                           "sites": [{"site_id": "s1", "source": {"kind": "folder",
                                                                  "path": str(tmp_path)}}]},
                          tmp_path)
    scratch = work / "scratch" / "dask"
    assert config.dask.local_directory == str(scratch)
    before = set(Path(tempfile.gettempdir()).iterdir())
    with dask_client(config.dask) as client:
        def where(dask_worker):
            return {"local": dask_worker.local_directory,
                    "temporary": dask.config.get("temporary-directory")}

        [seen] = client.run(where).values()
        # make the worker spill for real: more than its memory target fits
        client.run(lambda dask_worker: dask_worker.data.__setitem__("x", b"\0" * 1024))
        client.run(lambda dask_worker: dask_worker.data.evict())
        spilled = [p for p in scratch.rglob("*") if p.is_file() and p.parent.name == "storage"]
    assert Path(seen["local"]).is_relative_to(scratch)
    assert Path(seen["temporary"]) == scratch
    assert spilled, "nothing was spilled into the scratch folder"
    assert not {p for p in set(Path(tempfile.gettempdir()).iterdir()) - before
                if p.name.startswith("dask-scratch")}
