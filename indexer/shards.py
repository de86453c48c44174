"""A sharded index: one directory holding ``shards.json`` and N ordinary index directories, split by image.

``engine index CORPUS --index DIR --shards N`` creates N *hashed* shards (``shard-000`` …): each image
goes to the shard ``sha256(absolute path) mod N`` (:meth:`ShardLayout.shard_of`), so a re-run sends
every image back to the shard that holds it and resumes, updates and deletes exactly as one index
does. ``engine shards add DIR OTHER`` attaches a shard built elsewhere (any ordinary index of the same
visual key, e.g. indexed on another machine): it is searched with the others, and later
``engine index`` runs leave it alone.

Ids: a region or image id of shard ``s`` with id ``i`` in that shard's own database is
``s · 2^40 + i`` (:func:`global_id`) — unique over the shards, stable when shards are added, and
exact in JSON and JavaScript (< 2^53 for 8,192 shards). An unsharded index keeps its ids.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from engine.errors import IndexVersionError, InvalidInputError

__all__ = ["SHARDS_FILE", "SHARD_ID_BITS", "MAX_SHARDS", "ShardEntry", "ShardLayout", "global_id", "split_id"]

SHARDS_FILE = "shards.json"
SHARDS_VERSION = 1
SHARD_ID_BITS = 40
MAX_SHARDS = 8192  # global ids stay below 2^53 (exact in JSON numbers read by JavaScript)


def global_id(shard: int, local: int) -> int:
    """The id over all shards of id ``local`` in shard ``shard``'s own database."""
    return (int(shard) << SHARD_ID_BITS) | int(local)


def split_id(value: int) -> tuple[int, int]:
    """``(shard, local id)`` of a global id (:func:`global_id`)."""
    value = int(value)
    return value >> SHARD_ID_BITS, value & ((1 << SHARD_ID_BITS) - 1)


@dataclass(frozen=True)
class ShardEntry:
    """One shard: its index directory (``path``: relative to the sharded index's folder, or absolute for a
    shard attached from elsewhere) and whether ``engine index`` hashes images into it."""

    path: str
    hashed: bool = True


@dataclass(frozen=True)
class ShardLayout:
    """The ``shards.json`` of a sharded index at ``root``."""

    root: Path
    shards: tuple[ShardEntry, ...]

    # -- reading and writing -------------------------------------------------------------------
    @classmethod
    def read(cls, root: Path | str) -> "ShardLayout | None":
        """The layout of the sharded index at ``root``; ``None`` when ``root`` is not one."""
        root = Path(root).expanduser()
        path = root / SHARDS_FILE
        if not path.is_file():
            return None
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            if payload.get("version") != SHARDS_VERSION:
                raise IndexVersionError(f"{path} is of shard layout version {payload.get('version')!r}; this engine reads version {SHARDS_VERSION}")
            entries = tuple(ShardEntry(path=str(s["path"]), hashed=bool(s["hashed"])) for s in payload["shards"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise IndexVersionError(f"{path} cannot be read as a shard list ({exc}); restore it, or index into a new directory") from None
        if not entries:
            raise IndexVersionError(f"{path} lists no shards; restore it, or index into a new directory")
        return cls(root=root, shards=entries)

    @classmethod
    def create(cls, root: Path | str, count: int) -> "ShardLayout":
        """A new sharded index of ``count`` hashed shards at ``root`` (the shard folders are made by indexing)."""
        if not 1 <= count <= MAX_SHARDS:
            raise InvalidInputError(f"--shards must be 1 to {MAX_SHARDS}, got {count}")
        root = Path(root).expanduser()
        if root.exists() and not root.is_dir():
            raise InvalidInputError(f"{root} is a file; a sharded index is a folder")
        if root.is_dir() and any(root.iterdir()):
            raise InvalidInputError(f"{root} is not empty; a sharded index is created in a new or empty folder (or index into it without --shards)")
        layout = cls(root=root, shards=tuple(ShardEntry(path=f"shard-{i:03d}") for i in range(count)))
        layout.write()
        return layout

    def write(self) -> None:
        """Write ``shards.json`` atomically (a crash leaves the old file or the new one)."""
        self.root.mkdir(parents=True, exist_ok=True)
        payload = {"version": SHARDS_VERSION, "shards": [{"path": s.path, "hashed": s.hashed} for s in self.shards]}
        tmp = self.root / f".{SHARDS_FILE}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(payload, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.root / SHARDS_FILE)

    def attach(self, shard_dir: Path | str) -> "ShardLayout":
        """This layout with the index at ``shard_dir`` added as a searched, not hashed, shard (written)."""
        if len(self.shards) >= MAX_SHARDS:
            raise InvalidInputError(f"index {self.root} already has {MAX_SHARDS} shards, the most one index can have")
        shard_dir = Path(shard_dir).expanduser().resolve()
        if shard_dir in {p.resolve() for p in self.paths}:
            raise InvalidInputError(f"{shard_dir} is already a shard of {self.root}")
        try:
            name = str(shard_dir.relative_to(self.root.resolve()))
        except ValueError:
            name = str(shard_dir)
        layout = ShardLayout(root=self.root, shards=(*self.shards, ShardEntry(path=name, hashed=False)))
        layout.write()
        return layout

    # -- what it holds -------------------------------------------------------------------------
    @property
    def paths(self) -> list[Path]:
        """Each shard's index directory, in shard order."""
        return [Path(s.path) if Path(s.path).is_absolute() else self.root / s.path for s in self.shards]

    @property
    def hashed(self) -> list[int]:
        """The positions of the shards ``engine index`` writes to."""
        return [i for i, s in enumerate(self.shards) if s.hashed]

    def shard_of(self, image_path: Path | str) -> int:
        """The hashed shard (its position) that holds the image at ``image_path`` (absolute path, resolved)."""
        hashed = self.hashed
        if not hashed:
            raise InvalidInputError(f"index {self.root} has no shard that `engine index` writes to (only attached ones)")
        digest = hashlib.sha256(str(Path(image_path).resolve()).encode("utf-8")).hexdigest()
        return hashed[int(digest[:16], 16) % len(hashed)]
