"""The release report: `radrepo report` writes one static page that headless Chromium (Debian's
`chromium`) renders offline, with the descriptive table's numbers and every chart decoded."""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import pytest
from PIL import Image
from typer.testing import CliRunner

from flows.cli import app
from tests.test_flow_e2e import identifier_patterns

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync")
# injected into a copy of the report only: records whether each image decoded
IMAGE_PROBE = """<script>window.addEventListener('load', () => {
  const images = [...document.images];
  document.body.dataset.images = images.length;
  document.body.dataset.decoded = images.filter(i => i.complete && i.naturalWidth > 0).length;
});</script>"""
BAR_BLUE = (0x4E, 0x79, 0xA7)  # the first site's colour in every chart


def chromium() -> str:
    found = shutil.which("chromium")
    if not found:
        message = "Debian's chromium is not installed (infra/install-services.sh installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return found


def run_chromium(binary: str, profile: Path, *args: str) -> str:
    """Run headless Chromium to completion (its whole process group killed on a timeout)."""
    process = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                               start_new_session=True)
    try:
        out, _ = process.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0
    return out


class ReportDom(HTMLParser):
    """The descriptive table's cells, the body's data attributes and the links of a DOM dump."""

    def __init__(self):
        super().__init__()
        self.cells: dict[tuple[str, str, str], str] = {}
        self.body: dict[str, str] = {}
        self.links: list[str] = []
        self.images: list[str] = []
        self._row: dict[str, str] | None = None
        self._cell: str | None = None
        self._in_by_site = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = {k: v for k, v in a.items() if k.startswith("data-")}
        elif tag == "table":
            self._in_by_site = a.get("id") == "by-site"
        elif tag == "tr" and self._in_by_site and "data-label" in a:
            self._row = a
        elif tag == "td" and self._row is not None:
            self._cell = a["data-site"]
        elif tag == "a":
            self.links.append(a["href"])
        elif tag == "img":
            self.images.append(a["src"])

    def handle_data(self, data):
        if self._cell is not None and self._row is not None:
            self.cells[(self._row["data-section"], self._row["data-label"], self._cell)] = data

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None
        elif tag == "table":
            self._in_by_site = False


def catalog(release: Path, sql: str) -> list[tuple]:
    with duckdb.connect(str(release / "catalog.duckdb"), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_the_report_renders_offline_in_chromium_with_the_catalog_numbers(
        published_release, corpus, tmp_path):
    binary = chromium()
    release = Path(shutil.copytree(published_release, tmp_path / "release"))
    result = CliRunner().invoke(app, ["report", str(release)])
    assert result.exit_code == 0, result.output
    page = release / "reports" / "index.html"
    text = page.read_text()

    # offline: no script, stylesheet link, or address outside the page; images are data URIs
    assert "<script" not in text and "<link" not in text
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", text)
    svgs = [base64.b64decode(src.split(",", 1)[1]).decode()
            for src in re.findall(r'<img src="(data:image/svg\+xml;base64,[^"]+)"', text)]
    assert len(svgs) == 4
    # privacy: no identifier of the sources in the page or inside its images
    _, truth = corpus
    for pattern in identifier_patterns(truth):
        assert not any(pattern.search(t) for t in [text, *svgs]), pattern.pattern

    probe = tmp_path / "probe.html"
    probe.write_text(text.replace("</body>", IMAGE_PROBE + "</body>"))
    dom = ReportDom()
    dom.feed(run_chromium(binary, tmp_path / "profile", "--virtual-time-budget=10000",
                          "--dump-dom", probe.as_uri()))
    assert dom.body == {"data-images": "4", "data-decoded": "4"}

    # the descriptive table by site, as rendered, against the catalog read independently
    patients = dict(catalog(release, "SELECT site_id, count(DISTINCT patient_id) FROM patients "
                                     "GROUP BY 1"))
    studies = dict(catalog(release, "SELECT site_id, count(DISTINCT study_uid) FROM studies "
                                    "WHERE status = 'published' GROUP BY 1"))
    assert len(patients) == len(truth["sites"])
    for site in truth["sites"]:
        assert dom.cells[("Patients", "patients", site)] == str(patients[site])
        assert dom.cells[("Studies (published)", "studies", site)] == str(studies[site])
    assert dom.cells[("Patients", "patients", "all sites")] == str(sum(patients.values()))
    for site, status, n in catalog(release, "SELECT site_id, covid_status, count(*) FROM "
                                            "patients GROUP BY ALL"):
        assert dom.cells[("COVID status", status, site)] == str(n)
    for site, sex, n in catalog(release, "SELECT site_id, sex, count(*) FROM patients "
                                         "GROUP BY ALL"):
        assert dom.cells[("Sex", sex, site)] == str(n)
    for site, modality, n in catalog(release, "SELECT site_id, modality, count(DISTINCT "
                                              "study_uid) FROM series WHERE status = "
                                              "'published' GROUP BY ALL"):
        assert dom.cells[("Studies by modality", modality, site)] == str(n)
    excluded_only = {m for (m,) in catalog(
        release, "SELECT modality FROM series WHERE status = 'excluded' EXCEPT "
                 "SELECT modality FROM series WHERE status = 'published'")}
    assert excluded_only  # the corpus plants modalities QC excludes (OT secondary captures)
    assert not {m for _, m, _ in dom.cells} & excluded_only
    oldest = catalog(release, "SELECT max(age_at_index) FROM patients")[0][0]
    assert dom.cells[("Age at index (years)", "maximum", "all sites")] == str(oldest)

    # one link per complete batch, to its contact sheet, which exists
    batches = catalog(release, "SELECT site_id, batch_id FROM batches ORDER BY ALL")
    assert len(dom.links) == len(batches)
    for link, (site, batch) in zip(dom.links, batches, strict=True):
        assert link.endswith(f"reports/{site}/{batch}/contact-sheet.html")
        assert (page.parent / link).resolve().is_file()

    # the screenshot shows the charts' bars
    shot = tmp_path / "report.png"
    run_chromium(binary, tmp_path / "profile", f"--screenshot={shot}",
                 "--window-size=1000,2600", page.as_uri())
    with Image.open(shot) as image:
        pixels = image.convert("RGB").getdata()
        assert sum(1 for p in pixels if p == BAR_BLUE) > 2000


def test_report_refuses_a_release_without_batches(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no COMPLETE batch" in result.output
