"""Indexing throughput on Ray: one process against 1, 2, 4 local Ray workers, and the bytes each image moves.

Each configuration indexes the same images (the first ``--images`` of ``--corpus``, linked into a fresh
folder) into a fresh index with the engine's defaults (RPN proposals, every array); the rate counts the
images committed from the first commit to the last (``steady``, what a long run sees) and from the start
(``overall``: scan, model loading, cluster and worker start-up included). A local cluster of N workers
is ``--ray local:N`` (N logical CPUs, one per worker, each worker one torch thread), whatever the
machine's cores. Bytes moved: a pickled ``ExtractedBatch`` (what a worker sends back) per image, with
and without the 7×7 maps.

    python benchmarks/ray_indexing.py --corpus data/stamps --images 48 --workers 1 2 4 \
        --json benchmarks/results/ray-indexing.json
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _corpus(source: Path, images: int, into: Path) -> Path:
    """A folder of links to the first ``images`` images of ``source`` (no annotations: RPN proposals)."""
    files = sorted(p for p in (source / "images").iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:images]
    folder = into / "images"
    folder.mkdir(parents=True)
    for path in files:
        os.symlink(path.resolve(), folder / path.name)
    return into


def _run(corpus: Path, index_dir: Path, *, ray: str | None, workers: int | None, batch_size: int) -> dict:
    from engine.api import Engine
    from engine.config import EngineConfig, IndexConfig

    first: list[float] = []
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done and not first:
            first.append((time.perf_counter(), done))

    engine = Engine(index_dir, config=EngineConfig(device="cpu"))
    summary = engine.index(corpus, config=IndexConfig(batch_size=batch_size, ray=ray, ray_workers=workers), on_progress=progress)
    end = time.perf_counter()
    engine.close()
    (t_first, n_first), = first
    return {
        "images": summary.processed,
        "regions": summary.regions_added,
        "seconds": round(end - start, 2),
        "first_commit_s": round(t_first - start, 2),
        "overall_images_per_s": round(summary.processed / (end - start), 2),
        "steady_images_per_s": round((summary.processed - n_first) / max(end - t_first, 1e-9), 2),
    }


def _bytes_per_image(corpus: Path, batch_size: int) -> dict:
    """Pickled worker results per image, with the 7×7 maps and without (``--no-maps``)."""
    from engine.api import Engine
    from engine.config import EngineConfig
    from indexer.proposal_sources import create_proposal_provider
    from indexer.scan import list_image_files

    engine = Engine(config=EngineConfig(device="cpu"))
    entries = list_image_files(corpus)[:batch_size]
    proposals = create_proposal_provider("auto", corpus, backbone=engine.extractor.backbone)
    shapes = engine._array_shapes()
    out = {}
    for name, arrays in (("maps", tuple(shapes)), ("no_maps", tuple(a for a in shapes if a != "maps"))):
        extracted = engine.batch_extraction(arrays, proposals)(entries)
        out[name] = round(len(pickle.dumps(extracted, protocol=5)) / len(entries))
        out["regions_per_image"] = round(extracted.regions / len(entries), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=ROOT / "data" / "stamps")
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not (args.corpus / "images").is_dir():
        sys.exit(f"{args.corpus}/images does not exist; make a corpus with: engine synth {args.corpus} --world stamps")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = _corpus(args.corpus, args.images, tmp / "corpus")
        rows = [{"mode": "one process", "workers": 0, **_run(corpus, tmp / "idx-0", ray=None, workers=None, batch_size=args.batch_size)}]
        print(json.dumps(rows[-1]), flush=True)
        for workers in args.workers:
            shutil.rmtree(tmp / f"idx-{workers}", ignore_errors=True)
            rows.append({"mode": f"ray local:{workers}", "workers": workers, **_run(corpus, tmp / f"idx-{workers}", ray=f"local:{workers}", workers=workers, batch_size=args.batch_size)})
            print(json.dumps(rows[-1]), flush=True)
        moved = _bytes_per_image(corpus, args.batch_size)
    result = {"corpus": str(args.corpus), "images": args.images, "batch_size": args.batch_size, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(), "runs": rows, "bytes_per_image": moved}
    print(json.dumps(moved))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
