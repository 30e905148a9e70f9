"""No value in any message: a failing run, as the operator's console, the private log and
Prefect's database see it. The run is a real ``radrepo run`` subprocess against the session's
Prefect test server; afterwards every text column of that server's database is searched for
the identifiers planted in the source."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.conftest import TEST_SECRET
from tests.test_deidentify import identified_ct

SURNAME, GIVEN, MRN = "WHITAKERSON", "MARGARETHE", "MRN4455667"
FOLDER = f"{SURNAME}_{GIVEN}-1957"  # a patient-named folder in the source
PLANTED = (SURNAME, GIVEN, MRN, FOLDER)
REPO = Path(__file__).resolve().parent.parent


def _source(root: Path) -> None:
    patient = root / FOLDER
    patient.mkdir(parents=True)
    identified_ct(patient / "IM0001.dcm", sop="1.2.95.1", study="1.2.95",
                  name=f"{SURNAME}^{GIVEN}", mrn=MRN)
    os.mkfifo(patient / "x.dcm")
    (patient / f"{SURNAME}.dcm").symlink_to(patient / "no-such-file")
    (patient / "notes.txt").write_text(f"{SURNAME} {MRN}")


def _radrepo(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    import prefect.settings

    env = {**os.environ, "PYTHONPATH": str(REPO), "RADREPO_SECRET": TEST_SECRET,
           "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(), "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-c", "from flows.cli import main; main()", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)


def _prefect_texts() -> list[str]:
    """Every text value in the Prefect test server's database (runs, states, logs, artifacts,
    parameters), read straight from its SQLite file."""
    import prefect.settings

    url = prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value()
    path = url.split(":///", 1)[1]
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        tables = [r[0] for r in db.execute("select name from sqlite_master where type='table'")]
        texts = []
        for table in tables:
            for row in db.execute(f'select * from "{table}"'):  # noqa: S608 - table names
                texts += [str(v) for v in row if isinstance(v, str | bytes)]
    return texts


def _config(tmp_path: Path, source: Path, clinical: Path) -> Path:
    cfg = tmp_path / "radrepo.yaml"
    cfg.write_text(f"release: release\nwork_dir: work\ndask: {{workers: 1}}\nsites:\n"
                   f"  - site_id: s1\n    source: {{kind: folder, path: '{source}'}}\n"
                   f"    clinical: {{path: '{clinical}'}}\n")
    return cfg


def _one_clean_line(done: subprocess.CompletedProcess, expected: str, work: Path) -> Path:
    """The run failed with exactly one ``radrepo:`` line naming the site and the log file,
    no traceback, no planted value; returns the log file."""
    assert done.returncode == 1, done.stderr
    console = done.stdout + done.stderr
    assert "Traceback" not in console
    for value in PLANTED:
        assert value.lower() not in console.lower(), value
    ours = [line for line in done.stderr.splitlines() if line.startswith("radrepo:")]
    assert len(ours) == 1 and ours[0].startswith(f"radrepo: {expected} (details: "), ours
    log = Path(ours[0].split("(details: ", 1)[1].rstrip(")"))
    assert log.is_relative_to(work / "logs") and log.stat().st_mode & 0o077 == 0
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and expected in text
    for value in PLANTED:  # private, but log lines name objects by opaque id all the same
        assert value.lower() not in text.lower(), value
    return log


def test_a_failing_run_leaks_no_value_to_console_log_or_prefect(prefect_server, tmp_path):
    source, work = tmp_path / "exports", tmp_path / "work"
    _source(source)
    missing_emr = tmp_path / "emr.csv"  # the clinical export is not there tonight
    cfg = _config(tmp_path, source, missing_emr)

    done = _radrepo(["run", str(cfg)], tmp_path)
    log = _one_clean_line(done, "site s1: the clinical export is missing or unreadable", work)
    assert "SourceUnavailable" in log.read_text()
    # the bad entries were met and quarantined under opaque ids before the run stopped
    import pyarrow.parquet as pq

    [index] = (work / "s1" / "index").glob("folder-*[0-9a-f].parquet")
    reasons = {r["reason"] for r in pq.read_table(index).to_pylist()}
    assert {"not a regular file (FIFO)", "dangling symlink", "not DICOM"} <= reasons

    source_gone = tmp_path / "gone"
    done = _radrepo(["run", str(_config(tmp_path, source_gone, missing_emr))], tmp_path)
    _one_clean_line(done, "site s1: the source folder is missing or unreadable", work)

    texts = _prefect_texts()
    failed = [t for t in texts if "site s1: the clinical export is missing" in t]
    assert failed, "the failed run is not in the Prefect database searched"
    assert any("site s1: the source folder is missing" in t for t in texts)
    for value in PLANTED:
        found = [t[:200] for t in texts if value.lower() in t.lower()]
        assert not found, (value, found)
