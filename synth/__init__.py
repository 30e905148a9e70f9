"""Deterministic synthetic *identified* multi-site hospital exports.

The demo, the tests and the benchmarks use `synthesize`; the quirks it plants follow the
HIRO/CRDW imaging tip sheet and are all recorded in the returned ground truth.
"""

from synth.corpus import GENERATOR_VERSION, synthesize
from synth.model import CR_WINDOW_START, CT_WINDOW_START

__all__ = ["CR_WINDOW_START", "CT_WINDOW_START", "GENERATOR_VERSION", "synthesize"]
