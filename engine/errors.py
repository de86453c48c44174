"""Domain exceptions of the engine.

Library code raises these; only :mod:`engine.cli` turns them into click errors. Every message
names the bad value, what is allowed and how to fix it, on one line.
"""
from __future__ import annotations

__all__ = [
    "EngineError",
    "InvalidInputError",
    "InvalidBoxError",
    "UnknownIdError",
    "ImageReadError",
    "AnnotationError",
    "DatasetFormatError",
    "IndexNotFoundError",
    "IndexVersionError",
    "IndexLockedError",
    "IndexReadOnlyError",
    "IndexCorruptError",
    "ModelWeightsError",
    "CheckpointError",
    "DiskFullError",
    "DataNotFoundError",
    "DataFetchError",
]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidInputError(EngineError, ValueError):
    """A user-supplied value (option, query part, number) is not allowed."""


class InvalidBoxError(InvalidInputError):
    """A box is malformed, empty, or outside its image."""


class UnknownIdError(InvalidInputError):
    """An image or region id that the index does not hold."""


class ImageReadError(EngineError):
    """An image file is missing, unreadable, corrupt or not an image."""


class AnnotationError(EngineError):
    """An annotation file (``annotations.jsonl``, ``queries.jsonl``) is missing or malformed."""


class DatasetFormatError(EngineError):
    """A public-format dataset file (Visual Genome, RefCOCO, COCO, Karpathy) is missing or malformed."""


class IndexNotFoundError(EngineError):
    """No index exists at the given directory."""


class IndexVersionError(EngineError):
    """The index was written by an incompatible version of the engine."""


class IndexLockedError(EngineError):
    """Another process is writing to the index."""


class IndexReadOnlyError(EngineError):
    """The index folder cannot be written by this process (it can still be queried)."""


class IndexCorruptError(EngineError):
    """A file of the index is damaged on disk (wrong size, checksum, NaN/inf features); ``engine check`` finds
    and repairs it."""


class ModelWeightsError(EngineError):
    """A weight file that a model needs is missing or does not fit the model."""


class CheckpointError(EngineError):
    """A checkpoint file is missing, corrupt, or does not match the model."""


class DiskFullError(EngineError):
    """A write failed because the disk (or the user's quota) is full. What was committed is kept;
    the message names what was being written and the command to re-run once there is space."""



class DataNotFoundError(EngineError):
    """A data folder the command needs (tuxpaint stamps, background photographs) is missing or holds nothing usable."""


class DataFetchError(EngineError):
    """``engine data fetch`` could not download or unpack a Debian data package (no ``apt-get``, a failed download)."""
