"""The QC contact sheet of a batch: one small thumbnail per published series and an HTML page
that lists flagged series first, so a reviewer can spot burned-in text or wrong anatomy.

This is the one place pixels are decoded, one image per series, for people to look at: the one
pass renders the thumbnail from the de-identified file's bytes while they are in memory; the
page goes under ``reports/<site>/<batch>/`` in the release.
"""

from __future__ import annotations

import html
import io
from collections import defaultdict

import numpy as np
import pyarrow as pa
from PIL import Image
from pydicom import dcmread
from pydicom.multival import MultiValue

THUMBNAIL_PX = 128


def _first(value) -> float:
    return float(value[0] if isinstance(value, MultiValue | list | tuple) else value)


def _mean_pooled(pixels: np.ndarray, step: int) -> np.ndarray:
    """``pixels`` averaged over ``step`` x ``step`` blocks (edges that do not fill a block
    dropped), as float: thin burned-in text fades but does not vanish, as it would when
    striding. A block is never taller or wider than the image."""
    step = min(step, pixels.shape[0], pixels.shape[1])
    if step <= 1:
        return pixels.astype(np.float64)
    rows, cols = (pixels.shape[0] // step) * step, (pixels.shape[1] // step) * step
    blocks = pixels[:rows, :cols].reshape(rows // step, step, cols // step, step,
                                          *pixels.shape[2:])
    return blocks.mean(axis=(1, 3))


def _windowed(ds) -> np.ndarray:
    """8-bit greyscale of the image's first frame, averaged down to no more than twice the
    thumbnail's size: the stored window, else the 1-99th percentiles of the rescaled values;
    MONOCHROME1 inverted."""
    stored = ds.pixel_array
    if stored.ndim == 4 or (stored.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1):
        stored = stored[0]
    pixels = _mean_pooled(stored, -(-max(stored.shape[:2]) // (2 * THUMBNAIL_PX)))
    if pixels.ndim == 3:  # colour: luminance
        pixels = pixels[..., :3] @ np.array([0.299, 0.587, 0.114])
    pixels = pixels * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        center, width = _first(center), _first(width)
        low, high = center - width / 2, center + width / 2
    else:
        low, high = np.percentile(pixels, [1, 99])
    scaled = np.clip((pixels - low) / max(high - low, 1e-6), 0, 1) * 255
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled.astype(np.uint8)


def thumbnail_png(data: bytes) -> bytes | None:
    """A PNG thumbnail of a DICOM file's bytes, or None when its pixels cannot be decoded
    here."""
    try:
        ds = dcmread(io.BytesIO(data))
        image = Image.fromarray(_windowed(ds))
    except Exception:  # noqa: BLE001 - a compressed syntax without a decoder: no thumbnail
        return None
    image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def contact_sheet(site_id: str, batch_id: str, series: pa.Table, qc: pa.Table,
                  thumbnails: dict[str, bytes]) -> dict[str, bytes]:
    """Release-relative path -> bytes of the batch's thumbnails and its HTML page.

    ``thumbnails`` maps series UIDs to the PNG of one of their images (the middle instance),
    rendered while the one pass had the file in memory.
    """
    base = f"reports/{site_id}/{batch_id}"
    flags = defaultdict(list)
    for row in qc.to_pylist():
        if row["outcome"] == "flagged":
            flags[row["uid"]].append(f"{row['rule']}: {row['detail']}")
    published = [s for s in series.to_pylist() if s["status"] == "published"]
    published.sort(key=lambda s: (not flags.get(s["series_uid"]), s["study_uid"],
                                  s["series_uid"]))
    out: dict[str, bytes] = {}
    rows = []
    for s in published:
        png = thumbnails.get(s["series_uid"])
        if png is not None:
            out[f"{base}/thumbs/{s['series_uid']}.png"] = png
            cell = f'<img src="thumbs/{s["series_uid"]}.png" alt="series thumbnail">'
        else:
            cell = "no preview (pixel data not decodable here)"
        notes = "<br>".join(html.escape(f) for f in flags.get(s["series_uid"], [])) or ""
        rows.append(
            f"<tr{' class=flagged' if notes else ''}><td>{cell}</td>"
            f"<td>{html.escape(s['modality'] or '')}</td>"
            f"<td>{html.escape(s['description'] or '')}</td>"
            f"<td>{s['n_instances']}</td><td>{html.escape(s['study_uid'])}<br>"
            f"{html.escape(s['series_uid'])}</td><td>{notes}</td></tr>"
        )
    flagged = sum(1 for s in published if flags.get(s["series_uid"]))
    out[f"{base}/contact-sheet.html"] = (
        "<!doctype html><meta charset=utf-8>"
        f"<title>QC contact sheet {html.escape(site_id)} {html.escape(batch_id)}</title>"
        "<style>body{font-family:sans-serif}td{vertical-align:top;padding:4px}"
        ".flagged{background:#fff3cd}</style>"
        f"<h1>QC contact sheet: {html.escape(site_id)} / {html.escape(batch_id)}</h1>"
        f"<p>{len(published)} published series, {flagged} flagged (listed first). Look for "
        "burned-in text and wrong anatomy.</p><table><tr><th>image</th><th>modality</th>"
        "<th>description</th><th>files</th><th>study / series</th><th>flags</th></tr>"
        + "".join(rows) + "</table>\n"
    ).encode("utf-8")
    return out
