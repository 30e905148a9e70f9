"""Push to a research PACS: two empty Orthancs (STOW-RS and C-STORE) take the release's
complete batches; counts are asked back, a second push sends nothing, a push SIGKILLed part-way
resumes, and a study the PACS lost is sent again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from flows.cli import app
from schemas.config import load_config
from tasks.pacs.push import PushLedger, ledger_path, push_plan, push_release
from tasks.zones import Release
from tests.released import with_config

runner = CliRunner()
PASSWORD = "research-pacs-password"


@pytest.fixture(scope="module")
def research(published_config, tmp_path_factory):
    """The published release and two empty research Orthancs named in its config."""
    from infra.orthanc import OrthancUnavailable, free_port, run_orthanc

    base = tmp_path_factory.mktemp("push")
    os.environ["RESEARCH_PACS_PASSWORD"] = PASSWORD
    with ExitStack() as stack:
        try:
            web = stack.enter_context(run_orthanc(base / "orthanc-web", username="radrepo",
                                                  password=PASSWORD))
            dimse = stack.enter_context(run_orthanc(base / "orthanc-dimse",
                                                    {"RADREPO": free_port()}))
        except OrthancUnavailable as err:
            if os.environ.get("CI") == "true":
                pytest.fail(f"the research PACS cannot start: {err}")
            pytest.skip(f"the research PACS cannot start: {err}")
        config_path = with_config(published_config, base / "radrepo.yaml", research_pacs={
            "web": {"kind": "dicomweb", "url": web.dicomweb, "username": "radrepo",
                    "password_env": "RESEARCH_PACS_PASSWORD", "files_per_request": 8},
            "dimse": {"kind": "dimse", "host": "127.0.0.1", "port": dimse.dicom_port,
                      "called_ae": dimse.aet, "calling_ae": "RADREPO"},
        })
        yield config_path, {"web": web, "dimse": dimse}
    os.environ.pop("RESEARCH_PACS_PASSWORD", None)


def catalog_counts(config_path: Path) -> dict[str, int]:
    cfg = load_config(config_path)
    with duckdb.connect(str(Path(cfg.release) / "catalog.duckdb"), read_only=True) as con:
        return dict(con.sql("SELECT study_uid, count(*) FROM instances GROUP BY 1").fetchall())


def orthanc_counts(server) -> dict[str, int]:
    """Instances per Study Instance UID, as the PACS's own REST API lists them."""
    with server.client() as http:
        out = {}
        for study in http.get("/studies", params={"expand": ""}).json():
            uid = study["MainDicomTags"]["StudyInstanceUID"]
            out[uid] = len(http.get(f"/studies/{study['ID']}/instances").json())
        return out


def changes(server) -> int:
    with server.client() as http:
        return http.get("/changes", params={"last": ""}).json()["Last"]


def test_push_over_stow_counts_back_and_sends_nothing_twice(research):
    config_path, servers = research
    want = catalog_counts(config_path)
    assert sum(want.values()) > 10

    first = runner.invoke(app, ["push", str(config_path), "--to", "web"])
    assert first.exit_code == 0, first.output
    total = sum(want.values())
    assert f"{total} instances in complete batches: {total} sent, 0 already there" in first.output
    assert f"{len(want)} studies verified, 0 short" in first.output
    assert orthanc_counts(servers["web"]) == want

    seen = changes(servers["web"])
    again = runner.invoke(app, ["push", str(config_path), "--to", "web"])
    assert again.exit_code == 0, again.output
    assert f"0 sent, {total} already there (push ledger)" in again.output
    assert changes(servers["web"]) == seen  # the PACS received nothing
    assert orthanc_counts(servers["web"]) == want


def test_push_killed_part_way_resumes_without_resending(research):
    """A real push process over C-STORE is SIGKILLed after its first ledger commit; the
    rerun sends exactly what the ledger does not hold."""
    config_path, servers = research
    cfg = load_config(config_path)
    script = (
        "import os, signal, sys\n"
        "from schemas.config import load_config\n"
        "from tasks.pacs.push import PushLedger, ledger_path, push_release\n"
        "from tasks.zones import Release\n"
        "cfg = load_config(sys.argv[1])\n"
        "ledger = PushLedger(ledger_path(cfg.work_dir, 'dimse'))\n"
        "push_release(Release(cfg.release), cfg.research_pacs['dimse'], ledger,\n"
        "             on_sent=lambda n: os.kill(os.getpid(), signal.SIGKILL))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", script, str(config_path)], env=env,
                            capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]

    ledger = PushLedger(ledger_path(cfg.work_dir, "dimse"))
    try:
        recorded = ledger.sent()
        total = len(push_plan(Release(cfg.release)))
        assert 0 < len(recorded) < total
        assert sum(orthanc_counts(servers["dimse"]).values()) == len(recorded)

        seen = changes(servers["dimse"])
        resumed = push_release(Release(cfg.release), cfg.research_pacs["dimse"], ledger)
        assert resumed.ok
        assert (resumed.already_sent, resumed.sent) == (len(recorded), total - len(recorded))
        assert orthanc_counts(servers["dimse"]) == catalog_counts(config_path)
        assert changes(servers["dimse"]) > seen
    finally:
        ledger.close()


def test_a_study_the_pacs_lost_is_reported_and_sent_again(research):
    config_path, servers = research
    first = runner.invoke(app, ["push", str(config_path), "--to", "web"])
    assert first.exit_code == 0, first.output
    want = catalog_counts(config_path)
    cfg = load_config(config_path)
    item = push_plan(Release(cfg.release))[0]
    servers["web"].delete_instance(item.sop_uid)

    short = runner.invoke(app, ["push", str(config_path), "--to", "web"])
    assert short.exit_code == 1
    n = want[item.study_uid]
    assert f"study {item.study_uid}: {n} sent, the PACS holds {n - 1} (will be resent)" \
        in short.output

    repaired = runner.invoke(app, ["push", str(config_path), "--to", "web"])
    assert repaired.exit_code == 0, repaired.output
    assert f"{n} sent" in repaired.output
    assert orthanc_counts(servers["web"]) == want


def test_push_refuses_an_unknown_research_pacs_and_a_bad_block(research, tmp_path):
    config_path, _ = research
    result = runner.invoke(app, ["push", str(config_path), "--to", "nowhere"])
    assert result.exit_code == 2 and "no research PACS named 'nowhere'" in result.output
    bad = tmp_path / "bad.yaml"
    bad.write_text(config_path.read_text().replace("files_per_request: 8",
                                                   "files_per_request: 8\n    ae: X"))
    result = runner.invoke(app, ["push", str(bad), "--to", "web"])
    assert result.exit_code == 2 and "research_pacs.web.dicomweb.ae: unknown key" in result.output
