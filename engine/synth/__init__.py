"""Synthetic expressional-region benchmark: scenes of attributed shapes with regions, refs, captions and queries.

See ``docs/synth.md`` for the generator and the file formats.
"""
from __future__ import annotations

from engine.synth.corpus import SPLITS, SynthConfig, SynthGenerator, SynthImage, SynthSummary, generate_corpus, split_of
from engine.synth.rle import rle_area, rle_decode, rle_encode

__all__ = [
    "SynthConfig",
    "SynthSummary",
    "SynthImage",
    "SynthGenerator",
    "generate_corpus",
    "split_of",
    "SPLITS",
    "rle_encode",
    "rle_decode",
    "rle_area",
]
