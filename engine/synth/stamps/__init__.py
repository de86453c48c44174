"""The stamps world: tuxpaint stamps (real objects with English descriptions) composited onto real photographs.

See ``docs/synth.md`` (Stamps world) for the recipe and the files.
"""
from __future__ import annotations

from engine.synth.stamps.catalog import Stamp, load_catalog, stamp_split
from engine.synth.stamps.world import StampsConfig, StampsGenerator, StampsSummary, generate_stamps_corpus

__all__ = ["Stamp", "load_catalog", "stamp_split", "StampsConfig", "StampsGenerator", "StampsSummary", "generate_stamps_corpus"]
