"""What :class:`engine.api.Engine` does on a sharded index (``indexer/shards.py``, ``docs/sharding.md``).

Indexing runs the ordinary pipeline once per hashed shard, each over the images hashed to it; searching
fans out through :class:`query.sharded_search.ShardedSearch` (to the shards in this process, or to Ray
actors with ``EngineConfig.ray``); listings, ``engine info``, ``engine remove`` and ``engine compact``
cover every shard, with global ids (``shard · 2^40 + id``).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from engine.errors import IndexNotFoundError, InvalidInputError, UnknownIdError
from indexer.shards import ShardLayout, global_id, split_id

if TYPE_CHECKING:
    from engine.api import Engine
    from engine.config import IndexConfig
    from indexer.catalog import ImageEntry, RegionRow
    from indexer.compaction import CompactSummary
    from indexer.pipeline import IndexSummary, ProgressCallback
    from indexer.removal import RemoveSummary
    from indexer.store import IndexInfo, IndexStore
    from query.sharded_search import ShardedSearch

__all__ = ["ShardedIndex"]

log = logging.getLogger(__name__)


class ShardedIndex:
    """A sharded index as one engine sees it: its layout, its shards' readers and its fanned-out search."""

    def __init__(self, layout: ShardLayout, engine: Engine) -> None:
        self.layout = layout
        self.engine = engine
        self._readers: list[IndexStore] | None = None
        self._search: ShardedSearch | None = None
        self._ray = None  # the Ray fan-out, when searching through Ray actors

    # -- reading ------------------------------------------------------------------------------
    def readers(self) -> list[IndexStore]:
        """Each shard opened read-only (checked to be of this engine's visual key), in shard order."""
        if self._readers is None:
            from indexer.store import IndexStore

            readers = []
            try:
                for path in self.layout.paths:
                    try:
                        readers.append(IndexStore.open(path, config=self.engine.config.store, visual_key=self.engine.visual_key))
                    except IndexNotFoundError:
                        raise IndexNotFoundError(f"shard {path} of index {self.layout.root} holds no index yet; run `engine index CORPUS --index {self.layout.root}` (or attach an index built elsewhere)") from None
            except BaseException:
                for reader in readers:
                    reader.close()
                raise
            self._readers = readers
        return self._readers

    def regions(self) -> int:
        """Regions over all shards (what the default stage-2 model is chosen by)."""
        return sum(r.vector_count() for r in self.readers())

    def region(self, region_id: int) -> RegionRow:
        shard, local = split_id(region_id)
        rows = self.readers()[shard].regions([local]) if shard < len(self.layout.shards) else []
        if not rows:
            raise UnknownIdError(f"region {region_id} is not in index {self.layout.root}; region ids come from earlier hits (engine query --json)")
        return replace(rows[0], id=region_id, image_id=global_id(shard, rows[0].image_id))

    def image(self, image_id: int) -> ImageEntry:
        shard, local = split_id(image_id)
        entry = self.readers()[shard].image(local) if shard < len(self.layout.shards) else None
        if entry is None:
            raise UnknownIdError(f"image {image_id} is not in index {self.layout.root}; image ids come from the image listing (GET /api/images)")
        return replace(entry, id=image_id)

    def images(self, *, offset: int = 0, limit: int = 100) -> list[ImageEntry]:
        """Indexed images in global id order (shard by shard), ``limit`` from the ``offset``-th."""
        out: list[ImageEntry] = []
        for shard, reader in enumerate(self.readers()):
            if len(out) >= limit:
                break
            count = reader.info().images
            if offset >= count:
                offset -= count
                continue
            out += [replace(e, id=global_id(shard, e.id)) for e in reader.images(offset=offset, limit=limit - len(out))]
            offset = 0
        return out

    def info(self) -> IndexInfo:
        """The shards' counts summed; index type, device, dims and models of the first shard; ``shards``."""
        infos = [r.info() for r in self.readers()]
        first = infos[0]
        total = {name: sum(getattr(i, name) for i in infos) for name in ("images", "regions", "errors", "vectors", "runs", "next_row", "dead_rows", "dead_bytes")}
        return replace(first, path=self.layout.root, shards=[str(p) for p in self.layout.paths], **total)

    def errors(self) -> list[tuple[str, str]]:
        return [e for r in self.readers() for e in r.errors()]

    # -- searching ----------------------------------------------------------------------------
    def search(self) -> ShardedSearch:
        """The fanned-out search: Ray actors when ``EngineConfig.ray`` names a cluster, else this process."""
        if self._search is None:
            from query.sharded_search import LocalShards, ShardedSearch, ShardSearcher

            if self.engine.config.ray:
                from engine.distributed.ray_search import RayShards

                from engine.device import resolve_device

                grn = self.engine._grn_path(resolve_device(self.engine.config.device))
                self._ray = RayShards.start(self.engine.config.ray, self.layout.paths, self.engine.config, grn_checkpoint=grn)
                fanout = self._ray
            else:
                from query.pipeline import QueryPipeline

                fanout = LocalShards([ShardSearcher(QueryPipeline(store=r, models=self.engine, config=self.engine.config), i) for i, r in enumerate(self.readers())])
            self._search = ShardedSearch(fanout, shortlist=self.engine.config.shortlist, stage3_weights=self._stage3_weights)
        return self._search

    def _stage3_weights(self):  # -> query.localize.Stage3Weights | None
        """Stage 3's fitted weights (read without loading its models), ``None`` when stage 3 is off."""
        from query.localize import load_stage3_weights

        return (self.engine.config.stage3_weights or load_stage3_weights()) if self.engine.config.stage3 else None

    def first_pipeline(self):  # -> query.pipeline.QueryPipeline
        """A pipeline over the first shard: what encodes query regions (the same models for every shard)."""
        from query.pipeline import QueryPipeline

        return QueryPipeline(store=self.readers()[0], models=self.engine, config=self.engine.config)

    # -- writing ------------------------------------------------------------------------------
    def index(self, corpus: Path, config: IndexConfig, *, progress: bool, on_progress: ProgressCallback | None) -> IndexSummary:
        """Index ``corpus`` into the hashed shards, each image into the shard it hashes to; the run summaries summed."""
        if config.shards is not None and config.shards != len(self.layout.hashed):
            raise InvalidInputError(f"index {self.layout.root} has {len(self.layout.hashed)} hashed shards, not {config.shards}; leave out --shards to index into it, or index into a new directory")
        self.close()
        start = time.perf_counter()
        cluster = None
        if config.ray:  # one cluster for every shard's workers (each shard's run joins it)
            from engine.distributed.ray_cluster import RayCluster

            cluster = RayCluster.connect(config.ray)
        try:
            return self._index_shards(corpus, config, start, progress=progress, on_progress=on_progress)
        finally:
            if cluster is not None:
                cluster.close()

    def _index_shards(self, corpus: Path, config: IndexConfig, start: float, *, progress: bool, on_progress: ProgressCallback | None) -> IndexSummary:
        from indexer.pipeline import IndexSummary

        hashed = self.layout.hashed
        summaries = []
        done_before = 0
        total_planned: dict[int, int] = {}
        for n, position in enumerate(hashed):
            def report(done: int, total: int, position: int = position) -> None:
                total_planned[position] = total
                if on_progress is not None:
                    on_progress(done_before + done, sum(total_planned.values()))

            summary = self.engine.index_into(
                self.layout.paths[position], corpus, config, progress=progress, on_progress=report,
                select=lambda path, position=position: self.layout.shard_of(path) == position, label=f"shard {n + 1}/{len(hashed)}",
            )
            done_before += total_planned.get(position, 0)
            summaries.append(summary)
        counts = {name: sum(getattr(s, name) for s in summaries) for name in ("processed", "unchanged", "removed", "regions_added", "errors")}
        return IndexSummary(seconds=round(time.perf_counter() - start, 3), **counts)

    def remove(self, paths: Sequence[Path | str]) -> RemoveSummary:
        """Remove the images at or under ``paths`` from every shard holding some; all or nothing, as one index."""
        from indexer.removal import RemoveSummary, match_images
        from indexer.store import IndexStore

        if not paths:
            raise InvalidInputError("no paths to remove; pass image files or folders of indexed images, e.g. `engine remove corpus/old/`")
        self.close()
        stores = [IndexStore.open(p, writable=True, config=self.engine.config.store) for p in self.layout.paths]
        try:
            matched: list[dict[str, None]] = [{} for _ in stores]
            for path in paths:
                found = [match_images(store, path) for store in stores]
                if not any(found):
                    raise InvalidInputError(f"{path} is not in the index at {self.layout.root}: no image is indexed at or under it; nothing was removed")
                for shard, images in enumerate(found):
                    matched[shard].update(dict.fromkeys(images))
            images = errors = regions = 0
            for store, wanted in zip(stores, matched):
                if wanted:
                    deleted = store.delete_images(list(wanted))
                    store.save_vectors()
                    images, errors, regions = images + deleted.indexed, errors + deleted.errors, regions + deleted.regions
            return RemoveSummary(images=images, errors=errors, regions=regions, paths=tuple(sorted(p for m in matched for p in m)))
        finally:
            for store in stores:
                store.close()

    def compact(self) -> CompactSummary:
        """Compact every shard; the byte counts summed (``generation``: the highest shard's)."""
        from indexer.store import IndexStore

        self.close()
        summaries = []
        for path in self.layout.paths:
            with IndexStore.open(path, writable=True, config=self.engine.config.store) as store:
                summaries.append(store.compact())
        fields = ("rows_before", "rows_after", "feature_bytes_before", "feature_bytes_after", "vector_bytes_before", "vector_bytes_after")
        return replace(summaries[0], generation=max(s.generation for s in summaries), compacted=any(s.compacted for s in summaries), **{f: sum(getattr(s, f) for s in summaries) for f in fields})

    def close(self) -> None:
        if self._ray is not None:
            self._ray.close()
            self._ray = None
        self._search = None
        for reader in self._readers or ():
            reader.close()
        self._readers = None
