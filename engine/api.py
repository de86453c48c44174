"""The Python face of the engine: ``Engine(index_dir).index(corpus)`` and ``.search(...)``."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.boxes import Box
from engine.config import EngineConfig, IndexConfig, default_index_dir
from engine.errors import EngineError, IndexNotFoundError, IndexVersionError, InvalidInputError
from engine.results import Hit
from query.filters import HitFilter
from query.request import SearchRequest

__all__ = ["Engine", "SearchRequest", "Stage2Query"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage2Query:
    """A visual or combined query after encoding: what stages 1–2 need (:meth:`Engine.stage2`)."""

    store: Any
    vector: Any  # np.ndarray [D], the query region's stage-1 vector
    options: Any  # query.search.SearchOptions
    rescore: Any  # stage-2 scorer, None for a visual-only query
    extra: list[int]

    def run(self, k: int | None = None) -> list[Hit]:
        """Stages 1–2: the ``k`` (default ``options.k``) best hits."""
        from dataclasses import replace

        from query.search import search_regions

        options = self.options if k is None else replace(self.options, k=k)
        return search_regions(self.store, self.vector, options, self.rescore, extra_ids=self.extra)


class Engine:
    """A region retrieval engine over one index directory.

    Models load lazily on first use and are kept for later calls; the index is opened read-only for
    searching and with the writer lock for indexing.

    Example::

        engine = Engine("my-index")
        engine.index("corpus/")
        hits = engine.search(image="q.jpg", region=(40, 60, 200, 220), k=5)
    """

    def __init__(self, index_dir: Path | str | None = None, *, config: EngineConfig | None = None) -> None:
        self.index_dir = Path(index_dir) if index_dir is not None else default_index_dir()
        self.config = config or EngineConfig()
        self._extractor: Any = None
        self._reader: Any = None
        self._retrieval_model: Any = None
        self._san_encoder: Any = None
        self._grounding: Any = None
        self._ref_nms: Any = None

    # -- models -------------------------------------------------------------------------------
    @property
    def extractor(self):  # -> RegionFeatureExtractor
        if self._extractor is None:
            from engine.device import resolve_device
            from indexer.backbone import create_backbone
            from indexer.region_features import RegionFeatureExtractor

            device = resolve_device(self.config.device)
            backbone = create_backbone(self.config.backbone, device=device)
            self._extractor = RegionFeatureExtractor(backbone=backbone, config=self.config.features)
        return self._extractor

    def _models(self) -> dict[str, str]:
        return {"backbone": self.extractor.backbone.version, "region_features": self.extractor.version}

    def _array_shapes(self, *, san: bool | None = None, pooled: bool = True, maps: bool = True, refnms: bool | None = None) -> dict[str, tuple[int, ...]]:
        from indexer.store import MAPS_ARRAY, POOLED_ARRAY, REFNMS_ARRAY

        c, h, w = self.extractor.map_shape
        shapes: dict[str, tuple[int, ...]] = {"visual": (c,)}
        if maps:
            shapes[MAPS_ARRAY] = (c, h, w)
        if pooled:
            shapes[POOLED_ARRAY] = (c,)
        if self.config.san if san is None else san:
            shapes["san"] = (self.san_encoder.dim,)
        if self.config.stage3 if refnms is None else refnms:
            shapes[REFNMS_ARRAY] = (self.ref_nms_model.config.dim,)
        return shapes

    @property
    def ref_nms_model(self):  # -> engine.models.ref_nms.RefNMSModel
        """Stage 3's Ref-NMS model, loaded once from ``config.ref_nms_checkpoint`` (``None``: the shipped
        ``ref-nms-r``); indexing stores its text-independent visual features."""
        if self._ref_nms is None:
            from engine.device import resolve_device
            from engine.models.registry import load_model

            self._ref_nms = load_model(self.config.ref_nms_checkpoint, device=resolve_device(self.config.device), family="ref-nms")
        return self._ref_nms

    @property
    def san_encoder(self):  # -> indexer.san_features.SanRegionEncoder
        """SAN's region encoder (saliency network + SAN), loaded once from the configured or shipped checkpoints."""
        if self._san_encoder is None:
            from engine.models.registry import load_model
            from indexer.san_features import SanRegionEncoder

            backbone = self.extractor.backbone
            saliency = load_model(self.config.saliency_checkpoint, device=backbone.device, family="saliency")
            saliency.check_backbone(backbone.version, backbone.max_size)
            model = load_model(self.config.san_checkpoint, device=backbone.device, family="san")
            model.check_saliency(saliency)
            self._san_encoder = SanRegionEncoder(backbone=backbone, saliency=saliency, model=model)
        return self._san_encoder

    # -- indexing -----------------------------------------------------------------------------
    def index(self, corpus: Path | str, *, config: IndexConfig | None = None, progress: bool = False):
        """Index (or update the index of) every image under ``corpus``; returns an ``IndexSummary``."""
        from indexer.pipeline import IndexingPipeline
        from indexer.proposal_sources import create_proposal_provider
        from indexer.store import IndexStore

        config = config or IndexConfig()
        corpus = Path(corpus)
        if not corpus.is_dir():
            raise InvalidInputError(f"corpus folder {corpus} does not exist or is not a folder; pass a folder of images")
        proposals = create_proposal_provider(config.proposals, corpus.resolve(), backbone=self.extractor.backbone)
        self._close_reader()
        with IndexStore.open(self.index_dir, create=True, writable=True, config=self.config.store, array_shapes=self._index_shapes(maps=config.maps)) as store:
            san = self.san_encoder if store.has_array("san") else None
            models = {**self._models(), "proposals": getattr(proposals, "version", proposals.source)}
            if san is not None:
                models["san"] = san.version
            ref_nms = self._indexing_ref_nms(store)
            if ref_nms is not None:
                models["ref_nms"] = ref_nms.version
            pipeline = IndexingPipeline(store=store, extractor=self.extractor, proposals=proposals, batch_size=config.batch_size, save_every=config.save_every, models=models, san=san, ref_nms=ref_nms)
            return pipeline.run(corpus, progress=progress, skip=(self.index_dir,))

    def _indexing_ref_nms(self, store):  # noqa: ANN001, ANN202
        """The Ref-NMS model whose visual features an index with the ``refnms`` array stores; a clear error
        when its earlier runs stored another model's (the rows must all come from one model)."""
        from indexer.store import REFNMS_ARRAY

        if not store.has_array(REFNMS_ARRAY):
            return None
        model = self.ref_nms_model
        indexed = store.models().get("ref_nms")
        if indexed and indexed != model.version:
            raise IndexVersionError(
                f"index {self.index_dir} holds Ref-NMS features of {indexed}, but this engine loads {model.version}; "
                "configure the Ref-NMS checkpoint it was built with, or index into a new directory"
            )
        return model

    def _index_shapes(self, *, maps: bool = True) -> dict[str, tuple[int, ...]]:
        """The arrays to index: with SAN for a new index (when configured) and the 7×7 maps unless
        ``maps`` is False; an existing index keeps its arrays (one built without SAN stays without it,
        with a warning: text-only search then needs a re-index into a new directory)."""
        from indexer.store import MAPS_ARRAY, POOLED_ARRAY, REFNMS_ARRAY, IndexStore

        try:
            with IndexStore.open(self.index_dir, config=self.config.store) as existing:
                stored = {name: spec.shape for name, spec in existing.array_specs.items()}
        except IndexNotFoundError:  # none yet, or a creation a killed run left unfinished: a new index
            return self._array_shapes(maps=maps)
        pooled = POOLED_ARRAY in stored  # an index from before the pooled array keeps reading maps in stage 2
        has_maps = MAPS_ARRAY in stored
        if has_maps != maps:
            log.warning("index %s was created %s the 7x7 maps and keeps it that way (a new directory can be built %s)", self.index_dir, "with" if has_maps else "without", "--no-maps" if has_maps else "with maps")
        refnms = REFNMS_ARRAY in stored  # an index from before it computes Ref-NMS's visual half at query time
        if "san" in stored:  # its rows must be written (IndexStore.open reports any other mismatch)
            return self._array_shapes(san=True, pooled=pooled, maps=has_maps, refnms=refnms)
        if self.config.san:
            log.warning("index %s was built without SAN embeddings: text-only queries need a re-index into a new directory", self.index_dir)
        return self._array_shapes(san=False, pooled=pooled, maps=has_maps, refnms=refnms)

    # -- searching ----------------------------------------------------------------------------
    def search(
        self,
        *,
        image: Path | str | None = None,
        region: Box | list[float] | None = None,
        text: str | None = None,
        k: int = 10,
        exclude_self: bool = False,
        region_id: int | None = None,
        filters: HitFilter | None = None,
    ) -> list[Hit]:
        """The ``k`` indexed regions that show the same thing as ``region`` of ``image``.

        ``region`` defaults to the whole image; ``region_id`` instead queries with an indexed region
        (its stored features: "more like this hit"). With ``text``, stage 1 shortlists
        ``config.shortlist`` candidates by visual similarity, joined by the text's top
        ``config.san_candidates`` SAN matches, and stage 2 reranks them by
        ``config.image_weight · grn + config.text_weight · san``: the GRN similarity (the text gates
        the query region and every candidate) plus SAN's score of how well each candidate fits the
        text (the GRN alone when the index holds no SAN vectors). Stage 3 (with ``config.stage3``)
        then grounds the text in the best images with Ref-NMS and CM-Att and returns their grounded
        regions first, scored ``stage2 + w_r · relatedness + w_g · grounding``
        (``query/localize.py``). With ``text`` alone (no image), SAN's text vector searches the
        index's SAN embeddings and the full SAN (saliency-guided textual attention per candidate)
        reranks them. ``exclude_self`` drops hits from the query image itself (matched by content
        hash); ``filters`` (:class:`query.filters.HitFilter`) restrict the hits.
        """
        request = SearchRequest(image=image, region=region, text=text, k=k, exclude_self=exclude_self, region_id=region_id, filters=filters)
        return self._run(request, None)

    def search_batch(self, requests: Sequence[SearchRequest], *, batch_size: int = 16) -> list[list[Hit] | EngineError]:
        """Each request's hits, or the :class:`EngineError` that request raised (the others still run).

        The query regions are encoded in batches: the regions of one image share one backbone pass,
        and images of the same size are batched ``batch_size`` at a time.
        """
        from query.batch import encode_requests

        encoded = encode_requests(self.extractor, requests, batch_size=batch_size)
        out: list[list[Hit] | EngineError] = []
        for i, request in enumerate(requests):
            try:
                enc = encoded.get(i)
                if isinstance(enc, EngineError):
                    raise enc
                out.append(self._run(request, enc))
            except EngineError as exc:
                out.append(exc)
        return out

    def region(self, region_id: int):  # -> indexer.store.RegionRow
        """The indexed region ``region_id`` (image path, box, …); a clear error when it is not in the index."""
        rows = self._open_reader().regions([region_id])
        if not rows:
            raise InvalidInputError(f"region {region_id} is not in index {self.index_dir}; region ids come from earlier hits (engine query --json)")
        return rows[0]

    def _run(self, request: SearchRequest, encoded: Any) -> list[Hit]:  # noqa: ANN401
        request.validate()
        if request.image is None and request.region_id is None:
            return self._search_text(request)
        query = self.stage2(request, encoded)
        if request.text is not None and self.config.stage3:
            return self._search_grounded(query, request)
        return query.run()

    def stage2(self, request: SearchRequest, encoded: Any = None) -> "Stage2Query":  # noqa: ANN401
        """Stages 1–2 of a visual (or combined) query, ready to run: the query vector, the stage-2
        scorer (``None`` without text) and the extra candidates SAN adds (see :meth:`search`).
        ``encoded``: the request's ``(QueryRegion, map, vector)`` when already encoded (batches)."""
        from query.search import SearchOptions

        request.validate()
        SearchOptions(k=request.k, shortlist=self.config.shortlist)  # validates before any model loads
        store = self._open_reader()
        query_map, vector, digest = self._encode(store, request, encoded)
        options = SearchOptions(k=request.k, exclude_self_hash=digest if request.exclude_self else None, shortlist=self.config.shortlist, filters=request.filters)
        rescore = None
        extra: list[int] = []
        if request.text is not None:
            rescore, extra = self._stage2_scorer(store, query_map, request.text)
        return Stage2Query(store=store, vector=vector, options=options, rescore=rescore, extra=extra)

    def _encode(self, store, request: SearchRequest, encoded: Any):  # noqa: ANN001, ANN202, ANN401
        """``(query map, query vector, content hash of the query image)``."""
        import numpy as np

        if request.region_id is not None:
            from query.rerank import read_region_maps

            row = self.region(request.region_id)
            rows = np.asarray([row.row], np.int64)
            vector = store.read_arrays("visual", rows)[0].astype(np.float32)
            return read_region_maps(store, rows)[0], vector / max(float(np.linalg.norm(vector)), 1e-12), row.content_hash
        if encoded is None:
            from query.encode import VisualQueryEncoder, load_query_region

            query = load_query_region(request.image, request.region)
            return (*VisualQueryEncoder(self.extractor).encode(query), query.content_hash)
        query, query_map, vector = encoded
        return query_map, vector, query.content_hash

    def _stage2_scorer(self, store, query_map, text: str):  # noqa: ANN001, ANN202
        """The stage-2 scorer of a combined query and the SAN candidates that join its shortlist."""
        from query.rerank import FusedRescorer, GrnRescorer, SanRescorer

        model = self.retrieval_model
        model.encode_text(text)  # unknown-only or empty text fails here, before any scoring
        rescore = GrnRescorer(store=store, model=model, query_map=query_map, text=text)
        san_vector = self._san_text_vector(store, text)
        extra = self._san_candidates(store, san_vector) if san_vector is not None else []
        if san_vector is not None and self.config.text_weight > 0:
            san = SanRescorer(store=store, model=self.san_encoder.model, text=text)
            return FusedRescorer(rescore, san, text_weight=self.config.text_weight, image_weight=self.config.image_weight), extra
        return rescore, extra

    def _search_grounded(self, query: "Stage2Query", request: SearchRequest) -> list[Hit]:
        """Stages 1–2 ranked in full, then stage 3 over the best images (``query/localize.py``)."""
        from query.localize import best_images, rank_stage3

        ranked = query.run(k=self.config.shortlist)
        weights, stage = self.grounding_stage(query.store)
        grounded = {}
        for path in best_images(ranked, weights.images):
            candidates = stage.candidates(path, str(request.text), query.rescore, query.vector)
            if candidates is not None:
                grounded[path] = candidates
        hits = rank_stage3(ranked, grounded, weights, len(ranked) + sum(len(c.rows) for c in grounded.values()))
        if request.filters is not None:
            hits = request.filters.apply(hits)
        return hits[: request.k]

    def grounding_stage(self, store):  # noqa: ANN001, ANN201
        """Stage 3's weights and :class:`query.localize.GroundingStage` (models loaded once)."""
        from indexer.store import REFNMS_ARRAY
        from query.localize import GroundingStage, load_stage3_weights

        if self._grounding is None:
            from engine.device import resolve_device
            from engine.models.cm_att import REGION_GROUNDING_NAME
            from engine.models.registry import load_model

            device = resolve_device(self.config.device)
            weights = self.config.stage3_weights or load_stage3_weights()
            scorer = load_model(self.config.grounding_checkpoint or REGION_GROUNDING_NAME, device=device, family="cm-att")
            self._grounding = (weights, self.ref_nms_model, scorer)
        weights, ref_nms, scorer = self._grounding
        stored = store.has_array(REFNMS_ARRAY) and store.models().get("ref_nms") == ref_nms.version
        return weights, GroundingStage(store=store, ref_nms=ref_nms, scorer=scorer, image_vector=self._image_vector, region_maps=self._region_maps, stored_relatedness_features=stored)

    def _image_vector(self, path: str):  # noqa: ANN202
        """The mean backbone feature of an image file (for images indexed before they were stored)."""
        from indexer.images import load_image

        with __import__("torch").no_grad():
            fmap = self.extractor.feature_map([load_image(Path(path))])
        return fmap[0].float().mean(dim=(1, 2)).cpu().numpy()

    def _region_maps(self, path: str, rows: list) -> Any:  # noqa: ANN401
        """The 7×7 maps float16 ``[n, C, 7, 7]`` of indexed regions ``rows`` of the image at ``path``, computed
        again from the file exactly as indexing computed them (an index built without maps); ``None`` when
        the file is gone or no longer the one indexed (another content hash)."""
        import numpy as np

        from indexer.images import load_image
        from indexer.scan import content_hash

        try:
            if content_hash(Path(path)) != rows[0].content_hash:
                return None
            image = load_image(Path(path))
        except (OSError, EngineError):
            return None
        [(maps, _)] = self.extractor([image], [np.asarray([r.box for r in rows], np.float64)])  # no_grad inside
        return maps

    def _check_san_index(self, store) -> None:  # noqa: ANN001
        """A clear error when the index holds no SAN embeddings, or ones of another SAN model."""
        if not store.has_array("san"):
            raise IndexVersionError(
                f"index {self.index_dir} was built without SAN embeddings, which text-only search needs; "
                f"re-index the corpus into a new directory: engine index CORPUS --index NEWDIR"
            )
        indexed = store.models().get("san")
        if indexed and indexed != self.san_encoder.version:
            raise IndexVersionError(
                f"index {self.index_dir} holds SAN embeddings of {indexed}, but this engine loads {self.san_encoder.version}; "
                f"re-index the corpus into a new directory (engine index CORPUS --index NEWDIR) or configure the SAN checkpoint it was built with"
            )

    def _search_text(self, request: SearchRequest) -> list[Hit]:
        """Text-only search: SAN's ``t_g`` searches the ``san`` FAISS file (stage 1), the full STA reranks."""
        from query.rerank import SanRescorer
        from query.search import SearchOptions, search_regions

        options = SearchOptions(k=request.k, shortlist=self.config.shortlist, filters=request.filters)
        store = self._open_reader()
        self._check_san_index(store)
        model = self.san_encoder.model
        text = str(request.text)
        vector = model.text_vector(text)
        return search_regions(store, vector, options, SanRescorer(store=store, model=model, text=text), array="san", stage1="san_text")

    def _san_text_vector(self, store, text: str):  # noqa: ANN001, ANN202
        """SAN's text vector when SAN can serve a combined query (the engine uses SAN, the index holds
        this SAN model's embeddings, SAN knows a word of the text); ``None`` and the GRN works alone."""
        if not self.config.san or not store.has_array("san"):
            return None
        try:
            self._check_san_index(store)
            return self.san_encoder.model.text_vector(text)
        except (IndexVersionError, InvalidInputError) as exc:
            log.info("SAN does not serve this query: %s", exc)
            return None

    def _san_candidates(self, store, vector) -> list[int]:  # noqa: ANN001
        """Region ids of the SAN text ``vector``'s top matches (they join stage 1's shortlist)."""
        if self.config.san_candidates <= 0:
            return []
        _, ids = store.search(vector[None], self.config.san_candidates, array="san")
        return [int(i) for i in ids[0] if i >= 0]

    @property
    def retrieval_model(self):  # -> RegionRetrievalModel
        """The text-gated reranker (GRN), loaded once from ``config.grn_checkpoint`` or the shipped default."""
        if self._retrieval_model is None:
            from engine.device import resolve_device
            from engine.models.registry import load_model

            device = resolve_device(self.config.device)
            self._retrieval_model = load_model(self._grn_path(device), device=device, family="grn-family")
        return self._retrieval_model

    def _grn_path(self, device):  # noqa: ANN001, ANN202
        """``config.grn_checkpoint``, else the shipped default for this index and device: the conv
        ``grn`` (the paper's model; best R@10/R@100) on a GPU and for indexes under
        ``config.fc_from_regions`` regions, ``grn-fc`` on the CPU from there on, where the conv GRN's
        ~0.25 s per 1,000 candidates cannot meet a 100 ms query (docs/benchmarks.md); ``grn-fc`` always
        on an index built without the 7×7 maps (``engine index --no-maps``)."""
        from engine.models.checkpoint import default_checkpoint
        from indexer.index_dir import IndexLayout
        from indexer.store import MAPS_ARRAY

        if self.config.grn_checkpoint is not None:
            return self.config.grn_checkpoint
        if not IndexLayout(self.index_dir.expanduser().resolve()).exists():
            return None
        if not self._open_reader().has_array(MAPS_ARRAY):
            log.info("index built without 7x7 maps: stage 2 uses grn-fc")
            return default_checkpoint("grn-fc")
        if device.type == "cuda":
            return None
        regions = self._open_reader().vector_count()
        if regions >= self.config.fc_from_regions:
            log.info("index of %d regions on the CPU: stage 2 uses grn-fc (EngineConfig.fc_from_regions=%d)", regions, self.config.fc_from_regions)
            return default_checkpoint("grn-fc")
        return None

    def render(
        self,
        hits: list[Hit],
        *,
        image: Path | str | None = None,
        region: Box | list[float] | None = None,
        text: str | None = None,
        out_dir: Path | str,
    ) -> list[Path]:
        """Draw the query (its region, or a card with its text) and each hit's box into ``out_dir``.

        Writes ``query.png``, ``hit_NN.png`` and ``contact_sheet.png``; a query needs an image or a text.
        """
        from query.encode import load_query_region
        from query.render import render_results

        if image is None:
            if region is not None:
                raise InvalidInputError("a region needs an image: the region is a box in that image")
            if text is None or not text.strip():
                raise InvalidInputError("nothing to draw: give the query image or the query text")
            return render_results(None, None, hits, Path(out_dir), text=text.strip())
        query = load_query_region(image, region)
        return render_results(query.image, query.box, hits, Path(out_dir), text=text)

    # -- inspection ---------------------------------------------------------------------------
    def info(self):
        """Counts, index type, device and models of the index (an ``IndexInfo``)."""
        return self._open_reader().info()

    def errors(self) -> list[tuple[str, str]]:
        """``(path, reason)`` of every image that could not be indexed."""
        return self._open_reader().errors()

    # -- maintenance --------------------------------------------------------------------------
    def remove(self, paths: list[Path | str] | tuple[Path | str, ...]):  # -> indexer.removal.RemoveSummary
        """Remove the images at ``paths`` (image files, or folders: every image indexed under them).

        All or nothing: a path with no indexed image at or under it raises ``InvalidInputError``
        naming it, and nothing is removed. Takes the writer lock; the FAISS files are saved without
        the removed regions, whose feature rows stay dead until :meth:`compact`.
        """
        from indexer.removal import remove_paths
        from indexer.store import IndexStore

        self._close_reader()
        with IndexStore.open(self.index_dir, writable=True, config=self.config.store) as store:
            return remove_paths(store, list(paths))

    def compact(self):  # -> indexer.compaction.CompactSummary
        """Rewrite the feature store without the rows of removed or replaced images (crash-safe,
        under the writer lock); returns the bytes before and after (``docs/index-layout.md``)."""
        from indexer.store import IndexStore

        self._close_reader()
        with IndexStore.open(self.index_dir, writable=True, config=self.config.store) as store:
            return store.compact()

    def check(self, *, repair: bool = False):  # -> indexer.integrity.CheckReport
        """Verify every file of the index against its database (sizes, checksums recorded at commit and save);
        with ``repair`` rebuild the FAISS files and region table and re-extract the damaged images' features
        (under the writer lock). See ``docs/index-layout.md``, "Checksums and `engine check`"."""
        from indexer.integrity import check_index, repair_index

        self._close_reader()
        if not repair:
            return check_index(self.index_dir, config=self.config.store)
        return repair_index(self.index_dir, config=self.config.store, reindex=self._reindex_damaged)

    def _reindex_damaged(self, store, job) -> None:  # noqa: ANN001 - IndexStore, indexer.integrity.ReindexJob
        """Extract ``job``'s images again into ``store`` with the models their run used (else a clear error)."""
        from indexer.pipeline import IndexingPipeline
        from indexer.proposal_sources import create_proposal_provider

        proposals = create_proposal_provider(job.proposals, job.corpus, backbone=self.extractor.backbone)
        san = self.san_encoder if store.has_array("san") else None
        ref_nms = self._indexing_ref_nms(store)
        models = {**self._models(), "proposals": getattr(proposals, "version", proposals.source)}
        models.update({k: m.version for k, m in (("san", san), ("ref_nms", ref_nms)) if m is not None})
        differ = sorted(k for k in set(models) & set(job.models) if models[k] != job.models[k])
        if differ:
            raise IndexVersionError(
                f"{len(job.paths)} image(s) were indexed with other models ({', '.join(f'{k}: {job.models[k]}' for k in differ)}); "
                f"this engine loads {', '.join(models[k] for k in differ)}; configure those models, or re-index into a new directory"
            )
        IndexingPipeline(store=store, extractor=self.extractor, proposals=proposals, models=models, san=san, ref_nms=ref_nms).reindex(list(job.paths), corpus=job.corpus)

    def close(self) -> None:
        self._close_reader()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open_reader(self):
        from indexer.store import IndexStore

        if self._reader is None:
            self._reader = IndexStore.open(self.index_dir, config=self.config.store)
        return self._reader

    def _close_reader(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
