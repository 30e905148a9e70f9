"""Deterministic synthetic *identified* multi-site hospital exports, and the config that runs them.

The demo, the tests and the benchmarks use `synthesize` and `demo_config`; the quirks it plants
follow the HIRO/CRDW imaging tip sheet and are all recorded in the returned ground truth.
"""

from synth.config import demo_config
from synth.corpus import GENERATOR_VERSION, synthesize
from synth.model import CR_WINDOW_START, CT_WINDOW_START

__all__ = ["CR_WINDOW_START", "CT_WINDOW_START", "GENERATOR_VERSION", "demo_config", "synthesize"]
