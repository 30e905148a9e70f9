"""Shared fixtures: one Prefect test server, Dask cluster and synthetic corpus per session."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

TEST_SECRET = "radrepo-test-secret-0123456789"


@pytest.fixture(scope="session", autouse=True)
def secret_env():
    """Every test runs with a known HMAC secret in RADREPO_SECRET."""
    previous = os.environ.get("RADREPO_SECRET")
    os.environ["RADREPO_SECRET"] = TEST_SECRET
    yield TEST_SECRET
    if previous is None:
        os.environ.pop("RADREPO_SECRET", None)
    else:
        os.environ["RADREPO_SECRET"] = previous


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server (Prefect's own test harness) shared by the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def dask_scheduler():
    """A real two-worker distributed cluster on 127.0.0.1; yields the scheduler address."""
    from flows.cluster import local_cluster

    with local_cluster(2) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    """The default synthetic corpus (three sites) and its ground truth, read-only for tests."""
    from synth import synthesize

    out = tmp_path_factory.mktemp("corpus")
    truth = synthesize(out, sites=3, patients=3, seed=7)
    return out, truth


@pytest.fixture(scope="session")
def make_config(corpus, dask_scheduler):
    """Build a validated config over the session corpus for a given release and work folder."""
    from schemas.config import parse_config

    corpus_dir, truth = corpus

    def build(release: Path, work: Path, **extra) -> object:
        raw = consortium_config(corpus_dir, truth, release, work, dask_scheduler)
        raw.update(extra)
        return parse_config(raw, corpus_dir)

    return build


def consortium_config(corpus_dir: Path, truth: dict, release: Path, work: Path,
                      scheduler: str | None = None) -> dict:
    """The demo's consortium config (as a dict) over the synthetic sites, on a given cluster."""
    from synth import demo_config

    cfg = demo_config(corpus_dir, truth, release=release, work=work)
    if scheduler:
        cfg["dask"] = {"scheduler": scheduler}
    return cfg


@pytest.fixture(scope="session")
def published_config(prefect_server, corpus, dask_scheduler, tmp_path_factory) -> Path:
    """One release published by the nightly flow over the corpus, shared by the tests of what
    comes after publication (push, labels); the path of its YAML config."""
    from tests.released import publish_corpus

    return publish_corpus(corpus, dask_scheduler, tmp_path_factory.mktemp("published"))


PACS_PASSWORD = "pacs-test-password"
PACS_SITE = "site-b"


@pytest.fixture(scope="session")
def pacs(tmp_path_factory, corpus):
    """A real Orthanc (Debian's packages) on 127.0.0.1, needing a login for DICOMweb, loaded
    with one synthetic site's files; radrepo's storage SCP port is registered with it as the
    C-MOVE destination RADREPO. Outside CI a missing Orthanc skips; in CI it fails."""
    from contextlib import ExitStack

    from infra.orthanc import OrthancUnavailable, free_port, run_orthanc

    corpus_dir, truth = corpus
    source = corpus_dir / truth["sites"][PACS_SITE]["source"]
    storage_port = free_port()
    with ExitStack() as stack:
        try:
            server = stack.enter_context(run_orthanc(
                tmp_path_factory.mktemp("orthanc"), {"RADREPO": storage_port},
                username="radrepo", password=PACS_PASSWORD))
        except OrthancUnavailable as err:
            if os.environ.get("CI") == "true":
                pytest.fail(f"the PACS for the tests cannot start: {err}")
            pytest.skip(f"the PACS for the tests cannot start: {err}")
        files = sorted(p for p in source.rglob("*") if p.is_file())
        statuses = server.upload(files)
        yield PacsFixture(server, storage_port, source,
                          {p.relative_to(source).as_posix(): s for p, s in statuses.items()})


@dataclass(frozen=True)
class PacsFixture:
    server: object  # infra.orthanc.Orthanc
    storage_port: int
    source: Path  # the files loaded into it
    uploaded: dict[str, str]  # source key -> Orthanc's status for that file


@pytest.fixture(scope="session")
def published_release(prefect_server, make_config, tmp_path_factory) -> Path:
    """The session corpus published once by the nightly flow; copy it before changing it."""
    from flows.nightly import nightly

    base = tmp_path_factory.mktemp("published")
    nightly(make_config(base / "release", base / "work"))
    return base / "release"
