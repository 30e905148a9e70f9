"""The README's ten analyst questions, run as written against a release of the synthetic corpus
(after a backfill, so latest_runs must not double-count), each answer checked against the
generator's ground truth."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path

import duckdb
import pytest

from tasks.deidentify.keys import PseudonymKeys
from tests.conftest import TEST_SECRET
from tests.test_flow_e2e import expected_counts, expected_disposition, outside_window, qc_excluded

README = Path(__file__).resolve().parent.parent / "README.md"
KEYS = PseudonymKeys(TEST_SECRET.encode())


def readme_questions() -> dict[int, str]:
    """Question number -> SQL, from the README's ten-questions block."""
    text = README.read_text()
    section = text[text.index("#### Ten questions"):]
    block = section[section.index("```sql") + len("```sql"):]
    block = block[:block.index("```")]
    parts = re.split(r"^-- (\d+)\. .*$", block, flags=re.MULTILINE)
    return {int(n): sql.strip().rstrip(";") for n, sql in zip(parts[1::2], parts[2::2],
                                                             strict=True)}


@pytest.fixture(scope="module")
def answers(prefect_server, make_config, tmp_path_factory):
    from flows.nightly import backfill, nightly

    base = tmp_path_factory.mktemp("questions")
    config = make_config(base / "release", base / "work")
    nightly(config)
    backfill(config, batches=["CXR-UPDATE-20200523"])  # runs now holds two rows for it
    with duckdb.connect(str(base / "release" / "catalog.duckdb"), read_only=True) as con:
        assert con.sql("select count(*) - count(distinct (site_id, batch_id)) from runs"
                       ).fetchone()[0] > 0
        yield base / "release", {n: con.sql(sql).fetchall()
                                 for n, sql in readme_questions().items()}


class Truth:
    """What the generator planted, as the pipeline's default rules should publish it."""

    def __init__(self, truth: dict):
        self.sites = truth["sites"]
        self.published: dict[str, list[dict]] = {}
        self.files: dict[str, list[dict]] = {}
        for site_id, site in self.sites.items():
            waiting = {b for b, info in site["batches"].items() if not info["complete"]}
            files = [f for f in site["files"] if f["batch"] not in waiting]
            by_key = {f["key"]: f for f in files}
            self.files[site_id] = [{**f, "end": expected_disposition(f, site, by_key)}
                                   for f in files]
            self.published[site_id] = [f for f in self.files[site_id] if f["end"] == "published"]

    def patient(self, site_id: str, mrn: str) -> dict:
        return next(p for p in self.sites[site_id]["patients"] if p["mrn"] == mrn)

    def study(self, site_id: str, study_uid: str) -> str:
        """The published Study Instance UID: a split exam's later part is the first part's."""
        split = self.sites[site_id]["quirks"].get("ct_split")
        if split:
            parts = sorted({(f["exam_time"], f["study_uid"]) for f in self.sites[site_id]["files"]
                            if f["quirk"] == "ct_split"})
            if study_uid in {uid for _, uid in parts}:
                study_uid = parts[0][1]
        return KEYS.uid(study_uid)

    def published_patients(self, site_id: str) -> list[dict]:
        mrns = {f["mrn"] for f in self.published[site_id]}
        return [self.patient(site_id, m) for m in sorted(mrns)]

    def published_studies(self, site_id: str) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for f in self.published[site_id]:
            out.setdefault(self.study(site_id, f["study_uid"]), []).append(f)
        return out


@pytest.fixture(scope="module")
def truth(corpus) -> Truth:
    return Truth(corpus[1])


def test_q1_patients_studies_and_files_per_site(answers, truth):
    want = [(s, len(truth.published_patients(s)), len(truth.published_studies(s)),
             len(truth.published[s])) for s in sorted(truth.sites)]
    assert answers[1][1] == want


def test_q2_files_in_and_how_they_ended_counts_each_batch_once(answers, corpus):
    want = [(s, c["files_in"], c["published"], c["excluded"], c["quarantined"])
            for s, c in sorted(expected_counts(corpus[1]).items())]
    assert answers[1][2] == want


def test_q3_exclusions_by_reason(answers, truth):
    got: dict[str, Counter] = {}
    for site_id, reason, n in answers[1][3]:
        got.setdefault(site_id, Counter())[reason.split(":")[0]] += n
    want: dict[str, Counter] = {}
    for site_id, files in truth.files.items():
        site = truth.sites[site_id]
        for f in files:
            if f["end"] == "excluded":
                kind = ("qc" if qc_excluded(f) else "outside_window" if outside_window(f, site)
                        else "duplicate")
                want.setdefault(site_id, Counter())[kind] += 1
    assert got == want
    assert {r for _, r, _ in answers[1][3] if r.startswith("duplicate:")} == {
        "duplicate:resent", "duplicate:double_store"}


def test_q4_covid_status_and_test_method(answers, truth):
    want = Counter()
    for site_id in truth.sites:
        for p in truth.published_patients(site_id):
            result = p["clinical"]["rtpcr_result"]
            want[(site_id, p["clinical"]["test_method"], result or "unknown",
                  "result" if result else "no_result")] += 1
    assert {row[:4]: row[4] for row in answers[1][4]} == dict(want)


def test_q5_age_at_index(answers, truth):
    for site_id, low, median, high, mean in answers[1][5]:
        ages = [p["clinical"]["age_at_index"] for p in truth.published_patients(site_id)]
        assert (low, median, high) == (min(ages), statistics.median(ages), max(ages))
        assert mean == round(statistics.mean(ages), 1)


def test_q6_ct_studies_in_the_first_week(answers, truth):
    want = []
    for site_id in sorted(truth.sites):
        studies = truth.published_studies(site_id)
        n = sum(any(f["modality"] == "CT" for f in files)
                and 0 <= min(f["days_from_index"] for f in files) <= 7
                for files in studies.values())
        if n:
            want.append((site_id, n))
    assert answers[1][6] == want and want


def test_q7_radiographs_of_positive_patients_and_their_files(answers, truth):
    release, got = answers
    want = set()
    for site_id in truth.sites:
        for uid, files in truth.published_studies(site_id).items():
            positive = truth.patient(site_id, files[0]["mrn"])["clinical"]["rtpcr_result"]
            if positive == "positive" and any(f["modality"] in ("CR", "DX") for f in files):
                want.add((uid, len(files)))
    assert {(uid, len(list((release / folder).rglob("*.dcm"))))
            for uid, _, _, folder in got[7]} == want
    assert want


def test_q8_crp_nearest_each_ct_study(answers, truth):
    want = set()
    for site_id in truth.sites:
        for uid, files in truth.published_studies(site_id).items():
            clinical = truth.patient(site_id, files[0]["mrn"])["clinical"]
            if any(f["modality"] == "CT" for f in files) and "crp" in clinical["labs"]:
                want.add((uid, clinical["labs"]["crp"], clinical["labs_day"],
                          min(f["days_from_index"] for f in files)))
    assert set(answers[1][8]) == want and want


def test_q9_duplicates_by_kind(answers, truth):
    planted = Counter()
    for files in truth.files.values():
        by_key = {f["key"]: f for f in files}
        for f in files:
            original = by_key.get(f["duplicate_of"] or "")
            if original and f["end"] == "excluded" and not qc_excluded(f):
                planted[("resent" if original["sop_uid"] == f["sop_uid"] else "double_store",
                         "instance")] += 1
    splits = sum("ct_split" in s["quirks"] for s in truth.sites.values())
    assert {(k, lv): n for k, lv, n in answers[1][9]} == {**planted,
                                                         ("split_merged", "study"): splits}
    # the double stores planted across batches and under one exam id are among them
    site_a = truth.sites["site-a"]["quirks"]
    assert {"pediatric_double_across_batches", "double_store_same_exam_id"} <= set(site_a)


def test_q10_studies_outside_the_inclusion_window(answers, truth):
    want = set()
    for site_id, site in truth.sites.items():
        for planted in site["quirks"].get("outside_window", []):
            if not planted["in_window"]:
                want.add((site_id, KEYS.uid(planted["study_uid"]), planted["days_from_index"]))
    got = {(s, uid, days) for s, uid, _, days, detail in answers[1][10]}
    assert got == want
    assert all(f"{-days} days before the index date" in detail
               for _, _, _, days, detail in answers[1][10])


def test_every_qc_and_duplicates_row_names_an_object_of_the_catalog(answers):
    release, _ = answers
    with duckdb.connect(str(release / "catalog.duckdb"), read_only=True) as con:
        def orphans(sql: str) -> int:
            return con.execute(sql).fetchone()[0]

        files = "(SELECT sop_uid FROM instances UNION ALL SELECT sop_uid FROM excluded_instances)"
        assert orphans(f"SELECT count(*) FROM qc WHERE level = 'instance' AND uid NOT IN {files}"
                       ) == 0
        assert orphans("SELECT count(*) FROM qc WHERE level = 'series' AND uid NOT IN "
                       "(SELECT series_uid FROM series)") == 0
        assert orphans("SELECT count(*) FROM qc WHERE level = 'study' AND uid NOT IN "
                       "(SELECT study_uid FROM studies)") == 0
        assert orphans("SELECT count(*) FROM qc WHERE study_uid IS NULL OR study_uid NOT IN "
                       "(SELECT study_uid FROM studies)") == 0
        assert orphans("SELECT count(*) FROM qc WHERE level NOT IN ('instance', 'series', "
                       "'study') OR outcome NOT IN ('excluded', 'flagged')") == 0
        # a copy is an excluded file and names a published one; a merged part names a study
        assert orphans("SELECT count(*) FROM duplicates WHERE level = 'instance' AND (uid NOT IN "
                       "(SELECT sop_uid FROM excluded_instances) OR kept_uid NOT IN "
                       "(SELECT sop_uid FROM instances))") == 0
        assert orphans("SELECT count(*) FROM duplicates WHERE level = 'study' AND (uid IN "
                       "(SELECT study_uid FROM studies) OR kept_uid NOT IN "
                       "(SELECT study_uid FROM studies))") == 0
        assert orphans("SELECT count(*) FROM duplicates WHERE level = 'study'") > 0
        # slice thickness is judged on CT images only, never on a dose report
        assert orphans("SELECT count(*) FROM qc JOIN excluded_instances e ON e.series_uid = "
                       "qc.uid WHERE qc.rule = 'ct_slice_thickness' AND e.sop_class_uid <> "
                       "'1.2.840.10008.5.1.4.1.1.2'") == 0
        # an excluded study's files are counted, and match its excluded_instances rows
        assert orphans("SELECT count(*) FROM studies s WHERE n_excluded <> (SELECT count(*) "
                       "FROM excluded_instances e WHERE e.study_uid = s.study_uid "
                       "AND e.batch_id = s.batch_id)") == 0
        # study_overview: one row per study, its files summed over the batches they came in
        assert orphans("SELECT count(*) - count(DISTINCT study_uid) FROM study_overview") == 0
        assert orphans("SELECT count(*) FROM study_overview o WHERE n_instances + n_excluded <> "
                       "(SELECT count(*) FROM instances i WHERE i.study_uid = o.study_uid) + "
                       "(SELECT count(*) FROM excluded_instances e WHERE e.study_uid = "
                       "o.study_uid)") == 0
        assert orphans("SELECT count(*) FROM study_overview WHERE len(batch_ids) > 1") > 0
        assert orphans("SELECT count(*) FROM studies WHERE status = 'excluded' AND "
                       "n_excluded = 0") == 0
        # modalities are those of published series; all_modalities also the excluded ones
        assert orphans("SELECT count(*) FROM studies s WHERE modalities <> coalesce((SELECT "
                       "string_agg(DISTINCT modality, ',' ORDER BY modality) FROM series x "
                       "WHERE x.study_uid = s.study_uid AND x.batch_id = s.batch_id "
                       "AND x.status = 'published'), '')") == 0
        assert orphans("SELECT count(*) FROM studies WHERE modalities <> all_modalities") > 0
