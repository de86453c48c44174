"""``python -m engine.demo CORPUS``: print the query options of the corpus's first benchmark query.

Used by the Quick start (``make demo``) to query a synthetic corpus with one of its own described regions.
"""
from __future__ import annotations

import sys
from pathlib import Path

from engine.datasets.annotations import read_queries
from engine.errors import EngineError


def demo_query_args(corpus: Path) -> list[str]:
    """``["--image", PATH, "--region", "x1,y1,x2,y2"]`` for the first query of ``corpus/queries.jsonl``."""
    queries = read_queries(corpus)
    if not queries:
        raise EngineError(f"{corpus / 'queries.jsonl'} holds no queries; generate the corpus with `engine synth`")
    q = queries[0]
    return ["--image", str(corpus / q.image), "--region", ",".join(f"{v:g}" for v in q.region)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m engine.demo CORPUS", file=sys.stderr)
        return 2
    try:
        print(" ".join(demo_query_args(Path(args[0]))))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
