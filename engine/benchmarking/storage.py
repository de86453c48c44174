"""Disk per region of an index, by part (SQLite, each FAISS file, each feature array), and what the
index would take without the parts a vector-only stage 2 does not read."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DiskUsage", "disk_usage"]


@dataclass(frozen=True)
class DiskUsage:
    """Bytes of every file of an index directory, grouped: ``database`` (engine.db and its WAL),
    ``faiss`` (``vectors*.faiss`` by name), ``features`` (``features/*.f16`` by array name), ``other``
    (the saved region table ``regions.npz`` and anything else)."""

    regions: int
    database: int
    faiss: dict[str, int]
    features: dict[str, int]
    other: int

    @property
    def total(self) -> int:
        return self.database + sum(self.faiss.values()) + sum(self.features.values()) + self.other

    @property
    def bytes_per_region(self) -> float:
        return self.total / max(self.regions, 1)

    def without(self, *arrays: str) -> int:
        """Total bytes when the feature arrays ``arrays`` are not stored."""
        return self.total - sum(v for k, v in self.features.items() if k in arrays)

    def to_dict(self) -> dict[str, Any]:
        per = max(self.regions, 1)
        return {
            "regions": self.regions,
            "total_bytes": self.total,
            "bytes_per_region": round(self.bytes_per_region, 1),
            "database_bytes_per_region": round(self.database / per, 1),
            "faiss_bytes_per_region": {k: round(v / per, 1) for k, v in sorted(self.faiss.items())},
            "feature_bytes_per_region": {k: round(v / per, 1) for k, v in sorted(self.features.items())},
            "other_bytes_per_region": round(self.other / per, 1),  # regions.npz (the saved region table), built.json
            "bytes_per_region_without_maps": round(self.without("maps") / per, 1),
        }


def disk_usage(index_dir: Path, regions: int) -> DiskUsage:
    """Sizes of the files under ``index_dir`` (apparent sizes; the feature files are dense)."""
    root = Path(index_dir)
    database = 0
    faiss: dict[str, int] = {}
    features: dict[str, int] = {}
    other = 0
    for path in root.rglob("*"):
        if not path.is_file() or path.name == ".lock":
            continue
        size = path.stat().st_size
        if path.name.startswith("engine.db"):
            database += size
        elif path.suffix == ".faiss":
            faiss[path.stem] = faiss.get(path.stem, 0) + size
        elif path.parent.name == "features":
            name = path.name.split(".")[0]
            features[name] = features.get(name, 0) + size
        else:
            other += size
    return DiskUsage(regions=int(regions), database=database, faiss=faiss, features=features, other=other)
