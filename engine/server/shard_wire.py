"""What a shard server and its caller send each other: the arguments and answers of a
:class:`~query.sharded_search.ShardSearcher` call, pickled, and unpickled only into an allowlist of types.

A shard call carries numpy arrays (query vectors, 7×7 maps, score vectors) inside the query side's frozen
dataclasses; pickle moves them as they are (protocol 5), and the restricted unpickler of the ``pickle``
documentation ("Restricting Globals") refuses any other global, so a body cannot name a function to run.
The bearer token of ``engine serve`` still guards who may call.
"""
from __future__ import annotations

import io
import pickle

from engine.errors import InvalidInputError

__all__ = ["dumps", "loads", "CONTENT_TYPE"]

CONTENT_TYPE = "application/x-engine-shard-call"
"""The media type of a shard call's body and answer."""

_ALLOWED: frozenset[tuple[str, str]] = frozenset(
    {
        ("query.request", "SearchRequest"),
        ("query.filters", "HitFilter"),
        ("query.encode", "EncodedQuery"),
        ("query.sharded_search", "ShardRanking"),
        ("query.localize", "Stage3Candidates"),
        ("query.rerank", "StageScores"),
        ("indexer.catalog", "RegionRow"),
        ("engine.results", "Hit"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.dtypes", "Float32DType"),
        ("numpy.dtypes", "Float64DType"),
        ("numpy.dtypes", "Int64DType"),
        ("builtins", "frozenset"),
        ("builtins", "set"),
        ("builtins", "slice"),
    }
)


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _ALLOWED:
            raise InvalidInputError(f"a shard call may not carry {module}.{name}; only the query side's values and numpy arrays")
        return super().find_class(module, name)


def dumps(value: object) -> bytes:
    """``value`` (arguments or an answer) as a body."""
    return pickle.dumps(value, protocol=5)


def loads(data: bytes) -> object:
    """A body back as its value; a global outside the allowlist, or a body that is not one, is an
    :class:`InvalidInputError`."""
    try:
        return _Unpickler(io.BytesIO(data)).load()
    except InvalidInputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any malformed body is the caller's mistake, one line
        raise InvalidInputError(f"the shard call's body is not one this engine sends ({type(exc).__name__}: {exc})") from None
