"""A small published release over the session corpus, with its config written as YAML (the
``published_config`` fixture), for the tests of what happens after publication."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.conftest import consortium_config


def publish_corpus(corpus: tuple[Path, dict], scheduler: str, base: Path) -> Path:
    """Run the nightly flow over the corpus into ``base``; the path of the YAML config."""
    from flows.nightly import nightly
    from schemas.config import load_config

    corpus_dir, truth = corpus
    raw = consortium_config(corpus_dir, truth, base / "release", base / "work", scheduler)
    path = base / "radrepo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    summaries = nightly(load_config(path))
    assert summaries and {s["status"] for s in summaries} == {"published"}
    return path


def with_config(config_path: Path, target: Path, **extra) -> Path:
    """A copy of a YAML config with keys added (e.g. research_pacs), written to ``target``."""
    raw = yaml.safe_load(config_path.read_text())
    raw.update(extra)
    target.write_text(yaml.safe_dump(raw, sort_keys=False))
    return target
