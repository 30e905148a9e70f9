"""The images of a site's export in its layout: tip-sheet zip batches, a folder tree, or flat."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from synth.dicom import encode
from synth.truth import blank_entry, entry

if TYPE_CHECKING:
    from synth.site import Site

_TRUNCATED_BYTES = 300
_ZIP_LEVEL = 1  # noisy 16-bit pixels deflate ~8x faster than at level 6 for the same ratio


def write_images(site: Site, root: Path) -> list[dict]:
    """Write the site's images under `root` in its layout; the ground truth of every file."""
    return {"zip_batches": _zips, "tree": _tree, "flat": _flat}[site.layout](site, root)


def _zips(site: Site, root: Path) -> list[dict]:
    """One zip per exam in its batch folder, as the HIRO/CRDW tip sheet describes."""
    files = []
    for exam in site.exams:
        zip_key = exam.zip_key()
        path = root / zip_key
        path.parent.mkdir(parents=True, exist_ok=True)
        members = [(f"{s.folder}/IM{i + 1:04d}.dcm", s, i)
                   for s in exam.series for i in range(len(s.sop_uids))]
        if exam.readme:
            members.append(("README.txt", None, 0))
        stamp = exam.when.timetuple()[:6]
        with zipfile.ZipFile(path, "w") as zf:
            for member, series, i in sorted(members, key=lambda m: m[0]):
                key = f"{zip_key}!{member}"
                if series is None:
                    text = f"HIRO export of {exam.code} for subject {exam.patient.mrn}.\n"
                    _zip_add(zf, member, stamp, text.encode())
                    files.append(blank_entry(key, exam.batch, "not_dicom"))
                    continue
                _zip_add(zf, member, stamp, encode(site, exam, series, i))
                original = f"{exam.copy_of.zip_key()}!{member}" if exam.copy_of else None
                files.append(entry(key, exam, series, i, duplicate_of=original))
    return files


def _tree(site: Site, root: Path) -> list[dict]:
    """patient/exam/series folders of .dcm files, with a truncated file and a doubled one."""
    files = []
    for exam in site.exams:
        p = exam.patient
        exam_dir = f"{p.family}_{p.given}_{p.mrn}/{exam.when:%Y%m%d}_{exam.accession}"
        for series in exam.series:
            (root / exam_dir / series.folder).mkdir(parents=True)
            for i in range(len(series.sop_uids)):
                key = f"{exam_dir}/{series.folder}/{i + 1}.dcm"
                data = encode(site, exam, series, i)
                if site.defects["truncated"] == (exam, series, i):
                    (root / key).write_bytes(data[:_TRUNCATED_BYTES])
                    files.append(blank_entry(key, None, "truncated"))
                    site.quirks["truncated"] = {"key": key}
                    continue
                (root / key).write_bytes(data)
                twice = site.defects["same_sop_twice"] == (exam, series, i)
                files.append(entry(key, exam, series, i,
                                   quirk="same_sop_twice" if twice else None))
                if twice:
                    copy = f"{exam_dir}/{series.folder}/{i + 1}_1.dcm"
                    (root / copy).write_bytes(data)
                    files.append(entry(copy, exam, series, i, quirk="same_sop_twice",
                                       duplicate_of=key))
                    site.quirks["same_sop_twice"] = {"original": key, "copy": copy}
    return files


def _flat(site: Site, root: Path) -> list[dict]:
    """One folder of implicit-VR files with random names, an empty file and a text file."""
    instances = [(e, s, i) for e in site.exams for s in e.series
                 for i in range(len(s.sop_uids))]
    names = [f"IM_{n:06d}" for n in site.rng.sample(range(1, 1_000_000), len(instances) + 1)]
    (root / names[-1]).write_bytes(b"")
    (root / "notes.txt").write_text(
        f"PACS export from {site.stations['ct'].name}; contact radiology IT with questions.\n")
    files = [blank_entry(names[-1], None, "empty"),
             blank_entry("notes.txt", None, "not_dicom")]
    site.quirks |= {"empty": {"key": names[-1]}, "not_dicom": {"key": "notes.txt"}}
    for name, (exam, series, i) in zip(names, instances, strict=False):
        drop = site.defects["no_sop_uid"] == (exam, series, i)
        (root / name).write_bytes(encode(site, exam, series, i, implicit=True, drop_sop=drop))
        files.append(entry(name, exam, series, i, drop_sop=drop))
        if drop:
            site.quirks["no_sop_uid"] = {"key": name}
    return files


def _zip_add(zf: zipfile.ZipFile, name: str, stamp: tuple[int, ...], data: bytes) -> None:
    """Add one deflated member with a fixed timestamp and attributes (reproducible zips)."""
    info = zipfile.ZipInfo(name, date_time=stamp)
    info.create_system = 3
    info.external_attr = 0o100644 << 16
    zf.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=_ZIP_LEVEL)
