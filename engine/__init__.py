"""Region retrieval search engine.

Heavy modules (torch, faiss) are imported lazily so that ``engine --help`` and the data layer stay fast.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.errors import EngineError

__all__ = ["Engine", "EngineError", "__version__"]
__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from engine.api import Engine


def __getattr__(name: str) -> Any:
    if name == "Engine":
        from engine.api import Engine

        return Engine
    raise AttributeError(name)
