"""``python -m engine.demo CORPUS``: print the query options of the corpus's benchmark query with the most positives.
``python -m engine.demo --world``: print the ``engine synth`` options of the demo corpus: the stamps world
(real objects on real photographs) when its Debian data is in the cache or can be fetched, the shapes
world otherwise (with the reason on stderr).

Used by the Quick start (``make demo``) to query a synthetic corpus with one of its own described regions.
"""
from __future__ import annotations

import sys
from pathlib import Path

from engine.datasets.annotations import read_queries
from engine.errors import EngineError


def demo_query_args(corpus: Path) -> list[str]:
    """``["--image", PATH, "--region", "x1,y1,x2,y2"]`` for the query of ``corpus/queries.jsonl`` with the most
    positives (the first of those): the thing shown in the most other images, so that the picture has
    several right hits to show (the first query of the stamps demo corpus is a small, half-hidden bird
    with one positive, itself partly hidden)."""
    queries = read_queries(corpus)
    if not queries:
        raise EngineError(f"{corpus / 'queries.jsonl'} holds no queries; generate the corpus with `engine synth`")
    q = max(queries, key=lambda query: len(query.positives))  # max keeps the first of equals
    return ["--image", str(corpus / q.image), "--region", ",".join(f"{v:g}" for v in q.region)]


STAMPS_DEMO = ["--world", "stamps", "--images", "400"]
SHAPES_DEMO = ["--world", "shapes", "--images", "200"]


def demo_world_args() -> list[str]:
    """The ``engine synth`` options of the demo corpus: real photographs when the stamps can be had, else shapes."""
    from engine.data_fetch import ensure_stamps

    try:
        ensure_stamps(log=lambda line: print(line, file=sys.stderr))
    except EngineError as exc:
        print(f"the real-photo data is not available ({exc}); the demo uses the shapes world", file=sys.stderr)
        return SHAPES_DEMO
    return STAMPS_DEMO


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args == ["--world"]:
        print(" ".join(demo_world_args()))
        return 0
    if len(args) != 1:
        print("usage: python -m engine.demo CORPUS | --world", file=sys.stderr)
        return 2
    try:
        print(" ".join(demo_query_args(Path(args[0]))))
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
