"""``labels import`` as one step: read every input (FHIR JSON, CSV, DICOM SEG), check it, and
append what passes to the release's labels and segmentations tables."""

from __future__ import annotations

from pathlib import Path

import duckdb

from tasks.deidentify.profile import Profile
from tasks.labels.importer import (
    ImportResult,
    LabelChecker,
    LabelRejected,
    Rejection,
    append_labels,
    input_files,
    read_csv,
    read_fhir,
)
from tasks.labels.segmentations import (
    PublishedImages,
    check_segmentation,
    publish_segmentations,
)
from tasks.zones import Release


def import_inputs(release: Release, con: duckdb.DuckDBPyConnection, checker: LabelChecker,
                  profile: Profile, paths: list[Path]) -> ImportResult:
    """Import the files named (folders are searched); each rejection is named in the result.
    SEG files must pass ``profile``'s checks of released files."""
    result = ImportResult()
    rows: list[dict] = []
    segs: list[tuple[dict, bytes]] = []
    images = None
    for path in input_files(paths):
        name = path.name
        data = path.read_bytes()
        suffix = path.suffix.lower()
        if suffix == ".json":
            rows += read_fhir(checker, name, data, result)
        elif suffix == ".csv":
            rows += read_csv(checker, name, data, result)
        elif suffix == ".dcm" or data[128:132] == b"DICM":
            images = images or PublishedImages.from_catalog(con)
            try:
                row, _ = check_segmentation(data, checker.studies, images, profile,
                                            checker.identifiers)
                segs.append((row, data))
            except LabelRejected as err:
                result.rejected.append(Rejection(name, str(err)))
        else:
            result.rejected.append(Rejection(name, "not a .json, .csv or DICOM file"))
    append_labels(release, rows, result)
    result.segmentations = publish_segmentations(release, segs)
    return result
