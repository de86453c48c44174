"""A sharded index searched by Ray actors, one per shard (``EngineConfig.ray``, ``engine query --ray``).

Each :class:`ShardActor` opens its shard with its own engine (same configuration, models loaded once) and
answers :class:`query.sharded_search.ShardSearcher`'s calls; :class:`RayShards` is the
:class:`~query.sharded_search.ShardFanout` that calls them all at once and waits. Requests, encoded
queries and hits travel as plain values (a request's image is read by the actor that encodes it, so a
real cluster needs the query image where that actor runs: the first shard's, or the region id's).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from engine.config import EngineConfig
from engine.distributed.ray_cluster import RayCluster, import_ray, unwrap_ray_error

__all__ = ["ShardActor", "RayShards"]

log = logging.getLogger(__name__)


class ShardActor:
    """A Ray actor holding one shard's :class:`~query.sharded_search.ShardSearcher`."""

    def __init__(self, shard_dir: Path, position: int, config: EngineConfig) -> None:
        from engine.api import Engine
        from query.sharded_search import ShardSearcher

        self.engine = Engine(shard_dir, config=config)
        self.searcher = ShardSearcher(self.engine.pipeline, position)

    def call(self, method: str, *args: object) -> object:
        return getattr(self.searcher, method)(*args)


class RayShards:
    """The fan-out to one :class:`ShardActor` per shard."""

    def __init__(self, cluster: RayCluster, actors: list) -> None:
        self.cluster = cluster
        self.actors = actors

    @classmethod
    def start(cls, spec: str, shard_dirs: Sequence[Path], config: EngineConfig, *, grn_checkpoint: Path | None = None) -> "RayShards":
        """An actor per shard of ``shard_dirs`` on the cluster ``spec``. ``grn_checkpoint``: the stage-2 GRN the
        whole index chose (:meth:`engine.api.Engine._grn_path`), so that no shard chooses by its own size."""
        ray = import_ray()
        cluster = RayCluster.connect(spec)
        try:
            actor = ray.remote(num_cpus=0)(ShardActor)  # searching is short work; actors share the CPUs
            shard_config = replace(config, ray=None, grn_checkpoint=config.grn_checkpoint or grn_checkpoint)
            actors = [actor.remote(Path(d), i, shard_config) for i, d in enumerate(shard_dirs)]
            return cls(cluster, actors)
        except BaseException:
            cluster.close()
            raise

    def __len__(self) -> int:
        return len(self.actors)

    def call(self, position: int, method: str, *args: object) -> object:
        return self.call_many([(position, method, args)])[0]

    def call_many(self, calls: Sequence[tuple[int, str, tuple[object, ...]]]) -> list[object]:
        ray = import_ray()
        try:
            return ray.get([self.actors[position].call.remote(method, *args) for position, method, args in calls])
        except ray.exceptions.RayError as exc:
            raise unwrap_ray_error(exc, doing="searching the shards", advice="check the Ray cluster and run the query again") from None

    def close(self) -> None:
        ray = import_ray()
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception as exc:
                log.debug("could not stop a shard actor: %s", exc)
        self.actors = []
        self.cluster.close()
