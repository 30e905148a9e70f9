"""Pixel data of synthetic images: a chest-like phantom per pixel kind, with keyed noise."""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from synth.ids import digest

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from synth.model import Series
    from synth.site import Site


def add_pixels(site: Site, ds: Dataset, series: Series, key: str) -> None:
    """Give `ds` the series' phantom image plus noise keyed by `key` (same key, same pixels)."""
    kind = series.pixel_kind
    size = site.cr_size if kind == "cr" else site.ct_size
    bits_stored = {"ct": site.ct_bits, "cr": 12, "sc": 8}[kind]
    base = _base_image(kind, size)
    rng = np.random.default_rng([site.ids.seed, digest(key)])
    pixels = base + rng.integers(0, 32, size=base.shape, dtype=base.dtype)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = base.dtype.itemsize * 8
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if kind == "ct" else 0
    if kind == "ct":
        ds.PixelSpacing = [round(350 / size, 4)] * 2
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
    elif kind == "cr":
        ds.ImagerPixelSpacing = [round(430 / size, 4)] * 2
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = pixels.tobytes()


@lru_cache(maxsize=6)
def _base_image(kind: str, size: int) -> np.ndarray:
    """Noise-free chest-like phantom for a pixel kind ('ct' int16, 'cr' uint16, 'sc' uint8)."""
    y, x = np.ogrid[-1:1:size * 1j, -1:1:size * 1j]
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 <= 1
    lungs = ((np.abs(x) - 0.38) / 0.27) ** 2 + (y / 0.45) ** 2 <= 1
    if kind == "sc":
        image = np.where((np.arange(size) // 8 % 2 == 0)[:, None] & body, 180, 20)
        dtype = np.dtype("u1")
    else:
        background, tissue, lung = (0, 1024, 200) if kind == "ct" else (300, 2400, 1300)
        image = np.where(lungs, lung, np.where(body, tissue, background))
        dtype = np.dtype("<i2" if kind == "ct" else "<u2")
    image = image.astype(dtype)
    image.setflags(write=False)
    return image
