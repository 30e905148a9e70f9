"""Run one peer de-identifier over a folder, inside the peers' own virtualenv.

Usage: python peer_driver.py TOOL IN_DIR OUT_DIR  ->  prints {"seconds": s, "files": n}
The clock covers processing only (imports and interpreter start excluded), as for radrepo.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def dicognito(files: list[Path], out: Path) -> None:
    import pydicom
    from dicognito.anonymizer import Anonymizer

    anonymizer = Anonymizer()
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        anonymizer.anonymize(ds)
        ds.save_as(out / f"{i:06d}.dcm")


def deid(files: list[Path], out: Path) -> None:
    from deid.config import DeidRecipe
    from deid.dicom import replace_identifiers

    replace_identifiers(dicom_files=[str(f) for f in files], deid=DeidRecipe(), save=True,
                        output_folder=str(out), overwrite=True)


def dicom_anonymizer(files: list[Path], out: Path) -> None:
    from dicomanonymizer import anonymize

    for i, path in enumerate(files):
        anonymize(str(path), str(out / f"{i:06d}.dcm"), {}, True)


TOOLS = {"dicognito": dicognito, "deid": deid, "dicom-anonymizer": dicom_anonymizer}


def main() -> None:
    tool, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    files = sorted(p for p in src.rglob("*") if p.is_file())
    dst.mkdir(parents=True, exist_ok=True)
    run = TOOLS[tool]
    start = time.perf_counter()
    run(files, dst)
    seconds = time.perf_counter() - start
    written = sum(1 for p in dst.rglob("*") if p.is_file())
    print(json.dumps({"seconds": seconds, "files": len(files), "written": written}))


if __name__ == "__main__":
    main()
