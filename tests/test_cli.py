"""The command line: config errors, the secret, the one-off form, query and the demo."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import duckdb
import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from synth import demo_config

runner = CliRunner()


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("release: r\nwork_dir: w\nsites:\n  - site_id: a\n    source: {kind: flat, path: x}\n"
         "bogus: 1\n", "bogus: unknown key"),
        ("release: r\nsites:\n  - site_id: a\n    source: {kind: folder, path: x}\n",
         "work_dir: required key is missing"),
        ("release: r\nwork_dir: w\nsites:\n  - site_id: a\n    source: {kind: ftp, path: x}\n",
         "sites.0.source: Input tag 'ftp' found using 'kind' does not match"),
        ("release: r\nwork_dir: w\nsites:\n  - site_id: a\n    source: {kind: dimse, host: h, "
         "port: 104, called_ae: PACS}\n", "sites.0.source.dimse.storage_port: required key"),
        ("release: r\nwork_dir: w\nsites:\n  - site_id: a\n    source: {kind: dicomweb, "
         "url: 'http://pacs/dicom-web', query: {modality: CT}}\n",
         "sites.0.source.dicomweb.query.modality: unknown key"),
        ("release: r\nwork_dir: w\nsites:\n  - site_id: a\n    source: {kind: dicomweb, "
         "url: pacs/dicom-web}\n", "sites.0.source.dicomweb.url: String should match"),
        ("release: r\nwork_dir: w\nsites:\n  - site_id: 'bad id!'\n"
         "    source: {kind: folder, path: x}\n", "sites.0.site_id: String should match"),
        ("release: [unclosed\n", "configuration is not valid YAML at line"),
    ],
)
def test_config_errors_are_one_line_with_exit_code_2(tmp_path, yaml_text, message):
    result = runner.invoke(app, ["run", str(write(tmp_path / "c.yaml", yaml_text))])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.output


def test_run_refuses_to_start_without_the_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("RADREPO_SECRET")
    (tmp_path / "src").mkdir()
    cfg = write(tmp_path / "c.yaml", "release: r\nwork_dir: w\nsites:\n  - site_id: a\n"
                "    source: {kind: folder, path: src}\n")
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 2
    assert "RADREPO_SECRET is not set" in result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "w").exists()


def test_unreachable_pacs_ends_the_run_with_one_line_after_the_other_sites(
        prefect_server, corpus, tmp_path):
    from infra.orthanc import free_port

    corpus_dir, truth = corpus
    flat_id, flat = next((k, v) for k, v in truth["sites"].items() if v["layout"] == "flat")
    port = free_port()  # nothing listens there
    cfg = write(tmp_path / "c.yaml", "release: r\nwork_dir: w\nsites:\n  - site_id: a\n"
                f"    source: {{kind: dicomweb, url: 'http://127.0.0.1:{port}/dicom-web', "
                "retries: 1, backoff_seconds: 0}\n"
                f"  - site_id: {flat_id}\n"
                f"    source: {{kind: flat, path: '{corpus_dir / flat['source']}'}}\n")
    result = runner.invoke(app, ["run", str(cfg)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(
        f"radrepo: site a: QIDO-RS at http://127.0.0.1:{port}: ConnectError (after 2 attempts)"
        f" (details: {tmp_path / 'w' / 'logs'}/radrepo-")
    assert list((tmp_path / "r" / "batches" / flat_id).glob("*/COMPLETE"))  # not held up


def test_one_off_run_and_query(prefect_server, corpus, tmp_path):
    corpus_dir, truth = corpus
    flat_id, flat = next((k, v) for k, v in truth["sites"].items() if v["layout"] == "flat")
    release, work = tmp_path / "release", tmp_path / "work"
    args = ["run", "--source", f"{flat_id}={corpus_dir / flat['source']}",
            "--clinical", f"{flat_id}={corpus_dir / flat['clinical']}",
            "--release", str(release), "--work", str(work)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert flat_id in result.output
    assert re.search(r"quarantined: (\d+ [^,;]+, )*\d+ not DICOM", result.output)
    with duckdb.connect(str(release / "catalog.duckdb"), read_only=True) as con:
        n = con.sql("select count(*) from instances").fetchone()[0]
    assert n > 0
    result = runner.invoke(app, ["query", str(release), "select count(*) as n from instances"])
    assert result.exit_code == 0 and str(n) in result.output
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    bad = runner.invoke(app, ["query", str(release), "select * from no_such_table"])
    assert bad.exit_code == 1 and "query failed" in bad.output
    missing = runner.invoke(app, ["run", "--source", "x=/no/such/folder", "--release", "r",
                                  "--work", "w"])
    assert missing.exit_code == 2 and "site x: the source folder is missing" in missing.output


def test_demo_prints_counts_and_is_repeatable(prefect_server, tmp_path, monkeypatch):
    monkeypatch.delenv("RADREPO_SECRET")
    folder = tmp_path / "demo"
    first = runner.invoke(app, ["demo", str(folder), "--patients", "2"])
    assert first.exit_code == 0, first.output
    assert "generated a secret" in first.output
    for site in ("site-a", "site-b", "site-c"):
        assert site in first.output
    assert "published" in first.output
    truth = json.loads((folder / "sources" / "ground_truth.json").read_text())
    assert yaml.safe_load((folder / "radrepo.yaml").read_text()) == demo_config(
        Path("sources"), truth)

    def hashes(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in root.rglob("*") if p.is_file()}

    release = folder / "release"
    before = hashes(release)
    monkeypatch.delenv("RADREPO_SECRET")
    second = runner.invoke(app, ["demo", str(folder), "--patients", "2"])
    assert second.exit_code == 0 and "nothing to do" in second.output
    assert hashes(release) == before
    # a fresh release from the same sources and the demo's kept secret is byte-identical
    shutil.rmtree(release)
    monkeypatch.delenv("RADREPO_SECRET")
    third = runner.invoke(app, ["demo", str(folder), "--patients", "2"])
    assert third.exit_code == 0, third.output
    rebuilt = hashes(release)
    assert {k: v for k, v in rebuilt.items() if not k.startswith("catalog/runs/")} == {
        k: v for k, v in before.items() if not k.startswith("catalog/runs/")}


def test_deidentify_command_cleans_a_folder(tmp_path):
    from tests.test_deidentify import identified_ct

    src, out = tmp_path / "export", tmp_path / "clean"
    (src / "DOE_JANE").mkdir(parents=True)
    identified_ct(src / "DOE_JANE" / "1.dcm", sop="1.2.3.1")
    identified_ct(src / "DOE_JANE" / "2.dcm", sop="1.2.3.2")
    (src / "DOE_JANE" / "notes.txt").write_text("call Jane")
    result = runner.invoke(app, ["deidentify", str(src), str(out), "--site-id", "s9"])
    assert result.exit_code == 1, result.output  # one file quarantined
    assert "3 files in, 2 de-identified" in result.output and "not DICOM" in result.output
    files = sorted(out.rglob("*.dcm"))
    assert len(files) == 2 and all("DOE" not in str(f) for f in files)
    assert all(b"DOE" not in f.read_bytes() for f in files)
    (src / "DOE_JANE" / "notes.txt").unlink()
    clean = runner.invoke(app, ["deidentify", str(src), str(tmp_path / "clean2")])
    assert clean.exit_code == 0 and "0 quarantined" in clean.output


def test_nightly_flow_reads_its_config_file_at_run_time(prefect_server, corpus, tmp_path):
    import yaml

    from flows.nightly import nightly_flow

    corpus_dir, truth = corpus
    flat_id, flat = next((k, v) for k, v in truth["sites"].items() if v["layout"] == "flat")
    config = write(tmp_path / "consortium.yaml", yaml.safe_dump({
        "release": "release", "work_dir": "work",
        "sites": [{"site_id": flat_id, "source": {"kind": "flat",
                                                  "path": str(corpus_dir / flat["source"])}}]}))
    [summary] = nightly_flow(str(config))
    assert summary["status"] == "published" and summary["files_in"] == len(flat["files"])
    assert (tmp_path / "release" / "batches" / flat_id / summary["batch_id"] / "COMPLETE").exists()


def test_backfill_needs_batches_or_a_window(tmp_path):
    cfg = write(tmp_path / "c.yaml", "release: r\nwork_dir: w\nsites:\n  - site_id: a\n"
                "    source: {kind: folder, path: src}\n")
    result = runner.invoke(app, ["backfill", str(cfg)])
    assert result.exit_code == 2 and "--batch" in result.output
    bad = runner.invoke(app, ["backfill", str(cfg), "--since", "May 2020"])
    assert bad.exit_code == 2 and "YYYY-MM-DD" in bad.output
