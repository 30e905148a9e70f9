"""A nightly run over several sites: they run side by side, a broken site fails alone."""

from __future__ import annotations

import yaml
from typer.testing import CliRunner

from flows.cli import app
from schemas.config import ConfigError, parse_config
from tests.conftest import consortium_config

runner = CliRunner()


def test_a_site_with_a_missing_source_fails_alone(prefect_server, corpus, dask_scheduler,
                                                  tmp_path):
    corpus_dir, truth = corpus
    raw = consortium_config(corpus_dir, truth, tmp_path / "release", tmp_path / "work",
                            dask_scheduler)
    broken = raw["sites"][1]
    broken["source"]["path"] = str(tmp_path / "gone" / "EXPORT_DOE_JANE")
    raw["max_parallel_sites"] = 3
    config = tmp_path / "consortium.yaml"
    config.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["run", str(config)])
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    failed = [line for line in lines if line.startswith("radrepo: ")]
    assert len(failed) == 1 and failed[0].startswith(f"radrepo: site {broken['site_id']}: ")
    assert "DOE_JANE" not in result.output  # (no traceback on the console: helper edges)
    assert any(broken["site_id"] in line and "failed" in line for line in lines)
    published = {p.parent.parent.name for p in (tmp_path / "release" / "batches").rglob(
        "COMPLETE")}
    assert published == {s["site_id"] for s in raw["sites"]} - {broken["site_id"]}


def test_schedule_and_parallelism_are_checked(corpus, tmp_path):
    corpus_dir, truth = corpus
    raw = consortium_config(corpus_dir, truth, tmp_path / "r", tmp_path / "w")
    for bad, where in (({"schedule": {"cron": "0 2 * *"}}, "schedule.cron"),
                       ({"schedule": {"timezone": "Mars/Olympus"}}, "schedule.timezone"),
                       ({"max_parallel_sites": 0}, "max_parallel_sites")):
        try:
            parse_config({**raw, **bad}, corpus_dir)
        except ConfigError as err:
            assert str(err).startswith(where), err
        else:
            raise AssertionError(f"{bad} was accepted")
    good = parse_config({**raw, "schedule": {"cron": "30 1 * * 1-5", "timezone": "Asia/Tokyo"}},
                        corpus_dir)
    assert (good.schedule.cron, good.schedule.timezone, good.max_parallel_sites) == (
        "30 1 * * 1-5", "Asia/Tokyo", 2)
