"""Random row reads from an index's feature store (the 10M bench index): the memory map as it is (kernel
read-around), with MADV_RANDOM, and pread; each after dropping the page cache (needs root), then again
without a drop. Usage: python benchmarks/feature_reads.py INDEX_DIR (README, "Ten million regions")."""
from __future__ import annotations

import mmap
import os
import sys
import time
from pathlib import Path

import numpy as np

ARRAYS = {"pooled": 112, "san": 128}  # float16 values a row: what stage 2 reads for each candidate
ROWS = 2000  # about one combined query's candidates (visual shortlist + SAN's text candidates)


def drop_page_cache() -> None:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as exc:
        raise SystemExit(f"Error: cannot drop the page cache ({exc}); run this script as root") from None


def read_rows(path: Path, dim: int, mode: str, rows: np.ndarray) -> float:
    """Seconds to read ``rows`` of ``path`` (float16 rows of ``dim`` values) by ``mode``."""
    count = path.stat().st_size // (2 * dim)
    if mode == "pread":
        fd = os.open(path, os.O_RDONLY)
        start = time.perf_counter()
        out = np.empty((len(rows), dim), np.float16)
        for i, row in enumerate(rows.tolist()):
            out[i] = np.frombuffer(os.pread(fd, 2 * dim, row * 2 * dim), np.float16)
        seconds = time.perf_counter() - start
        os.close(fd)
        return seconds
    mapped = np.memmap(path, np.float16, "r", shape=(count, dim))
    if mode == "random":
        mapped._mmap.madvise(mmap.MADV_RANDOM)
    start = time.perf_counter()
    np.asarray(mapped[rows]).sum()
    return time.perf_counter() - start


def main(index_dir: Path) -> None:
    rng = np.random.default_rng(0)
    for name, dim in ARRAYS.items():
        path = index_dir / "features" / f"{name}.f16"
        count = path.stat().st_size // (2 * dim)
        for mode in ("default", "random", "pread") * 2:
            drop_page_cache()
            cold = read_rows(path, dim, mode, np.sort(rng.choice(count, ROWS, replace=False)))
            warm = read_rows(path, dim, mode, np.sort(rng.choice(count, ROWS, replace=False)))
            print(f"{name:7s} {mode:8s} after a cache drop {ROWS} rows {cold * 1000:7.1f} ms; next {ROWS} rows {warm * 1000:7.1f} ms", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not (Path(sys.argv[1]) / "features").is_dir():
        raise SystemExit("Error: pass one index directory (with a features/ folder): python benchmarks/feature_reads.py INDEX_DIR")
    main(Path(sys.argv[1]))
